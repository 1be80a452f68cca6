"""Issue 7, promise 4: hostile input never crashes a server nor changes what it stores.

* **REST**: schemathesis generates requests (valid and invalid) from every company server's
  OpenAPI schema and calls the app in-process (ASGI, an InMemoryBus between the two
  companies of data/tiny.toml): no 5xx, every status code, content type and body as the
  schema documents.
* **MQTT**: garbage, oversized (> 64 KiB) and wrongly-typed payloads on every topic of the
  tree (status, meter, cmd, events, protocol, notify) against a server on a real Mosquitto
  broker: the server still answers ``/health`` and its stations, bookings, sessions and
  database row counts are exactly as before.
* **Scenario files**: random corruption of data/tiny.toml (byte flips, deleted lines, values
  of the wrong type) either still loads or fails with :class:`ScenarioError` -- never another
  exception -- and ``evsim validate`` exits 0 or 2 accordingly.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")
pytest.importorskip("schemathesis")

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from sqlalchemy import func, select

from evsim.protocol import encode
from evsim.scenario import DATA_DIR, ScenarioError, load_scenario
from live import topics
from live.bus import InMemoryBus, encode_json
from live.server import create_app
from live.settings import Settings
from live.storage import idempotency, protocol_log, sessions, trips, vehicles

TINY = DATA_DIR / "tiny.toml"
TINY_TEXT = TINY.read_text()
EXAMPLES = int(os.environ.get("EVSIM_HOSTILE_EXAMPLES", "10"))


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ============================================================================ REST


@pytest.fixture(scope="module")
def rest_net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Both companies of tiny.toml on one InMemoryBus; a registered vehicle at each."""
    tmp = tmp_path_factory.mktemp("hostile-rest")
    bus, clock = InMemoryBus(), Clock()
    apps, headers, clients = {}, {}, {}
    for c in ("acme", "zap"):
        s = Settings(company=c, scenario=TINY, booking_wait_s=0.5,
                     db_url=f"sqlite:///{tmp / f'{c}.db'}")
        apps[c] = create_app(s, bus, clock)
        clients[c] = TestClient(apps[c])
        r = clients[c].post("/vehicles", json={"vehicle_id": "acme-hostile01"})
        assert r.status_code == 201, r.text
        headers[c] = {"Authorization": f"Bearer {r.json()['token']}"}
    # something to find: a booked trip and an active walk-in session at acme
    r = clients["acme"].post("/bookings", headers=headers["acme"], json={"stops": [
        {"station_id": "acme_alpha", "start_min": 110, "end_min": 140}]})
    assert r.status_code == 201, r.text
    r = clients["acme"].post("/sessions", headers=headers["acme"], json={
        "station_id": "acme_charlie", "soc": 0.2, "battery_kwh": 40.0})
    assert r.status_code == 201, r.text
    yield {"apps": apps, "headers": headers}
    for a in apps.values():
        a.state.service.close()


def _labels() -> list[tuple[str, str]]:
    """(company, operation label) pairs, read from a throw-away app's schema."""
    out = []
    for c in ("acme", "zap"):
        app = create_app(Settings(company=c, scenario=TINY, db_url="sqlite://"), InMemoryBus())
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        out += [(c, r.ok().label) for r in schema.get_all_operations()]
    return out


CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize(("company", "label"), _labels())
def test_rest_api_conforms_to_its_schema(rest_net: dict[str, Any], company: str, label: str,
                                         mode: str) -> None:
    """Generated requests (schema-valid, then invalid) per operation: no 5xx, as documented."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", rest_net["apps"][company])
    op = schema.find_operation_by_label(label)
    assert op is not None
    auth = rest_net["headers"][company]

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(schemathesis.GenerationMode(mode)))
    def run(case: Any) -> None:
        headers = {} if case.headers and "Authorization" in case.headers else dict(auth)
        case.call_and_validate(headers=headers, checks=CHECKS)

    try:
        run()
    except Unsatisfiable:
        if mode == "positive":
            raise
        pytest.skip(f"{label} takes no input that could be invalid")


def test_every_error_response_is_documented(rest_net: dict[str, Any]) -> None:
    """Every route that can answer 401/422 says so, with the Problem body."""
    spec = TestClient(rest_net["apps"]["acme"]).get("/openapi.json").json()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            codes = set(op["responses"])
            if op.get("security"):
                assert "401" in codes, (method, path)
            if op.get("requestBody") or op.get("parameters"):
                assert "422" in codes, (method, path)


# ============================================================================ MQTT


def _counts(svc: Any) -> dict[str, int]:
    with svc.storage.engine.connect() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                for t in (protocol_log, trips, sessions, vehicles, idempotency)}


def _state(client: TestClient, headers: dict[str, str], trip_id: str, session_id: str
           ) -> dict[str, Any]:
    return {
        "network": client.get("/network/stations").json(),
        "own": client.get("/stations").json(),
        "trip": client.get(f"/bookings/{trip_id}", headers=headers).json(),
        "session": client.get(f"/sessions/{session_id}", headers=headers).json(),
        "history": client.get("/vehicles/acme-evil/sessions", headers=headers).json(),
        "counts": _counts(client.app.state.service),
    }


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON-like values differ (for a readable assertion)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


def _payloads(extra: list[dict[str, Any]]) -> list[bytes]:
    junk: list[bytes] = [
        b"", b"\x00", b"\xff\xfe\xfd", b"not json", b"{", b"[]", b"[1,2,3]", b'"str"', b"1",
        b"null", b"true", b"NaN", b'{"a": NaN}', b'{"t_min": Infinity}', b"{}",
        b"[" * 60_000, b'{"a":' * 20_000, os.urandom(512), os.urandom(70_000),
        b'{"pad": "' + b"x" * (65 * 1024) + b'"}',  # oversized but valid JSON
        "{\"station_id\": \"\u00e9\u0000\"}".encode(),
    ]
    return junk + [json.dumps(d).encode() for d in extra]


def _typed_garbage(station: str, company: str, session_id: str, conn: str) -> list[dict]:
    """Objects with the right keys and the wrong types / values."""
    out: list[dict[str, Any]] = []
    status = {"station_id": station, "company_id": company, "online": True, "t_min": 1.0,
              "busy": 0, "queued": 0, "connectors": []}
    for k, bad in [("online", "yes"), ("online", 1), ("busy", "x"), ("busy", -1),
                   ("queued", [1]), ("t_min", "soon"), ("t_min", True),
                   ("connectors", "all"), ("connectors", [1, 2]), ("station_id", "other"),
                   ("company_id", "zap"), ("busy", 1e309), ("station_id", 7)]:
        out.append({**status, k: bad})
    event = {"event": "session_finished", "session_id": session_id, "connector_id": conn,
             "energy_kwh": 5.0, "soc": 0.5, "t_min": 120.0}
    for k, bad in [("event", 7), ("event", "explode"), ("session_id", 12),
                   ("session_id", "nope"), ("energy_kwh", "lots"), ("energy_kwh", -5),
                   ("soc", "full"), ("soc", 7.0), ("t_min", None), ("t_min", "later"),
                   ("connector_id", ["x"]), ("energy_kwh", 1e309)]:
        out.append({**event, k: bad})
    meter = {"station_id": station, "connector_id": conn, "session_id": session_id,
             "energy_kwh": 1.0, "power_kw": 50.0, "soc": 0.3, "t_min": 110.0}
    for k, bad in [("energy_kwh", "x"), ("energy_kwh", -1.0), ("session_id", None),
                   ("session_id", "nope"), ("power_kw", {}), ("soc", "low"),
                   ("energy_kwh", 10_000_000.0)]:
        out.append({**meter, k: bad})
    out += [{"cmd": "start", "session_id": 1}, {"cmd": ["stop"]},
            {"event": "booking_confirmed", "vehicle_id": 3}]
    return out


def _protocol_garbage(trip_id: str) -> list[bytes]:
    """Well-formed JSON that is not a valid protocol message (and real-looking ones)."""
    from evsim.protocol import Commit, Prepare

    bad = [
        {"type": "Prepare"}, {"type": "Nope", "msg_id": "x"},
        {"type": "COMMIT", "msg_id": 1, "src": None, "trip_id": trip_id},
        {"type": "VOTE", "msg_id": "v", "src": "zap", "trip_id": trip_id, "yes": "maybe"},
    ]
    out = [json.dumps(d).encode() for d in bad]
    # real message types with swapped field types
    real = [
        Prepare(msg_id="m1", src="zap.coord", trip_id="evil-trip", booking_id="evil-trip/0",
                station_id="acme_alpha", connector_id=None, start_min=110.0, end_min=140.0,
                grace_min=10.0, lease_min=5.0, priority_start_min=110.0),
        Commit(msg_id="m2", src="zap.coord", trip_id=trip_id, booking_id=f"{trip_id}/0"),
    ]
    for msg in real:
        d = json.loads(encode(msg))
        for k in list(d):
            if k == "type":
                continue
            swapped = dict(d)
            swapped[k] = {"nested": [k]} if not isinstance(d[k], dict) else 3
            out.append(json.dumps(swapped).encode())
    return out


@pytest.mark.broker
def test_garbage_on_every_topic_changes_nothing(mosquitto: Any, tmp_path: Path) -> None:
    from live.mqtt import MqttBus

    s = Settings(company="acme", scenario=TINY, booking_wait_s=5.0, mqtt_url=mosquitto.url,
                 db_url=f"sqlite:///{tmp_path / 'acme.db'}", tick_s=0.05)
    clock = Clock(100.0)
    app = create_app(s, clock=clock)  # connects its own MqttBus in the lifespan
    evil = MqttBus(mosquitto.url, client_id="evil")
    try:
        with TestClient(app) as client:
            svc = app.state.service
            deadline = time.monotonic() + 10
            while not (svc.bus is not None and svc.bus.connected) and time.monotonic() < deadline:
                time.sleep(0.05)
            r = client.post("/vehicles", json={"vehicle_id": "acme-evil"})
            h = {"Authorization": f"Bearer {r.json()['token']}"}
            r = client.post("/bookings", headers=h, json={"stops": [
                {"station_id": "acme_alpha", "start_min": 110, "end_min": 140}]})
            assert r.status_code == 201, r.text
            trip_id = r.json()["trip_id"]
            r = client.post("/sessions", headers=h, json={
                "station_id": "acme_charlie", "soc": 0.2, "battery_kwh": 40.0})
            assert r.status_code == 201, r.text
            sess = r.json()
            svc.host.tick()
            before = _state(client, h, trip_id, sess["session_id"])
            dropped_before = svc.host.dropped

            typed = _typed_garbage("acme_charlie", "acme", sess["session_id"],
                                   sess["connector_id"])
            payloads = _payloads(typed)
            targets = [
                topics.status_topic("acme", "acme_charlie"),
                topics.status_topic("acme", "acme_alpha"),
                topics.status_topic("zap", "zap_bravo"),
                topics.status_topic("zap", "acme_alpha"),  # wrong owner
                topics.status_topic("acme", "nowhere"),
                topics.meter_topic("acme", "acme_charlie"),
                topics.meter_topic("acme", "nowhere"),
                topics.events_topic("acme", "acme_charlie"),
                topics.events_topic("acme", "acme_alpha"),
                topics.cmd_topic("acme", "acme_charlie"),
                topics.protocol_topic("acme", "zap"),
                topics.protocol_topic("acme.coord", "zap"),
                topics.protocol_topic("acme", "acme"),
                "evsim/protocol/acme", "evsim/protocol/acme.coord/zap/extra",
                topics.vehicle_notify_topic("acme-evil"),
                "evsim/acme/stations/acme_charlie/unknown", "evsim/acme", "evsim",
            ]
            n = 0
            for topic in targets:
                for p in payloads:
                    evil.publish(topic, p, qos=1)
                    n += 1
            for p in _protocol_garbage(trip_id):
                for node in ("acme", "acme.coord"):
                    evil.publish(topics.protocol_topic(node, "zap"), p, qos=1)
                    n += 1
            assert evil.flush(20.0)
            # wait until the server's bus has handled everything (it counts handled messages)
            time.sleep(1.0)
            svc.bus.dispatcher.drain(20.0)
            svc.host.tick()
            assert client.get("/health").status_code == 200
            after = _state(client, h, trip_id, sess["session_id"])
            diff = _diff(before, after)
            assert not diff, "\n".join(diff)
            assert svc.host.dropped > dropped_before  # protocol garbage was counted, not used
            # a well-formed message still works afterwards
            r = client.post("/bookings", headers=h, json={"stops": [
                {"station_id": "acme_alpha", "start_min": 150, "end_min": 170}]})
            assert r.status_code == 201, r.text
    finally:
        # clear retained garbage so the broker fixture can be reused safely
        evil.close()


# ============================================================================ scenario files


_LINES = TINY_TEXT.splitlines(keepends=True)
_VALUE = re.compile(r"^(\s*[A-Za-z_]+\s*=\s*)(.+?)\s*$")


def _swap_type(line: str, kind: int) -> str:
    m = _VALUE.match(line)
    if not m:
        return line
    repl = ['"text"', "12", "-3.5", "true", "[1, 2]", "{ a = 1 }", "1e400", "nan", '""',
            "2024-01-01"][kind % 10]
    return f"{m.group(1)}{repl}\n"


@st.composite
def corrupted(draw: st.DrawFn) -> bytes:
    lines = list(_LINES)
    for _ in range(draw(st.integers(1, 4))):
        if not lines:
            break
        op = draw(st.sampled_from(["flip", "delete", "swap", "dup", "truncate"]))
        i = draw(st.integers(0, len(lines) - 1))
        if op == "delete":
            del lines[i]
        elif op == "swap":
            lines[i] = _swap_type(lines[i], draw(st.integers(0, 9)))
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "truncate":
            lines = lines[:i]
        else:
            b = bytearray(lines[i].encode())
            if b:
                j = draw(st.integers(0, len(b) - 1))
                b[j] ^= 1 << draw(st.integers(0, 7))
            lines[i] = b.decode("utf-8", errors="surrogateescape")
    return "".join(lines).encode("utf-8", errors="surrogateescape")


@settings(max_examples=int(os.environ.get("EVSIM_HOSTILE_SCENARIOS", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow], derandomize=True)
@given(data=corrupted())
def test_corrupted_scenarios_fail_cleanly(data: bytes, tmp_path: Path) -> None:
    p = tmp_path / "corrupt.toml"
    p.write_bytes(data)
    try:
        load_scenario(p)
    except ScenarioError as err:
        assert err.problems and all(isinstance(x, str) and x for x in err.problems)


def test_evsim_validate_exits_2_on_corruption(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from evsim.cli import app

    runner = CliRunner()
    cases = {
        "flip": TINY_TEXT.replace("power_kw = 150.0", "power_kw = 1\x050.0", 1).encode(),
        "bytes": TINY_TEXT.encode()[:500] + b"\xff\xfe" + TINY_TEXT.encode()[500:],
        "deleted": "".join(line for line in _LINES if not line.startswith("battery_kwh")).encode(),
        "typed": TINY_TEXT.replace("count = 2", 'count = "two"', 1).encode(),
        "truncated": TINY_TEXT.encode()[: len(TINY_TEXT) // 2],
    }
    for name, data in cases.items():
        p = tmp_path / f"{name}.toml"
        p.write_bytes(data)
        res = runner.invoke(app, ["validate", str(p)])
        assert res.exit_code == 2, (name, res.output, res.exception)
        assert res.exception is None or isinstance(res.exception, SystemExit), name
    ok = runner.invoke(app, ["validate", str(TINY)])
    assert ok.exit_code == 0, ok.output


def test_encode_json_roundtrip_guard() -> None:
    """The codec the tests above rely on rejects what it must."""
    from live.bus import BadPayload, decode_json

    for bad in (b"[" * 60_000, b"x" * 70_000, b"\xff", b"[]"):
        with pytest.raises(BadPayload):
            decode_json(bad)
    assert decode_json(encode_json({"a": 1})) == {"a": 1}
