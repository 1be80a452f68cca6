"""A company server in the SimPy model: it owns its stations' state and publishes it.

Station changes reach the network-wide status board (what every policy reads) only after
``status_delay_min``, the way MQTT status messages travel in the live network, so policies
decide on a snapshot that is as stale as the scenario says.
"""

from __future__ import annotations

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
        values = {
            "busy": station.busy,
            "queued": station.waiting,
            "online": station.online,
            "t_min": self.env.now,
            "mean_session_min": station.mean_session_min,
        }
        if self.delay <= 0:
            self.board.update(station.index, **values)
            return
        ev = self.env.timeout(self.delay)
        ev.callbacks.append(lambda _ev, i=station.index, v=values: self._land(i, v))

    def _land(self, index: int, values: dict) -> None:
        # messages can be overtaken by none (fixed delay), but keep the newest anyway
        if values["t_min"] >= self.board.observed_t_min[index]:
            self.board.update(index, **values)
