"""gym-pusht's PushT (optional extra): adapter (state and pixels), env_args round trip, LeRobot-style
metrics, the scripted push planner, demo collection, and a bring-your-own-dataset training smoke run.
Skipped without gym-pusht."""

import numpy as np
import pytest

pytest.importorskip("gym_pusht", reason="optional extra not installed: pip install 'gym-pusht>=0.1.5,<0.2' 'pymunk>=6.6,<7'")

import dpolicy_envs as envs  # noqa: E402
from dpolicy_envs import pusht  # noqa: E402

GOAL = (256.0, 256.0, np.pi / 4)  # gym-pusht's goal pose of the T


def test_env_args_round_trip_obs_and_action_spaces():
    args = envs.env_args("pusht")
    assert args["env_name"] == "gym_pusht/PushT-v0" and args["env_type"] == "gymnasium"
    env = envs.make_env_from_args(args)
    try:
        obs, info = env.reset(seed=0)
        assert list(obs) == ["state"] and obs["state"].shape == (5,) and info["is_success"] is False
        assert env.action_space.shape == (2,) and env.action_space.low.min() == -1 and env.action_space.high.max() == 1
        again, _ = env.reset(seed=0)
        np.testing.assert_array_equal(obs["state"], again["state"])
    finally:
        env.close()


def test_block_on_the_goal_is_a_success_with_full_reward():
    env = envs.make_env("pusht")
    try:
        env.reset(seed=0, options={"reset_to_state": [100.0, 100.0, 400.0, 400.0, 0.0]})
        block = env.unwrapped.block  # angle first: gym-pusht's reset_to_state rotates about the centre of mass after placing
        block.angle, block.position = GOAL[2], list(GOAL[:2])
        _, r, term, _, info = env.step(np.array([100 / 256 - 1, 100 / 256 - 1], np.float32))
        assert info["coverage"] > pusht.SUCCESS_COVERAGE and info["is_success"] and term and r == pytest.approx(1.0)
        env.reset(seed=0, options={"reset_to_state": [100.0, 100.0, 400.0, 400.0, 0.0]})
        _, r, term, _, info = env.step(np.zeros(2, np.float32))
        assert info["coverage"] < 0.5 and not info["is_success"] and not term
        assert r == pytest.approx(min(info["coverage"] / 0.95, 1.0))
    finally:
        env.close()


def test_lerobot_metrics_aggregate():
    eps = [pusht.episode_metrics([0.1, 0.5, 1.0], [0.1, 0.475, 0.96], [False, False, True]),
           pusht.episode_metrics([0.2, 0.3], [0.19, 0.285], [False, False])]
    m = pusht.aggregate(eps)
    assert m["pc_success"] == 0.5 and m["successes"] == 1
    assert m["avg_max_reward"] == pytest.approx((1.0 + 0.3) / 2) and m["avg_sum_reward"] == pytest.approx((1.6 + 0.5) / 2)
    assert m["mean_max_coverage"] == pytest.approx((0.96 + 0.285) / 2)
    with pytest.raises(ValueError, match="at least one step"):
        pusht.episode_metrics([], [], [])


def test_evaluate_reference_policy_is_seeded_and_consistent():
    a = pusht.evaluate(pusht.hold_policy, episodes=2, seed=7, max_steps=40)
    b = pusht.evaluate(pusht.hold_policy, episodes=2, seed=7, max_steps=40)
    assert a["episodes"] == 2 and a["per_episode"] == b["per_episode"]
    for e in a["per_episode"]:
        assert e["length"] == 40 and 0.0 <= e["max_coverage"] <= 1.0
        assert e["max_reward"] == pytest.approx(min(e["max_coverage"] / 0.95, 1.0))
    with pytest.raises(ValueError, match="at least 1"):
        pusht.evaluate(pusht.random_policy, episodes=0)


def test_train_on_a_pusht_dataset_and_evaluate(tmp_path):
    from dpolicy.bench.suite import compose_run
    from dpolicy.data.robomimic import Demo, write_dataset
    from dpolicy.train.bc import train_bc

    env = envs.make_env("pusht")
    demos = []
    for s in range(3):
        obs, _ = env.reset(seed=s)
        act = pusht.random_policy(s)
        o, a = [], []
        for _ in range(30):
            o.append(obs["state"])
            a.append(act(obs))
            obs, *_ = env.step(a[-1])
        demos.append(Demo(obs={"state": np.stack(o)}, actions=np.stack(a)))
    env.close()
    path = write_dataset(tmp_path / "pusht.hdf5", demos, envs.env_args("pusht"))
    cfg = compose_run(["task=avoid", "task.name=pusht", f"data.path={path}", "train.steps=20", "train.batch_size=16",
                       "train.progress=false", "policy.net.hidden=32", "policy.net.depth=1", "eval.episodes=2",
                       "eval.n_envs=2", "eval.video=false", "eval.plot=false", "task.obs_keys=[]"])
    m = train_bc(cfg, tmp_path / "run", progress=False)
    assert m["train_steps"] == 20 and m["eval"]["n_episodes"] == 2 and m["eval"]["mean_length"] <= 300
    from dpolicy.bench.standard import _ChunkActor
    from dpolicy.policy import load_policy

    policy = load_policy(tmp_path / "run" / "checkpoints")
    r = pusht.evaluate(lambda s: _ChunkActor(policy), episodes=1, seed=3, max_steps=12)
    assert r["per_episode"][0]["length"] == 12 and 0.0 <= r["avg_max_reward"] <= 1.0


def test_pixel_observations_are_uint8_images_and_seeded():
    env = envs.make_env("pusht_image")
    try:
        assert list(env.observation_space.spaces) == ["agent_pos", "agentview_image"]
        obs, info = env.reset(seed=3)
        assert list(obs) == ["agent_pos", "agentview_image"] and info["is_success"] is False
        assert obs["agent_pos"].shape == (2,) and obs["agent_pos"].dtype == np.float32
        assert obs["agentview_image"].shape == (96, 96, 3) and obs["agentview_image"].dtype == np.uint8
        assert obs["agentview_image"].std() > 0
        assert env.observation_space.contains(obs)
        np.testing.assert_array_equal(env.unwrapped.state_obs()["state"][:2], obs["agent_pos"])
        a = np.array([0.2, -0.3], np.float32)
        first, _, _, _, _ = env.step(a)
        again, _ = env.reset(seed=3)
        np.testing.assert_array_equal(again["agentview_image"], obs["agentview_image"])
        second, _, _, _, _ = env.step(a)
        for k in first:
            np.testing.assert_array_equal(first[k], second[k])
    finally:
        env.close()
    args = envs.env_args("pusht_image")
    assert args["env_name"] == "gym_pusht/PushT-v0" and args["env_kwargs"]["obs_type"] == "pixels_agent_pos"
    with pytest.raises(ValueError, match="obs_type"):
        envs.make_env("pusht", obs_type="keypoints")


def test_state_round_trip_restores_the_physics():
    env = envs.make_env("pusht")
    try:
        env.reset(seed=1)
        for _ in range(3):
            env.step(np.array([0.1, 0.1], np.float32))
        s = env.unwrapped.get_state()
        a = np.array([-0.2, 0.4], np.float32)
        ref = [env.step(a)[0]["state"] for _ in range(3)]
        env.unwrapped.set_state(s)
        # pymunk's contact warm-start cache is not part of the state: equal to within hundredths of a pixel
        np.testing.assert_allclose([env.step(a)[0]["state"] for _ in range(3)], ref, atol=0.02)
        with pytest.raises(ValueError, match="entries"):
            env.unwrapped.set_state(s[:5])
    finally:
        env.close()


@pytest.mark.parametrize("task", ["pusht", "pusht_image"])
def test_expert_actions_are_in_the_unit_box_and_move_the_agent(task):
    env = envs.make_env(task)
    try:
        obs, info = env.reset(seed=0)
        expert = envs.make_expert(env, seed=0)
        assert isinstance(expert, pusht.PushTExpert)
        expert.reset(obs, info)
        start = env.unwrapped.get_state()[:2]
        for _ in range(6):
            a = expert(obs)
            assert a.shape == (2,) and a.dtype == np.float32 and np.all(np.abs(a) <= 1.0)
            obs, *_ = env.step(a)
        assert np.linalg.norm(env.unwrapped.get_state()[:2] - start) > 1.0
    finally:
        env.close()


def test_expert_plans_a_push_that_reduces_the_pose_error():
    env = envs.make_env("pusht")
    try:
        # block right of the goal at the goal's angle, agent beside it: one push to the left is the best move
        env.reset(seed=0, options={"reset_to_state": [100.0, 100.0, 256.0, 256.0, np.pi / 4]})
        s = env.unwrapped.get_state()
        s[2] += 25.0
        env.unwrapped.set_state(s)
        expert = pusht.PushTExpert(env)
        before = pusht.keypoint_error(env.unwrapped.get_state()[2:5])
        obs = None
        for _ in range(60):
            obs, _, term, _, info = env.step(expert(obs))
            if term:
                break
        assert pusht.keypoint_error(env.unwrapped.get_state()[2:5]) < 0.5 * before
    finally:
        env.close()


def test_collect_a_short_pusht_image_demo(tmp_path):
    import h5py

    from dpolicy.data.collect import collect_demos

    summary = collect_demos("pusht_image", 1, tmp_path / "d.hdf5", env_kwargs={"max_episode_steps": 5},
                            keep_failures=True, progress=False)
    assert summary["demos"] == 1 and summary["max_length"] <= 5 and summary["image_keys"] == ["agentview_image"]
    with h5py.File(summary["path"], "r") as f:
        demo = f["data/demo_0"]
        img = demo["obs/agentview_image"]
        assert img.dtype == np.uint8 and img.shape[1:] == (96, 96, 3) and demo["obs/agent_pos"].shape[1:] == (2,)
        assert demo["states"].shape[1] == 10 and np.abs(demo["actions"][:]).max() <= 1.0


def test_keypoint_observations_follow_the_block_and_rerender_from_states(tmp_path):
    import h5py

    from dpolicy.data.collect import collect_demos
    from dpolicy.data.rerender import rerender_dataset

    env = envs.make_env("pusht_keypoints")
    try:
        obs, _ = env.reset(seed=3)
        assert list(obs) == ["agent_pos", "environment_state"] and obs["environment_state"].shape == (16,)
        s = env.unwrapped.get_state()
        np.testing.assert_allclose(obs["agent_pos"], s[:2], atol=1e-3)
        # the keypoints move rigidly with the block: shift it and every keypoint shifts by as much
        moved = s.copy()
        moved[2:4] += [20.0, -10.0]
        env.unwrapped.set_state(moved)
        shifted = env.unwrapped.observation()["environment_state"].reshape(8, 2)
        np.testing.assert_allclose(shifted - obs["environment_state"].reshape(8, 2), [[20.0, -10.0]] * 8, atol=1e-3)
        # a rotation by 2 pi gives the same keypoints (no wrap-around, unlike the state's angle)
        turned = s.copy()
        turned[4] += 2 * np.pi
        env.unwrapped.set_state(turned)
        np.testing.assert_allclose(env.unwrapped.observation()["environment_state"], obs["environment_state"], atol=1e-3)
    finally:
        env.close()
    assert envs.env_args("pusht_keypoints")["env_kwargs"]["obs_type"] == "environment_state_agent_pos"
    summary = collect_demos("pusht", 1, tmp_path / "state.hdf5", env_kwargs={"max_episode_steps": 6},
                            keep_failures=True, progress=False)
    out = rerender_dataset(summary["path"], tmp_path / "kp.hdf5", "pusht_keypoints", progress=False)
    assert set(out["obs"]) == {"agent_pos", "environment_state"}
    with h5py.File(out["path"], "r") as f, h5py.File(summary["path"], "r") as g:
        d, src = f["data/demo_0"], g["data/demo_0"]
        np.testing.assert_allclose(d["obs/agent_pos"][:], src["obs/state"][:, :2], atol=1e-3)
        np.testing.assert_array_equal(d["actions"][:], src["actions"][:])
        kp = d["obs/environment_state"][:]
        assert kp.shape == (len(src["actions"]), 16) and np.isfinite(kp).all()
