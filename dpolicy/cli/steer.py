"""``dpolicy-steer``: DSRL on a frozen policy; writes metrics.json, steering_curve.png, tb/ and the
steered policy (``steered/``, loadable by ``dpolicy-eval``) into the hydra run directory."""

from __future__ import annotations

import hydra

from dpolicy.cli.common import CONFIG_DIR, container, run_dir, user_errors


@user_errors
def _run(cfg) -> dict:
    from dpolicy.config import from_dict
    from dpolicy.rl.train import SteerConfig, steer

    steer_cfg = from_dict(SteerConfig, container(cfg))
    out = run_dir()
    m = steer(steer_cfg, out, log=lambda msg: print(msg, flush=True))
    lo, hi = m["final_success_ci95"]
    print(f"\nDSRL-{m['algo'].upper()}: success {m['base_success']:.3f} (base) -> {m['final_success']:.3f} "
          f"(95% CI {lo:.3f}-{hi:.3f}) after {m['env_steps']} env steps in {m['wall_s']:.0f} s")
    print(f"checkpoint : {m['checkpoint']}")
    print(f"metrics    : {out / 'metrics.json'}")
    print(f"plot       : {m['plot']}")
    return m


@hydra.main(config_path=CONFIG_DIR, config_name="steer", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
