"""``POST /plans``: a vehicle's charging stops, planned by :mod:`evsim.planning`.

The router only adapts: it turns the body into the pure planner's arguments -- the company's
configured policy, the same network snapshot ``/recommendations`` uses (the replicated
station status), the scenario's roads, connectors and charging behaviour -- and the
:class:`~evsim.planning.PlannedStop` results into windows to book (``booking.slot_min``,
``booking.grace_min``).  The simulation's ``trip`` booking mode (:mod:`evsim.model.booking`)
calls the very same functions, so a live vehicle books what a simulated one would.
"""

from __future__ import annotations

import math

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from evsim.booking_app import booking_window
from evsim.planning import (
    PlannedStop,
    VehicleParams,
    choose_again,
    plan_trip,
)
from live.server import models as m
from live.server.deps import IdempotencyKey, ServiceDep, VehicleDep, idempotent
from live.server.service import ApiError, CompanyService

router = APIRouter(prefix="/plans", tags=["plans"])


def _node(svc: CompanyService, city: str, what: str) -> int:
    i = svc.world.roads.index.get(city)
    if i is None:
        raise ApiError(422, f"unknown {what} city {city!r}", "unknown_city")
    return i


def _public(svc: CompanyService, s: PlannedStop) -> m.PlannedStopPublic:
    cfg = svc.world.scenario.booking
    start, end = booking_window(s, cfg.slot_min)
    return m.PlannedStopPublic(
        decision_city=svc.world.roads.node_ids[s.decision_node], station_id=s.station_id,
        company_id=svc.world.table.company_ids[s.station_index],
        connector_power_kw=s.connector_power_kw, connector_type=s.connector_type,
        arrive_min=s.arrive_min, start_min=start, end_min=end, grace_min=cfg.grace_min,
        soc_in=s.soc_in, soc_out=s.soc_out, charge_min=s.charge_min, power_kw=s.power_kw,
        detour_km=s.detour_km, decide_min=s.decide_min, decide_soc=s.decide_soc,
    )


def make_plan(svc: CompanyService, vehicle_id: str, body: m.PlanCreate) -> m.PlanPublic:
    """Run :func:`evsim.planning.plan_trip` (or :func:`~evsim.planning.choose_again`)."""
    if body.vehicle_id is not None and body.vehicle_id != vehicle_id:
        raise ApiError(403, "a vehicle plans only for itself", "forbidden")
    world = svc.world
    origin = _node(svc, body.city, "current")
    dest = _node(svc, body.destination, "destination")
    skip = {_node(svc, c, "skip_at") for c in body.skip_at}
    excluded = svc.station_indices(body.exclude)
    avoid = sorted(svc.station_indices(body.avoid, "station to avoid"))
    now = svc.now()
    t = now if body.t_min is None else body.t_min
    vehicle = VehicleParams(vehicle_id, body.battery_kwh,
                            body.consumption_kwh_per_km / body.battery_kwh, body.max_dc_kw,
                            body.max_ac_kw)
    connectors = [world.connectors[sid] for sid in world.table.ids]
    args = (world.roads, svc.status.snapshot(), connectors, svc.policy,
            world.scenario.charging, vehicle)
    if body.mode == "stop":
        decision = PlannedStop(origin, -1, "", t, body.soc, body.soc, 0.0, 0.0, 0.0, "", 0.0,
                               t, body.soc)
        stop = choose_again(*args, decision, dest, excluded, skip | {origin}, avoid)
        stops = () if stop is None else (stop,)
        return m.PlanPublic(policy=svc.policy_name, t_min=now, depart_min=t,
                            feasible=stop is not None, end_min=None, end_soc=None,
                            stops=[_public(svc, s) for s in stops])
    if excluded:
        args = (world.roads, svc.status.snapshot(excluded), *args[2:])
    plan = plan_trip(*args, origin, dest, body.soc, t, skip_at=skip, avoid=avoid)
    return m.PlanPublic(
        policy=svc.policy_name, t_min=now, depart_min=t, feasible=plan.feasible,
        end_min=plan.end_min if math.isfinite(plan.end_min) else None,
        end_soc=plan.end_soc, stops=[_public(svc, s) for s in plan.stops],
    )


@router.post("", response_model=m.PlanPublic, responses=m.problems(400, 401, 403, 422))
def plan(
    body: m.PlanCreate, svc: ServiceDep, me: VehicleDep, request: Request,
    key: IdempotencyKey = None,
) -> JSONResponse:
    """The charging stops the configured policy plans for the caller's trip (or one stop)."""
    return idempotent(svc, request, me, key, body, lambda: (200, make_plan(svc, me, body)))
