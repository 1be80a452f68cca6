"""MQTT authentication and access control for a scenario: users, passwords, the ACL.

Principals (one MQTT user each) and what the generated ACL lets them do:

* ``server-{company}``: publish its stations' commands (``evsim/{c}/stations/+/cmd``), its own
  protocol messages (``evsim/protocol/+/{c}``: the last level is the sender, see
  :func:`live.topics.protocol_topic`) and vehicle notifications; read every station's status,
  its own stations' events and meter readings, and the protocol messages for its nodes
  (``evsim/protocol/{c}/+``, ``evsim/protocol/{c}.coord/+``).
* ``station-{station_id}``: publish that station's ``status`` (and last will), ``meter`` and
  ``events``; read its ``cmd``. A station agent runs all its company's stations and holds one
  secret, the company's *station key*; each station's password is
  ``HMAC-SHA256(key, station_id)`` (:func:`station_password`), so a station can only ever act
  as itself, and one process needs one secret (``EVSIM_MQTT_STATION_KEY``).
* ``vehicles``: the fleet's vehicle agent; reads ``evsim/vehicles/+/notify``. A single vehicle
  connecting under its own id as user name reads only its own notifications (``pattern read
  evsim/vehicles/%u/notify``).

Anonymous clients are refused (``allow_anonymous false``, :class:`live.broker.MosquittoBroker`
and the compose broker config). Passwords are stored as Mosquitto 2 ``$7$`` hashes
(PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt: what ``mosquitto_passwd`` writes; computed
here so no Mosquitto tools are needed, and checked against a real broker by the tests).

``python -m live acl --scenario data/bahia.toml --out deploy/mosquitto`` writes ``passwd`` and
``acl`` (hashes and rules only, mounted by docker-compose) and ``secrets.env`` (the plain
passwords, mode 0600, for ``docker compose --env-file``); all three are git-ignored.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from evsim.scenario import Scenario
from live import topics

__all__ = [
    "VEHICLES_USER",
    "Credentials",
    "acl_lines",
    "env_name",
    "mosquitto_hash",
    "server_user",
    "station_password",
    "station_user",
    "write_deploy",
    "write_passwd",
    "write_secrets",
]

VEHICLES_USER = "vehicles"
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default


def server_user(company: str) -> str:
    return f"server-{company}"


def station_user(station_id: str) -> str:
    return f"station-{station_id}"


def station_password(key: str, station_id: str) -> str:
    """A station's MQTT password, derived from its company's station key."""
    return hmac.new(key.encode(), station_id.encode(), hashlib.sha256).hexdigest()


def mosquitto_hash(password: str, salt: bytes | None = None,
                   iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2 password hash ``$7$iterations$salt_b64$hash_b64`` (PBKDF2-SHA512)."""
    salt = secrets.token_bytes(12) if salt is None else salt
    dk = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(dk).decode()}"


def _secret() -> str:
    return secrets.token_urlsafe(24)


@dataclass
class Credentials:
    """Secrets of one deployment: a password per server, a station key per company, the
    vehicle agent's password. :meth:`generate` draws fresh random ones."""

    servers: dict[str, str] = field(default_factory=dict)  # company -> password
    station_keys: dict[str, str] = field(default_factory=dict)  # company -> station key
    vehicles: str = ""
    stations: dict[str, str] = field(default_factory=dict)  # station_id -> company

    @classmethod
    def generate(cls, scenario: Scenario) -> Credentials:
        companies = [c.id for c in scenario.companies]
        return cls(
            servers={c: _secret() for c in companies},
            station_keys={c: _secret() for c in companies},
            vehicles=_secret(),
            stations={s.id: s.company for s in scenario.stations},
        )

    def users(self) -> dict[str, str]:
        """Every MQTT user name -> plain password."""
        out = {server_user(c): pw for c, pw in self.servers.items()}
        for sid, company in self.stations.items():
            out[station_user(sid)] = station_password(self.station_keys[company], sid)
        out[VEHICLES_USER] = self.vehicles
        return out

    # -- what each process gets in its environment ------------------------------------------

    def server_env(self, company: str) -> dict[str, str]:
        return {"EVSIM_MQTT_USER": server_user(company),
                "EVSIM_MQTT_PASSWORD": self.servers[company]}

    def station_agent_env(self, company: str) -> dict[str, str]:
        return {"EVSIM_MQTT_STATION_KEY": self.station_keys[company]}

    def vehicles_env(self) -> dict[str, str]:
        return {"EVSIM_MQTT_USER": VEHICLES_USER, "EVSIM_MQTT_PASSWORD": self.vehicles}

    def secrets_env(self) -> dict[str, str]:
        """The variables docker-compose reads (see :func:`env_name`)."""
        out = {env_name("PASSWORD", server_user(c)): pw for c, pw in self.servers.items()}
        out.update({env_name("STATION_KEY", c): k for c, k in self.station_keys.items()})
        out[env_name("PASSWORD", VEHICLES_USER)] = self.vehicles
        return out


def env_name(kind: str, who: str) -> str:
    """``EVSIM_MQTT_{kind}_{WHO}``, e.g. ``EVSIM_MQTT_PASSWORD_SERVER_VOLTBAHIA``."""
    return f"EVSIM_MQTT_{kind}_{re.sub(r'[^A-Za-z0-9]', '_', who).upper()}"


def acl_lines(scenario: Scenario) -> list[str]:
    """The Mosquitto ``acl_file`` for ``scenario`` (rules per user; nothing else allowed)."""
    lines = ["# generated by live.acl -- do not edit; regenerate from the scenario", ""]
    for c in (c.id for c in scenario.companies):
        lines += [
            f"user {server_user(c)}",
            f"topic write {topics.company_filter(c, 'cmd')}",
            f"topic read {topics.company_filter(c, 'events')}",
            f"topic read {topics.company_filter(c, 'meter')}",
            f"topic read {topics.ALL_STATUS}",
            f"topic write {topics.ROOT}/protocol/+/{c}",
            f"topic read {topics.protocol_filter(c)}",
            f"topic read {topics.protocol_filter(f'{c}.coord')}",
            f"topic write {topics.ROOT}/vehicles/+/notify",
            "",
        ]
    for s in scenario.stations:
        lines += [
            f"user {station_user(s.id)}",
            f"topic write {topics.status_topic(s.company, s.id)}",
            f"topic write {topics.meter_topic(s.company, s.id)}",
            f"topic write {topics.events_topic(s.company, s.id)}",
            f"topic read {topics.cmd_topic(s.company, s.id)}",
            "",
        ]
    lines += [
        f"user {VEHICLES_USER}",
        f"topic read {topics.ROOT}/vehicles/+/notify",
        "",
        "# any other user named after a vehicle id: only its own notifications",
        f"pattern read {topics.ROOT}/vehicles/%u/notify",
    ]
    return lines


def write_passwd(path: Path, users: Mapping[str, str], mode: int = 0o600) -> Path:
    """A Mosquitto ``password_file`` for ``users`` (name -> plain password)."""
    path = Path(path)
    _write(path, "".join(f"{u}:{mosquitto_hash(pw)}\n" for u, pw in users.items()), mode)
    return path


def write_acl(path: Path, lines: Iterable[str], mode: int = 0o644) -> Path:
    path = Path(path)
    _write(path, "\n".join(lines) + "\n", mode)
    return path


def _write(path: Path, text: str, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def write_deploy(scenario: Scenario, out: Path,
                 creds: Credentials | None = None) -> tuple[Credentials, dict[str, Path]]:
    """``passwd`` + ``acl`` (mode 0644: hashes and rules only, readable by the broker's
    container user) and ``secrets.env`` (plain passwords, mode 0600) in ``out``."""
    creds = creds or Credentials.generate(scenario)
    out = Path(out)
    files = {
        "passwd": write_passwd(out / "passwd", creds.users(), mode=0o644),
        "acl": write_acl(out / "acl", acl_lines(scenario)),
    }
    files["secrets.env"] = write_secrets(creds, out / "secrets.env")
    return creds, files


def write_secrets(creds: Credentials, path: Path) -> Path:
    """The plain passwords as ``NAME=value`` lines (mode 0600), for ``--env-file``."""
    env = "".join(f"{k}={v}\n" for k, v in creds.secrets_env().items())
    _write(Path(path), "# generated by live.acl; never commit\n" + env, 0o600)
    return Path(path)
