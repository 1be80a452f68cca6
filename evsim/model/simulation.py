"""One simulation run: build the world, wire stations and company servers, run SimPy.

The environment only schedules. A source process releases each trip's vehicle process at its
departure time; stations, company servers and the status board hold the state; the policy is
the pure function resolved from the registry. Events stream into a :class:`TraceWriter`.

``booking_mode`` (default: the scenario's ``booking.mode``) picks how vehicles get a charger:
``"on_arrival"`` (:func:`~evsim.model.departures.release_block` and
:func:`~evsim.model.vehicle.depart`),
``"trip"`` (:func:`~evsim.model.booking.booked_trip_process`: book every stop through the
reservation protocol, run by :class:`~evsim.model.protocol_bus.ProtocolBus`) or ``"stop"``
(:class:`~evsim.model.stop_booking.StopBooking`: as ``on_arrival``, each stop booked when
the vehicle decides to make it; the live network's default). The bus also runs
whenever the scenario has server outages; without outages the ``on_arrival`` mode never builds
it. In the ``on_arrival`` mode a trip with no charging decision on the way has no process and
no event: its rows are written to the trace ahead of time, and the source only wakes up for
the trips that will stop. The trace is row for row what one process per trip wrote.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import simpy

from evsim.model.booking import booked_trip_process
from evsim.model.company import CompanyServer, StatusWire
from evsim.model.demand import Trips, generate_trips
from evsim.model.departures import BLOCK_TRIPS, release_block
from evsim.model.protocol_bus import ProtocolBus
from evsim.model.station import SimStation
from evsim.model.stop_booking import StopBooking
from evsim.model.vehicle import DriveKit, depart
from evsim.model.world import World
from evsim.policies import resolve
from evsim.scenario import Scenario
from evsim.snapshot import NetworkSnapshot, StatusBoard
from evsim.trace import Kind, TraceWriter

__all__ = ["BOOKING_MODES", "SimResult", "Simulation"]

BOOKING_MODES = ("on_arrival", "trip", "stop")


@dataclass
class SimResult:
    scenario: str
    policy: str
    seed: int
    horizon_min: float
    trace_path: Path | None
    trace_rows: int
    trips: int
    wall_s: float = 0.0
    events: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    booking: str = "on_arrival"
    _frame: pd.DataFrame | None = field(default=None, repr=False)

    @property
    def trace(self) -> pd.DataFrame:
        """The trace as a DataFrame (read from Parquet when the run wrote one)."""
        if self._frame is None:
            from evsim.trace import read_trace

            assert self.trace_path is not None
            self._frame = read_trace(self.trace_path)
        return self._frame


class Simulation:
    def __init__(
        self,
        scenario: Scenario,
        policy: str | None = None,
        params: Mapping[str, float] | None = None,
        seed: int | None = None,
        trace_path: str | Path | None = None,
        trips_scale: float = 1.0,
        world: World | None = None,
        booking_mode: str | None = None,
    ) -> None:
        self.scenario = scenario
        self.booking_mode = booking_mode or scenario.booking.mode
        if self.booking_mode not in BOOKING_MODES:
            raise ValueError(
                f"unknown booking mode {self.booking_mode!r}; known: {', '.join(BOOKING_MODES)}"
            )
        self.world = world or World.build(scenario)
        self.seed = scenario.seed if seed is None else int(seed)
        self.policy_name = policy or scenario.policy.name
        if params is None:
            params = scenario.policy.params if self.policy_name == scenario.policy.name else {}
        self.params = dict(params)
        self.policy = resolve(self.policy_name, self.params)
        self.env = simpy.Environment()
        self.horizon_min = scenario.duration_min
        self.trace = TraceWriter(
            trace_path,
            run_info={
                "source": "sim",
                "scenario": scenario.name,
                "policy": self.policy_name,
                "params": self.params,
                "seed": self.seed,
                "horizon_min": self.horizon_min,
                "booking": self.booking_mode,
            },
        )
        st = self.world.stations
        self._board = StatusBoard(len(st))
        self._snapshot = NetworkSnapshot.of(st, self.world.roads, self._board)
        self.status_wire = StatusWire(self._board, scenario.network.status_delay_min)
        self.companies = {
            c.id: CompanyServer(self.env, c.id, self.status_wire) for c in scenario.companies
        }
        self.stations: list[SimStation] = []
        for i, sid in enumerate(st.ids):
            company = self.companies[st.company_ids[i]]
            s = SimStation(
                self.env, i, sid, company.company_id, self.world.connectors[i], self.trace, company
            )
            company.stations.append(s)
            self.stations.append(s)
            for spec in s.connectors:
                self.trace.emit(
                    0.0,
                    Kind.CONNECTOR_STATUS,
                    station_id=sid,
                    company_id=company.company_id,
                    connector_id=spec.connector_id,
                    power_kw=spec.power_kw,
                    status="Available",
                    detail=spec.type,
                )
        self.trips: Trips = generate_trips(self.world, self.seed, trips_scale)
        self.bus: ProtocolBus | None = None
        if self.booking_mode != "on_arrival" or scenario.network.outages:
            self.bus = ProtocolBus(self)
        if self.booking_mode != "on_arrival":
            assert self.bus is not None
            for s in self.stations:
                s.attach_desk(self.bus.desks[s.index])
        self.drive_kit = DriveKit(self)
        self.block_trips = BLOCK_TRIPS  # departures the source releases at a time

    @property
    def board(self) -> StatusBoard:
        """The network-wide status board as of now (reports due by now have landed)."""
        self.status_wire.land(self.env.now)
        return self._board

    @property
    def snapshot(self) -> NetworkSnapshot:
        """What policies read: stations, roads and the board as of now (a read-only view)."""
        self.status_wire.land(self.env.now)
        return self._snapshot

    def _source(self) -> Generator[simpy.Event, Any, None]:
        """Release every trip at its departure time."""
        env = self.env
        # Python floats, not numpy scalars: the same values, but SimPy's clock (and every
        # time computed from it) would otherwise become np.float64, which is slow arithmetic
        times = self.trips.depart_t_min.tolist()
        if self.booking_mode == "trip":
            for k, t in enumerate(times):
                if t > env.now:
                    yield env.timeout(t - env.now)
                env.process(booked_trip_process(self, k))
            return
        # on_arrival and stop: wake up only for the trips that will stop to charge; the
        # others are written ahead, a block of departures at a time (release_block).
        # ``clock`` is the time each trip leaves: where one timeout per trip (``t - now``
        # each) put SimPy's clock, to the last bit
        clock: float = env.now
        stop_app = StopBooking if self.booking_mode == "stop" else None
        prev = -1  # the last trip that left with a process
        block = self.block_trips
        for first in range(0, len(times), block):
            clocks = []
            for t in times[first : first + block]:
                if t > clock:
                    clock = clock + (t - clock)
                clocks.append(clock)
            for k, d, w in release_block(self, first, clocks):
                at = clocks[k - first]
                if at > env.now:
                    delay = at - env.now
                    if env.now + delay == at:
                        yield simpy.Timeout(env, delay)
                    else:  # one timeout lands elsewhere: step through the departures since
                        for tp in times[prev + 1 : k + 1]:
                            if tp > env.now:
                                yield simpy.Timeout(env, tp - env.now)
                prev = k
                depart(self, d, w, app=stop_app)

    def run(self, progress: Callable[[float], None] | None = None, steps: int = 100) -> SimResult:
        """Run to the horizon. ``progress(t_min)`` is called ``steps`` times along the way."""
        import time

        t0 = time.perf_counter()
        self.env.process(self._source())
        # the world, the trips and everything imported are long-lived: freeze them out of the
        # cyclic GC for the run, whose collections would otherwise go through all of them
        # again and again (a fifth of the run's time); what the run itself makes is
        # collected as usual. Not when someone else froze objects (we would thaw theirs).
        frozen = gc.isenabled() and gc.get_freeze_count() == 0
        if frozen:
            gc.freeze()
        try:
            if progress is None:
                self.env.run(until=self.horizon_min)
            else:
                for i in range(1, steps + 1):
                    self.env.run(until=self.horizon_min * i / steps)
                    progress(self.env.now)
        finally:
            if frozen:
                gc.unfreeze()
        self.status_wire.land(self.env.now)  # the board as of the stop
        # the rows written ahead up to the stop; the later ones belong to events not reached
        self.trace.release(self.env.now)
        self.trace.close()
        wall = time.perf_counter() - t0
        frame = self.trace.to_frame(ahead=False) if self.trace.path is None else None
        return SimResult(
            scenario=self.scenario.name,
            policy=self.policy_name,
            seed=self.seed,
            horizon_min=self.horizon_min,
            trace_path=self.trace.path,
            trace_rows=self.trace.rows_written,
            trips=len(self.trips),
            wall_s=wall,
            events=next(self.env._eid),  # SimPy's event counter: events scheduled so far
            booking=self.booking_mode,
            _frame=frame,
        )
