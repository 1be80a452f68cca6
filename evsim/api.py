"""The Python API: load a scenario, simulate it, compare policies on the same seeds.

Mirrors the CLI: ``simulate`` is ``evsim simulate``, ``compare`` is ``evsim compare``.
Results come back as pandas DataFrames and plain dicts.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from evsim.metrics import compute_metrics, metrics_frame, write_metrics
from evsim.model import SimResult, Simulation
from evsim.model.simulation import BOOKING_MODES
from evsim.scenario import Scenario, load_scenario

__all__ = ["BOOKING_MODES", "CompareResult", "as_scenario", "compare", "simulate", "split_label"]


def split_label(label: str) -> tuple[str, str | None]:
    """``"least_wait+trip"`` -> ``("least_wait", "trip")``; a plain policy name -> ``(name,
    None)``. The suffix must be a booking mode (:data:`BOOKING_MODES`)."""
    name, plus, mode = label.rpartition("+")
    if not plus:
        return label, None
    if mode not in BOOKING_MODES:
        raise ValueError(
            f"{label!r}: unknown booking mode {mode!r}; known: {', '.join(BOOKING_MODES)}"
        )
    return name, mode


def as_scenario(scenario: Scenario | str | Path | None) -> Scenario:
    """A Scenario from a Scenario, a TOML path, or None (the default Bahia scenario)."""
    if isinstance(scenario, Scenario):
        return scenario
    return load_scenario(scenario)


def simulate(
    scenario: Scenario | str | Path | None = None,
    policy: str | None = None,
    seed: int | None = None,
    params: Mapping[str, float] | None = None,
    out: str | Path | None = None,
    plots: bool = True,
    progress: Callable[[float], None] | None = None,
    booking_mode: str | None = None,
) -> SimResult:
    """Run one simulation. With ``out`` the run directory gets ``trace.parquet``,
    ``metrics.json``, ``run.json`` and the PNG plots; otherwise the trace stays in memory.

    ``booking_mode`` (``"on_arrival"``, ``"trip"`` or ``"stop"``; default: the scenario's
    ``booking.mode``) overrides how vehicles get a charger; a policy label such as
    ``"least_wait+trip"`` does the same (see :func:`split_label`)."""
    sc = as_scenario(scenario)
    if policy is not None:
        policy, label_mode = split_label(policy)
        booking_mode = booking_mode or label_mode
    out_dir = Path(out) if out is not None else None
    trace_path = out_dir / "trace.parquet" if out_dir is not None else None
    sim = Simulation(
        sc,
        policy=policy,
        params=params,
        seed=seed,
        trace_path=trace_path,
        booking_mode=booking_mode,
    )
    result = sim.run(progress=progress)
    df = result.trace
    result.metrics = compute_metrics(df, horizon_min=result.horizon_min)
    if out_dir is not None:
        write_metrics(result.metrics, out_dir / "metrics.json")
        info = {
            "source": "sim",
            "scenario": sc.name,
            "policy": result.policy,
            "booking": result.booking,
            "params": sim.params,
            "seed": result.seed,
            "horizon_min": result.horizon_min,
            "trips": result.trips,
            "trace_rows": result.trace_rows,
            "events": result.events,
            "wall_s": result.wall_s,
        }
        (out_dir / "run.json").write_text(json.dumps(info, indent=2))
        if plots:
            from evsim.plots import write_plots

            write_plots(df, out_dir, label=f"{result.policy} seed {result.seed}")
    return result


@dataclass
class CompareResult:
    runs: pd.DataFrame  # one row per (policy, seed): flat metrics
    summary: pd.DataFrame  # one row per policy: mean and 95% CI half-width of key metrics
    traces: dict[str, pd.DataFrame]  # policy -> trace of its first seed


KEY_METRICS = (
    "wait_min.mean",
    "wait_min.p95",
    "sessions",
    "energy_kwh",
    "revenue.total",
    "utilisation.mean",
    "balance.stations.jain",
    "balance.companies.jain",
    "stranded",
    "detour_km.mean",
)


def compare(
    scenario: Scenario | str | Path | None,
    policies: Sequence[str],
    seeds: int | Sequence[int] = 3,
    on_run: Callable[[str, int], None] | None = None,
    booking_modes: Sequence[str] | None = None,
) -> CompareResult:
    """Run every policy on the same seeds (common random numbers) and summarise.

    A policy may carry a booking mode (``"least_wait+trip"``); ``booking_modes`` runs every
    policy in each mode instead, labelled ``"<policy>+<mode>"`` in ``runs`` and ``summary``
    (the same seed draws the same trips in every mode)."""
    sc = as_scenario(scenario)
    seed_list = list(range(sc.seed, sc.seed + seeds)) if isinstance(seeds, int) else list(seeds)
    labels = list(policies)
    if booking_modes:
        labels = [f"{split_label(p)[0]}+{m}" for p in policies for m in booking_modes]
    for label in labels:
        split_label(label)  # fail before running anything
    rows: list[pd.DataFrame] = []
    traces: dict[str, pd.DataFrame] = {}
    for pol in labels:
        for s in seed_list:
            res = simulate(sc, policy=pol, seed=s)
            row = metrics_frame(res.metrics)
            row.insert(0, "seed", s)
            row.insert(0, "policy", pol)
            rows.append(row)
            traces.setdefault(pol, res.trace)
            if on_run is not None:
                on_run(pol, s)
    runs = pd.concat(rows, ignore_index=True)
    summary = summarise(runs)
    return CompareResult(runs, summary, traces)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% confidence half-width (Student t) per policy for the key metrics."""
    from scipy import stats

    out = []
    for pol, g in runs.groupby("policy", sort=False):
        row: dict[str, float | str | int] = {"policy": str(pol), "runs": len(g)}
        for m in KEY_METRICS:
            if m not in g:
                continue
            x = pd.to_numeric(g[m], errors="coerce").dropna().to_numpy(float)
            row[m] = float(np.mean(x)) if len(x) else float("nan")
            if len(x) > 1:
                half = stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / np.sqrt(len(x))
                row[f"{m} ±"] = float(half)
        out.append(row)
    return pd.DataFrame(out)
