"""A company server in the SimPy model: it owns its stations' state and publishes it.

Station changes reach the network-wide status board (what every policy reads) only after
``status_delay_min``, the way MQTT status messages travel in the live network, so policies
decide on a snapshot that is as stale as the scenario says.
"""

from __future__ import annotations

from functools import partial
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

    def report(self, station: SimStation) -> None:
        """Publish a station's state; it lands on the board after the status delay.

        Nothing is published while the server is down (an outage, see
        :mod:`evsim.model.protocol_bus`): the board keeps the last status it heard.
        """
        if not self.up:
            return
        env = self.env
        values = (station.busy, station.waiting, station.online, env.now, station.mean_session_min)
        if self.delay <= 0:
            self.board.set(station.index, *values)
            return
        # a plain Timeout (what env.timeout makes) with one bound callback: the same event,
        # scheduled at the same point, as before; just less Python per report
        ev = simpy.Timeout(env, self.delay)
        ev.callbacks.append(partial(self._land, station.index, values))

    def _land(
        self, index: int, values: tuple[int, int, bool, float, float], _ev: object = None
    ) -> None:
        # messages can be overtaken by none (fixed delay), but keep the newest anyway
        if values[3] >= self.board.observed_t_min[index]:
            self.board.set(index, *values)
