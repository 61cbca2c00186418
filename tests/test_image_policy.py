"""Policies that read cameras: uint8 windows on the device, the image encoder inside ``encode``, the same
chunk from a flattened or an (H, W, C) image, checkpoints, the controller's fast path and export, the
observation history, and the video's camera panel."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dpolicy.config import NetConfig, PolicyConfig, ProcessConfig, VisionConfig
from dpolicy.data.robomimic import Demo
from dpolicy.data.windows import WindowDataset
from dpolicy.deploy import Controller
from dpolicy.errors import ConfigError, DatasetError, ShapeError
from dpolicy.policy.chunk_policy import ChunkPolicy
from dpolicy.policy.history import ObsHistory
from dpolicy.train.bc import build_policy

from conftest import H, W, image_demos, image_policy  # noqa: E402  the toy camera task and its policy


def obs_batch(B=3, To=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pos": torch.randn(B, To, 2, generator=g),
            "cam": torch.randint(0, 256, (B, To, H, W, 3), generator=g).float()}


def test_windows_keep_images_uint8_and_fit_no_statistics_for_them():
    data = WindowDataset(image_demos(), ["pos", "cam"], To=2, Tp=4)
    assert data.obs["cam"].dtype == torch.uint8 and data.obs["pos"].dtype == torch.float32
    assert data.image_shapes == {"cam": (H, W, 3)} and data.obs_dims == {"pos": 2, "cam": H * W * 3}
    assert data.image_bytes_per_frame == H * W * 3
    obs, act = data.sample(5)
    assert obs["cam"].shape == (5, 2, H, W, 3) and obs["cam"].dtype == torch.uint8 and act.shape == (5, 4, 2)
    # the first window of an episode repeats its first frame
    first, _ = data.gather(torch.tensor([0]))
    assert torch.equal(first["cam"][0, 0], first["cam"][0, 1])
    assert set(data.fit_normalizer().obs.keys()) == {"pos"}


def test_windows_refuse_images_that_differ_from_the_first_demo():
    demos = image_demos(2)
    demos[1].obs["cam"] = demos[1].obs["cam"].astype(np.float32)
    with pytest.raises(DatasetError, match="'cam' of demo 1"):
        WindowDataset(demos, ["pos", "cam"], To=2, Tp=4)


def test_an_image_policy_trains_its_encoder_with_the_denoiser():
    pol, data = image_policy()
    assert pol.image_shapes == {"cam": (H, W, 3)} and pol.encoder is not None
    assert pol.cond_dim == 2 * (2 + pol.encoder.out_dim)
    obs, act = data.sample(8)
    pol.train()
    loss = pol.loss(obs, act, torch.Generator().manual_seed(0))
    loss.backward()
    enc_grads = [p.grad for p in pol.encoder.parameters()]
    assert all(g is not None for g in enc_grads) and any(float(g.abs().sum()) > 0 for g in enc_grads)
    # the augmentation is drawn from the training generator: same generator, same loss
    pol.zero_grad()
    again = pol.loss(obs, act, torch.Generator().manual_seed(0))
    assert torch.equal(loss.detach(), again.detach())


def test_act_takes_images_as_hwc_or_flattened_and_names_a_bad_one():
    pol, _ = image_policy()
    pol.eval()
    obs = obs_batch()
    noise = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(1))
    a = pol.act(obs, noise)
    flat = dict(obs, cam=obs["cam"].reshape(3, 2, -1))
    assert torch.equal(a, pol.act(flat, noise))
    assert torch.equal(a, pol.act(dict(obs, cam=obs["cam"].to(torch.uint8)), noise))
    with pytest.raises(ShapeError, match="'cam'.*\\(B, 2, 16, 16, 3\\)"):
        pol.act(dict(obs, cam=torch.zeros(3, 2, 8, 8, 3)))
    with pytest.raises(ShapeError, match="'cam' holds NaN"):
        bad = obs["cam"].clone()
        bad[0, 0, 0, 0, 0] = float("nan")
        pol.act(dict(obs, cam=bad))


def test_image_keys_must_be_observation_keys():
    pol, _ = image_policy()
    cfg = dataclasses.replace(pol.cfg, image_shapes={"other": [H, W, 3]})
    with pytest.raises(ConfigError, match="other"):
        ChunkPolicy(cfg, pol.normalizer)


@pytest.mark.parametrize("process", ["diffusion", "flow"])
def test_checkpoint_round_trip_gives_the_same_chunks(tmp_path, process):
    pol, _ = image_policy(process)
    pol.eval()
    pol.save(tmp_path / "p")
    back = ChunkPolicy.from_checkpoint(tmp_path / "p")
    assert back.image_shapes == pol.image_shapes and back.cfg.vision == pol.cfg.vision
    obs, noise = obs_batch(), torch.randn(3, 4, 2)
    assert torch.equal(pol.act(obs, noise), back.act(obs, noise))


def test_shared_encoder_has_fewer_weights_with_two_cameras():
    demos = image_demos()
    for d in demos:
        d.obs["wrist"] = d.obs["cam"][:, ::-1].copy()
    counts = {}
    for share in (False, True):
        data = WindowDataset(demos, ["pos", "cam", "wrist"], To=2, Tp=4)
        cfg = PolicyConfig(To=2, Tp=4, Ta=2, net=NetConfig(type="mlp", hidden=32, depth=1),
                           vision=VisionConfig(crop=12, keypoints=4, channels=[8], share=share))
        pol = build_policy(cfg, data)
        counts[share] = sum(p.numel() for p in pol.encoder.parameters())
        assert pol.act(dict(obs_batch(), wrist=obs_batch(seed=1)["cam"])).shape == (3, 4, 2)
    assert counts[True] < counts[False]


def test_history_reads_one_image_or_a_batch_and_names_a_wrong_one():
    h = ObsHistory(["pos", "cam"], 2, 1, dims={"pos": 2, "cam": H * W * 3}, shapes={"cam": (H, W, 3)})
    img = np.arange(H * W * 3, dtype=np.uint8).reshape(H, W, 3)
    row, batched = h.read({"pos": np.zeros(2), "cam": img})
    assert not batched and np.array_equal(row[0, 2:], img.reshape(-1).astype(np.float32))
    _, batched = h.read({"pos": np.zeros((1, 2)), "cam": img[None]})
    assert batched
    with pytest.raises(ShapeError, match="'cam' has shape \\(8, 8, 3\\)"):
        h.read({"pos": np.zeros(2), "cam": np.zeros((8, 8, 3))})
    h.start()
    assert torch.equal(h.window()["cam"][0, 0], torch.from_numpy(img.reshape(-1).astype(np.float32)))


@pytest.mark.parametrize("mode", ["rti", "chunked"])
def test_fast_controller_equals_the_generic_one_and_encodes_once_per_decision(mode):
    pol, _ = image_policy()
    pol.eval()
    fast, generic = Controller(pol, mode, k=2, seed=3), Controller(pol, mode, k=2, seed=3, fast=False)
    assert fast.fast
    calls = []
    handle = pol.encoder.register_forward_hook(lambda *a: calls.append(1))
    rng = np.random.default_rng(0)
    obs = [{"pos": rng.normal(size=2).astype(np.float32), "cam": rng.integers(0, 256, (H, W, 3), dtype=np.uint8)}
           for _ in range(6)]
    for c in (fast, generic):
        c.reset(seed=5)
    for o in obs:
        n0 = len(calls)
        a, b = fast.step(o), generic.step(o)
        np.testing.assert_allclose(a, b, atol=1e-5)
        # a decision runs the encoder once per path, whatever the number of denoising steps
        assert len(calls) - n0 in (0, 2)
    handle.remove()


def test_export_takes_the_flattened_image_history(tmp_path):
    from dpolicy.deploy.export import example_inputs, load_step

    pol, _ = image_policy()
    c = Controller(pol.eval(), "rti", k=2)
    module, meta = load_step(c.export(tmp_path / "step.pt2"))
    assert meta["image_shapes"] == {"cam": [H, W, 3]}
    eager = c.decision_step("warm")
    args = example_inputs(eager, 1, torch.Generator().manual_seed(0))
    args = (args[0], args[1].abs() * 50, args[2], args[3])  # pixel-like values
    with torch.inference_mode():
        want, got = eager(*args), module(*args)
    assert all(torch.allclose(w, g, atol=1e-5) for w, g in zip(want, got))


def test_video_frames_show_what_the_policy_saw():
    from dpolicy.eval.video import beside

    scene = np.zeros((64, 80, 3), np.uint8)
    cam = np.full((16, 16, 3), 200, np.uint8)
    out = beside(scene, [cam, cam])
    assert out.shape == (64, 80 + 2 * (2 + 64), 3)
    assert (out[:, 82:146] == 200).all() and (out[:, 80:82] == 32).all()


def test_an_image_policy_composes_with_a_state_policy():
    from dpolicy.compose import ComposedPolicy

    pol, _ = image_policy()
    torch.manual_seed(1)
    data = WindowDataset(image_demos(), ["pos"], To=2, Tp=4)
    state = build_policy(dataclasses.replace(pol.cfg, image_shapes={}, obs_keys=[], obs_dims={}), data)
    comp = ComposedPolicy([pol.eval(), state.eval()], weights=[1.0, 0.0])
    assert comp.obs_keys == ["pos", "cam"] and comp.image_shapes == {"cam": (H, W, 3)}
    obs, noise = obs_batch(), torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(comp.act(obs, noise), pol.act(obs, noise))
    mixed = ComposedPolicy([pol, state], weights=[0.5, 0.5]).act(obs, noise)
    assert mixed.shape == (3, 4, 2) and not torch.allclose(mixed, pol.act(obs, noise))
    with pytest.raises(ShapeError, match="'cam'"):
        comp.act({"pos": obs["pos"]})


# -- on a camera task ---------------------------------------------------------------------------------------------
def avoid_image_base(seed=0):
    """An untrained image policy with the avoid_image task's keys, shapes and env_args."""
    from dpolicy.data.normalizer import DictNormalizer
    from dpolicy.tasks import env_args

    torch.manual_seed(seed)
    cfg = PolicyConfig(obs_keys=["agent_pos", "agent_vel", "agentview_image"],
                       obs_dims={"agent_pos": 2, "agent_vel": 2, "agentview_image": 84 * 84 * 3},
                       image_shapes={"agentview_image": [84, 84, 3]}, action_dim=2, To=2, Tp=8, Ta=4,
                       net=NetConfig(hidden=32, depth=1, time_dim=16),
                       process=ProcessConfig(type="diffusion", train_steps=20, steps=3),
                       vision=VisionConfig(keypoints=4, channels=[8]))
    g = torch.Generator().manual_seed(0)
    norm = DictNormalizer.fit({"agent_pos": torch.rand(50, 2, generator=g), "agent_vel": torch.rand(50, 2, generator=g)},
                              torch.rand(50, 2, generator=g) * 2 - 1)
    pol = ChunkPolicy(cfg, norm).eval()
    pol.metadata = {"env_args": env_args("avoid_image", horizon=12), "task": "avoid_image"}
    return pol


def test_dsrl_steers_an_image_policy_from_its_own_image_features(tmp_path):
    from dpolicy.rl.agent import Actor
    from dpolicy.rl.noise_env import NoiseActionEnv
    from dpolicy.rl.steered import SteeredPolicy
    from dpolicy.tasks import env_factory_for

    base = avoid_image_base()
    env = NoiseActionEnv(base, env_factory_for(base), n_envs=2, seed=0)
    calls = []
    handle = base.encoder.register_forward_hook(lambda *a: calls.append(1))
    state = env.reset()
    assert state.shape == (2, base.cond_dim) and len(calls) == 1  # the state is the frozen base's encoding
    step = env.step(state, torch.zeros(2, env.noise_dim))
    assert step.env_steps == 2 * base.Ta and step.next_state.shape == state.shape
    handle.remove()
    env.close()
    actor = Actor(base.cond_dim, env.noise_dim, hidden=16, layers=1, b=1.5)
    base.save(tmp_path / "base")
    steered = SteeredPolicy(base, actor, base_path=str(tmp_path / "base"))
    steered.save(tmp_path / "steered")
    back = load_policy_dir(tmp_path / "steered")
    obs = {"agent_pos": torch.zeros(1, 2, 2), "agent_vel": torch.zeros(1, 2, 2),
           "agentview_image": torch.full((1, 2, 84, 84, 3), 100.0)}
    assert torch.equal(steered.act(obs), back.act(obs))


def load_policy_dir(path):
    from dpolicy.policy import load_policy

    return load_policy(path)


def test_evaluation_on_a_camera_task_records_what_the_policy_saw(tmp_path):
    from dpolicy.eval import evaluate
    from dpolicy.tasks import env_factory_for

    base = avoid_image_base()
    res = evaluate(base, env_factory_for(base), n_episodes=2, n_envs=2, seed=0, progress=False,
                   video_path=tmp_path / "v.gif", video_episodes=1)
    assert res.n_episodes == 2
    import imageio.v2 as iio

    frame = iio.mimread(tmp_path / "v.gif")[0]
    assert frame.shape[1] > frame.shape[0]  # the scene with the camera panel beside it


def test_a_camera_policy_and_a_state_policy_of_one_task_compose_on_the_camera_variant():
    from dpolicy.compose import ComposedPolicy
    from dpolicy.data.normalizer import DictNormalizer
    from dpolicy.eval import evaluate
    from dpolicy.tasks import env_args, env_factory_for

    image = avoid_image_base()
    cfg = dataclasses.replace(image.cfg, obs_keys=["agent_pos", "agent_vel"], image_shapes={},
                              obs_dims={"agent_pos": 2, "agent_vel": 2})
    state = ChunkPolicy(cfg, DictNormalizer(dict(image.normalizer.obs), image.normalizer.action)).eval()
    state.metadata = {"env_args": env_args("avoid", horizon=12), "task": "avoid"}
    comp = ComposedPolicy([state, image])
    assert comp.metadata["env_args"]["env_name"] == "dpolicy/AvoidImage-v0"
    assert evaluate(comp, env_factory_for(comp), n_episodes=2, n_envs=2, progress=False).n_episodes == 2
    twin = ChunkPolicy(cfg, state.normalizer).eval()  # the same keys, trained on another task
    twin.metadata = {"env_args": env_args("lift"), "task": "lift"}
    with pytest.raises(ConfigError, match="none of them reads more"):
        ComposedPolicy([state, twin])
