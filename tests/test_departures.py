"""Trips released a block at a time (:mod:`evsim.model.departures`) and rows written ahead as
columns (:meth:`evsim.trace.TraceWriter.write_ahead`).

* every first stretch walked as arrays is :func:`~evsim.planning.walk_rules`'s walk, to the
  last bit, trip by trip (decisions, arrivals, strandings, no route at all);
* the trace does not depend on the block size (blocks of 1, 7 and the default, in both modes
  that release trips this way; the default's digests are pinned in test_sim_fast_paths);
* rows written ahead as columns join the trace exactly where the same rows written one by one
  would, whatever else is written around them and whatever the batch size.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evsim.model import Simulation
from evsim.model.departures import FirstWalks, RouteTable, walk_first
from evsim.planning import Walk, walk_rules
from evsim.scenario import ChargingBehaviour, load_scenario
from evsim.trace import COLUMNS, Kind, TraceWriter

DATA = Path(__file__).resolve().parents[1] / "data"
_SIM = Simulation(load_scenario(DATA / "bahia.toml"))
_KIT = _SIM.drive_kit
_N = len(_KIT.node_ids)


def _digest(df: pd.DataFrame) -> str:
    return hashlib.sha256(pd.util.hash_pandas_object(df, index=True).values.tobytes()).hexdigest()


@settings(max_examples=200, deadline=None)
@given(
    trips=st.lists(
        st.tuples(
            st.integers(0, _N - 1),
            st.integers(0, _N - 1),
            st.floats(0.0, 1.0),
            st.floats(1e-4, 0.02),
        ),
        min_size=1,
        max_size=40,
    ),
    threshold=st.floats(0.05, 0.5),
    reserve=st.floats(0.0, 0.2),
    margin=st.floats(0.0, 0.2),
)
def test_walk_first_is_walk_rules_for_every_trip(
    trips: list[tuple[int, int, float, float]], threshold: float, reserve: float, margin: float
) -> None:
    ch = ChargingBehaviour(
        threshold_soc=threshold, reserve_soc=reserve, safety_margin_soc=margin, target_soc=0.9
    )
    table = RouteTable(_KIT)  # a fresh one: it grows as the trips bring routes
    origin = np.array([t[0] for t in trips], np.int32)
    dest = np.array([t[1] for t in trips], np.int32)
    soc = np.array([t[2] for t in trips])
    per_km = np.array([t[3] for t in trips])
    routes = table.numbers(origin, dest)
    got = walk_first(ch, table, routes, soc, per_km)
    for i, (o, d, s, pk) in enumerate(trips):
        want = walk_rules(ch, _KIT.legs(o, d), s, pk, frozenset())
        assert _walked(got, i) == want  # floats compared exactly
        assert table.legs[routes.item(i)] is _KIT.legs(o, d)


def _walked(got: FirstWalks, i: int) -> Walk:
    stranded_km = got.stranded_km.item(i) if got.stranded.item(i) else None
    return Walk(
        got.j.item(i),
        got.soc.item(i),
        got.minutes.item(i),
        got.km.item(i),
        got.stop_here.item(i),
        stranded_km,
    )


def test_walk_first_covers_every_outcome() -> None:
    """A decision, an arrival, a trip with no road at all and, with a reserve below zero
    (a first stretch cannot run dry otherwise: the rest of the route is in reach whenever no
    decision is due), running dry: forced here, so a random draw cannot miss one."""
    far = max(range(_N), key=lambda n: _KIT.roads.dist_km.item(0, n))
    origin = np.array([0, 0, 5, 0], np.int32)
    dest = np.array([far, far, 5, far], np.int32)
    soc = np.array([0.5, 1.0, 0.5, 0.05])
    per_km = np.array([0.004, 1e-5, 0.004, 0.02])
    seen = set()
    for ch in (
        ChargingBehaviour(threshold_soc=0.3, reserve_soc=0.1, safety_margin_soc=0.05),
        ChargingBehaviour.model_construct(
            threshold_soc=0.0, reserve_soc=-1.0, safety_margin_soc=0.0, target_soc=0.9
        ),
    ):
        table = RouteTable(_KIT)
        got = walk_first(ch, table, table.numbers(origin, dest), soc, per_km)
        for i in range(len(origin)):
            w = _walked(got, i)
            assert w == walk_rules(
                ch, _KIT.legs(origin.item(i), dest.item(i)), soc.item(i), per_km.item(i), ()
            )
            seen.add("stop" if w.stop_here else "dry" if w.stranded_km is not None else "end")
            if origin.item(i) == dest.item(i):
                assert (w.j, w.minutes, w.km, w.soc) == (0, 0.0, 0.0, 0.5)
    assert seen == {"stop", "dry", "end"}


@pytest.mark.parametrize("mode", ["on_arrival", "stop"])
def test_the_trace_does_not_depend_on_the_block_size(mode: str) -> None:
    sc = load_scenario(DATA / "bahia.toml").with_overrides(duration_min=600)
    digests = set()
    for block in (1, 7, 4096):
        sim = Simulation(sc, booking_mode=mode)
        sim.block_trips = block
        df = sim.run().trace
        assert df["t_min"].is_monotonic_increasing
        digests.add(_digest(df))
    assert len(digests) == 1


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["now", "ahead", "bulk", "release"]),
            st.integers(0, 3),  # the clock moves on by this much
            st.lists(st.integers(0, 4), max_size=5),  # rows ahead lie this far past it
        ),
        max_size=50,
    ),
    st.integers(1, 5),
)
def test_write_ahead_is_the_rows_written_one_by_one(ops: list, batch_rows: int) -> None:
    one, bulk = TraceWriter(batch_rows=batch_rows), TraceWriter(batch_rows=batch_rows)
    writers = [
        (
            w.row_writer(Kind.ARRIVE, "vehicle_id"),
            w.row_writer(Kind.TRIP_END, "vehicle_id", "soc", ahead=True),
        )
        for w in (one, bulk)
    ]
    clock = 0.0
    for k, (op, step, leads) in enumerate(ops):
        clock += step
        if op == "now":
            for now, _ in writers:
                now(clock, f"n{k}")
        elif op == "release":
            for w in (one, bulk):
                w.release(clock + sum(leads))
        else:
            rows = [(clock + lead, f"{op}{k}.{i}", i / 10) for i, lead in enumerate(leads)]
            for t, vid, soc in rows:
                writers[0][1](t, vid, soc)
            if op == "ahead":
                for t, vid, soc in rows:
                    writers[1][1](t, vid, soc)
            else:
                bulk.write_ahead(
                    len(rows),
                    t_min=[r[0] for r in rows],
                    kind=np.array([str(Kind.TRIP_END)] * len(rows)),
                    vehicle_id=[r[1] for r in rows],
                    soc=np.array([r[2] for r in rows]),
                )
    pd.testing.assert_frame_equal(one.to_frame(ahead=False), bulk.to_frame(ahead=False))
    pd.testing.assert_frame_equal(one.to_frame(), bulk.to_frame())
    assert one.rows_written == bulk.rows_written


def test_write_ahead_refuses_what_is_not_a_column() -> None:
    w = TraceWriter()
    with pytest.raises(TypeError, match="unknown trace column"):
        w.write_ahead(1, t_min=[1.0], kind=["trip_end"], vehicle="v1")
    with pytest.raises(TypeError, match="t_min and kind"):
        w.write_ahead(1, t_min=[1.0])
    with pytest.raises(ValueError, match="vehicle_id: 2 values for 1 rows"):
        w.write_ahead(1, t_min=[1.0], kind=["trip_end"], vehicle_id=["a", "b"])
    w.write_ahead(0, t_min=[], kind=[])
    w.write_ahead(1, t_min=[1.0], kind=["trip_end"], queue_len=np.array([3], np.int32))
    df = w.to_frame()
    assert df["queue_len"].tolist() == [3] and len(df.columns) == len(COLUMNS)
