"""The static world a run needs, built once from a scenario: roads, stations, connectors.

Nothing here changes during a run; the SimPy processes and the live servers both start from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evsim.geo import RoadNetwork
from evsim.scenario import Scenario, TariffConfig, VehicleModelConfig
from evsim.snapshot import StationTable

__all__ = ["ConnectorSpec", "World"]


@dataclass(frozen=True, slots=True)
class ConnectorSpec:
    connector_id: str  # unique across the network: "<station>/<n>"
    station_index: int
    power_kw: float
    type: str  # "AC" or "DC"


@dataclass(frozen=True, eq=False)
class World:
    scenario: Scenario
    roads: RoadNetwork
    stations: StationTable
    connectors: tuple[tuple[ConnectorSpec, ...], ...]  # per station
    tariffs: tuple[TariffConfig | None, ...]  # per station
    vehicle_models: tuple[VehicleModelConfig, ...]

    @classmethod
    def build(cls, scenario: Scenario) -> World:
        roads = RoadNetwork.from_scenario(scenario)
        stations = StationTable.from_scenario(scenario, roads)
        conns: list[tuple[ConnectorSpec, ...]] = []
        for i, s in enumerate(scenario.stations):
            specs: list[ConnectorSpec] = []
            for c in s.connectors:
                for _ in range(c.count):
                    specs.append(ConnectorSpec(f"{s.id}/{len(specs) + 1}", i, c.power_kw, c.type))
            conns.append(tuple(specs))
        tariffs = tuple(scenario.tariff_for(s) for s in scenario.stations)
        return cls(scenario, roads, stations, tuple(conns), tariffs, tuple(scenario.vehicle_models))

    @property
    def n_connectors(self) -> int:
        return int(np.sum(self.stations.n_connectors))
