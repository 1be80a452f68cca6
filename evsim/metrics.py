"""Metrics computed from a trace alone (simulated or live run, see :mod:`evsim.trace`).

Everything here reads only the event table, so a SimPy run and a live network run are measured
the same way.

* :func:`sessions_table` folds the ``arrive`` / ``session_start`` / ``session_end`` /
  ``abandon`` rows into one row per charging session.
* :func:`compute_metrics` returns the run's summary as a nested, JSON-serialisable dict
  (:func:`write_metrics` saves it, :func:`metrics_frame` flattens it to one row for comparing
  runs).
* :func:`queue_length_series` is the number of vehicles waiting (arrived, not yet plugged in and
  not gone) as a step function of time; :func:`little_law` checks ``L = lambda * W`` on it.

Observation window
------------------
Metrics describe the window ``[0, horizon]``. The horizon is the ``horizon_min`` argument, else
``run_info(df)["horizon_min"]`` (simulation runs store it), else the last event time. Rows after
the horizon are ignored, so a session whose ``session_end`` falls after the horizon counts as
still charging at the horizon (its occupied time is clipped there and its energy and price are
not counted).

Definitions
-----------
* ``wait_min`` of a session = ``t_start - t_arrive`` from its rows (not the ``wait_min``
  column). The ``wait_min`` block of :func:`compute_metrics` covers sessions that started
  charging; percentiles use linear interpolation (``numpy.percentile`` default).
* utilisation of a connector = occupied time / horizon, where occupied time is
  ``session_start -> session_end`` clipped to ``[0, horizon]`` (``session_end`` missing: until the
  horizon). Per station / company / network: total occupied time / (horizon x connectors).
  The connector count is taken from ``connector_status`` rows (plus any connector that only
  appears in sessions); outages do not reduce the denominator.
* queue length = vehicles waiting network-wide (or at one station): +1 at ``arrive``, -1 at
  ``session_start`` or ``abandon``. Changes at the same instant are netted, so a vehicle that
  plugs in on arrival never counts as waiting.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evsim.trace import Kind, run_info

__all__ = [
    "SESSION_STATUSES",
    "coefficient_of_variation",
    "compute_metrics",
    "jain_index",
    "little_law",
    "metrics_frame",
    "natural_key",
    "queue_length_series",
    "resolve_horizon",
    "sessions_table",
    "utilisation_table",
    "write_metrics",
]

#: Values of the ``status`` column of :func:`sessions_table`.
SESSION_STATUSES = ("completed", "charging_at_end", "queued_at_end", "abandoned")

_SESSION_COLUMNS = [
    "session_id",
    "vehicle_id",
    "station_id",
    "company_id",
    "connector_id",
    "booking_id",
    "t_arrive",
    "t_start",
    "t_end",
    "t_abandon",
    "wait_min",
    "charge_min",
    "energy_kwh",
    "price",
    "status",
]


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def jain_index(x: Iterable[float]) -> float:
    """Jain's fairness index ``(sum x)^2 / (n * sum x^2)``.

    1 when all values are equal, ``1/n`` when one of ``n`` takes everything. All zeros count as
    perfectly fair (1.0); an empty input gives NaN. NaNs in ``x`` are ignored.
    """
    a = _finite(x)
    if a.size == 0:
        return math.nan
    sq = float(np.sum(a * a))
    if sq == 0.0:
        return 1.0
    return float(np.sum(a)) ** 2 / (a.size * sq)


def coefficient_of_variation(x: Iterable[float]) -> float:
    """Population standard deviation / mean (0 = perfectly even).

    All zeros give 0.0; an empty input, or a zero mean with spread, gives NaN. NaNs in ``x`` are
    ignored.
    """
    a = _finite(x)
    if a.size == 0:
        return math.nan
    std = float(np.std(a))
    mean = float(np.mean(a))
    if mean == 0.0:
        return 0.0 if std == 0.0 else math.nan
    return std / abs(mean)


def _finite(x: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(x) if not isinstance(x, np.ndarray | pd.Series) else x, dtype=float)
    return a[np.isfinite(a)]


def natural_key(value: object) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ids like people do: ``S2`` before ``S10``."""
    parts = re.split(r"(\d+)", str(value))
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p)


def _natural_dict(d: Mapping[Any, float]) -> dict[str, float]:
    return {str(k): d[k] for k in sorted(d, key=natural_key)}


def resolve_horizon(df: pd.DataFrame, horizon_min: float | None = None) -> float:
    """The observation horizon: the argument, else the run's ``horizon_min``, else the last
    event time (0.0 for an empty trace)."""
    if horizon_min is not None:
        return float(horizon_min)
    stored = run_info(df).get("horizon_min")
    if stored is not None:
        return float(stored)
    if len(df) == 0:
        return 0.0
    return float(df["t_min"].max())


def _window(df: pd.DataFrame, horizon: float) -> pd.DataFrame:
    """Rows at or before the horizon."""
    if len(df) == 0 or float(df["t_min"].max()) <= horizon:
        return df
    out = df[df["t_min"] <= horizon]
    out.attrs = dict(df.attrs)
    return out


def _plain(v: Any) -> Any:
    """numpy scalars -> Python; NaN/inf -> None; recurse into dicts and lists."""
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, bool | np.bool_):
        return bool(v)
    if isinstance(v, int | np.integer):
        return int(v)
    if isinstance(v, float | np.floating):
        f = float(v)
        return f if math.isfinite(f) else None
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    return v


# --------------------------------------------------------------------------------------------
# sessions
# --------------------------------------------------------------------------------------------


_SESSION_KINDS = (Kind.ARRIVE, Kind.SESSION_START, Kind.SESSION_END, Kind.ABANDON)
_TIME_COLUMN = {
    Kind.ARRIVE: "t_arrive",
    Kind.SESSION_START: "t_start",
    Kind.SESSION_END: "t_end",
    Kind.ABANDON: "t_abandon",
}


def sessions_table(df: pd.DataFrame, horizon_min: float | None = None) -> pd.DataFrame:
    """One row per charging session.

    Columns: session_id, vehicle_id, station_id, company_id, connector_id, t_arrive, t_start,
    t_end, t_abandon, wait_min (``t_start - t_arrive``), charge_min (``t_end - t_start``),
    energy_kwh, price, status (one of :data:`SESSION_STATUSES`). Sessions are ordered by their
    first event. With ``horizon_min`` given, rows after it are ignored first (so a session that
    ends later is ``charging_at_end``). Ids are the first non-null value among the session's
    rows in time order; if a kind repeats for a session, its first row counts.
    """
    if horizon_min is not None:
        df = _window(df, float(horizon_min))
    ids = ["vehicle_id", "station_id", "company_id", "connector_id", "booking_id"]
    rows = df.loc[
        df["kind"].isin(_SESSION_KINDS) & df["session_id"].notna(),
        ["t_min", "kind", "session_id", *ids, "energy_kwh", "price"],
    ].sort_values("t_min", kind="stable")
    by_session = rows.groupby("session_id", sort=False)
    out = by_session[ids].first()  # first non-null per column, in time order
    times = (
        rows.groupby(["session_id", "kind"], sort=False)["t_min"]
        .first()
        .unstack("kind")
        .reindex(index=out.index, columns=list(_SESSION_KINDS))
        .rename(columns=_TIME_COLUMN)
        .astype(float)
    )
    out = out.join(times)
    out["wait_min"] = out["t_start"] - out["t_arrive"]
    out["charge_min"] = out["t_end"] - out["t_start"]
    ends = rows[rows["kind"] == Kind.SESSION_END].drop_duplicates("session_id")
    ends = ends.set_index("session_id")[["energy_kwh", "price"]].astype(float)
    out = out.join(ends)
    out.index.name = "session_id"

    out["status"] = np.select(
        [out["t_end"].notna(), out["t_start"].notna(), out["t_abandon"].notna()],
        ["completed", "charging_at_end", "abandoned"],
        default="queued_at_end",
    )
    return out.reset_index()[_SESSION_COLUMNS]


# --------------------------------------------------------------------------------------------
# queue
# --------------------------------------------------------------------------------------------


def _queue_leave_times(sessions: pd.DataFrame) -> np.ndarray:
    """Time each session left the queue (plug-in or abandon); NaN while still waiting."""
    return sessions["t_start"].fillna(sessions["t_abandon"]).to_numpy(dtype=float)


def queue_length_series(df: pd.DataFrame, station_id: str | None = None) -> pd.DataFrame:
    """Vehicles waiting as a step function: columns ``t_min``, ``queue_len``.

    Each row gives the queue length from ``t_min`` until the next row's time. The first row is
    ``(min(0, first arrival), 0)``; after it there is one row per instant where the length
    changes (+1 at ``arrive``, -1 at ``session_start`` or ``abandon``, netted per instant).
    ``station_id`` restricts it to one station.
    """
    return _queue_series(sessions_table(df), station_id)


def _queue_series(s: pd.DataFrame, station_id: str | None = None) -> pd.DataFrame:
    if station_id is not None:
        s = s[s["station_id"] == station_id]
    s = s[s["t_arrive"].notna()]
    t_arr = s["t_arrive"].to_numpy(dtype=float)
    t_out = _queue_leave_times(s)
    t_out = t_out[np.isfinite(t_out)]
    times = np.concatenate([t_arr, t_out])
    deltas = np.concatenate([np.ones(t_arr.size, dtype=np.int64), -np.ones(t_out.size, np.int64)])
    start = min(0.0, float(times.min())) if times.size else 0.0
    if times.size:
        uniq, inv = np.unique(times, return_inverse=True)
        net = np.bincount(inv, weights=deltas, minlength=uniq.size).round().astype(np.int64)
        keep = net != 0
        uniq, net = uniq[keep], net[keep]
    else:
        uniq, net = np.empty(0), np.empty(0, dtype=np.int64)
    t = np.concatenate([[start], uniq])
    q = np.concatenate([[0], np.cumsum(net)]).astype(np.int64)
    if t.size > 1 and t[1] == start:  # a change at the very first instant replaces the 0 row
        t, q = t[1:], q[1:]
    return pd.DataFrame({"t_min": t, "queue_len": q})


def _step_integral(series: pd.DataFrame, horizon: float) -> tuple[float, int]:
    """Integral over [0, horizon] of a step series, and its maximum inside the window."""
    t = series["t_min"].to_numpy(dtype=float)
    q = series["queue_len"].to_numpy(dtype=float)
    if t.size == 0 or horizon <= 0:
        return 0.0, 0
    t_next = np.append(t[1:], horizon)
    lo = np.clip(t, 0.0, horizon)
    hi = np.clip(t_next, 0.0, horizon)
    dt = np.maximum(hi - lo, 0.0)
    inside = (t_next > 0.0) & (t <= horizon)
    max_len = int(q[inside].max()) if inside.any() else 0
    return float(np.sum(q * dt)), max_len


def little_law(df: pd.DataFrame, horizon_min: float | None = None) -> dict[str, Any]:
    """Little's law for the waiting line over ``[0, horizon]``.

    ``L`` is the time-average number waiting (from :func:`queue_length_series`), ``lambda`` the
    arrivals per minute (arrivals at ``0 <= t <= horizon``), ``W`` the mean time each of those
    arrivals spent waiting inside the window: until plug-in, until it abandoned, or until the
    horizon if it was still queued. With these definitions ``L == lambda * W`` exactly (up to
    rounding); ``ratio`` is ``L / (lambda * W)`` (None when ``lambda * W`` is 0).
    Returns ``{"L", "lambda", "W", "ratio", "arrivals", "horizon_min"}``.
    """
    horizon = resolve_horizon(df, horizon_min)
    w = _window(df, horizon)
    all_sessions = sessions_table(w)
    s = all_sessions[all_sessions["t_arrive"].notna() & (all_sessions["t_arrive"] >= 0.0)]
    t_arr = s["t_arrive"].to_numpy(dtype=float)
    t_out = _queue_leave_times(s)
    t_out = np.where(np.isfinite(t_out), np.minimum(t_out, horizon), horizon)
    waited = np.maximum(t_out - t_arr, 0.0)
    n = int(t_arr.size)
    area, _ = _step_integral(_queue_series(all_sessions), horizon)
    if horizon > 0:
        L = area / horizon
        lam = n / horizon
    else:
        L, lam = math.nan, math.nan
    W = float(waited.mean()) if n else math.nan
    denom = lam * W
    ratio = L / denom if denom and math.isfinite(denom) else math.nan
    return _plain(
        {"L": L, "lambda": lam, "W": W, "ratio": ratio, "arrivals": n, "horizon_min": horizon}
    )


# --------------------------------------------------------------------------------------------
# utilisation
# --------------------------------------------------------------------------------------------


def _connectors(df: pd.DataFrame, sessions: pd.DataFrame) -> pd.DataFrame:
    """connector_id -> station_id, company_id (from connector_status, then from sessions)."""
    cs = df.loc[
        (df["kind"] == Kind.CONNECTOR_STATUS) & df["connector_id"].notna(),
        ["connector_id", "station_id", "company_id"],
    ]
    seen = sessions.loc[
        sessions["connector_id"].notna(), ["connector_id", "station_id", "company_id"]
    ]
    conns = pd.concat([cs, seen], ignore_index=True)
    conns = conns.groupby("connector_id", sort=False).first()
    return conns


def utilisation_table(df: pd.DataFrame, horizon_min: float | None = None) -> pd.DataFrame:
    """Per connector: station_id, company_id, occupied_min, utilisation (index connector_id).

    Occupied time is ``session_start -> session_end`` clipped to ``[0, horizon]``; a session with
    no end (inside the window) counts until the horizon.
    """
    horizon = resolve_horizon(df, horizon_min)
    w = _window(df, horizon)
    return _utilisation(w, sessions_table(w), horizon)


def _utilisation(w: pd.DataFrame, s: pd.DataFrame, horizon: float) -> pd.DataFrame:
    conns = _connectors(w, s)
    started = s[s["t_start"].notna() & s["connector_id"].notna()]
    lo = np.clip(started["t_start"].to_numpy(dtype=float), 0.0, horizon)
    hi = np.clip(started["t_end"].fillna(horizon).to_numpy(dtype=float), 0.0, horizon)
    busy = pd.Series(np.maximum(hi - lo, 0.0), index=started["connector_id"].to_numpy())
    occ = busy.groupby(level=0).sum().reindex(conns.index, fill_value=0.0)
    out = conns.copy()
    out["occupied_min"] = occ.astype(float)
    out["utilisation"] = out["occupied_min"] / horizon if horizon > 0 else math.nan
    return out


def _group_util(util: pd.DataFrame, by: str, horizon: float) -> dict[str, float]:
    g = util[util[by].notna()].groupby(by)["occupied_min"].agg(["sum", "size"])
    if horizon <= 0:
        return _natural_dict({k: math.nan for k in g.index})
    return _natural_dict((g["sum"] / (horizon * g["size"])).astype(float).to_dict())


# --------------------------------------------------------------------------------------------
# the summary
# --------------------------------------------------------------------------------------------


def _stats(x: np.ndarray) -> dict[str, Any]:
    if x.size == 0:
        return {"mean": None, "p50": None, "p95": None, "p99": None, "max": None, "n": 0}
    p50, p95, p99 = np.percentile(x, [50, 95, 99])
    return {
        "mean": float(np.mean(x)),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(np.max(x)),
        "n": int(x.size),
    }


def compute_metrics(df: pd.DataFrame, horizon_min: float | None = None) -> dict[str, Any]:
    """The run's summary over ``[0, horizon]`` as a JSON-serialisable dict.

    Keys (NaN is written as None)::

        wait_min            {mean, p50, p95, p99, max, n}   sessions that started charging
        sessions            sessions that started charging
        sessions_completed  sessions with a session_end
        abandoned           sessions that left the queue
        energy_kwh          total energy of completed sessions
        revenue             {total, per_company: {company: price sum}}
        utilisation         {per_station, per_connector, per_company: {id: fraction}, mean}
        balance             {stations: {jain, cv}, companies: {jain, cv}}  of utilisation
        stranded            distinct vehicles that ran out of energy
        trips               {started, completed}
        detour_km           {total, mean}  over station_chosen rows
        queue               {mean_len, max_len}  vehicles waiting network-wide
        bookings            {trips_requested, trips_booked, trips_rejected, trips_failed,
                             final: {OCPI status: bookings}, wait_booked_mean,
                             wait_walkin_mean, sessions_booked}  (empty trips when none)
        horizon_min         the horizon used
    """
    horizon = resolve_horizon(df, horizon_min)
    w = _window(df, horizon)
    s = sessions_table(w)
    kind = w["kind"]

    started = s[s["t_start"].notna()]
    waits = started["wait_min"].dropna().to_numpy(dtype=float)
    completed = s[s["status"] == "completed"]

    util = _utilisation(w, s, horizon)
    companies = sorted(
        {str(c) for c in util["company_id"].dropna()} | {str(c) for c in s["company_id"].dropna()},
        key=natural_key,
    )
    rev = completed.groupby("company_id")["price"].sum()
    per_company_rev = {c: float(rev.get(c, 0.0)) for c in companies}

    per_station = _group_util(util, "station_id", horizon)
    per_company = _group_util(util, "company_id", horizon)
    per_connector = _natural_dict(util["utilisation"].astype(float).to_dict())
    mean_util = (
        float(util["occupied_min"].sum() / (horizon * len(util)))
        if horizon > 0 and len(util)
        else math.nan
    )

    stranded = w.loc[kind == Kind.STRANDED, "vehicle_id"]
    n_stranded = int(stranded.dropna().nunique() + stranded.isna().sum())
    detour = w.loc[kind == Kind.STATION_CHOSEN, "distance_km"].dropna().to_numpy(dtype=float)

    area, max_len = _step_integral(_queue_series(s), horizon)

    metrics = {
        "wait_min": _stats(waits),
        "sessions": len(started),
        "sessions_completed": len(completed),
        "abandoned": int((s["status"] == "abandoned").sum()),
        "energy_kwh": float(completed["energy_kwh"].sum()),
        "revenue": {"total": float(completed["price"].sum()), "per_company": per_company_rev},
        "utilisation": {
            "per_station": per_station,
            "per_connector": per_connector,
            "per_company": per_company,
            "mean": mean_util,
        },
        "balance": {
            "stations": {
                "jain": jain_index(per_station.values()),
                "cv": coefficient_of_variation(per_station.values()),
            },
            "companies": {
                "jain": jain_index(per_company.values()),
                "cv": coefficient_of_variation(per_company.values()),
            },
        },
        "stranded": n_stranded,
        "trips": {
            "started": int((kind == Kind.TRIP_START).sum()),
            "completed": int((kind == Kind.TRIP_END).sum()),
        },
        "detour_km": {
            "total": float(detour.sum()),
            "mean": float(detour.mean()) if detour.size else math.nan,
        },
        "queue": {
            "mean_len": area / horizon if horizon > 0 else math.nan,
            "max_len": max_len,
        },
        "bookings": _booking_metrics(w, started),
        "horizon_min": horizon,
    }
    return _plain(metrics)


def _booking_metrics(w: pd.DataFrame, started: pd.DataFrame) -> dict[str, Any]:
    """Trip outcomes, final booking states, and waits of booked vs walk-in sessions."""
    trips = w[w["kind"] == Kind.TRIP_BOOKING]
    ever = trips.groupby("booking_id")["status"].agg(set) if len(trips) else pd.Series(dtype=object)

    def n_with(status: str) -> int:
        return int(sum(status in v for v in ever))

    books = w[w["kind"] == Kind.BOOKING].sort_values("t_min", kind="stable")
    final = books.groupby("booking_id")["status"].last().value_counts() if len(books) else {}
    booked = started["booking_id"].notna() if "booking_id" in started else pd.Series(False)
    wb = started.loc[booked, "wait_min"].dropna()
    ww = started.loc[~booked, "wait_min"].dropna()
    return {
        "trips_requested": len(ever),
        "trips_booked": n_with("BOOKED"),
        "trips_rejected": n_with("REJECTED"),
        "trips_failed": n_with("FAILED"),
        "final": {str(k): int(v) for k, v in dict(final).items()},
        "sessions_booked": int(booked.sum()),
        "wait_booked_mean": float(wb.mean()) if len(wb) else math.nan,
        "wait_walkin_mean": float(ww.mean()) if len(ww) else math.nan,
    }


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def write_metrics(metrics: Mapping[str, Any], path: str | Path) -> Path:
    """Write metrics as JSON (indent 2, NaN as null); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_plain(metrics), indent=2, allow_nan=False) + "\n")
    return p


def metrics_frame(metrics: Mapping[str, Any], label: str | None = None) -> pd.DataFrame:
    """Flatten metrics into a one-row DataFrame with dotted column names
    (``wait_min.p95``, ``utilisation.per_station.S1``, ...). ``label`` names the row; concat
    frames of several runs to compare them."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            flat[prefix] = math.nan if v is None else v

    walk("", metrics)
    return pd.DataFrame([flat], index=[label] if label is not None else None)
