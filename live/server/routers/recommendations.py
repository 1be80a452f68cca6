"""``POST /recommendations``: ranked stations from the configured policy."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from live.server import models as m
from live.server.deps import IdempotencyKey, ServiceDep, VehicleDep, idempotent

router = APIRouter(prefix="/recommendations", tags=["recommendations"])


@router.post("", response_model=m.Recommendations, responses=m.problems(400, 401, 422))
def recommend(
    body: m.RecommendationCreate, svc: ServiceDep, me: VehicleDep, request: Request,
    key: IdempotencyKey = None,
) -> JSONResponse:
    """Apply the policy repeatedly (excluding earlier picks) for up to ``limit`` choices."""
    return idempotent(svc, request, me, key, body, lambda: (200, svc.recommend(me, body)))
