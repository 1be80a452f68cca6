"""MQTT authentication and the generated ACL (live.acl) against a real mosquitto.

MQTT 3.1.1 gives no error for a publish the ACL denies (the broker drops it silently), so a
denial is shown by non-delivery: a subscriber allowed to read the topic gets the allowed
control message, published after the denied one, and never the denied one.
"""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evsim.scenario import load_scenario
from live import topics
from live.acl import (
    Credentials,
    acl_lines,
    mosquitto_hash,
    station_password,
    write_deploy,
)
from live.broker import MosquittoBroker, find_mosquitto
from live.mqtt import BusError, MqttBus

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(find_mosquitto() is None, reason="mosquitto binary not found"),
]
TINY = Path(__file__).resolve().parents[1] / "data" / "tiny.toml"


class Inbox:
    def __init__(self) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.got.append((topic, payload))
            self.cond.notify_all()

    def wait_for(self, payload: bytes, timeout: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: any(p == payload for _, p in self.got), timeout)

    def payloads(self) -> set[bytes]:
        with self.cond:
            return {p for _, p in self.got}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Credentials]]:
    sc = load_scenario(TINY)
    creds = Credentials.generate(sc)
    broker = MosquittoBroker(workdir=tmp_path_factory.mktemp("acl-broker"), users=creds.users(),
                             acl=acl_lines(sc))
    broker.start()
    try:
        yield broker, creds
    finally:
        broker.close()


def client(broker: Any, creds: Credentials, user: str, **kw: Any) -> MqttBus:
    return MqttBus(broker.url, username=user, password=creds.users()[user],
                   client_id=f"test-{user}-{time.monotonic_ns()}", connect_timeout=5.0, **kw)


def test_hash_is_what_mosquitto_passwd_writes() -> None:
    import base64
    import hashlib

    h = mosquitto_hash("secret", salt=b"0123456789ab")
    _, seven, it, salt, dk = h.split("$")
    assert (seven, it) == ("7", "101") and base64.b64decode(salt) == b"0123456789ab"
    assert base64.b64decode(dk) == hashlib.pbkdf2_hmac("sha512", b"secret", b"0123456789ab",
                                                       101, 64)
    assert station_password("k", "s1") != station_password("k", "s2")
    assert station_password("k", "s1") != station_password("other", "s1")


def test_anonymous_and_wrong_password_are_refused(secured: tuple[Any, Credentials]) -> None:
    broker, creds = secured
    with pytest.raises(BusError):
        MqttBus(broker.url, connect_timeout=2.0)
    with pytest.raises(BusError):
        MqttBus(broker.url, username="server-acme", password="wrong", connect_timeout=2.0)
    with pytest.raises(BusError):  # a station's password is not its company key
        MqttBus(broker.url, username="station-acme_alpha",
                password=creds.station_keys["acme"], connect_timeout=2.0)
    with client(broker, creds, "server-acme") as ok:
        assert ok.connected


def test_company_cannot_command_another_companys_station(
    secured: tuple[Any, Credentials],
) -> None:
    broker, creds = secured
    inbox = Inbox()
    cmd = topics.cmd_topic("zap", "zap_bravo")
    with client(broker, creds, "station-zap_bravo") as station, \
            client(broker, creds, "server-acme") as acme, \
            client(broker, creds, "server-zap") as zap:
        station.subscribe(cmd, inbox)
        acme.publish(cmd, b'{"cmd":"start","from":"acme"}')
        assert acme.flush(5)  # PUBACKed by the broker, and dropped
        zap.publish(cmd, b'{"cmd":"start","from":"zap"}')
        assert inbox.wait_for(b'{"cmd":"start","from":"zap"}')
        time.sleep(0.3)
        assert b'{"cmd":"start","from":"acme"}' not in inbox.payloads()


def test_station_publishes_only_as_itself(secured: tuple[Any, Credentials]) -> None:
    broker, creds = secured
    inbox = Inbox()
    with client(broker, creds, "server-acme") as watcher, \
            client(broker, creds, "station-acme_alpha") as alpha:
        watcher.subscribe(topics.ALL_STATUS, inbox)
        watcher.subscribe(topics.company_filter("acme", "meter"), inbox)
        for topic in (topics.status_topic("zap", "zap_bravo"),
                      topics.status_topic("acme", "acme_charlie"),
                      topics.meter_topic("acme", "acme_charlie")):
            alpha.publish(topic, f'{{"spoof":"{topic}"}}'.encode())
        alpha.publish(topics.status_topic("acme", "acme_alpha"), b'{"own":1}')
        alpha.publish(topics.meter_topic("acme", "acme_alpha"), b'{"own":2}')
        assert inbox.wait_for(b'{"own":1}') and inbox.wait_for(b'{"own":2}')
        time.sleep(0.3)
        assert not [p for p in inbox.payloads() if b"spoof" in p]
        # nor may a station command anyone (cmd is read-only for it)
        got = Inbox()
        with client(broker, creds, "station-acme_charlie") as charlie:
            charlie.subscribe(topics.cmd_topic("acme", "acme_charlie"), got)
            alpha.publish(topics.cmd_topic("acme", "acme_charlie"), b'{"cmd":"stop"}')
            assert alpha.flush(5)
            time.sleep(0.3)
            assert not got.payloads()


def test_protocol_messages_are_sent_as_oneself(secured: tuple[Any, Credentials]) -> None:
    broker, creds = secured
    zap_in, acme_in = Inbox(), Inbox()
    with client(broker, creds, "server-acme") as acme, client(broker, creds, "server-zap") as zap:
        zap.subscribe(topics.protocol_filter("zap.coord"), zap_in)
        acme.subscribe(topics.protocol_filter("acme"), acme_in)
        acme.subscribe(topics.protocol_filter("zap"), acme_in)  # reading zap's: denied
        acme.publish(topics.protocol_topic("zap.coord", "zap"), b"spoofed as zap")
        acme.publish(topics.protocol_topic("zap.coord", "acme"), b"from acme")
        zap.publish(topics.protocol_topic("acme", "zap"), b"to acme")
        zap.publish(topics.protocol_topic("zap", "zap"), b"for zap only")
        assert zap_in.wait_for(b"from acme") and acme_in.wait_for(b"to acme")
        time.sleep(0.3)
        assert b"spoofed as zap" not in zap_in.payloads()
        assert b"for zap only" not in acme_in.payloads()


def test_vehicle_agent_reads_notifications_only(secured: tuple[Any, Credentials]) -> None:
    broker, creds = secured
    inbox = Inbox()
    with client(broker, creds, "vehicles") as veh, client(broker, creds, "server-zap") as zap:
        veh.subscribe("evsim/vehicles/+/notify", inbox)
        veh.subscribe(topics.ALL_STATUS, inbox)
        veh.publish(topics.vehicle_notify_topic("v1"), b"forged")
        veh.publish(topics.cmd_topic("zap", "zap_bravo"), b"forged cmd")
        zap.publish(topics.status_topic("zap", "zap_bravo"), b"status")  # zap may not either
        zap.publish(topics.vehicle_notify_topic("v1"), b"real")
        assert inbox.wait_for(b"real")
        time.sleep(0.3)
        assert inbox.payloads() == {b"real"}


def test_station_agent_connects_with_its_station_key(
    secured: tuple[Any, Credentials],
) -> None:
    from live.station_agent import StationAgent

    broker, creds = secured
    inbox = Inbox()
    with client(broker, creds, "server-zap") as watcher:
        watcher.subscribe(topics.company_filter("zap", "status"), inbox)
        agent = StationAgent(load_scenario(TINY), "zap", broker.url,
                             station_key=creds.station_keys["zap"], keepalive=2)
        try:
            assert agent.wait_connected(10)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and len({t for t, _ in inbox.got}) < 2:
                time.sleep(0.05)
            assert {t for t, _ in inbox.got} == {topics.status_topic("zap", s)
                                                 for s in ("zap_bravo", "zap_delta")}
        finally:
            agent.close()
    # the wrong company's key gets no connection at all
    bad = StationAgent(load_scenario(TINY), "zap", broker.url,
                       station_key=creds.station_keys["acme"])
    try:
        assert not bad.wait_connected(1.5)
    finally:
        bad.close()


def test_deploy_files(tmp_path: Path) -> None:
    sc = load_scenario(TINY)
    creds, files = write_deploy(sc, tmp_path / "mosq")
    assert stat.S_IMODE(os.stat(files["secrets.env"]).st_mode) == 0o600
    passwd = files["passwd"].read_text()
    for pw in creds.users().values():
        assert pw not in passwd  # hashes only
    env = dict(line.split("=", 1) for line in files["secrets.env"].read_text().splitlines()
               if "=" in line and not line.startswith("#"))
    assert env["EVSIM_MQTT_PASSWORD_SERVER_ACME"] == creds.servers["acme"]
    assert env["EVSIM_MQTT_STATION_KEY_ZAP"] == creds.station_keys["zap"]
    assert env["EVSIM_MQTT_PASSWORD_VEHICLES"] == creds.vehicles
    acl = files["acl"].read_text()
    assert "user server-acme\ntopic write evsim/acme/stations/+/cmd" in acl
    assert "topic write evsim/protocol/+/acme" in acl
    # the generated files work as they are with a real broker
    conf = tmp_path / "mosquitto.conf"
    broker = MosquittoBroker(workdir=tmp_path / "b")
    conf_text = broker.config_text() + (
        f"allow_anonymous false\npassword_file {files['passwd']}\nacl_file {files['acl']}\n"
    )
    conf.write_text(conf_text.replace("allow_anonymous true\n", ""))
    broker.config_path = conf
    broker._write_files = lambda: None  # type: ignore[method-assign]
    broker.start()
    try:
        with MqttBus(broker.url, username="server-zap",
                     password=env["EVSIM_MQTT_PASSWORD_SERVER_ZAP"], connect_timeout=5):
            pass
        with pytest.raises(BusError):
            MqttBus(broker.url, connect_timeout=2.0)
    finally:
        broker.close()
