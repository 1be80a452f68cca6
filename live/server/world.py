"""The static world a company server needs, built from the scenario without SimPy.

``evsim.model.world.World`` would do, but importing ``evsim.model`` pulls in SimPy; the
server only needs roads, the station table, connector specs and tariffs.  Connector ids follow
the model's convention ``"<station>/<n>"`` (n from 1, in the scenario's connector order).
"""

from __future__ import annotations

from dataclasses import dataclass

from evsim.geo import RoadNetwork
from evsim.planning import connector_pools
from evsim.scenario import Scenario, StationConfig, TariffConfig
from evsim.snapshot import StationTable


@dataclass(frozen=True, slots=True)
class Connector:
    connector_id: str
    station_id: str
    power_kw: float
    type: str  # "AC" | "DC"


@dataclass(frozen=True, eq=False)
class LiveWorld:
    scenario: Scenario
    roads: RoadNetwork
    table: StationTable
    stations: dict[str, StationConfig]
    connectors: dict[str, tuple[Connector, ...]]  # per station id
    connector_index: dict[str, Connector]
    tariffs: dict[str, TariffConfig | None]  # per station id

    @classmethod
    def build(cls, scenario: Scenario) -> LiveWorld:
        roads = RoadNetwork.from_scenario(scenario)
        table = StationTable.from_scenario(scenario, roads)
        conns: dict[str, tuple[Connector, ...]] = {}
        for s in scenario.stations:
            specs: list[Connector] = []
            for c in s.connectors:
                for _ in range(c.count):
                    specs.append(Connector(f"{s.id}/{len(specs) + 1}", s.id, c.power_kw, c.type))
            conns[s.id] = tuple(specs)
        return cls(
            scenario=scenario,
            roads=roads,
            table=table,
            stations={s.id: s for s in scenario.stations},
            connectors=conns,
            connector_index={c.connector_id: c for cs in conns.values() for c in cs},
            tariffs={s.id: scenario.tariff_for(s) for s in scenario.stations},
        )

    def company_of(self, station_id: str) -> str | None:
        s = self.stations.get(station_id)
        return None if s is None else s.company

    def stations_of(self, company: str) -> list[StationConfig]:
        return [s for s in self.scenario.stations if s.company == company]

    def protocol_stations(self, company: str) -> dict[str, list[str]]:
        """``{station_id: [connector ids]}`` for a company's Participant."""
        return {
            s.id: [c.connector_id for c in self.connectors[s.id]] for s in self.stations_of(company)
        }

    def protocol_pools(self, company: str) -> dict[str, str]:
        """``{connector id: class}`` for a company's Participant (``pools``): the walk-in
        share is kept per connector class of a station, as in the simulation."""
        return connector_pools(
            c for s in self.stations_of(company) for c in self.connectors[s.id]
        )
