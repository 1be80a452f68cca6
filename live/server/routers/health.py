"""``GET /health`` and ``GET /trace`` (trace rows for the launcher)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from live.server import models as m
from live.server.deps import ServiceDep

router = APIRouter(tags=["ops"])


@router.get("/health", response_model=m.Health)
def health(svc: ServiceDep) -> m.Health:
    with svc.host.lock:
        open_trips = len(svc.host.coordinator.open_trip_ids())
    return m.Health(
        status="ok", company=svc.company, t_min=svc.now(),
        journal_mode=svc.storage.journal_mode(), bus=svc.bus is not None,
        open_trips=open_trips, dropped_messages=svc.host.dropped,
    )


@router.get("/trace", response_model=m.TracePage, responses=m.problems(422))
def trace(
    svc: ServiceDep,
    after: Annotated[
        int, Query(ge=0, le=2**62, description="return rows with seq > after")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> m.TracePage:
    """Trace rows (evsim.trace schema plus ``seq``), oldest first; page with ``after``."""
    rows = svc.storage.trace_rows(after, limit)
    return m.TracePage(rows=rows, next_seq=rows[-1]["seq"] if rows else after)
