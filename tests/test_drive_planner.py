"""Tokenizer, masked-diffusion planner, likelihood estimators, GSPO/GRPO and the continuous planners."""

import math

import pytest
import torch

from dpolicy.drive.anchor import AnchorDiffusionPlanner, VanillaDiffusionPlanner, kmeans, to_norm
from dpolicy.drive.masked import MaskedTokenPlanner, masked_diffusion_loss
from dpolicy.drive.rl import RLConfig, baseline_advantages, group_advantages, grpo_loss, gspo_loss, rl_train
from dpolicy.drive.tokenizer import TrajectoryTokenizer
from dpolicy.errors import ConfigError, ShapeError


@pytest.fixture(scope="module")
def drive_sets():
    from dpolicy.drive.data import build_set

    return build_set("train", 6), build_set("test", 4)


def _obs(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    o = {"ego": torch.randn(B, 4, generator=g), "route": torch.randn(B, 16, 2, generator=g),
         "bounds": torch.randn(B, 16, 4, generator=g), "agents": torch.randn(B, 8, 7, generator=g)}
    return o


@pytest.mark.parametrize("mode,res,xr,yr", [("waypoints", 0.5, (-2, 90), (-24, 24)), ("deltas", 0.2, (-1, 13), (-3, 3)),
                                            ("deltas", 0.05, (-1, 13), (-3, 3))])
def test_tokenizer_round_trip_within_half_a_bin(mode, res, xr, yr):
    tok = TrajectoryTokenizer(mode, res, xr, yr)
    g = torch.Generator().manual_seed(0)
    steps = torch.stack([torch.rand(64, 8, generator=g) * 11, torch.rand(64, 8, generator=g) * 4 - 2], -1)
    traj = steps.cumsum(1) if mode == "deltas" else steps * torch.tensor([8.0, 5.0])
    ids = tok.encode(traj)
    assert ids.shape == (64, 16) and tok.valid_mask()[torch.arange(16), ids].all()
    err = (tok.decode(ids) - traj).abs().max()
    assert err <= res / 2 + 1e-5
    assert err > res / 10  # it really quantizes


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ConfigError, match="mode"):
        TrajectoryTokenizer("bins")
    with pytest.raises(ConfigError, match="resolution"):
        TrajectoryTokenizer(resolution=0)
    tok = TrajectoryTokenizer()
    with pytest.raises(ShapeError, match="NaN"):
        tok.encode(torch.full((1, 8, 2), float("nan")))
    with pytest.raises(ShapeError, match="mask token"):
        tok.decode(torch.full((1, 16), tok.mask_id))


def test_masked_diffusion_loss_formula_and_weighting():
    g = torch.Generator().manual_seed(0)
    logits, x0 = torch.randn(3, 5, 7, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) < 0.5
    r = torch.tensor([0.2, 0.5, 1.0])
    ce = -torch.log_softmax(logits, -1).gather(-1, x0[..., None])[..., 0]
    manual = sum(float((ce[b] * mask[b]).sum() / r[b] / 5) for b in range(3)) / 3
    assert float(masked_diffusion_loss(logits, x0, mask, r)) == pytest.approx(manual, rel=1e-6)


def test_planner_loss_is_unbiased_for_a_constant_model():
    """With the 1/r weight the loss's expectation equals the mean per-token cross-entropy (log of the
    per-position vocabulary size for a head that outputs zeros); 1/(1-r) or no weight would not."""
    tok = TrajectoryTokenizer()
    m = MaskedTokenPlanner(tok, d=16, layers=1, heads=2)
    torch.nn.init.zeros_(m.head.weight)
    torch.nn.init.zeros_(m.head.bias)
    obs = _obs(256)
    x0 = tok.encode(torch.rand(256, 8, 2).cumsum(1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        est = sum(float(m.loss(obs, x0, g)) for _ in range(20)) / 20
    expected = (math.log(tok.sizes[0]) + math.log(tok.sizes[1])) / 2
    assert est == pytest.approx(expected, rel=0.03)


def _tiny():
    torch.manual_seed(0)
    return MaskedTokenPlanner(TrajectoryTokenizer(), d=16, layers=1, heads=2).eval()


@pytest.mark.parametrize("order,first", [("causal", [0, 1]), ("reverse", [14, 15])])
def test_decoding_orders_commit_the_right_positions(order, first):
    m = _tiny()
    seen = []
    orig = m.logits
    m.logits = lambda obs, x, **kw: (seen.append(x.clone()), orig(obs, x, **kw))[1]
    out = m.decode(_obs(2), steps=8, order=order)
    assert len(seen) == 8 and (out != m.tok.mask_id).all()
    assert (seen[1][:, first] != m.tok.mask_id).all() and (seen[1] != m.tok.mask_id).sum(1).tolist() == [2, 2]


def test_planner_order_round_trips_and_old_configs_decode_in_confidence_order(tmp_path):
    import json

    from dpolicy.errors import CheckpointError
    from dpolicy.kinds import load_policy

    m = MaskedTokenPlanner(TrajectoryTokenizer(), d=16, layers=1, heads=2, order="causal")
    m.save(tmp_path / "p")
    assert load_policy(tmp_path / "p", "cpu").cfg["order"] == "causal"
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    del cfg["order"]  # a planner saved before planners kept their order
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    assert load_policy(tmp_path / "p", "cpu").cfg["order"] == "confidence"
    (tmp_path / "p" / "config.json").write_text(json.dumps({**cfg, "order": "sideways"}))
    with pytest.raises(CheckpointError, match="order"):
        load_policy(tmp_path / "p", "cpu")


def test_decoding_is_deterministic_and_rejects_unknown_order():
    m = _tiny()
    o = _obs(3)
    a = m.decode(o, steps=4, order="random", temperature=1.0, gen=torch.Generator().manual_seed(1), n=2)
    b = m.decode(o, steps=4, order="random", temperature=1.0, gen=torch.Generator().manual_seed(1), n=2)
    assert a.shape == (6, 16) and torch.equal(a, b)
    with pytest.raises(ConfigError, match="order"):
        m.decode(o, order="sideways")


def test_exact_likelihood_is_a_distribution_and_matches_one_step_for_one_token():
    m = _tiny()
    tok = m.tok
    o = _obs(1)
    x = tok.encode(torch.rand(1, 8, 2).cumsum(1))
    # K = 1: exact == one-step unmasking
    free = torch.zeros_like(x, dtype=torch.bool)
    free[:, 5] = True
    assert float(m.exact_logp(o, x, free)) == pytest.approx(float(m.logp_one_step(o, x, free).sum().detach()), abs=1e-5)
    # K = 2 over one (x, y) pair: probabilities of every completion sum to 1
    xs = torch.arange(tok.sizes[0])[:, None].expand(-1, tok.sizes[1]).reshape(-1)
    ys = tok.offsets[1] + torch.arange(tok.sizes[1])[None].expand(tok.sizes[0], -1).reshape(-1)
    X = x.expand(len(xs), -1).clone()
    X[:, 2], X[:, 3] = xs, ys
    free = torch.zeros_like(X, dtype=torch.bool)
    free[:, 2:4] = True
    ob = {k: v.expand(len(xs), *v.shape[1:]) for k, v in o.items()}
    assert float(m.exact_logp(ob, X, free).exp().sum()) == pytest.approx(1.0, abs=1e-3)
    # the stratified ELBO is a lower bound in expectation and equals one-step when K = 1
    f1 = torch.zeros_like(x, dtype=torch.bool)
    f1[:, 7] = True
    assert float(m.logp_elbo(o, x, f1, nodes=3).sum().detach()) == pytest.approx(float(m.logp_one_step(o, x, f1).sum().detach()), abs=1e-5)


def test_gspo_and_grpo_agree_on_policy():
    g = torch.Generator().manual_seed(0)
    logp = (torch.randn(6, 16, generator=g) - 3).requires_grad_()
    adv = torch.randn(6, generator=g)
    l1, _ = gspo_loss(logp, logp.detach(), adv)
    (g1,) = torch.autograd.grad(l1, logp)
    l2, _ = grpo_loss(logp, logp.detach(), adv)
    (g2,) = torch.autograd.grad(l2, logp)
    assert float(l1.detach()) == pytest.approx(float(l2.detach())) == pytest.approx(-float(adv.mean()))
    assert torch.allclose(g1, g2, atol=1e-7)
    # off-policy they differ: the sequence ratio clips as a whole
    old = logp.detach() + 0.1 * torch.randn(6, 16, generator=g)
    assert float(gspo_loss(logp, old, adv)[0].detach()) != pytest.approx(float(grpo_loss(logp, old, adv)[0].detach()))


def test_group_advantages():
    r = torch.tensor([[0.0, 1.0, 0.5], [0.7, 0.7, 0.7]])
    a = group_advantages(r)
    assert torch.allclose(a[0].mean(), torch.tensor(0.0), atol=1e-6) and a[0].std(unbiased=False) == pytest.approx(1.0, rel=1e-4)
    assert (a[1] == 0).all()
    with pytest.raises(ConfigError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ConfigError, match="algo"):
        RLConfig(algo="ppo")


def test_rl_loop_runs_and_moves_the_policy(drive_sets, monkeypatch):
    import dpolicy_envs.driving

    train, test = drive_sets
    m = _tiny()
    # a random policy scores 0 everywhere (no advantage, no update): reward here = mean lateral position
    monkeypatch.setattr(dpolicy_envs.driving, "score", lambda sc, traj, best_progress=None: {"pdms": traj[..., 1].mean((-1))})
    before = [p.detach().clone() for p in m.parameters()]
    hist = rl_train(m, train, lambda p: 0.0, RLConfig(group=3, scenes_per_iter=2, iters=2, steps=4, eval_every=1))
    assert len(hist) == 3 and hist[1]["ratio_dev"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_baseline_advantages_keep_the_sign_against_the_baseline():
    r = torch.tensor([[0.2, 0.9, 0.5], [1.0, 1.0, 0.0]])
    g = torch.tensor([[0.5], [1.0]])
    a = baseline_advantages({"pdms": r}, {"pdms": g})
    d = r - g
    assert torch.allclose(a, d / d.std(unbiased=False))
    assert (a[0, 0] < 0) and (a[0, 1] > 0) and a[0, 2] == 0 and (a[1, :2] == 0).all() and a[1, 2] < 0
    # not centred: a group all better than its greedy plan is pushed up as a whole (the group mean would cancel it)
    assert (baseline_advantages({"pdms": torch.tensor([[0.8, 0.9]])}, {"pdms": torch.tensor([[0.1]])}) > 0).all()
    assert (baseline_advantages({"pdms": torch.ones(2, 3)}, {"pdms": torch.ones(2, 1)}) == 0).all()
    # decoupled: each sub-score's difference scaled by its own spread, so a rare large NC gain is not drowned by EP
    subs = {"nc": torch.tensor([[1.0, 0.0]]), "ep": torch.tensor([[0.0, 10.0]])}
    base = {"nc": torch.tensor([[0.0]]), "ep": torch.tensor([[5.0]])}
    d = baseline_advantages(subs, base, ("nc", "ep"))
    assert float(d[0, 0]) == pytest.approx(-float(d[0, 1])) and float(d[0, 0]) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ConfigError, match="baseline"):
        RLConfig(baseline="median")


def test_rl_greedy_baseline_scores_the_greedy_plan_and_counts_it(drive_sets, monkeypatch):
    import dpolicy_envs.driving

    train, _ = drive_sets
    calls = []

    def fake_score(sc, traj, best_progress=None):
        calls.append(tuple(traj.shape[:2]))
        return {"pdms": traj[..., 1].mean(-1)}

    monkeypatch.setattr(dpolicy_envs.driving, "score", fake_score)
    m = _tiny()
    before = [p.detach().clone() for p in m.parameters()]
    hist = rl_train(m, train, lambda p: 0.0, RLConfig(group=3, scenes_per_iter=2, iters=2, steps=4, eval_every=2,
                                                       baseline="greedy", lr=1e-3))
    assert calls == [(2, 3), (2, 1)] * 2  # the samples, then the scenes' greedy plans
    assert [h["samples"] for h in hist] == [0, 8, 16] and all("greedy_reward" in h for h in hist[1:])
    assert any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_rl_mean_baseline_does_not_blow_up_a_near_tied_group(drive_sets, monkeypatch):
    """Per-group std scaling turns a group's 1e-4 spread into advantages of +-1; the batch's std keeps them small."""
    import dpolicy.drive.rl as R
    import dpolicy_envs.driving

    train, _ = drive_sets
    seen = {}
    monkeypatch.setattr(dpolicy_envs.driving, "score", lambda sc, traj, best_progress=None: {
        "pdms": torch.tensor([[0.0, 1.0, 0.5], [0.5, 0.5001, 0.5002]])})
    loss = R.gspo_loss

    def spy(lp, old, adv, lo, hi):
        seen.setdefault("adv", adv.detach().clone())
        return loss(lp, old, adv, lo, hi)

    monkeypatch.setattr(R, "gspo_loss", spy)
    got = {}
    for base in ("group", "mean"):
        seen.clear()
        rl_train(_tiny(), train, lambda p: 0.0, RLConfig(group=3, scenes_per_iter=2, iters=1, steps=4, eval_every=1,
                                                          minibatches=1, baseline=base))
        got[base] = sorted(seen["adv"].abs().tolist())  # one mini-batch in a random order
    # per group: the tied group's 1e-4 steps become +-1.22 like the other group's 0.5 steps
    assert got["group"] == pytest.approx([0.0, 0.0, 1.2247, 1.2247, 1.2247, 1.2247], abs=1e-3)
    assert got["mean"] == pytest.approx([0.0, 0.0, 0.00035, 0.00035, 1.7320, 1.7320], abs=1e-4)


def test_rl_kl_penalty_keeps_the_planner_near_its_start(drive_sets, monkeypatch):
    import dpolicy_envs.driving

    train, _ = drive_sets
    monkeypatch.setattr(dpolicy_envs.driving, "score", lambda sc, traj, best_progress=None: {"pdms": traj[..., 1].mean((-1))})
    start = _tiny()
    moved = {}
    for kl in (0.0, 50.0):
        m = _tiny()
        m.load_state_dict(start.state_dict())
        hist = rl_train(m, train, lambda p: 0.0, RLConfig(group=3, scenes_per_iter=2, iters=6, steps=4, eval_every=6, lr=3e-3,
                                                             lr_schedule="constant", kl_coef=kl))
        assert ("kl" in hist[1]) == (kl > 0) and all(h.get("kl", 0.0) >= 0 for h in hist)
        with torch.no_grad():  # the planners' token distributions at the fully masked state, against the start's
            o = _obs(4)
            x = torch.full((4, m.tok.length), m.tok.mask_id)
            p0, p1 = (torch.log_softmax(q.logits(o, x), -1) for q in (start, m))
            ok = torch.isfinite(p0) & torch.isfinite(p1)  # tokens the planner never emits have log-prob -inf in both
            moved[kl] = float(torch.where(ok, p1.exp() * (p1 - p0), torch.zeros_like(p1)).sum(-1).mean())
    assert moved[50.0] < 0.5 * moved[0.0], moved
    with pytest.raises(ConfigError, match="kl_coef"):
        RLConfig(kl_coef=-1)


def test_continuous_planners(drive_sets):
    train, _ = drive_sets
    anchors = kmeans(to_norm(train.expert), 4)
    assert anchors.shape == (4, 16)
    for p in (AnchorDiffusionPlanner(anchors), VanillaDiffusionPlanner(steps=3)):
        assert torch.isfinite(p.loss(train.obs, train.expert))
        out = p.plan(train.obs, gen=torch.Generator().manual_seed(0))
        assert out.shape == (train.n, 8, 2) and torch.isfinite(out).all()


def test_replay_logp_is_the_decoding_chain_rule():
    """Causal order, one token per step: the replay estimator is the left-to-right chain rule."""
    m = _tiny()
    o = _obs(2)
    toks, when = m.decode(o, steps=16, order="causal", temperature=1.0, gen=torch.Generator().manual_seed(0), return_steps=True)
    assert when.tolist() == [list(range(16))] * 2
    with torch.no_grad():
        manual = torch.zeros(2)
        for i in range(16):
            xt = toks.clone()
            xt[:, i:] = m.tok.mask_id
            manual += torch.log_softmax(m.logits(o, xt)[:, i], -1).gather(1, toks[:, i:i + 1])[:, 0]
        assert torch.allclose(m.logp_replay(o, toks, when).sum(1), manual, atol=1e-4)


def test_rl_linear_lr_schedule_decays_to_zero(drive_sets, monkeypatch):
    import dpolicy_envs.driving

    train, _ = drive_sets
    monkeypatch.setattr(dpolicy_envs.driving, "score", lambda sc, traj, best_progress=None: {"pdms": traj[..., 1].mean((-1))})
    seen = []
    step = torch.optim.AdamW.step

    def record(opt, *a, **kw):
        seen.append(opt.param_groups[0]["lr"])
        return step(opt, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", record)
    cfg = RLConfig(group=3, scenes_per_iter=2, iters=4, steps=4, minibatches=2, lr=1e-3, lr_schedule="linear", eval_every=4)
    rl_train(_tiny(), train, lambda p: 0.0, cfg)
    assert seen == pytest.approx([1e-3, 1e-3, 7.5e-4, 7.5e-4, 5e-4, 5e-4, 2.5e-4, 2.5e-4])  # per iteration, both mini-batches
    with pytest.raises(ConfigError, match="lr_schedule"):
        RLConfig(lr_schedule="cosine")


def test_decoupled_advantages_tell_failure_combinations_apart():
    from dpolicy.drive.rl import decoupled_advantages

    # one group of four: a collision that was comfortable, a trip off the road that was not, and two clean plans.
    # PDMS-like is 0, 0, 1, 1: the group advantage cannot tell the two failures apart; GDPO can.
    subs = {"nc": torch.tensor([[0.0, 1.0, 1.0, 1.0]]), "dac": torch.tensor([[1.0, 0.0, 1.0, 1.0]]),
            "ttc": torch.tensor([[1.0, 1.0, 1.0, 1.0]]), "comfort": torch.tensor([[1.0, 0.0, 1.0, 1.0]]),
            "ep": torch.tensor([[0.0, 0.0, 1.0, 1.0]])}
    pdms = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    g = group_advantages(pdms)
    assert float(g[0, 0]) == pytest.approx(float(g[0, 1]))
    d = decoupled_advantages(subs)
    assert float(d[0, 1]) < float(d[0, 0]) < float(d[0, 2]) == pytest.approx(float(d[0, 3]))
    # the sum is normalised over the batch, not per group
    two = {k: torch.cat([v, v * 0 + torch.tensor([[1.0, 1.0, 1.0, 0.0]])]) for k, v in subs.items()}
    a = decoupled_advantages(two)
    assert float(a.mean()) == pytest.approx(0.0, abs=1e-6) and float(a.std(unbiased=False)) == pytest.approx(1.0, rel=1e-5)
    assert (decoupled_advantages({k: torch.ones(2, 3) for k in subs}) == 0).all()
    with pytest.raises(ConfigError, match="advantage"):
        RLConfig(advantage="pdms")


def test_rl_loop_with_decoupled_advantages_uses_every_sub_score(drive_sets, monkeypatch):
    import dpolicy_envs.driving

    train, _ = drive_sets
    seen = []

    def fake(sc, traj, best_progress=None):
        y = traj[..., 1].mean(-1)
        out = {k: (y > 0).float() for k in ("nc", "dac", "ttc", "comfort")}
        out.update(ep=y.sigmoid(), pdms=y)
        seen.append(set(out))
        return out

    monkeypatch.setattr(dpolicy_envs.driving, "score", fake)
    m = _tiny()
    before = [p.detach().clone() for p in m.parameters()]
    rl_train(m, train, lambda p: 0.0, RLConfig(group=3, scenes_per_iter=2, iters=2, steps=4, eval_every=2, advantage="decoupled"))
    assert len(seen) == 2 and any(not torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_kmeans_takes_rows_with_fewer_distinct_values_than_centres():
    x = torch.tensor([[0.0, 1.0]] * 6 + [[2.0, 3.0]] * 6)
    c = kmeans(x, 5)
    assert c.shape == (5, 2) and torch.isfinite(c).all()
    assert {tuple(r) for r in c.tolist()} == {(0.0, 1.0), (2.0, 3.0)}


def test_moe_feed_forward_routes_each_token_to_its_top_k_experts_alone():
    from dpolicy.drive.masked import MoEFeedForward

    torch.manual_seed(0)
    ff = MoEFeedForward(8, 16, experts=4, hidden_routed=6, top_k=2)
    z = torch.randn(5, 3, 8)
    out = ff(z)
    # a token's output does not depend on the rest of the batch
    assert torch.allclose(ff(z[:1]), out[:1], atol=1e-6)
    # changing an expert that a token did not choose leaves that token's output as it was; a chosen one changes it
    chosen = ff.gate(z).topk(2, -1).indices                                   # (5, 3, 2)
    unused = next(e for e in range(4) if not (chosen[0, 0] == e).any())
    used = int(chosen[0, 0, 0])
    with torch.no_grad():
        ff.w2[unused] += 1.0
    assert torch.allclose(ff(z)[0, 0], out[0, 0], atol=1e-6)
    with torch.no_grad():
        ff.w2[used] += 1.0
    assert not torch.allclose(ff(z)[0, 0], out[0, 0], atol=1e-3)
    # the balance term: 1 when gates are uniform, the number of experts when every token prefers one expert fully
    with torch.no_grad():
        ff.gate.weight.zero_()
        ff(z)
        assert float(ff.balance) == pytest.approx(1.0)
        ff.gate.weight[0] = 100 * z.reshape(-1, 8).mean(0).sign()
        ff.gate.weight[1:] = 0
        ff(z.abs() * z.reshape(-1, 8).mean(0).sign())
        assert float(ff.balance) == pytest.approx(4.0, rel=1e-3)
    with pytest.raises(ConfigError, match="top_k"):
        MoEFeedForward(8, 16, experts=2, hidden_routed=4, top_k=3)


def test_moe_planner_trains_round_trips_and_dense_checkpoints_stay_dense(tmp_path, drive_sets):
    from dpolicy.drive.train import train_token_planner
    from dpolicy.kinds import load_policy

    train, _ = drive_sets
    tok = TrajectoryTokenizer()
    torch.manual_seed(0)
    moe = MaskedTokenPlanner(tok, d=16, layers=1, heads=2, experts=4, expert_hidden=8, top_k=2)
    x0 = tok.encode(train.expert)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the loss carries the balance term, weighted as configured
        base = float(moe.loss(train.obs, x0, torch.Generator().manual_seed(1)))
        moe.cfg["balance_weight"] = 1.0
        heavier = float(moe.loss(train.obs, x0, torch.Generator().manual_seed(1)))
        assert heavier - base == pytest.approx(0.99 * float(moe.body.balance()), rel=1e-4)
        moe.cfg["balance_weight"] = 0.01
    losses = train_token_planner(moe, train, steps=30, lr=3e-3)
    assert losses[-1] < losses[0]
    moe.save(tmp_path / "moe")
    back = load_policy(tmp_path / "moe")
    assert isinstance(back, MaskedTokenPlanner) and back.cfg["experts"] == 4 and back.cfg["top_k"] == 2
    assert torch.equal(back.decode(train.obs, gen=g), moe.decode(train.obs, gen=g))
    dense = MaskedTokenPlanner(tok, d=16, layers=1, heads=2)
    dense.save(tmp_path / "dense")
    assert "experts" not in dense.cfg and isinstance(load_policy(tmp_path / "dense").body, torch.nn.TransformerEncoder)


def test_tokenizer_grid_holds_zero_at_any_resolution():
    """A lane-keeping or standing-still plan has zero steps; a grid anchored at a low end the resolution does not
    divide would move it by up to half a bin at every step."""
    still = torch.zeros(1, 8, 2)
    straight = torch.stack([torch.arange(1, 9) * 4.0, torch.zeros(8)], -1)[None]
    for res in (0.2, 0.3, 0.4, 0.7):
        tok = TrajectoryTokenizer("deltas", res, (-1.0, 13.0), (-3.0, 3.0))
        assert torch.equal(tok.decode(tok.encode(still)), still)
        assert torch.equal(tok.decode(tok.encode(straight))[..., 1], straight[..., 1])
        assert (tok.decode(tok.encode(straight))[..., 0] - straight[..., 0]).abs().max() <= res / 2 + 1e-5
    assert TrajectoryTokenizer(resolution=0.2).sizes == (71, 31)  # grids whose low end is a multiple stay as they were
    assert TrajectoryTokenizer(resolution=0.4).sizes == (37, 17)  # -1.2 .. 13.2 and -3.2 .. 3.2
