"""The booking calendar of a participant: per connector, its active bookings in time order.

A mixin of :class:`evsim.protocol.participant.Participant` (it holds the state: the
bookings by id, and per connector the start times and ids of the active ones, which never
overlap), answering the questions a booking request asks: what conflicts with a window on a
connector, how many bookings are active at once in a pool of a station's connectors (the
walk-in share), which connector to hold (of those asked for: a free one, else one whose
holds can all be wounded) and which nearby windows to offer instead.  No I/O and no clock,
like the rest of :mod:`evsim.protocol`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from evsim.protocol.messages import Alternative
from evsim.protocol.states import BookingState

if TYPE_CHECKING:
    from evsim.protocol.participant import _Booking

_PENDING = BookingState.PENDING
_BLOCKING = (BookingState.PENDING, BookingState.RESERVED)


class BookingCalendar:
    """Connector calendars and the choices made from them (state kept by the subclass)."""

    stations: dict[str, tuple[str, ...]]
    max_alternatives: int
    _bookings: dict[str, _Booking]
    _starts: dict[str, list[float]]  # connector -> start_min of its active bookings, sorted
    _ids: dict[str, list[str]]  # connector -> their booking ids, in the same order
    _pool_of: dict[str, tuple[str, str]]  # connector -> its walk-in pool (station, class)
    _pools: dict[tuple[str, str], tuple[str, ...]]  # pool -> its connectors
    _reservable: dict[tuple[str, str], int]  # pool -> bookings that may be active at once

    def _index(self, b: _Booking) -> None:
        starts, ids = self._starts[b.connector_id], self._ids[b.connector_id]
        i = bisect_left(starts, b.start_min)
        starts.insert(i, b.start_min)
        ids.insert(i, b.booking_id)

    def _unindex(self, b: _Booking) -> None:
        starts = self._starts.get(b.connector_id)
        if starts is None:
            return
        ids = self._ids[b.connector_id]
        i = bisect_left(starts, b.start_min)
        while i < len(ids) and starts[i] == b.start_min:
            if ids[i] == b.booking_id:
                del starts[i], ids[i]
                return
            i += 1

    def _conflicts(self, connector_id: str, start_min: float, end_min: float) -> list[_Booking]:
        """Active bookings on the connector overlapping ``[start_min, end_min)``."""
        starts, ids = self._starts[connector_id], self._ids[connector_id]
        j = bisect_left(starts, end_min) - 1
        found: list[_Booking] = []
        while j >= 0:
            b = self._bookings[ids[j]]
            if b.end_min <= start_min:
                break
            found.append(b)
            j -= 1
        return found

    def blocked_until(self, connector_id: str, start_min: float, end_min: float) -> float | None:
        """Until when the reservations and holds on the connector (PENDING or RESERVED, not
        charging) keep a walk-in session over ``[start_min, end_min)`` off it: the latest
        end, ``max(end_min, start_min + grace_min)``, of those whose span overlaps the
        window; None when none does and the walk-in may start.  The simulation's stations
        and the live company servers admit walk-ins by it."""
        until: float | None = None
        for booking_id in self._ids[connector_id]:
            b = self._bookings[booking_id]
            if b.charging or b.state not in _BLOCKING:
                continue
            b_end = max(b.end_min, b.start_min + b.grace_min)
            if b.start_min < end_min and start_min < b_end:
                until = b_end if until is None or b_end > until else until
        return until

    def _peak(self, pool: tuple[str, str], start_min: float, end_min: float,
              skip: Iterable[_Booking] = ()) -> int:
        """Most bookings active at once on the pool's connectors during ``[start_min,
        end_min)`` (``skip``: bookings about to be wounded)."""
        gone = {b.booking_id for b in skip}
        edges: list[tuple[float, int]] = []
        for cid in self._pools[pool]:
            for b in self._conflicts(cid, start_min, end_min):
                if b.booking_id not in gone:
                    edges.append((max(b.start_min, start_min), 1))
                    edges.append((min(b.end_min, end_min), -1))
        edges.sort()  # at the same instant an end (-1) comes before a start (+1)
        peak = cur = 0
        for _, step in edges:
            cur += step
            peak = max(peak, cur)
        return peak

    def _walkins_keep(self, connector_id: str, start_min: float, end_min: float,
                      skip: Iterable[_Booking] = ()) -> bool:
        """Would one more booking over the window, on this connector, leave the walk-in
        share of its pool free?"""
        pool = self._pool_of[connector_id]
        room = self._reservable[pool]
        if room >= len(self._pools[pool]):
            return True  # walkin_share 0: nothing kept back
        return self._peak(pool, start_min, end_min, skip) < room

    def _choose(
        self,
        station_id: str,
        connector_id: str | None,
        start_min: float,
        end_min: float,
        priority: tuple[float, str] | None,
        connector_ids: Sequence[str] = (),
    ) -> tuple[str | None, list[_Booking]]:
        """Pick a connector (``connector_id``, else one of ``connector_ids``, else any of the
        station's, in the station's order): a free one, else one where every conflict can
        be wounded."""
        cands = self._candidates(station_id, connector_id, connector_ids)
        woundable: tuple[str, list[_Booking]] | None = None
        for cid in cands:
            conf = self._conflicts(cid, start_min, end_min)
            if not conf:
                return cid, []
            if (
                priority is not None
                and woundable is None
                and all(
                    b.state is _PENDING
                    and b.trip_id != priority[1]
                    and (b.priority_start_min, b.trip_id) > priority
                    for b in conf
                )
            ):
                woundable = (cid, conf)
        if woundable is not None:
            return woundable
        return None, []

    def _candidates(
        self, station_id: str, connector_id: str | None, connector_ids: Sequence[str]
    ) -> Sequence[str]:
        if connector_id is not None:
            return (connector_id,)
        cids = self.stations[station_id]
        if connector_ids:
            wanted = set(connector_ids)
            return [c for c in cids if c in wanted]
        return cids

    def _alternatives(
        self,
        station_id: str,
        connector_id: str | None,
        start_min: float,
        end_min: float,
        connector_ids: Sequence[str] = (),
    ) -> tuple[Alternative, ...]:
        """Free windows near the refused one: other connectors (of ``connector_ids`` when
        given), then later starts."""
        if station_id not in self.stations or not end_min > start_min:
            return ()
        alts: list[Alternative] = []
        cids = self._candidates(station_id, None, connector_ids)
        for cid in cids:
            if cid != connector_id and not self._conflicts(cid, start_min, end_min):
                alts.append(Alternative(cid, start_min, end_min))
        dur = end_min - start_min
        for cid in (connector_id,) if connector_id is not None else cids:
            s = start_min
            for _ in range(50):
                conf = self._conflicts(cid, s, s + dur)
                if not conf:
                    if s != start_min:
                        alts.append(Alternative(cid, s, s + dur))
                    break
                s = max(b.end_min for b in conf)
        alts = [a for a in alts if self._walkins_keep(a.connector_id, a.start_min, a.end_min)]
        alts.sort(key=lambda a: (a.start_min, a.connector_id))
        return tuple(alts[: self.max_alternatives])
