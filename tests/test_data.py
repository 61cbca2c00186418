"""robomimic-layout HDF5: exact layout on disk, reading files written by other code, validation
errors that name the culprit, and device-resident window sampling."""

import json

import h5py
import numpy as np
import pytest
import torch

from conftest import make_demos
from dpolicy.data import WindowDataset, read_dataset, read_env_args, write_dataset
from dpolicy.errors import DatasetError

ENV_ARGS = {"env_name": "dpolicy/Avoid-v0", "env_type": "gymnasium", "env_kwargs": {"horizon": 50}}


def test_written_file_has_exactly_the_robomimic_layout(tmp_path):
    demos = make_demos(5, 12)
    path = write_dataset(tmp_path / "d.hdf5", demos, ENV_ARGS, valid_fraction=0.2)
    with h5py.File(path, "r") as f:
        assert set(f.keys()) == {"data", "mask"}
        assert f["data"].attrs["total"] == 60
        assert json.loads(f["data"].attrs["env_args"]) == ENV_ARGS
        assert sorted(f["data"].keys()) == [f"demo_{i}" for i in range(5)]
        g = f["data/demo_0"]
        assert set(g.keys()) == {"obs", "next_obs", "actions", "rewards", "dones", "states"}
        assert g.attrs["num_samples"] == 12
        assert set(g["obs"].keys()) == {"pos", "vel"} == set(g["next_obs"].keys())
        assert g["actions"].shape == (12, 3) and g["rewards"].shape == (12,) and g["dones"].shape == (12,)
        assert g["states"].shape == (12, 4) and g["dones"][-1] == 1
        np.testing.assert_array_equal(g["next_obs/pos"][:-1], g["obs/pos"][1:])
        train = {s.decode() for s in f["mask/train"][()]}
        valid = {s.decode() for s in f["mask/valid"][()]}
        assert len(valid) == 1 and len(train) == 4 and not train & valid


def test_round_trip_and_filter_keys(tmp_path):
    demos = make_demos(4, 10)
    path = write_dataset(tmp_path / "d.hdf5", demos, ENV_ARGS, masks={"first": ["demo_0", "demo_2"]})
    back = read_dataset(path)
    assert len(back) == 4
    np.testing.assert_array_equal(back[3].actions, demos[3].actions)
    np.testing.assert_array_equal(back[1].obs["vel"], demos[1].obs["vel"])
    sub = read_dataset(path, obs_keys=["pos"], filter_key="first")
    assert len(sub) == 2 and list(sub[0].obs) == ["pos"]
    np.testing.assert_array_equal(sub[1].actions, demos[2].actions)
    assert read_env_args(path) == ENV_ARGS


def write_foreign(path, n_demos=3, length=20, **corrupt):
    """A robomimic-layout file written with plain h5py, the way other tools write it."""
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps(ENV_ARGS)
        data.attrs["total"] = n_demos * length
        for i in range(n_demos):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = length
            g["obs/agent_pos"] = rng.normal(size=(length, 2))
            g["obs/agent_vel"] = rng.normal(size=(length, 2))
            g["obs/flag"] = rng.integers(0, 2, size=(length,)).astype(np.float64)  # scalar obs stored as (N,)
            g["actions"] = rng.uniform(-1, 1, size=(length, 2))
            g["rewards"] = np.zeros(length)
            g["dones"] = np.zeros(length)
            g["states"] = rng.normal(size=(length, 6))
        for key, fn in corrupt.items():
            fn(f)
    return path


def test_foreign_file_loads_and_trains(tmp_path):
    from conftest import tiny_policy_cfg
    from dpolicy.config import TrainConfig
    from dpolicy.policy import ChunkPolicy
    from dpolicy.train import Trainer

    path = write_foreign(tmp_path / "foreign.hdf5")
    demos = read_dataset(path, obs_keys=["agent_pos", "flag"])
    assert demos[0].obs["flag"].shape == (20, 1)
    data = WindowDataset(demos, ["agent_pos", "flag"], 2, 8)
    cfg = tiny_policy_cfg()
    cfg = type(cfg)(**{**cfg.__dict__, "obs_keys": ["agent_pos", "flag"], "obs_dims": data.obs_dims, "action_dim": 2})
    pol = ChunkPolicy(cfg, data.fit_normalizer())
    hist = Trainer(pol, data, TrainConfig(steps=60, batch_size=32, log_every=20, progress=False), tmp_path / "run").fit()
    assert hist[-1]["loss"] < hist[0]["loss"]


@pytest.mark.parametrize("corrupt,match", [
    (lambda f: f["data/demo_1"].__delitem__("actions"), "demo_1/actions is missing"),
    (lambda f: f["data/demo_0/obs"].__delitem__("agent_vel"), "demo_0/obs/agent_vel is missing"),
    (lambda f: f["data/demo_2"].attrs.__setitem__("num_samples", 7), "num_samples=7"),
    (lambda f: (f["data/demo_0/obs"].__delitem__("agent_pos"), f["data/demo_0/obs"].create_dataset("agent_pos", data=np.zeros((19, 2)))), "agent_pos has 19 rows"),
    (lambda f: f["data/demo_1/actions"].__setitem__((3, 0), np.nan), "demo_1/actions holds NaN"),
    (lambda f: f["data/demo_1/obs/agent_pos"].__setitem__((5, 1), np.inf), "agent_pos holds NaN or infinite"),
    (lambda f: (f["data/demo_2/obs"].__delitem__("agent_pos"), f["data/demo_2/obs"].create_dataset("agent_pos", data=np.zeros((20, 3)))), "per-step shape"),
    (lambda f: f["data/demo_0"].__delitem__("rewards") or f["data/demo_0"].create_dataset("rewards", data=np.zeros(5)), "rewards has 5 rows"),
])
def test_malformed_datasets_name_the_culprit(tmp_path, corrupt, match):
    path = write_foreign(tmp_path / "bad.hdf5", corrupt=corrupt)
    with pytest.raises(DatasetError, match=match):
        read_dataset(path, obs_keys=["agent_pos", "agent_vel"])


def test_missing_file_group_mask_and_env_args(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "none.hdf5")
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5 at all")
    with pytest.raises(DatasetError, match="not a readable HDF5"):
        read_dataset(tmp_path / "junk.hdf5")
    with h5py.File(tmp_path / "nodata.hdf5", "w") as f:
        f.create_group("other")
    with pytest.raises(DatasetError, match="group 'data' is missing"):
        read_dataset(tmp_path / "nodata.hdf5")
    path = write_foreign(tmp_path / "ok.hdf5")
    with pytest.raises(DatasetError, match="mask/train does not exist"):
        read_dataset(path, filter_key="train")
    with h5py.File(path, "a") as f:
        del f["data"].attrs["env_args"]
    with pytest.raises(DatasetError, match="env_args is missing"):
        read_env_args(path)


def test_public_robomimic_env_args_are_read_as_robosuite(tmp_path):
    """robomimic's own datasets store {"env_name", "type": 1, "env_kwargs"} without env_type."""
    import json

    path = write_foreign(tmp_path / "public.hdf5")
    with h5py.File(path, "a") as f:
        f["data"].attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {"horizon": 400}})
    args = read_env_args(path)
    assert args["env_type"] == "robosuite" and args["env_kwargs"]["horizon"] == 400
    with h5py.File(path, "a") as f:
        f["data"].attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 3, "env_kwargs": {}})
    with pytest.raises(DatasetError, match="env_type"):
        read_env_args(path)


def test_windows_pad_at_episode_edges_and_stay_on_device():
    demos = make_demos(2, 5)
    ds = WindowDataset(demos, ["pos"], To=3, Tp=4)
    obs, act = ds.gather(torch.tensor([0, 4, 5, 6]))
    pos0, pos1 = torch.from_numpy(demos[0].obs["pos"]), torch.from_numpy(demos[1].obs["pos"])
    a0, a1 = torch.from_numpy(demos[0].actions), torch.from_numpy(demos[1].actions)
    assert torch.equal(obs["pos"][0], pos0[[0, 0, 0]])  # start of episode 0: first obs repeated
    assert torch.equal(act[1], a0[[4, 4, 4, 4]])  # end of episode 0: last action repeated
    assert torch.equal(obs["pos"][2], pos1[[0, 0, 0]])  # no leakage across episodes
    assert torch.equal(obs["pos"][3], pos1[[0, 0, 1]]) and torch.equal(act[3], a1[[1, 2, 3, 4]])


def test_epoch_order_covers_every_step_and_resumes_exactly():
    ds = WindowDataset(make_demos(3, 10), ["pos"], 2, 4, seed=5)
    first = torch.cat([ds.next_indices(7) for _ in range(4)])  # 28 of 30
    state = ds.state_dict()
    rest = torch.cat([ds.next_indices(7) for _ in range(3)])
    assert sorted(torch.cat([first, rest[:2]]).tolist()) == list(range(30))
    ds2 = WindowDataset(make_demos(3, 10), ["pos"], 2, 4, seed=99)
    ds2.load_state_dict(state)
    assert torch.equal(torch.cat([ds2.next_indices(7) for _ in range(3)]), rest)
