"""Image observations in robomimic-layout files: read as uint8 (N, H, W, C) from files written by other
tools, written compressed one frame per chunk, kept by collection, and rendered anew from a dataset's
states (robomimic's dataset_states_to_obs), with one sentence naming file, group and key on bad input."""

import json

import gymnasium as gym
import h5py
import numpy as np
import pytest

from dpolicy.data.robomimic import Demo, obs_shapes, read_dataset, storage, write_dataset
from dpolicy.errors import ConfigError, DatasetError

ENV_ARGS = {"env_name": "fake/Camera-v0", "env_type": "gymnasium", "env_kwargs": {}}


def image_demos(n_demos=3, length=6, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return [Demo(obs={"agentview_image": rng.integers(0, 256, (length, size, size, 3), dtype=np.uint8),
                      "eef_pos": rng.normal(size=(length, 3))},
                 actions=rng.uniform(-1, 1, (length, 2)).astype(np.float32)) for _ in range(n_demos)]


def write_foreign(path, compression="gzip", n_demos=3, length=10, image=None, **extra):
    """Images as other tools write them: compressed and chunked, beside keys and groups nobody asks for."""
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = json.dumps({"env_name": "Lift", "type": 1, "env_kwargs": {}})
        data.attrs["date"] = "2024-01-01"
        for i in range(n_demos):
            g = data.create_group(f"demo_{i}")
            g.attrs["num_samples"] = length
            img = rng.integers(0, 256, (length, 12, 10, 3), dtype=np.uint8) if image is None else image(i, length)
            g.create_dataset("obs/agentview_image", data=img, compression=compression, chunks=(1, *img.shape[1:]))
            g.create_dataset("obs/robot0_eef_pos", data=rng.normal(size=(length, 3)), compression=compression, chunks=True)
            g.create_dataset("obs/robot0_gripper_qpos", data=rng.normal(size=(length, 2)))
            g.create_dataset("next_obs/agentview_image", data=img, compression=compression, chunks=(2, *img.shape[1:]))
            g.create_dataset("actions", data=rng.uniform(-1, 1, (length, 7)), compression=compression, chunks=(4, 7))
            g.create_dataset("action_dict/abs_pos", data=rng.normal(size=(length, 3)))
            g.create_dataset("states", data=rng.normal(size=(length, 5)))
        for key, fn in extra.items():
            fn(f)
    return path


@pytest.mark.parametrize("compression", ["gzip", "lzf", None])
def test_other_tools_images_read_as_uint8_in_one_slice(tmp_path, compression):
    path = write_foreign(tmp_path / "theirs.hdf5", compression)
    demos = read_dataset(path, obs_keys=["agentview_image", "robot0_eef_pos"], load_next_obs=True)
    img = demos[1].obs["agentview_image"]
    assert img.dtype == np.uint8 and img.shape == (10, 12, 10, 3) and demos[1].obs["robot0_eef_pos"].dtype == np.float32
    with h5py.File(path) as f:
        np.testing.assert_array_equal(img, f["data/demo_1/obs/agentview_image"][()])
    np.testing.assert_array_equal(demos[1].next_obs["agentview_image"], img)
    shapes, dtypes, action_dim = obs_shapes(path)
    assert shapes == {"agentview_image": (12, 10, 3), "robot0_eef_pos": (3,), "robot0_gripper_qpos": (2,)}
    assert dtypes["agentview_image"] == "uint8" and dtypes["robot0_eef_pos"] == "float64" and action_dim == 7
    assert set(read_dataset(path)[0].obs) == set(shapes)  # every key, mask/ absent


def test_float_and_integer_images_become_uint8(tmp_path):
    unit = np.linspace(0, 1, 10 * 12 * 10 * 3).reshape(10, 12, 10, 3)
    path = write_foreign(tmp_path / "f.hdf5", image=lambda i, n: [unit, unit * 255, (unit * 255).astype(np.int64)][i])
    imgs = [d.obs["agentview_image"] for d in read_dataset(path, obs_keys=["agentview_image"])]
    assert all(a.dtype == np.uint8 for a in imgs)
    np.testing.assert_array_equal(imgs[0], imgs[1])
    assert imgs[0].max() == 255 and np.abs(imgs[2].astype(int) - imgs[0]).max() <= 1


def _bad(key, value):
    def fn(f):
        del f[f"data/demo_1/obs/{key}"]
        f[f"data/demo_1/obs/{key}"] = value
    return fn


@pytest.mark.parametrize("corrupt,match", [
    (_bad("agentview_image", np.zeros((10, 1, 12, 10, 3), np.uint8)), r"demo_1/obs/agentview_image has per-step shape \(1, 12, 10, 3\)"),
    (_bad("agentview_image", np.zeros((10, 3, 12, 10), np.uint8)), r"demo_1/obs/agentview_image .*channels last"),
    (_bad("agentview_image", np.zeros((10, 12, 12, 3), np.uint8)), r"demo_1/obs/agentview_image has per-step shape \(12, 12, 3\) but"),
    (_bad("agentview_image", np.full((10, 12, 10, 3), 300.0)), r"demo_1/obs/agentview_image is an image of dtype float64 with values"),
    (_bad("agentview_image", np.full((10, 12, 10, 3), np.nan)), r"demo_1/obs/agentview_image is an image holding NaN"),
    (_bad("agentview_image", np.zeros((10, 12, 10, 3), bool)), r"demo_1/obs/agentview_image is an image of dtype bool"),
    (_bad("agentview_image", np.zeros((9, 12, 10, 3), np.uint8)), r"demo_1/obs/agentview_image has 9 rows"),
    (_bad("robot0_eef_pos", np.full((10, 3), np.nan)), r"demo_1/obs/robot0_eef_pos holds NaN"),
    (_bad("robot0_eef_pos", np.array([b"text"] * 10)), r"demo_1/obs/robot0_eef_pos has dtype \|S4, not numbers"),
])
def test_bad_images_name_file_group_and_key(tmp_path, corrupt, match):
    path = write_foreign(tmp_path / "bad.hdf5", corrupt=corrupt)
    with pytest.raises(DatasetError, match=match) as e:
        read_dataset(path, obs_keys=["agentview_image", "robot0_eef_pos"])
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_truncated_or_garbled_files_are_one_sentence(tmp_path):
    path = write_foreign(tmp_path / "cut.hdf5")
    whole = path.read_bytes()
    path.write_bytes(whole[:len(whole) // 2])
    for call in (read_dataset, obs_shapes):
        with pytest.raises(DatasetError, match="cut.hdf5"):
            call(path)
    path = write_foreign(tmp_path / "garbled.hdf5")
    with h5py.File(path) as f:
        chunk = f["data/demo_1/obs/agentview_image"].id.get_chunk_info(3)
    raw = bytearray(path.read_bytes())
    raw[chunk.byte_offset:chunk.byte_offset + chunk.size] = bytes(chunk.size)
    path.write_bytes(bytes(raw))
    assert obs_shapes(path)[0]["agentview_image"] == (12, 10, 3)
    with pytest.raises(DatasetError, match=r"garbled.hdf5: data/demo_1/obs/agentview_image cannot be read; the file is damaged"):
        read_dataset(path, obs_keys=["agentview_image"])


@pytest.mark.parametrize("compression", ["gzip", "lzf", None])
def test_written_images_are_uint8_one_frame_per_chunk(tmp_path, compression):
    demos = image_demos()
    path = write_dataset(tmp_path / "d.hdf5", demos, ENV_ARGS, compression=compression)
    with h5py.File(path) as f:
        for grp in ("obs", "next_obs"):
            ds = f[f"data/demo_2/{grp}/agentview_image"]
            assert ds.dtype == np.uint8 and ds.shape == (6, 8, 8, 3) and ds.chunks == (1, 8, 8, 3)
            assert ds.compression == compression and (ds.compression_opts == 4 if compression == "gzip" else True)
        assert f["data/demo_2/obs/eef_pos"].dtype == np.float32
        np.testing.assert_array_equal(f["data/demo_2/next_obs/agentview_image"][:-1], demos[2].obs["agentview_image"][1:])
    back = read_dataset(path)
    np.testing.assert_array_equal(back[2].obs["agentview_image"], demos[2].obs["agentview_image"])
    s = storage(path)
    assert s["image_keys"] == ["agentview_image"] and s["image_bytes"] == 2 * 3 * 6 * 8 * 8 * 3
    assert 0 < s["image_bytes_stored"] and s["file_bytes"] == path.stat().st_size
    with pytest.raises(ConfigError, match="compression='zip'"):
        write_dataset(tmp_path / "z.hdf5", demos, ENV_ARGS, compression="zip")


def test_a_failed_write_leaves_no_file(tmp_path):
    demos = image_demos()
    demos[1].obs["agentview_image"] = demos[1].obs["agentview_image"].astype(np.float32) * 9
    with pytest.raises(DatasetError, match="demo_1/obs/agentview_image"):
        write_dataset(tmp_path / "d.hdf5", demos, ENV_ARGS)
    assert list(tmp_path.iterdir()) == []


class CameraEnv(gym.Env):
    """A point that moves by its action, seen by a tiny uint8 camera; its state is the position."""

    def __init__(self):
        self.observation_space = gym.spaces.Dict({"pos": gym.spaces.Box(-10, 10, (2,), np.float32),
                                                  "cam_image": gym.spaces.Box(0, 255, (6, 5, 3), np.uint8)})
        self.action_space = gym.spaces.Box(-1, 1, (2,), np.float32)

    def _obs(self):
        img = np.zeros((6, 5, 3), np.uint8)
        img[..., 0] = int(self.pos[0] * 20) % 256
        img[..., 1] = self.t
        return {"pos": self.pos.astype(np.float32), "cam_image": img}

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.t = self.np_random.uniform(-1, 1, 2), 0
        return self._obs(), {}

    def step(self, action):
        self.pos, self.t = self.pos + 0.1 * np.asarray(action), self.t + 1
        return self._obs(), 0.0, False, self.t >= 7, {"is_success": True}

    def get_state(self):
        return np.r_[self.pos, self.t]


class Expert:
    def reset(self, obs, info):
        pass

    def __call__(self, obs):
        return -obs["pos"]


def test_collection_keeps_uint8_images_and_reports_their_bytes(tmp_path, monkeypatch):
    from dpolicy import tasks
    from dpolicy.data.collect import collect_demos

    monkeypatch.setattr(tasks, "env_args", lambda name, **kw: {**ENV_ARGS, "env_name": name})
    monkeypatch.setattr(tasks, "make_env", lambda args: CameraEnv())
    monkeypatch.setattr(tasks, "make_expert", lambda env, **kw: Expert())
    summary = collect_demos("camera", 2, tmp_path / "cam.hdf5", progress=False, compression="lzf")
    assert summary["image_keys"] == ["cam_image"] and summary["image_bytes"] == 2 * 2 * 7 * 6 * 5 * 3
    assert summary["file_bytes"] == (tmp_path / "cam.hdf5").stat().st_size and summary["compression"] == "lzf"
    demos = read_dataset(tmp_path / "cam.hdf5", load_next_obs=True)
    img = demos[0].obs["cam_image"]
    assert img.dtype == np.uint8 and img.shape == (7, 6, 5, 3)
    np.testing.assert_array_equal(img[:, 0, 0, 1], np.arange(7))
    assert demos[0].next_obs["cam_image"][-1, 0, 0, 1] == 7
    assert obs_shapes(tmp_path / "cam.hdf5")[0] == {"cam_image": (6, 5, 3), "pos": (2,)}


@pytest.fixture(scope="module")
def lift_demos(tmp_path_factory):
    from dpolicy.data.collect import collect_demos

    path = tmp_path_factory.mktemp("lift") / "lift.hdf5"
    collect_demos("lift", 2, path, progress=False, valid_fraction=0.5)
    return path


def test_rerendering_reproduces_the_observations_from_the_states(lift_demos, tmp_path):
    from dpolicy.data.rerender import rerender_dataset

    summary = rerender_dataset(lift_demos, tmp_path / "again.hdf5", "lift", progress=False)
    assert summary["demos"] == 2 and summary["env_name"] == "dpolicy/Lift-v0" and summary["image_bytes"] == 0
    with h5py.File(lift_demos) as a, h5py.File(tmp_path / "again.hdf5") as b:
        assert json.loads(b["data"].attrs["env_args"]) == json.loads(a["data"].attrs["env_args"])
        assert {k: list(a["mask"][k][()]) for k in a["mask"]} == {k: list(b["mask"][k][()]) for k in b["mask"]}
        for name in a["data"]:
            ga, gb = a["data"][name], b["data"][name]
            assert dict(ga.attrs) == dict(gb.attrs)
            for key in ("actions", "rewards", "dones", "states"):
                np.testing.assert_array_equal(ga[key][()], gb[key][()])
            for grp in ("obs", "next_obs"):
                assert set(ga[grp]) == set(gb[grp])
                for k in ga[grp]:  # exact: restoring a recorded state gives back the very same observation
                    np.testing.assert_array_equal(ga[grp][k][()], gb[grp][k][()], err_msg=f"{name}/{grp}/{k}")
    sub = rerender_dataset(lift_demos, tmp_path / "sub.hdf5", None, keys=["eef_pos"], progress=False)
    assert list(sub["obs"]) == ["eef_pos"]


def test_rerendering_refuses_files_it_cannot_render_and_writes_nothing(lift_demos, tmp_path):
    from dpolicy.data.rerender import rerender_dataset

    no_states = tmp_path / "no_states.hdf5"
    write_dataset(no_states, image_demos(), ENV_ARGS)  # states filled as (N, 0)
    with pytest.raises(DatasetError, match=r"no_states.hdf5: data/demo_0/states holds no simulator states"):
        rerender_dataset(no_states, tmp_path / "out.hdf5", "lift", progress=False)
    with pytest.raises(DatasetError, match="does not exist"):
        rerender_dataset(tmp_path / "none.hdf5", tmp_path / "out.hdf5", "lift", progress=False)
    with pytest.raises(DatasetError, match=r"states row 0 does not fit the environment 'dpolicy/Avoid-v0'"):
        rerender_dataset(lift_demos, tmp_path / "out.hdf5", "avoid", progress=False)
    with pytest.raises(ConfigError, match=r"\['nope'\]"):
        rerender_dataset(lift_demos, tmp_path / "out.hdf5", "lift", keys=["nope"], progress=False)
    with pytest.raises(ConfigError, match="another file"):
        rerender_dataset(lift_demos, lift_demos, "lift", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["no_states.hdf5"]


def test_rerender_command(lift_demos, tmp_path):
    from dpolicy.bench.reliability import run_command

    code, out, err = run_command("collect", [f"rerender={lift_demos}", "task=lift", f"out={tmp_path / 'img.hdf5'}"], tmp_path)
    assert code == 0, err
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["demos"] == 2 and summary["file_bytes"] == (tmp_path / "img.hdf5").stat().st_size
    assert "image_bytes" in out
