"""The deployment benchmark (issue 5): RTI warm-started control against chunked execution.

* ``rti_success_section``: per checkpoint, success over ``episodes`` seeded episodes (Wilson CI) of
  RTI with K' in {1, 2, 3, 5, 10, full} and of chunked execution with the policy's own schedule
  (DDIM-10 for the diffusion checkpoints, Euler-10 for flow), all on the same episodes, plus the
  batch-1 CPU latency of each configuration and a success-vs-latency plot.
* ``latency_section``: batch-1 CPU observation-to-action latency (p50/p90/p99), measured side by
  side in one process, episodes interleaved across configurations: RTI, chunked DDIM-10, chunked
  DDPM-100, the same DDIM-10 through the library's eager ``sample_normalized``, and a loop over
  diffusers' ``DDIMScheduler`` with the same network (how Diffusion Policy and LeRobot sample).
* ``gpu_latency_section``: p50 per decision on a CUDA device with the decision step graph-captured.

Every configuration runs in the same fixed-rate loop harness (``dpolicy.deploy.run_loop``, not
sleeping, deadlines judged against the env's period) with each episode's first full solve primed
before the clock starts, so a decision's latency is what a running robot waits for. Functions
return markdown bodies (``report.write_section`` adds the command and machine) and a results dict.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dpolicy.bench.report import table

KS = (1, 2, 3, 5, 10, "full")


# -- helpers ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def torch_threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def default_discrete(policy) -> dict | None:
    """Lift's gripper (the last action entry) gets the remedy the policy was trained for: ``scale`` when
    its ``action_scale`` shrinks that dimension, else ``clip``. Other tasks have no discrete dimension."""
    env_name = str((policy.metadata.get("env_args") or {}).get("env_name", ""))
    if "Lift" not in env_name:
        return None
    scale = getattr(policy.cfg, "action_scale", None)
    return {-1: "scale" if scale is not None and scale[-1] < 1 else "clip"}


def schedule_name(policy, sampler: str | None = None, steps: int | None = None) -> str:
    sampler = (sampler or policy.cfg.process.sampler).upper()
    return f"{sampler}-{steps or policy.cfg.process.steps}"


def checkpoint_label(checkpoint) -> str:
    """A checkpoint's display name: its directory, or the run's for a run's ``checkpoints`` root."""
    p = Path(str(checkpoint))
    return p.parent.name if p.name in ("checkpoints", "model", "latest") else p.name


def _env_fn(policy):
    from dpolicy.tasks import env_factory

    args = policy.metadata.get("env_args")
    if args is None:
        from dpolicy.errors import ConfigError

        raise ConfigError("the checkpoint stores no env_args; the benchmark needs its task.")
    return env_factory(args)


class DiffusersDDIMLoop:
    """A stand-in for the policy whose full solve is a loop over diffusers' ``DDIMScheduler``, as in
    Diffusion Policy's ``conditional_sample`` (``set_timesteps`` each call, ``net`` then ``scheduler.step``
    per step), with the same network, levels, cosine betas, clipping and prediction type. Everything
    else (observation encoding, normalization) is the policy's, so the two differ only in the loop."""

    def __init__(self, policy, steps: int = 10):
        from diffusers import DDIMScheduler

        from dpolicy.process import Diffusion

        if not isinstance(policy.process, Diffusion):
            raise TypeError("the diffusers loop needs a diffusion policy.")
        p = policy.process
        self._policy, self._steps, self._K = policy, int(steps), p.K
        self.scheduler = DDIMScheduler(num_train_timesteps=p.K, beta_schedule="squaredcos_cap_v2",
                                       clip_sample=p.clip_sample, set_alpha_to_one=True, steps_offset=0,
                                       prediction_type="epsilon" if p.prediction == "epsilon" else "sample")

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def sample_normalized(self, cond, noise=None, steps=None, generator=None, t_start: float = 1.0):
        s = self.scheduler
        s.set_timesteps(steps or self._steps)
        x = noise
        for t in s.timesteps:
            tt = torch.full((x.shape[0],), float(t) * 100.0 / self._K, device=x.device)  # the network's time scale
            x = s.step(self._policy.net(x, tt, cond), t, x, generator=generator).prev_sample
        return x


def _loop_stats(reports) -> dict:
    """Pool several ``LoopReport``s (kept latencies) into one set of statistics."""
    from dpolicy.deploy.loop import percentiles
    from dpolicy.eval.stats import wilson_interval

    lat = [v for r in reports for v in r.latencies_ms]
    cpu = [v for r in reports for v in r.cpu_latencies_ms]
    nfe = [v for r in reports for v in r.nfe]
    misses = sum(r.deadline_misses for r in reports)
    succ = sum(sum(r.successes) for r in reports)
    eps = sum(r.episodes for r in reports)
    return {"latency_ms": percentiles(lat), "cpu_ms": percentiles(cpu), "decisions": len(lat),
            "nfe_per_decision": float(np.mean(nfe)) if nfe else 0.0,
            "nfe_max": int(max(nfe, default=0)), "deadline_misses": int(misses), "period_ms": reports[0].period_ms,
            "success_rate": succ / max(eps, 1), "success_ci95": list(wilson_interval(int(succ), eps)), "episodes": eps}


def measure_latency(policy, configs: dict, episodes: int = 10, seed: int = 100000, env_fn=None, log=print) -> dict:
    """Batch-1 loop latency of each ``name -> (policy_like, controller kwargs)``, episodes interleaved."""
    from dpolicy.deploy import Controller, run_loop

    env_fn = env_fn or _env_fn(policy)
    env = env_fn()
    ctrls = {name: Controller(pol, seed=seed, **kw) for name, (pol, kw) in configs.items()}
    reports: dict[str, list] = {name: [] for name in configs}
    try:
        for name, c in ctrls.items():  # warm-up: first calls allocate, build kernels, fault pages in
            run_loop(c, env, episodes=1, seed=seed - 1, realtime=False, max_steps=20)
        for ep in range(episodes):
            for name, c in ctrls.items():
                reports[name].append(run_loop(c, env, episodes=1, seed=seed + ep, realtime=False, keep_latencies=True))
    finally:
        env.close()
    out = {}
    for name, reps in reports.items():
        out[name] = {**_loop_stats(reps), "controller": ctrls[name].describe()}
        lat = out[name]["latency_ms"]
        log(f"[latency] {name}: p50 {lat['p50']:.3f} ms, p99 {lat['p99']:.3f} ms, "
            f"{out[name]['nfe_per_decision']:.2f} NFE/decision")
    return out


# -- (a) success across K' -------------------------------------------------------------------------------
def rti_success_section(checkpoints: Sequence, episodes: int = 200, n_envs: int = 20, ks: Sequence = KS,
                        seed: int = 100000, latency_episodes: int = 5, plot_path: str | Path | None = None,
                        renoise: bool = True, threads: int = 1, log=print) -> tuple[str, dict]:
    """Success of RTI for each K' in ``ks`` vs chunked execution with the policy's own schedule, per checkpoint."""
    from dpolicy.deploy import evaluate_controller
    from dpolicy.policy import load_policy

    results: dict = {}
    rows, series = [], []
    notes = []
    with torch_threads(threads):
        for ckpt in checkpoints:
            policy = load_policy(ckpt, "cpu")
            name = checkpoint_label(ckpt)
            env_fn = _env_fn(policy)
            discrete = default_discrete(policy)
            base = f"chunked {schedule_name(policy)}"
            configs = {base: dict(mode="chunked", discrete=discrete)}
            for k in ks:
                configs[f"RTI K'={k}"] = dict(mode="rti", k=k, renoise=renoise, discrete=discrete)
            res = {}
            for label, kw in configs.items():
                r = evaluate_controller(policy, env_fn, n_episodes=episodes, n_envs=n_envs, seed=seed, **kw)
                res[label] = {"success_rate": r.success_rate, "success_ci95": list(r.success_ci95),
                              "nfe_per_action": r.policy_calls / max(sum(r.lengths), 1), "mean_length": r.mean_length}
                log(f"[rti] {name} {label}: success {r.success_rate:.3f} {tuple(round(v, 3) for v in r.success_ci95)}")
            lat = measure_latency(policy, {label: (policy, kw) for label, kw in configs.items()},
                                  episodes=latency_episodes, seed=seed + 50_000, env_fn=env_fn, log=lambda *_: None)
            xs, ys, cis = [], [], []  # RTI points; the chunked baseline is its own one-point series
            b = res[base]["success_rate"]
            for label in configs:
                r, lt = res[label], lat[label]
                r.update(latency_p50_ms=lt["latency_ms"]["p50"], latency_p99_ms=lt["latency_ms"]["p99"],
                         nfe_per_decision=lt["nfe_per_decision"])
                lo, hi = r["success_ci95"]
                rows.append([name, label, f"{r['nfe_per_decision']:.2f}", f"{r['latency_p50_ms']:.3f}",
                             f"{r['latency_p99_ms']:.3f}", f"{r['success_rate']:.3f}", f"[{lo:.3f}, {hi:.3f}]",
                             "" if label == base else f"{100 * (r['success_rate'] - b):+.1f}"])
                if label == base:
                    series.append((f"{name}: {base}", [r["latency_p99_ms"]], [r["success_rate"]], [(lo, hi)]))
                else:
                    xs.append(r["latency_p99_ms"])
                    ys.append(r["success_rate"])
                    cis.append((lo, hi))
            series.append((f"{name}: RTI K' = {', '.join(str(k) for k in ks)}", xs, ys, cis))
            for lbl, r in res.items():
                if lbl != base and r["nfe_per_decision"] <= 3.0 + 1e-9:
                    gap = 100 * (b - r["success_rate"])
                    notes.append(f"`{name}` {lbl} ({r['nfe_per_decision']:.2f} evaluations per decision): "
                                 f"{r['success_rate']:.3f} vs {b:.3f} for {base} ({-gap:+.1f} points; "
                                 f"{'within' if gap <= 3.0 else 'NOT within'} 3 points)")
            results[name] = {"discrete": discrete, "configs": res, "checkpoint": str(ckpt)}
    body = (f"## Deployment: RTI warm-started control vs chunked execution, success ({episodes} episodes)\n\n"
            f"Same seeded episodes for every row. RTI executes one action per decision; K' is the number of network "
            f"evaluations per decision (timesteps [K'-1, ..., 0] of 100 levels; full = all 100), the shifted chunk "
            f"{'re-noised to the first timestep' if renoise else 'fed in without re-noising'}; the first decision of an "
            f"episode is a full solve. Chunked executes Ta actions per full solve. Latency: batch 1, CPU, {threads} "
            f"thread(s), first solve primed before the clock, {latency_episodes} episodes per row. Lift's gripper uses "
            f"the remedy its checkpoint was trained for (scale if policy.action_scale shrinks it, else clip).\n\n")
    body += table(["checkpoint", "controller", "NFE / decision", "p50 ms", "p99 ms", "success", "95% CI (Wilson)",
                   "vs chunked (points)"], rows)
    if notes:
        body += "\n\n" + "\n".join(f"- {n}" for n in notes)
    if plot_path is not None and series:
        from dpolicy.eval import plot_success_vs

        plot_success_vs([s[1] for s in series], [s[2] for s in series], [s[3] for s in series],
                        "p99 observation-to-action latency (ms, batch 1, CPU)", plot_path,
                        labels=[s[0] for s in series], title="success vs worst-case latency", logx=True)
        body += f"\n\n![success vs latency]({Path(plot_path).as_posix()})"
        results["plot"] = str(plot_path)
    return body, results


# -- (b) side-by-side latency ------------------------------------------------------------------------------
def latency_section(checkpoint, k: int = 3, episodes: int = 20, seed: int = 100000, threads: int = 1,
                    renoise: bool = True, log=print) -> tuple[str, dict]:
    """Batch-1 CPU latency of RTI vs chunked DDIM-10, DDPM-100, the eager library loop and diffusers' DDIM loop."""
    from dpolicy.policy import load_policy
    from dpolicy.process import Diffusion

    with torch_threads(threads):
        policy = load_policy(checkpoint, "cpu")
        discrete = default_discrete(policy)
        diffusion = isinstance(policy.process, Diffusion)
        rti = f"RTI K'={k}"
        own = schedule_name(policy)
        configs = {rti: (policy, dict(mode="rti", k=k, renoise=renoise, discrete=discrete))}
        if diffusion:
            configs["chunked DDIM-10"] = (policy, dict(mode="chunked", sampler="ddim", steps=10, discrete=discrete))
            configs["chunked DDPM-100"] = (policy, dict(mode="chunked", sampler="ddpm", steps=100, discrete=discrete))
        else:
            configs[f"chunked {own}"] = (policy, dict(mode="chunked", discrete=discrete))
        configs[f"chunked {own}, eager sample_normalized"] = (policy, dict(mode="chunked", fast=False, discrete=discrete))
        diffusers_note = "not applicable (flow policy)"
        if diffusion:
            try:
                import diffusers

                configs["chunked diffusers DDIMScheduler-10 loop"] = (DiffusersDDIMLoop(policy, 10),
                                                                     dict(mode="chunked", steps=10, discrete=discrete))
                diffusers_note = f"diffusers {diffusers.__version__}"
            except ImportError:
                diffusers_note = "not installed (pip install diffusers)"
        stats = measure_latency(policy, configs, episodes=episodes, seed=seed, log=log)
    ref, ref_cpu = stats[rti]["latency_ms"], stats[rti]["cpu_ms"]
    rows = []
    for name, s in stats.items():
        lat, cpu = s["latency_ms"], s["cpu_ms"]
        lo, hi = s["success_ci95"]
        rows.append([name, f"{s['nfe_per_decision']:.2f}", s["nfe_max"], f"{lat['p50']:.3f}", f"{lat['p90']:.3f}",
                     f"{lat['p99']:.3f}", f"{lat['max']:.3f}",
                     "1" if name == rti else f"{lat['p99'] / ref['p99']:.1f}x", f"{cpu['p99']:.3f}",
                     "1" if name == rti else f"{cpu['p99'] / ref_cpu['p99']:.1f}x",
                     f"{s['deadline_misses']}/{s['decisions']}", f"{s['success_rate']:.2f} [{lo:.2f}, {hi:.2f}]"])
    name = checkpoint_label(checkpoint)
    body = (f"## Deployment latency: batch 1, CPU, {threads} thread(s), `{name}`\n\n"
            f"Observation-to-action time per control decision in the fixed-rate loop harness, {episodes} episodes per "
            f"configuration, interleaved episode by episode in one process (same network, same episodes); each "
            f"episode's first full solve is primed before the clock. Chunked rows spend their whole solve on one "
            f"decision in Ta and almost nothing on the others, so their p99 is the solve time. Deadline misses are "
            f"against the env's control period ({stats[rti]['period_ms']:.0f} ms). The CPU-time columns count only the "
            f"controller thread's own CPU time (preemption by other processes excluded). diffusers: {diffusers_note}.\n\n")
    body += table(["controller", "NFE / decision", "max NFE", "p50 ms", "p90 ms", "p99 ms", "max ms",
                   f"p99 / p99 of {rti}", "CPU-time p99 ms", "CPU-time ratio", "deadline misses", "success"], rows)
    checks = []
    for other, factor in (("chunked DDIM-10", 3.0), ("chunked DDPM-100", 20.0)):
        if other in stats:
            r = stats[other]["latency_ms"]["p99"] / ref["p99"]
            rc = stats[other]["cpu_ms"]["p99"] / ref_cpu["p99"]
            checks.append(f"- p99 of {other} / p99 of {rti}: {r:.1f}x wall clock, {rc:.1f}x CPU time (goal at least "
                          f"{factor:g}x: {'met' if r >= factor else 'NOT met'} on the wall clock)")
    if checks:
        body += "\n\n" + "\n".join(checks)
    return body, {"checkpoint": str(checkpoint), "k": k, "threads": threads, "configs": stats, "diffusers": diffusers_note}


# -- (c) GPU ------------------------------------------------------------------------------------------------
def gpu_latency_section(checkpoint, k: int = 3, decisions: int = 2000, seed: int = 0, log=print) -> tuple[str, dict]:
    """p50/p99 per RTI decision on CUDA, graph-captured vs eager; says so when there is no GPU."""
    if not torch.cuda.is_available():
        return "## Deployment latency on GPU\n\nNo CUDA device in this run; not measured.\n", {}
    import time

    from dpolicy.deploy import Controller
    from dpolicy.deploy.loop import percentiles
    from dpolicy.policy import load_policy

    policy = load_policy(checkpoint, "cuda")
    rng = np.random.default_rng(seed)
    obs = [{k_: rng.normal(size=d).astype(np.float32) for k_, d in policy.cfg.obs_dims.items()} for _ in range(64)]
    rows, res = [], {}
    for label, kw in {"RTI, CUDA graph": dict(cuda_graph=True), "RTI, eager": dict(cuda_graph=False),
                      "chunked, CUDA graph": dict(mode="chunked", cuda_graph=True)}.items():
        kw = {"mode": "rti", "k": k, **kw}
        c = Controller(policy, seed=seed, discrete=default_discrete(policy), **kw)
        for i in range(50):  # warm-up and capture
            c.step(obs[i % len(obs)])
        lat = []
        for i in range(decisions):
            t0 = time.perf_counter()
            c.step(obs[i % len(obs)])
            lat.append((time.perf_counter() - t0) * 1e3)
        p = percentiles(lat)
        res[label] = p
        rows.append([label, f"{p['p50']:.3f}", f"{p['p99']:.3f}"])
        log(f"[gpu] {label}: p50 {p['p50']:.3f} ms")
    dev = torch.cuda.get_device_name(0)
    body = (f"## Deployment latency on GPU ({dev})\n\nBatch 1, `{checkpoint_label(checkpoint)}`, K'={k}, {decisions} "
            f"decisions (observation in from host memory, action back to host included).\n\n")
    body += table(["controller", "p50 ms", "p99 ms"], rows)
    ok = res["RTI, CUDA graph"]["p50"] < 1.0
    body += f"\n\nGoal p50 < 1 ms with graph capture: {'met' if ok else 'not met'}."
    return body, {"device": dev, **res}
