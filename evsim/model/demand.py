"""Trip demand: Poisson departures with a time-of-day profile and O-D pairs.

Departures form a non-homogeneous Poisson process: the hourly ``tod_profile`` (repeating each
day) scales the rate so that ``demand.trips`` trips are expected over the scenario duration.
Origin-destination pairs come from explicit O-D weights or from a gravity model
``w_i w_j / d_ij^gamma`` over city weights, skipping pairs closer than ``min_trip_km``.
Everything is drawn up front into numpy arrays from one seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evsim.battery import DRAIN_FACTORS
from evsim.model.world import World

__all__ = ["Trips", "generate_trips"]


@dataclass(frozen=True, eq=False)
class Trips:
    depart_t_min: np.ndarray
    origin: np.ndarray  # road node index
    destination: np.ndarray
    model: np.ndarray  # index into world.vehicle_models
    soc0: np.ndarray
    drain: np.ndarray  # consumption multiplier (drain profile)

    def __len__(self) -> int:
        return len(self.depart_t_min)


def _departures(
    rng: np.random.Generator, profile: np.ndarray, duration_min: float, trips: float
) -> np.ndarray:
    hours = int(np.ceil(duration_min / 60.0))
    w = np.array([profile[h % 24] for h in range(hours)], float)
    # the last hour may be partial
    frac = np.ones(hours)
    frac[-1] = (duration_min - 60.0 * (hours - 1)) / 60.0
    w = w * frac
    if w.sum() <= 0:
        return np.empty(0)
    counts = rng.poisson(trips * w / w.sum())
    starts = np.repeat(np.arange(hours) * 60.0, counts)
    widths = np.repeat(60.0 * frac, counts)
    t = starts + rng.random(len(starts)) * widths
    t.sort()
    return t


def _od_weights(world: World) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sc, roads = world.scenario, world.roads
    dem = sc.demand
    if dem.od:
        o = np.array([roads.index[p.origin] for p in dem.od])
        d = np.array([roads.index[p.destination] for p in dem.od])
        return o, d, np.array([p.weight for p in dem.od], float)
    mass = np.array([c.weight for c in sc.geography.cities], float)
    dist = roads.dist_km
    n = len(mass)
    ii, jj = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    ok = (ii != jj) & np.isfinite(dist) & (dist >= max(dem.min_trip_km, 1e-9))
    with np.errstate(divide="ignore"):
        w = np.where(
            ok, mass[:, None] * mass[None, :] / np.maximum(dist, 1.0) ** dem.gravity_exponent, 0.0
        )
    if w.sum() <= 0:
        raise ValueError("demand: no origin-destination pair satisfies min_trip_km")
    return ii.ravel(), jj.ravel(), w.ravel()


def generate_trips(world: World, seed: int, trips_scale: float = 1.0) -> Trips:
    """Draw the run's trips. The same world and seed always give the same trips."""
    sc = world.scenario
    dem = sc.demand
    rng = np.random.default_rng(seed)
    t = _departures(
        rng, np.asarray(dem.tod_profile, float), sc.duration_min, dem.trips * trips_scale
    )
    n = len(t)
    o, d, w = _od_weights(world)
    pick = rng.choice(len(w), size=n, p=w / w.sum())
    shares = np.array([m.share for m in world.vehicle_models], float)
    model = rng.choice(len(shares), size=n, p=shares / shares.sum())
    s = dem.initial_soc
    if s.dist == "beta":
        soc0 = s.low + (s.high - s.low) * rng.beta(s.a, s.b, size=n)
    else:
        soc0 = rng.uniform(s.low, s.high, size=n)
    names = list(dem.drain_profiles)
    pw = np.array([dem.drain_profiles[k] for k in names], float)
    drain_pick = rng.choice(len(names), size=n, p=pw / pw.sum())
    drain = np.array([DRAIN_FACTORS[k] for k in names])[drain_pick]
    return Trips(
        t, o[pick].astype(np.int32), d[pick].astype(np.int32), model.astype(np.int32), soc0, drain
    )
