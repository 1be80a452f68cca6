"""Session pricing with OCPI tariff components: ENERGY, TIME, PARKING_TIME and FLAT.

A tariff is a list of elements; for each moment of a session the first element whose
restrictions match applies (OCPI semantics): a time-of-day window ``[start_time, end_time)``
(which may wrap midnight) and a connector power range. A session is split at every window
boundary; energy in each part comes from the charging curve, so a session that crosses into a
peak window pays the peak rate for the energy delivered inside it. The result is a breakdown
per component, like an OCPI CDR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from evsim.scenario import TariffConfig, TariffElement

__all__ = ["PriceBreakdown", "price_session"]

DAY_MIN = 1440.0


@dataclass(frozen=True, slots=True)
class PriceBreakdown:
    energy: float = 0.0
    time: float = 0.0
    parking: float = 0.0
    flat: float = 0.0
    currency: str = "BRL"

    @property
    def total(self) -> float:
        return self.energy + self.time + self.parking + self.flat

    def as_dict(self) -> dict[str, float | str]:
        return {
            "energy": self.energy,
            "time": self.time,
            "parking": self.parking,
            "flat": self.flat,
            "total": self.total,
            "currency": self.currency,
        }


def _hhmm(s: str) -> float:
    h, m = s.split(":")
    return int(h) * 60.0 + int(m)


def _matches(el: TariffElement, minute_of_day: float, power_kw: float) -> bool:
    if el.min_power_kw is not None and power_kw < el.min_power_kw:
        return False
    if el.max_power_kw is not None and power_kw >= el.max_power_kw:
        return False
    if el.start_time is None or el.end_time is None:
        return True
    a, b = _hhmm(el.start_time), _hhmm(el.end_time)
    if a <= b:
        return a <= minute_of_day < b
    return minute_of_day >= a or minute_of_day < b  # window wraps midnight


def active_element(tariff: TariffConfig, t_min: float, power_kw: float) -> TariffElement | None:
    mod = t_min % DAY_MIN
    return next((el for el in tariff.elements if _matches(el, mod, power_kw)), None)


def price_session(
    tariff: TariffConfig | None,
    start_t_min: float,
    charge_min: float,
    energy_kwh_at: Callable[[float], float],
    power_kw: float,
    parking_min: float = 0.0,
) -> PriceBreakdown:
    """Price a session that charges for ``charge_min`` then stays plugged ``parking_min``.

    ``energy_kwh_at(elapsed_min)`` is the cumulative energy delivered after ``elapsed_min`` of
    charging (monotone, 0 at 0). Returns all zeros when there is no tariff.
    """
    if charge_min < 0 or parking_min < 0:
        raise ValueError("charge_min and parking_min must not be negative")
    if tariff is None:
        return PriceBreakdown()
    bounds = sorted({_hhmm(x) for el in tariff.elements for x in (el.start_time, el.end_time) if x})
    end = start_t_min + charge_min + parking_min
    cuts = {start_t_min, end, start_t_min + charge_min}
    if bounds:
        day = int(start_t_min // DAY_MIN)
        while day * DAY_MIN < end:
            for b in bounds:
                t = day * DAY_MIN + b
                if start_t_min < t < end:
                    cuts.add(t)
            day += 1
    pts = sorted(cuts)
    energy = time_ = parking = 0.0
    charge_end = start_t_min + charge_min
    for a, b in pairwise(pts):
        el = active_element(tariff, a, power_kw)
        if el is None or b <= a:
            continue
        if b <= charge_end:
            kwh = energy_kwh_at(b - start_t_min) - energy_kwh_at(a - start_t_min)
            energy += kwh * el.energy_per_kwh
            time_ += (b - a) / 60.0 * el.time_per_hour
        else:
            parking += (b - a) / 60.0 * el.parking_per_hour
    first = active_element(tariff, start_t_min, power_kw)
    flat = first.flat if first is not None else 0.0
    return PriceBreakdown(energy, time_, parking, flat, tariff.currency)
