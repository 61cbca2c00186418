"""Image variants of the task suite (avoid_image, push_image, lift_image): spaces and keys, determinism,
state layout and re-rendering of state-task states, experts through state_obs, vector envs, the GL
error sentence and the benchmark helpers. Offscreen rendering (EGL or OSMesa) is required."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import dpolicy_envs as envs
from dpolicy_envs import base, benchmark

IMAGE_TASKS = {"avoid_image": "avoid", "push_image": "push", "lift_image": "lift"}
KEYS = {"avoid_image": ("agent_pos", "agent_vel", "agentview_image"),
        "push_image": ("pusher_pos", "pusher_vel", "agentview_image"),
        "lift_image": ("eef_pos", "eef_vel", "gripper_state", "agentview_image", "robot0_eye_in_hand_image")}
from test_envs import _gl_available  # noqa: E402  (the same offscreen-GL probe)

OBJECT_KEYS = {"object_pose", "goal_pose", "object_pos", "object_quat", "object_to_eef"}




pytestmark = pytest.mark.skipif(not _gl_available(), reason="offscreen GL (MUJOCO_GL=egl or osmesa) unavailable")


def _images(obs):
    return {k: v for k, v in obs.items() if k.endswith("_image")}


@pytest.mark.parametrize("task", IMAGE_TASKS)
def test_spaces_keys_and_dtypes(task):
    env = envs.make_env(task)
    assert tuple(env.observation_space.spaces) == KEYS[task] == envs.TASKS[task].obs_keys == env.unwrapped.OBS_KEYS
    assert [f"{c}_image" for c in env.unwrapped.cameras] == [k for k in KEYS[task] if k.endswith("_image")]
    obs, info = env.reset(seed=0)
    assert tuple(obs) == KEYS[task] and not OBJECT_KEYS & set(obs) and info["is_success"] is False
    assert env.observation_space.contains(obs)
    for k, img in _images(obs).items():
        space = env.observation_space[k]
        assert space.dtype == np.uint8 and space.shape == (84, 84, 3) and space.low.min() == 0 and space.high.max() == 255
        assert img.dtype == np.uint8 and img.shape == (84, 84, 3) and img.std() > 5, k
    assert all(v.dtype == np.float32 and v.ndim == 1 for k, v in obs.items() if not k.endswith("_image"))
    state = envs.make_env(IMAGE_TASKS[task]).unwrapped
    state.reset(seed=0)
    assert env.unwrapped.state_obs().keys() == state._get_obs().keys()  # the full low-dim observation


def test_check_env_and_image_size():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(envs.make_env("lift_image").unwrapped)
    env = envs.make_env("push_image", image_size=32)
    obs, _ = env.reset(seed=0)
    assert obs["agentview_image"].shape == (32, 32, 3) == env.observation_space["agentview_image"].shape


@pytest.mark.parametrize("kwargs,culprit", [({"image_size": 0}, "image_size"), ({"image_size": 8.5}, "image_size"),
                                            ({"image_size": True}, "image_size"), ({"cameras": ["top"]}, "cameras"),
                                            ({"lift_height": -1.0}, "lift_height")])
def test_bad_kwargs(kwargs, culprit):
    with pytest.raises(ValueError, match=culprit):
        envs.make_env("lift_image", **kwargs)


def test_env_args_round_trip():
    args = envs.env_args("lift_image", image_size=48, horizon=30)
    assert args["env_name"] == "dpolicy/LiftImage-v0" and args["env_type"] == "gymnasium"
    kw = args["env_kwargs"]
    assert kw["image_size"] == 48 and kw["horizon"] == 30 and kw["lift_height"] == envs.TASKS["lift"].default_kwargs["lift_height"]
    assert envs.TASKS["lift_image"].default_kwargs == {**envs.TASKS["lift"].default_kwargs, "image_size": 84}
    rebuilt = envs.make_env_from_args(json.loads(json.dumps(args)))
    direct = envs.make_env("dpolicy/LiftImage-v0", **kw)
    a, _ = rebuilt.reset(seed=4)
    b, _ = direct.reset(seed=4)
    assert rebuilt.unwrapped.horizon == 30 and a["agentview_image"].shape == (48, 48, 3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="wibble"):
        envs.env_args("lift_image", wibble=1)


def test_same_seed_same_actions_same_images():
    a, b = envs.make_env("push_image"), envs.make_env("push_image")
    actions = np.random.default_rng(0).uniform(-1, 1, (15, 2)).astype(np.float32)
    oa, _ = a.reset(seed=3)
    ob, _ = b.reset(seed=3)
    for act in actions:
        assert all(np.array_equal(oa[k], ob[k]) for k in oa)
        oa, *_ = a.step(act)
        ob, *_ = b.step(act)
    assert all(np.array_equal(oa[k], ob[k]) for k in oa)
    other, _ = b.reset(seed=4)
    assert not np.array_equal(other["agentview_image"], a.reset(seed=3)[0]["agentview_image"])


@pytest.mark.parametrize("task", ["push_image", "lift_image"])
def test_state_task_states_rerender_into_images(task):
    """A state dataset's states (same vector layout) re-render into exactly the image env's own observations."""
    state_env, image_env, replay = (envs.make_env(IMAGE_TASKS[task]), envs.make_env(task),
                                    envs.make_env(task, terminate_on_success=False))
    expert = envs.make_expert(state_env, seed=0)
    obs, info = state_env.reset(seed=7)
    img_obs, _ = image_env.reset(seed=7)
    expert.reset(obs, info)
    assert image_env.unwrapped.get_state().shape == state_env.unwrapped.get_state().shape
    for _ in range(12):
        state = state_env.unwrapped.get_state()
        np.testing.assert_array_equal(image_env.unwrapped.get_state(), state)
        replay.unwrapped.set_state(state)
        np.testing.assert_array_equal(replay.unwrapped.get_state(), state)
        again = replay.unwrapped.observation()
        assert all(np.array_equal(again[k], img_obs[k]) for k in img_obs), "re-rendered observation differs"
        assert all(np.array_equal(replay.unwrapped.state_obs()[k], obs[k]) for k in obs)
        action = expert(obs)
        obs, _, term, trunc, _ = state_env.step(action)
        img_obs, _, term2, trunc2, _ = image_env.step(action)
        assert (term, trunc) == (term2, trunc2)
        if term or trunc:
            break


def test_push_goal_marker_is_in_the_picture():
    env = envs.make_env("push_image", randomize_goal=True).unwrapped
    env.reset(seed=0)
    state = env.get_state()
    before = env.observation()["agentview_image"]
    state[-3:] = [-0.3, 0.3, 0.0]  # move only the goal (the task extras are goal x, y, yaw)
    env.set_state(state)
    after = env.observation()["agentview_image"]
    assert np.abs(before.astype(int) - after.astype(int)).sum(-1).astype(bool).sum() > 40  # a goal-sized change
    np.testing.assert_array_equal(env.state_obs()["goal_pose"][:2], np.float32([-0.3, 0.3]))


def test_lift_image_expert_reads_state_obs_and_succeeds():
    env = envs.make_env("lift_image")
    expert = envs.make_expert(env, seed=0)
    assert isinstance(expert, envs.StateObsExpert) and isinstance(expert.expert, envs.LiftExpert)
    for seed in range(4):
        obs, info = env.reset(seed=200 + seed)
        expert.reset(obs, info)
        done = False
        while not done:
            assert not OBJECT_KEYS & set(obs)
            obs, _, term, trunc, info = env.step(expert(obs))
            done = term or trunc
        assert info["is_success"], f"seed {200 + seed}"
    assert expert.phase == 3  # the wrapped expert's episode state shows through


def test_sync_vector_env_batches_images():
    from dpolicy import tasks
    from dpolicy.eval.rollout import make_vector_env

    venv = make_vector_env(tasks.env_factory(tasks.env_args("avoid_image")), 2, "sync")
    try:
        obs, _ = venv.reset(seed=[5, 6])
        assert obs["agentview_image"].shape == (2, 84, 84, 3) and obs["agentview_image"].dtype == np.uint8
        assert obs["agent_pos"].shape == (2, 2)
        single, _ = envs.make_env("avoid_image").reset(seed=6)
        np.testing.assert_array_equal(obs["agentview_image"][1], single["agentview_image"])
        obs, *_ = venv.step(np.zeros((2, 2), np.float32))
        assert obs["agentview_image"].shape == (2, 84, 84, 3)
    finally:
        venv.close()


def test_async_vector_env_after_the_parent_rendered():
    """Once this process has rendered, forked children could not (GL state does not survive fork): the
    project's vector envs then start from a fork server, and a plain forked child says so instead of hanging."""
    import gymnasium as gym

    from dpolicy import tasks
    from dpolicy.eval.rollout import make_vector_env

    parent, _ = envs.make_env("avoid_image").reset(seed=1)
    assert base.rendering_started()
    factory = tasks.env_factory(tasks.env_args("avoid_image"))
    venv = make_vector_env(factory, 2, "async")
    try:
        obs, _ = venv.reset(seed=[1, 2])
        np.testing.assert_array_equal(obs["agentview_image"][0], parent["agentview_image"])
    finally:
        venv.close()
    forked = gym.vector.AsyncVectorEnv([factory], context="fork")
    try:
        with warnings.catch_warnings(), pytest.raises(RuntimeError, match="forked from one that had already rendered"):
            warnings.simplefilter("ignore")  # gymnasium's own report of the worker's error
            forked.reset(seed=0)
    finally:
        forked.close(terminate=True)


def test_video_render_stays_separate():
    env = envs.make_env("lift_image", render_mode="rgb_array", width=96, height=64, image_size=40)
    obs, _ = env.reset(seed=0)
    assert env.render().shape == (64, 96, 3) and obs["agentview_image"].shape == (40, 40, 3)
    env.close()
    obs, *_ = env.step(env.action_space.sample())  # closed renderers come back on demand
    assert env.render().shape == (64, 96, 3) and obs["robot0_eye_in_hand_image"].shape == (40, 40, 3)
    env.close()


def test_gl_failure_is_one_sentence_naming_mujoco_gl(monkeypatch):
    def broken(*_, **__):
        raise RuntimeError("Cannot initialize a EGL device display")

    env = envs.make_env("avoid_image").unwrapped
    monkeypatch.setattr(base.mujoco, "Renderer", broken)
    with pytest.raises(RuntimeError, match="MUJOCO_GL=") as e:
        env.reset(seed=0)
    assert "Cannot initialize" in str(e.value) and str(e.value).count(". ") == 0


def test_collect_demos_from_image_task(tmp_path):
    import h5py

    from dpolicy.data.collect import collect_demos

    summary = collect_demos("lift_image", 2, tmp_path / "demos.hdf5", progress=False)
    assert summary["demos"] == 2 and summary["expert_success_rate"] == 1.0
    with h5py.File(summary["path"]) as f:
        demo = f["data/demo_0"]
        assert set(demo["obs"]) == set(KEYS["lift_image"])
        assert demo["obs/agentview_image"].shape[1:] == (84, 84, 3)
        assert json.loads(f["data"].attrs["env_args"])["env_name"] == "dpolicy/LiftImage-v0"
        states = demo["states"][()]
    env = envs.make_env("lift_image").unwrapped
    env.set_state(states[0])
    assert env.observation()["agentview_image"].shape == (84, 84, 3)


def test_bench_rates():
    assert benchmark.steps_per_second("lift_image", n_steps=20) > 0
    assert benchmark.renders_per_second("lift_image", n_renders=5) > 0
    with pytest.raises(ValueError, match="no cameras"):
        benchmark.renders_per_second("lift", n_renders=5)
