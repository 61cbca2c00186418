"""gym-pusht's PushT (optional extra): evaluation with the metrics LeRobot reports.

The environment itself comes from ``adapters.make_pusht`` (state observation ``{"state": (5,)}`` =
agent xy, block xy, block angle; action = the agent's target position rescaled from [0, 512]^2 to
[-1, 1]^2). gym-pusht's reward is ``clip(coverage / 0.95, 0, 1)`` where coverage is the overlap of the
block with the goal T; it reports ``info["coverage"]`` and ``info["is_success"]`` (coverage > 0.95,
which also terminates the episode); episodes are truncated at 300 steps. LeRobot's evaluation reports
``pc_success`` (share of episodes that succeeded), ``avg_max_reward`` (mean over episodes of the
per-episode maximum reward) and ``avg_sum_reward``; ``evaluate`` computes exactly those, plus the
mean per-episode maximum coverage and env steps/s.

``PushTExpert`` is the scripted expert (``make_expert`` picks it for "pusht" and "pusht_image"): pushing a
T to a pose needs contact planning that a small feedback controller does not do reliably, so it plans
pushes on gym-pusht's own physics (see its docstring). ``random_policy`` and ``hold_policy`` are the
demonstration-free reference floors. Nothing here imports dpolicy.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from .adapters import make_pusht

SUCCESS_COVERAGE = 0.95


def random_policy(seed: int):
    """Uniform random target positions."""
    rng = np.random.default_rng(seed)
    return lambda obs: rng.uniform(-1.0, 1.0, 2).astype(np.float32)


def hold_policy(seed: int):
    """Target = the agent's own position (it stays where it starts)."""
    return lambda obs: (np.asarray(obs["state"][:2], np.float32) / 256.0 - 1.0)


def episode_metrics(rewards, coverages, successes) -> dict:
    """Per-episode summary from the step-wise rewards, coverages and success flags."""
    if len(rewards) == 0:
        raise ValueError("an episode needs at least one step to be scored")
    return {"sum_reward": float(np.sum(rewards)), "max_reward": float(np.max(rewards)),
            "max_coverage": float(np.max(coverages)), "success": bool(np.any(successes)), "length": len(rewards)}


def aggregate(episodes: list[dict]) -> dict:
    """LeRobot's ``pc_success``, ``avg_max_reward``, ``avg_sum_reward`` over per-episode summaries."""
    if not episodes:
        raise ValueError("no episodes to aggregate")
    n = len(episodes)
    succ = sum(e["success"] for e in episodes)
    return {"episodes": n, "successes": int(succ), "pc_success": succ / n,
            "avg_max_reward": float(np.mean([e["max_reward"] for e in episodes])),
            "avg_sum_reward": float(np.mean([e["sum_reward"] for e in episodes])),
            "mean_max_coverage": float(np.mean([e["max_coverage"] for e in episodes])),
            "mean_length": float(np.mean([e["length"] for e in episodes]))}


def evaluate(make_actor: Callable[[int], Callable], episodes: int = 50, seed: int = 100000, env=None,
             max_steps: int | None = None) -> dict:
    """Roll ``make_actor(episode_seed)`` (a callable obs -> action in [-1, 1]^2) out on seeded episodes."""
    if episodes < 1:
        raise ValueError(f"episodes={episodes} must be at least 1")
    own = env is None
    env = make_pusht() if own else env
    per_episode, steps, t0 = [], 0, time.perf_counter()
    try:
        for i in range(episodes):
            obs, _ = env.reset(seed=seed + i)
            actor = make_actor(seed + i)
            rewards, coverages, successes, done = [], [], [], False
            while not done:
                obs, r, term, trunc, info = env.step(actor(obs))
                rewards.append(float(r))
                coverages.append(float(info.get("coverage", 0.0)))
                successes.append(bool(info.get("is_success", False)))
                done = term or trunc or (max_steps is not None and len(rewards) >= max_steps)
            steps += len(rewards)
            per_episode.append(episode_metrics(rewards, coverages, successes))
    finally:
        if own:
            env.close()
    out = aggregate(per_episode)
    out["steps_per_s"] = steps / (time.perf_counter() - t0)
    out["per_episode"] = per_episode
    return out


# -- scripted expert -------------------------------------------------------------------------------------
AGENT_RADIUS = 15.0
GOAL_POSE = (256.0, 256.0, np.pi / 4)        # gym-pusht's goal pose of the T's body frame
T_RECTS = np.array([[-60.0, 0.0, 60.0, 30.0], [-15.0, 30.0, 15.0, 120.0]])   # the T in its body frame
T_KEYPOINTS = np.array([[x, y] for x0, y0, x1, y1 in T_RECTS for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))])
T_COG = np.array([0.0, 45.0])
ARENA = (5.0 + 2.0 + AGENT_RADIUS + 1.0, 506.0 - 2.0 - AGENT_RADIUS - 1.0)   # agent centre inside the walls
# the T's outline as (start, end, outward normal), counter-clockwise
_OUTLINE = [((-60, 0), (60, 0), (0, -1)), ((60, 0), (60, 30), (1, 0)), ((60, 30), (15, 30), (0, 1)),
            ((15, 30), (15, 120), (1, 0)), ((15, 120), (-15, 120), (0, 1)), ((-15, 120), (-15, 30), (-1, 0)),
            ((-15, 30), (-60, 30), (0, 1)), ((-60, 30), (-60, 0), (-1, 0))]


def _rot(th):
    c, s = np.cos(th), np.sin(th)
    return np.array([[c, -s], [s, c]])


def t_distance(p):
    """Distance from body-frame points (..., 2) to the T (0 inside it)."""
    p = np.asarray(p, np.float64)
    out = np.inf
    for x0, y0, x1, y1 in T_RECTS:
        dx = np.maximum(np.maximum(x0 - p[..., 0], p[..., 0] - x1), 0.0)
        dy = np.maximum(np.maximum(y0 - p[..., 1], p[..., 1] - y1), 0.0)
        out = np.minimum(out, np.hypot(dx, dy))
    return out


def keypoint_error(pose, goal=GOAL_POSE) -> float:
    """Mean distance (pixels) between the T's eight corners at ``pose`` and at ``goal`` (x, y, angle)."""
    a = np.asarray(pose[:2]) + T_KEYPOINTS @ _rot(pose[2]).T
    b = np.asarray(goal[:2]) + T_KEYPOINTS @ _rot(goal[2]).T
    return float(np.linalg.norm(a - b, axis=1).mean())


def _contact_points(spacing: float, standoff: float):
    """Body-frame contact points and outward normals on the T's outline (edges every ``spacing`` pixels and
    the convex corners along their bisectors) whose pre-push position ``standoff`` off the surface is free."""
    pts, nrm = [], []
    for a, b, n in _OUTLINE:
        a, b = np.asarray(a, float), np.asarray(b, float)
        k = max(1, int(np.linalg.norm(b - a) // spacing))
        for t in (np.arange(k) + 0.5) / k:
            pts.append(a + t * (b - a))
            nrm.append(np.asarray(n, float))
    for i, (a, _, n) in enumerate(_OUTLINE):
        prev = np.asarray(_OUTLINE[i - 1][2], float)
        n = np.asarray(n, float)
        if np.cross(prev, n) > 0:   # convex corner (the outline turns left)
            pts.append(np.asarray(a, float))
            nrm.append((prev + n) / np.linalg.norm(prev + n))
    pts, nrm = np.array(pts), np.array(nrm)
    free = t_distance(pts + nrm * (AGENT_RADIUS + standoff)) >= AGENT_RADIUS + standoff - 0.5
    return pts[free], nrm[free]


class PushTExpert:
    """Push-primitive planner on gym-pusht's own physics (reads the simulator's state, so it drives the pixel
    task too).

    At each decision it simulates, in a private copy of the physics, every push from a set of contact points
    on the T's outline (the agent starts ``standoff`` pixels off the surface and moves its target along the
    inward normal by one of ``distances`` pixels past contact) and scores the block's final pose by the mean
    distance of the T's corners to the goal's (``keypoint_error``) plus ``approach_cost`` per pixel the agent
    must travel to that start. If the agent is already at the best start it pushes; otherwise it walks there
    on a collision-free way (a visibility graph over two rings around the T) and decides again on arrival.
    Targets advance at most ``approach_speed`` / ``push_speed`` pixels per step, so actions are smooth.
    Measured on seeds 100000-100099: 95% success, mean max coverage 0.959, ~4.4 s per episode on one CPU core.
    """

    def __init__(self, env, noise_std: float = 0.0, seed=None, distances=(3.0, 8.0, 16.0, 30.0, 50.0),
                 spacing: float = 10.0, standoff: float = 5.0, approach_speed: float = 25.0, push_speed: float = 10.0,
                 approach_cost: float = 0.03, margin: float = 5.0):
        if not (isinstance(noise_std, (int, float)) and np.isfinite(noise_std) and noise_std >= 0):
            raise ValueError(f"noise_std={noise_std!r} must be a finite number >= 0")
        self.env, self.noise_std, self.rng = env, float(noise_std), np.random.default_rng(seed)
        self.distances = np.asarray(distances, np.float64)
        self.standoff, self.approach_speed, self.push_speed = float(standoff), float(approach_speed), float(push_speed)
        self.approach_cost, self.margin = float(approach_cost), float(margin)
        self.points, self.normals = _contact_points(spacing, self.standoff)
        self._sandbox = None
        self.plan, self.hold = [], 0

    # -- episode interface -----------------------------------------------------------------------------
    def reset(self, obs=None, info=None):
        self.plan, self.hold = [], 0

    def __call__(self, obs):
        s = self.env.unwrapped.get_state()
        if not self.plan:
            self.plan = self._decide(s)
        target = self.plan[0]
        if len(self.plan) > 1:
            self.plan.pop(0)
        else:   # the last target of an approach is held until the agent has arrived (and stopped)
            self.hold += 1
            if self.hold >= 8 or (np.linalg.norm(s[:2] - target) < 1.5 and np.linalg.norm(s[5:7]) < 15.0):
                self.plan, self.hold = [], 0
        a = np.asarray(target, np.float64) / 256.0 - 1.0
        if self.noise_std > 0:
            a = a + self.rng.normal(0.0, self.noise_std, a.shape)
        return np.clip(a, -1.0, 1.0).astype(np.float32)

    # -- planning --------------------------------------------------------------------------------------
    def _decide(self, s):
        """The next stretch of targets: a push when the agent is at the best push's start, else the way there."""
        pos, th = s[2:4], s[4]
        rot = _rot(th)
        starts = pos + (self.points + self.normals * (AGENT_RADIUS + self.standoff)) @ rot.T
        dirs = -self.normals @ rot.T
        inside = np.all((starts >= ARENA[0]) & (starts <= ARENA[1]), axis=1)
        err0 = keypoint_error(s[2:5])
        best, best_cost = None, np.inf
        for i in np.flatnonzero(inside):
            travel = np.linalg.norm(starts[i] - s[:2])
            for d in self.distances:
                targets = self._push_targets(starts[i], dirs[i], d)
                err = keypoint_error(self._simulate(s, starts[i], targets))
                cost = err + self.approach_cost * travel + (0.0 if err < err0 - 0.05 else 1e6)
                if cost < best_cost:
                    best, best_cost = (i, targets), cost
        if best is None:   # the block is pinned in a corner with no free start: back away towards the centre
            return [s[:2] + 20.0 * (np.array([256.0, 256.0]) - s[:2]) / max(np.linalg.norm(256.0 - s[:2]), 1e-6)]
        i, targets = best
        if np.linalg.norm(starts[i] - s[:2]) < 2.0 and np.linalg.norm(s[5:7]) < 15.0:
            return targets
        return self._approach(s, starts[i])

    def _push_targets(self, start, direction, distance):
        travel = self.standoff + distance
        n = int(np.ceil(travel / self.push_speed))
        steps = [start + direction * min(k * self.push_speed, travel) for k in range(1, n + 1)]
        return steps + [steps[-1]] * 2

    def _simulate(self, s, agent_start, targets):
        """The block's pose (x, y, angle) after the agent, at rest at ``agent_start``, follows ``targets``."""
        sb = self._sandbox
        if sb is None:
            from .pusht_sim import PushTStateEnv

            u = self.env.unwrapped
            sb = self._sandbox = PushTStateEnv(obs_type="state", block_cog=u.block_cog, damping=u.damping)
            sb._setup()
        state = s.copy()
        state[0:2], state[5:] = agent_start, 0.0
        sb.set_state(state)
        agent, space, dt, kp, kv = sb.agent, sb.space, sb.dt, sb.k_p, sb.k_v
        n_sub = int(1 / (sb.dt * sb.control_hz))
        for t in targets:
            tx, ty = float(t[0]), float(t[1])
            for _ in range(n_sub):
                (px, py), (vx, vy) = agent.position, agent.velocity
                agent.velocity = (vx + (kp * (tx - px) - kv * vx) * dt, vy + (kp * (ty - py) - kv * vy) * dt)
                space.step(dt)
        b = sb.block
        return (b.position[0], b.position[1], b.angle)

    def _approach(self, s, goal):
        """Targets along the shortest collision-free way from the agent to ``goal`` (world frame)."""
        pos, rot = s[2:4], _rot(s[4])
        to_body = lambda p: (np.asarray(p) - pos) @ rot   # noqa: E731  (world -> body frame)
        clear = AGENT_RADIUS + self.margin
        start = s[:2].copy()
        d0 = float(t_distance(to_body(start)))
        if d0 < clear:   # touching the block (after a push): step straight away from it first
            eps = 0.5
            g = np.array([t_distance(to_body(start + [eps, 0])) - t_distance(to_body(start - [eps, 0])),
                          t_distance(to_body(start + [0, eps])) - t_distance(to_body(start - [0, eps]))])
            g = g / max(np.linalg.norm(g), 1e-9)
            start = start + g * (clear + 1.0 - d0)
        cog = pos + rot @ T_COG
        ang = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        ring = np.concatenate([cog + r * np.stack([np.cos(ang), np.sin(ang)], 1) for r in (100.0, 125.0)])
        ring = ring[np.all((ring >= ARENA[0]) & (ring <= ARENA[1]), axis=1)]
        nodes = np.concatenate([[start], [goal], ring])
        n = len(nodes)
        ii, jj = np.triu_indices(n, 1)
        t = np.linspace(0.0, 1.0, 48)
        seg = nodes[ii, None, :] + t[None, :, None] * (nodes[jj] - nodes[ii])[:, None, :]
        ok = (t_distance(to_body(seg.reshape(-1, 2))).reshape(seg.shape[:2]) >= clear - 0.5).all(1)
        w = np.full((n, n), np.inf)
        length = np.linalg.norm(nodes[jj] - nodes[ii], axis=1)
        w[ii[ok], jj[ok]] = w[jj[ok], ii[ok]] = length[ok]
        # Dijkstra from node 0 to node 1
        dist, prev, done = np.full(n, np.inf), np.full(n, -1), np.zeros(n, bool)
        dist[0] = 0.0
        while not done[1]:
            open_dist = np.where(done, np.inf, dist)
            k = int(np.argmin(open_dist))
            if not np.isfinite(open_dist[k]):
                break
            done[k] = True
            better = dist[k] + w[k] < dist
            dist[better], prev[better] = dist[k] + w[k][better], k
        if not np.isfinite(dist[1]):   # no free way: go straight (the next decision sees what happened)
            way = [s[:2], start, goal]
        else:
            path = [1]
            while path[-1] != 0:
                path.append(int(prev[path[-1]]))
            way = [s[:2]] + [nodes[k] for k in path[::-1]]
        return _resample(np.array(way), self.approach_speed)


def _resample(way, step):
    """Points every ``step`` pixels along the polyline ``way``, without its first point, ending at its last."""
    seg = np.linalg.norm(np.diff(way, axis=0), axis=1)
    total = float(seg.sum())
    if total < 1e-9:
        return [way[-1].copy()]
    at = np.append(np.arange(step, total, step), total)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    out = []
    for a in at:
        k = min(int(np.searchsorted(cum, a, side="right")) - 1, len(seg) - 1)
        f = (a - cum[k]) / max(seg[k], 1e-9)
        out.append(way[k] + f * (way[k + 1] - way[k]))
    return out
