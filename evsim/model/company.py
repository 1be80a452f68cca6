"""A company server in the SimPy model: it owns its stations' state and publishes it.

Station changes reach the network-wide status board (what every policy reads) only after
``status_delay_min``, the way MQTT status messages travel in the live network, so policies
decide on a snapshot that is as stale as the scenario says.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING

import simpy

from evsim.snapshot import StatusBoard

if TYPE_CHECKING:
    from evsim.model.station import SimStation

__all__ = ["CompanyServer"]


class CompanyServer:
    def __init__(
        self, env: simpy.Environment, company_id: str, board: StatusBoard, status_delay_min: float
    ) -> None:
        self.env = env
        self.company_id = company_id
        self.board = board
        self.delay = status_delay_min
        self.stations: list[SimStation] = []
        self.up = True
        # reports in flight, grouped by the instant they were sent (one timeout per group:
        # a station usually reports twice at once, e.g. a vehicle arriving and plugging in)
        # (each report: station index, busy, waiting, online, sent at, mean session minutes)
        self._in_flight: deque[list[tuple[int, int, int, bool, float, float]]] = deque()
        self._last_sent = -math.inf

    def report(self, station: SimStation) -> None:
        """Publish a station's state; it lands on the board after the status delay.

        Nothing is published while the server is down (an outage, see
        :mod:`evsim.model.protocol_bus`): the board keeps the last status it heard.
        """
        if not self.up:
            return
        env = self.env
        now = env.now
        report = (
            station.index,
            station.busy,
            station.queued,
            station.online,
            now,
            station.mean_session_min,
        )
        if self.delay <= 0:
            self.board.set(*report)
            return
        if now == self._last_sent:  # lands with the group sent at this instant
            self._in_flight[-1].append(report)
            return
        self._last_sent = now
        self._in_flight.append([report])
        # a plain Timeout (what env.timeout makes) with one bound callback; every report
        # sent at one instant lands at one instant, in the order sent, so one timeout per
        # instant lands them as one per report did
        simpy.Timeout(env, self.delay).callbacks.append(self._land)

    def _land(self, _ev: object = None) -> None:
        board = self.board
        observed = board.observed_t_min
        for report in self._in_flight.popleft():
            # messages can be overtaken by none (fixed delay), but keep the newest anyway
            if report[4] >= observed.item(report[0]):
                board.set(*report)
