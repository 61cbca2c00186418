"""``dpolicy-finetune``: reinforcement learning on a policy's own weights through its denoising chain (DPPO-style PPO,
GRPO / GSPO over state-reset groups, advantage-weighted matching); writes metrics.json, finetune_curve.png and the
fine-tuned policy (``finetuned/``, an ordinary checkpoint) into the hydra run directory."""

from __future__ import annotations

import hydra

from dpolicy.cli.common import CONFIG_DIR, checked, run_dir, settings, user_errors


@user_errors
def _run(cfg) -> dict:
    from dpolicy.rl.finetune import FinetuneConfig, finetune

    c = settings(FinetuneConfig, cfg)
    out = run_dir()
    m = finetune(c, out, log=lambda msg: print(msg, flush=True))
    first, last = m["history"][0], m["final"]
    lo, hi = last["success_ci95"]
    print(f"\n{c.algo.upper()}: success {first['success_rate']:.3f} (base) -> {last['success_rate']:.3f} "
          f"(95% CI {lo:.3f}-{hi:.3f}) after {last['env_steps']} env steps in {m['wall_s']:.0f} s; "
          f"drift from the base {m['drift_mse']:.4f} (action MSE, normalized)")
    print(f"checkpoint : {m['checkpoint']}")
    print(f"metrics    : {out / 'metrics.json'}")
    return m


@checked("finetune")
@hydra.main(config_path=CONFIG_DIR, config_name="finetune", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
