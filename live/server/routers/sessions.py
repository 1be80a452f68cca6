"""``/sessions``: start charging (against a booking or walk-in), stop, read."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from live.server import models as m
from live.server.deps import IdempotencyKey, ServiceDep, VehicleDep, idempotent

router = APIRouter(prefix="/sessions", tags=["sessions"])


@router.post("", status_code=201, response_model=m.SessionPublic,
             responses={**m.problems(400, 401, 404, 409, 422),
                        202: {"model": m.SessionPublic,
                              "description": "walk-in queued (``queue: true``): status QUEUED"}})
def start(
    body: m.SessionCreate, svc: ServiceDep, me: VehicleDep, request: Request,
    key: IdempotencyKey = None,
) -> JSONResponse:
    """Start a session at one of this company's stations; commands the station.

    A walk-in (no ``booking_id``) with ``queue: true`` joins the station's FIFO queue when no
    connector is free for it: 202 with status QUEUED. The server starts it on the most
    powerful connector that frees (head of the queue first, :func:`evsim.queueing.
    assign_walkins`), notifies ``charging_started`` on the vehicle's notify topic, or drops
    it after ``max_wait_min`` (``queue_abandoned``)."""
    return idempotent(svc, request, me, key, body,
                      lambda: svc.sessions.start_or_queue(me, body))


@router.get("/{session_id}", response_model=m.SessionPublic,
            responses=m.problems(401, 404, 422))
def get_session(session_id: str, svc: ServiceDep, me: VehicleDep) -> m.SessionPublic:
    return svc.sessions.own_public(me, session_id)


@router.post("/{session_id}/stop", response_model=m.SessionPublic,
             responses=m.problems(400, 401, 404, 409, 422))
def stop(
    session_id: str, svc: ServiceDep, me: VehicleDep, request: Request,
    body: m.SessionStop | None = None, key: IdempotencyKey = None,
) -> JSONResponse:
    """End the session (idempotent) and price it; returns the CDR. A QUEUED walk-in leaves
    the queue instead (status ABANDONED)."""
    svc.sessions.own_public(me, session_id)  # 404 unless the caller's
    energy = body.energy_kwh if body else None
    return idempotent(svc, request, me, key, body,
                      lambda: (200, svc.sessions.stop_or_leave(me, session_id, energy)))
