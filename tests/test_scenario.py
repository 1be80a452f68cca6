"""Scenario files: the shipped scenarios load, round-trip, and bad ones fail with clear messages.

Also the geography built from them: the Bahia road graph, haversine and the k-d tree.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import networkx as nx
import numpy as np
import pytest
from scipy.spatial import cKDTree

from evsim.geo import RoadNetwork, haversine_km, to_unit_xyz
from evsim.scenario import DEFAULT_SCENARIO, Scenario, ScenarioError, load_scenario, parse_scenario

DATA = Path(__file__).resolve().parents[1] / "data"
TINY = DATA / "tiny.toml"
MMC = DATA / "mmc.toml"
BAHIA = DATA / "bahia.toml"


@pytest.fixture(scope="module")
def make_bahia() -> ModuleType:
    """data/make_bahia.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("make_bahia", DATA / "make_bahia.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


@pytest.fixture(scope="module")
def bahia() -> Scenario:
    return load_scenario(BAHIA)


@pytest.fixture(scope="module")
def bahia_net(bahia: Scenario) -> RoadNetwork:
    return RoadNetwork.from_scenario(bahia)


def tiny_dict() -> dict[str, Any]:
    return tomllib.loads(TINY.read_text(encoding="utf-8"))


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "test")
    return info.value.problems


def has(problems: list[str], *parts: str) -> bool:
    return any(all(p in line for p in parts) for line in problems)


# --- the shipped scenarios ---------------------------------------------------------------


def test_default_scenario_is_bahia(bahia: Scenario) -> None:
    assert DEFAULT_SCENARIO == BAHIA
    assert load_scenario() == bahia
    assert bahia.name == "bahia"
    assert "Kelvin S. do Prado" in bahia.attribution
    assert "approximate" in bahia.description


def test_bahia_figures(bahia: Scenario) -> None:
    assert 40 <= len(bahia.geography.cities) <= 90
    assert 40 <= len(bahia.stations) <= 70
    assert len(bahia.companies) == 3
    assert 4 <= len(bahia.vehicle_models) <= 6
    assert 2000 <= bahia.demand.trips <= 2500
    assert bahia.duration_min == 1440
    assert not bahia.geography.roads and not bahia.demand.od  # generated roads, gravity model
    assert bahia.policy.name == "least_wait"
    ids = [c.id for c in bahia.geography.cities]
    assert all(i.isascii() and i == i.lower() for i in ids)
    assert {"salvador", "feira_de_santana", "vitoria_da_conquista", "juazeiro"} <= set(ids)
    for s in bahia.stations:
        n = sum(c.count for c in s.connectors)
        assert 2 <= n <= 8, s.id
        assert bahia.tariff_for(s) is not None
    powers = {(c.type, c.power_kw) for s in bahia.stations for c in s.connectors}
    assert {("DC", 50.0), ("DC", 150.0), ("DC", 350.0), ("AC", 22.0)} <= powers
    # more stations in the two big cities than anywhere else
    per_city = {c: sum(s.city == c for s in bahia.stations) for c in ids}
    top2 = sorted(per_city, key=per_city.__getitem__, reverse=True)[:2]
    assert set(top2) == {"salvador", "feira_de_santana"}


def test_bahia_tariffs_put_restricted_elements_first(bahia: Scenario) -> None:
    for t in bahia.tariffs:
        restricted = [
            e.start_time is not None or e.min_power_kw is not None or e.max_power_kw is not None
            for e in t.elements
        ]
        assert not restricted[-1], f"{t.id}: the last element should be the unrestricted fallback"
    assert any(e.start_time for t in bahia.tariffs for e in t.elements)
    assert any(e.min_power_kw for t in bahia.tariffs for e in t.elements)


def test_bahia_csv_matches_scenario(bahia: Scenario) -> None:
    import csv

    with (DATA / "bahia_municipalities.csv").open(encoding="utf-8", newline="") as f:
        rows = {r["nome"]: r for r in csv.DictReader(f)}
    assert len(rows) == len(bahia.geography.cities)
    for c in bahia.geography.cities:
        r = rows[c.name]
        assert r["codigo_uf"] == "29"
        assert (float(r["latitude"]), float(r["longitude"])) == (c.lat, c.lon)


def test_bahia_is_up_to_date(make_bahia: ModuleType, tmp_path: Path) -> None:
    """Regenerating from the shared CSV gives exactly the committed files."""
    if not make_bahia.DEFAULT_SOURCE.exists():
        pytest.skip(f"source CSV not here: {make_bahia.DEFAULT_SOURCE}")
    toml_path, csv_path = make_bahia.write_outputs(make_bahia.DEFAULT_SOURCE, tmp_path)
    assert toml_path.read_bytes() == BAHIA.read_bytes(), "run: python data/make_bahia.py"
    assert csv_path.read_bytes() == (DATA / "bahia_municipalities.csv").read_bytes()


def test_make_bahia_fails_loudly_on_a_missing_city(make_bahia: ModuleType) -> None:
    with pytest.raises(SystemExit, match="Atlantis"):
        make_bahia.pick({}, ["Atlantis"])
    assert make_bahia.slug("Dias d'Ávila") == "dias_d_avila"
    assert make_bahia.slug("Vitória da Conquista") == "vitoria_da_conquista"


@pytest.mark.parametrize("path", [TINY, MMC])
def test_small_scenarios_load(path: Path) -> None:
    s = load_scenario(path)
    assert s.geography.roads and s.demand.od  # explicit graph and O-D pairs
    net = RoadNetwork.from_scenario(s)
    assert nx.is_connected(net.graph)


def test_tiny_figures() -> None:
    s = load_scenario(TINY)
    assert len(s.geography.cities) == 4 and len(s.companies) == 2
    assert len(s.stations) == 4 and len(s.vehicle_models) == 2
    assert s.duration_min == 720  # the demand profile starts at 06:00
    net = RoadNetwork.from_scenario(s)
    a, d = net.index["alpha"], net.index["delta"]
    assert net.dist_km[a, d] == pytest.approx(300.0)
    assert net.time_min[a, d] == pytest.approx(200 / 90 * 60 + 100 / 100 * 60)
    assert [net.node_ids[i] for i in net.route(a, d)] == ["alpha", "bravo", "charlie", "delta"]


def test_mmc_is_one_station_with_four_connectors() -> None:
    s = load_scenario(MMC)
    assert len(s.geography.cities) == 2
    assert len(s.stations) == 1
    assert sum(c.count for c in s.stations[0].connectors) == 4


@pytest.mark.parametrize("path", [TINY, MMC, BAHIA])
def test_round_trip_through_dict(path: Path) -> None:
    s = load_scenario(path)
    assert parse_scenario(s.model_dump()) == s
    assert parse_scenario(s.model_dump(mode="json")) == s


@pytest.mark.parametrize("path", [TINY, MMC, BAHIA])
def test_round_trip_through_toml(path: Path, make_bahia: ModuleType, tmp_path: Path) -> None:
    s = load_scenario(path)
    out = tmp_path / "again.toml"
    out.write_text(make_bahia.dumps_toml(s.model_dump(exclude_none=True), "re-written"))
    assert load_scenario(out) == s


def test_with_overrides_validates() -> None:
    s = load_scenario(TINY)
    assert s.with_overrides(seed=99).seed == 99
    with pytest.raises(ValueError):
        s.with_overrides(duration_min=-1)


# --- bad scenarios ------------------------------------------------------------------------


def test_typo_top_level_key() -> None:
    data = tiny_dict()
    data["statons"] = data.pop("stations")
    probs = problems_of(data)
    assert has(probs, "statons", "unknown key")
    assert has(probs, "stations", "missing")


def test_typo_in_connector() -> None:
    data = tiny_dict()
    conn = data["stations"][1]["connectors"][0]
    conn["power_kwh"] = conn.pop("power_kw")
    probs = problems_of(data)
    assert has(probs, "stations.1.connectors.0.power_kwh", "unknown key")
    assert has(probs, "stations.1.connectors.0.power_kw", "missing")


def test_negative_power_names_the_path() -> None:
    data = tiny_dict()
    data["stations"][2]["connectors"][0]["power_kw"] = -50.0
    probs = problems_of(data)
    assert has(probs, "stations.2.connectors.0.power_kw", "greater than 0", "-50")


def test_unknown_city_with_hint() -> None:
    data = tiny_dict()
    data["stations"][0]["city"] = "alpah"
    probs = problems_of(data)
    assert has(probs, "stations.0.city", "unknown city 'alpah'", "did you mean 'alpha'")


def test_unknown_company() -> None:
    data = tiny_dict()
    data["stations"][3]["company"] = "zapp"
    probs = problems_of(data)
    assert has(probs, "stations.3.company", "unknown company 'zapp'", "did you mean 'zap'")


def test_unknown_tariff_and_od_city() -> None:
    data = tiny_dict()
    data["companies"][0]["tariff"] = "nope"
    data["demand"]["od"][1]["destination"] = "omega"
    probs = problems_of(data)
    assert has(probs, "companies.0.tariff", "unknown tariff 'nope'")
    assert has(probs, "demand.od.1.destination", "unknown city 'omega'")


def test_duplicate_station_id() -> None:
    data = tiny_dict()
    data["stations"][1]["id"] = data["stations"][0]["id"]
    probs = problems_of(data)
    assert has(probs, "stations", "duplicate id 'acme_alpha'")


def test_all_problems_reported_at_once() -> None:
    data = tiny_dict()
    data["stations"][0]["city"] = "nowhere"
    data["stations"][1]["company"] = "nobody"
    data["charging"]["reserve_soc"] = 0.9
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "my.toml")
    assert len(info.value.problems) == 3
    text = str(info.value)
    assert "my.toml" in text and "stations.0.city" in text and "stations.1.company" in text


@pytest.mark.parametrize("reserve", [0.8, 0.9])
def test_reserve_must_be_below_target(reserve: float) -> None:
    data = tiny_dict()
    data["charging"]["reserve_soc"] = reserve  # target is 0.8
    probs = problems_of(data)
    assert has(probs, "reserve_soc must be below", "target_soc")


def test_tariff_window_needs_both_ends() -> None:
    data = tiny_dict()
    del data["tariffs"][1]["elements"][0]["end_time"]
    probs = problems_of(data)
    assert has(probs, "tariffs.1.elements.0", "start_time and end_time must be given together")


def test_tariff_time_format() -> None:
    data = tiny_dict()
    data["tariffs"][1]["elements"][0]["start_time"] = "24:00"
    assert has(problems_of(data), "tariffs.1.elements.0.start_time", "24:00")


def test_fractions_and_profiles() -> None:
    data = tiny_dict()
    data["charging"]["target_soc"] = 1.5
    data["demand"]["tod_profile"] = [0.0] * 24
    data["demand"]["initial_soc"] = {"low": 0.9, "high": 0.2}
    probs = problems_of(data)
    assert has(probs, "charging.target_soc", "less than or equal to 1")
    assert has(probs, "demand.tod_profile", "at least one positive hour")
    assert has(probs, "demand.initial_soc", "must not exceed")


def test_station_lat_without_lon() -> None:
    data = tiny_dict()
    data["stations"][0]["lat"] = -12.0
    assert has(problems_of(data), "stations.0", "lat and lon must be given together")


def test_unreachable_station(make_bahia: ModuleType, tmp_path: Path) -> None:
    data = tiny_dict()
    data["geography"]["cities"].append({"id": "island", "lat": -13.0, "lon": -38.6})
    data["stations"].append(
        {"id": "island_1", "company": "acme", "city": "island", "connectors": [{"power_kw": 50.0}]}
    )
    parse_scenario(copy.deepcopy(data))  # the schema itself is fine; the road graph is not
    path = tmp_path / "island.toml"
    path.write_text(make_bahia.dumps_toml(data))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert has(info.value.problems, "stations.4 (island_1)", "unreachable", "island")


def test_unreachable_od_pair(make_bahia: ModuleType, tmp_path: Path) -> None:
    data = tiny_dict()
    data["geography"]["cities"].append({"id": "island", "lat": -13.0, "lon": -38.6})
    data["demand"]["od"].append({"origin": "alpha", "destination": "island"})
    path = tmp_path / "island.toml"
    path.write_text(make_bahia.dumps_toml(data))
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert has(info.value.problems, "demand.od.4", "no road", "island")


def test_malformed_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[geography\ncities = []\n')
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert has(info.value.problems, "not valid TOML")
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    assert info.value.problems == ["file not found"]
    assert str(path) in str(info.value)


def test_scenario_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        parse_scenario({})


# --- geography ----------------------------------------------------------------------------


def test_bahia_road_graph_is_connected(bahia: Scenario, bahia_net: RoadNetwork) -> None:
    assert nx.is_connected(bahia_net.graph)
    assert np.isfinite(bahia_net.dist_km).all()
    assert bahia_net.graph.number_of_nodes() == len(bahia.geography.cities)


def km(net: RoadNetwork, a: str, b: str) -> float:
    return float(net.dist_km[net.index[a], net.index[b]])


def test_bahia_route_distances(bahia_net: RoadNetwork) -> None:
    assert 100 <= km(bahia_net, "salvador", "feira_de_santana") <= 140  # real ~108
    assert 480 <= km(bahia_net, "salvador", "vitoria_da_conquista") <= 560  # real ~510
    assert 480 <= km(bahia_net, "salvador", "juazeiro") <= 620  # real ~505
    assert 20 <= km(bahia_net, "salvador", "lauro_de_freitas") <= 35  # real ~25
    assert 380 <= km(bahia_net, "salvador", "itabuna") <= 500  # real ~430


def test_route_is_consistent_with_tables(bahia_net: RoadNetwork) -> None:
    net = bahia_net
    s, t = net.index["salvador"], net.index["juazeiro"]
    path = net.route(s, t)
    assert path[0] == s and path[-1] == t
    legs = list(itertools.pairwise(path))
    assert sum(net.graph.edges[a, b]["distance_km"] for a, b in legs) == pytest.approx(
        net.dist_km[s, t]
    )
    assert sum(net.graph.edges[a, b]["time_min"] for a, b in legs) == pytest.approx(
        net.time_min[s, t]
    )
    np.testing.assert_allclose(net.dist_km, net.dist_km.T)
    assert (np.diag(net.dist_km) == 0).all()
    assert net.route(s, s) == [s]


def test_haversine_salvador_feira(bahia: Scenario) -> None:
    c = {x.id: x for x in bahia.geography.cities}
    sv, fs = c["salvador"], c["feira_de_santana"]
    d = float(haversine_km(sv.lat, sv.lon, fs.lat, fs.lon))
    assert 85 <= d <= 105  # ~93 km as the crow flies
    assert float(haversine_km(fs.lat, fs.lon, sv.lat, sv.lon)) == pytest.approx(d)
    assert float(haversine_km(0.0, 0.0, 0.0, 1.0)) == pytest.approx(111.195, rel=1e-4)
    assert float(haversine_km(90.0, 0.0, -90.0, 0.0)) == pytest.approx(np.pi * 6371.0088)


def test_kdtree_neighbours_match_haversine(bahia: Scenario) -> None:
    lat = np.array([c.lat for c in bahia.geography.cities])
    lon = np.array([c.lon for c in bahia.geography.cities])
    xyz = to_unit_xyz(lat, lon)
    np.testing.assert_allclose(np.linalg.norm(xyz, axis=1), 1.0)
    _, nbrs = cKDTree(xyz).query(xyz, k=5)
    d = haversine_km(lat[:, None], lon[:, None], lat[None, :], lon[None, :])
    brute = np.argsort(d, axis=1, kind="stable")[:, :5]
    for i in range(len(lat)):
        # same set of 5 nearest (ties aside, distances agree)
        np.testing.assert_allclose(np.sort(d[i, nbrs[i]]), np.sort(d[i, brute[i]]))


def test_generated_roads_use_circuity(bahia: Scenario, bahia_net: RoadNetwork) -> None:
    geo = bahia.geography
    lat, lon = bahia_net.lat, bahia_net.lon
    for a, b, e in bahia_net.graph.edges(data=True):
        gc = float(haversine_km(lat[a], lon[a], lat[b], lon[b]))
        assert e["distance_km"] == pytest.approx(gc * geo.circuity)
        assert e["time_min"] == pytest.approx(e["distance_km"] / geo.speed_kmh * 60)
    # every city has at least k roads (its own k nearest neighbours)
    assert min(dict(bahia_net.graph.degree()).values()) >= geo.k_neighbors


def test_components_are_joined() -> None:
    """Two far-apart clusters are joined by their closest pair of cities."""
    cities = [{"id": f"w{i}", "lat": -12.0 + 0.01 * i, "lon": -40.0} for i in range(3)] + [
        {"id": f"e{i}", "lat": -12.0 + 0.01 * i, "lon": -38.0} for i in range(3)
    ]
    data = tiny_dict()
    data["geography"] = {"cities": cities, "k_neighbors": 2}
    data["stations"] = [
        {"id": "s", "company": "acme", "city": "w0", "connectors": [{"power_kw": 50.0}]}
    ]
    data["demand"]["od"] = [{"origin": "w0", "destination": "e2"}]
    s = parse_scenario(data)
    net = RoadNetwork.from_scenario(s)
    assert nx.is_connected(net.graph)
    assert net.connectivity_problems(s) == []
    assert np.isfinite(km(net, "w0", "e2"))


def test_demand_outside_duration_is_rejected() -> None:
    data = tomllib.loads(TINY.read_text())
    data["duration_min"] = 360.0  # tiny's demand starts at 06:00: no trip could ever leave
    with pytest.raises(ScenarioError) as err:
        parse_scenario(data)
    assert any("tod_profile" in p and "duration_min" in p for p in err.value.problems)


@pytest.mark.parametrize("share", [1.0, -0.1, "half"])
def test_walkin_share_out_of_range_names_the_key(share: object) -> None:
    data = tiny_dict()
    data["booking"] = {"mode": "trip", "walkin_share": share}
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data)
    assert has(info.value.problems, "booking.walkin_share")
    data["booking"]["walkin_share"] = 0.5
    assert parse_scenario(data).booking.participant_config() == {"walkin_share": 0.5}
