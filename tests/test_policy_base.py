"""The ``Policy`` contract, for every kind of policy (a chunk policy, a composition, a steered policy), and the
checkpoint kind registry: a kind defined outside the core loads through ``load_policy``."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import random_obs, tiny_policy

import dpolicy
from dpolicy.compose import ComposedPolicy
from dpolicy.deploy import Controller
from dpolicy.errors import CheckpointError, ConfigError, ShapeError
from dpolicy.policy import Policy, PolicySpec, load_policy
from dpolicy.policy import checkpoint as ckpt
from dpolicy.rl.agent import Actor
from dpolicy.rl.steered import SteeredPolicy


def chunk():
    return tiny_policy(seed=1).eval()


def composed():
    return ComposedPolicy([tiny_policy(seed=1), tiny_policy(seed=2)], [0.4, 0.6]).eval()


def steered(sample=False):
    base = tiny_policy(seed=1).eval()
    torch.manual_seed(3)
    return SteeredPolicy(base, Actor(base.cond_dim, base.Tp * base.action_dim, 16, 1, 1.5).eval(), sample=sample)


KINDS = {"chunk": chunk, "composed": composed, "steered": steered, "steered-sampling": lambda: steered(True)}


@pytest.fixture(params=sorted(KINDS))
def policy(request):
    return KINDS[request.param]()


def noise(batch=3, seed=0):
    return torch.randn(batch, 8, 3, generator=torch.Generator().manual_seed(seed))


def test_every_kind_is_a_policy_with_a_spec(policy):
    assert isinstance(policy, Policy)
    spec = policy.spec
    assert isinstance(spec, PolicySpec)
    assert (policy.obs_keys, policy.obs_dims, policy.To, policy.Tp, policy.Ta, policy.action_dim, policy.default_steps) == \
        (list(spec.obs_keys), dict(spec.obs_dims), spec.To, spec.Tp, spec.Ta, spec.action_dim, spec.default_steps)
    assert spec.obs_keys == ("pos", "vel") and spec.obs_dims == {"pos": 2, "vel": 3} and (spec.Tp, spec.action_dim) == (8, 3)
    assert policy.device == torch.device("cpu") and isinstance(policy.metadata, dict)
    assert policy.normalizer.action.dim == 3 and policy.process.denoising


def test_act_takes_numpy_and_lists_and_gives_the_same_chunk(policy):
    obs, z = random_obs(3), noise()
    want = policy.act(obs, noise=z)
    assert want.shape == (3, 8, 3)
    assert torch.equal(policy.act({k: v.numpy() for k, v in obs.items()}, noise=z.numpy()), want)
    assert torch.equal(policy.act({k: v.tolist() for k, v in obs.items()}, noise=z.tolist()), want)
    assert policy.check_obs({k: v.numpy() for k, v in obs.items()}) == 3


@pytest.mark.parametrize("key", ["pos", "vel"])
def test_non_finite_observations_are_rejected_naming_the_key(policy, key):
    obs = {k: v.numpy().copy() for k, v in random_obs(2).items()}
    obs[key][1, 0, 0] = np.nan
    with pytest.raises(ShapeError, match=f"observation '{key}' holds NaN or infinite values"):
        policy.act(obs, noise=noise(2))
    with pytest.raises(ShapeError, match=r"\['vel'\] are missing"):
        policy.act({"pos": obs["pos"]})


@pytest.mark.parametrize("steps", [0, -2, 2.5, True])
def test_steps_that_are_not_a_positive_integer_are_rejected_naming_the_value(policy, steps):
    obs = random_obs(2)
    with pytest.raises(ConfigError, match=f"steps={steps!r} must be a positive integer"):
        policy.act(obs, noise=noise(2), steps=steps)
    with pytest.raises(ConfigError, match=f"steps={steps!r}"):
        policy.sample_normalized(policy.encode(obs), noise(2), steps)
    with pytest.raises(ConfigError, match=f"steps={steps!r}"):
        Controller(policy, "chunked", steps=steps)


def test_steps_none_is_the_default(policy):
    obs, z = random_obs(2), noise(2)
    assert torch.equal(policy.act(obs, noise=z), policy.act(obs, noise=z, steps=policy.default_steps))
    assert Controller(policy, "chunked").steps == policy.default_steps


def test_execute_zero_is_rejected_and_none_is_Ta(policy):
    with pytest.raises(ConfigError, match="execute=0 must be between 1 and Tp"):
        Controller(policy, "chunked", execute=0)
    assert Controller(policy, "chunked").execute == policy.Ta


def test_constructors_reject_zero_steps_and_Ta():
    base = tiny_policy()
    with pytest.raises(ConfigError, match="steps=0"):
        SteeredPolicy(base, Actor(base.cond_dim, 24, 8, 1, 1.0), steps=0)
    with pytest.raises(ConfigError, match="steps=0"):
        ComposedPolicy([base], steps=0)
    with pytest.raises(ConfigError, match="Ta=0"):
        ComposedPolicy([base], Ta=0)
    assert SteeredPolicy(base, Actor(base.cond_dim, 24, 8, 1, 1.0), steps=3).default_steps == 3
    assert ComposedPolicy([base], steps=2, Ta=3).spec.Ta == 3


def test_with_sampler_is_a_view_sharing_every_weight(policy):
    view = policy.with_sampler("ddpm", eta=1.0)
    assert view is not policy and type(view) is type(policy)
    assert view.process.sampler == "ddpm" and policy.process.sampler == "ddim"  # the original samples as before
    assert view.spec == policy.spec
    theirs = dict(view.named_parameters())
    assert theirs.keys() == dict(policy.named_parameters()).keys()
    assert all(p is theirs[name] for name, p in policy.named_parameters())
    obs, z = random_obs(2), noise(2)
    before = policy.act(obs, noise=z)
    with torch.no_grad():  # a change to a weight shows in both
        next(iter(view.parameters())).add_(0.5)
    assert not torch.equal(policy.act(obs, noise=z), before)
    assert policy.with_sampler(None) is policy


def test_the_controller_reads_the_spec_of_every_kind(policy):
    c = Controller(policy, "rti", k=2)
    assert (c.To, c.Tp, c.Da, c.obs_keys, c.obs_dims) == (policy.To, policy.Tp, policy.action_dim, policy.obs_keys,
                                                           policy.obs_dims)
    a = c.step({"pos": np.zeros(2), "vel": np.zeros(3)})
    assert a.shape == (3,) and np.isfinite(a).all()


# -- kinds --------------------------------------------------------------------------------------------------------
def test_a_kind_registered_outside_the_core_loads_through_load_policy(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "KINDS", dict(ckpt.KINDS))  # the toy kind goes away with the test

    @ckpt.register_kind("toy")
    class ToyPolicy(Policy):
        def __init__(self, gain):
            super().__init__()
            self.gain = gain

        @classmethod
        def load(cls, path, meta, device="cpu"):
            return cls(json.loads((path / "toy.json").read_text())["gain"])

    d = tmp_path / "toy"
    d.mkdir()
    (d / "meta.json").write_text(json.dumps({"kind": "toy"}))
    (d / "toy.json").write_text(json.dumps({"gain": 2.5}))
    for load in (load_policy, dpolicy.load_policy, ckpt.load_checkpoint):
        loaded = load(d)
        assert isinstance(loaded, ToyPolicy) and loaded.gain == 2.5 and ToyPolicy.kind == "toy"
    with pytest.raises(ConfigError, match="registered twice"):
        ckpt.register_kind("toy")(type("OtherToy", (ToyPolicy,), {}))
    (d / "meta.json").write_text(json.dumps({"kind": "nobody"}))
    with pytest.raises(CheckpointError, match="kind 'nobody', which no loaded module registers"):
        load_policy(d)


def test_the_builtin_kinds_are_registered_by_their_modules():
    from dpolicy.kinds import BUILTIN, kinds

    assert {k: kinds()[k] for k in BUILTIN} == BUILTIN
    assert BUILTIN["composed"] is ComposedPolicy and BUILTIN["steered"] is SteeredPolicy


def test_the_policy_layer_imports_no_layer_above_it():
    code = ("import sys, dpolicy.policy, dpolicy.policy.checkpoint\n"
            "up = sorted(m for m in sys.modules if m.startswith(('dpolicy.compose', 'dpolicy.rl', 'dpolicy.deploy', "
            "'dpolicy.eval', 'dpolicy.kinds')))\n"
            "assert not up, up\n"
            "from dpolicy.policy import load_policy\n"
            "assert 'dpolicy.kinds' in sys.modules and 'dpolicy.rl.steered' in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
