"""``/bookings``: book a trip (one stop or many, across companies), read, cancel."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from live.server import models as m
from live.server.deps import IdempotencyKey, ServiceDep, VehicleDep, error_body, idempotent
from live.server.service import ApiError

router = APIRouter(prefix="/bookings", tags=["bookings"])


@router.post(
    "", status_code=201, response_model=m.TripPublic,
    responses={202: {"model": m.TripPublic, "description": "still booking; poll the trip"},
               409: {"model": m.TripPublic, "description": "REJECTED / FAILED, with reason"},
               **m.problems(400, 401, 422)},
)
async def book(
    body: m.BookingCreate, svc: ServiceDep, me: VehicleDep, request: Request,
    key: IdempotencyKey = None,
) -> JSONResponse:
    """Book every stop or none (2PC coordinated by this server).

    With an ``Idempotency-Key`` the trip id is derived from (vehicle, key): retrying a POST
    whose answer was lost (the server crashed) returns the same trip and its outcome."""
    if key is not None:  # stored replies, a lock per key: the blocking path, on a thread
        return await run_in_threadpool(
            idempotent, svc, request, me, key, body, lambda: svc.book(me, body, key))
    # no thread waits for the other companies' votes (CompanyService.book_async)
    try:
        code, trip = await svc.book_async(me, body)
    except ApiError as err:
        if err.status >= 500:
            raise
        return JSONResponse(error_body(err), status_code=err.status)
    return JSONResponse(trip.model_dump(mode="json"), status_code=code)


@router.get("/{booking_id:path}", response_model=m.TripPublic | m.BookingPublic,
            responses=m.problems(401, 404, 422))
def get_booking(booking_id: str, svc: ServiceDep, me: VehicleDep) -> m.TripPublic | m.BookingPublic:
    """A trip (coordinated here) or a booking (held here) of the caller."""
    return svc.get_booking(me, booking_id)


@router.delete("/{booking_id:path}", response_model=m.TripPublic,
               responses=m.problems(401, 404, 409, 422))
def cancel_booking(booking_id: str, svc: ServiceDep, me: VehicleDep) -> m.TripPublic:
    """Cancel a booked trip (all its stops, through the protocol)."""
    return svc.cancel(me, booking_id)
