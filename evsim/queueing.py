"""Walk-in queueing at a station: which queued vehicle gets which free connector.

Pure (no SimPy, no I/O, no clock). The simulation (:class:`evsim.model.station.SimStation`)
and the live company server (:mod:`live.server.sessions`) hand connectors out with the same
rule, :func:`assign_walkins`:

* the queue is first-come first-served: waiters are served in queue order;
* each waiter gets the **most powerful** free connector (ties: the lower connector index,
  i.e. scenario order) on which its session fits;
* a waiter that fits on no free connector (a reservation or hold in the way until
  :meth:`evsim.protocol.Participant.blocked_until`) stays queued and may be overtaken by a
  later one that fits. Without reservations everything fits and this is plain FIFO.

Patience is the caller's business: a waiter whose patience ran out leaves the queue (trace
``abandon``) before connectors are handed out at that moment (:func:`expired`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

__all__ = ["WALKIN_GRACE_MIN", "PoweredConnector", "assign_walkins", "connector_order",
           "expired"]

# the grace of the booking a walk-in's session runs on (it is charging when booked: the
# grace only pads its window for the reservations asked for after it)
WALKIN_GRACE_MIN = 1.0


class PoweredConnector(Protocol):
    @property
    def power_kw(self) -> float: ...


W = TypeVar("W")
C = TypeVar("C", bound=PoweredConnector)


def connector_order(free: Mapping[int, C]) -> list[int]:
    """Free connector indices, most powerful first (ties: lower index)."""
    return sorted(free, key=lambda k: (-free[k].power_kw, k))


def assign_walkins(
    waiters: Sequence[W],
    free: Mapping[int, C],
    fits: Callable[[W, int, C], bool] | None = None,
) -> list[tuple[W, int]]:
    """``(waiter, connector index)`` pairs to start now, in queue order.

    ``free``: connector index -> connector, for the connectors not in use now. ``fits(waiter,
    index, connector)`` says whether the waiter's session may start on that connector now
    (default: always). Each connector is handed out at most once; ``free`` is not modified.
    ``fits`` is called in a fixed order (waiters in queue order, connectors by
    :func:`connector_order`), so callers may record what it computed.
    """
    left = dict(free)
    out: list[tuple[W, int]] = []
    for w in waiters:
        if not left:
            break
        for k in connector_order(left):
            if fits is None or fits(w, k, left[k]):
                del left[k]
                out.append((w, k))
                break
    return out


def expired(deadlines: Iterable[tuple[W, float]], now_min: float) -> list[W]:
    """The waiters whose patience deadline (absolute minutes) is at or before ``now_min``."""
    return [w for w, d in deadlines if d <= now_min]
