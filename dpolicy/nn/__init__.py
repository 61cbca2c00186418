"""Denoiser networks: ``net(x_t (B,Tp,Da), t (B,), cond (B,Dc)) -> field (B,Tp,Da)``.

Every network here has that one signature, so processes and samplers never care which is used.
Image encoders (``build_image_encoder``) turn camera frames into the features a policy conditions on.
"""

from dpolicy.nn.mlp import ResidualMLP
from dpolicy.nn.unet1d import ConditionalUnet1D
from dpolicy.nn.vision import ImageEncoder, build_image_encoder


def build_net(cfg, action_dim: int, horizon: int, cond_dim: int):
    """Build the denoiser named by ``cfg.type`` ("unet" or "mlp") from a NetConfig."""
    from dpolicy.errors import ConfigError

    if cfg.type == "unet":
        return ConditionalUnet1D(action_dim, cond_dim, down_dims=tuple(cfg.down_dims), kernel_size=cfg.kernel_size,
                                 n_groups=cfg.n_groups, time_dim=cfg.time_dim, film=cfg.film)
    if cfg.type == "mlp":
        return ResidualMLP(action_dim, horizon, cond_dim, hidden=cfg.hidden, depth=cfg.depth, time_dim=cfg.time_dim)
    raise ConfigError(f"net.type={cfg.type!r} is unknown; choose 'unet' or 'mlp'.")


__all__ = ["ConditionalUnet1D", "ImageEncoder", "ResidualMLP", "build_image_encoder", "build_net"]
