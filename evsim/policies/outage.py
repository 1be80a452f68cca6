"""What to do when a station goes offline, and when it comes back -- pure decisions.

A station whose agent vanished (MQTT last will) may come back in a minute or never. For each
reservation at it, :func:`offline_decisions` decides:

* **keep** when the outage may still end in time: the vehicle's arrival deadline
  (``start_min + grace_min``) lies beyond ``now + outage_min`` (``outage_min``: how long an
  outage is assumed to last from now). The caller re-evaluates while the station stays
  offline, so a kept booking is cancelled once its deadline comes within the horizon;
* **cancel** otherwise, with up to ``max_alternatives`` other stations ranked by the
  configured policy (asked repeatedly, each pick excluded, as for recommendations) for a
  vehicle at the offline station.

When the station's agent returns, :func:`stale_sessions` names the sessions the server still
thinks are running there but the returning agent does not report (it restarted and lost
them), so the server can close them instead of leaving the connector busy forever.

No I/O, no clock: the live company servers call these (``live.server.outages``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from evsim.snapshot import ChargeRequest, Choice, NetworkSnapshot

__all__ = [
    "AffectedBooking",
    "OfflineDecision",
    "alternatives_for",
    "offline_decisions",
    "request_at_station",
    "stale_sessions",
]

KEEP: Literal["keep"] = "keep"
CANCEL: Literal["cancel"] = "cancel"
BUSY_STATUSES = frozenset({"Charging", "Finishing", "CHARGING", "FINISHING"})


@dataclass(frozen=True, slots=True)
class AffectedBooking:
    """A reservation at a station that went offline."""

    booking_id: str
    vehicle_id: str
    station_id: str
    connector_id: str
    start_min: float
    end_min: float
    grace_min: float

    @property
    def deadline_min(self) -> float:
        """The latest arrival the booking allows."""
        return self.start_min + self.grace_min


@dataclass(frozen=True, slots=True)
class OfflineDecision:
    booking_id: str
    action: Literal["keep", "cancel"]
    reason: str  # "outage_may_end" | "station_offline"
    alternatives: tuple[Choice, ...] = ()


def request_at_station(
    snapshot: NetworkSnapshot,
    station_index: int,
    vehicle_id: str,
    *,
    soc: float,
    battery_kwh: float,
    consumption_kwh_per_km: float,
    max_dc_kw: float = 150.0,
    max_ac_kw: float = 11.0,
) -> ChargeRequest:
    """A charge request from a vehicle standing at the station (destination: there too)."""
    st = snapshot.stations
    node = int(st.node[station_index])
    return ChargeRequest(
        vehicle_id, node, float(st.lat[station_index]), float(st.lon[station_index]), node,
        soc, battery_kwh, consumption_kwh_per_km, max_dc_kw, max_ac_kw,
    )


def alternatives_for(
    request: ChargeRequest,
    snapshot: NetworkSnapshot,
    now: float,
    policy: Callable[[ChargeRequest, NetworkSnapshot, float], Choice | None],
    *,
    exclude: Iterable[int] = (),
    limit: int = 3,
) -> tuple[Choice, ...]:
    """Up to ``limit`` stations in the policy's order (each pick excluded from the next ask)."""
    snap = snapshot.without(exclude)
    out: list[Choice] = []
    for _ in range(limit):
        c = policy(request, snap, now)
        if c is None:
            break
        out.append(c)
        snap = snap.without((c.station_index,))
    return tuple(out)


def offline_decisions(
    bookings: Sequence[AffectedBooking],
    snapshot: NetworkSnapshot,
    now: float,
    policy: Callable[[ChargeRequest, NetworkSnapshot, float], Choice | None],
    request_for: Callable[[AffectedBooking], ChargeRequest],
    *,
    outage_min: float = 15.0,
    max_alternatives: int = 3,
) -> list[OfflineDecision]:
    """Keep or cancel each booking at an offline station (see the module docstring).

    ``request_for(booking)`` gives the charge request alternatives are ranked for (e.g.
    :func:`request_at_station` with the vehicle's model). The offline stations themselves are
    never proposed (the snapshot marks them offline; their indices are excluded anyway).
    """
    idx = snapshot.stations.index
    offline = {idx[b.station_id] for b in bookings if b.station_id in idx}
    horizon = now + outage_min
    out = []
    for b in sorted(bookings, key=lambda b: (b.start_min, b.booking_id)):
        if b.deadline_min > horizon:
            out.append(OfflineDecision(b.booking_id, KEEP, "outage_may_end"))
            continue
        alts = alternatives_for(request_for(b), snapshot, now, policy, exclude=offline,
                                limit=max_alternatives)
        out.append(OfflineDecision(b.booking_id, CANCEL, "station_offline", alts))
    return out


def stale_sessions(
    active: Iterable[tuple[str, str]],
    reported: Mapping[str, str],
    known_before: Collection[str] | None = None,
) -> list[str]:
    """Session ids of ``active`` ``(session_id, connector_id)`` pairs whose connector the
    returning station does not report busy (``Charging`` / ``Finishing``).

    ``known_before``: the session ids the station reported before it went away (agents that
    name sessions in their status).  Only those can be stale: a session the station never
    reported may still be on its way to it (its start command in flight when the agent
    froze, read after the first status of its return); the reconciler sees it through.
    None: the agent names no sessions, every unreported one is stale."""
    return [
        sid for sid, cid in active
        if reported.get(cid) not in BUSY_STATUSES
        and (known_before is None or sid in known_before)
    ]
