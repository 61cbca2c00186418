"""``dpolicy-steer``: DSRL on a frozen policy; writes metrics.json, steering_curve.png, tb/ and the
steered policy (``steered/``, loadable by ``dpolicy-eval``) into the hydra run directory."""

from __future__ import annotations

import hydra

from dpolicy.cli.common import CONFIG_DIR, checked, run_dir, settings, user_errors


def check_steer(c) -> None:
    """The ranges SteerConfig and DSRLConfig do not check themselves."""
    from dpolicy.config import check_min
    from dpolicy.errors import ConfigError

    check_min(c, "", 0, "init_steps")
    check_min(c, "", 1, "buffer_size", "eval_every")
    check_min(c, "", 1, "sampling_steps", null="the base's own")
    check_min(c, "", 0, "base_eta", null="the base's own")
    for name in ("lr", "init_alpha", "action_magnitude"):
        v = getattr(c.dsrl, name)
        if not v > 0:
            raise ConfigError(f"dsrl.{name}={v!r} must be positive.")


@user_errors
def _run(cfg) -> dict:
    from dpolicy.rl.train import SteerConfig, steer

    steer_cfg = settings(SteerConfig, cfg, check=check_steer)
    out = run_dir()
    m = steer(steer_cfg, out, log=lambda msg: print(msg, flush=True))
    lo, hi = m["final_success_ci95"]
    print(f"\nDSRL-{m['algo'].upper()}: success {m['base_success']:.3f} (base) -> {m['final_success']:.3f} "
          f"(95% CI {lo:.3f}-{hi:.3f}) after {m['env_steps']} env steps in {m['wall_s']:.0f} s")
    print(f"checkpoint : {m['checkpoint']}")
    print(f"metrics    : {out / 'metrics.json'}")
    print(f"plot       : {m['plot']}")
    return m


@checked("steer")
@hydra.main(config_path=CONFIG_DIR, config_name="steer", version_base="1.3")
def main(cfg) -> None:
    _run(cfg)


if __name__ == "__main__":
    main()
