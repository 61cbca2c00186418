"""The deployment runtime: controller state and queue bookkeeping, the RTI warm start
(shift, re-noise, short schedule) against an eager reference, gripper remedies, export, the
contraction property on a trained toy policy, the loop harness, the CLI and the bench sections."""

import dataclasses
import json
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import DEVICES, make_demos, tiny_policy, tiny_policy_cfg
from dpolicy.config import NetConfig, PolicyConfig
from dpolicy.data import Demo, WindowDataset
from dpolicy.deploy import (Controller, DiscreteActions, DiscreteDim, evaluate_controller, load_step, resolve_timesteps,
                            run_loop, shift_chunk, warm_schedule)
from dpolicy.deploy.controller import slot_seed
from dpolicy.deploy.export import example_inputs
from dpolicy.deploy.kernel import DecisionStep, FastStep, fast_field
from dpolicy.errors import ConfigError, ShapeError
from dpolicy.policy import ChunkPolicy
from dpolicy.process import Diffusion, Flow, sample_loop


def obs_seq(n, seed=0, batch=None):
    rng = np.random.default_rng(seed)
    shape = (lambda d: (batch, d)) if batch else (lambda d: (d,))
    return [{"pos": rng.normal(size=shape(2)).astype(np.float32), "vel": rng.normal(size=shape(3)).astype(np.float32)}
            for _ in range(n)]


def history(obs_list, To):
    """The controller's history convention: the first observation repeated, newest last."""
    seq = [obs_list[0]] * max(To - len(obs_list), 0) + list(obs_list[-To:])
    return {k: torch.as_tensor(np.stack([o[k] for o in seq]))[None] for k in ("pos", "vel")}


def gripper_demos(n=6, length=30, seed=0):
    """make_demos with a binary last action entry (+-1), like lift's gripper."""
    out = []
    for d in make_demos(n, length, seed):
        acts = d.actions.copy()
        acts[:, -1] = np.where(d.obs["pos"][:, 0] > 0, 1.0, -1.0)
        out.append(Demo(obs=d.obs, actions=acts, states=d.states))
    return out


def train_toy(process="diffusion", prediction="epsilon", steps=300, seed=0):
    """A toy policy trained for a few hundred steps (K=100 levels, RTI's setting); ~1 s on one core."""
    torch.manual_seed(seed)
    cfg = tiny_policy_cfg("mlp", process, "ddim" if process == "diffusion" else "euler")
    cfg = dataclasses.replace(cfg, net=NetConfig(type="mlp", hidden=64, depth=2, time_dim=16),
                              process=dataclasses.replace(cfg.process, prediction=prediction, train_steps=100, steps=10))
    data = WindowDataset(make_demos(), cfg.obs_keys, cfg.To, cfg.Tp, seed=seed)
    pol = ChunkPolicy(cfg, data.fit_normalizer())
    opt = torch.optim.Adam(pol.parameters(), 3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        obs, act = data.gather(torch.randint(0, len(data), (128,), generator=g))
        loss = pol.loss(obs, act, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return pol.eval(), data


# -- timesteps --------------------------------------------------------------------------------------------
def test_timesteps_map_onto_process_time_and_network_time():
    d100, d20, flow = Diffusion(100), Diffusion(20), Flow()
    assert resolve_timesteps(d100, 3) == [2, 1, 0] and resolve_timesteps(d100, "full") == list(range(99, -1, -1))
    sched = warm_schedule(d100, [2, 1, 0])
    assert np.allclose(sched, [(0.03, 0.02), (0.02, 0.01), (0.01, 0.0)])
    pol = tiny_policy()  # 20 levels
    c = Controller(pol, "rti", timesteps=[2, 1, 0])
    # level k is evaluated at net time k * 100 / K, exactly where DDPM training put it
    assert c.decision_step("warm").tnet.tolist() == pytest.approx([10.0, 5.0, 0.0])
    assert np.allclose(warm_schedule(d20, [2, 1, 0]), [(0.15, 0.1), (0.1, 0.05), (0.05, 0.0)])
    assert np.allclose(warm_schedule(flow, [2, 1, 0]), [(0.03, 0.02), (0.02, 0.01), (0.01, 0.0)])
    fl = Controller(tiny_policy("mlp", "flow", "heun"), "rti", k=3)
    assert fl.decision_step("warm").tnet.tolist() == pytest.approx([3, 2, 2, 1, 1])  # Heun: t and t_next per step
    assert fl.k == 5 and c.k == 3
    for bad, match in [(dict(k=21), "k=21 is larger"), (dict(k=0), "k=0"), (dict(k="x"), "k='x'"),
                       (dict(timesteps=[1, 2, 0]), "strictly decreasing"), (dict(timesteps=[3, 1]), "end at 0"),
                       (dict(timesteps=[20, 0]), "start below 20")]:
        with pytest.raises(ConfigError, match=match):
            Controller(pol, "rti", **bad)


def test_shift_repeats_the_last_action():
    x = torch.arange(8.0).view(1, 8, 1).expand(2, 8, 2)
    assert shift_chunk(x, 1)[0, :, 0].tolist() == [1, 2, 3, 4, 5, 6, 7, 7]
    assert shift_chunk(x, 3)[1, :, 1].tolist() == [3, 4, 5, 6, 7, 7, 7, 7]


# -- the RTI step against an eager reference ----------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", [("mlp", "diffusion", "ddim"), ("mlp", "diffusion", "ddpm"), ("unet", "flow", "heun")])
def test_rti_is_shift_renoise_and_short_schedule(device, kind):
    pol = tiny_policy(*kind).to(device).eval()
    c = Controller(pol, "rti", k=3)
    generic = Controller(pol, "rti", k=3, fast=False)
    seed = 11
    c.reset(seed=seed)
    generic.reset(seed=seed)
    g = torch.Generator(device=device).manual_seed(slot_seed(seed, 0))
    sched = warm_schedule(pol.process, [2, 1, 0])
    obs = obs_seq(4)
    chunk = None
    with torch.no_grad():
        for i, o in enumerate(obs):
            cond = pol.encode({k: v.to(device) for k, v in history(obs[:i + 1], pol.To).items()})
            noise = torch.randn(1, pol.Tp, pol.action_dim, device=device, generator=g)
            if chunk is None:  # first decision: the full solve from noise
                chunk = pol.sample_normalized(cond, noise, None, g)
            else:  # shift by the executed action, repeat the last, re-noise to t(2), integrate [2, 1, 0]
                x = pol.process.noise_to(torch.cat([chunk[:, 1:], chunk[:, -1:]], 1), noise, sched[0][0])
                chunk = sample_loop(pol.process, pol.field_fn(cond), x, sched, g)
            want = pol.normalizer.action.unnormalize(chunk)[0, 0].cpu().numpy()
            got, got_generic = c.step(o), generic.step(o)
            assert got.shape == (3,) and np.allclose(got, want, atol=1e-5), (i, got, want)
            assert np.allclose(got_generic, want, atol=1e-5)
            assert c.last_nfe == ((9 if kind[2] == "heun" else 5) if i == 0 else c.k)  # Heun: 2 per step, 1 on the last


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_queue_executes_Ta_then_replans(device):
    pol = tiny_policy(Ta=4).to(device).eval()
    c = Controller(pol, "chunked")
    c.reset(seed=5)
    g = torch.Generator(device=device).manual_seed(slot_seed(5, 0))
    obs = obs_seq(9)
    acts, nfe = [], []
    for o in obs:
        acts.append(c.step(o))
        nfe.append(c.last_nfe)
    assert nfe == [5, 0, 0, 0, 5, 0, 0, 0, 5] and c.decisions == 9 and c.total_evals == 15
    for start in (0, 4, 8):
        hist = {k: v.to(device) for k, v in history(obs[:start + 1], pol.To).items()}
        chunk = pol.act(hist, noise=torch.randn(1, pol.Tp, pol.action_dim, device=device, generator=g)).cpu().numpy()
        n = min(4, len(obs) - start)
        assert np.allclose(np.stack(acts[start:start + n]), chunk[0, :n], atol=1e-5), start


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["rti", "chunked"])
def test_reset_restores_the_start_of_an_episode(device, mode):
    pol = tiny_policy().to(device).eval()
    obs, other = obs_seq(6, seed=1), obs_seq(7, seed=2)
    c = Controller(pol, mode, k=2)
    c.reset(seed=3)
    first = [c.step(o) for o in obs]
    for o in other[:3]:  # mid-episode (and mid-queue in chunked mode)
        c.step(o)
    c.reset(seed=3)
    again = [c.step(o) for o in obs]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    fresh = Controller(pol, mode, k=2, seed=99)
    fresh.reset(seed=3)
    assert np.array_equal(fresh.step(obs[0]), first[0])
    c.reset(seed=4)
    c.step(obs[0])
    assert c.last_nfe == c.plans["cold"].evals  # a reset always starts with a full solve

    # batched: resetting slot 1 leaves slot 0's episode untouched
    b_obs = [{k: np.stack([a[k], b[k]]) for k in a} for a, b in zip(obs, other)]
    bc, ref = Controller(pol, mode, k=2, batch_size=2), Controller(pol, mode, k=2, batch_size=2)
    bc.reset(seed=[1, 2])
    ref.reset(seed=[1, 2])
    for i, o in enumerate(b_obs):
        if i == 3:
            bc.reset(mask=[False, True], seed=[2])
        a, r = bc.step(o), ref.step(o)
        assert a.shape == (2, 3) and np.array_equal(a[0], r[0])
        if i == 3:
            assert bc.last_evals.tolist() == [0 if mode == "chunked" else 2, 5]


def test_prime_does_the_first_solve_off_the_clock():
    pol = tiny_policy().eval()
    obs = obs_seq(4)
    a, b = Controller(pol, "rti", k=2), Controller(pol, "rti", k=2)
    a.reset(seed=1)
    b.reset(seed=1)
    b.prime(obs[0])
    out_a, out_b = a.step(obs[0]), b.step(obs[0])
    assert np.array_equal(out_a, out_b) and b.last_nfe == 0 and a.last_nfe == 5
    for o in obs[1:]:
        assert np.array_equal(a.step(o), b.step(o)) and b.last_nfe == 2
    # batched, one slot primed: it returns its primed action, the other slot decides as usual
    b_obs = [{k: np.stack([x[k], y[k]]) for k in x} for x, y in zip(obs, obs_seq(4, seed=5))]
    p, q = Controller(pol, "rti", k=2, batch_size=2), Controller(pol, "rti", k=2, batch_size=2)
    for c in (p, q):
        c.reset(seed=[1, 2])
        c.step(b_obs[0])
        c.reset(mask=[True, False], seed=[1])
    p.prime(b_obs[1])
    for o in b_obs[1:]:
        out_p, out_q = p.step(o), q.step(o)
        assert np.array_equal(out_p, out_q)
    assert p.total_evals == q.total_evals


def test_compositions_and_steered_policies_run_on_the_generic_path():
    from dpolicy.compose import ComposedPolicy
    from dpolicy.rl.agent import Actor
    from dpolicy.rl.steered import SteeredPolicy

    a, b = tiny_policy(seed=0).eval(), tiny_policy(seed=1).eval()
    composed = Controller(ComposedPolicy([a, b], weights=[1.0, 0.0]), "rti", k=3)
    alone = Controller(a, "rti", k=3)
    assert not composed.fast and alone.fast
    for o in obs_seq(5):  # a one-parent composition is that parent, warm starts included
        assert np.array_equal(composed.step(o), alone.step(o))
    torch.manual_seed(0)
    steered = SteeredPolicy(a, Actor(a.cond_dim, a.Tp * a.action_dim, 16, 1, 1.0).eval())
    c = Controller(steered, "chunked")
    obs = obs_seq(2)
    want = steered.act(history(obs[:1], a.To))[0, :2].numpy()  # the actor picks the noise, not the controller
    assert np.allclose(np.stack([c.step(o) for o in obs]), want, atol=1e-6)
    assert Controller(steered, "rti", k=2).step(obs[0]).shape == (3,)
    reg = tiny_policy("mlp", "regression", "direct").eval()  # chunked execution of the MSE baseline
    assert np.allclose(Controller(reg, "chunked").step(obs[0]), reg.act(history(obs[:1], reg.To))[0, 0].numpy(), atol=1e-6)


# -- the fast path against its references, bit for bit ---------------------------------------------------------
def with_prediction(pol, prediction):
    cfg = dataclasses.replace(pol.cfg, process=dataclasses.replace(pol.cfg.process, prediction=prediction))
    return ChunkPolicy(cfg, pol.normalizer).eval()


FAST_KINDS = [("mlp", "diffusion", "ddim", "epsilon"), ("mlp", "diffusion", "ddim", "sample"),
              ("mlp", "diffusion", "ddpm", "epsilon"), ("mlp", "flow", "euler", None), ("mlp", "flow", "heun", None),
              ("unet", "diffusion", "ddim", "sample"), ("unet", "flow", "heun", None), ("mlp", "edm", "heun", None),
              ("unet", "edm", "euler", None)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", FAST_KINDS)
def test_fast_step_equals_the_decision_step_bitwise(device, kind):
    net, process, sampler, prediction = kind
    pol = tiny_policy(net, process, sampler)
    pol = (with_prediction(pol, prediction) if prediction else pol.eval()).to(device)
    for B in (1, 3):
        for warm, renoise, n_out in ((False, True, 4), (True, True, 1), (True, False, 8)):
            sched = warm_schedule(pol.process, [3, 1, 0]) if warm else pol.process.schedule(5)
            ref = DecisionStep(pol, pol.process, sched, warm=warm, renoise=renoise, discrete=[DiscreteDim(2, "clip")]).eval()
            fast = FastStep(ref, B, n_out=n_out)
            assert fast.field.replayed == (net == "mlp")  # the MLP is replayed from its parameters, others called
            for seed in range(2):
                prev, obs, noise, sn = example_inputs(ref, B, torch.Generator().manual_seed(seed))
                with torch.inference_mode():
                    want_chunk, want_act = ref(prev, obs, noise, sn)
                    obs_n = ref.encode(obs).view(obs.shape)  # the controller's normalized history
                    chunk, act = fast(prev, obs_n, noise, sn)
                assert torch.equal(chunk, want_chunk) and act.shape == (B, n_out, 3)
                assert torch.equal(act, want_act[:, :n_out])
                if warm:  # the warm start matters (the test would pass vacuously if prev were ignored)
                    assert not torch.equal(chunk, fast(prev * 0.5, obs_n, noise, sn)[0])


def test_fast_field_replays_the_mlp_exactly_and_falls_back_when_it_cannot():
    pol = tiny_policy("mlp", "diffusion", "ddim").eval()
    tnet = pol.process.net_time(torch.tensor([0.95, 0.5, 0.05]))
    g = torch.Generator().manual_seed(0)
    for B in (1, 5):
        field = fast_field(pol.net, tnet, B)
        assert field.replayed
        for i in range(3):
            x, cond = torch.randn(B, pol.Tp, 3, generator=g), torch.randn(B, pol.cond_dim, generator=g)
            with torch.inference_mode():
                assert torch.equal(field(i, x, cond), pol.net(x, tnet[i].expand(B), cond))
    with torch.no_grad():  # parameters are read by reference: an in-place update is seen
        pol.net.blocks[0].net[1].weight.mul_(1.5)
        assert torch.equal(field(0, x, cond), pol.net(x, tnet[0].expand(5), cond))
    calls = []
    handle = pol.net.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    hooked = fast_field(pol.net, tnet, 1)  # a hook the replay would skip: the module is called instead
    assert not hooked.replayed
    hooked(0, torch.zeros(1, pol.Tp, 3), torch.zeros(1, pol.cond_dim))
    assert calls == [1]
    handle.remove()


@pytest.mark.parametrize("kind", [("mlp", "diffusion", "ddim", "sample"), ("mlp", "diffusion", "ddpm", "epsilon"),
                                  ("mlp", "flow", "heun", None), ("unet", "diffusion", "ddim", "epsilon"),
                                  ("mlp", "edm", "heun", None)])
@pytest.mark.parametrize("mode", ["rti", "chunked"])
def test_fast_controller_equals_the_generic_controller_bitwise(kind, mode):
    """Same actions, bit for bit, from the fast path (normalized history, FastStep) and the generic path
    (policy.encode, field_fn, sample_loop): the optimizations change the cost, not the numbers."""
    net, process, sampler, prediction = kind
    pol = tiny_policy(net, process, sampler)
    pol = with_prediction(pol, prediction) if prediction else pol.eval()
    fast, generic = Controller(pol, mode, k=3, seed=4), Controller(pol, mode, k=3, seed=4, fast=False)
    assert fast.fast and not generic.fast
    obs = obs_seq(12, seed=3)
    for c in (fast, generic):
        c.reset(seed=7)
        c.prime(obs[0])
    for i, o in enumerate(obs):
        if i == 6:  # a new episode midway, without priming: the cold then warm decisions again
            fast.reset(seed=8)
            generic.reset(seed=8)
        a, b = fast.step(o), generic.step(o)
        assert np.array_equal(a, b), (i, a, b)
        assert fast.last_nfe == generic.last_nfe
    assert fast.total_evals == generic.total_evals and fast.decisions == generic.decisions == 12
    # the history the fast path keeps is DecisionStep.encode of the raw history
    raw = history(obs[6:], pol.To)
    want = fast.decision_step("cold").encode(torch.cat([raw["pos"], raw["vel"]], -1))
    assert torch.equal(fast.history.buffer.flatten(1), want)


# -- discrete (gripper) dimensions -----------------------------------------------------------------------------
def gripper_policy(action_scale=None, process="diffusion"):
    from dpolicy.train.bc import build_policy

    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_policy_cfg("mlp", process, "ddim" if process == "diffusion" else "euler"),
                              action_scale=action_scale)
    data = WindowDataset(gripper_demos(), cfg.obs_keys, cfg.To, cfg.Tp)
    return build_policy(cfg, data).eval()


def test_clip_binarizes_the_warm_start_and_every_remedy_thresholds_the_output():
    pol = gripper_policy()
    da = DiscreteActions(pol.normalizer.action, [DiscreteDim(2, "clip", factor=2.0)], 3)
    x = torch.tensor([[[0.3, -0.4, 0.3], [0.1, 0.2, -0.2], [0.5, 0.5, 0.9]]])
    out = da.binarize(x)
    assert torch.equal(out[..., :2], x[..., :2]) and out[0, :, 2].tolist() == [0.5, -0.5, 0.5]  # +-1 / factor
    thr = DiscreteActions(pol.normalizer.action, [DiscreteDim(2, "threshold", low=-1, high=1, threshold=0.0)], 3)
    assert thr.binarize(x) is x and thr.threshold(x)[0, :, 2].tolist() == [1.0, -1.0, 1.0]

    obs = obs_seq(8)
    plain, clip = Controller(pol, "rti", k=3), Controller(pol, "rti", k=3, discrete={-1: "clip"})
    plain_out = np.stack([plain.step(o) for o in obs])
    clip_out = np.stack([clip.step(o) for o in obs])
    assert set(np.unique(clip_out[:, 2])) <= {-1.0, 1.0} and not set(np.unique(plain_out[:, 2])) <= {-1.0, 1.0}
    # the warm start that clip integrates is the binarized shifted chunk
    step = clip.decision_step("warm")
    prev = torch.rand(1, pol.Tp, 3) * 2 - 1
    want = shift_chunk(prev, 1)
    want[..., 2] = torch.where(want[..., 2] > 0, 1.0, -1.0)  # limits normalization of +-1 data is the identity
    assert torch.allclose(step.warm_start(prev), want)


def test_scale_remedy_shrinks_the_dimension_in_normalized_space(tmp_path):
    pol = gripper_policy(action_scale=[1, 1, 0.1])
    ref = gripper_policy()
    acts = torch.tensor([[0.2, -0.3, 1.0], [0.1, 0.5, -1.0]])
    n, n_ref = pol.normalizer.action.normalize(acts), ref.normalizer.action.normalize(acts)
    assert torch.allclose(n[:, :2], n_ref[:, :2]) and torch.allclose(n[:, 2], 0.1 * n_ref[:, 2])
    assert torch.allclose(pol.normalizer.action.unnormalize(n), acts, atol=1e-6)
    pol.save(tmp_path / "scaled")
    loaded = ChunkPolicy.from_checkpoint(tmp_path / "scaled")
    assert loaded.cfg.action_scale == [1.0, 1.0, 0.1]
    assert torch.equal(loaded.normalizer.action.scale, pol.normalizer.action.scale)
    # a checkpoint written before the field existed loads unchanged
    ref.save(tmp_path / "old")
    cfg_file = tmp_path / "old" / "config.json"
    d = json.loads(cfg_file.read_text())
    d.pop("action_scale")
    cfg_file.write_text(json.dumps(d))
    assert ChunkPolicy.from_checkpoint(tmp_path / "old").cfg.action_scale is None

    c = Controller(pol, "rti", k=3, discrete={2: "scale"})
    assert set(np.unique([c.step(o)[2] for o in obs_seq(6)])) <= {-1.0, 1.0}
    with pytest.raises(ConfigError, match="dimension 2 uses the 'scale' remedy"):
        Controller(ref, "rti", discrete={-1: "scale"})
    for bad, match in [([1, 1], "has 2 entries"), ([1, 1, -0.1], "finite positive"), ([1, float("nan"), 1], "finite positive")]:
        with pytest.raises(ConfigError, match=match):
            PolicyConfig(action_dim=3, action_scale=bad)


# -- export ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_exported_step_equals_the_eager_step(tmp_path, device):
    pol = gripper_policy()
    pol = ChunkPolicy(dataclasses.replace(pol.cfg, process=dataclasses.replace(pol.cfg.process, sampler="ddpm", eta=1.0)),
                      pol.normalizer).to(device).eval()
    c = Controller(pol, "rti", k=3, discrete={-1: "clip"})
    path = c.export(tmp_path / "rti_step.pt2")
    module, meta = load_step(path)
    assert meta["obs_keys"] == ["pos", "vel"] and meta["network_evaluations"] == 3 and meta["stochastic"]
    eager = c.decision_step("warm")
    for seed in range(3):
        args = example_inputs(eager, 1, torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            want, got = eager(*args), module(*args)
        assert all(torch.allclose(w, g_, atol=1e-6) for w, g_ in zip(want, got))
    # the exported step driven by hand reproduces the controller's actions
    c.reset(seed=2)
    obs = obs_seq(4)
    gen = torch.Generator(device=device).manual_seed(slot_seed(2, 0))
    first = c.step(obs[0])
    prev = None
    with torch.inference_mode():
        cold = c.decision_step("cold")
        for i, o in enumerate(obs):
            h = history(obs[:i + 1], pol.To)
            hist = torch.cat([h["pos"], h["vel"]], -1).to(device)
            step = cold if prev is None else module
            noise = torch.randn(1, pol.Tp, 3, device=device, generator=gen)
            sn = torch.stack([torch.randn(1, pol.Tp, 3, device=device, generator=gen)
                              for _ in range((cold if prev is None else eager).n_step_noise)])
            prev, actions = step(prev if prev is not None else noise, hist, noise, sn)
            got = first if i == 0 else c.step(o)
            assert np.allclose(actions[0, 0].cpu().numpy(), got, atol=1e-5), i


# -- contraction -------------------------------------------------------------------------------------------------
def contraction_ratio(pol, data, k, n=64, eps=0.1, seed=1):
    """|out(W + d) - out(W)| / |shifted d| per state, same noise; W = demo chunks as the previous chunk."""
    step = Controller(pol, "rti", k=k, batch_size=n).decision_step("warm")
    g = torch.Generator().manual_seed(seed)
    obs, act = data.gather(torch.randint(0, len(data), (n,), generator=g))
    hist = torch.cat([obs[key] for key in pol.obs_keys], -1)
    prev = pol.normalizer.action.normalize(act)
    noise = torch.randn(prev.shape, generator=g)
    d = eps * torch.randn(prev.shape, generator=g)
    sn = torch.zeros(step.n_step_noise, *prev.shape)
    with torch.inference_mode():
        a, _ = step(prev, hist, noise, sn)
        b, _ = step(prev + d, hist, noise, sn)
    return ((b - a).flatten(1).norm(dim=1) / shift_chunk(d, 1).flatten(1).norm(dim=1)).numpy()


@pytest.mark.parametrize("process", ["diffusion", "flow"])
def test_perturbed_warm_start_contracts_toward_the_unperturbed_result(process):
    pol, data = train_toy(process, "epsilon")
    r = {k: contraction_ratio(pol, data, k) for k in (1, 3, 10)}
    assert r[3].max() < 1.0 and 0.3 < r[3].mean() < 0.97, r[3]  # contracts, yet the warm start still matters
    assert r[10].mean() < r[3].mean() < r[1].mean() < 1.0  # more steps, more contraction
    untrained = ChunkPolicy(pol.cfg, pol.normalizer).eval()
    assert r[10].mean() < contraction_ratio(untrained, data, 10).mean() - 0.05  # learned, not an artifact of the schedule


# -- the loop harness and batched evaluation ----------------------------------------------------------------------
class PointEnv(gym.Env):
    """A deterministic 2-D point (plus a 3-D distractor) that succeeds when x > 0.3; dt = 0.05 s."""

    dt = 0.05

    def __init__(self, horizon=12):
        self.observation_space = gym.spaces.Dict({"pos": gym.spaces.Box(-5, 5, (2,)), "vel": gym.spaces.Box(-5, 5, (3,))})
        self.action_space = gym.spaces.Box(-1, 1, (3,))
        self.horizon = horizon

    def _obs(self):
        return {"pos": self.pos.astype(np.float32), "vel": np.array([*self.v, 0.0], dtype=np.float32)}

    def reset(self, seed=None, options=None):
        super().reset(seed=seed)
        self.pos, self.v, self.t = self.np_random.uniform(-0.5, 0.5, 2), np.zeros(2), 0
        return self._obs(), {}

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64), -1, 1)
        self.v = 0.2 * a[:2]
        self.pos = self.pos + self.v
        self.t += 1
        success = bool(self.pos[0] > 0.3)
        return self._obs(), float(success), success, self.t >= self.horizon, {"is_success": success}


def test_loop_reports_latency_misses_and_evaluations():
    pol = tiny_policy().eval()
    c = Controller(pol, "rti", k=2)
    rep = run_loop(c, PointEnv, episodes=3, seed=0, realtime=False, keep_latencies=True)
    assert rep.decisions == sum(rep.lengths) == len(rep.latencies_ms) and rep.rate_hz == pytest.approx(20.0)
    starts = np.cumsum([0] + rep.lengths[:-1])
    assert all(rep.nfe[s] == 0 for s in starts) and rep.nfe_max == 2  # primed first solve, then K'=2
    assert rep.primed_evals == 3 * 5 and rep.deadline_misses == 0 and 0 < rep.latency_ms["p50"] <= rep.latency_ms["p99"]
    assert rep.success_rate == np.mean(rep.successes) and rep.success_ci95[0] <= rep.success_rate <= rep.success_ci95[1]
    fast = run_loop(c, PointEnv(), rate_hz=1e6, episodes=1, realtime=False, prime=False)
    assert fast.deadline_misses == fast.decisions and fast.nfe_max == 5  # a 1 us period: every decision misses
    t = run_loop(c, PointEnv(horizon=6), rate_hz=200, episodes=1, realtime=True)
    assert t.wall_s >= (t.decisions - 1) * 0.005 * 0.9 and json.dumps(t.to_dict())  # it held the 200 Hz rate
    with pytest.raises(ConfigError, match="batch_size=2"):
        run_loop(Controller(pol, "rti", batch_size=2), PointEnv())


def test_batched_evaluation_does_not_depend_on_the_number_of_envs():
    pol = tiny_policy().eval()
    res = [evaluate_controller(pol, PointEnv, n_episodes=5, n_envs=n, seed=7, mode="rti", k=2) for n in (1, 3)]
    assert res[0].successes == res[1].successes and res[0].lengths == res[1].lengths
    assert res[0].returns == pytest.approx(res[1].returns) and res[0].n_episodes == 5
    assert res[0].policy_calls == 5 * 5 + 2 * (sum(res[0].lengths) - 5)  # one full solve per episode, then K'=2


# -- bad input ----------------------------------------------------------------------------------------------------
def test_bad_input_is_rejected_with_the_culprit_named():
    pol = tiny_policy().eval()
    c = Controller(pol, "rti")
    cases = [
        (lambda: Controller(pol, "realtime"), ConfigError, "mode='realtime'"),
        (lambda: Controller(pol, "rti", sampler="euler"), ConfigError, "sampler='euler'"),
        (lambda: Controller(tiny_policy("mlp", "regression", "direct"), "rti"), ConfigError, "a regression process has no denoising schedule"),
        (lambda: Controller(pol, "rti", discrete={5: "clip"}), ConfigError, "dimension 5 is out of range"),
        (lambda: Controller(pol, "rti", discrete={-1: "round"}), ConfigError, "remedy 'round'"),
        (lambda: Controller(pol, "rti", discrete={0: {"remedy": "clip", "low": 1, "high": -1}}), ConfigError, "low < threshold"),
        (lambda: Controller(pol, "chunked", execute=9), ConfigError, "execute=9"),
        (lambda: Controller(pol, "rti", cuda_graph=True), ConfigError, "cuda_graph=True"),
        (lambda: c.step({"pos": np.zeros(2)}), ShapeError, r"\['vel'\] are missing"),
        (lambda: c.step({"pos": np.zeros(3), "vel": np.zeros(3)}), ShapeError, "'pos' has shape"),
        (lambda: c.step({"pos": np.array([0.0, np.nan]), "vel": np.zeros(3)}), ShapeError, "'pos' holds NaN"),
        (lambda: c.step({"pos": np.zeros(2), "vel": np.array([0, np.inf, 0])}), ShapeError, "'vel' holds NaN"),
        (lambda: c.step([1, 2]), ShapeError, "must be a dict"),
        (lambda: c.reset(mask=[True, False]), ShapeError, "reset mask"),
    ]
    for fn, err, match in cases:
        with pytest.raises(err, match=match):
            fn()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["rti", "chunked"])
def test_cuda_graph_replays_the_eager_step(mode):
    pol = tiny_policy("unet", "diffusion", "ddpm").to("cuda").eval()
    graphed, eager = Controller(pol, mode, k=3, cuda_graph=True), Controller(pol, mode, k=3, cuda_graph=False)
    for o in obs_seq(10):
        assert np.allclose(graphed.step(o), eager.step(o), atol=1e-5)
    b_graphed = Controller(pol, mode, k=3, batch_size=3, cuda_graph=True)
    b_eager = Controller(pol, mode, k=3, batch_size=3, cuda_graph=False)
    for i, o in enumerate(obs_seq(6, batch=3)):
        if i == 2:
            b_graphed.reset(mask=[False, True, False], seed=[4])
            b_eager.reset(mask=[False, True, False], seed=[4])
        assert np.allclose(b_graphed.step(o), b_eager.step(o), atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DPOLICY_SLOW_TESTS"), reason="torch.compile takes ~40 s on a CPU; set DPOLICY_SLOW_TESTS=1")
def test_compiled_step_matches_eager():
    pol = tiny_policy().eval()
    compiled, eager = Controller(pol, "rti", k=3, compile=True), Controller(pol, "rti", k=3)
    for o in obs_seq(5):
        assert np.allclose(compiled.step(o), eager.step(o), atol=1e-5)


# -- CLI and benchmark sections ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def avoid_checkpoint(tmp_path_factory):
    """An untrained policy with the avoid task's shapes and env_args (enough to exercise the plumbing)."""
    from dpolicy.tasks import env_args

    torch.manual_seed(0)
    cfg = PolicyConfig(obs_keys=["agent_pos", "agent_vel"], obs_dims={"agent_pos": 2, "agent_vel": 2}, action_dim=2,
                       To=2, Tp=8, Ta=4, net=NetConfig(hidden=32, depth=1, time_dim=16))
    from dpolicy.data.normalizer import DictNormalizer

    g = torch.Generator().manual_seed(0)
    norm = DictNormalizer.fit({"agent_pos": torch.rand(50, 2, generator=g), "agent_vel": torch.rand(50, 2, generator=g)},
                              torch.rand(50, 2, generator=g) * 2 - 1)
    pol = ChunkPolicy(cfg, norm)
    pol.metadata = {"env_args": env_args("avoid"), "task": "avoid"}
    path = tmp_path_factory.mktemp("ckpt") / "avoid_tiny"
    pol.save(path)
    return path


def test_deploy_cli_writes_metrics_and_export(avoid_checkpoint, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    run = lambda *a: subprocess.run([sys.executable, "-m", "dpolicy.cli.deploy", *a], capture_output=True, text=True,  # noqa: E731
                                    timeout=300, env=env)
    res = run(f"checkpoint={avoid_checkpoint}", "episodes=1", "realtime=false", "max_steps=15", "device=cpu", "k=2",
              f"export={tmp_path / 'step.pt2'}", "eval_episodes=2", "n_envs=2", f"hydra.run.dir={tmp_path}")
    assert res.returncode == 0, res.stderr[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["controller"]["k"] == 2 and m["loop"]["decisions"] == 15 and m["loop"]["nfe_max"] == 2
    assert m["eval"]["n_episodes"] == 2 and (tmp_path / "step.pt2").exists() and "latency p50" in res.stdout
    bad = run(f"checkpoint={avoid_checkpoint}", "k=101", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and "k=101" in bad.stderr.strip().splitlines()[-1] and "Traceback" not in bad.stderr


def test_latency_bench_sections(avoid_checkpoint, tmp_path):
    from dpolicy.bench import latency

    body, res = latency.latency_section(avoid_checkpoint, k=2, episodes=1, log=lambda *_: None)
    for row in ("RTI K'=2", "chunked DDIM-10", "chunked DDPM-100", "eager sample_normalized", "diffusers"):
        assert row in body
    cfgs = res["configs"]
    assert cfgs["chunked DDPM-100"]["nfe_max"] == 100 and cfgs["RTI K'=2"]["nfe_max"] == 2
    assert cfgs["RTI K'=1"]["nfe_max"] == 1 and "| RTI K'=1 |" in body and "other processes kept" in body
    assert cfgs["chunked DDIM-10"]["controller"]["fast"] and not cfgs["chunked DDIM-10, eager sample_normalized"]["controller"]["fast"]
    chk = res["checks"]["RTI K'=2 vs chunked DDIM-10"]
    ratio = cfgs["chunked DDIM-10"]["latency_ms"]["p99"] / cfgs["RTI K'=2"]["latency_ms"]["p99"]
    assert chk["wall"] == pytest.approx(ratio) and chk["met"] == (ratio >= 3.0) and "RTI K'=1 vs chunked DDPM-100" in res["checks"]
    summary = latency.latency_summary([res])
    assert "`avoid_tiny` (residual MLP" in summary and ("NOT met" in summary) == (not all(v["met"] for v in res["checks"].values()))
    (tmp_path / "unet" / "checkpoints").mkdir(parents=True)
    (tmp_path / "unet" / "checkpoints" / "latest").write_text("step_0000001")
    assert latency.unet_policy(tmp_path / "unet") == tmp_path / "unet" / "checkpoints"  # an existing run is reused
    body, res = latency.rti_success_section([avoid_checkpoint], episodes=2, n_envs=2, ks=(1, 3), latency_episodes=1,
                                            plot_path=tmp_path / "sv.png",
                                            candidates=((2, 1, 0), (20, 10, 0), (1, 0), (20, 0)),
                                            select_episodes=2, log=lambda *_: None)
    assert "| avoid_tiny | RTI K'=3 |" in body and "chunked DDIM-10" in body and (tmp_path / "sv.png").exists()
    r = res["avoid_tiny"]
    assert set(r["selection"]) == {"[2, 1, 0]", "[20, 10, 0]", "[1, 0]", "[20, 0]"} and set(r["selected"]) == {2, 3}
    for n_ev, first, other in ((3, "[2, 1, 0]", "[20, 10, 0]"), (2, "[1, 0]", "[20, 0]")):  # one list per length
        lbl = r["selected"][n_ev]
        assert lbl in (f"RTI {first} (selected)", f"RTI {other} (selected)")
        best = max(r["selection"][first], r["selection"][other])  # ties go to the earlier (less re-noise) list
        assert r["selection"][lbl[4:-11]] == best and (best > r["selection"][first]) == (other in lbl)
        assert r["configs"][lbl]["nfe_per_decision"] <= n_ev and f"selected {n_ev}-step timestep list" in body
        assert res["within_3_points_everywhere"][n_ev] == (lbl in r["within_3_points"])
    assert set(r["configs"]) == {"chunked DDIM-10", "RTI K'=1", "RTI K'=3", *r["selected"].values()}
    with pytest.raises(ConfigError, match="overlap"):
        latency.rti_success_section([avoid_checkpoint], episodes=5, select_seed=100003, log=lambda *_: None)
