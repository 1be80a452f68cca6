"""A user-defined policy for the tests: ``resolve("user_policy:fastest_charger")``.

Not a test module (no ``test_`` prefix); tests put this directory on ``sys.path`` first.
"""

from __future__ import annotations

from evsim.policies.base import candidates, choose
from evsim.snapshot import ChargeRequest, Choice, NetworkSnapshot

NOT_CALLABLE = 42


def fastest_charger(
    request: ChargeRequest, snapshot: NetworkSnapshot, now: float, *, min_power_kw: float = 0.0
) -> Choice | None:
    """The reachable station with the most powerful connector (nearest among equals), among
    stations of at least ``min_power_kw``."""
    c = candidates(request, snapshot, now)
    power = snapshot.stations.max_power_kw[c.index]
    keep = power >= min_power_kw
    if not keep.any():
        return None
    score = -power * 1e6 + c.distance_km
    score[~keep] = float("inf")
    return choose(c, snapshot, score)
