"""A session's record (evsim.cdr): energy conservation, meter scaling, parking, bad input,
and the same price as the simulation for the same session."""

from __future__ import annotations

from pathlib import Path

import pytest

from evsim.battery import ChargeCurve
from evsim.cdr import session_cdr
from evsim.model import Simulation
from evsim.model.vehicle import DriveKit
from evsim.scenario import TariffConfig, TariffElement, load_scenario

DATA = Path(__file__).resolve().parents[1] / "data"
H = 60.0

TARIFF = TariffConfig(id="t", currency="BRL", elements=[TariffElement(
    energy_per_kwh=2.0, time_per_hour=6.0, parking_per_hour=12.0, flat=3.0)])
SESSION = dict(soc_start=0.2, target_soc=0.8, battery_kwh=60.0, power_kw=50.0,
               taper_soc=0.8, efficiency=0.9)


def test_a_session_to_its_target_delivers_the_curve_energy_and_pays_each_component() -> None:
    curve = ChargeCurve(60.0, 50.0, 0.8, 0.9)
    need_min = curve.minutes_to(0.2, 0.8)
    cdr = session_cdr(TARIFF, start_t_min=600.0, end_t_min=600.0 + need_min + 15.0, **SESSION)
    assert cdr.energy_source == "model"
    assert cdr.charge_min == pytest.approx(need_min) and cdr.parking_min == pytest.approx(15.0)
    # conservation: what the battery gained is what the connector delivered times efficiency
    assert cdr.energy_kwh == pytest.approx(curve.energy_kwh(0.2, 0.8), rel=1e-12)
    assert (cdr.soc_end - 0.2) * 60.0 == pytest.approx(cdr.energy_kwh * 0.9, rel=1e-9)
    assert cdr.soc_end == pytest.approx(0.8, abs=1e-9)
    p = cdr.price
    assert p.energy == pytest.approx(2.0 * cdr.energy_kwh)
    assert p.time == pytest.approx(need_min / H * 6.0)
    assert p.parking == pytest.approx(15.0 / H * 12.0)
    assert p.flat == 3.0 and p.total == pytest.approx(p.energy + p.time + p.parking + 3.0)


def test_a_session_stopped_early_charges_all_of_its_time_and_parks_none() -> None:
    curve = ChargeCurve(60.0, 50.0, 0.8, 0.9)
    cdr = session_cdr(TARIFF, start_t_min=0.0, end_t_min=10.0, **SESSION)
    assert cdr.charge_min == 10.0 and cdr.parking_min == 0.0
    assert cdr.energy_kwh == pytest.approx(curve.energy_kwh(0.2, curve.soc_after(0.2, 10.0)))
    assert 0.2 < cdr.soc_end < 0.8 and cdr.price.parking == 0.0
    # unplugged before plugging in: nothing delivered, only the flat fee
    none = session_cdr(TARIFF, start_t_min=5.0, end_t_min=4.0, **SESSION)
    assert (none.energy_kwh, none.charge_min, none.parking_min) == (0.0, 0.0, 0.0)
    assert none.price.total == 3.0


def test_a_meter_reading_replaces_the_model_energy_and_its_price() -> None:
    model = session_cdr(TARIFF, start_t_min=0.0, end_t_min=30.0, **SESSION)
    metered = session_cdr(TARIFF, start_t_min=0.0, end_t_min=30.0, metered_kwh=12.5, **SESSION)
    assert metered.energy_source == "meter" and metered.energy_kwh == 12.5
    assert metered.price.energy == pytest.approx(2.0 * 12.5)
    assert metered.price.time == pytest.approx(model.price.time)  # the same minutes
    assert metered.soc_end == pytest.approx(0.2 + 12.5 * 0.9 / 60.0)
    assert metered.energy_kwh != model.energy_kwh


def test_a_meter_reading_is_split_over_tariff_windows_by_the_curve_shape() -> None:
    # 2/kWh before 10:00, 4/kWh from then on: the metered kWh fall in each window as the
    # curve's do, scaled to the metered total
    peak = TariffConfig(id="p", currency="BRL", elements=[
        TariffElement(energy_per_kwh=4.0, start_time="10:00", end_time="23:59"),
        TariffElement(energy_per_kwh=2.0)])
    curve = ChargeCurve(60.0, 50.0, 0.8, 0.9)
    e_before = curve.energy_kwh(0.2, curve.soc_after(0.2, 20.0))
    model = session_cdr(peak, start_t_min=580.0, end_t_min=620.0, **SESSION)
    share = e_before / model.energy_kwh
    metered = session_cdr(peak, start_t_min=580.0, end_t_min=620.0, metered_kwh=10.0, **SESSION)
    assert metered.price.energy == pytest.approx(10.0 * (share * 2.0 + (1 - share) * 4.0))


@pytest.mark.parametrize(("change", "named"), [
    ({"metered_kwh": -1.0}, "metered_kwh"),
    ({"metered_kwh": float("nan")}, "metered_kwh"),
    ({"soc_start": 1.5}, "soc_start"),
    ({"target_soc": -0.1}, "target_soc"),
    ({"battery_kwh": 0.0}, "battery_kwh"),
    ({"power_kw": -50.0}, "power_kw"),
])
def test_bad_input_is_refused_by_name(change: dict[str, float], named: str) -> None:
    args = {**SESSION, "start_t_min": 0.0, "end_t_min": 30.0, **change}
    with pytest.raises(ValueError, match=named):
        session_cdr(TARIFF, **args)  # type: ignore[arg-type]


def test_the_simulation_prices_and_meters_its_sessions_as_the_record_does() -> None:
    """The sim unplugs at the end of charging (no parking); each of its sessions, written
    out as a record, has the sim's own energy and price: one pricing rule for both runs."""
    sc = load_scenario(DATA / "tiny.toml")
    sim = Simulation(sc, seed=3)
    trace = sim.run().trace
    kit = DriveKit.of(sim)
    model = kit.trip_columns[0]
    stations = {s.id: s for s in sc.stations}
    start = trace[trace.kind == "session_start"].set_index("session_id")
    end = trace[trace.kind == "session_end"].set_index("session_id")
    assert len(end) >= 5 and (end.price > 0).all()
    for sid, e in end.iterrows():
        s = start.loc[sid]
        vm = kit.vehicle_models[model[int(str(e.vehicle_id)[1:])]]
        cdr = session_cdr(
            sc.tariff_for(stations[e.station_id]), start_t_min=s.t_min, end_t_min=e.t_min,
            soc_start=s.soc, target_soc=e.soc, battery_kwh=vm.battery_kwh,
            power_kw=e.power_kw, taper_soc=sc.charging.taper_soc,
            efficiency=sc.charging.efficiency)
        assert cdr.parking_min == pytest.approx(0.0, abs=1e-6)
        assert cdr.energy_kwh == pytest.approx(e.energy_kwh, rel=1e-6)
        assert cdr.price.total == pytest.approx(e.price, rel=1e-6)
