"""A batched PDMS-like scorer in the spirit of NAVSIM v1 (not NAVSIM's code, not its numbers).

An ego trajectory of 8 poses (4 s at 0.5 s, ego frame) is tracked at 10 Hz by a kinematic bicycle
with a feed-forward + feedback tracking controller; the tracked motion is checked against the
scene's logged (non-reactive) agents and drivable area:

  NC   1 unless an at-fault collision happens (rear-end hits on the ego are not its fault)
  DAC  1 unless an ego corner leaves the drivable area
  TTC  1 unless the ego, projected at constant velocity 0.3/0.6/0.9 s ahead, would collide (at fault)
  C    1 unless acceleration, jerk, yaw rate or yaw acceleration exceed NAVSIM's comfort bounds
  EP   progress along the road, times NC*DAC, over the best progress (the 5 m rule: EP = 1 when the
       best is under 5 m)

  PDMS-like = NC * DAC * (5 EP + 5 TTC + 2 C) / 12

Everything is torch on the scenes' device, batched over scenes B and proposals N.
"""

from __future__ import annotations

import math

import torch

from dpolicy_envs.driving.scenes import DT, EGO_LEN, EGO_WID, HORIZON, S0, STATION_STEP, Scenes, road_points

WHEELBASE = 2.9
MAX_STEER = 0.6
ACC_BOUNDS = (-8.0, 4.0)
# NAVSIM v1 comfort bounds
LON_ACC = (-4.05, 2.40)
LAT_ACC = 4.89
LON_JERK = 4.13
YAW_RATE = 0.95
YAW_ACC = 1.93
N_WAYPOINTS, WAYPOINT_DT = 8, 0.5
PREVIEW = 8       # pure-pursuit preview (steps of 0.1 s)
COMFORT_WINDOW = 11  # moving average (1.1 s) before the comfort bounds, cf. NAVSIM's Savitzky-Golay filter
SUB_SCORES = ("nc", "dac", "ttc", "comfort", "ep")


def _check(scenes: Scenes, traj: torch.Tensor) -> torch.Tensor:
    if not isinstance(traj, torch.Tensor):
        raise TypeError(f"trajectories must be a torch.Tensor, got {type(traj).__name__}.")
    if traj.dim() == 3:
        traj = traj[:, None]
    if traj.dim() != 4 or traj.shape[0] != scenes.batch or traj.shape[2:] != (N_WAYPOINTS, 2):
        raise ValueError(f"trajectories must have shape (B={scenes.batch}, N, 8, 2) or (B, 8, 2), got {tuple(traj.shape)}.")
    if not torch.isfinite(traj).all():
        raise ValueError("trajectories contain NaN or infinite values.")
    return traj.to(scenes.device, torch.float32)


def reference(traj: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
    """Cubic Hermite interpolation of (B, N, 8, 2) waypoints (plus the origin) to (B, N, 41, 2) at 10 Hz."""
    B, N = traj.shape[:2]
    p = torch.cat([traj.new_zeros(B, N, 1, 2), traj], 2)                      # (B,N,9,2)
    m = torch.zeros_like(p)
    m[:, :, 0, 0] = v0[:, None]
    m[:, :, 1:-1] = (p[:, :, 2:] - p[:, :, :-2]) / (2 * WAYPOINT_DT)
    m[:, :, -1] = (p[:, :, -1] - p[:, :, -2]) / WAYPOINT_DT
    k = int(round(WAYPOINT_DT / DT))
    u = torch.arange(k, device=traj.device, dtype=traj.dtype) / k            # (k,)
    h00, h10 = 2 * u**3 - 3 * u**2 + 1, u**3 - 2 * u**2 + u
    h01, h11 = -2 * u**3 + 3 * u**2, u**3 - u**2
    a, b, ma, mb = p[:, :, :-1, None], p[:, :, 1:, None], m[:, :, :-1, None], m[:, :, 1:, None]
    seg = (h00[:, None] * a + h10[:, None] * WAYPOINT_DT * ma + h01[:, None] * b + h11[:, None] * WAYPOINT_DT * mb)
    out = seg.reshape(B, N, -1, 2)
    return torch.cat([out, p[:, :, -1:]], 2)                                  # (B,N,41,2)


def track(traj: torch.Tensor, v0: torch.Tensor) -> dict:
    """Kinematic bicycle following the interpolated reference at 10 Hz.

    Speed: proportional control towards the reference speed 0.2 s ahead. Steering: pure pursuit
    on the reference point 0.8 s ahead (the reference is extended straight past its end). Both act
    as low-pass filters, as NAVSIM's LQR tracker does, so centimetre waypoint noise is not jerk.
    Returns states (B, N, T+1, 4) as x, y, heading, speed and the applied accel / steer (B, N, T).
    """
    ref = reference(traj, v0)                                                 # (B,N,41,2)
    d = ref[:, :, 1:] - ref[:, :, :-1]
    v_ref = d.norm(dim=-1) / DT                                               # (B,N,T)
    B, N, T = v_ref.shape
    ext = ref[:, :, -1:] + d[:, :, -1:] * torch.arange(1, PREVIEW + 1, device=ref.device, dtype=ref.dtype)[:, None]
    ref = torch.cat([ref, ext], 2)
    x = ref.new_zeros(B, N); y = ref.new_zeros(B, N); h = ref.new_zeros(B, N)
    v = v0[:, None].expand(B, N).clone()
    states, accs, steers = [torch.stack([x, y, h, v], -1)], [], []
    for t in range(T):
        a = (1.5 * (v_ref[..., min(t + 2, T - 1)] - v)).clamp(*ACC_BOUNDS)
        tx, ty = ref[..., t + PREVIEW, 0] - x, ref[..., t + PREVIEW, 1] - y
        ld = torch.sqrt(tx * tx + ty * ty)
        alpha = torch.atan2(ty, tx) - h
        steer = torch.atan(2 * WHEELBASE * torch.sin(alpha) / ld.clamp(min=1e-3))
        steer = torch.where(ld > 1.0, steer, torch.zeros_like(steer)).clamp(-MAX_STEER, MAX_STEER)
        x = x + v * torch.cos(h) * DT
        y = y + v * torch.sin(h) * DT
        h = h + v / WHEELBASE * torch.tan(steer) * DT
        v = (v + a * DT).clamp(min=0.0)
        states.append(torch.stack([x, y, h, v], -1)); accs.append(a); steers.append(steer)
    return {"states": torch.stack(states, 2), "acc": torch.stack(accs, 2), "steer": torch.stack(steers, 2)}


def _corners(center: torch.Tensor, heading: torch.Tensor, length, width) -> torch.Tensor:
    """Box corners (..., 4, 2) for centres (..., 2), headings (...), sizes broadcastable to (...)."""
    c, s = torch.cos(heading), torch.sin(heading)
    hl, hw = torch.as_tensor(length, dtype=center.dtype, device=center.device) / 2, torch.as_tensor(width, dtype=center.dtype, device=center.device) / 2
    sx = torch.tensor([1.0, 1.0, -1.0, -1.0], device=center.device)
    sy = torch.tensor([1.0, -1.0, -1.0, 1.0], device=center.device)
    lx, ly = (hl[..., None] * sx), (hw[..., None] * sy)
    return torch.stack([center[..., None, 0] + c[..., None] * lx - s[..., None] * ly,
                        center[..., None, 1] + s[..., None] * lx + c[..., None] * ly], -1)


def boxes_overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Separating-axis test for rectangles given as corners (..., 4, 2); broadcasting over (...)."""
    a, b = torch.broadcast_tensors(a, b)
    axes = torch.cat([a[..., 1:3, :] - a[..., 0:2, :], b[..., 1:3, :] - b[..., 0:2, :]], -2)  # (...,4,2)
    pa = (a[..., None, :, :] * axes[..., :, None, :]).sum(-1)   # (...,4 axes,4 corners)
    pb = (b[..., None, :, :] * axes[..., :, None, :]).sum(-1)
    sep = (pa.max(-1).values < pb.min(-1).values) | (pb.max(-1).values < pa.min(-1).values)
    return ~sep.any(-1)


def _interp_station(values: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Interpolate per-station values (B, P) at stations s (B, ...)."""
    B, P = values.shape
    shape = s.shape
    u = ((s.reshape(B, -1) - S0) / STATION_STEP).clamp(0, P - 1.001)
    i0 = u.floor().long()
    w = u - i0
    out = values.gather(1, i0) * (1 - w) + values.gather(1, i0 + 1) * w
    return out.reshape(shape)


def to_frenet(road: torch.Tensor, pts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Station and signed lateral offset of points (B, M, 2) on the road polyline (B, P, 3)."""
    a, b = road[:, None, :-1, :2], road[:, None, 1:, :2]
    ab = b - a
    q = pts[:, :, None]
    t = (((q - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp(min=1e-9)).clamp(0, 1)
    proj = a + t[..., None] * ab
    dist = (q - proj).norm(dim=-1)
    j = dist.argmin(-1)                                                        # (B, M)
    tj = t.gather(2, j[..., None])[..., 0]
    g = lambda z: z.expand(-1, pts.shape[1], -1, -1).gather(2, j[..., None, None].expand(-1, -1, 1, 2))[:, :, 0]  # noqa: E731
    a_j, ab_j = g(a), g(ab)
    seg_len = ab_j.norm(dim=-1).clamp(min=1e-9)
    rel = pts - a_j
    s = S0 + STATION_STEP * j + tj * seg_len
    d = (ab_j[..., 0] * rel[..., 1] - ab_j[..., 1] * rel[..., 0]) / seg_len
    # extrapolate beyond the polyline's ends along its end segments
    along = (rel * ab_j).sum(-1) / seg_len
    s = torch.where((j == 0) & (along < 0), S0 + along, s)
    s = torch.where((j == road.shape[1] - 2) & (along > seg_len), S0 + STATION_STEP * j + along, s)
    return s, d


def crossing_axis(sc: Scenes) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre (B, 3) of the crossing road where it meets the road (x, y, road heading) and its direction (B,)."""
    mid = ((sc.left + sc.right) / 2).gather(1, ((sc.cross[:, :1] - S0) / STATION_STEP).round().long().clamp(0, sc.road.shape[1] - 1))
    cross_p = road_points(sc.road, sc.cross[:, :1], mid)[:, 0]
    return cross_p, cross_p[:, 2] + math.pi / 2 + sc.cross[:, 3]


def _at_fault(ego: torch.Tensor, agent_xy: torch.Tensor) -> torch.Tensor:
    """True unless the agent is behind the ego in its own lane (a rear-end hit on the ego). ego: (...,4) x,y,h,v."""
    dx, dy = agent_xy[..., 0] - ego[..., 0], agent_xy[..., 1] - ego[..., 1]
    c, s = torch.cos(ego[..., 2]), torch.sin(ego[..., 2])
    lon, lat = c * dx + s * dy, -s * dx + c * dy
    return ~((lon < -1.0) & (lat.abs() < 1.5)) & (ego[..., 3] > 0.05)


def _agent_boxes(sc: Scenes):
    """Logged agent boxes (B, 1, T1, A, 4, 2), centres (B, 1, T1, A, 2) and validity (B, 1, 1, A)."""
    ag = sc.agents                                                            # (B,A,T1,3)
    ag_box = _corners(ag[..., :2], ag[..., 2], sc.agent_size[:, :, None, 0].expand(ag.shape[:3]),
                      sc.agent_size[:, :, None, 1].expand(ag.shape[:3]))      # (B,A,T1,4,2)
    return ag_box.permute(0, 2, 1, 3, 4)[:, None], ag[..., :2].permute(0, 2, 1, 3)[:, None], sc.agent_valid[:, None, None, :]


def _collision_free(sc: Scenes, st: torch.Tensor):
    """Ego boxes (B, N, T1, 4, 2) of the ego states st (B, N, T1, 4) and NC (B, N): 1 unless an at-fault overlap."""
    ego_box = _corners(st[..., :2], st[..., 2], EGO_LEN, EGO_WID)             # (B,N,T1,4,2)
    ag_box_t, ag_xy_t, valid = _agent_boxes(sc)
    hit = boxes_overlap(ego_box[:, :, :, None], ag_box_t) & valid
    fault = _at_fault(st[:, :, :, None, :], ag_xy_t)
    return ego_box, (~(hit & fault).any(-1).any(-1)).float()


def _in_drivable_area(sc: Scenes, st: torch.Tensor, ego_box: torch.Tensor):
    """DAC (B, N): every corner inside the road band (Frenet bounds) or the crossing road's band; and the
    stations (B, N, T1) of the ego centres."""
    B, N, T1 = st.shape[:3]
    centre_s, centre_d = to_frenet(sc.road, st[..., :2].reshape(B, -1, 2))
    centre_s, centre_d = centre_s.reshape(B, N, T1), centre_d.reshape(B, N, T1)
    rp = road_points(sc.road, centre_s, torch.zeros_like(centre_s))          # (B,N,T1,3)
    rel = ego_box - st[..., None, :2]
    tx, ty = torch.cos(rp[..., 2])[..., None], torch.sin(rp[..., 2])[..., None]
    cs = centre_s[..., None] + rel[..., 0] * tx + rel[..., 1] * ty
    cd = centre_d[..., None] + (-rel[..., 0] * ty + rel[..., 1] * tx)
    inside = (cd <= _interp_station(sc.left, cs) + 1e-3) & (cd >= _interp_station(sc.right, cs) - 1e-3)
    cross_p, ang = crossing_axis(sc)
    nx, ny = -torch.sin(ang), torch.cos(ang)
    off = (ego_box[..., 0] - cross_p[:, None, None, None, 0]) * nx[:, None, None, None] + \
          (ego_box[..., 1] - cross_p[:, None, None, None, 1]) * ny[:, None, None, None]
    in_cross = (off.abs() <= sc.cross[:, None, None, None, 1]) & (sc.cross[:, None, None, None, 2] > 0.5)
    return (inside | in_cross).all(-1).all(-1).float(), centre_s


def path_metrics(sc: Scenes, states: torch.Tensor) -> dict:
    """NC, DAC and progress (m along the road) of executed ego states (B, N, T1, 4: x, y, heading, speed at
    10 Hz, T1 = the logged agents' steps) against the scenes' logged agents and drivable area, each (B, N)."""
    ego_box, nc = _collision_free(sc, states)
    dac, centre_s = _in_drivable_area(sc, states, ego_box)
    return {"nc": nc, "dac": dac, "progress": (centre_s[..., -1] - centre_s[..., 0]).clamp(min=0)}


def score(scenes: Scenes, traj: torch.Tensor, best_progress: torch.Tensor | None = None, chunk: int = 64) -> dict:
    """Score trajectories (B, N, 8, 2) (or (B, 8, 2)) in ``scenes``: sub-scores and PDMS-like, each (B, N).

    ``best_progress`` (B,) is the EP normaliser (e.g. the best expert candidate's progress); when
    None, the best of the N proposals themselves is used, as in NAVSIM.
    """
    traj = _check(scenes, traj)
    if best_progress is not None:
        best_progress = torch.as_tensor(best_progress, dtype=torch.float32, device=scenes.device)
        if best_progress.shape != (scenes.batch,) or not torch.isfinite(best_progress).all():
            raise ValueError(f"best_progress must be a finite tensor of shape ({scenes.batch},), got {tuple(best_progress.shape)}.")
    parts = []
    for i in range(0, scenes.batch, chunk):
        sl = slice(i, i + chunk)
        parts.append(_score_chunk(scenes.index(sl), traj[sl], None if best_progress is None else best_progress[sl]))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _score_chunk(sc: Scenes, traj: torch.Tensor, best_progress) -> dict:
    B, N = traj.shape[:2]
    tr = track(traj, sc.ego_v)
    st = tr["states"]                                                         # (B,N,T+1,4)
    T1 = st.shape[2]
    ego_box, nc = _collision_free(sc, st)
    ag_box_t, ag_xy_t, valid = _agent_boxes(sc)

    # TTC: constant-velocity projection of the ego 0.3, 0.6, 0.9 s ahead against the logged agents then
    ttc_ok = torch.ones(B, N, dtype=torch.bool, device=traj.device)
    for k in (3, 6, 9):
        idx = torch.arange(T1, device=traj.device).add(k).clamp(max=T1 - 1)
        fut = st.clone()
        fut[..., 0] = st[..., 0] + st[..., 3] * torch.cos(st[..., 2]) * k * DT
        fut[..., 1] = st[..., 1] + st[..., 3] * torch.sin(st[..., 2]) * k * DT
        fb = _corners(fut[..., :2], fut[..., 2], EGO_LEN, EGO_WID)
        hit_k = boxes_overlap(fb[:, :, :, None], ag_box_t[:, :, idx]) & valid
        fault_k = _at_fault(fut[:, :, :, None, :], ag_xy_t[:, :, idx])
        ttc_ok &= ~(hit_k & fault_k).any(-1).any(-1)
    ttc = ttc_ok.float()

    dac, centre_s = _in_drivable_area(sc, st, ego_box)

    # comfort on the tracked motion (moving average before differentiating)
    acc, steer, v = tr["acc"], tr["steer"], st[..., :-1, 3]
    yaw_rate = v * torch.tan(steer) / WHEELBASE
    lat_acc = v * yaw_rate
    sm = lambda z: torch.nn.functional.avg_pool1d(z.reshape(-1, 1, z.shape[-1]), COMFORT_WINDOW, 1, COMFORT_WINDOW // 2, count_include_pad=False).reshape(z.shape)  # noqa: E731
    acc_s, yaw_s = sm(acc), sm(yaw_rate)
    jerk = (acc_s[..., 1:] - acc_s[..., :-1]) / DT
    yaw_acc = (yaw_s[..., 1:] - yaw_s[..., :-1]) / DT
    comfort = ((acc_s >= LON_ACC[0]) & (acc_s <= LON_ACC[1]) & (sm(lat_acc).abs() <= LAT_ACC)
               & (yaw_s.abs() <= YAW_RATE)).all(-1) & (jerk.abs() <= LON_JERK).all(-1) & (yaw_acc.abs() <= YAW_ACC).all(-1)
    comfort = comfort.float()

    progress = (centre_s[..., -1] - centre_s[..., 0]).clamp(min=0)
    mult = nc * dac
    best = (progress * mult).max(1).values if best_progress is None else torch.maximum(best_progress, (progress * mult).max(1).values)
    ep = torch.where(best[:, None] > 5.0, (progress * mult / best[:, None].clamp(min=1e-6)).clamp(0, 1),
                     torch.where(mult > 0, torch.ones_like(mult), torch.zeros_like(mult)))
    pdms = mult * (5 * ep + 5 * ttc + 2 * comfort) / 12
    return {"nc": nc, "dac": dac, "ttc": ttc, "comfort": comfort, "ep": ep, "progress": progress, "pdms": pdms}
