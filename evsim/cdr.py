"""A finished charging session's record (OCPI CDR-like): what it delivered and what it costs.

A session plugs in at ``start_t_min`` and unplugs at ``end_t_min``. It charges from
``soc_start`` towards ``target_soc`` along the :class:`~evsim.battery.ChargeCurve` of the
connector's power (capped by the vehicle), and the rest of the time it stays plugged
(the tariff's PARKING_TIME). The energy is the curve's, or the station's meter reading when
there is one: the curve's shape is then kept and scaled to the metered total, so the energy
component of every tariff window sees its share of the metered kWh.
:func:`evsim.tariff.price_session` splits the price over the tariff windows.

The live servers write one of these per stopped session (``POST /sessions/{id}/stop``,
``GET /vehicles/{id}/sessions``); it needs no clock or I/O of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from evsim.battery import ChargeCurve
from evsim.scenario import TariffConfig
from evsim.tariff import PriceBreakdown, price_session

__all__ = ["SessionCdr", "session_cdr"]


@dataclass(frozen=True, slots=True)
class SessionCdr:
    """Energy, SoC, charging and parking minutes, and the price breakdown of a session."""

    energy_kwh: float
    soc_end: float
    charge_min: float
    parking_min: float
    energy_source: Literal["model", "meter"]
    price: PriceBreakdown


def session_cdr(
    tariff: TariffConfig | None,
    *,
    start_t_min: float,
    end_t_min: float,
    soc_start: float,
    target_soc: float,
    battery_kwh: float,
    power_kw: float,
    taper_soc: float,
    efficiency: float,
    metered_kwh: float | None = None,
) -> SessionCdr:
    """The record of a session plugged in over ``[start_t_min, end_t_min]`` (see the module
    docstring). A session shorter than its charge stopped early: all of it is charging, no
    parking. Raises ``ValueError`` for a negative or non-finite meter reading, an SoC outside
    [0, 1] or a non-positive battery size or power."""
    if metered_kwh is not None and not 0.0 <= metered_kwh < float("inf"):
        raise ValueError(f"metered_kwh must be a finite number >= 0, got {metered_kwh!r}")
    for name, soc in (("soc_start", soc_start), ("target_soc", target_soc)):
        if not 0.0 <= soc <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {soc!r}")
    if not (battery_kwh > 0 and power_kw > 0):
        raise ValueError(f"battery_kwh and power_kw must be > 0, got {battery_kwh!r}, "
                         f"{power_kw!r}")
    curve = ChargeCurve(battery_kwh, power_kw, taper_soc, efficiency)
    elapsed = max(end_t_min - start_t_min, 0.0)
    charge_min = min(elapsed, curve.minutes_to(soc_start, target_soc))
    parking_min = elapsed - charge_min

    def model_kwh(e: float) -> float:
        return curve.energy_kwh(soc_start, curve.soc_after(soc_start, e))

    energy = model_kwh(charge_min)
    energy_at = model_kwh
    source: Literal["model", "meter"] = "model"
    if metered_kwh is not None:
        source = "meter"
        scale = metered_kwh / energy if energy > 0 else 0.0

        def energy_at(e: float) -> float:
            return model_kwh(e) * scale

        energy = metered_kwh
    soc_end = min(soc_start + energy * efficiency / battery_kwh, 1.0)
    p = price_session(tariff, start_t_min, charge_min, energy_at, power_kw, parking_min)
    return SessionCdr(energy, soc_end, charge_min, parking_min, source, p)
