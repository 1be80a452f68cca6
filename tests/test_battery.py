"""The closed-form CC-CV charging curve."""

from __future__ import annotations

import math

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from evsim.battery import (
    DRAIN_FACTORS,
    MAX_TARGET_SOC,
    MIN_SESSION_SOC,
    ChargeCurve,
    session_power_kw,
    session_soc_out,
)

batteries = st.floats(min_value=10.0, max_value=200.0)
powers = st.floats(min_value=3.0, max_value=400.0)
tapers = st.floats(min_value=0.5, max_value=0.95)
effs = st.floats(min_value=0.7, max_value=1.0)
socs = st.floats(min_value=0.0, max_value=MAX_TARGET_SOC)


@st.composite
def curves(draw: st.DrawFn) -> ChargeCurve:
    return ChargeCurve(draw(batteries), draw(powers), draw(tapers), draw(effs))


@given(curves(), socs, socs)
def test_soc_after_inverts_minutes_to(curve: ChargeCurve, a: float, b: float) -> None:
    soc0, soc1 = min(a, b), max(a, b)
    t = curve.minutes_to(soc0, soc1)
    assert t >= 0
    assert curve.soc_after(soc0, t) == pytest.approx(soc1, abs=1e-9)


@given(curves(), socs, st.floats(min_value=0.0, max_value=600.0))
def test_minutes_to_inverts_soc_after(curve: ChargeCurve, soc0: float, t: float) -> None:
    soc1 = curve.soc_after(soc0, t)
    assume(soc1 < MAX_TARGET_SOC)
    assert curve.minutes_to(soc0, soc1) == pytest.approx(t, rel=1e-6, abs=1e-6)


@given(curves(), socs, socs)
def test_cc_phase_time(curve: ChargeCurve, a: float, b: float) -> None:
    soc0, soc1 = sorted((a * curve.taper_soc, b * curve.taper_soc))  # both within CC
    expected = (soc1 - soc0) * curve.battery_kwh / (curve.power_kw * curve.efficiency) * 60
    assert curve.minutes_to(soc0, soc1) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_cc_phase_example() -> None:
    # 60 kWh, 50 kW, 95 %: 20 % -> 80 % is 36 kWh into the battery, 36/47.5 h
    curve = ChargeCurve(60.0, 50.0, taper_soc=0.8, efficiency=0.95)
    assert curve.minutes_to(0.2, 0.8) == pytest.approx(36 / 47.5 * 60)


@given(curves(), st.floats(min_value=0.001, max_value=0.04))
def test_taper_slows_charging(curve: ChargeCurve, d: float) -> None:
    s = curve.taper_soc
    assume(s + 0.02 + d < MAX_TARGET_SOC)  # minutes_to caps the target there
    below = curve.minutes_to(s - d - 0.01, s - 0.01)
    above = curve.minutes_to(s + 0.01, s + 0.01 + d)
    assert above > below
    # and keeps slowing as the battery fills
    assert curve.minutes_to(s + 0.02, s + 0.02 + d) > above


def test_taper_power_is_linear_in_remaining_capacity() -> None:
    curve = ChargeCurve(50.0, 100.0, taper_soc=0.8, efficiency=1.0)
    # at SoC 0.9 the power is P * (1-0.9)/(1-0.8) = P/2: a tiny step takes twice as long
    dt_cc = curve.minutes_to(0.5, 0.5001)
    dt_cv = curve.minutes_to(0.9, 0.9001)
    assert dt_cv / dt_cc == pytest.approx(2.0, rel=1e-3)


@given(curves(), socs, socs)
def test_energy_times_efficiency_is_battery_gain(curve: ChargeCurve, a: float, b: float) -> None:
    e = curve.energy_kwh(a, b)
    assert e >= 0
    assert e * curve.efficiency == pytest.approx(max(b - a, 0.0) * curve.battery_kwh)


@given(curves(), socs, st.floats(min_value=0.0, max_value=1e7))
def test_soc_never_exceeds_one(curve: ChargeCurve, soc0: float, t: float) -> None:
    soc = curve.soc_after(soc0, t)
    assert soc0 <= soc <= 1.0


@given(curves(), socs, st.floats(min_value=0.0, max_value=300.0), st.floats(0.0, 300.0))
def test_soc_after_is_monotone_and_composes(
    curve: ChargeCurve, soc0: float, t1: float, t2: float
) -> None:
    s1 = curve.soc_after(soc0, t1)
    s12 = curve.soc_after(soc0, t1 + t2)
    assert s12 >= s1 - 1e-12
    assert curve.soc_after(s1, t2) == pytest.approx(s12, abs=1e-9)


def test_target_is_capped() -> None:
    curve = ChargeCurve(40.0, 50.0)
    assert curve.minutes_to(0.5, 1.0) == curve.minutes_to(0.5, MAX_TARGET_SOC)
    assert math.isfinite(curve.minutes_to(0.0, 1.0))
    assert curve.minutes_to(0.7, 0.6) == 0.0
    assert curve.soc_after(0.4, 0.0) == 0.4
    assert curve.soc_after(0.4, -5.0) == 0.4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"battery_kwh": 0.0, "power_kw": 50.0},
        {"battery_kwh": 40.0, "power_kw": -1.0},
        {"battery_kwh": 40.0, "power_kw": 50.0, "taper_soc": 1.0},
        {"battery_kwh": 40.0, "power_kw": 50.0, "efficiency": 0.0},
        {"battery_kwh": 40.0, "power_kw": 50.0, "efficiency": 1.1},
    ],
)
def test_invalid_curves(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ChargeCurve(**kwargs)


def test_session_soc_out_examples() -> None:
    assert session_soc_out(0.3, 0.8) == 0.8
    assert session_soc_out(0.3, 1.0) == MAX_TARGET_SOC
    # a vehicle that stopped to charge but already holds its target charges a little
    assert session_soc_out(0.6, 0.5) == pytest.approx(0.6 + MIN_SESSION_SOC)
    assert session_soc_out(0.6, 0.6) == pytest.approx(0.6 + MIN_SESSION_SOC)
    # nothing past the cap: a zero-length session
    assert session_soc_out(MAX_TARGET_SOC, 0.5) == MAX_TARGET_SOC
    assert session_soc_out(0.995, 1.0) == 0.995


@given(st.floats(min_value=0.0, max_value=1.0), st.floats(min_value=0.0, max_value=1.0))
def test_session_soc_out_bounds(soc_in: float, target: float) -> None:
    out = session_soc_out(soc_in, target)
    assert out >= soc_in
    assert out <= max(MAX_TARGET_SOC, soc_in)
    if soc_in + MIN_SESSION_SOC <= MAX_TARGET_SOC:
        assert out >= soc_in + MIN_SESSION_SOC * (1 - 1e-9)
        assert out == min(max(target, soc_in + MIN_SESSION_SOC), MAX_TARGET_SOC)


def test_session_power() -> None:
    assert session_power_kw(350.0, "DC", 150.0, 11.0) == 150.0
    assert session_power_kw(50.0, "DC", 150.0, 11.0) == 50.0
    assert session_power_kw(22.0, "AC", 150.0, 11.0) == 11.0
    assert session_power_kw(7.4, "AC", 150.0, 11.0) == 7.4


def test_drain_factors() -> None:
    assert DRAIN_FACTORS["fast"] > DRAIN_FACTORS["normal"] == 1.0 > DRAIN_FACTORS["slow"]
