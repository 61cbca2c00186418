"""``dpolicy-deploy``: run a checkpoint as a controller (chunked or RTI) in a fixed-rate control loop
on its task; writes metrics.json (latency percentiles, deadline misses, network evaluations per
decision, success) into the hydra run directory, optionally with the exported decision step."""

from __future__ import annotations

import json

import hydra

from dpolicy.cli.common import CONFIG_DIR, checked, device, run_dir, settings, user_errors


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


@checked("deploy")
@hydra.main(config_path=CONFIG_DIR, config_name="deploy", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
