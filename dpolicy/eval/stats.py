"""Small statistics for evaluation results: success-rate intervals and mode-frequency distances.

Success rates from a few dozen rollouts are noisy, so every reported rate carries a Wilson score
interval (it stays inside [0, 1] and behaves at 0/n and n/n, unlike the normal approximation).
Multimodal tasks are judged by how often each mode is reached; ``total_variation`` compares two
such mode histograms (counts or frequencies) on a 0..1 scale.
"""

from __future__ import annotations

import math
from typing import Mapping


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``successes / n`` (default: 95 %).

    With no trials nothing is known, so the interval is the whole of ``[0, 1]``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}.")
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp: at p = 0 or 1 the bound equals 0 or 1 analytically but may round to -1e-17.
    return (max(0.0, center - half), min(1.0, center + half))


def mode_frequencies(counts: Mapping[int, float]) -> dict[int, float]:
    """Normalize a mode histogram (counts or weights) into frequencies that sum to 1."""
    total = float(sum(counts.values()))
    if total <= 0:
        raise ValueError("the mode histogram is empty; there is no frequency to compare.")
    return {k: v / total for k, v in counts.items()}


def total_variation(p: Mapping[int, float], q: Mapping[int, float]) -> float:
    """Total-variation distance between two mode histograms: 0 = same mix of modes, 1 = disjoint.

    Inputs are normalized first, so raw ``EvalResult.mode_counts`` can be passed directly;
    a mode missing from one side counts as frequency 0 there.
    """
    fp, fq = mode_frequencies(p), mode_frequencies(q)
    keys = set(fp) | set(fq)
    return 0.5 * sum(abs(fp.get(k, 0.0) - fq.get(k, 0.0)) for k in keys)
