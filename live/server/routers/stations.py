"""``/stations`` (own, live), ``/network/stations`` (all companies, replicated), ``/tariffs``."""

from __future__ import annotations

from fastapi import APIRouter

from live.server import models as m
from live.server.deps import ServiceDep

router = APIRouter(tags=["stations"])


@router.get("/stations", response_model=list[m.StationPublic])
def own_stations(svc: ServiceDep) -> list[m.StationPublic]:
    """This company's stations with connector status from the protocol state."""
    return svc.own_stations()


@router.get("/network/stations", response_model=list[m.StationPublic])
def network_stations(svc: ServiceDep) -> list[m.StationPublic]:
    """Every station of the network with its last replicated status."""
    return svc.network_stations()


@router.get("/tariffs", response_model=list[m.TariffPublic])
def tariffs(svc: ServiceDep) -> list[m.TariffPublic]:
    """OCPI-style tariffs of this company's stations."""
    return svc.tariffs()
