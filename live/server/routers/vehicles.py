"""``/vehicles``: registration (bearer token), charging history and trips."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from live.server import models as m
from live.server.deps import IdempotencyKey, ServiceDep, VehicleDep, idempotent
from live.server.service import ApiError

router = APIRouter(prefix="/vehicles", tags=["vehicles"])


@router.post("", status_code=201, response_model=m.VehicleRegistered,
             responses=m.problems(400, 409, 422))
def register(
    body: m.VehicleCreate, svc: ServiceDep, request: Request,
    key: IdempotencyKey = None,
) -> JSONResponse:
    """Register a vehicle; the token is returned once (only its hash is stored)."""
    return idempotent(svc, request, "", key, body, lambda: (201, svc.register(body)))


@router.get("/{vehicle_id}/sessions", response_model=list[m.SessionPublic],
            responses=m.problems(401, 403, 422))
def sessions(vehicle_id: str, svc: ServiceDep, me: VehicleDep) -> list[m.SessionPublic]:
    """The caller's charging sessions at this company (CDR-like price breakdown)."""
    if vehicle_id != me:
        raise ApiError(403, "vehicles may only read their own sessions", "forbidden")
    return svc.sessions.history(me)


@router.get("/{vehicle_id}/trips", response_model=list[m.VehicleTripPublic],
            responses=m.problems(401, 403, 422))
def trips(vehicle_id: str, svc: ServiceDep, me: VehicleDep) -> list[m.VehicleTripPublic]:
    """The caller's trips coordinated by this company, oldest first, each with its state,
    outcome and stops: how a vehicle finds a trip whose ``POST /bookings`` answer it never
    got (or retry that POST with the same ``Idempotency-Key``)."""
    if vehicle_id != me:
        raise ApiError(403, "vehicles may only read their own trips", "forbidden")
    out = []
    for row in svc.storage.trips_of(me):
        t = svc.trip(row["trip_id"])
        out.append(m.VehicleTripPublic(**t.model_dump(), created_t_min=row["created_t_min"],
                                       stops=row["request"]))
    return out
