"""Plans in the route's frame: the coordinates, the route-frame tokenizer and the planners that use it."""

import pytest
import torch

from dpolicy.drive.anchor import AnchorDiffusionPlanner
from dpolicy.drive.frenet import ego_relative, from_ego_relative, from_route, route_polyline, to_route
from dpolicy.drive.masked import MaskedTokenPlanner
from dpolicy.drive.tokenizer import TrajectoryTokenizer
from dpolicy.errors import ConfigError, ShapeError
from dpolicy_envs.driving import candidates, road_points


@pytest.fixture(scope="module")
def scenes_set():
    from dpolicy.drive.data import build_set

    return build_set("train", 6, encoder="vector_mlp")


def test_route_centreline_has_zero_offset_and_its_own_station(scenes_set):
    ds = scenes_set
    sc = ds.scenes
    route_d = sc.lane_offsets.gather(1, sc.route_lane[:, None])
    s = torch.tensor([-5.0, 0.0, 12.5, 33.0, 61.0, 90.0]).expand(sc.batch, -1)
    on_lane = road_points(sc.road, s, route_d.expand_as(s))[..., :2]
    sd = to_route(route_polyline(ds.obs), on_lane)
    assert (sd[..., 0] - s).abs().max() < 0.05 and sd[..., 1].abs().max() < 0.05
    # the ego sits at station 0, its offset from the route lane's centreline to the side
    ego = to_route(route_polyline(ds.obs), torch.zeros(sc.batch, 1, 2))[:, 0]
    assert ego[:, 0].abs().max() < 0.05
    assert (ego[:, 1] - (sc.ego_d - route_d[:, 0])).abs().max() < 0.05


def test_route_coordinates_round_trip_every_candidate(scenes_set):
    ds = scenes_set
    frame = route_polyline(ds.obs)
    c = candidates(ds.scenes)                                    # (B, C, 8, 2)
    flat = c.reshape(c.shape[0], -1, 2)
    assert (from_route(frame, to_route(frame, flat)) - flat).abs().max() < 1e-3
    rel = ego_relative(frame, ds.expert)
    assert (from_ego_relative(frame, rel) - ds.expert).abs().max() < 1e-3
    # a plan that holds the route lane's offset is a constant offset in the route frame, however the road bends
    route_d = ds.scenes.lane_offsets.gather(1, ds.scenes.route_lane[:, None])
    s = torch.arange(1, 9.0).expand(ds.n, -1) * 6.0
    keep = road_points(ds.scenes.road, s, (route_d + 0.4).expand_as(s))[..., :2]
    off = to_route(frame, keep)[..., 1]
    assert (off - 0.4).abs().max() < 0.02


def test_route_frame_tokenizer_round_trips_and_holds_the_lane_exactly(scenes_set):
    ds = scenes_set
    tok = TrajectoryTokenizer(frame="route")
    back = tok.decode(tok.encode(ds.expert, ds.obs), ds.obs)
    assert (back - ds.expert).norm(dim=-1).max() < 0.25             # half a bin per coordinate, in metres
    # holding the ego's offset from the route lane: every lateral token is the zero step
    frame = route_polyline(ds.obs)
    origin = to_route(frame, torch.zeros(ds.n, 1, 2))
    sd = torch.stack([torch.arange(1, 9.0).expand(ds.n, -1) * 5.0, torch.zeros(ds.n, 8)], -1) + origin
    ids = tok.encode(from_route(frame, sd), ds.obs).reshape(ds.n, 8, 2)
    zero_y = tok.offsets[1] + round(-tok.lows[1] / tok.res)
    assert (ids[..., 1] == zero_y).all()
    assert tok.config()["frame"] == "route" and "frame" not in TrajectoryTokenizer().config()


def test_route_frame_refuses_what_it_cannot_read(scenes_set):
    tok = TrajectoryTokenizer(frame="route")
    with pytest.raises(ConfigError, match="needs the scenes' observation"):
        tok.encode(scenes_set.expert)
    with pytest.raises(ShapeError, match="map, map_valid"):
        tok.encode(scenes_set.expert, {"route": torch.zeros(6, 16, 2)})
    with pytest.raises(ShapeError, match="6 plans but an observation of 2 scenes"):
        tok.decode(tok.encode(scenes_set.expert, scenes_set.obs), {k: v[:2] for k, v in scenes_set.obs.items()})
    with pytest.raises(ConfigError, match="frame 'road' is unknown"):
        TrajectoryTokenizer(frame="road")
    with pytest.raises(ConfigError, match="frame 'road' is unknown"):
        AnchorDiffusionPlanner(torch.zeros(4, 16), frame="road")
    from dpolicy.cli.common import settings
    from dpolicy.drive.config import DriveConfig

    with pytest.raises(ConfigError, match="model.encoder=flat has none"):
        settings(DriveConfig, {"model": {"encoder": "flat", "frame": "route"}})


def test_route_frame_planner_trains_saves_and_plans_in_its_frame(tmp_path, scenes_set):
    from dpolicy.drive.train import plan, train_token_planner
    from dpolicy.kinds import load_policy

    ds = scenes_set
    torch.manual_seed(0)
    m = MaskedTokenPlanner(TrajectoryTokenizer(frame="route"), d=16, layers=1, heads=2, encoder="vector_mlp",
                           encoder_layers=1)
    losses = train_token_planner(m, ds, steps=30, lr=3e-3)
    assert losses[-1] < losses[0]
    m.save(tmp_path / "route")
    back = load_policy(tmp_path / "route")
    assert back.tok.frame == "route"
    traj = plan(back, ds)
    assert torch.equal(traj, plan(m, ds))
    assert torch.equal(traj, m.tok.decode(m.decode(ds.obs), ds.obs))  # the route-frame reading of its tokens
    # the same tokens read in the ego frame are another path (the road bends, the ego is off the route lane)
    toks = m.tok.encode(ds.expert, ds.obs)
    assert (TrajectoryTokenizer().decode(toks) - ds.expert).norm(dim=-1).max() > 0.5


def test_route_frame_anchor_planner_learns_in_its_frame_and_round_trips(tmp_path, scenes_set):
    from dpolicy.drive.anchor import kmeans, to_norm
    from dpolicy.drive.frenet import to_frame
    from dpolicy.drive.train import plan, train_continuous
    from dpolicy.kinds import load_policy

    ds = scenes_set
    torch.manual_seed(0)
    anchors = kmeans(to_norm(to_frame("route", ds.obs, ds.expert)), 3)
    m = AnchorDiffusionPlanner(anchors, d=16, encoder="vector_mlp", layers=1, heads=2, encoder_layers=1, frame="route")
    losses = train_continuous(m, ds, steps=30, lr=3e-3)
    assert losses[-1] < losses[0]
    m.save(tmp_path / "anchor")
    back = load_policy(tmp_path / "anchor")
    assert back.frame == "route" and back.cfg["frame"] == "route"
    assert torch.equal(plan(back, ds), plan(m, ds))
    assert "frame" not in AnchorDiffusionPlanner(anchors).cfg
