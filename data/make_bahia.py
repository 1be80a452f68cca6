"""Generate the default scenario ``data/bahia.toml`` and ``data/bahia_municipalities.csv``.

The geography is real: municipalities of Bahia, Brazil, taken by name from the reference file
``br_municipalities.csv`` (IBGE codes and WGS84 coordinates from the MIT-licensed dataset
"municipios-brasileiros", Copyright (c) 2016 Kelvin S. do Prado). The cities follow the main
corridors out of Salvador and Feira de Santana:

* the metropolitan region and BR-324 (Salvador - Simoes Filho - Amelia Rodrigues - Feira);
* BR-116 south (Feira - Santo Estevao - Milagres - Jequie - Pocoes - Vitoria da Conquista);
* BR-324/BR-407 north-west (Feira - Riachao do Jacuipe - Capim Grosso - Senhor do Bonfim -
  Juazeiro) and BR-116 north (Serrinha - Tucano - Euclides da Cunha), on to Paulo Afonso;
* the coast and BR-101 (Camacari, Alagoinhas, Santo Antonio de Jesus, Itabuna, Ilheus, down to
  Porto Seguro and Teixeira de Freitas);
* BR-242 west (Itaberaba - Seabra - Ibotirama - Barreiras - Luis Eduardo Magalhaes).

There are no explicit roads: the simulator joins each city to its ``k`` nearest neighbours
with great-circle distance x circuity (see ``evsim/geo.py``). Nazare and Valenca are left out
on purpose: as nearest neighbours they would join Salvador across the bay. City weights are
approximate populations (rounded 2022 census figures for the larger towns, a default for small
ones).
Companies, tariffs, stations and the demand are invented but plausible.

Everything is deterministic: the same input CSV gives byte-identical outputs.

Usage::

    python data/make_bahia.py [--source PATH] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "br_municipalities.csv"
DEFAULT_OUT_DIR = REPO / "data"
BAHIA_UF = "29"

ATTRIBUTION = (
    'Municipality names, IBGE codes and coordinates: "municipios-brasileiros" by '
    "Kelvin S. do Prado (csv/municipios.csv), MIT License, Copyright (c) 2016 "
    "Kelvin S. do Prado."
)

DEFAULT_WEIGHT = 25_000.0  # small towns without a known figure

# (name as in the CSV, approximate population; None -> DEFAULT_WEIGHT), grouped by corridor.
CITIES: tuple[tuple[str, float | None], ...] = (
    # Salvador metropolitan region and BR-324
    ("Salvador", 2_418_000),
    ("Lauro de Freitas", 203_000),
    ("Camaçari", 300_000),
    ("Simões Filho", 114_000),
    ("Candeias", 72_000),
    ("Dias d'Ávila", 81_000),
    ("Mata de São João", 46_000),
    ("São Sebastião do Passé", 42_000),
    ("Catu", 51_000),
    ("Alagoinhas", 151_000),
    ("Santo Amaro", 58_000),
    ("Amélia Rodrigues", 25_000),
    ("Conceição do Jacuípe", 33_000),
    ("Feira de Santana", 616_000),
    ("São Gonçalo dos Campos", 33_000),
    # North coast (BR-101 towards Sergipe)
    ("Entre Rios", 40_000),
    ("Esplanada", 37_000),
    # Reconcavo and the south coast (BR-101)
    ("Cruz das Almas", 64_000),
    ("Santo Antônio de Jesus", 103_000),
    ("Laje", 24_000),
    ("Presidente Tancredo Neves", 27_000),
    ("Gandu", 32_000),
    ("Ipiaú", 44_000),
    ("Ubaitaba", 18_000),
    ("Itacaré", 28_000),
    ("Itabuna", 187_000),
    ("Ilhéus", 179_000),
    ("Buerarema", 17_000),
    ("Camacan", 31_000),
    ("Itapebi", 10_000),
    ("Eunápolis", 114_000),
    ("Porto Seguro", 168_000),
    ("Itamaraju", 63_000),
    ("Teixeira de Freitas", 145_000),
    ("Alcobaça", 22_000),
    ("Mucuri", 41_000),
    # BR-116 south
    ("Santo Estêvão", 51_000),
    ("Rafael Jambeiro", 20_000),
    ("Itatim", 14_000),
    ("Milagres", 11_000),
    ("Santa Inês", 10_000),
    ("Jaguaquara", 51_000),
    ("Jequié", 159_000),
    ("Manoel Vitorino", 13_000),
    ("Poções", 44_000),
    ("Planalto", 24_000),
    ("Vitória da Conquista", 371_000),
    ("Itapetinga", 68_000),
    ("Brumado", 65_000),
    ("Caetité", 49_000),
    ("Guanambi", 88_000),
    ("Riacho de Santana", 31_000),
    ("Bom Jesus da Lapa", 65_000),
    # BR-324 / BR-407 north-west and BR-116 north
    ("Tanquinho", None),
    ("Riachão do Jacuípe", 33_000),
    ("Capim Grosso", 30_000),
    ("Jacobina", 81_000),
    ("Ponto Novo", 15_000),
    ("Filadélfia", 16_000),
    ("Senhor do Bonfim", 75_000),
    ("Campo Formoso", 71_000),
    ("Jaguarari", 32_000),
    ("Juazeiro", 238_000),
    ("Sobradinho", 23_000),
    ("Serrinha", 80_000),
    ("Tucano", 50_000),
    ("Euclides da Cunha", 56_000),
    ("Inhambupe", 39_000),
    ("Olindina", 26_000),
    ("Ribeira do Pombal", 54_000),
    ("Cícero Dantas", 32_000),
    ("Paulo Afonso", 113_000),
    # BR-242 west
    ("Ipirá", 59_000),
    ("Itaberaba", 64_000),
    ("Lençóis", 11_000),
    ("Seabra", 43_000),
    ("Ibitiara", 16_000),
    ("Oliveira dos Brejinhos", 21_000),
    ("Ibotirama", 26_000),
    ("Wanderley", 12_000),
    ("Cristópolis", 14_000),
    ("Barreiras", 160_000),
    ("São Desidério", 34_000),
    ("Luís Eduardo Magalhães", 108_000),
    ("Riachão das Neves", 22_000),
)

# Connector sets: (power_kw, type, count).
Connector = tuple[float, str, int]
KITS: dict[str, tuple[Connector, ...]] = {
    "hub350": ((350, "DC", 2), (150, "DC", 4), (22, "AC", 2)),  # 8: big urban hubs
    "hub150": ((150, "DC", 4), (50, "DC", 2)),  # 6
    "corridor": ((350, "DC", 2), (150, "DC", 2)),  # 4: highway ultra-fast
    "fast": ((150, "DC", 2), (50, "DC", 2)),  # 4
    "road": ((150, "DC", 1), (50, "DC", 1)),  # 2: small roadside stop
    "dc50": ((50, "DC", 2), (22, "AC", 1)),  # 3
    "mall": ((50, "DC", 2), (22, "AC", 4)),  # 6: shopping centre
    "ac": ((22, "AC", 4),),  # 4: destination charging
}

# Stations: (city name, company, kit, offset north km, offset east km). Offsets put a station
# a few km from the city centre (shopping centres, highway exits); (0, 0) is the centre.
STATIONS: tuple[tuple[str, str, str, float, float], ...] = (
    # Salvador: many, spread over the city
    ("Salvador", "voltbahia", "hub350", 0.0, 0.0),
    ("Salvador", "recarga_nordeste", "mall", 2.5, 3.5),  # Iguatemi / Paralela
    ("Salvador", "eletrovia", "ac", -1.5, 1.0),  # Barra / Ondina
    ("Salvador", "recarga_nordeste", "hub150", 6.0, 8.0),  # Paralela / airport road
    ("Salvador", "eletrovia", "fast", 9.0, 2.5),  # BR-324 exit
    ("Salvador", "voltbahia", "mall", 4.0, -1.0),
    ("Lauro de Freitas", "voltbahia", "fast", 0.0, 0.0),
    ("Camaçari", "recarga_nordeste", "hub150", 0.0, 0.0),
    ("Camaçari", "eletrovia", "dc50", -3.0, 4.0),  # Arembepe road
    ("Simões Filho", "voltbahia", "corridor", 0.0, 0.0),  # BR-324
    ("Dias d'Ávila", "eletrovia", "dc50", 0.0, 0.0),
    ("Mata de São João", "recarga_nordeste", "dc50", -8.0, 9.0),  # Praia do Forte
    ("Amélia Rodrigues", "voltbahia", "corridor", 0.0, -2.0),  # BR-324
    ("Alagoinhas", "eletrovia", "fast", 0.0, 0.0),
    ("Santo Amaro", "recarga_nordeste", "dc50", 0.0, 0.0),
    # Feira de Santana: the crossroads
    ("Feira de Santana", "voltbahia", "hub350", 0.0, 0.0),
    ("Feira de Santana", "recarga_nordeste", "hub150", -3.0, 3.0),  # BR-324 / BR-116 junction
    ("Feira de Santana", "eletrovia", "fast", 3.5, -2.0),  # BR-116 north exit
    ("Feira de Santana", "recarga_nordeste", "mall", 1.0, 1.5),
    ("Feira de Santana", "eletrovia", "ac", -1.0, -1.0),
    # North coast
    ("Esplanada", "eletrovia", "road", 0.0, 0.0),
    # Reconcavo and south coast (BR-101)
    ("Cruz das Almas", "recarga_nordeste", "dc50", 0.0, 0.0),
    ("Santo Antônio de Jesus", "voltbahia", "fast", 0.0, 0.0),
    ("Ipiaú", "recarga_nordeste", "dc50", 0.0, 0.0),
    ("Gandu", "eletrovia", "corridor", 0.0, 0.0),
    ("Ubaitaba", "voltbahia", "road", 0.0, 0.0),
    ("Itabuna", "recarga_nordeste", "hub150", 0.0, 0.0),
    ("Ilhéus", "eletrovia", "fast", 0.0, 0.0),
    ("Ilhéus", "recarga_nordeste", "ac", -4.0, 0.5),  # south beaches
    ("Camacan", "voltbahia", "road", 0.0, 0.0),
    ("Eunápolis", "eletrovia", "corridor", 0.0, 0.0),
    ("Porto Seguro", "recarga_nordeste", "fast", 0.0, 0.0),
    ("Porto Seguro", "voltbahia", "ac", -6.0, 0.5),  # Arraial d'Ajuda side
    ("Itamaraju", "voltbahia", "road", 0.0, 0.0),
    ("Teixeira de Freitas", "voltbahia", "fast", 0.0, 0.0),
    # BR-116 south
    ("Santo Estêvão", "eletrovia", "road", 0.0, 0.0),
    ("Milagres", "voltbahia", "corridor", 0.0, 0.0),
    ("Jaguaquara", "recarga_nordeste", "dc50", 0.0, 0.0),
    ("Jequié", "recarga_nordeste", "hub150", 0.0, 0.0),
    ("Jequié", "eletrovia", "dc50", 2.0, -1.5),
    ("Poções", "voltbahia", "corridor", 0.0, 0.0),
    ("Vitória da Conquista", "voltbahia", "hub350", 0.0, 0.0),
    ("Vitória da Conquista", "eletrovia", "mall", 2.5, 2.0),
    ("Vitória da Conquista", "recarga_nordeste", "fast", -3.0, -3.5),  # BR-116 south exit
    ("Itapetinga", "eletrovia", "dc50", 0.0, 0.0),
    ("Brumado", "recarga_nordeste", "road", 0.0, 0.0),
    ("Caetité", "eletrovia", "dc50", 0.0, 0.0),
    ("Guanambi", "voltbahia", "dc50", 0.0, 0.0),
    # North-west and north
    ("Riachão do Jacuípe", "recarga_nordeste", "road", 0.0, 0.0),
    ("Capim Grosso", "voltbahia", "corridor", 0.0, 0.0),
    ("Jacobina", "eletrovia", "dc50", 0.0, 0.0),
    ("Senhor do Bonfim", "recarga_nordeste", "fast", 0.0, 0.0),
    ("Juazeiro", "voltbahia", "hub150", 0.0, 0.0),
    ("Juazeiro", "eletrovia", "mall", 1.5, 2.0),
    ("Serrinha", "eletrovia", "fast", 0.0, 0.0),
    ("Olindina", "recarga_nordeste", "dc50", 0.0, 0.0),
    ("Tucano", "voltbahia", "road", 0.0, 0.0),
    ("Euclides da Cunha", "eletrovia", "road", 0.0, 0.0),
    ("Ribeira do Pombal", "recarga_nordeste", "road", 0.0, 0.0),
    ("Paulo Afonso", "recarga_nordeste", "fast", 0.0, 0.0),
    # BR-242 west
    ("Itaberaba", "eletrovia", "corridor", 0.0, 0.0),
    ("Seabra", "voltbahia", "fast", 0.0, 0.0),
    ("Bom Jesus da Lapa", "recarga_nordeste", "dc50", 0.0, 0.0),
    ("Lençóis", "eletrovia", "road", 0.0, 0.0),
    ("Ibitiara", "eletrovia", "road", 0.0, 0.0),
    ("Oliveira dos Brejinhos", "recarga_nordeste", "corridor", 0.0, 0.0),
    ("Ibotirama", "eletrovia", "corridor", 0.0, 0.0),
    ("Wanderley", "voltbahia", "road", 0.0, 0.0),
    ("Barreiras", "voltbahia", "fast", 0.0, 0.0),
    ("Luís Eduardo Magalhães", "eletrovia", "dc50", 0.0, 0.0),
)

COMPANIES: tuple[dict[str, Any], ...] = (
    {"id": "voltbahia", "name": "VoltBahia", "tariff": "voltbahia_std"},
    {"id": "recarga_nordeste", "name": "Recarga Nordeste", "tariff": "recarga_nordeste_std"},
    {"id": "eletrovia", "name": "EletroVia", "tariff": "eletrovia_std"},
)

# OCPI-style tariffs in BRL. Elements with restrictions come before the unrestricted fallback:
# the first element whose restrictions match applies.
TARIFFS: tuple[dict[str, Any], ...] = (
    {
        # Time-of-day peak: 18:00-21:00 energy costs more; parking (idle) fee after charging.
        "id": "voltbahia_std",
        "currency": "BRL",
        "elements": [
            {
                "energy_per_kwh": 2.69,
                "parking_per_hour": 18.0,
                "start_time": "18:00",
                "end_time": "21:00",
            },
            {"energy_per_kwh": 1.99, "parking_per_hour": 18.0},
        ],
    },
    {
        # Power restriction: DC at 100 kW or more costs more per kWh and per hour.
        "id": "recarga_nordeste_std",
        "currency": "BRL",
        "elements": [
            {
                "energy_per_kwh": 2.39,
                "time_per_hour": 6.0,
                "parking_per_hour": 24.0,
                "flat": 3.0,
                "min_power_kw": 100.0,
            },
            {"energy_per_kwh": 1.79, "parking_per_hour": 12.0, "flat": 3.0},
        ],
    },
    {
        # Night off-peak window wrapping midnight, a session fee and a time component.
        "id": "eletrovia_std",
        "currency": "BRL",
        "elements": [
            {
                "energy_per_kwh": 1.49,
                "time_per_hour": 2.0,
                "parking_per_hour": 6.0,
                "flat": 2.5,
                "start_time": "22:00",
                "end_time": "06:00",
            },
            {"energy_per_kwh": 2.19, "time_per_hour": 4.0, "parking_per_hour": 15.0, "flat": 2.5},
        ],
    },
)

# Models sold in Brazil (approximate: usable battery, real-world consumption, DC/AC limits).
VEHICLE_MODELS: tuple[dict[str, Any], ...] = (
    {
        "id": "byd_dolphin_mini",
        "battery_kwh": 38.0,
        "consumption_kwh_per_km": 0.13,
        "max_charge_kw": 40.0,
        "max_ac_kw": 6.6,
        "share": 0.34,
    },
    {
        "id": "byd_dolphin",
        "battery_kwh": 44.9,
        "consumption_kwh_per_km": 0.15,
        "max_charge_kw": 60.0,
        "max_ac_kw": 6.6,
        "share": 0.2,
    },
    {
        "id": "byd_yuan_plus",
        "battery_kwh": 60.5,
        "consumption_kwh_per_km": 0.17,
        "max_charge_kw": 88.0,
        "max_ac_kw": 7.0,
        "share": 0.14,
    },
    {
        "id": "renault_kwid_etech",
        "battery_kwh": 26.8,
        "consumption_kwh_per_km": 0.12,
        "max_charge_kw": 30.0,
        "max_ac_kw": 6.6,
        "share": 0.1,
    },
    {
        "id": "volvo_ex30",
        "battery_kwh": 69.0,
        "consumption_kwh_per_km": 0.17,
        "max_charge_kw": 153.0,
        "max_ac_kw": 11.0,
        "share": 0.1,
    },
    {
        "id": "byd_seal",
        "battery_kwh": 82.5,
        "consumption_kwh_per_km": 0.165,
        "max_charge_kw": 150.0,
        "max_ac_kw": 11.0,
        "share": 0.12,
    },
)

# Departures per hour of day (relative): morning and late-afternoon peaks, quiet nights.
# fmt: off
TOD_PROFILE: tuple[float, ...] = (
    0.2, 0.15, 0.1, 0.15, 0.4, 1.0, 2.2, 3.0, 2.6, 2.0, 1.8, 1.7,  # 00-11 h
    1.6, 1.7, 1.9, 2.2, 2.6, 2.8, 2.3, 1.6, 1.1, 0.8, 0.5, 0.3,  # 12-23 h
)
# fmt: on


def slug(name: str) -> str:
    """Lowercase ascii identifier: 'Feira de Santana' -> 'feira_de_santana'."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "_", ascii_name.lower()).strip("_")


@dataclass(frozen=True, slots=True)
class Municipality:
    row: dict[str, str]  # the source row, all columns

    @property
    def name(self) -> str:
        return self.row["nome"]

    @property
    def lat(self) -> float:
        return float(self.row["latitude"])

    @property
    def lon(self) -> float:
        return float(self.row["longitude"])


def read_bahia(source: Path) -> tuple[list[str], dict[str, Municipality]]:
    """The source's columns and Bahia's municipalities by name."""
    with source.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows = [r for r in reader if r["codigo_uf"] == BAHIA_UF]
    by_name: dict[str, Municipality] = {}
    for r in rows:
        if r["nome"] in by_name:
            raise SystemExit(f"{source}: two Bahia municipalities named {r['nome']!r}")
        by_name[r["nome"]] = Municipality(r)
    return columns, by_name


def pick(by_name: Mapping[str, Municipality], names: Iterable[str]) -> list[Municipality]:
    """The municipalities with these exact names; fails loudly listing every missing one."""
    names = list(names)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise SystemExit(f"not in the source CSV (codigo_uf {BAHIA_UF}): {', '.join(missing)}")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SystemExit(f"cities listed twice: {', '.join(dupes)}")
    return [by_name[n] for n in names]


def offset(lat: float, lon: float, north_km: float, east_km: float) -> tuple[float, float]:
    """A point ``north_km``/``east_km`` away (flat-earth approximation, fine for a few km)."""
    km_per_deg = 111.195
    return (
        round(lat + north_km / km_per_deg, 5),
        round(lon + east_km / (km_per_deg * math.cos(math.radians(lat))), 5),
    )


def build_scenario(by_name: Mapping[str, Municipality]) -> dict[str, Any]:
    """The scenario as a plain mapping, in the schema of ``evsim/scenario.py``."""
    munis = pick(by_name, (n for n, _ in CITIES))
    weights = dict(CITIES)
    cities = [
        {
            "id": slug(m.name),
            "name": m.name,
            "lat": m.lat,
            "lon": m.lon,
            "weight": float(weights[m.name] or DEFAULT_WEIGHT),
        }
        for m in munis
    ]
    if len({c["id"] for c in cities}) != len(cities):
        raise SystemExit("two cities share a slug")
    stations: list[dict[str, Any]] = []
    per_key: dict[str, int] = {}
    known = {m.name: m for m in munis}
    for city, company, kit, dn, de in STATIONS:
        if city not in known:
            raise SystemExit(f"station in {city!r}, which is not among the scenario's cities")
        key = f"{company}_{slug(city)}"
        per_key[key] = per_key.get(key, 0) + 1
        st: dict[str, Any] = {
            "id": f"{key}_{per_key[key]}",
            "company": company,
            "city": slug(city),
        }
        if dn or de:
            st["lat"], st["lon"] = offset(known[city].lat, known[city].lon, dn, de)
        st["connectors"] = [{"power_kw": float(p), "type": t, "count": n} for p, t, n in KITS[kit]]
        stations.append(st)
    return {
        "name": "bahia",
        "description": (
            "EV charging along the main corridors of Bahia, Brazil: Salvador and Feira de "
            "Santana (BR-324), BR-116 south to Vitoria da Conquista, BR-324/BR-407 north to "
            "Juazeiro, BR-116 north to Paulo Afonso, the coast (BR-101) from Alagoinhas to "
            "Teixeira de Freitas and BR-242 west to Barreiras. Real coordinates; roads are "
            "generated from them (k nearest neighbours, great-circle x circuity). City weights "
            "are approximate populations (rounded 2022 census figures for the larger towns, "
            f"{int(DEFAULT_WEIGHT):,} for small ones). Companies, tariffs, stations and demand "
            "are invented. Generated by data/make_bahia.py."
        ),
        "attribution": ATTRIBUTION,
        "duration_min": 1440.0,
        "seed": 20240529,
        "geography": {
            # 4 neighbours and circuity 1.2 fit known road distances best for these cities
            # (the multi-hop routes add their own detour): Salvador - Vitoria da Conquista
            # 505 km (real ~510), Salvador - Feira 121 km (real ~108).
            "k_neighbors": 4,
            "circuity": 1.2,
            "speed_kmh": 80.0,
            "cities": cities,
        },
        "companies": [dict(c) for c in COMPANIES],
        "tariffs": [dict(t) for t in TARIFFS],
        "stations": stations,
        "vehicle_models": [dict(v) for v in VEHICLE_MODELS],
        "demand": {
            "trips": 2400.0,
            "gravity_exponent": 1.7,
            "min_trip_km": 60.0,
            "tod_profile": list(TOD_PROFILE),
            "initial_soc": {"dist": "beta", "low": 0.5, "high": 0.95, "a": 3.0, "b": 2.0},
            "drain_profiles": {"fast": 0.25, "normal": 0.6, "slow": 0.15},
        },
        "charging": {
            "threshold_soc": 0.3,
            "reserve_soc": 0.1,
            "target_soc": 0.8,
            "max_wait_min": 180.0,
            "taper_soc": 0.8,
            "efficiency": 0.93,
        },
        "policy": {"name": "least_wait"},
        "network": {"status_delay_min": 1.0},
    }


# --- a small TOML writer (strings, numbers, booleans, arrays, tables, arrays of tables) ----

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k, ensure_ascii=False)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"TOML writer: non-finite float {v!r}")
        return repr(v)
    if isinstance(v, str):
        # JSON string escapes are a subset of TOML basic-string escapes
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, Sequence):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"TOML writer: cannot write {type(v).__name__}")


def _is_table_array(v: Any) -> bool:
    return (
        isinstance(v, Sequence)
        and not isinstance(v, str)
        and len(v) > 0
        and all(isinstance(x, Mapping) for x in v)
    )


def _table(path: list[str], data: Mapping[str, Any], out: list[str]) -> None:
    for k, v in data.items():
        if v is None or isinstance(v, Mapping) or _is_table_array(v):
            continue  # None: TOML has no null, an absent key means the default
        out.append(f"{_key(k)} = {_value(v)}")
    for k, v in data.items():  # then sub-tables and arrays of tables, in the given order
        sub = [*path, _key(k)]
        if isinstance(v, Mapping):
            out.extend(["", f"[{'.'.join(sub)}]"])
            _table(sub, v, out)
        elif _is_table_array(v):
            for item in v:
                out.extend(["", f"[[{'.'.join(sub)}]]"])
                _table(sub, item, out)


def dumps_toml(data: Mapping[str, Any], header: str = "") -> str:
    """``data`` as TOML text, preceded by ``header`` as '#' comment lines."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    if out:
        out.append("")
    _table([], data, out)
    return "\n".join(out).strip("\n") + "\n"


# --- entry point --------------------------------------------------------------------------

TOML_HEADER = f"""\
The default evsim scenario: EV charging on the road network of Bahia, Brazil.
Generated by data/make_bahia.py from br_municipalities.csv; edit that script, not this file.

{ATTRIBUTION}"""


def write_outputs(source: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write ``bahia.toml`` and ``bahia_municipalities.csv`` into ``out_dir``."""
    columns, by_name = read_bahia(source)
    scenario = build_scenario(by_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    toml_path = out_dir / "bahia.toml"
    toml_path.write_text(dumps_toml(scenario, TOML_HEADER), encoding="utf-8")
    used = {c["name"] for c in scenario["geography"]["cities"]}
    csv_path = out_dir / "bahia_municipalities.csv"
    with csv_path.open("w", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for m in by_name.values():  # source order
            if m.name in used:
                w.writerow(m.row)
    return toml_path, csv_path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help=f"br_municipalities.csv (default: {DEFAULT_SOURCE})",
    )
    ap.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"where to write (default: {DEFAULT_OUT_DIR})",
    )
    ap.add_argument(
        "--no-check",
        action="store_true",
        help="skip loading the result with evsim's scenario loader",
    )
    args = ap.parse_args(argv)
    if not args.source.exists():
        print(f"source CSV not found: {args.source}", file=sys.stderr)
        return 2
    toml_path, csv_path = write_outputs(args.source, args.out_dir)
    print(f"wrote {toml_path} and {csv_path}")
    if not args.no_check:
        sys.path.insert(0, str(REPO))
        from evsim.scenario import load_scenario

        s = load_scenario(toml_path)
        n_conn = sum(c.count for st in s.stations for c in st.connectors)
        print(
            f"ok: {len(s.geography.cities)} cities, {len(s.stations)} stations, "
            f"{n_conn} connectors, {len(s.vehicle_models)} vehicle models, "
            f"{s.demand.trips:g} trips"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
