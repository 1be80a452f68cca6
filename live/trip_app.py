"""Trip-mode driver app of the live vehicle agent: :class:`TripApp` books a whole trip's
charging stops over REST.

With ``booking="trip"`` (:mod:`live.vehicle_agent`) each vehicle runs the driver app of the
simulation's ``trip`` booking mode (:mod:`evsim.model.booking`): the home server plans the
trip's stops (``POST /plans``: :func:`evsim.planning.plan_trip` with its policy and snapshot)
and the app books them with the same pure rules (:mod:`evsim.planning`: rolling horizon,
rebooking, keeping reservations across re-plans), driving
:func:`evsim.booking_app.booking_round` with asyncio. The fleet's trip loop
(:class:`live.vehicle_agent.Fleet`) calls its hooks: :meth:`TripApp.depart`,
:meth:`TripApp.take`, :meth:`TripApp.replan_from`, :meth:`TripApp.finish`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from evsim import booking_app
from evsim.booking_app import Answer, Choose, Send, Window, booking_round
from evsim.planning import PlannedStop, VehicleParams, back_to_city, class_connectors
from evsim.protocol import Alternative
from live.vehicle_agent import ApiError, Fleet, VehicleRun

__all__ = ["Held", "TripApp"]

log = logging.getLogger(__name__)


@dataclass
class Held:
    """A reservation the vehicle holds for a stop of its current plan."""

    trip_id: str
    booking: dict[str, Any]  # BookedStopPublic: booking_id, company_id, start_min, ...


class TripApp:
    """The driver app of the simulation's ``trip`` booking mode
    (:class:`evsim.model.booking.BookedTrip`) over REST, for one vehicle.

    The plan comes from the home server (``POST /plans``: :func:`evsim.planning.plan_trip`
    with the server's policy over its network snapshot); which stops to book and when
    (:func:`~evsim.booking_app.stops_to_book`, :func:`~evsim.booking_app.next_booking_min`: the
    ``booking.max_advance_min`` horizon, in the background while driving), how to rebook a
    REJECTED stop (:func:`~evsim.booking_app.rebook_choice`: a later window at most
    ``booking.max_shift_min`` away, else another station -- ``POST /plans`` in ``stop`` mode:
    :func:`~evsim.planning.choose_again` -- up to ``booking.max_attempts`` requests per
    round) and which reservations survive a re-plan on leaving a station
    (:func:`~evsim.booking_app.kept_stop`) are the same pure functions the simulation uses; the
    booking round is the simulation's :func:`evsim.booking_app.booking_round`, driven here
    with asyncio.

    Differences to the simulation: the times are the trip's scenario-time cursor (the vehicle
    never waits for an answer: the plan's times hold, no ``offset``); the company server
    traces the trip requests (``trip_booking`` rows, trip ids ``{vehicle}.{hex}``). A stop is
    booked on the planned class (``connector_ids``: that class's connectors) as in the
    simulation, and the walk-in share is kept per class there and here
    (``Participant(pools=...)``).
    """

    def __init__(self, fleet: Fleet, run: VehicleRun, params: VehicleParams, dest: int,
                 skip_at: set[int]) -> None:
        self.fleet = fleet
        self.run = run
        self.params = params
        self.dest = dest
        self.skip_at = skip_at  # the trip loop's: cities where the vehicle charged (or asked)
        self.cfg = fleet.scenario.booking
        self.active = True
        self.plan: tuple[PlannedStop, ...] = ()
        self.next = 0  # index in plan of the next stop to come
        self.held: dict[int, Held] = {}  # plan index -> reservation
        self.busy: dict[int, PlannedStop] = {}  # id -> stop being booked now
        self.tried: dict[int, PlannedStop] = {}  # id -> stop left to walk in
        self.at_station = False  # between a decision and leaving the station
        self._tasks: set[asyncio.Task[Any]] = set()
        self._wake: tuple[float, asyncio.Task[Any]] | None = None

    # -- plans ----------------------------------------------------------------------------

    async def _plans(self, city: int, soc: float, t: float, skip: set[int],
                     **extra: Any) -> tuple[PlannedStop, ...]:
        f, p = self.fleet, self.params
        names = f.world.roads.node_ids
        body = {
            "vehicle_id": p.vehicle_id, "city": names[city], "destination": names[self.dest],
            "soc": min(max(soc, 0.0), 1.0), "battery_kwh": p.battery_kwh,
            "consumption_kwh_per_km": p.per_km * p.battery_kwh, "max_dc_kw": p.max_dc_kw,
            "max_ac_kw": p.max_ac_kw, "t_min": max(t, 0.0),
            "skip_at": [names[n] for n in sorted(skip)], "avoid": list(self.run.gave_up), **extra,
        }
        try:
            token = await f._token(self.run, self.run.home)
            r = await f.servers[self.run.home].call("POST", "/plans", token=token,
                                                    json_body=body)
        except ApiError as exc:
            log.info("%s: planning failed: %s", p.vehicle_id, exc)
            return ()
        return tuple(self._stop(d) for d in r.get("stops", []))

    def _stop(self, d: dict[str, Any]) -> PlannedStop:
        f = self.fleet
        return PlannedStop(
            f.world.roads.index[d["decision_city"]], f._station[d["station_id"]],
            d["station_id"], float(d["arrive_min"]), float(d["soc_in"]), float(d["soc_out"]),
            float(d["charge_min"]), float(d["power_kw"]), float(d["connector_power_kw"]),
            str(d["connector_type"]), float(d["detour_km"]), float(d["decide_min"]),
            float(d["decide_soc"]),
        )

    async def depart(self, pos: int, soc: float, t: float) -> bool:
        """Plan at the origin and book the stops within the horizon; False: no stop needed
        (the app is off: the vehicle charges on arrival)."""
        stops = await self._plans(pos, soc, t, set(self.skip_at))
        if not stops:
            self.active = False
            return False
        self._set_plan(stops)
        due = self._due(t)
        if due:
            await self._round(due, kick=False)
        self._kick()
        return True

    def _set_plan(self, stops: tuple[PlannedStop, ...]) -> None:
        """Adopt a new plan; keep the reservations that still fit it, cancel the others."""
        old, held = self.plan, self.held
        self.plan, self.next, self.tried, self.held = stops, 0, {}, {}
        drop: list[str] = []
        for i, h in held.items():
            k = booking_app.kept_stop(old[i], float(h.booking["start_min"]), stops,
                                      self.cfg.slot_min, self.cfg.grace_min, taken=self.held)
            if k is None:
                if h.trip_id not in drop:
                    drop.append(h.trip_id)
            else:
                self.held[k] = h
        for tid in drop:
            self._drop_trip(tid)

    async def replan_from(self, index: int, soc: float, t: float) -> None:
        """The vehicle leaves station ``index`` at ``t`` with ``soc``: plan the rest again
        (from the station's city, after the access road, as the vehicle drives on)."""
        if not self.active:
            return
        st = self.fleet.world.stations
        back_min, soc = back_to_city(soc, self.params.per_km, st.access_km_list[index])
        node, t = st.node_list[index], t + back_min
        stops = await self._plans(node, soc, t, set(self.skip_at))
        if not self.active:
            return
        self.at_station = False
        self._set_plan(stops)
        self._kick()

    # -- booking rounds -------------------------------------------------------------------

    def _blocked(self) -> set[int]:
        return {i for i in range(self.next, len(self.plan))
                if id(self.plan[i]) in self.busy or id(self.plan[i]) in self.tried}

    def _due(self, now: float) -> list[int]:
        if self.at_station:
            return []  # its times are unknown until it leaves: re-planned then
        return booking_app.stops_to_book(self.plan, now, self.cfg.max_advance_min, first=self.next,
                             held=self.held, blocked=self._blocked())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _kick(self) -> None:
        """Book what is due now (in the background), or wake up when the next stop is."""
        if not self.active or self.at_station:
            return
        due = self._due(self.fleet.clock())
        if due:
            self._spawn(self._round(due))
            return
        t = booking_app.next_booking_min(self.plan, self.cfg.max_advance_min, first=self.next,
                             held=self.held, blocked=self._blocked())
        if t is None or (self._wake is not None and not self._wake[1].done()
                         and self._wake[0] <= t):
            return
        if self._wake is not None:
            self._wake[1].cancel()

        async def wake() -> None:
            await asyncio.sleep(max(self.fleet.clock.wall_at(t) - time.time(), 0.0))
            self._wake = None
            self._kick()

        self._wake = (t, asyncio.create_task(wake()))

    def _request(self, stops: Sequence[PlannedStop],
                 windows: Sequence[Window]) -> list[dict[str, Any]]:
        out = []
        connectors = self.fleet.world.connectors
        for s, w in zip(stops, windows, strict=True):
            stop: dict[str, Any] = {"station_id": s.station_id, "start_min": w.start_min,
                                    "end_min": w.end_min, "grace_min": self.cfg.grace_min}
            # the class the stop was planned on, as the simulation books it (and alternatives
            # on it); one connector of it when an offered window named one
            stop["connector_ids"] = list(class_connectors(
                connectors[s.station_index], s.connector_power_kw, s.connector_type))
            if w.connector_id is not None:
                stop["connector_id"] = w.connector_id
            out.append(stop)
        return out

    async def _round(self, idx: list[int], kick: bool = True) -> None:
        """Book plan stops ``idx``: drive :func:`evsim.booking_app.booking_round`."""
        cfg = self.cfg
        app = booking_round(self, idx, cfg.max_attempts, cfg.max_shift_min)
        try:
            reply: Any = None
            while True:
                try:
                    effect = app.send(reply)
                except StopIteration:
                    return
                if isinstance(effect, Send):
                    reply = await self._send(effect)
                elif isinstance(effect, Choose):
                    reply = await self._choose_again(effect.index, effect.stop, effect.excluded)
                else:
                    self._spawn(self._cancel(effect.answer.trip_id))
                    reply = None
        finally:
            app.close()
            if kick:
                self._kick()

    async def _send(self, e: Send) -> Answer | None:
        trip = await self.fleet._request_trip(self.run, self._request(e.stops, e.windows))
        if trip is None:
            return None
        outcome = str(trip.get("outcome"))
        alts = [Alternative(str(a["connector_id"]), float(a["start_min"]), float(a["end_min"]))
                for a in trip.get("alternatives", [])] if outcome == "REJECTED" else []
        return Answer(outcome, str(trip.get("trip_id", "")), trip.get("failed_stop"), alts,
                      trip.get("bookings", []))

    # -- the TripHost side of booking_round

    def window(self, s: PlannedStop) -> Window:
        start, end = booking_app.booking_window(s, self.cfg.slot_min)
        return Window(start, end, None, start)

    def beyond_horizon(self, s: PlannedStop) -> bool:
        return s.arrive_min > self.fleet.clock() + self.cfg.max_advance_min

    def hold(self, idx: Sequence[int], windows: Sequence[Window], answer: Answer) -> None:
        for i, b in zip(idx, answer.bookings, strict=False):
            self.held[i] = Held(answer.trip_id, b)

    async def _choose_again(self, i: int, s: PlannedStop,
                            excluded: frozenset[int]) -> PlannedStop | None:
        """The home server's :func:`evsim.planning.choose_again` for plan stop ``i``."""
        names = self.fleet.world.stations.ids
        skip = set(self.skip_at) | {p.decision_node for p in self.plan[: i + 1]}
        got = await self._plans(s.decision_node, s.decide_soc, s.decide_min, skip, mode="stop",
                                exclude=[names[k] for k in sorted(excluded)])
        return got[0] if got else None

    def replace(self, i: int, new: PlannedStop) -> None:
        """Plan stop ``i`` becomes ``new``; the stops after it are unknown until then."""
        for k in [k for k in self.held if k > i]:
            h = self.held.get(k)
            if h is not None:
                self._drop_trip(h.trip_id)
        self.plan = (*self.plan[:i], new)

    # -- cancels ---------------------------------------------------------------------------

    def _drop_trip(self, tid: str) -> None:
        """Forget the reservations of request ``tid`` and cancel it at the home server."""
        for k in [k for k, h in self.held.items() if h.trip_id == tid]:
            del self.held[k]
        self._spawn(self._cancel(tid))

    async def _cancel(self, tid: str) -> None:
        f = self.fleet
        for _ in range(20):
            try:
                await f.servers[self.run.home].call(
                    "DELETE", f"/bookings/{tid}", token=self.run.tokens[self.run.home],
                    ok=(200, 202, 204))
                return
            except ApiError as exc:
                if exc.reason != "trip_pending":
                    log.info("%s: cancelling trip %s: %s", self.params.vehicle_id, tid, exc)
                    return
            await asyncio.sleep(max(self.fleet.poll_s, 0.05))

    # -- the trip loop's hooks -------------------------------------------------------------

    def unusable(self, held: Held) -> None:
        """The stop's booking could not be used at the station (expired, its connector
        busy past the patience...): the rest of that request's trip goes too, as in the
        simulation (:meth:`evsim.model.booking.BookedTrip.visit`); the re-plan that follows
        books those stops again."""
        self._drop_trip(held.trip_id)

    def take(self, pos: int) -> tuple[PlannedStop, Held] | None:
        """At decision city ``pos``: the booked stop if there is one; None: walk in."""
        i = self.next
        self.at_station = True
        if i < len(self.plan) and self.plan[i].decision_node == pos:
            self.next = i + 1
            h = self.held.pop(i, None)
            if h is not None:
                return self.plan[i], h
        return None

    async def finish(self) -> None:
        """The trip is over: cancel the reservations it did not use, wait for the requests."""
        self.active = False
        if self._wake is not None:
            self._wake[1].cancel()
            self._wake = None
        for tid in dict.fromkeys(h.trip_id for h in self.held.values()):
            self._drop_trip(tid)
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
