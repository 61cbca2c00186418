"""robosuite tasks (optional extra): env_args round trip as robomimic stores it, robomimic's low-dim
observation keys, camera observations, scripted experts, collect -> HDF5 -> train -> evaluate. Skipped
without robosuite."""

import json

import h5py
import numpy as np
import pytest

pytest.importorskip("robosuite", reason="optional extra not installed: pip install robosuite==1.5.2")

import dpolicy_envs as envs  # noqa: E402
from dpolicy_envs import robosuite_tasks as rt  # noqa: E402

KEYS = ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]


@pytest.fixture(scope="module")
def lift():
    env = envs.make_env_from_args(envs.env_args("robosuite_lift", horizon=120))
    yield env
    env.close()


def _episode(env, seed):
    obs, info = env.reset(seed=seed)
    expert = envs.make_expert(env, seed=seed)
    expert.reset(obs, info)
    done, n = False, 0
    while not done:
        obs, _, term, trunc, info = env.step(expert(obs))
        done, n = term or trunc, n + 1
    return info["is_success"], n, term


def test_env_args_are_robomimic_layout_and_rebuild_the_env(lift):
    args = envs.env_args("robosuite_lift")
    assert args["env_name"] == "Lift" and args["type"] == rt.ROBOSUITE_TYPE
    kw = args["env_kwargs"]
    assert kw["robots"] == ["Panda"] and kw["control_freq"] == 20 and kw["use_camera_obs"] is False
    json.dumps(args)
    # the public datasets carry only {"env_name", "type", "env_kwargs"} and old-style (robosuite 1.4) controller configs
    old = {"env_name": "Lift", "type": 1, "env_kwargs": {**kw, "horizon": 50, "controller_configs": {
        "type": "OSC_POSE", "input_max": 1, "input_min": -1, "output_max": [0.05, 0.05, 0.05, 0.5, 0.5, 0.5],
        "output_min": [-0.05, -0.05, -0.05, -0.5, -0.5, -0.5], "kp": 150, "damping": 1, "impedance_mode": "fixed",
        "kp_limits": [0, 300], "damping_limits": [0, 10], "position_limits": None, "orientation_limits": None,
        "uncouple_pos_ori": True, "control_delta": True, "interpolation": None, "ramp_ratio": 0.2}}}
    env = envs.make_env_from_args(old)
    try:
        assert env.unwrapped.horizon == 50 and env.action_space.shape == (7,)
        obs, _ = env.reset(seed=0)
        assert list(obs) == KEYS
    finally:
        env.close()


def test_obs_keys_shapes_and_seeded_resets(lift):
    obs, info = lift.reset(seed=3)
    assert list(obs) == KEYS and info["is_success"] is False
    assert [obs[k].shape for k in KEYS] == [(3,), (4,), (2,), (10,)]
    assert all(obs[k].dtype == np.float32 for k in KEYS)
    again, _ = lift.reset(seed=3)
    other, _ = lift.reset(seed=4)
    np.testing.assert_array_equal(obs["object"], again["object"])
    assert not np.allclose(obs["object"], other["object"])
    assert lift.unwrapped.get_state().ndim == 1


def test_bad_actions_and_unknown_env_fail_clearly(lift):
    lift.reset(seed=0)
    obs, *_ = lift.step(np.array([np.nan, np.inf, -1e9, 0, 0, 0, 1], np.float32))
    assert all(np.isfinite(v).all() for v in obs.values())
    with pytest.raises(ValueError, match="action shape"):
        lift.step(np.zeros(3))
    with pytest.raises(ValueError, match="no environment"):
        envs.make_env_from_args({"env_name": "NoSuchTask", "type": 1, "env_kwargs": {}})


@pytest.mark.parametrize("seed", [0, 1])
def test_lift_expert_succeeds_and_episode_terminates_on_success(lift, seed):
    success, n, terminated = _episode(lift, seed)
    assert success and terminated and n < 100


def test_camera_observations_are_robomimic_keys_upright_and_round_trip():
    cams = ["agentview", "robot0_eye_in_hand"]
    args = envs.env_args("robosuite_lift", horizon=30, cameras=cams, image_size=48)
    kw = args["env_kwargs"]
    assert kw["use_camera_obs"] is True and kw["camera_names"] == cams and kw["camera_heights"] == kw["camera_widths"] == 48
    assert "cameras" not in kw and "image_size" not in kw  # stored as robomimic's image datasets store them
    env = envs.make_env_from_args(json.loads(json.dumps(args)))
    try:
        obs, info = env.reset(seed=0)
        assert list(obs) == KEYS + ["agentview_image", "robot0_eye_in_hand_image"]
        assert env.observation_space.contains(obs)
        for k in ("agentview_image", "robot0_eye_in_hand_image"):
            assert obs[k].shape == (48, 48, 3) and obs[k].dtype == np.uint8 and obs[k].std() > 5
        # robosuite renders bottom row first (OpenGL convention); the observation is flipped upright
        raw = env.unwrapped.env._get_observations(force_update=True)
        np.testing.assert_array_equal(obs["agentview_image"], raw["agentview_image"][::-1])
        expert = envs.make_expert(env, seed=0)  # the low-dim keys stay, so the scripted expert still works
        expert.reset(obs, info)
        obs, *_ = env.step(expert(obs))
        assert obs["robot0_eye_in_hand_image"].shape == (48, 48, 3)
    finally:
        env.close()
    direct = envs.make_env("robosuite_lift", horizon=30, cameras=["agentview"])
    try:
        assert direct.observation_space["agentview_image"].shape == (84, 84, 3)
    finally:
        direct.close()
    with pytest.raises(ValueError, match="image_size"):
        envs.env_args("robosuite_lift", image_size=64)
    with pytest.raises(ValueError, match="cameras"):
        envs.env_args("robosuite_lift", cameras="agentview")


def test_can_expert_succeeds():
    env = envs.make_env("robosuite_can", horizon=250)
    try:
        assert env.observation_space["object"].shape == (14,)
        success, n, _ = _episode(env, 0)
        assert success and n < 250
    finally:
        env.close()


def test_collect_hdf5_round_trip_then_train_and_evaluate(tmp_path):
    from dpolicy.data.collect import collect_demos
    from dpolicy.data.robomimic import read_dataset, read_env_args

    path = tmp_path / "lift.hdf5"
    summary = collect_demos("robosuite_lift", 3, path, seed=0, env_kwargs={"horizon": 100}, progress=False)
    assert summary["demos"] == 3 and summary["expert_success_rate"] == 1.0
    args = read_env_args(path)
    assert args["env_name"] == "Lift" and args["type"] == 1 and args["env_kwargs"]["horizon"] == 100
    demos = read_dataset(path)
    assert set(demos[0].obs) == set(KEYS) and demos[0].actions.shape[1] == 7
    with h5py.File(path) as f:
        d0 = f["data/demo_0"]
        assert d0["states"].shape[0] == d0["actions"].shape[0] == d0.attrs["num_samples"]

    from dpolicy.bench.suite import compose_run
    from dpolicy.train.bc import train_bc

    cfg = compose_run(["task=robosuite_lift", f"data.path={path}", "train.steps=20", "train.batch_size=32",
                       "train.progress=false", "policy.net.hidden=32", "policy.net.depth=1", "eval.episodes=2",
                       "eval.n_envs=2", "eval.plot=false", "task.env_kwargs={horizon:30}"])
    m = train_bc(cfg, tmp_path / "run", progress=False)
    assert m["train_steps"] == 20 and m["eval"]["n_episodes"] == 2 and 0.0 <= m["success_rate"] <= 1.0
    from dpolicy.policy import load_policy

    pol = load_policy(tmp_path / "run" / "checkpoints")
    assert pol.metadata["env_args"]["env_name"] == "Lift" and pol.metadata["env_args"]["env_kwargs"]["horizon"] == 30
