"""The built-in policies: ``nearest``, ``least_wait`` and ``balanced``."""

from __future__ import annotations

import numpy as np

from evsim.policies import register
from evsim.policies.base import candidates, choose
from evsim.snapshot import ChargeRequest, Choice, NetworkSnapshot

__all__ = ["balanced", "least_wait", "nearest"]


@register("nearest")
def nearest(request: ChargeRequest, snapshot: NetworkSnapshot, now: float) -> Choice | None:
    """The closest reachable online station by road (what the course systems do)."""
    return candidates(request, snapshot, now).nearest()  # choose(c, snapshot, c.distance_km)


@register("least_wait")
def least_wait(
    request: ChargeRequest,
    snapshot: NetworkSnapshot,
    now: float,
    *,
    w_charge: float = 1.0,
) -> Choice | None:
    """Least time until back on the road at the destination: drive there, expected wait,
    charge (weighted by ``w_charge``), drive on to the destination."""
    # choose(c, snapshot, c.eta_min + c.expected_wait_min + w_charge * c.charge_min
    #                    + c.onward_min), computed on a lower bound first
    return candidates(request, snapshot, now).least_time(w_charge)


@register("balanced")
def balanced(
    request: ChargeRequest,
    snapshot: NetworkSnapshot,
    now: float,
    *,
    w_detour: float = 1.0,
    w_wait: float = 1.0,
    w_price: float = 0.5,
    w_station_load: float = 20.0,
    w_company_load: float = 20.0,
) -> Choice | None:
    """Weighted cost in minutes: detour time, expected wait, price (per currency unit), and
    load evenness: a station's occupancy and its company's occupancy above the network mean
    are penalised, steering demand to idle stations and under-used companies."""
    c = candidates(request, snapshot, now, every_estimate=True)
    if len(c) == 0:
        return None
    st = snapshot.stations
    # per-station connector counts and per-company totals are static (precomputed on the
    # table); the arithmetic is the one of the plain form, element for element:
    #   occ_all   = (busy + queued) / max(n, 1)
    #   load_comp = bincount(company, weights=busy + queued) / max(company connectors, 1)
    #   mean_load = sum(busy + queued) / max(sum(n), 1)
    load = snapshot.busy + snapshot.queued
    occ = load[c.index] / st.n_connectors_div[c.index]
    load_comp: np.ndarray = np.bincount(st.company_index, weights=load,
                                        minlength=len(st.companies))
    load_comp /= np.maximum(st.company_connectors, 1.0)
    mean_load = float(load.sum() / max(st.total_connectors, 1.0))
    detour_min = c.eta_min + c.onward_min - snapshot.time_min[request.node, request.dest_node]
    score = (
        w_detour * detour_min
        + w_wait * c.expected_wait_min
        + w_price * c.price
        + w_station_load * occ
        + w_company_load * (load_comp[st.company_index[c.index]] - mean_load)
    )
    return choose(c, snapshot, score)
