"""gym-pusht's PushT (optional extra): adapter, env_args round trip, LeRobot-style metrics, and a
bring-your-own-dataset training smoke run. Skipped without gym-pusht."""

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
