"""FastAPI dependencies (``Annotated``): the service, the authenticated vehicle, idempotency.

``Idempotency-Key`` (any POST): the first response for (caller, key) is stored with a hash of
method, path and the validated body; the same key with the same request replays it (header
``Idempotent-Replayed: true``), with a different request answers 422
``idempotency_key_reused``.  4xx answers are stored too, so a retry sees the same outcome.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.requests import HTTPConnection

from live.server.service import ApiError, CompanyService


async def get_service(request: Request) -> CompanyService:
    # async (and the auth below): FastAPI runs a sync dependency on the thread pool, a
    # thread hand-over each way on every request for what is a dict lookup
    return request.app.state.service


ServiceDep = Annotated[CompanyService, Depends(get_service)]


class VehicleBearer(HTTPBearer):
    """The caller's vehicle id, from the bearer token ``POST /vehicles`` issued (401
    otherwise).  An :class:`HTTPBearer`, so the docs show the security scheme, that also
    looks the token up: one dependency per request where a token, a service and a lookup
    dependency were three (FastAPI solves every dependency anew on every request)."""

    async def __call__(self, request: HTTPConnection) -> str:  # type: ignore[override]
        cred = await super().__call__(request)
        if cred is None or not cred.credentials:
            raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)",
                           "unauthenticated")
        svc: CompanyService = request.app.state.service
        vid = svc.authenticate_cached(cred.credentials)  # in memory: no thread, no I/O
        if vid is None:  # not seen yet (or unknown): ask the database off the event loop
            vid = await run_in_threadpool(svc.authenticate, cred.credentials)
        if vid is None:
            raise ApiError(401, "invalid bearer token", "unauthenticated")
        return vid


current_vehicle = VehicleBearer(auto_error=False, scheme_name="HTTPBearer",
                                description="token from POST /vehicles")
VehicleDep = Annotated[str, Depends(current_vehicle)]
IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", min_length=1, max_length=255,
           description="replay-safe retries: same key + same body = same response"),
]

# one lock per (service, caller, key) while a request with that key runs or waits; the
# last one out removes it (every request of the vehicle agent carries a fresh key)
_locks: dict[tuple[int, str, str], list[Any]] = {}  # -> [lock, requests holding it]
_locks_guard = threading.Lock()


@contextlib.contextmanager
def _key_lock(lock_id: tuple[int, str, str]) -> Iterator[None]:
    with _locks_guard:
        entry = _locks.setdefault(lock_id, [threading.Lock(), 0])
        entry[1] += 1
    try:
        with entry[0]:
            yield
    finally:
        with _locks_guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _locks[lock_id]


def error_body(err: ApiError) -> dict[str, Any]:
    return {"detail": err.detail, "reason": err.reason, **jsonable_encoder(err.extra)}


def idempotent(
    svc: CompanyService,
    request: Request,
    owner: str,
    key: str | None,
    body: BaseModel | None,
    compute: Callable[[], tuple[int, BaseModel]],
) -> JSONResponse:
    """Run ``compute`` at most once per (owner, key) and replay its response."""

    def run() -> tuple[int, Any]:
        try:
            code, model = compute()
            # pydantic-core's JSON mode: what jsonable_encoder gives, several times faster
            return code, (model.model_dump(mode="json") if isinstance(model, BaseModel)
                          else jsonable_encoder(model))
        except ApiError as err:
            if err.status >= 500:
                raise
            return err.status, error_body(err)

    if key is None:
        code, content = run()
        return JSONResponse(content, status_code=code)
    canon = json.dumps(body.model_dump(mode="json") if body else None, sort_keys=True)
    where = f"{request.method} {request.url.path}"
    digest = hashlib.sha256(f"{where}\n{canon}".encode()).hexdigest()
    with _key_lock((id(svc), owner, key)):
        stored = svc.storage.idempotent(owner, key)
        if stored is None:
            code, content = run()
            svc.storage.remember(owner, key, where, digest, code, content)
            return JSONResponse(content, status_code=code)
    if stored["request_hash"] != digest:
        raise ApiError(422, f"Idempotency-Key {key!r} was used for a different request "
                       f"({stored['method_path']})", "idempotency_key_reused")
    return JSONResponse(stored["response"], status_code=stored["status_code"],
                        headers={"Idempotent-Replayed": "true"})
