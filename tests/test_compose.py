"""Test-time composition (GPC): exact reproduction with one parent, diffusion/flow conversion,
compatibility errors, checkpoint round trip, the mixture and product operators, the weight search,
Proposition 1 on a Gaussian mixture with analytic scores, and a CLI smoke run."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import DEVICES, make_demos, random_obs, tiny_policy
from dpolicy.compose import ComposedPolicy, combine, grid_search, cem_search, select_and_report, simplex_grid
from dpolicy.compose.search import check_disjoint, paired_difference
from dpolicy.config import NetConfig, PolicyConfig, ProcessConfig
from dpolicy.data import Demo, WindowDataset
from dpolicy.errors import CheckpointError, ConfigError, ShapeError
from dpolicy.policy import ChunkPolicy, load_policy
from dpolicy.process import build_process

G = lambda s=0: torch.Generator().manual_seed(s)  # noqa: E731


def _kind(process, sampler="ddim", prediction="sample", seed=0, **kw):
    pol = tiny_policy("mlp", process, sampler, seed=seed, **kw)
    if process == "diffusion":  # tiny_policy has no prediction argument; the process reads it at step time
        pol.process.prediction = pol.cfg.process.prediction = prediction
    return pol.eval()


# -- exact reproduction ---------------------------------------------------------------------------
@pytest.mark.parametrize("process,sampler,prediction", [("diffusion", "ddim", "sample"), ("diffusion", "ddim", "epsilon"),
                                                        ("diffusion", "ddpm", "epsilon"), ("flow", "euler", None),
                                                        ("flow", "heun", None), ("edm", "heun", None)])
def test_one_parent_with_weight_one_reproduces_it_exactly(process, sampler, prediction):
    p = _kind(process, sampler, prediction)
    other = _kind("flow", "euler", seed=1)  # a zero-weight parent of another kind must not change anything
    obs, noise = random_obs(6), torch.randn(6, 8, 3, generator=G(5))
    ref = p.act(obs, noise=noise, generator=G())
    for comp in (ComposedPolicy([p], [1.0]), ComposedPolicy([p, other], [1.0, 0.0]),
                 ComposedPolicy([p], [1.0], operator="mixture")):
        assert torch.equal(comp.eval().act(obs, noise=noise, generator=G()), ref)
    assert torch.equal(ComposedPolicy([p]).act(obs, noise=noise, steps=3, generator=G()), p.act(obs, noise=noise, steps=3, generator=G()))


def test_parents_read_their_own_observation_keys_and_history():
    demos = make_demos()
    a = _pol(["pos"], demos, To=2)
    b = _pol(["vel"], demos, To=1, seed=1)
    comp = ComposedPolicy([a, b], [1.0, 0.0]).eval()
    assert comp.obs_keys == ["pos", "vel"] and comp.To == 2 and comp.obs_dims == {"pos": 2, "vel": 3}
    obs, noise = random_obs(3), torch.randn(3, 8, 3)
    assert torch.equal(comp.act(obs, noise=noise), a.act({"pos": obs["pos"]}, noise=noise))
    comp.set_weights([0.0, 1.0])
    assert torch.equal(comp.act(obs, noise=noise), b.act({"vel": obs["vel"][:, -1:]}, noise=noise))
    with pytest.raises(ShapeError, match="'vel' are missing|\\['vel'\\]"):
        comp.act({"pos": obs["pos"]}, noise=noise)


def _pol(keys, demos, To=2, seed=0, process="diffusion", Tp=8, action_norm="limits"):
    torch.manual_seed(seed)
    dims = {"pos": 2, "vel": 3}
    cfg = PolicyConfig(obs_keys=keys, obs_dims={k: dims[k] for k in keys}, action_dim=3, To=To, Tp=Tp, Ta=4,
                       action_norm=action_norm, net=NetConfig(type="mlp", hidden=32, depth=1, time_dim=16),
                       process=ProcessConfig(type=process, sampler="ddim" if process == "diffusion" else "euler",
                                             train_steps=20, steps=5))
    data = WindowDataset(demos, keys, To, Tp)
    return ChunkPolicy(cfg, data.fit_normalizer(action_mode=action_norm)).eval()


# -- diffusion + flow -----------------------------------------------------------------------------
class _AsFlow(nn.Module):
    """The same denoiser as a diffusion policy, expressed as a rectified-flow velocity network."""

    def __init__(self, diff: ChunkPolicy):
        super().__init__()
        self.diff = diff

    def forward(self, y, tau, cond):
        proc = self.diff.process
        s = (tau / 100.0).double()
        ab_target = (1 - s) ** 2 / ((1 - s) ** 2 + s ** 2)
        k = (proc.alpha_bar[None, :] - ab_target[:, None]).abs().argmin(1)  # the level with this SNR
        ab = proc.alpha_bar[k]
        c = (ab.sqrt() + (1 - ab).sqrt()).float().view(-1, 1, 1)
        x = y * c
        f = self.diff.net(x, proc.net_time((k + 1).float() / proc.K), cond)
        a, sg = ab.sqrt().float().view(-1, 1, 1), (1 - ab).sqrt().float().view(-1, 1, 1)
        x0 = f if proc.prediction == "sample" else (x - sg * f) / a
        x0 = x0.clamp(-1, 1) if proc.clip_sample else x0
        return (y - x0) / s.float().view(-1, 1, 1)


@pytest.mark.parametrize("prediction", ["sample", "epsilon"])
def test_diffusion_and_flow_copies_of_one_denoiser_compose_to_the_same_steps(prediction):
    d = _kind("diffusion", "ddim", prediction)
    f = _kind("flow", "euler", seed=7)
    f.net = _AsFlow(d)
    obs, noise = random_obs(5), torch.randn(5, 8, 3, generator=G(2))
    ref = d.act(obs, noise=noise)
    for w in ([0.5, 0.5], [0.0, 1.0], [0.2, 0.8]):
        comp = ComposedPolicy([d, f], w).eval()
        assert comp.base_index == 0 and not comp.describe()["parents"][1]["native"]
        assert torch.allclose(comp.act(obs, noise=noise), ref, atol=1e-4), w
    # the field itself, at every level of the grid: the flow copy, converted, equals the diffusion field
    comp = ComposedPolicy([d, f], [0.0, 1.0])
    cond = comp.encode(obs)
    fd, fc = d.field_fn(cond[0]), comp.field_fn(cond)
    for t, _ in d.process.schedule(5):
        x = torch.randn(5, 8, 3, generator=G(int(t * 100)))
        if prediction == "sample":
            assert torch.allclose(fc(x, t), fd(x, t).clamp(-1, 1), atol=1e-4), t
        else:
            _, eps_d = d.process.split(fd(x, t), x, t)
            assert torch.allclose(fc(x, t), eps_d, atol=1e-3 / d.process.coefficients(t)[1]), t
    # a flow parent listed first still gets the diffusion parent's grid
    assert ComposedPolicy([f, d], [1.0, 0.0]).base_index == 1


def test_an_offset_action_normalization_is_mapped_exactly():
    p = _kind("flow", "euler")
    q = _kind("flow", "euler")
    q.normalizer = type(q.normalizer).from_dict(q.normalizer.to_dict())
    q.normalizer.action.offset += torch.tensor([0.3, -0.2, 0.1])
    obs, noise = random_obs(4), torch.randn(4, 8, 3)
    comp = ComposedPolicy([p, q], [0.0, 1.0]).eval()
    assert comp.describe()["parents"][1]["action_map"]
    assert torch.allclose(comp.act(obs, noise=noise), q.act(obs, noise=noise), atol=1e-5)
    mix = ComposedPolicy([p, q], [0.0, 1.0], operator="mixture").eval()
    assert torch.allclose(mix.act(obs, noise=noise), q.act(obs, noise=noise), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_composed_actions_agree_across_devices(tmp_path, device):
    comp = _saved_pair(tmp_path)
    comp.save(tmp_path / "c")
    obs, noise = random_obs(4), torch.randn(4, 8, 3)
    for op, w in (("convex", [0.3, 0.7]), ("product", [1.0, 1.0]), ("mixture", [0.5, 0.5])):
        comp.set_weights(w, operator=op)
        moved = load_policy(tmp_path / "c", device=device).set_weights(w, operator=op)
        out = moved.act({k: v.to(device) for k, v in obs.items()}, noise=noise.to(device)).cpu()
        assert torch.allclose(comp.act(obs, noise=noise), out, atol=1e-4), op


# -- compatibility --------------------------------------------------------------------------------
def test_incompatible_parents_are_rejected_with_one_clear_sentence():
    demos = make_demos()
    a = _pol(["pos", "vel"], demos)
    with pytest.raises(ConfigError, match="Tp=4 actions per chunk but parent 0 predicts Tp=8"):
        ComposedPolicy([a, _pol(["pos"], demos, Tp=4)])
    short = [Demo(obs=dm.obs, actions=dm.actions[:, :2], states=dm.states) for dm in demos]
    b = _pol(["pos"], demos)
    b2 = ChunkPolicy(PolicyConfig(**{**b.cfg.__dict__, "action_dim": 2}), WindowDataset(short, ["pos"], 2, 8).fit_normalizer())
    with pytest.raises(ConfigError, match="action dimension 2 but parent 0 has 3"):
        ComposedPolicy([a, b2])
    other = [Demo(obs={"pos": np.concatenate([dm.obs["pos"]] * 2, 1)}, actions=dm.actions, states=dm.states) for dm in demos]
    c = _pol(["pos"], demos)
    c2 = ChunkPolicy(PolicyConfig(**{**c.cfg.__dict__, "obs_dims": {"pos": 4}}), WindowDataset(other, ["pos"], 2, 8).fit_normalizer())
    with pytest.raises(ConfigError, match="observation 'pos' has dimension 4 for parent 1 but 2 for parent 0"):
        ComposedPolicy([a, c2])
    with pytest.raises(ConfigError, match="regression policy; it has no denoising field"):
        ComposedPolicy([a, tiny_policy("mlp", "regression", "direct")])
    k50 = tiny_policy("mlp", "diffusion", "ddim")
    k50.process = build_process(dataclasses.replace(k50.cfg.process, train_steps=50))
    with pytest.raises(ConfigError, match="50 noise levels but parent 0 has 20"):
        ComposedPolicy([a, k50])
    scaled = _pol(["pos", "vel"], demos)
    scaled.normalizer.action.scale *= torch.tensor([1.0, 1.5, 1.0])
    with pytest.raises(ConfigError, match="factor 1.5 on action dimension 1 .*common normalized action space"):
        ComposedPolicy([a, scaled])
    assert ComposedPolicy([a, scaled], action_norm_tol=0.6).describe()["parents"][1]["action_map"]
    env2 = _pol(["pos", "vel"], demos)
    a.metadata, env2.metadata = {"env_args": {"env_name": "A"}}, {"env_args": {"env_name": "B"}}
    with pytest.raises(ConfigError, match="different environments"):
        ComposedPolicy([a, env2])
    with pytest.raises(ConfigError, match="nested compositions"):
        ComposedPolicy([ComposedPolicy([a])])
    with pytest.raises(ConfigError, match="at least one parent"):
        ComposedPolicy([])


def test_weights_must_fit_the_operator():
    a, b = _kind("flow", "euler"), _kind("flow", "euler", seed=1)
    with pytest.raises(ConfigError, match="sum to 0.9; they must lie on the simplex"):
        ComposedPolicy([a, b], [0.4, 0.5])
    with pytest.raises(ConfigError, match="got 3 weight"):
        ComposedPolicy([a, b], [0.2, 0.3, 0.5])
    with pytest.raises(ConfigError, match="non-negative"):
        ComposedPolicy([a, b], [1.5, -0.5])
    with pytest.raises(ConfigError, match="operator='max' is unknown"):
        ComposedPolicy([a, b], operator="max")
    comp = ComposedPolicy([a, b], [1.0, 1.0], operator="product")
    with pytest.raises(ConfigError, match="simplex"):
        comp.operator = "convex"
    comp.set_weights([0.3, 0.7], operator="convex")
    assert comp.operator == "convex" and comp.weights == [0.3, 0.7]


# -- operators ------------------------------------------------------------------------------------
def test_mixture_gives_each_sample_to_one_parent_with_probability_w():
    a, b = _kind("diffusion", "ddim", "sample"), _kind("flow", "euler", seed=1)
    comp = ComposedPolicy([a, b], [0.3, 0.7], operator="mixture").eval()
    obs, noise = random_obs(16), torch.randn(16, 8, 3, generator=G(4))
    choice = comp.mixture_choice(noise)
    out = comp.act(obs, noise=noise)
    for i, p in enumerate((a, b)):
        rows = choice == i
        ref = p.act({k: v[rows] for k, v in obs.items()}, noise=noise[rows])
        assert torch.allclose(out[rows], ref, atol=1e-6)
    many = comp.mixture_choice(torch.randn(6000, 8, 3, generator=G(9))).float()
    assert abs(many.mean().item() - 0.7) < 0.03
    assert torch.equal(comp.mixture_choice(noise), choice)  # a function of the noise
    assert comp.set_weights([1.0, 0.0]).mixture_choice(torch.randn(500, 8, 3)).eq(0).all()


def test_product_with_unit_total_weight_is_the_convex_mix_and_stays_finite():
    a, b = _kind("flow", "euler"), _kind("flow", "euler", seed=1)
    obs, noise = random_obs(4), torch.randn(4, 8, 3)
    convex = ComposedPolicy([a, b], [0.3, 0.7]).act(obs, noise=noise)
    prod = ComposedPolicy([a, b], [0.3, 0.7], operator="product").act(obs, noise=noise)
    assert torch.allclose(convex, prod, atol=1e-5)
    for w in ([1.0, 1.0], [2.0, 0.5]):
        for parents in ((a, b), (_kind("diffusion", "ddim", "epsilon"), b)):
            out = ComposedPolicy(parents, w, operator="product").act(obs, noise=noise)
            assert torch.isfinite(out).all()
    # a pair combine() returns stays consistent with x_t: x = alpha x0 + sigma eps
    x, alpha, sigma = torch.randn(3, 4), 0.6, 0.8
    pairs = [((x - sigma * e) / alpha, e) for e in (torch.randn(3, 4), torch.randn(3, 4))]
    x0, eps = combine(pairs, [1.0, 2.0], "product", x, alpha, sigma)
    assert torch.allclose(alpha * x0 + sigma * eps, x, atol=1e-5)


# -- Proposition 1 on a Gaussian mixture ---------------------------------------------------------
def _gmm_score(x, s, pis, means, var):
    """Exact score of the rectified-flow noising of sum_k pi_k N(m_k, var I) at time s; x (N, D)."""
    a, sg = 1 - s, s
    v = a * a * var + sg * sg
    d = x[:, None, :] - a * means[None]  # (N, K, D)
    logp = torch.log(pis)[None] - 0.5 * (d * d).sum(-1) / v - 0.5 * x.shape[1] * torch.log(2 * math.pi * v)
    r = torch.softmax(logp, dim=1)
    return -(r[..., None] * d).sum(1) / v


class _AnalyticFlow(nn.Module):
    """A 'network' whose velocity is the exact one of a Gaussian mixture (ignores the conditioning)."""

    def __init__(self, pis, means, var):
        super().__init__()
        self.pis, self.means, self.var = pis, means, var
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # gives the policy a device

    def forward(self, x, tau, cond):
        s = float(tau[0]) / 100.0
        y = x.reshape(x.shape[0], -1).double()
        score = _gmm_score(y, s, self.pis, self.means, torch.tensor(self.var, dtype=torch.float64))
        v = -(y + s * score) / (1 - s)  # rectified-flow velocity from the score
        return v.reshape(x.shape).to(x.dtype)


def test_proposition_1_score_error_is_a_convex_quadratic_in_w():
    demos = make_demos()
    true = (torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
            torch.tensor([[-1.0, 0.5], [1.0, 0.0], [0.0, -1.2]], dtype=torch.float64), 0.05)
    wrong_weights = (torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64), true[1], 0.05)
    # the other parent errs the opposite way on the weights and also shifts the means
    shifted = (torch.tensor([0.7, 0.25, 0.05], dtype=torch.float64), true[1] + torch.tensor([0.1, -0.05], dtype=torch.float64), 0.05)

    def parent(spec, seed):
        torch.manual_seed(seed)
        cfg = PolicyConfig(obs_keys=["pos"], obs_dims={"pos": 2}, action_dim=2, To=1, Tp=1, Ta=1,
                           net=NetConfig(type="mlp", hidden=8, depth=1, time_dim=8), process=ProcessConfig(type="flow", sampler="euler"))
        two = [Demo(obs={"pos": d.obs["pos"]}, actions=d.actions[:, :2], states=d.states) for d in demos]
        p = ChunkPolicy(cfg, WindowDataset(two, ["pos"], 1, 1).fit_normalizer())
        p.net = _AnalyticFlow(*spec)
        return p.eval()

    comp = ComposedPolicy([parent(wrong_weights, 0), parent(shifted, 1)])
    cond = comp.encode({"pos": torch.zeros(4000, 1, 2)})
    gen = G(0)
    for s in (0.3, 0.6, 0.9):
        comp_idx = torch.multinomial(true[0], 4000, replacement=True, generator=gen)
        x0 = true[1][comp_idx] + math.sqrt(true[2]) * torch.randn(4000, 2, generator=gen, dtype=torch.float64)
        x = ((1 - s) * x0 + s * torch.randn(4000, 2, generator=gen, dtype=torch.float64)).float()
        target = _gmm_score(x.double(), s, *true[:2], torch.tensor(true[2], dtype=torch.float64))
        ws = np.linspace(0, 1, 11)
        errs = []
        for w in ws:
            comp.set_weights([1 - w, w])
            v = comp.field_fn(cond)(x.view(-1, 1, 2), s).view(-1, 2).double()
            score = -(x.double() + (1 - s) * v) / s
            errs.append(float(((score - target) ** 2).sum(1).mean()))
        errs = np.array(errs)
        coef = np.polyfit(ws, errs, 2)
        assert np.abs(np.polyval(coef, ws) - errs).max() < 1e-5 * errs.max(), s  # exactly quadratic
        e1 = _gmm_score(x.double(), s, *wrong_weights[:2], torch.tensor(0.05, dtype=torch.float64)) - target
        e2 = _gmm_score(x.double(), s, *shifted[:2], torch.tensor(0.05, dtype=torch.float64)) - target
        a_pred = float(((e2 - e1) ** 2).sum(1).mean())
        assert coef[0] > 0 and abs(coef[0] - a_pred) < 1e-3 * a_pred, s  # convex, curvature E|e1 - e2|^2
        w_star = -coef[1] / (2 * coef[0])
        w_pred = float(((e1 - e2) * e1).sum(1).mean()) / a_pred  # argmin of E|e1 + w (e2 - e1)|^2
        assert abs(w_star - w_pred) < 1e-3 and 0 < w_star < 1, s
        assert np.polyval(coef, w_star) < min(errs[0], errs[-1]), s  # the mix beats both parents


# -- checkpoints ----------------------------------------------------------------------------------
def _saved_pair(tmp_path):
    a, b = _kind("diffusion", "ddim", "sample"), _kind("flow", "euler", seed=1)
    a.save(tmp_path / "parents" / "a")
    b.save(tmp_path / "parents" / "b")
    return ComposedPolicy.from_checkpoints([tmp_path / "parents" / "a", tmp_path / "parents" / "b"], weights=[0.3, 0.7])


def test_checkpoint_round_trip_relative_absolute_and_moved(tmp_path):
    comp = _saved_pair(tmp_path).eval()
    obs, noise = random_obs(4), torch.randn(4, 8, 3)
    ref = comp.act(obs, noise=noise)
    comp.save(tmp_path / "composed")
    meta = json.loads((tmp_path / "composed" / "meta.json").read_text())
    assert meta["kind"] == "composed" and meta["weights"] == [0.3, 0.7] and meta["parents"][0]["path"] == "../parents/a"
    loaded = load_policy(tmp_path / "composed")
    assert isinstance(loaded, ComposedPolicy) and loaded.weights == [0.3, 0.7]
    assert torch.equal(loaded.act(obs, noise=noise), ref)
    shutil.move(str(tmp_path / "composed"), str(tmp_path / "moved_with"))
    shutil.move(str(tmp_path / "parents"), str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="parent 0 of composed checkpoint .* is missing: '../parents/a'"):
        load_policy(tmp_path / "moved_with")
    (tmp_path / "box").mkdir()
    shutil.move(str(tmp_path / "elsewhere"), str(tmp_path / "box" / "parents"))
    shutil.move(str(tmp_path / "moved_with"), str(tmp_path / "box" / "composed"))
    assert torch.equal(load_policy(tmp_path / "box" / "composed").act(obs, noise=noise), ref)  # moved as a whole
    again = load_policy(tmp_path / "box" / "composed")
    again.set_weights([1.0, 0.0], operator="mixture")
    again.save(tmp_path / "abs", relative=False)
    m = json.loads((tmp_path / "abs" / "meta.json").read_text())
    assert os.path.isabs(m["parents"][1]["path"]) and load_policy(tmp_path / "abs").operator == "mixture"


def test_changed_or_unloadable_parents_and_unsaved_parents_are_errors(tmp_path):
    comp = _saved_pair(tmp_path)
    comp.save(tmp_path / "composed")
    _kind("flow", "euler", seed=5).save(tmp_path / "parents" / "b")  # the parent was retrained in place
    with pytest.raises(CheckpointError, match="parent 1 .* has different weights"):
        load_policy(tmp_path / "composed")
    (tmp_path / "parents" / "a" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="parent 0 of composed checkpoint .* cannot be loaded: .*config.json"):
        load_policy(tmp_path / "composed")
    with pytest.raises(ConfigError, match="does not know where its parents are stored"):
        ComposedPolicy([_kind("flow", "euler")]).save(tmp_path / "x")
    meta = json.loads((tmp_path / "composed" / "meta.json").read_text())
    meta["parents"] = []
    (tmp_path / "composed" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lists no parents"):
        load_policy(tmp_path / "composed")


# -- weight search --------------------------------------------------------------------------------
class _FakeResult:
    def __init__(self, succ, seed):
        self.successes, self.n_episodes = succ, len(succ)
        self.success_rate = float(np.mean(succ))
        self.mean_return, self.mode_counts, self.seed = self.success_rate, {}, seed
        from dpolicy.eval import wilson_interval

        self.success_ci95 = wilson_interval(int(sum(succ)), len(succ))


def _fake_evaluate(target):
    """Success probability peaks at weights ``target``; episodes are deterministic in (seed, i)."""
    def evaluate(policy, env_fn, n_episodes, n_envs, seed, progress, steps):
        w = np.asarray(policy.weights)
        p = 0.9 - 1.5 * float(((w - np.asarray(target)) ** 2).sum())
        u = np.random.default_rng(seed).random(n_episodes)
        return _FakeResult([bool(x < p) for x in u], seed)
    return evaluate


def test_simplex_grid_and_seed_disjointness():
    assert len(simplex_grid(2, 10)) == 11 and len(simplex_grid(3, 4)) == 15
    assert all(abs(sum(w) - 1) < 1e-12 and min(w) >= 0 for w in simplex_grid(3, 4))
    assert simplex_grid(2, 2)[0] == [1.0, 0.0]
    check_disjoint(0, 50, 50, 200)
    with pytest.raises(ConfigError, match="overlap"):
        check_disjoint(100, 50, 0, 120)
    m, (lo, hi) = paired_difference([1, 1, 0, 1], [0, 1, 0, 0])
    assert m == 0.5 and lo < 0.5 < hi


def test_grid_and_cem_search_select_on_one_seed_set_and_report_on_another(monkeypatch):
    import dpolicy.eval

    monkeypatch.setattr(dpolicy.eval, "evaluate", _fake_evaluate([0.3, 0.7]))
    a, b = _kind("flow", "euler"), _kind("flow", "euler", seed=1)
    comp = ComposedPolicy([a, b])
    res = grid_search(comp, None, episodes=400, seed=10, resolution=10)
    assert res.best == pytest.approx([0.3, 0.7], abs=0.11) and comp.weights == res.best and res.evaluations == 11
    rep = select_and_report(comp, None, "grid", select_episodes=100, select_seed=1000, eval_episodes=300, eval_seed=0)
    assert rep["eval_seeds"] == [0, 300] and rep["select_seeds"] == [1000, 1100] and len(rep["parents"]) == 2
    assert rep["gain_vs_best_parent"] > 0 and rep["composed"]["n_episodes"] == 300
    with pytest.raises(ConfigError, match="overlap"):
        select_and_report(comp, None, "grid", select_episodes=100, select_seed=0, eval_episodes=300, eval_seed=0)
    four = ComposedPolicy([a, b, _kind("flow", "euler", seed=2), _kind("flow", "euler", seed=3)])
    monkeypatch.setattr(dpolicy.eval, "evaluate", _fake_evaluate([0.1, 0.2, 0.6, 0.1]))
    with pytest.raises(ConfigError, match="use search=cem"):
        grid_search(four, None)
    res = cem_search(four, None, episodes=400, seed=3, iterations=5, population=10, rng_seed=0)
    assert float(np.abs(np.asarray(res.best) - [0.1, 0.2, 0.6, 0.1]).sum()) < 0.5 and abs(sum(res.best) - 1) < 1e-6
    assert res.evaluations == 5 + 5 * 10


# -- CLI ------------------------------------------------------------------------------------------
def _avoid_parent(path, process, seed):
    from dpolicy.tasks import env_args

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    demos = [Demo(obs={"agent_pos": rng.uniform(-0.5, 0.5, (20, 2)).astype(np.float32),
                       "agent_vel": rng.normal(size=(20, 2)).astype(np.float32)},
                  actions=rng.uniform(-1, 1, (20, 2)).astype(np.float32), states=rng.normal(size=(20, 4))) for _ in range(3)]
    cfg = PolicyConfig(obs_keys=["agent_pos", "agent_vel"], obs_dims={"agent_pos": 2, "agent_vel": 2}, action_dim=2, To=2,
                       Tp=8, Ta=8, net=NetConfig(type="mlp", hidden=16, depth=1, time_dim=8),
                       process=ProcessConfig(type=process, sampler="ddim" if process == "diffusion" else "euler",
                                             train_steps=20, steps=3))
    pol = ChunkPolicy(cfg, WindowDataset(demos, cfg.obs_keys, 2, 8).fit_normalizer())
    pol.normalizer.action.offset.zero_()
    pol.normalizer.action.scale.fill_(1.0)  # a shared action space, as if trained on the same demos
    pol.metadata = {"env_args": env_args("avoid")}
    pol.save(path)


def test_compose_cli_writes_metrics_checkpoint_and_plot(tmp_path):
    _avoid_parent(tmp_path / "a", "diffusion", 0)
    _avoid_parent(tmp_path / "b", "flow", 1)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "dpolicy.cli.compose", f"parents=[{tmp_path / 'a'},{tmp_path / 'b'}]", "resolution=2",
           "select_episodes=2", "episodes=2", "n_envs=2", f"hydra.run.dir={tmp_path / 'run'}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(m["select"]["candidates"]) == 3 and m["composed"]["n_episodes"] == 2 and len(m["parents"]) == 2
    assert (tmp_path / "run" / "weight_sweep.png").stat().st_size > 0 and "success rate" in res.stdout
    pol = load_policy(tmp_path / "run" / "composed")
    assert isinstance(pol, ComposedPolicy) and pol.weights == m["weights"]
    ev = subprocess.run([sys.executable, "-m", "dpolicy.cli.evaluate", f"checkpoint={tmp_path / 'run' / 'composed'}", "episodes=2",
                         "n_envs=2", "video=false", f"hydra.run.dir={tmp_path / 'eval'}"], capture_output=True, text=True,
                        timeout=300, env=env)
    assert ev.returncode == 0, ev.stderr[-2000:]  # dpolicy-eval takes a composed checkpoint unchanged
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_episodes"] == 2
    bad = subprocess.run([*cmd[:3], f"parents=[{tmp_path / 'nope'}]", f"hydra.run.dir={tmp_path / 'bad'}"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr


# -- benchmark --------------------------------------------------------------------------------------
def test_bench_section_trains_parents_and_reports_on_disjoint_seeds(tmp_path):
    from dpolicy.bench.compose import EVAL_SEED, SELECT_SEED, Experiment, ParentSpec, compose_section

    tiny = ["train.steps=20", "train.batch_size=32", "policy.net.hidden=16", "policy.net.depth=1", "eval.episodes=1"]
    exp = Experiment("lift: tiny", "lift", [ParentSpec("diffusion", ["process=diffusion", *tiny, "seed=1"]),
                                            ParentSpec("flow", ["process=flow", *tiny, "seed=2"])], demos=2, note="smoke")
    body, res = compose_section(tmp_path, [exp], select_episodes=2, eval_episodes=2, resolution=1, n_envs=2, log=lambda m: None)
    assert "| lift: tiny | convex |" in body and "flow" in body and "Wilson" in body
    rep = res["experiments"][0]["operators"]["convex"]
    assert rep["select_seeds"] == [SELECT_SEED, SELECT_SEED + 2] and rep["eval_seeds"] == [EVAL_SEED, EVAL_SEED + 2]
    assert len(rep["select"]["candidates"]) == 2 and os.path.getsize(rep["plot"]) > 0
    assert load_policy(tmp_path / "exp0_lift" / "composed_convex").weights == rep["weights"]
