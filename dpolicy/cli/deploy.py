"""``dpolicy-deploy``: run a checkpoint as a controller (chunked, RTI, or asynchronous with a strategy for
chunk switches) in a fixed-rate control loop on its task; writes metrics.json (latency percentiles, deadline misses, network evaluations per
decision, success) into the hydra run directory, optionally with the exported decision step."""

from __future__ import annotations

import json

import hydra

from dpolicy.cli.common import CONFIG_DIR, checked, device, run_dir, settings, user_errors
from dpolicy.errors import ConfigError


@user_errors
def _run(cfg) -> dict:
    import torch

    from dpolicy.config import RECIPE_KEYS, DeployConfig, task_name
    from dpolicy.deploy import Controller, evaluate_controller, run_loop
    from dpolicy.policy import load_policy
    from dpolicy.tasks import env_factory, policy_env_args
    from dpolicy.train.bc import check_env_compat

    c = settings(DeployConfig, cfg, drop=RECIPE_KEYS)
    if c.threads is not None:
        torch.set_num_threads(c.threads)
    dev = device(c.device)
    policy = load_policy(c.checkpoint, dev)
    env_args = policy_env_args(policy, f"checkpoint {c.checkpoint!r} stores no env_args; pass task=<name>.",
                               task_name(c.task), c.env_kwargs)
    make_env = env_factory(env_args)
    probe = make_env()
    check_env_compat(probe, policy)
    probe.close()

    if c.mode == "async":
        return _run_async(c, policy, make_env, env_args)
    kw = dict(mode=c.mode, k=c.k, timesteps=c.timesteps, steps=c.steps, sampler=c.sampler, renoise=c.renoise,
              execute=c.execute, discrete=c.discrete)
    ctrl = Controller(policy, seed=c.seed, compile=c.compile, cuda_graph=c.cuda_graph, **kw)
    out = run_dir()
    metrics = {"checkpoint": str(c.checkpoint), "env_args": env_args, "controller": ctrl.describe(),
               "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
               "threads": torch.get_num_threads()}
    if c.export:
        metrics["export"] = str(ctrl.export(c.export, kind="warm" if c.mode == "rti" else "cold"))
    report = run_loop(ctrl, make_env, rate_hz=c.rate_hz, episodes=c.episodes, seed=c.seed, max_steps=c.max_steps,
                      realtime=c.realtime, prime=c.prime)
    metrics["loop"] = report.to_dict()
    if c.eval_episodes:
        res = evaluate_controller(policy, make_env, n_episodes=c.eval_episodes, n_envs=c.n_envs, seed=c.seed,
                                  max_steps=c.max_steps, **kw)
        metrics["eval"] = res.to_dict()
        lo, hi = res.success_ci95
        print(f"batched evaluation: success {res.success_rate:.3f} (95% CI {lo:.3f}-{hi:.3f}) over {res.n_episodes} episodes")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(report.summary())
    print(f"metrics    : {out / 'metrics.json'}")
    if c.export:
        print(f"export     : {metrics['export']}")
    return metrics


def _predictor(c, policy, make_env, out):
    """A forward model: loaded from its directory, or fitted on a demonstration file (and ``predict_rollouts`` of
    the policy's own episodes) and saved into the run."""
    from pathlib import Path

    from dpolicy.deploy.forward import ForwardModel, fit_forward_model, fitting_demos

    path = c.predict
    p = Path(path)
    if p.is_dir():
        if c.predict_rollouts:
            raise ConfigError(f"predict={path} is a fitted forward model, used as it is; predict_rollouts applies only "
                              "when fitting one on a demonstration file.")
        model = ForwardModel.load(p)
    elif p.is_file():
        if c.predict_rollouts:
            print(f"forward    : recording {c.predict_rollouts} episodes of the policy (seeds {c.predict_seed}..)", flush=True)
        data = fitting_demos(p, policy, make_env, c.predict_rollouts, seed=c.predict_seed)
        model, st = fit_forward_model(data, policy.obs_keys,
                                      log=lambda m: print(m, flush=True))  # ~2 min on one CPU core: show progress
        model.save(out / "forward_model")
        own = f" and {c.predict_rollouts} of the policy's own episodes" if c.predict_rollouts else ""
        print(f"forward    : fitted on {st['transitions']} transitions of {p}{own}; saved to {out / 'forward_model'}")
    else:
        raise ConfigError(f"predict={path}: no such forward model directory or demonstration file.")
    model.check_policy(policy)
    return model


def _run_async(c, policy, make_env, env_args) -> dict:
    """mode=async: a live loop with a real inference thread (latency, measured delays), and a batched evaluation
    under the injected delay (success, switch discontinuity, evaluations per control step)."""
    import numpy as np

    from dpolicy.deploy.asynchronous import LiveAsyncRunner, SwitchStats, evaluate_async
    from dpolicy.deploy.loop import control_rate

    cfg = c.async_config()
    out = run_dir()
    predictor = _predictor(c, policy, make_env, out) if c.predict else None  # the batched evaluation's
    metrics = {"checkpoint": str(c.checkpoint), "env_args": env_args, "async": dict(cfg.__dict__)}
    env = make_env()
    rate = float(c.rate_hz or control_rate(env) or 0)
    if not rate > 0:
        env.close()
        raise ConfigError("rate_hz is required: the environment does not say its control period (env.dt).")
    runner = LiveAsyncRunner(policy, cfg, seed=c.seed)
    live, stats = [], SwitchStats()
    try:
        for ep in range(c.episodes):
            r = runner.run_episode(env, seed=c.seed + ep, rate_hz=rate, max_steps=c.max_steps)
            stats.add_episode(r.pop("actions"), r.pop("switches"))
            live.append(r)
    finally:
        runner.close()
        env.close()
    lat = np.array(runner.latencies) * 1e3
    delays = [d for r in live for d in r["delays"]]
    metrics["live"] = {"rate_hz": rate, "episodes": live, "success_rate": float(np.mean([r["success"] for r in live])),
                       "inference_ms_p50": float(np.percentile(lat, 50)) if len(lat) else None,
                       "inference_ms_p99": float(np.percentile(lat, 99)) if len(lat) else None,
                       "delay_steps_max": max(delays) if delays else 0,
                       "starved_steps": int(sum(r["starved"] for r in live)), **stats.summary()}
    print(f"live loop  : {c.episodes} episodes at {rate:.0f} Hz, success {metrics['live']['success_rate']:.3f}; inference "
          f"p50 {metrics['live']['inference_ms_p50'] or 0:.1f} ms, p99 {metrics['live']['inference_ms_p99'] or 0:.1f} ms; "
          f"measured delays up to {metrics['live']['delay_steps_max']} steps; {metrics['live']['starved_steps']} steps past a chunk's end")
    if c.eval_episodes:
        res, extra = evaluate_async(policy, make_env, cfg, n_episodes=c.eval_episodes, n_envs=c.n_envs, seed=c.seed,
                                    max_steps=c.max_steps, predictor=predictor)
        metrics["eval"] = {**res.to_dict(), **extra}
        lo, hi = res.success_ci95
        print(f"delay {cfg.delay}  : {cfg.strategy} success {res.success_rate:.3f} (95% CI {lo:.3f}-{hi:.3f}) over "
              f"{res.n_episodes} episodes; jump at switches {extra['switch_jump_mean']:.3f} vs within chunks "
              f"{extra['within_jump_mean']:.3f}; {extra['evals_per_step']:.2f} network evaluations per control step")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    print(f"metrics    : {out / 'metrics.json'}")
    return metrics


@checked("deploy")
@hydra.main(config_path=CONFIG_DIR, config_name="deploy", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
