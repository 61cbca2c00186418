"""Field algebra for composition: one common parameterization for diffusion and flow fields.

Every process here corrupts a clean chunk the same way up to coefficients,
``x_t = alpha(t) * x0 + sigma(t) * eps`` (diffusion: ``sqrt(ab), sqrt(1 - ab)``; rectified flow:
``1 - s, s``), so any network field can be turned into the pair ``(x0_hat, eps_hat)`` that is
consistent with ``x_t``, and back. Two facts make diffusion and flow policies composable:

* a diffusion level with ``alpha, sigma`` and the flow time ``s = sigma / (alpha + sigma)`` have the
  same signal-to-noise ratio, and ``x_diffusion = (alpha + sigma) * x_flow``; ``x0`` and ``eps`` are
  the same in both coordinates. So a flow network can be queried on a diffusion grid (and a
  deterministic DDIM step *is* an Euler step of the flow ODE in those coordinates).
* a convex combination of ``(x0, eps)`` pairs is again consistent with ``x_t`` (the weights sum to
  1), and equals the convex combination of scores (``score = -eps / sigma``), of eps-, x0- or
  velocity-predictions alike: GPC's mix does not depend on the parameterization.

Operators (``combine``): ``convex`` is GPC's ``sum_i w_i score_i`` on the simplex; ``product``
("AND") sums weighted scores with any non-negative weights and removes the extra ``W - 1`` copies
of a standard-normal reference prior, ``p ~ prod_i p_i^{w_i} / N(0, I)^{W-1}``, which keeps the
pair consistent and finite at pure noise (summing raw scores would count the shared Gaussian
prior ``W`` times, and the implied ``x0`` blows up as ``alpha -> 0``). With ``W = 1`` the product
is the convex mix. The mixture ("OR") is not a field operator: it picks a parent per sample
(``composed.py``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from dpolicy.errors import ConfigError

OPERATORS = ("convex", "product", "mixture")


def matched_time(base, parent, t: float) -> tuple[float, float]:
    """The parent's time with the base's signal-to-noise ratio at base time ``t``, and the scale ``c``
    with ``x_parent = x_base / c``. In the coordinate ``x / (alpha + sigma)`` every process's sample is the
    same (``(1 - s) x0 + s eps`` with ``s = sigma / (alpha + sigma)``), so ``c`` is the ratio of the two
    processes' ``alpha + sigma``. A process with continuous time fits any grid; one with discrete levels
    only a grid whose ratios it has (checked when composing)."""
    if parent.field_signature() == base.field_signature():
        return t, 1.0
    alpha, sigma = base.coefficients(t)
    tp = parent.time_for(alpha, sigma)
    if tp is None:
        raise ConfigError(f"a {parent.name} parent has no noise level matching the {base.name} base at t={t:.4g}; "
                          f"put a parent with discrete levels first or use matching levels.")
    ap, sp = parent.coefficients(tp)
    return tp, (alpha + sigma) / (ap + sp)


def reference_prior(x: torch.Tensor, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, eps)`` posterior means under a standard-normal data prior, the product's reference."""
    v = alpha * alpha + sigma * sigma
    return (alpha / v) * x, (sigma / v) * x


def check_weights(weights: Sequence[float], n: int, operator: str) -> list[float]:
    """Validate weights for ``operator``: on the simplex (convex, mixture) or non-negative (product)."""
    if operator not in OPERATORS:
        raise ConfigError(f"operator={operator!r} is unknown; choose one of {OPERATORS}.")
    w = [float(v) for v in weights]
    if len(w) != n:
        raise ConfigError(f"got {len(w)} weight(s) for {n} parent policies; give one weight per parent.")
    if not all(math.isfinite(v) and v >= 0 for v in w):
        raise ConfigError(f"weights {w} must be finite and non-negative.")
    if operator == "product":
        if sum(w) <= 0:
            raise ConfigError(f"product weights {w} are all zero; at least one parent must count.")
    elif abs(sum(w) - 1.0) > 1e-6:
        raise ConfigError(f"{operator} weights {w} sum to {sum(w):.6g}; they must lie on the simplex (sum to 1).")
    return w


def combine(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float], operator: str,
            x: torch.Tensor, alpha: float, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix the parents' ``(x0, eps)`` at ``x_t`` (coefficients ``alpha, sigma``) into one pair.

    ``convex``: ``sum_i w_i (x0_i, eps_i)`` (= ``sum_i w_i score_i``); ``product``: the same sum minus
    ``(W - 1)`` times the standard-normal reference pair, ``W = sum_i w_i``.
    """
    if operator not in ("convex", "product"):
        raise ConfigError(f"operator {operator!r} does not mix fields; use 'convex' or 'product'.")
    x0 = eps = None
    for (a, e), w in zip(pairs, weights):
        if w == 0:
            continue
        x0 = w * a if x0 is None else x0 + w * a
        eps = w * e if eps is None else eps + w * e
    if x0 is None:
        raise ConfigError("every weight is zero; nothing to compose.")
    extra = float(sum(weights)) - 1.0
    if operator == "product" and extra != 0.0:
        r0, re = reference_prior(x, alpha, sigma)
        x0, eps = x0 - extra * r0, eps - extra * re
    return x0, eps
