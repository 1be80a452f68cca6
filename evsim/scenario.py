"""Scenario files: the pydantic schema, the TOML loader and cross-reference validation.

A scenario is one TOML file describing geography (cities and roads), companies, tariffs,
stations, vehicle models, demand, charging behaviour, the policy, the network's status delay,
the duration and the seed. Unknown keys are rejected; every error names the key path and what
was expected (see :class:`ScenarioError`). ``evsim validate FILE`` runs exactly this loader.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "DEFAULT_SCENARIO",
    "BookingConfig",
    "CityConfig",
    "CompanyConfig",
    "ConnectorConfig",
    "NetworkConfig",
    "OutageConfig",
    "Scenario",
    "ScenarioError",
    "StationConfig",
    "TariffConfig",
    "TariffElement",
    "VehicleModelConfig",
    "load_scenario",
    "parse_scenario",
]

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
DEFAULT_SCENARIO = DATA_DIR / "bahia.toml"

PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
Ident = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
HHMM = Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CityConfig(_Model):
    id: Ident
    name: str = ""
    lat: Annotated[float, Field(ge=-90, le=90)]
    lon: Annotated[float, Field(ge=-180, le=180)]
    weight: NonNegFloat = 1.0  # demand mass (population) for the gravity model


class RoadConfig(_Model):
    a: Ident
    b: Ident
    distance_km: PosFloat | None = None  # default: great-circle x circuity
    speed_kmh: PosFloat | None = None  # default: geography.speed_kmh


class GeographyConfig(_Model):
    cities: Annotated[list[CityConfig], Field(min_length=1)]
    roads: list[RoadConfig] = []  # explicit road graph; empty -> k-nearest-neighbour roads
    k_neighbors: Annotated[int, Field(ge=1, le=20)] = 4
    circuity: Annotated[float, Field(ge=1.0, le=3.0)] = 1.25
    speed_kmh: PosFloat = 80.0


class CompanyConfig(_Model):
    id: Ident
    name: str = ""
    tariff: Ident | None = None  # default tariff for its stations


class TariffElement(_Model):
    """One OCPI tariff element: price components plus optional restrictions."""

    energy_per_kwh: NonNegFloat = 0.0  # OCPI ENERGY
    time_per_hour: NonNegFloat = 0.0  # OCPI TIME (while charging)
    parking_per_hour: NonNegFloat = 0.0  # OCPI PARKING_TIME (plugged in, not charging)
    flat: NonNegFloat = 0.0  # OCPI FLAT (per session)
    start_time: HHMM | None = None  # restriction: time of day window [start, end)
    end_time: HHMM | None = None
    min_power_kw: NonNegFloat | None = None  # restriction on connector power
    max_power_kw: NonNegFloat | None = None

    @model_validator(mode="after")
    def _window_pairs(self) -> TariffElement:
        if (self.start_time is None) != (self.end_time is None):
            raise ValueError("start_time and end_time must be given together")
        return self


class TariffConfig(_Model):
    id: Ident
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "BRL"
    elements: Annotated[list[TariffElement], Field(min_length=1)]


class ConnectorConfig(_Model):
    power_kw: PosFloat
    type: Literal["AC", "DC"] = "DC"
    count: Annotated[int, Field(ge=1, le=64)] = 1


class StationConfig(_Model):
    id: Ident
    company: Ident
    city: Ident
    lat: Annotated[float, Field(ge=-90, le=90)] | None = None  # default: the city's
    lon: Annotated[float, Field(ge=-180, le=180)] | None = None
    tariff: Ident | None = None  # default: the company's
    connectors: Annotated[list[ConnectorConfig], Field(min_length=1)]

    @field_validator("connectors")
    @classmethod
    def _not_too_many(cls, v: list[ConnectorConfig]) -> list[ConnectorConfig]:
        if sum(c.count for c in v) > 256:
            raise ValueError("a station has at most 256 connectors")
        return v


class VehicleModelConfig(_Model):
    id: Ident
    battery_kwh: PosFloat
    consumption_kwh_per_km: Annotated[float, Field(gt=0, le=2)]
    max_charge_kw: PosFloat  # DC
    max_ac_kw: PosFloat = 11.0
    share: NonNegFloat = 1.0  # relative share of the fleet


class SocDistribution(_Model):
    dist: Literal["uniform", "beta"] = "uniform"
    low: Fraction = 0.4
    high: Fraction = 1.0
    a: PosFloat = 2.0  # beta shape parameters, scaled to [low, high]
    b: PosFloat = 2.0

    @model_validator(mode="after")
    def _ordered(self) -> SocDistribution:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class OdPair(_Model):
    origin: Ident
    destination: Ident
    weight: PosFloat = 1.0


class DemandConfig(_Model):
    trips: Annotated[float, Field(ge=0)]  # expected trips over the duration
    od: list[OdPair] = []  # explicit O-D weights; empty -> gravity model over the cities
    gravity_exponent: NonNegFloat = 2.0
    min_trip_km: NonNegFloat = 0.0
    tod_profile: Annotated[list[NonNegFloat], Field(min_length=24, max_length=24)] = [1.0] * 24
    initial_soc: SocDistribution = SocDistribution()
    drain_profiles: dict[Literal["fast", "normal", "slow"], NonNegFloat] = {"normal": 1.0}

    @field_validator("tod_profile")
    @classmethod
    def _positive_total(cls, v: list[float]) -> list[float]:
        if sum(v) <= 0:
            raise ValueError("tod_profile needs at least one positive hour")
        return v


class ChargingBehaviour(_Model):
    threshold_soc: Fraction = 0.3  # look for a charger at or below this SoC
    reserve_soc: Fraction = 0.08  # never plan to arrive below this SoC
    target_soc: Fraction = 0.8  # charge up to this SoC (raised if the rest of the trip needs it)
    safety_margin_soc: Fraction = 0.1  # charge if the next leg would end below reserve + this
    max_wait_min: PosFloat = 240.0  # leave the queue after this long
    taper_soc: Annotated[float, Field(gt=0, lt=1)] = 0.8  # CC-CV: full power up to here
    efficiency: Annotated[float, Field(gt=0, le=1)] = 0.95  # battery gain / connector energy


class PolicyConfig(_Model):
    name: str = "least_wait"
    params: dict[str, float] = {}


class OutageConfig(_Model):
    """A company server down over ``[start_min, end_min)``: it drops every protocol message
    to or from it, publishes no station status, and restarts from its durable log."""

    company: Ident
    start_min: NonNegFloat
    end_min: NonNegFloat

    @model_validator(mode="after")
    def _ordered(self) -> OutageConfig:
        if not self.start_min < self.end_min:
            raise ValueError(
                f"start_min ({self.start_min}) must be before end_min ({self.end_min})"
            )
        return self


class NetworkConfig(_Model):
    status_delay_min: NonNegFloat = 0.5  # station status -> policy snapshot staleness
    latency_min: NonNegFloat = 0.05  # one-way delivery time of a protocol message
    jitter_min: NonNegFloat = 0.0  # + U(0, jitter_min) per message (reorders messages)
    loss_rate: Fraction = 0.0  # probability that a protocol message is lost
    outages: list[OutageConfig] = []


class BookingConfig(_Model):
    """How vehicles get a charger: ``on_arrival`` (queue where the policy sends them),
    ``trip`` (book the stops of the trip through the reservation protocol, each one once it
    is at most ``max_advance_min`` ahead; see :mod:`evsim.model.booking`) or ``stop`` (book
    each stop when deciding to make it, the live network's default; see
    :mod:`evsim.model.stop_booking`)."""

    mode: Literal["on_arrival", "trip", "stop"] = "on_arrival"
    grace_min: NonNegFloat = 15.0  # a reservation turns NO_SHOW this long after its start
    slot_min: NonNegFloat = 5.0  # booked window = estimated charging time + this margin
    answer_timeout_min: PosFloat = 15.0  # a vehicle leaves without a booking after this
    request_retry_min: PosFloat = 1.0  # the vehicle re-sends its trip request this often
    # the driver app (evsim.model.booking): rolling horizon and rebooking
    max_advance_min: PosFloat = 120.0  # book a stop only once its window starts this soon
    max_attempts: Annotated[int, Field(ge=1)] = 3  # trip requests per booking round
    max_shift_min: NonNegFloat = 10.0  # take a later window at the same station if <= this
    # station owners (participants): the share of each station's connectors never booked,
    # kept for vehicles that turn up without a booking (0: any connector can be booked)
    walkin_share: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    # coordinator (vehicle's home company server) protocol timers, see evsim.protocol
    lease_min: PosFloat = 10.0
    vote_timeout_min: PosFloat = 3.0
    commit_margin_min: NonNegFloat = 2.0
    ack_timeout_min: PosFloat = 10.0
    retry_min: PosFloat = 0.5

    def participant_config(self) -> dict[str, float]:
        """Keyword arguments of :class:`evsim.protocol.Participant` (sim and live alike)."""
        return {"walkin_share": self.walkin_share}

    def coordinator_config(self) -> dict[str, float]:
        """Keyword arguments of :class:`evsim.protocol.Coordinator`: the same timers for a
        simulated company server and a live one."""
        return {
            "lease_min": self.lease_min,
            "vote_timeout_min": self.vote_timeout_min,
            "commit_margin_min": self.commit_margin_min,
            "ack_timeout_min": self.ack_timeout_min,
            "retry_min": self.retry_min,
        }

    @model_validator(mode="after")
    def _lease_fits(self) -> BookingConfig:
        if self.vote_timeout_min + self.commit_margin_min > self.lease_min:
            raise ValueError("need vote_timeout_min + commit_margin_min <= lease_min")
        if self.lease_min > 60.0:
            raise ValueError("lease_min must be at most 60 (participants refuse longer leases)")
        return self


class Scenario(_Model):
    name: str = "scenario"
    description: str = ""
    attribution: str = ""
    duration_min: PosFloat = 1440.0
    seed: int = 0
    geography: GeographyConfig
    companies: Annotated[list[CompanyConfig], Field(min_length=1)]
    tariffs: list[TariffConfig] = []
    stations: Annotated[list[StationConfig], Field(min_length=1)]
    vehicle_models: Annotated[list[VehicleModelConfig], Field(min_length=1)]
    demand: DemandConfig
    charging: ChargingBehaviour = ChargingBehaviour()
    policy: PolicyConfig = PolicyConfig()
    network: NetworkConfig = NetworkConfig()
    booking: BookingConfig = BookingConfig()

    @model_validator(mode="after")
    def _cross_references(self) -> Scenario:
        errors: list[str] = []

        def unique(kind: str, ids: list[str]) -> set[str]:
            seen: set[str] = set()
            for i in ids:
                if i in seen:
                    errors.append(f"{kind}: duplicate id {i!r}")
                seen.add(i)
            return seen

        cities = unique("geography.cities", [c.id for c in self.geography.cities])
        companies = unique("companies", [c.id for c in self.companies])
        tariffs = unique("tariffs", [t.id for t in self.tariffs])
        unique("stations", [s.id for s in self.stations])
        unique("vehicle_models", [v.id for v in self.vehicle_models])

        def known(path: str, value: str | None, pool: set[str], what: str) -> None:
            if value is not None and value not in pool:
                hint = _closest(value, pool)
                errors.append(f"{path}: unknown {what} {value!r}{hint}")

        for i, r in enumerate(self.geography.roads):
            known(f"geography.roads.{i}.a", r.a, cities, "city")
            known(f"geography.roads.{i}.b", r.b, cities, "city")
            if r.a == r.b:
                errors.append(f"geography.roads.{i}: a road needs two different cities")
        for i, c in enumerate(self.companies):
            known(f"companies.{i}.tariff", c.tariff, tariffs, "tariff")
        company_tariff = {c.id: c.tariff for c in self.companies}
        for i, s in enumerate(self.stations):
            known(f"stations.{i}.company", s.company, companies, "company")
            known(f"stations.{i}.city", s.city, cities, "city")
            known(f"stations.{i}.tariff", s.tariff, tariffs, "tariff")
            if (s.lat is None) != (s.lon is None):
                errors.append(f"stations.{i}: lat and lon must be given together")
            if (
                s.tariff is None
                and s.company in companies
                and company_tariff.get(s.company) is None
                and self.tariffs
            ):
                errors.append(f"stations.{i} ({s.id}): no tariff and company has none")
        for i, o in enumerate(self.network.outages):
            known(f"network.outages.{i}.company", o.company, companies, "company")
        for i, od in enumerate(self.demand.od):
            known(f"demand.od.{i}.origin", od.origin, cities, "city")
            known(f"demand.od.{i}.destination", od.destination, cities, "city")
        if sum(v.share for v in self.vehicle_models) <= 0:
            errors.append("vehicle_models: shares must add up to more than 0")
        if sum(self.demand.drain_profiles.values()) <= 0:
            errors.append("demand.drain_profiles: weights must add up to more than 0")
        hours = int(-(-self.duration_min // 60))
        if not any(self.demand.tod_profile[h % 24] > 0 for h in range(min(hours, 24))):
            errors.append("demand.tod_profile: no hour with demand falls within duration_min")
        if self.charging.threshold_soc >= self.charging.target_soc:
            errors.append("charging.threshold_soc must be below charging.target_soc")
        if self.charging.reserve_soc >= self.charging.target_soc:
            errors.append("charging.reserve_soc must be below charging.target_soc")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    def tariff_for(self, station: StationConfig) -> TariffConfig | None:
        tid = station.tariff or next(
            (c.tariff for c in self.companies if c.id == station.company), None
        )
        return next((t for t in self.tariffs if t.id == tid), None)

    def with_overrides(self, **changes: Any) -> Scenario:
        """A copy with top-level fields replaced, validated again."""
        data = self.model_dump()
        data.update(changes)
        return Scenario.model_validate(data)


def _closest(value: str, pool: set[str]) -> str:
    import difflib

    match = difflib.get_close_matches(value, sorted(pool), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


class ScenarioError(ValueError):
    """A scenario that cannot be used; ``problems`` lists 'path: message' strings."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid scenario {source}:\n{lines}")


def _format_errors(err: ValidationError) -> list[str]:
    out: list[str] = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        given = e.get("input")
        shown = (
            ""
            if e["type"] in {"missing"} or isinstance(given, dict | list)
            else f" (got {given!r})"
        )
        for part in msg.split("; "):
            out.append(f"{loc}: {part}{shown}" if loc else f"{part}{shown}")
    return out


def parse_scenario(data: Mapping[str, Any], source: str = "<dict>") -> Scenario:
    """Validate a scenario given as a mapping; raises :class:`ScenarioError`."""
    try:
        return Scenario.model_validate(dict(data))
    except ValidationError as err:
        raise ScenarioError(source, _format_errors(err)) from None


def load_scenario(path: str | Path | None = None) -> Scenario:
    """Load and validate a scenario TOML file (the default Bahia scenario when ``None``).

    The road graph is checked too: a station in a part of the map no road reaches is an error.
    """
    p = Path(path) if path is not None else DEFAULT_SCENARIO
    if not p.exists():
        raise ScenarioError(str(p), ["file not found"])
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ScenarioError(str(p), [f"not valid TOML: {err}"]) from None
    scenario = parse_scenario(data, str(p))
    from evsim.geo import RoadNetwork  # local: geo imports this module's types

    problems = RoadNetwork.from_scenario(scenario).connectivity_problems(scenario)
    if problems:
        raise ScenarioError(str(p), problems)
    return scenario
