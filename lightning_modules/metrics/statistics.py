"""Summary statistics for per-image metric values: bootstrap intervals and paired comparisons (numpy/scipy only).

Per-image values are what the evaluation writes to ``metrics.csv``; these functions turn them into the numbers a
report shows. NaN entries (empty regions) are dropped before any statistic and counted separately.
"""

import math

import numpy as np
from scipy import stats


def bootstrap_ci(values, *, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float, int]:
    """Mean and percentile bootstrap interval of the mean.

    Args:
        values: 1-D per-image values; NaN (empty regions) and +-inf are dropped.
        n_boot: Bootstrap resamples.
        alpha: 1 - confidence level (0.05 -> 95 % interval).
        seed: Seed of the resampling (reports are reproducible).

    Returns:
        ``(mean, low, high, n)`` over the finite values; NaNs when none is finite.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return math.nan, math.nan, math.nan, 0
    if v.size == 1:
        return float(v[0]), float(v[0]), float(v[0]), 1
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(n_boot, v.size))].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(v.mean()), float(low), float(high), int(v.size)


def paired_comparison(a, b, *, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Paired difference ``b - a`` over images where both are finite, with a bootstrap interval and a Wilcoxon test.

    Args:
        a: Per-image values of the reference method.
        b: Per-image values of the compared method, same image order.
        n_boot: Bootstrap resamples for the interval of the mean difference.
        seed: Resampling seed.

    Returns:
        ``{"mean_diff", "low", "high", "n", "p_wilcoxon"}``; p is NaN with fewer than 2 pairs or all-zero differences.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.shape} and {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    d = b[ok] - a[ok]
    mean, low, high, n = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    p = math.nan
    if n >= 2 and np.any(d != 0):
        p = float(stats.wilcoxon(d, zero_method="wilcox").pvalue)
    return {"mean_diff": mean, "low": low, "high": high, "n": n, "p_wilcoxon": p}
