"""Battery and charging physics: drain per km and the CC-CV charging curve, in closed form.

Charging follows constant current up to ``taper_soc`` (full power ``power_kw``), then constant
voltage: the power tapers linearly with the remaining capacity, ``p(soc) = P (1-soc)/(1-taper)``,
so SoC approaches 1 exponentially. ``power_kw`` is the connector's rating capped by what the
vehicle accepts (DC or on-board AC limit). ``efficiency`` is battery gain / energy delivered by
the connector. Everything is closed form: no time stepping, so a session costs O(1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = [
    "DRAIN_FACTORS",
    "MAX_TARGET_SOC",
    "MIN_SESSION_SOC",
    "ChargeCurve",
    "session_power_kw",
    "session_soc_out",
]

# Drain profiles multiply a vehicle model's consumption (driving style / load / climate).
DRAIN_FACTORS: dict[str, float] = {"fast": 1.25, "normal": 1.0, "slow": 0.85}
MAX_TARGET_SOC = 0.99  # the CV tail never reaches 1.0 in finite time
MIN_SESSION_SOC = 1e-3  # the least a session charges (the API takes no target <= soc)


def session_soc_out(soc_in: float, target_soc: float) -> float:
    """The SoC a session charges to, in the simulation and the live network alike:
    ``target_soc``, but at least ``MIN_SESSION_SOC`` above ``soc_in`` (a vehicle that stopped
    to charge plugs in for something) and at most ``MAX_TARGET_SOC``; ``soc_in`` itself when
    that is already ``MAX_TARGET_SOC`` or more (nothing to charge)."""
    return max(min(max(target_soc, soc_in + MIN_SESSION_SOC), MAX_TARGET_SOC), soc_in)


def session_power_kw(
    connector_kw: float, connector_type: str, max_dc_kw: float, max_ac_kw: float
) -> float:
    """Power a session runs at: the connector's rating capped by the vehicle's limit."""
    cap = max_ac_kw if connector_type == "AC" else max_dc_kw
    return min(connector_kw, cap)


@dataclass(frozen=True, slots=True)
class ChargeCurve:
    battery_kwh: float
    power_kw: float
    taper_soc: float = 0.8
    efficiency: float = 0.95
    _rate: float = field(init=False, repr=False, compare=False)  # SoC per minute at full power

    def __post_init__(self) -> None:
        if self.battery_kwh <= 0 or self.power_kw <= 0:
            raise ValueError("battery_kwh and power_kw must be positive")
        if not 0 < self.taper_soc < 1 or not 0 < self.efficiency <= 1:
            raise ValueError("taper_soc must be in (0, 1) and efficiency in (0, 1]")
        rate = self.power_kw * self.efficiency / (self.battery_kwh * 60.0)
        object.__setattr__(self, "_rate", rate)  # frozen: set once, here

    def minutes_to(self, soc0: float, soc1: float) -> float:
        """Minutes to charge from soc0 to soc1 (0 when soc1 <= soc0)."""
        soc1 = min(soc1, MAX_TARGET_SOC)
        if soc1 <= soc0:
            return 0.0
        k, s_t = self._rate, self.taper_soc
        t = 0.0
        if soc0 < s_t:
            t += (min(soc1, s_t) - soc0) / k
            soc0 = min(soc1, s_t)
        if soc1 > soc0:
            t += (1 - s_t) / k * math.log((1 - soc0) / (1 - soc1))
        return t

    def soc_after(self, soc0: float, t_min: float) -> float:
        """SoC after charging ``t_min`` minutes from soc0 (inverse of :meth:`minutes_to`)."""
        if t_min <= 0:
            return soc0
        k, s_t = self._rate, self.taper_soc
        if soc0 < s_t:
            t_cc = (s_t - soc0) / k
            if t_min <= t_cc:
                return soc0 + k * t_min
            t_min -= t_cc
            soc0 = s_t
        return 1 - (1 - soc0) * math.exp(-k * t_min / (1 - s_t))

    def energy_kwh(self, soc0: float, soc1: float) -> float:
        """Energy the connector delivers to raise the battery from soc0 to soc1."""
        return max(soc1 - soc0, 0.0) * self.battery_kwh / self.efficiency
