"""The company server's app factory: ``create_app(settings, bus=None, clock=None)``.

Thin, in the full-stack-fastapi-template style: build the :class:`CompanyService`, mount one
router per resource, map errors to 4xx bodies with a ``reason``.  With a ``bus`` given (an
``InMemoryBus`` in tests) the service is wired to it at once and no broker is needed; without
one the lifespan connects :class:`live.mqtt.MqttBus` to ``settings.mqtt_url`` (retrying in
the background) and closes it at shutdown.  The lifespan also runs the protocol ticker
(``settings.tick_s``); tests that do not enter the lifespan drive timers with
``app.state.service.host.tick()`` and an injected ``clock`` (scenario minutes).

Run one company: ``EVSIM_COMPANY=acme uvicorn --factory live.server.app:app_from_env``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from live.bus import Bus
from live.server.deps import error_body
from live.server.routers import (
    bookings,
    health,
    plans,
    recommendations,
    sessions,
    stations,
    vehicles,
)
from live.server.service import ApiError, CompanyService
from live.server.steps import CommitError
from live.settings import Settings

log = logging.getLogger(__name__)


def _mqtt_bus(settings: Settings) -> Bus:
    from live.mqtt import MqttBus  # paho only when really talking to a broker

    return MqttBus(
        settings.mqtt_url, client_id=f"evsim-server-{settings.company}",
        username=settings.mqtt_user, password=settings.mqtt_password, connect_timeout=None,
    )


def create_app(
    settings: Settings, bus: Bus | None = None, clock: Callable[[], float] | None = None
) -> FastAPI:
    """A FastAPI app serving ``settings.company`` (see the module docstring)."""
    svc = CompanyService(settings, clock)
    if bus is not None:
        svc.attach(bus)
    svc.trace([{"t_min": svc.now(), "kind": "server_status", "company_id": svc.company,
                "status": "up"}])

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_bus: Bus | None = None
        if svc.bus is None:
            own_bus = _mqtt_bus(settings)
            svc.attach(own_bus)
        svc.host.start_ticker(settings.tick_s)
        try:
            yield
        finally:
            svc.host.stop_ticker()
            svc.trace([{"t_min": svc.now(), "kind": "server_status",
                        "company_id": svc.company, "status": "down"}])
            if own_bus is not None:  # a server process owns its service: stop its threads,
                svc.close()  # flush and close the database, then the bus
                own_bus.close()

    app = FastAPI(
        title=f"evsim company server: {settings.company}",
        description="Bookings (atomic multi-company trips), sessions, recommendations. "
        "Every 4xx body is a Problem: ``detail`` and a machine-readable ``reason``.",
        version="1",
        openapi_tags=OPENAPI_TAGS,
        lifespan=lifespan,
        # FastAPI >= 0.165 checks the global OpenTelemetry providers on every request (a
        # few % of a server's CPU) unless told not to; older versions keep it as an extra
        telemetry=None if settings.otel else {"tracing": False, "metrics": False, "logs": False},
    )
    app.state.service = svc
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(error_body(exc), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # the documented Problem body: ``detail`` lists the offending fields
        return JSONResponse({"detail": jsonable_encoder(exc.errors()),
                             "reason": "validation_error"}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException) -> JSONResponse:
        reason = "bad_body" if exc.status_code == 400 else None
        return JSONResponse({"detail": exc.detail, "reason": reason},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(CommitError)
    async def storage_down(_request: Request, exc: CommitError) -> JSONResponse:
        # the database refused a write: nothing of this request was stored or sent
        return JSONResponse({"detail": str(exc), "reason": "storage_unavailable"},
                            status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse({"detail": "internal error", "reason": "internal"}, status_code=500)

    # matched in this order: the hot paths first (every route tried before the matching one
    # costs microseconds per request); the docs keep the order of OPENAPI_TAGS
    for r in (bookings, sessions, recommendations, plans, vehicles, stations, health):
        app.include_router(r.router)
    return app


OPENAPI_TAGS = [
    {"name": "vehicles", "description": "Register a vehicle (bearer token); its history."},
    {"name": "stations", "description": "Own stations, the network's replicated status, tariffs."},
    {"name": "recommendations", "description": "The policy's best reachable stations."},
    {"name": "plans", "description": "A trip's charging stops, planned by evsim.planning."},
    {"name": "bookings", "description": "One stop or a whole trip, atomic across companies."},
    {"name": "sessions", "description": "Charge against a booking or walk in; stop; CDR."},
    {"name": "ops", "description": "Health and the server's trace rows."},
]


def app_from_env() -> FastAPI:
    """``uvicorn --factory live.server.app:app_from_env`` (settings from ``EVSIM_*``).

    The server process's long-lived heap (modules, the world, the protocol state read back
    from the database) is moved out of the cyclic garbage collector's sight once built
    (``gc.freeze``): otherwise every full collection walks all of it again."""
    app = create_app(Settings.from_env())
    gc.collect()
    gc.freeze()
    return app
