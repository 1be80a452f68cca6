"""Pydantic request/response models of the company server's REST API (XCreate / XPublic).

Request models forbid unknown fields and bound every number, so bad input is a 422 with the
offending field named, never a 500.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Id = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
ConnectorId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/\-]+$")]
Soc = Annotated[float, Field(ge=0.0, le=1.0)]
Minutes = Annotated[float, Field(ge=0.0, le=1e7)]
Kwh = Annotated[float, Field(gt=0.0, le=1000.0)]
Kw = Annotated[float, Field(gt=0.0, le=2000.0)]


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Problem(BaseModel):
    """Every 4xx body: ``detail`` says why (machine-readable ``reason`` where relevant)."""

    detail: Any
    reason: str | None = None


_ERRORS = {
    400: "the body could not be read (not UTF-8 JSON; reason ``bad_body``)",
    401: "missing or invalid bearer token (reason ``unauthenticated``)",
    403: "not the caller's resource (reason ``forbidden``)",
    404: "no such resource of the caller (reason ``not_found``)",
    409: "conflicts with the current state (see ``reason``)",
    422: "invalid input: the offending fields (reason ``validation_error``) or a semantic "
         "problem (see ``reason``)",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting ``codes`` with the :class:`Problem` body."""
    return {c: {"model": Problem, "description": _ERRORS[c]} for c in codes}


# ------------------------------------------------------------------ vehicles


class VehicleCreate(_In):
    vehicle_id: Id | None = Field(
        default=None,
        description="register a vehicle issued by another company (roaming); default: new id",
    )
    home_company: Id | None = None


class VehicleRegistered(BaseModel):
    vehicle_id: str
    token: str = Field(description="bearer token; shown once, only its hash is stored")
    home_company: str


# ------------------------------------------------------------------ stations


class ConnectorPublic(BaseModel):
    connector_id: str
    power_kw: float
    type: str
    status: str = Field(description="protocol view: AVAILABLE | RESERVED | CHARGING")
    reported_status: str | None = Field(default=None, description="as the station reports it")


class StationPublic(BaseModel):
    station_id: str
    company_id: str
    city: str
    lat: float
    lon: float
    online: bool
    reported: bool
    t_min: float | None
    busy: int
    queued: int
    connectors: list[ConnectorPublic]


class TariffPublic(BaseModel):
    station_id: str
    tariff_id: str | None
    currency: str | None
    elements: list[dict[str, Any]]


# ------------------------------------------------------------------ recommendations


class RecommendationCreate(_In):
    lat: Annotated[float, Field(ge=-90, le=90)] | None = None
    lon: Annotated[float, Field(ge=-180, le=180)] | None = None
    city: Id | None = Field(default=None, description="scenario city id (instead of lat/lon)")
    destination: Id | None = Field(default=None, description="destination city (default: here)")
    soc: Soc
    battery_kwh: Kwh
    consumption_kwh_per_km: Annotated[float, Field(gt=0, le=2)]
    max_dc_kw: Kw = 150.0
    max_ac_kw: Kw = 11.0
    reserve_soc: Soc | None = Field(default=None,
                                    description="default: the scenario's charging.reserve_soc")
    target_soc: Soc | None = Field(default=None,
                                   description="default: the scenario's charging.target_soc")
    limit: Annotated[int, Field(ge=1, le=20)] = 3
    exclude: Annotated[list[Id], Field(max_length=256)] = Field(
        default=[], description="station ids to leave out (as if offline)"
    )

    @model_validator(mode="after")
    def _where(self) -> RecommendationCreate:
        if self.city is None and (self.lat is None or self.lon is None):
            raise ValueError("give either city or both lat and lon")
        return self


class ChoicePublic(BaseModel):
    rank: int
    station_id: str
    company_id: str
    score: float
    distance_km: float
    detour_km: float
    eta_min: float
    expected_wait_min: float


class Recommendations(BaseModel):
    policy: str
    t_min: float
    choices: list[ChoicePublic]


# ------------------------------------------------------------------ plans


class PlanCreate(_In):
    """A vehicle's state for :func:`evsim.planning.plan_trip` (``mode="trip"``: the charging
    stops of the trip from ``city``) or :func:`evsim.planning.choose_again` (``mode="stop"``:
    the stop for a charging decision at ``city``, with ``exclude`` left out, kept only if the
    rest of the trip stays feasible from there)."""

    vehicle_id: Id | None = Field(default=None, description="must be the caller if given")
    city: Id = Field(description="where the vehicle is (stop mode: the decision city)")
    destination: Id
    soc: Soc
    battery_kwh: Kwh
    consumption_kwh_per_km: Annotated[float, Field(gt=0, le=2)]
    max_dc_kw: Kw = 150.0
    max_ac_kw: Kw = 11.0
    t_min: Minutes | None = Field(
        default=None, description="when it leaves ``city`` (stop mode: decides there); default now"
    )
    skip_at: Annotated[list[Id], Field(max_length=256)] = Field(
        default=[], description="cities where it already charged on this trip (no stop again)"
    )
    mode: Literal["trip", "stop"] = "trip"
    exclude: Annotated[list[Id], Field(max_length=256)] = Field(
        default=[], description="station ids to leave out (as if offline)"
    )
    avoid: Annotated[list[Id], Field(max_length=256)] = Field(
        default=[], description="station ids the vehicle gave up on during this trip: left out "
        "unless no other station is reachable (evsim.planning.choose_station)"
    )


class PlannedStopPublic(BaseModel):
    decision_city: str = Field(description="where the vehicle decides to charge")
    station_id: str
    company_id: str
    connector_power_kw: float = Field(description="the connector class to book: rated kW ...")
    connector_type: str = Field(description="... and type")
    arrive_min: float
    start_min: float = Field(description="window to book: expected arrival ...")
    end_min: float = Field(description="... + estimated charging time + booking.slot_min")
    grace_min: float
    soc_in: float
    soc_out: float = Field(description="expected SoC when leaving the connector")
    charge_min: float
    power_kw: float
    detour_km: float
    decide_min: float
    decide_soc: float


class PlanPublic(BaseModel):
    policy: str
    t_min: float = Field(description="server clock when planned")
    depart_min: float
    feasible: bool = Field(description="False: the plan runs dry on the way (book nothing)")
    end_min: float | None = Field(description="trip mode: expected arrival at the destination")
    end_soc: float | None
    stops: list[PlannedStopPublic]


# ------------------------------------------------------------------ bookings


class StopCreate(_In):
    station_id: Id
    start_min: Minutes
    end_min: Minutes
    connector_id: ConnectorId | None = None
    grace_min: Annotated[float, Field(ge=0, le=120)] = 10.0
    connector_ids: Annotated[list[ConnectorId], Field(max_length=64)] = Field(
        default=[],
        description="hold one of these connectors of the station (e.g. one class: the rated "
        "power and plug a plan was made with); empty: any of them",
    )

    @model_validator(mode="after")
    def _window(self) -> StopCreate:
        if self.end_min <= self.start_min:
            raise ValueError("end_min must be after start_min")
        return self


class BookingCreate(_In):
    stops: Annotated[list[StopCreate], Field(min_length=1, max_length=10)]


class AlternativePublic(BaseModel):
    connector_id: str
    start_min: float
    end_min: float


class BookedStopPublic(BaseModel):
    booking_id: str
    company_id: str
    station_id: str
    connector_id: str
    start_min: float
    end_min: float


class TripPublic(BaseModel):
    trip_id: str
    vehicle_id: str
    state: str = Field(description="coordinator trip state (PREPARING ... BOOKED/ABORTED...)")
    outcome: Literal["PENDING", "BOOKED", "REJECTED", "FAILED", "CANCELED"]
    reason: str = ""
    failed_stop: int | None = None
    bookings: list[BookedStopPublic] = []
    alternatives: list[AlternativePublic] = []
    booking_ids: list[str] = []


class VehicleTripPublic(TripPublic):
    """One of the caller's trips coordinated here (``GET /vehicles/{id}/trips``)."""

    created_t_min: float
    stops: list[StopCreate] = Field(description="the stops as requested")


class BookingPublic(BaseModel):
    """A single booking held by this company's participant."""

    booking_id: str
    trip_id: str
    state: str
    station_id: str
    connector_id: str
    start_min: float
    end_min: float
    grace_min: float
    charging: bool
    reason: str


# ------------------------------------------------------------------ sessions


class SessionCreate(_In):
    station_id: Id
    booking_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    connector_id: ConnectorId | None = None
    soc: Soc
    battery_kwh: Kwh
    target_soc: Soc | None = Field(default=None,
                                   description="default: the scenario's charging.target_soc")
    max_dc_kw: Kw = 150.0
    max_ac_kw: Kw = 11.0
    queue: bool = Field(
        default=False,
        description="walk-in only: when no connector is free, join the station's FIFO queue "
        "(202, status QUEUED; charging_started is notified when it starts) instead of a 409",
    )
    max_wait_min: Minutes | None = Field(
        default=None, description="queue patience (default: the scenario's charging.max_wait_min)"
    )
    arrived_t_min: Minutes | None = Field(
        default=None,
        description="when the vehicle reached the station (at most now), for the trace's "
        "arrive row and wait_min: with a booking it may come before its window and wait; a "
        "walk-in's patience (max_wait_min) counts from it too, as for a vehicle that found "
        "its booking unusable and queues instead; default: now",
    )

    @model_validator(mode="after")
    def _target(self) -> SessionCreate:
        if self.target_soc is not None and self.target_soc <= self.soc:
            raise ValueError("target_soc must be above soc")
        return self


class SessionStop(_In):
    energy_kwh: Annotated[float, Field(ge=0, le=1000)] | None = Field(
        default=None, description="metered energy if the caller has it (else meter or model)"
    )


class PriceBreakdownPublic(BaseModel):
    """OCPI CDR-like cost per tariff dimension."""

    energy: float
    time: float
    parking: float
    flat: float
    total: float
    currency: str


class SessionPublic(BaseModel):
    session_id: str
    vehicle_id: str
    station_id: str
    company_id: str
    connector_id: str | None = Field(description="None while QUEUED or after ABANDONED")
    booking_id: str | None
    status: Literal["QUEUED", "ACTIVE", "COMPLETED", "ABANDONED"]
    start_t_min: float | None = Field(description="None while QUEUED or after ABANDONED")
    arrive_t_min: float | None = Field(default=None, description="when it joined the queue")
    wait_min: float | None = Field(default=None, description="arrival -> plug-in (or leaving)")
    queue_position: int | None = Field(default=None, description="1 = head, while QUEUED")
    end_t_min: float | None
    soc_start: float
    soc_end: float | None
    target_soc: float
    power_kw: float | None
    energy_kwh: float | None
    charge_min: float | None
    parking_min: float | None
    energy_source: str | None
    price: PriceBreakdownPublic | None


# ------------------------------------------------------------------ misc


class Health(BaseModel):
    status: Literal["ok"]
    company: str
    t_min: float
    journal_mode: str
    bus: bool
    open_trips: int
    dropped_messages: int


class TracePage(BaseModel):
    rows: list[dict[str, Any]]
    next_seq: int
