"""Session pricing with OCPI tariff components and restrictions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from evsim.battery import ChargeCurve
from evsim.scenario import TariffConfig, TariffElement
from evsim.tariff import PriceBreakdown, active_element, price_session

H = 60.0  # minutes per hour


def tariff(*elements: dict[str, Any], currency: str = "BRL") -> TariffConfig:
    return TariffConfig(id="t", currency=currency, elements=[TariffElement(**e) for e in elements])


def linear(kw: float) -> Callable[[float], float]:
    """Cumulative energy of a constant-power session."""
    return lambda m: kw * m / H


def curve_energy(curve: ChargeCurve, soc0: float) -> Callable[[float], float]:
    """Cumulative energy delivered after ``m`` minutes on a CC-CV curve."""
    return lambda m: curve.energy_kwh(soc0, curve.soc_after(soc0, m))


def test_single_element_components() -> None:
    t = tariff({"energy_per_kwh": 2.0, "time_per_hour": 6.0, "parking_per_hour": 12.0, "flat": 3.0})
    p = price_session(
        t,
        start_t_min=600.0,
        charge_min=30.0,
        energy_kwh_at=linear(50.0),
        power_kw=50.0,
        parking_min=20.0,
    )
    assert p.energy == pytest.approx(25.0 * 2.0)  # 25 kWh
    assert p.time == pytest.approx(0.5 * 6.0)
    assert p.parking == pytest.approx(20 / H * 12.0)
    assert p.flat == 3.0
    assert p.total == pytest.approx(50.0 + 3.0 + 4.0 + 3.0)
    assert p.currency == "BRL"
    d = p.as_dict()
    assert d["total"] == pytest.approx(p.total) and d["currency"] == "BRL"


def test_energy_with_charge_curve() -> None:
    curve = ChargeCurve(60.0, 100.0, taper_soc=0.8, efficiency=0.9)
    soc0 = 0.5
    e_at = curve_energy(curve, soc0)
    t = tariff({"energy_per_kwh": 2.0, "time_per_hour": 10.0})
    p = price_session(t, 0.0, 40.0, e_at, power_kw=100.0)
    assert p.energy == pytest.approx(2.0 * curve.energy_kwh(soc0, curve.soc_after(soc0, 40.0)))
    assert p.time == pytest.approx(40 / H * 10.0)
    assert p.flat == 0.0 and p.parking == 0.0


def test_session_crossing_into_peak_pays_peak_for_energy_inside() -> None:
    peak = {"energy_per_kwh": 3.0, "start_time": "18:00", "end_time": "21:00"}
    base = {"energy_per_kwh": 2.0}
    t = tariff(peak, base)
    curve = ChargeCurve(60.0, 120.0, taper_soc=0.8, efficiency=0.95)
    soc0 = 0.6  # crosses the taper during the session, so energy per minute is not constant
    e_at = curve_energy(curve, soc0)
    start = 17 * H + 40  # 17:40, charges 50 min: 20 min off-peak, 30 min peak
    p = price_session(t, start, 50.0, e_at, power_kw=120.0)
    off, on = e_at(20.0), e_at(50.0) - e_at(20.0)
    assert p.energy == pytest.approx(off * 2.0 + on * 3.0)
    # and it is dearer than the same session priced all off-peak
    assert p.energy > e_at(50.0) * 2.0


def test_session_leaving_peak_and_parking_after() -> None:
    peak = {
        "energy_per_kwh": 3.0,
        "parking_per_hour": 30.0,
        "start_time": "18:00",
        "end_time": "21:00",
    }
    base = {"energy_per_kwh": 2.0, "parking_per_hour": 10.0}
    t = tariff(peak, base)
    # 20:30-21:30 charging (30 min peak, 30 off), then 30 min parking off-peak
    p = price_session(t, 20 * H + 30, 60.0, linear(60.0), power_kw=60.0, parking_min=30.0)
    assert p.energy == pytest.approx(30.0 * 3.0 + 30.0 * 2.0)
    assert p.parking == pytest.approx(0.5 * 10.0)
    # parking across the boundary: 20:00-20:30 charge, 20:30-21:30 parked (30 min at 30/h)
    p2 = price_session(t, 20 * H, 30.0, linear(60.0), power_kw=60.0, parking_min=60.0)
    assert p2.energy == pytest.approx(30.0 * 3.0)
    assert p2.parking == pytest.approx(0.5 * 30.0 + 0.5 * 10.0)


def test_window_wrapping_midnight() -> None:
    night = {"energy_per_kwh": 1.0, "start_time": "22:00", "end_time": "06:00"}
    day = {"energy_per_kwh": 2.0}
    t = tariff(night, day)
    e = linear(60.0)  # 1 kWh per minute
    # 23:30 -> 00:30: all night rate
    assert price_session(t, 23 * H + 30, 60.0, e, 60.0).energy == pytest.approx(60.0)
    # 05:30 -> 06:30: half night, half day
    assert price_session(t, 5 * H + 30, 60.0, e, 60.0).energy == pytest.approx(30 + 60)
    # 21:30 -> 22:30: half day, half night
    assert price_session(t, 21 * H + 30, 60.0, e, 60.0).energy == pytest.approx(60 + 30)
    # on a later day of the simulation too
    day3 = 2 * 1440.0
    assert price_session(t, day3 + 5 * H + 30, 60.0, e, 60.0).energy == pytest.approx(90.0)
    # a whole day: 8 h night, 16 h day
    assert price_session(t, 0.0, 1440.0, e, 60.0).energy == pytest.approx(480 + 2 * 960)


def test_power_restriction() -> None:
    fast = {"energy_per_kwh": 2.5, "time_per_hour": 6.0, "min_power_kw": 100.0}
    slow = {"energy_per_kwh": 1.8}
    t = tariff(fast, slow)
    p150 = price_session(t, 0.0, 60.0, linear(150.0), power_kw=150.0)
    assert p150.energy == pytest.approx(150 * 2.5) and p150.time == pytest.approx(6.0)
    p50 = price_session(t, 0.0, 60.0, linear(50.0), power_kw=50.0)
    assert p50.energy == pytest.approx(50 * 1.8) and p50.time == 0.0
    # min_power is inclusive, max_power exclusive (OCPI)
    assert active_element(t, 0.0, 100.0) is t.elements[0]
    t2 = tariff({"energy_per_kwh": 1.0, "max_power_kw": 22.0}, {"energy_per_kwh": 2.0})
    assert active_element(t2, 0.0, 21.9) is t2.elements[0]
    assert active_element(t2, 0.0, 22.0) is t2.elements[1]


def test_first_matching_element_wins() -> None:
    t = tariff(
        {"energy_per_kwh": 1.0}, {"energy_per_kwh": 9.0, "start_time": "00:00", "end_time": "12:00"}
    )
    # the unrestricted element comes first, so the window is never reached
    assert price_session(t, 60.0, 60.0, linear(10.0), 10.0).energy == pytest.approx(10.0)


def test_no_matching_element_costs_nothing() -> None:
    t = tariff({"energy_per_kwh": 2.0, "start_time": "08:00", "end_time": "09:00"})
    p = price_session(t, 10 * H, 30.0, linear(50.0), 50.0, parking_min=10.0)
    assert p.total == 0.0


def test_flat_fee_from_element_at_start() -> None:
    t = tariff(
        {"energy_per_kwh": 2.0, "flat": 5.0, "start_time": "18:00", "end_time": "21:00"},
        {"energy_per_kwh": 2.0, "flat": 1.0},
    )
    assert price_session(t, 17 * H + 50, 30.0, linear(10.0), 10.0).flat == 1.0
    assert price_session(t, 18 * H, 30.0, linear(10.0), 10.0).flat == 5.0


def test_no_tariff_is_free() -> None:
    p = price_session(None, 100.0, 45.0, linear(50.0), 50.0, parking_min=15.0)
    assert p == PriceBreakdown()
    assert p.total == 0.0


def test_negative_durations_rejected() -> None:
    t = tariff({"energy_per_kwh": 2.0})
    with pytest.raises(ValueError):
        price_session(t, 0.0, -1.0, linear(50.0), 50.0)
    with pytest.raises(ValueError):
        price_session(t, 0.0, 1.0, linear(50.0), 50.0, parking_min=-1.0)


def test_zero_length_session() -> None:
    t = tariff({"energy_per_kwh": 2.0, "time_per_hour": 5.0, "flat": 1.5})
    p = price_session(t, 500.0, 0.0, linear(50.0), 50.0)
    assert (p.energy, p.time, p.parking, p.flat) == (0.0, 0.0, 0.0, 1.5)


# --- properties ---------------------------------------------------------------------------

prices = st.floats(min_value=0.0, max_value=10.0)
hhmm = st.builds(lambda h, m: f"{h:02d}:{m:02d}", st.integers(0, 23), st.sampled_from([0, 15, 30]))


@st.composite
def elements(draw: st.DrawFn) -> dict[str, Any]:
    el: dict[str, Any] = {
        "energy_per_kwh": draw(prices),
        "time_per_hour": draw(prices),
        "parking_per_hour": draw(prices),
        "flat": draw(prices),
    }
    if draw(st.booleans()):
        el["start_time"], el["end_time"] = draw(hhmm), draw(hhmm)
    if draw(st.booleans()):
        el["min_power_kw"] = draw(st.sampled_from([0.0, 50.0, 100.0]))
    return el


tariffs = st.lists(elements(), min_size=1, max_size=4).map(lambda els: tariff(*els))
starts = st.floats(min_value=0.0, max_value=3 * 1440.0)
durations = st.floats(min_value=0.0, max_value=600.0)
power = st.sampled_from([11.0, 22.0, 50.0, 100.0, 150.0, 350.0])


@given(tariffs, starts, durations, durations, power, st.floats(1.0, 400.0))
def test_total_is_sum_of_non_negative_components(
    t: TariffConfig, start: float, charge: float, parking: float, kw: float, rate: float
) -> None:
    p = price_session(t, start, charge, linear(rate), kw, parking_min=parking)
    assert p.total == pytest.approx(p.energy + p.time + p.parking + p.flat)
    assert min(p.energy, p.time, p.parking, p.flat) >= 0.0
    assert p.total >= 0.0


@given(tariffs, starts, durations, power, st.floats(1.0, 200.0), st.floats(1.0, 3.0))
def test_monotone_in_energy(
    t: TariffConfig, start: float, charge: float, kw: float, rate: float, factor: float
) -> None:
    lo = price_session(t, start, charge, linear(rate), kw)
    hi = price_session(t, start, charge, linear(rate * factor), kw)
    assert hi.energy >= lo.energy - 1e-9
    assert hi.total >= lo.total - 1e-9
    assert (hi.time, hi.parking, hi.flat) == pytest.approx((lo.time, lo.parking, lo.flat))


@given(tariffs, starts, durations, durations, power)
def test_splitting_matches_single_price_when_uniform(
    t: TariffConfig, start: float, charge: float, parking: float, kw: float
) -> None:
    """With one unrestricted element the price is plain arithmetic, however the day is cut."""
    el = t.elements[0].model_copy(
        update={"start_time": None, "end_time": None, "min_power_kw": None}
    )
    flat_t = TariffConfig(id="u", elements=[el])
    p = price_session(flat_t, start, charge, linear(kw), kw, parking_min=parking)
    assert p.energy == pytest.approx(kw * charge / H * el.energy_per_kwh, abs=1e-9)
    assert p.time == pytest.approx(charge / H * el.time_per_hour, abs=1e-9)
    assert p.parking == pytest.approx(parking / H * el.parking_per_hour, abs=1e-9)
    assert p.flat == el.flat
