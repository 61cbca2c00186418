"""Rollouts beyond one process: evaluation throughput per backend and worker count, exact reproducibility across
backends, a worker killed mid-evaluation, and the measured costs a reader needs to size a cluster.

Every evaluation here plays the same seeds with the same shipped checkpoint, so the per-episode results of
the runs can be compared directly: with the policy on the learner, every backend and worker count must give
the local run's results exactly; with a policy copy in each worker (fixed shards), every backend and worker
count must give the local sharded run's results exactly.
"""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np

from dpolicy.bench.report import table
from dpolicy.eval.stats import wilson_interval

CKPT = Path(__file__).resolve().parents[2] / "checkpoints" / "push_diffusion"


def _core(r) -> tuple:
    return tuple(r.seeds), tuple(r.successes), tuple(r.returns), tuple(r.lengths)


def _env_step_cost(env_fn, steps: int = 2000) -> float:
    """Seconds per env step with a fixed in-bounds action (resets excluded)."""
    env = env_fn()
    env.reset(seed=0)
    a = np.zeros(env.action_space.shape, dtype=env.action_space.dtype)
    t0, n = time.perf_counter(), 0
    while n < steps:
        _, _, te, tr, _ = env.step(a)
        n += 1
        if te or tr:
            env.reset(seed=n)
    dt = (time.perf_counter() - t0) / n
    env.close()
    return dt


def _start_cost(env_fn, kind: str) -> float:
    """Seconds from asking for one worker to its first answer (process start, imports, its envs)."""
    from dpolicy.eval.backends import RolloutBackend, make_pool

    t0 = time.perf_counter()
    pool = make_pool(env_fn, [1], RolloutBackend(kind, 1))
    try:
        pool.result(pool.submit(0, "reset", [0], [0]))
        return time.perf_counter() - t0
    finally:
        pool.close()


def rollouts_section(work: Path, log=print, checkpoint: Path = CKPT, episodes: int = 200, n_envs: int = 10,
                     workers=(1, 2), kill_after: int = 50) -> tuple[str, dict]:
    import torch

    from dpolicy.eval import evaluate
    from dpolicy.eval.backends import RolloutBackend, call_overhead, kill_worker_after, ray_init
    from dpolicy.policy import load_policy
    from dpolicy.tasks import env_factory_for

    torch.set_num_threads(1)
    policy = load_policy(str(checkpoint), "cpu")
    env_fn = env_factory_for(policy)
    seed = 100000
    have_ray = True
    try:
        ray_init()
    except Exception as e:  # noqa: BLE001 - reported in the section
        have_ray, ray_reason = False, str(e)
    kinds = ["subprocess"] + (["ray"] if have_ray else [])
    runs: dict[tuple, object] = {}
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    cache_file = work / "rollouts_runs.pkl"  # finished runs, so a rerun of the section redoes only what is missing
    cache = pickle.loads(cache_file.read_bytes()) if cache_file.exists() else {}

    def run(kind, w, placement, hook=None):
        key = (str(checkpoint), episodes, n_envs, kind, w, placement, hook is not None and kill_after)
        if key in cache:
            return cache[key]
        b = RolloutBackend(kind, w, placement=placement)
        t0 = time.perf_counter()
        r = evaluate(policy, env_fn, n_episodes=episodes, n_envs=n_envs, seed=seed, progress=False, backend=b,
                     episode_hook=hook)
        wall = time.perf_counter() - t0
        log(f"rollouts: {kind:10s} placement={placement:7s} workers={w}: {episodes / wall:6.2f} episodes/s, "
            f"success {r.success_rate:.3f}, restarts {r.worker_restarts}")
        cache[key] = (r, wall, getattr(hook, "state", None))
        cache_file.write_bytes(pickle.dumps(cache))
        return cache[key]

    for placement in ("learner", "workers"):
        runs[("local", 1, placement)] = run("local", 1, placement)[:2]
        for kind in kinds:
            for w in workers:
                runs[(kind, w, placement)] = run(kind, w, placement)[:2]

    rows, checks = [], {}
    for placement in ("learner", "workers"):
        ref, ref_wall = runs[("local", 1, placement)]
        same = [k for k in runs if k[2] == placement and _core(runs[k][0]) == _core(ref)]
        checks[placement] = (len(same), sum(1 for k in runs if k[2] == placement))
        for (kind, w, pl), (r, wall) in runs.items():
            if pl != placement:
                continue
            lo, hi = r.success_ci95
            rows.append([kind, pl, w, f"{episodes / wall:.2f}", f"{ref_wall / wall:.2f}x", f"{r.success_rate:.3f} [{lo:.3f}, {hi:.3f}]",
                         "yes" if _core(r) == _core(ref) else "NO"])

    # the kill test: worker 0 is SIGKILLed after kill_after episodes have finished
    kill_rows, kills = [], {}
    for kind in kinds:
        for placement in ("learner", "workers"):
            hook, state = kill_worker_after(kill_after)
            hook.state = state
            r, wall, state = run(kind, 2, placement, hook)
            ref = runs[("local", 1, placement)][0]
            distinct = len(set(r.seeds))
            kills[(kind, placement)] = dict(restarts=r.worker_restarts, distinct=distinct, identical=_core(r) == _core(ref),
                                            success=r.success_rate, ref_success=ref.success_rate, killed_pid=state["pid"])
            kill_rows.append([kind, placement, state["pid"] is not None, r.worker_restarts, f"{distinct} / {episodes}",
                              f"{r.success_rate:.3f}", f"{ref.success_rate:.3f}", "yes" if _core(r) == _core(ref) else "NO"])

    # the costs behind the scaling model, each measured on its own
    ref, ref_wall = runs[("local", 1, "learner")]
    steps_total = int(sum(ref.lengths))
    mean_len = float(np.mean(ref.lengths))
    t_env = _env_step_cost(env_fn)
    overhead = {kind: call_overhead(kind, 1) for kind in kinds}
    start = {kind: _start_cost(env_fn, kind) for kind in kinds}
    sharded_wall = runs[("local", 1, "workers")][1]
    t_episode = sharded_wall / episodes  # one core plays an episode with its own policy copy (policy + env)
    t_learner = max(ref_wall / episodes - mean_len * t_env, 0.0)  # the learner's policy time per episode

    def learner_rate(kind, W):  # episodes/s with the policy on the learner and W workers stepping the slots
        per_step = overhead[kind] + max(1.0, n_envs / W) * t_env
        return 1.0 / (t_learner + mean_len / n_envs * per_step)

    def workers_rate(kind, W):  # episodes/s with a policy copy per worker (start-up once per evaluation)
        return episodes / (start[kind] + episodes * t_episode / W)

    body = ["## Rollouts beyond one process: worker processes and Ray actors (2-core CPU)", "",
            f"Checkpoint `{checkpoint.name}` on its task, {episodes} episodes (seeds {seed}..{seed + episodes - 1}), "
            f"{n_envs} env slots, one torch thread per process. `placement=learner`: the policy runs in the calling "
            f"process, batched over all slots; the envs live in the workers (one round trip per worker per env step). "
            f"`placement=workers`: each worker holds a CPU copy of the policy and plays whole shards of {n_envs} "
            f"episodes. This machine has 2 cores, so 2 workers share them with the driver.",
            "", table(["backend", "placement", "workers", "episodes/s", "vs local", "success [95% CI]",
                        "identical to local"], rows), "",
            f"**Reproducibility check** (the same {episodes} seeds, per-episode success, return and length compared "
            f"exactly): placement=learner {checks['learner'][0]}/{checks['learner'][1]} runs identical to the local run; "
            f"placement=workers {checks['workers'][0]}/{checks['workers'][1]} identical to the local sharded run. The two "
            f"placements differ from each other in the last float bits of some actions (a batched matrix product is not "
            f"bit-identical across batch compositions), which is why each placement is compared with its own local run.",
            "", f"**Kill test**: worker 0 of 2 is SIGKILLed after {kill_after} of {episodes} episodes have finished.", "",
            table(["backend", "placement", "killed", "workers replaced", "distinct seeds", "success", "without kill",
                   "identical per episode"], kill_rows), "",
            "placement=learner replaces the worker and replays each of its slots' episodes from the logged seed and "
            "actions to the step where it died; placement=workers plays the dead worker's shard again, whole, and takes "
            "each shard's records once.", ""]
    body += [table(["cost", "measured"], [
        ["env step (one core)", f"{t_env * 1e3:.3f} ms"], ["mean episode length", f"{mean_len:.1f} steps"],
        ["an episode with its own policy copy, one core (placement=workers, local)", f"{t_episode * 1e3:.1f} ms"],
        ["the learner's batched policy time per episode (placement=learner, local, env time taken out)",
         f"{t_learner * 1e3:.1f} ms"]]
        + [[f"round trip to an idle worker ({kind})", f"{overhead[kind] * 1e3:.3f} ms"] for kind in kinds]
        + [[f"starting a {kind} worker (process, imports, its env)", f"{start[kind]:.2f} s"] for kind in kinds]), ""]
    pred = []
    for kind in kinds:
        for W in (1, 2, 8, 32, 128):
            m_l = runs.get((kind, W, "learner"))
            m_w = runs.get((kind, W, "workers"))
            pred.append([kind, W, f"{learner_rate(kind, W):.2f}", f"{episodes / m_l[1]:.2f}" if m_l else "",
                         f"{workers_rate(kind, W):.2f}", f"{episodes / m_w[1]:.2f}" if m_w else ""])
    body += ["**Sizing a cluster.** With a policy copy per worker, episodes are independent: W workers play "
             f"{episodes} episodes in about (worker start + {episodes} x episode cost / W) seconds, the shard dispatch "
             f"(one round trip per shard of {n_envs} episodes) being negligible, so placement=workers is the one to scale "
             "out (with enough cores: on this machine 2 workers share 2 cores with the driver). With the policy on the "
             "learner, every env step costs one round trip to the slowest worker plus that worker's share of the slots' "
             "stepping, and the learner's batched policy time does not shrink with W: it pays off when an env step "
             "costs more than a round trip (rendered cameras, robosuite) or when the policy must stay on one device "
             "(DSRL's learner), and its ceiling is the learner's policy throughput. The model's predictions beside the "
             "measurements (episodes/s; the W > 2 rows assume one free core per worker):", "",
             table(["backend", "workers W", "learner: predicted", "learner: measured", "workers: predicted",
                    "workers: measured"], pred)]
    if not have_ray:
        body += ["", f"Ray rows missing: {ray_reason}"]
    results = {"runs": {f"{k[0]}/{k[2]}/{k[1]}": {"wall_s": w, "success": r.success_rate} for k, (r, w) in runs.items()},
               "checks": checks, "kills": {f"{a}/{b}": v for (a, b), v in kills.items()},
               "costs": {"env_step_s": t_env, "episode_s": t_episode, "learner_policy_s": t_learner, "overhead_s": overhead,
                         "start_s": start, "steps_total": steps_total}}
    return "\n".join(body), results
