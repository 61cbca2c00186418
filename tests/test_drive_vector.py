"""The vectorized observation and encoder, the scene cache and the planners' checkpoint directories."""

import json
import math

import pytest
import torch

from dpolicy.drive.anchor import AnchorDiffusionPlanner, kmeans, to_norm
from dpolicy.drive.encoder import VectorEncoder
from dpolicy.drive.masked import MaskedTokenPlanner
from dpolicy.drive.tokenizer import TrajectoryTokenizer
from dpolicy.errors import CheckpointError, ConfigError, DatasetError, ShapeError
from dpolicy_envs.driving import generate_scenes, observe_vector
from dpolicy_envs.driving.vector import HISTORY, HISTORY_DT, MAP_TYPES, N_MAP, POINTS, SEGMENTS


@pytest.fixture(scope="module")
def vec_set():
    from dpolicy.drive.data import build_set

    return build_set("train", 6, encoder="vector")


def test_vector_observation_geometry():
    sc = generate_scenes(range(40))
    o = observe_vector(sc)
    assert o["map"].shape == (40, N_MAP, POINTS, 11) and o["tracks"].shape == (40, 9, HISTORY, 8)
    tr = o["tracks"]
    # the ego sits at the origin heading +x now and moved ego_v * 0.2 s per history step before
    assert torch.allclose(tr[:, 0, -1, :4], torch.tensor([0.0, 0.0, 1.0, 0.0]).expand(40, 4), atol=1e-5)
    step = (tr[:, 0, 1:, :2] - tr[:, 0, :-1, :2]).norm(dim=-1) * 50
    assert torch.allclose(step, sc.ego_v[:, None].expand_as(step) * HISTORY_DT, rtol=0.02, atol=0.02)
    # every agent's newest pose is its logged pose at t = 0; empty slots are zero and invalid
    now = sc.agents[:, :, 0]
    v = sc.agent_valid
    assert torch.allclose(tr[:, 1:, -1, :2][v] * 50, now[..., :2][v], atol=1e-3)
    assert torch.allclose(tr[:, 1:, -1, 2][v], torch.cos(now[..., 2])[v], atol=1e-5)
    assert (tr[:, 1:][~v] == 0).all() and torch.equal(o["tracks_valid"][:, 1:], v)
    # lanes: absent ones invalid, the route lane typed "route", points past a lane's end invalid
    S = len(SEGMENTS)
    kinds = o["map"][..., 4:4 + len(MAP_TYPES)].argmax(-1)[..., 0]                   # (B, M)
    for b in range(40):
        for lane in range(4):
            rows = slice(lane * S, (lane + 1) * S)
            if math.isnan(float(sc.lane_offsets[b, lane])):
                assert not o["map_valid"][b, rows].any()
                continue
            st = torch.tensor(SEGMENTS)[:, None] + 5.0 * torch.arange(POINTS)
            assert torch.equal(o["map_valid"][b, rows], st <= sc.lane_end[b, lane])
            want = MAP_TYPES.index("route" if lane == int(sc.route_lane[b]) else "lane")
            assert (kinds[b, rows][o["map_valid"][b, rows].any(-1)] == want).all()
        assert bool(o["map_valid"][b, -1].all()) == bool(sc.cross[b, 2] > 0.5)
    # the route lane's nearest point lies where the route lane's offset says, in the ego frame
    b = int((sc.cross[:, 2] < 0.5).nonzero()[0])
    lane = int(sc.route_lane[b])
    pts = o["map"][b, lane * S + 0, :, :2] * 50                                        # stations -10 .. 25 m
    lateral = float(sc.lane_offsets[b, lane] - sc.ego_d[b])
    assert float(pts[2, 1]) == pytest.approx(lateral, abs=0.3) and float(pts[2, 0]) == pytest.approx(0.0, abs=0.5)


def _vec_obs(B=3, seed=0):
    return observe_vector(generate_scenes(range(seed, seed + B)))


def test_vector_encoder_ignores_invalid_tokens_and_points():
    torch.manual_seed(0)
    enc = VectorEncoder(d=32, layers=1, heads=4).eval()
    o = _vec_obs()
    tok, valid = enc.tokens(o)
    assert tok.shape == (3, N_MAP + 9, 32) and torch.equal(valid[:, N_MAP:], o["tracks_valid"])
    o2 = {k: v.clone() for k, v in o.items()}
    o2["map"][~o["map_valid"]] = 7.0                      # garbage where points do not exist
    o2["tracks"][~o["tracks_valid"]] = -3.0               # and in empty agent slots
    tok2, _ = enc.tokens(o2)
    assert torch.allclose(tok[valid], tok2[valid], atol=1e-5)
    o3 = {k: v.clone() for k, v in o.items()}
    o3["tracks"][:, 0, 0, 0] += 0.1                      # the ego's history is read
    assert not torch.allclose(enc.tokens(o3)[0][valid], tok[valid])
    with pytest.raises(ShapeError, match="map"):
        enc.tokens({**o, "map": o["map"][:, :5]})
    with pytest.raises(ConfigError, match="ego_dropout"):
        VectorEncoder(ego_dropout=1.0)


def test_ego_dropout_hides_the_ego_history_in_training_only():
    torch.manual_seed(0)
    enc = VectorEncoder(d=32, layers=1, heads=4, ego_dropout=0.999)
    o = _vec_obs()
    o2 = {k: v.clone() for k, v in o.items()}
    o2["tracks"][:, 0, :-1, :2] += 0.05                  # another past for the ego
    o2["tracks"][:, 0, :, 4] *= 2                        # and another speed
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    enc.train()
    assert torch.allclose(enc.tokens(o, g())[0], enc.tokens(o2, g())[0], atol=1e-6)
    enc.eval()
    assert not torch.allclose(enc.tokens(o)[0], enc.tokens(o2)[0])


def _masked(encoder="vector"):
    torch.manual_seed(0)
    return MaskedTokenPlanner(TrajectoryTokenizer(), d=32, layers=1, heads=4, encoder=encoder, encoder_layers=1).eval()


def test_planners_on_the_vector_encoder_train_plan_and_round_trip(tmp_path, vec_set):
    from dpolicy import load_policy
    from dpolicy.drive.train import plan, train_continuous, train_token_planner

    m = _masked()
    losses = train_token_planner(m, vec_set, 3, batch=4)
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    torch.manual_seed(1)
    a = AnchorDiffusionPlanner(kmeans(to_norm(vec_set.expert), 4), d=32, encoder="vector", layers=1, encoder_layers=1)
    train_continuous(a, vec_set, 3, batch=4)
    a.eval()
    for p in (m, a):
        before = plan(p, vec_set)
        assert before.shape == (vec_set.n, 8, 2) and torch.isfinite(before).all()
        d = p.save(tmp_path / type(p).__name__, {"val_pdms": 0.5})
        meta = json.loads((d / "meta.json").read_text())
        assert meta["kind"] in ("drive_masked", "drive_anchor") and meta["metadata"] == {"val_pdms": 0.5}
        assert {f.name for f in d.iterdir()} == {"meta.json", "config.json", "model.safetensors", "COMPLETE"}
        back = load_policy(d)
        assert type(back) is type(p) and torch.equal(plan(back, vec_set), before)
        assert not any(f.suffix in (".pt", ".pkl") for f in d.iterdir())


def test_planner_save_is_atomic(tmp_path, monkeypatch):
    import dpolicy.drive.checkpoint as ck

    m = _masked("flat")
    d = m.save(tmp_path / "p")
    first = (d / "model.safetensors").read_bytes()

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(ck, "write_json", boom)
    torch.nn.init.zeros_(m.head.weight)
    with pytest.raises(OSError):
        m.save(tmp_path / "p")
    assert (d / "model.safetensors").read_bytes() == first and (d / "COMPLETE").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary directory left behind


def test_scene_cache_matches_build_set_and_reuses_its_chunks(tmp_path, monkeypatch):
    import dpolicy.drive.cache as cache
    from dpolicy.drive.data import build_set

    a = cache.cached_set("val", 5, tmp_path, chunk=3, encoder="vector")
    ref = build_set("val", 5, encoder="vector")
    assert a.n == 5 and torch.equal(a.expert, ref.expert) and torch.equal(a.best_progress, ref.best_progress)
    assert torch.equal(a.scenes.seeds, ref.scenes.seeds) and all(torch.equal(a.obs[k], ref.obs[k]) for k in ref.obs)
    assert torch.equal(a.expert_scores["pdms"], ref.expert_scores["pdms"])
    files = sorted(p.name for p in (tmp_path / cache.fingerprint()).iterdir())
    assert files == ["val_0000000_3.safetensors", "val_0000003_3.safetensors"]
    monkeypatch.setattr(cache, "build_set", lambda *a, **k: pytest.fail("a cached chunk was rebuilt"))
    b = cache.cached_set("val", 4, tmp_path, chunk=3)     # a smaller set reads the same chunks
    assert torch.equal(b.expert, ref.expert[:4]) and set(b.obs) == {"ego", "route", "bounds", "agents"}
    (tmp_path / cache.fingerprint() / files[1]).write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="val_0000003_3.safetensors"):
        cache.cached_set("val", 5, tmp_path, chunk=3)


def test_scene_cache_fingerprint_sees_a_candidate_the_expert_never_picks(monkeypatch):
    import dpolicy.drive.cache as cache
    import dpolicy_envs.driving.expert as expert

    from dpolicy.drive.data import build_set

    before, ref = cache.fingerprint.__wrapped__(), build_set("val", 1)
    plain = expert.candidates
    # one more candidate far off the road: never chosen, so the probes' plans and normalisers stay the same
    monkeypatch.setattr(expert, "candidates", lambda sc: torch.cat([plain(sc), plain(sc)[:, :1] + torch.tensor([0.0, 80.0])], 1))
    now = build_set("val", 1)
    assert torch.equal(ref.expert, now.expert) and torch.equal(ref.best_progress, now.best_progress)
    assert cache.fingerprint.__wrapped__() != before


def test_cli_trains_and_evaluates_both_planners_from_the_cache(tmp_path, capsys):
    from dpolicy.cli.drive import main

    common = [f"data.cache={tmp_path / 'cache'}", "data.n_train=6", "data.n_val=3", "data.n_test=3", "model.d=16",
              "model.encoder_layers=1", "model.layers=1", "train.steps=2", "train.batch=4"]
    for planner in ("masked", "anchor"):
        run = tmp_path / planner
        assert main(["train", f"run_dir={run}", f"model.planner={planner}", "model.anchors=3", *common]) == 0
        assert json.loads((run / "planner" / "meta.json").read_text())["kind"] == f"drive_{planner}"
        capsys.readouterr()
        assert main(["eval", f"init={run}", f"run_dir={tmp_path / 'ev'}", "eval.split=val", f"eval.closed_loop={planner == 'anchor'}",
                     *common]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        res = json.loads((tmp_path / "ev" / "eval.json").read_text())
        assert last == f"PDMS-like {res['pdms']:.4f}" and res["split"] == "val" and res["scenes"] == 3
        cl = {f"{w}_{m}" for w in ("cl", "expert_cl") for m in ("collision_rate", "offroad_rate", "progress_m")}
        assert (cl <= set(res)) == (planner == "anchor") and all(0 <= res[k] <= 1 for k in cl & set(res) if "rate" in k)
    assert main(["rl", f"init={tmp_path / 'anchor'}", *common]) == 2
    # RL's curve is measured on the split eval.split names (val: where choices are made), test reported at the end
    assert main(["rl", f"init={tmp_path / 'masked'}", f"run_dir={tmp_path / 'rl'}", "eval.split=val", "rl.iters=1", "rl.group=2",
                 "rl.scenes_per_iter=2", "rl.advantage=decoupled", *common]) == 0
    res = json.loads((tmp_path / "rl" / "rl.json").read_text())
    assert res["split"] == "val" and 0 <= res["test_pdms"] <= 1 and (tmp_path / "rl" / "curve.png").exists()
    assert json.loads((tmp_path / "rl" / "planner" / "meta.json").read_text())["metadata"]["advantage"] == "decoupled"


def test_a_policy_that_is_not_a_planner_is_refused(tmp_path):
    from conftest import tiny_policy

    from dpolicy.cli.drive import load_planner
    from dpolicy.policy import save_policy

    d = save_policy(tiny_policy(), tmp_path / "chunk")
    with pytest.raises(CheckpointError, match="not a driving planner"):
        load_planner(d, "cpu")


def test_attention_denoiser_predicts_a_smooth_clean_trajectory_not_a_correction():
    """A residual (x + correction) passes the sampler's noise into the plan, and 16 free outputs make jerky plans:
    the plan is the head's polynomial, whatever x is."""
    from dpolicy.drive.anchor import POLY_DEGREE, AttnDenoiser, from_norm, poly_basis

    torch.manual_seed(0)
    den = AttnDenoiser(d=32, layers=1, heads=4, encoder_layers=1).eval()
    o = _vec_obs(2)
    with torch.no_grad():
        pred, conf = den(torch.randn(2, 5, 16), torch.full((2,), 4.0), den.context(o))
        assert pred.shape == (2, 5, 16) and conf.shape == (2, 5)
        traj = from_norm(pred)                                                       # (2, 5, 8, 2) metres
        basis = poly_basis()
        proj = torch.einsum("ij,bmjc->bmic", basis @ torch.linalg.pinv(basis), traj)
        assert torch.allclose(proj, traj, atol=1e-3)                                 # in the polynomial space
        torch.nn.init.zeros_(den.out[1].weight)
        torch.nn.init.zeros_(den.out[1].bias)
        a, _ = den(torch.randn(2, 5, 16), torch.full((2,), 4.0), den.context(o))
        b, _ = den(torch.randn(2, 5, 16) * 3, torch.full((2,), 4.0), den.context(o))
    assert torch.allclose(from_norm(a), torch.zeros(2, 5, 8, 2), atol=1e-4) and torch.equal(a, b)
    assert basis.shape == (8, POLY_DEGREE)


def test_mlp_polyline_encoder_reads_point_order_and_pointnet_does_not():
    torch.manual_seed(0)
    o = _vec_obs(2)
    flipped = {**o, "map": o["map"].flip(2), "map_valid": o["map_valid"].flip(2)}   # every polyline's points reversed
    for polyline, order_free in (("pointnet", True), ("mlp", False)):
        enc = VectorEncoder(d=32, layers=1, heads=4, polyline=polyline).eval()
        a, v = enc.tokens(o)
        b, _ = enc.tokens(flipped)
        assert torch.allclose(a[v], b[v], atol=1e-5) == order_free
        o2 = {k: t.clone() for k, t in o.items()}
        o2["map"][~o["map_valid"]] = 5.0                                            # garbage where no point exists
        assert torch.allclose(enc.tokens(o2)[0][v], a[v], atol=1e-5)
    with pytest.raises(ConfigError, match="polyline"):
        VectorEncoder(polyline="gnn")
