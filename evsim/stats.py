"""Small statistics used to compare runs: confidence intervals and sim-vs-live agreement.

* :func:`mean_ci` is the mean of independent replications (one value per seed) with a Student-t
  confidence half-width; :func:`paired_diff_ci` does the same for differences on common seeds.
* :func:`bootstrap_mean_diff` is the difference of two sample means (for example the waits of
  a live run and of a simulated one) with a seeded percentile-bootstrap confidence interval.
* :func:`agreement` compares one trace with a reference trace: mean waits, two-sample
  Kolmogorov-Smirnov on the waits, per-station utilisation in percentage points, and the
  tolerance verdicts of :data:`TOLERANCES`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "TOLERANCES",
    "agreement",
    "bootstrap_mean_diff",
    "ks_test",
    "mean_ci",
    "paired_diff_ci",
    "station_utilisation",
    "waits",
]

#: Agreement tolerances: relative mean-wait difference, KS statistic, per-station utilisation
#: difference in percentage points.
TOLERANCES: Mapping[str, float] = {"mean_wait_rel": 0.10, "ks_d": 0.10, "util_pp": 5.0}


def _arr(x: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(x) if not isinstance(x, np.ndarray | pd.Series) else x, dtype=float)
    return a[np.isfinite(a)]


def mean_ci(x: Iterable[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and Student-t confidence half-width of independent replications (NaN half-width
    with fewer than two values)."""
    from scipy import stats

    a = _arr(x)
    if a.size == 0:
        return math.nan, math.nan
    if a.size == 1:
        return float(a[0]), math.nan
    half = stats.t.ppf(0.5 + level / 2, a.size - 1) * np.std(a, ddof=1) / math.sqrt(a.size)
    return float(a.mean()), float(half)


def paired_diff_ci(
    a: Iterable[float], b: Iterable[float], level: float = 0.95
) -> tuple[float, float]:
    """Mean of ``b - a`` over paired replications (same seeds) and its t half-width.

    Pairing removes the seed-to-seed variation both share (common random numbers), so the
    interval is much tighter than comparing two independent means."""
    x = np.asarray(list(a), dtype=float)
    y = np.asarray(list(b), dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired samples differ in length: {x.size} vs {y.size}")
    return mean_ci(y - x, level)


def bootstrap_mean_diff(
    a: Iterable[float],
    b: Iterable[float],
    *,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``mean(b) - mean(a)`` and its percentile-bootstrap ``level`` interval.

    The samples are resampled independently with replacement, ``n_resamples`` times, from a
    seeded generator (so the interval is reproducible). Returns ``(diff, lo, hi)``; NaNs when
    either sample is empty."""
    x, y = _arr(a), _arr(b)
    if x.size == 0 or y.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    diffs = np.empty(n_resamples)
    # blocks keep memory bounded for long live traces (n x block indices at a time)
    block = max(1, min(n_resamples, 4_000_000 // max(x.size, y.size)))
    for i in range(0, n_resamples, block):
        k = min(block, n_resamples - i)
        mx = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
        my = y[rng.integers(0, y.size, size=(k, y.size))].mean(axis=1)
        diffs[i : i + k] = my - mx
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(diffs, [alpha, 1.0 - alpha])
    return float(y.mean() - x.mean()), float(lo), float(hi)


def ks_test(a: Iterable[float], b: Iterable[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic D and p-value (``scipy.stats.ks_2samp``)."""
    from scipy import stats

    x, y = _arr(a), _arr(b)
    if x.size == 0 or y.size == 0:
        return math.nan, math.nan
    res = stats.ks_2samp(x, y)
    return float(res.statistic), float(res.pvalue)


def waits(df: pd.DataFrame) -> np.ndarray:
    """Waits (min) of the sessions that started charging inside the run's horizon."""
    from evsim.metrics import resolve_horizon, sessions_table

    s = sessions_table(df, horizon_min=resolve_horizon(df))
    return s.loc[s["t_start"].notna(), "wait_min"].dropna().to_numpy(dtype=float)


def station_utilisation(df: pd.DataFrame) -> pd.Series:
    """Utilisation per station (fraction of connector time occupied), index station_id."""
    from evsim.metrics import compute_metrics

    return pd.Series(compute_metrics(df)["utilisation"]["per_station"], dtype=float)


def agreement(
    reference: pd.DataFrame,
    other: pd.DataFrame,
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    tolerances: Mapping[str, float] = TOLERANCES,
) -> dict[str, Any]:
    """How closely the trace ``other`` agrees with ``reference``.

    Keys: ``mean_wait_ref``, ``mean_wait``, ``mean_diff`` (other - reference, min) with
    ``mean_diff_lo``/``mean_diff_hi`` (bootstrap interval), ``mean_diff_rel`` (diff / reference
    mean), ``ks_d``, ``ks_p``, ``util_pp_max``/``util_pp_mean`` (absolute per-station
    utilisation differences in percentage points over the stations both runs report),
    ``stations_compared``, and the verdicts ``mean_wait_ok``, ``ks_ok``, ``util_ok`` (None when
    a statistic cannot be computed)."""
    wa, wb = waits(reference), waits(other)
    diff, lo, hi = bootstrap_mean_diff(wa, wb, n_resamples=n_resamples, seed=seed)
    d, p = ks_test(wa, wb)
    ua, ub = station_utilisation(reference), station_utilisation(other)
    common = ua.index.intersection(ub.index)
    pp = (100.0 * (ub[common] - ua[common])).abs().dropna()
    ref_mean = float(wa.mean()) if wa.size else math.nan
    rel = diff / ref_mean if ref_mean and math.isfinite(ref_mean) else math.nan
    if ref_mean == 0.0 and diff == 0.0:
        rel = 0.0

    def verdict(value: float, ok: bool) -> bool | None:
        return None if not math.isfinite(value) else bool(ok)

    util_max = float(pp.max()) if len(pp) else math.nan
    return {
        "mean_wait_ref": ref_mean,
        "mean_wait": float(wb.mean()) if wb.size else math.nan,
        "mean_diff": diff,
        "mean_diff_lo": lo,
        "mean_diff_hi": hi,
        "mean_diff_rel": rel,
        "ks_d": d,
        "ks_p": p,
        "util_pp_max": util_max,
        "util_pp_mean": float(pp.mean()) if len(pp) else math.nan,
        "stations_compared": len(pp),
        "mean_wait_ok": verdict(rel, abs(rel) <= tolerances["mean_wait_rel"]),
        "ks_ok": verdict(d, d < tolerances["ks_d"]),
        "util_ok": verdict(util_max, util_max <= tolerances["util_pp"]),
    }
