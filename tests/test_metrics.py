"""Metrics on hand-made traces with known answers, plus properties on random valid traces."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evsim.metrics import (
    coefficient_of_variation,
    compute_metrics,
    jain_index,
    little_law,
    metrics_frame,
    queue_length_series,
    sessions_table,
    utilisation_table,
    write_metrics,
)
from evsim.trace import Kind, TraceWriter, read_trace

# Network: station S1 (company A) has connectors c1, c2; station S2 (company B) has c3.
CONNECTORS = (("c1", "S1", "A"), ("c2", "S1", "A"), ("c3", "S2", "B"))
STATION_COMPANY = {"S1": "A", "S2": "B"}

# session, vehicle, station, arrive, start, connector, end, energy, price, abandon
SESSIONS = (
    ("s1", "v1", "S1", 0.0, 0.0, "c1", 30.0, 20.0, 10.0, None),  # wait 0
    ("s2", "v2", "S1", 10.0, 15.0, "c2", 55.0, 30.0, 15.0, None),  # wait 5
    ("s3", "v3", "S1", 20.0, 30.0, "c1", None, None, None, None),  # charging at the horizon
    ("s4", "v4", "S1", 40.0, None, None, None, None, None, 50.0),  # abandons after 10
    ("s5", "v5", "S2", 50.0, 50.0, "c3", 70.0, 10.0, 8.0, None),  # wait 0
    ("s6", "v6", "S2", 60.0, 70.0, "c3", 110.0, 25.0, 12.0, None),  # ends after horizon 100
    ("s7", "v7", "S1", 90.0, None, None, None, None, None, None),  # queued at the horizon
    ("s8", "v8", "S2", 95.0, None, None, None, None, None, None),  # queued at the horizon
)
HORIZON = 100.0


def build(writer: TraceWriter, sessions=SESSIONS, connectors=CONNECTORS) -> TraceWriter:
    """Emit a trace in time order (as the simulation does)."""
    rows: list[tuple[float, int, dict]] = []
    for conn, station, company in connectors:
        rows.append(
            (
                0.0,
                0,
                dict(
                    kind=Kind.CONNECTOR_STATUS,
                    station_id=station,
                    company_id=company,
                    connector_id=conn,
                    power_kw=50.0,
                    status="Available",
                ),
            )
        )
    for sid, vid, station, t_arr, t_start, conn, t_end, energy, price, t_ab in sessions:
        base = dict(
            session_id=sid, vehicle_id=vid, station_id=station, company_id=STATION_COMPANY[station]
        )
        rows.append((t_arr, 1, dict(kind=Kind.ARRIVE, soc=0.2, **base)))
        if t_start is not None:
            rows.append(
                (
                    t_start,
                    2,
                    dict(
                        kind=Kind.SESSION_START, connector_id=conn, wait_min=t_start - t_arr, **base
                    ),
                )
            )
        if t_end is not None:
            rows.append(
                (
                    t_end,
                    2,
                    dict(
                        kind=Kind.SESSION_END,
                        connector_id=conn,
                        energy_kwh=energy,
                        price=price,
                        power_kw=40.0,
                        soc=0.8,
                        **base,
                    ),
                )
            )
        if t_ab is not None:
            rows.append((t_ab, 2, dict(kind=Kind.ABANDON, wait_min=t_ab - t_arr, **base)))
    extra = [
        (0.0, dict(kind=Kind.TRIP_START, vehicle_id="v1", booking_id="t1")),
        (1.0, dict(kind=Kind.TRIP_START, vehicle_id="v2", booking_id="t2")),
        (2.0, dict(kind=Kind.TRIP_START, vehicle_id="v3", booking_id="t3")),
        (3.0, dict(kind=Kind.STATION_CHOSEN, vehicle_id="v1", station_id="S1", distance_km=1.5)),
        (4.0, dict(kind=Kind.STATION_CHOSEN, vehicle_id="v2", station_id="S1", distance_km=2.5)),
        (80.0, dict(kind=Kind.TRIP_END, vehicle_id="v1", booking_id="t1", distance_km=50.0)),
        (85.0, dict(kind=Kind.STRANDED, vehicle_id="v9", soc=0.0, distance_km=20.0)),
    ]
    rows += [(t, 3, cols) for t, cols in extra]
    for t, _, cols in sorted(rows, key=lambda r: (r[0], r[1])):
        cols = dict(cols)
        writer.emit(t, cols.pop("kind"), **cols)
    return writer


@pytest.fixture
def trace() -> pd.DataFrame:
    return build(TraceWriter(run_info={"horizon_min": HORIZON, "scenario": "hand"})).to_frame()


# ------------------------------------------------------------------------------------------
# sessions table
# ------------------------------------------------------------------------------------------


def test_sessions_table(trace: pd.DataFrame) -> None:
    s = sessions_table(trace).set_index("session_id")
    assert list(s.index) == ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s8"]
    assert s.loc["s2", "wait_min"] == 5.0
    assert s.loc["s2", "charge_min"] == 40.0
    assert s.loc["s2", "connector_id"] == "c2"
    assert s.loc["s2", "company_id"] == "A"
    assert s.loc["s6", "energy_kwh"] == 25.0
    assert s["status"].to_dict() == {
        "s1": "completed",
        "s2": "completed",
        "s3": "charging_at_end",
        "s4": "abandoned",
        "s5": "completed",
        "s6": "completed",  # no horizon given: the trace's own end row counts
        "s7": "queued_at_end",
        "s8": "queued_at_end",
    }
    assert math.isnan(s.loc["s4", "wait_min"])
    assert s.loc["s4", "t_abandon"] == 50.0
    # with a horizon, the end at 110 is outside the window
    assert (
        sessions_table(trace, horizon_min=HORIZON).set_index("session_id").loc["s6", "status"]
        == "charging_at_end"
    )


def test_wait_is_computed_from_times_not_copied(trace: pd.DataFrame) -> None:
    bad = trace.copy()
    bad.loc[bad["kind"] == Kind.SESSION_START, "wait_min"] = 999.0
    assert sessions_table(bad)["wait_min"].max() == 10.0


# ------------------------------------------------------------------------------------------
# compute_metrics
# ------------------------------------------------------------------------------------------


def test_compute_metrics_exact(trace: pd.DataFrame) -> None:
    m = compute_metrics(trace)  # horizon from run_info
    assert m["horizon_min"] == HORIZON
    # started sessions: s1 0, s2 5, s3 10, s5 0, s6 10
    assert m["wait_min"] == {"mean": 5.0, "p50": 5.0, "p95": 10.0, "p99": 10.0, "max": 10.0, "n": 5}
    assert m["sessions"] == 5
    assert m["sessions_completed"] == 3  # s6 ends after the horizon
    assert m["abandoned"] == 1
    assert m["energy_kwh"] == 60.0
    assert m["revenue"] == {"total": 33.0, "per_company": {"A": 25.0, "B": 8.0}}
    u = m["utilisation"]
    # c1: s1 0-30 + s3 30-100 (censored) = 100; c2: 15-55 = 40; c3: 50-70 + 70-100 (clipped) = 50
    assert u["per_connector"] == {"c1": 1.0, "c2": 0.4, "c3": 0.5}
    assert u["per_station"] == {"S1": 0.7, "S2": 0.5}
    assert u["per_company"] == {"A": 0.7, "B": 0.5}
    assert u["mean"] == pytest.approx(190 / 300)
    jain = 1.2**2 / (2 * (0.7**2 + 0.5**2))
    assert m["balance"]["stations"]["jain"] == pytest.approx(jain)
    assert m["balance"]["stations"]["cv"] == pytest.approx(0.1 / 0.6)
    assert m["balance"]["companies"]["jain"] == pytest.approx(jain)
    assert m["stranded"] == 1
    assert m["trips"] == {"started": 3, "completed": 1}
    assert m["detour_km"] == {"total": 4.0, "mean": 2.0}
    # queue: 1 on [10,15), [20,30), [40,50), [60,70), [90,95); 2 on [95,100) -> 50 / 100
    assert m["queue"] == {"mean_len": 0.5, "max_len": 2}


def test_horizon_argument_and_fallback(trace: pd.DataFrame) -> None:
    assert compute_metrics(trace, horizon_min=HORIZON) == compute_metrics(trace)
    bare = trace.copy()
    bare.attrs = {}
    m = compute_metrics(bare)  # last event time
    assert m["horizon_min"] == 110.0
    assert m["sessions_completed"] == 4
    assert m["revenue"]["per_company"] == {"A": 25.0, "B": 20.0}
    # c3: 50-70 and 70-110 -> 60 of 110
    assert m["utilisation"]["per_connector"]["c3"] == pytest.approx(60 / 110)
    # c1: s3 charges from 30 until the horizon 110 -> 30 + 80
    assert m["utilisation"]["per_connector"]["c1"] == pytest.approx(1.0)
    # a shorter horizon clips everything
    m50 = compute_metrics(trace, horizon_min=50.0)
    assert m50["utilisation"]["per_connector"] == {"c1": 1.0, "c2": 0.7, "c3": 0.0}
    assert m50["sessions"] == 4  # s5 starts exactly at 50: inside the closed window


def test_metrics_is_plain_json(trace: pd.DataFrame, tmp_path) -> None:
    m = compute_metrics(trace)
    text = json.dumps(m, allow_nan=False)  # raises on NaN / numpy types
    assert json.loads(text) == m
    p = write_metrics(m, tmp_path / "out" / "metrics.json")
    assert json.loads(p.read_text()) == m
    assert p.read_text().startswith('{\n  "wait_min"')


def test_empty_trace_metrics() -> None:
    m = compute_metrics(TraceWriter().to_frame())
    json.dumps(m, allow_nan=False)
    assert m["sessions"] == 0
    assert m["wait_min"]["n"] == 0 and m["wait_min"]["mean"] is None
    assert m["utilisation"]["mean"] is None
    assert m["queue"]["max_len"] == 0


def test_no_sessions_gives_zero_utilisation() -> None:
    df = build(TraceWriter(run_info={"horizon_min": 60}), sessions=()).to_frame()
    m = compute_metrics(df)
    assert m["utilisation"]["per_connector"] == {"c1": 0.0, "c2": 0.0, "c3": 0.0}
    assert m["utilisation"]["mean"] == 0.0
    assert m["balance"]["stations"] == {"jain": 1.0, "cv": 0.0}
    assert m["revenue"]["per_company"] == {"A": 0.0, "B": 0.0}
    assert m["detour_km"]["mean"] == 2.0


def test_metrics_frame(trace: pd.DataFrame) -> None:
    m = compute_metrics(trace)
    f = metrics_frame(m, label="hand")
    assert f.shape[0] == 1 and f.index[0] == "hand"
    assert f.loc["hand", "wait_min.p95"] == 10.0
    assert f.loc["hand", "utilisation.per_station.S1"] == 0.7
    assert f.loc["hand", "revenue.per_company.B"] == 8.0
    both = pd.concat([f, metrics_frame(compute_metrics(trace, horizon_min=50), label="h50")])
    assert both.shape[0] == 2


def test_utilisation_table(trace: pd.DataFrame) -> None:
    u = utilisation_table(trace)
    assert u.loc["c1", "station_id"] == "S1"
    assert u["occupied_min"].to_dict() == {"c1": 100.0, "c2": 40.0, "c3": 30.0 + 20.0}


# ------------------------------------------------------------------------------------------
# balance helpers
# ------------------------------------------------------------------------------------------


def test_jain_and_cv() -> None:
    assert jain_index([0.3, 0.3, 0.3, 0.3]) == pytest.approx(1.0)
    for n in (1, 2, 5, 10):
        assert jain_index([0.9] + [0.0] * (n - 1)) == pytest.approx(1 / n)
    assert jain_index([0.0, 0.0]) == 1.0
    assert math.isnan(jain_index([]))
    assert jain_index(np.array([1.0, 3.0])) == pytest.approx(16 / (2 * 10))
    assert coefficient_of_variation([2.0, 2.0]) == 0.0
    assert coefficient_of_variation([1.0, 3.0]) == pytest.approx(0.5)  # std 1, mean 2
    assert coefficient_of_variation([0.0, 0.0]) == 0.0
    assert math.isnan(coefficient_of_variation([]))
    assert coefficient_of_variation({"a": 1.0, "b": 3.0}.values()) == pytest.approx(0.5)


def test_balance_one_busy_station() -> None:
    conns = (("c1", "S1", "A"), ("c2", "S2", "B"), ("c3", "S3", "B"))
    STATION_COMPANY["S3"] = "B"
    try:
        sessions = (("s1", "v1", "S1", 0.0, 0.0, "c1", 50.0, 1.0, 1.0, None),)
        df = build(TraceWriter(run_info={"horizon_min": 100}), sessions, conns).to_frame()
    finally:
        del STATION_COMPANY["S3"]
    m = compute_metrics(df)
    assert m["utilisation"]["per_station"] == {"S1": 0.5, "S2": 0.0, "S3": 0.0}
    assert m["balance"]["stations"]["jain"] == pytest.approx(1 / 3)
    assert m["balance"]["stations"]["cv"] == pytest.approx(math.sqrt(2))
    assert m["balance"]["companies"]["jain"] == pytest.approx(1 / 2)


# ------------------------------------------------------------------------------------------
# queue and Little's law
# ------------------------------------------------------------------------------------------


def test_queue_series(trace: pd.DataFrame) -> None:
    q = queue_length_series(trace)
    assert list(zip(q["t_min"], q["queue_len"], strict=True)) == [
        (0.0, 0),
        (10.0, 1),
        (15.0, 0),
        (20.0, 1),
        (30.0, 0),
        (40.0, 1),
        (50.0, 0),  # s4 abandons, s5 arrives and plugs in at once: net -1
        (60.0, 1),
        (70.0, 0),
        (90.0, 1),
        (95.0, 2),
    ]
    s2 = queue_length_series(trace, station_id="S2")
    assert list(zip(s2["t_min"], s2["queue_len"], strict=True)) == [
        (0.0, 0),
        (60.0, 1),
        (70.0, 0),
        (95.0, 1),
    ]
    assert queue_length_series(trace, station_id="nowhere").to_dict("list") == {
        "t_min": [0.0],
        "queue_len": [0],
    }


def test_little_law_exact(trace: pd.DataFrame) -> None:
    r = little_law(trace, HORIZON)
    # 8 arrivals; time waiting inside [0, 100]: 0+5+10+10+0+10+10+5 = 50
    assert r["arrivals"] == 8
    assert r["L"] == 0.5
    assert r["lambda"] == 0.08
    assert r["W"] == 6.25
    assert r["L"] == pytest.approx(r["lambda"] * r["W"], rel=1e-15)
    assert r["ratio"] == pytest.approx(1.0, rel=1e-15)
    # the queue block of compute_metrics is the same L
    assert compute_metrics(trace)["queue"]["mean_len"] == r["L"]


# ------------------------------------------------------------------------------------------
# property: random valid traces
# ------------------------------------------------------------------------------------------


@st.composite
def random_trace(draw) -> tuple[pd.DataFrame, float, int, int]:
    """Random network and FIFO queues with patience; events after the horizon are cut off."""
    n_stations = draw(st.integers(1, 4))
    per_station = [draw(st.integers(1, 3)) for _ in range(n_stations)]
    n_companies = draw(st.integers(1, min(3, n_stations)))
    horizon = draw(st.floats(1.0, 500.0))
    times = st.floats(0.0, 600.0, allow_nan=False)
    w = TraceWriter(run_info={"horizon_min": horizon})
    rows: list[tuple[float, int, dict]] = []
    conns: dict[str, list[str]] = {}
    free: dict[str, list[float]] = {}  # per station: when each connector is next free
    for i, k in enumerate(per_station):
        station, company = f"S{i}", f"C{i % n_companies}"
        conns[station] = [f"S{i}-{j}" for j in range(k)]
        free[station] = [0.0] * k
        for c in conns[station]:
            rows.append(
                (
                    0.0,
                    0,
                    dict(
                        kind="connector_status",
                        station_id=station,
                        company_id=company,
                        connector_id=c,
                        power_kw=22.0,
                        status="Available",
                    ),
                )
            )
    n = draw(st.integers(0, 30))
    for idx, t_arr in enumerate(sorted(draw(st.lists(times, min_size=n, max_size=n)))):
        i = draw(st.integers(0, n_stations - 1))
        station = f"S{i}"
        service = draw(st.floats(0.1, 200.0))
        patience = draw(st.floats(0.0, 100.0))
        base = dict(
            session_id=f"s{idx}",
            vehicle_id=f"v{idx}",
            station_id=station,
            company_id=f"C{i % n_companies}",
        )
        rows.append((t_arr, 1, dict(kind="arrive", **base)))
        j = int(np.argmin(free[station]))
        t_start = max(t_arr, free[station][j])
        if t_start - t_arr > patience:
            rows.append((t_arr + patience, 2, dict(kind="abandon", **base)))
            continue
        free[station][j] = t_start + service
        c = conns[station][j]
        rows.append((t_start, 3, dict(kind="session_start", connector_id=c, **base)))
        rows.append(
            (
                t_start + service,
                2,
                dict(
                    kind="session_end",
                    connector_id=c,
                    energy_kwh=service / 6,
                    price=service / 10,
                    **base,
                ),
            )
        )
    for t, _, cols in sorted(rows, key=lambda r: (r[0], r[1])):
        if t <= horizon:
            cols = dict(cols)
            w.emit(t, cols.pop("kind"), **cols)
    n_companies_used = len({f"C{i % n_companies}" for i in range(n_stations)})
    return w.to_frame(), horizon, n_stations, n_companies_used


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_trace())
def test_properties_on_random_traces(case) -> None:
    df, horizon, n_stations, n_companies = case
    m = compute_metrics(df)
    json.dumps(m, allow_nan=False)
    eps = 1e-12
    u = m["utilisation"]
    for block in ("per_station", "per_connector", "per_company"):
        assert all(-eps <= v <= 1 + eps for v in u[block].values()), u[block]
    assert len(u["per_station"]) == n_stations
    for key, n in (("stations", n_stations), ("companies", n_companies)):
        jain = m["balance"][key]["jain"]
        assert 1 / n - eps <= jain <= 1 + eps
    r = little_law(df, horizon)
    if r["arrivals"]:
        assert math.isclose(r["L"], r["lambda"] * r["W"], rel_tol=1e-9, abs_tol=1e-9)
    assert m["queue"]["mean_len"] == pytest.approx(r["L"], abs=1e-12)
    assert m["sessions"] == m["wait_min"]["n"]
    s = sessions_table(df)
    assert (s["wait_min"].dropna() >= 0).all()
    assert m["sessions"] + m["abandoned"] + (s["status"] == "queued_at_end").sum() == len(s)


# ------------------------------------------------------------------------------------------
# Parquet round trip
# ------------------------------------------------------------------------------------------


def test_parquet_round_trip(trace: pd.DataFrame, tmp_path) -> None:
    path = tmp_path / "run" / "trace.parquet"
    with TraceWriter(path, batch_rows=4, run_info={"horizon_min": HORIZON}) as w:
        build(w)
    df = read_trace(tmp_path / "run")
    assert len(df) == len(trace)
    assert compute_metrics(df) == compute_metrics(trace)
    assert little_law(df) == little_law(trace)
    pd.testing.assert_frame_equal(sessions_table(df), sessions_table(trace))
