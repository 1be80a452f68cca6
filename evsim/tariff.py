"""Session pricing with OCPI tariff components: ENERGY, TIME, PARKING_TIME and FLAT.

A tariff is a list of elements; for each moment of a session the first element whose
restrictions match applies (OCPI semantics): a time-of-day window ``[start_time, end_time)``
(which may wrap midnight) and a connector power range. A session is split at every window
boundary; energy in each part comes from the charging curve, so a session that crosses into a
peak window pays the peak rate for the energy delivered inside it. The result is a breakdown
per component, like an OCPI CDR.

A tariff's windows and restrictions are parsed once per tariff object (:func:`compiled`), so
pricing a session is arithmetic only.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from itertools import pairwise

from evsim.scenario import TariffConfig, TariffElement

__all__ = ["CompiledTariff", "PriceBreakdown", "compiled", "price_session"]

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


# an element's restrictions, parsed: (min kW or None, max kW or None, window start and end
# in minutes of the day or None for all day, the element)
_Rule = tuple[float | None, float | None, float | None, float | None, TariffElement]


class CompiledTariff:
    """A tariff with its windows and restrictions parsed: what :func:`price_session` needs."""

    __slots__ = ("bounds", "currency", "rules")

    def __init__(self, tariff: TariffConfig) -> None:
        self.currency = tariff.currency
        self.bounds = sorted(
            {_hhmm(x) for el in tariff.elements for x in (el.start_time, el.end_time) if x}
        )
        rules: list[_Rule] = []
        for el in tariff.elements:
            if el.start_time is None or el.end_time is None:
                rules.append((el.min_power_kw, el.max_power_kw, None, None, el))
            else:
                a, b = _hhmm(el.start_time), _hhmm(el.end_time)
                rules.append((el.min_power_kw, el.max_power_kw, a, b, el))
        self.rules = tuple(rules)

    def element(self, t_min: float, power_kw: float) -> TariffElement | None:
        """:func:`active_element`: the first element whose restrictions match."""
        mod = t_min % DAY_MIN
        for lo, hi, a, b, el in self.rules:
            if lo is not None and power_kw < lo:
                continue
            if hi is not None and power_kw >= hi:
                continue
            if a is None or b is None:
                return el
            if a <= b:
                if a <= mod < b:
                    return el
            elif mod >= a or mod < b:  # window wraps midnight
                return el
        return None

    def price(
        self,
        start_t_min: float,
        charge_min: float,
        energy_kwh_at: Callable[[float], float],
        power_kw: float,
        parking_min: float = 0.0,
    ) -> PriceBreakdown:
        """:func:`price_session` for this tariff (the same arithmetic, in the same order)."""
        if charge_min < 0 or parking_min < 0:
            raise ValueError("charge_min and parking_min must not be negative")
        bounds = self.bounds
        end = start_t_min + charge_min + parking_min
        inside: list[float] = []  # window boundaries strictly inside the session
        if bounds:
            day = int(start_t_min // DAY_MIN)
            while day * DAY_MIN < end:
                for b in bounds:
                    t = day * DAY_MIN + b
                    if start_t_min < t < end:
                        inside.append(t)
                day += 1
        if not inside and not parking_min:
            # the common case: one part, [start, start + charge_min), if any; what the loop
            # below computes for it, without building the cuts
            el = self.element(start_t_min, power_kw)
            if el is None:
                return PriceBreakdown(0.0, 0.0, 0.0, 0.0, self.currency)
            energy = time_ = 0.0
            if end > start_t_min:  # end is start + charge_min here
                kwh = energy_kwh_at(end - start_t_min) - energy_kwh_at(start_t_min - start_t_min)
                energy += kwh * el.energy_per_kwh
                time_ += (end - start_t_min) / 60.0 * el.time_per_hour
            return PriceBreakdown(energy, time_, 0.0, el.flat, self.currency)
        cuts = {start_t_min, end, start_t_min + charge_min, *inside}
        pts = sorted(cuts)
        energy = time_ = parking = 0.0
        charge_end = start_t_min + charge_min
        element = self.element
        for a, b in pairwise(pts):
            el = element(a, power_kw)
            if el is None or b <= a:
                continue
            if b <= charge_end:
                kwh = energy_kwh_at(b - start_t_min) - energy_kwh_at(a - start_t_min)
                energy += kwh * el.energy_per_kwh
                time_ += (b - a) / 60.0 * el.time_per_hour
            else:
                parking += (b - a) / 60.0 * el.parking_per_hour
        first = element(start_t_min, power_kw)
        flat = first.flat if first is not None else 0.0
        return PriceBreakdown(energy, time_, parking, flat, self.currency)

    def charge_total(
        self,
        start_t_min: float,
        charge_min: float,
        energy_kwh_at: Callable[[float], float],
        power_kw: float,
    ) -> float:
        """``price(start_t_min, charge_min, energy_kwh_at, power_kw).total`` (no parking):
        the same arithmetic in the same order, without building the breakdown; a session
        that crosses a window boundary is priced by :meth:`price`."""
        if charge_min < 0:
            raise ValueError("charge_min and parking_min must not be negative")
        end = start_t_min + charge_min  # (+ 0.0 parking: the same comparisons below)
        bounds = self.bounds
        if bounds:
            day = int(start_t_min // DAY_MIN)
            while day * DAY_MIN < end:
                for b in bounds:
                    if start_t_min < day * DAY_MIN + b < end:  # a boundary inside
                        return self.price(start_t_min, charge_min, energy_kwh_at, power_kw).total
                day += 1
        el = self.element(start_t_min, power_kw)
        if el is None:
            return 0.0
        energy = time_ = 0.0
        if end > start_t_min:
            kwh = energy_kwh_at(end - start_t_min) - energy_kwh_at(start_t_min - start_t_min)
            energy += kwh * el.energy_per_kwh
            time_ += (end - start_t_min) / 60.0 * el.time_per_hour
        return energy + time_ + 0.0 + el.flat  # PriceBreakdown.total, parking 0.0


# compiled tariffs by the id of their (unhashable, immutable) TariffConfig, each entry
# dropped when its tariff is garbage collected
_COMPILED: dict[int, tuple[weakref.ref[TariffConfig], CompiledTariff]] = {}


def compiled(tariff: TariffConfig) -> CompiledTariff:
    """The tariff parsed once (remembered while the tariff object lives)."""
    key = id(tariff)
    hit = _COMPILED.get(key)
    if hit is not None and hit[0]() is tariff:
        return hit[1]
    c = CompiledTariff(tariff)

    def forget(ref: weakref.ref[TariffConfig], key: int = key) -> None:
        entry = _COMPILED.get(key)
        if entry is not None and entry[0] is ref:
            del _COMPILED[key]

    _COMPILED[key] = (weakref.ref(tariff, forget), c)
    return c


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
    return compiled(tariff).price(start_t_min, charge_min, energy_kwh_at, power_kw, parking_min)
