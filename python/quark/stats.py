"""Small-sample statistics for evaluation results: a binomial proportion's interval (Wilson) and
paired tests over per-item scores of two models (exact sign test, paired bootstrap).

Evaluations here have tens to hundreds of items, where a plain mean +- 2 SE misbehaves near 0 or 1
(Wilson does not) and two models' accuracies on the same items are correlated (a paired test uses
that: only the items they disagree on carry evidence).
"""
import math
from statistics import NormalDist

import numpy as np


def z_value(confidence):
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson(k, n, confidence=0.95):
    """(low, high): Wilson score interval of k successes in n trials ((0, 1) when n == 0)."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    z = z_value(confidence)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_test(wins, losses):
    """Exact two-sided sign-test p-value of wins vs losses (ties dropped): P under Binomial(n, 1/2) of
    a split at least this uneven."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_bootstrap(a, b, confidence=0.95, samples=10000, seed=0):
    """Mean of b - a over paired items and its percentile bootstrap interval -> (diff, low, high)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"paired_bootstrap: need two equal-length, non-empty 1-D score lists, got {a.shape} and {b.shape}")
    d = b - a
    idx = np.random.default_rng(seed).integers(0, len(d), size=(samples, len(d)))
    means = d[idx].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(d.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))
