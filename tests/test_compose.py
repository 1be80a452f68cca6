"""docker-compose.yml: valid against the Compose spec schema, and the same topology as the
launcher for the default scenario (broker, one server + station agent per company, vehicles).

The schema is the official Compose Specification schema (compose-spec/compose-spec,
``schema/compose-spec.json``) as the ``check-jsonschema`` package vendors it
(``check_jsonschema/builtin_schemas/vendor/compose-spec.json``, a dev dependency).
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

jsonschema = pytest.importorskip("jsonschema")
yaml = pytest.importorskip("yaml")
vendor = pytest.importorskip("check_jsonschema.builtin_schemas.vendor")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def validator() -> Any:
    schema = json.loads((resources.files(vendor) / "compose-spec.json").read_text())
    assert schema["$id"] == "compose_spec.json" and "services" in schema["properties"]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _cmd(service: dict[str, Any]) -> list[str]:
    c = service.get("command") or []
    return c.split() if isinstance(c, str) else list(c)


def test_compose_file_is_valid(compose: dict[str, Any], validator: Any) -> None:
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_schema_rejects_typos(compose: dict[str, Any], validator: Any) -> None:
    bad = copy.deepcopy(compose)
    bad["services"]["broker"]["restrat"] = "always"
    assert not validator.is_valid(bad)
    bad = copy.deepcopy(compose)
    bad["services"]["vehicles"]["depends_on"]["stations-eletrovia"]["condition"] = "healthy"
    assert not validator.is_valid(bad)


def test_services_match_default_scenario(compose: dict[str, Any]) -> None:
    from evsim.scenario import load_scenario

    sc = load_scenario()
    companies = {c.id for c in sc.companies}
    services = compose["services"]
    by_role: dict[str, dict[str, str]] = {"server": {}, "station-agent": {}}
    for name, svc in services.items():
        cmd = _cmd(svc)
        if cmd and cmd[0] in by_role:
            company = _env(svc)["EVSIM_COMPANY"]
            assert company not in by_role[cmd[0]], f"two {cmd[0]} services for {company}"
            by_role[cmd[0]][company] = name
    assert set(by_role["server"]) == companies
    assert set(by_role["station-agent"]) == {s.company for s in sc.stations}
    assert "broker" in services and services["broker"]["image"].startswith("eclipse-mosquitto")

    volumes = set(compose.get("volumes") or {})
    for company, name in by_role["server"].items():
        svc = services[name]
        env = _env(svc)
        assert company in env["EVSIM_DB_URL"]
        mounts = {v.split(":", 1)[0] for v in svc["volumes"]}
        assert mounts & volumes, f"{name}: database not on a named volume"
        assert svc["depends_on"]["broker"]["condition"] == "service_healthy"
        assert "healthcheck" in svc
    # the vehicle agent talks to every server by its service name
    servers = dict(pair.split("=", 1) for pair in
                   _env(services["vehicles"])["EVSIM_SERVERS"].split(","))
    assert set(servers) == companies
    for company, url in servers.items():
        assert url == f"http://{by_role['server'][company]}:8000"


def test_no_secrets_committed(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        for key, value in _env(svc).items():
            if re.search("PASSWORD|SECRET|TOKEN|KEY", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", value), f"{name}.{key}={value}"
    conf = compose["configs"]["mosquitto_conf"]["content"]
    assert "allow_anonymous false" in conf and "set_tcp_nodelay true" in conf
    assert "acl_file /mosquitto/auth/acl" in conf and "password_file /mosquitto/auth/passwd" in conf
    assert "./deploy/mosquitto:/mosquitto/auth:ro" in compose["services"]["broker"]["volumes"]


def test_compose_credentials_match_live_acl(compose: dict[str, Any]) -> None:
    """Every service authenticates as the user live.acl generates for it, with the secret
    `python -m live acl` writes to secrets.env under the variable compose reads."""
    from evsim.scenario import load_scenario
    from live.acl import Credentials

    sc = load_scenario()
    names = set(Credentials.generate(sc).secrets_env())
    used = set()
    for svc in compose["services"].values():
        env = _env(svc)
        cmd = _cmd(svc)
        for key, value in env.items():
            m = re.fullmatch(r"\$\{([A-Z_]+):\?[^}]*\}", value)
            if m and re.search("PASSWORD|KEY", key):
                used.add(m.group(1))
        if cmd and cmd[0] == "server":
            assert env["EVSIM_MQTT_USER"] == f"server-{env['EVSIM_COMPANY']}"
        if cmd and cmd[0] == "station-agent":
            assert "EVSIM_MQTT_STATION_KEY" in env and "EVSIM_MQTT_USER" not in env
        if cmd and cmd[0] == "vehicle-agent":
            assert env["EVSIM_MQTT_USER"] == "vehicles"
    assert used == names


def test_dockerfile_installs_live_extra() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert '.[live]' in text and 'ENTRYPOINT ["python", "-m", "live"]' in text
