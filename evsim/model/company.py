"""A company server in the SimPy model: it owns its stations' state and publishes it.

Station changes reach the network-wide status board (what every policy reads) only after
``status_delay_min``, the way MQTT status messages travel in the live network, so policies
decide on a snapshot that is as stale as the scenario says.

The reports on their way travel on a :class:`StatusWire`: one delay for all, so they land in
the order they were sent, and the wire lands the due ones whenever the board is read (the
simulation's ``snapshot`` and ``board``), not with an event each: a run has about one report
per trace row (some 23,000 landing events in a 10x Bahia run, about 2% of its CPU).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from evsim.snapshot import StatusBoard

if TYPE_CHECKING:
    import simpy

    from evsim.model.station import SimStation

__all__ = ["CompanyServer", "StatusWire"]

# a report: station index, busy, queued, online, sent at, mean session minutes
Report = tuple[int, int, int, bool, float, float]


class StatusWire:
    """Status reports in flight to ``board``: each lands ``delay_min`` after it was sent."""

    def __init__(self, board: StatusBoard, delay_min: float) -> None:
        self.board = board
        self.delay_min = delay_min
        # (lands at, report), in the order sent, which is the order they land in
        self._in_flight: deque[tuple[float, Report]] = deque()

    def send(self, report: Report) -> None:
        if self.delay_min <= 0:
            self.board.set(*report)
        else:  # (lands at what a SimPy timeout of delay_min sent now would fire at)
            self._in_flight.append((report[4] + self.delay_min, report))

    def land(self, now: float) -> None:
        """Put every report due by ``now`` on the board (in the order sent)."""
        q = self._in_flight
        if not q or q[0][0] > now:
            return
        board = self.board
        observed = board.observed_t_min
        while q and q[0][0] <= now:
            report = q.popleft()[1]
            # messages can be overtaken by none (fixed delay), but keep the newest anyway
            if report[4] >= observed.item(report[0]):
                board.set(*report)


class CompanyServer:
    def __init__(self, env: simpy.Environment, company_id: str, wire: StatusWire) -> None:
        self.env = env
        self.company_id = company_id
        self.wire = wire
        self.stations: list[SimStation] = []
        self.up = True

    def report(self, station: SimStation) -> None:
        """Publish a station's state; it lands on the board after the status delay.

        Nothing is published while the server is down (an outage, see
        :mod:`evsim.model.protocol_bus`): the board keeps the last status it heard.
        """
        if not self.up:
            return
        self.wire.send(
            (
                station.index,
                station.busy,
                station.queued,
                station.online,
                self.env.now,
                station.mean_session_min,
            )
        )
