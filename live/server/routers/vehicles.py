"""``/vehicles``: registration (bearer token) and charging history."""

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
