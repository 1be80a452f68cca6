"""Run a local Mosquitto broker for tests, benchmarks and ``evsim live run``.

:class:`MosquittoBroker` writes a config into a private directory, starts ``mosquitto -c`` on a
free loopback port, waits until the port accepts TCP connections, and stops it with SIGTERM
(then SIGKILL). The config is tuned for a lab network on one machine:

* ``set_tcp_nodelay true``: without it a QoS 1 round trip costs ~40-90 ms of Nagle/delayed-ACK
  stalls; with it (and TCP_NODELAY on the clients, see :mod:`live.mqtt`) ~0.3 ms;
* ``max_inflight_messages`` / ``max_queued_messages`` raised so QoS 1 bursts are not throttled
  to 20 in flight per client or dropped after 1000 queued;
* ``persistence false``: every run starts from an empty broker (retained status is rebuilt by
  the station agents when they connect);
* optional ``password_file`` (PBKDF2 ``$7$`` hashes, :func:`live.acl.write_passwd`) and
  ``acl_file`` (:func:`live.acl.acl_lines`); with users, anonymous clients are refused.

The broker can be stopped and started again on the same port (``restart``), which the
reconnect tests use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["BrokerError", "MosquittoBroker", "find_mosquitto", "free_port", "wait_port"]

log = logging.getLogger(__name__)

_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class BrokerError(RuntimeError):
    """The broker binary is missing, or the broker did not start or stop."""

    def __init__(self, message: str, *, port_taken: bool = False) -> None:
        super().__init__(message)
        self.port_taken = port_taken  # it could not bind its port: another process has it


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary (``$EVSIM_MOSQUITTO``, PATH, usual sbin dirs) or None."""
    env = os.environ.get("EVSIM_MOSQUITTO")
    if env and Path(env).is_file():
        return env
    found = shutil.which("mosquitto")
    if found:
        return found
    return next((c for c in _CANDIDATES if Path(c).is_file() and os.access(c, os.X_OK)), None)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# MQTT 3.1.1 CONNECT: clean session, keep-alive 60 s, empty client id (the broker names it)
_CONNECT = bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 0x02, 0, 60, 0, 0])


def speaks_mqtt(host: str, port: int, timeout: float = 1.0) -> bool:
    """Does ``host:port`` answer an MQTT CONNECT with a CONNACK (whatever its return code:
    a broker that wants credentials refuses, but in MQTT)?"""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(_CONNECT)
            return s.recv(1)[:1] == b"\x20"
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 10.0) -> bool:
    """Wait until ``host:port`` accepts TCP connections; False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.02)
    return False


class MosquittoBroker:
    """A ``mosquitto`` process on ``host:port`` with a generated config.

    ``users`` maps user name to password (a password file is generated and anonymous access is
    refused); ``acl`` is a list of ACL file lines (``user x``, ``topic readwrite evsim/#``...).
    Use as a context manager or call :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        binary: str | None = None,
        workdir: str | Path | None = None,
        users: Mapping[str, str] | None = None,
        acl: Sequence[str] | None = None,
        max_inflight: int = 1000,
        max_queued: int = 100_000,
        log_types: Sequence[str] = ("error", "warning"),
    ) -> None:
        self.binary = binary or find_mosquitto()
        if self.binary is None:
            raise BrokerError(
                "mosquitto binary not found (install mosquitto or set EVSIM_MOSQUITTO)"
            )
        self.host = host
        self._pick_port = not port  # ours to pick again if another process takes it first
        self.port = port or free_port(host)
        self._own_dir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="evsim-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.users = dict(users or {})
        self.acl = list(acl or [])
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.log_types = tuple(log_types)
        self.proc: subprocess.Popen[bytes] | None = None
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        """``mqtt://host:port`` (what :class:`live.mqtt.MqttBus` and ``EVSIM_MQTT_URL`` take)."""
        return f"mqtt://{self.host}:{self.port}"

    def config_text(self) -> str:
        lines = [
            "# generated by live.broker",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "set_tcp_nodelay true",
            f"max_inflight_messages {self.max_inflight}",
            f"max_queued_messages {self.max_queued}",
            "max_queued_bytes 0",
            "persistence false",
            # as root, mosquitto would switch to user "mosquitto", which cannot read our 0600
            # password file: stay the user who wrote it
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "log_dest stderr",
            *(f"log_type {t}" for t in self.log_types),
        ]
        if self.users:
            lines += ["allow_anonymous false", f"password_file {self.workdir / 'passwd'}"]
        else:
            lines.append("allow_anonymous true")
        if self.acl:
            lines.append(f"acl_file {self.workdir / 'acl'}")
        return "\n".join(lines) + "\n"

    def _write_files(self) -> None:
        self.config_path.write_text(self.config_text())
        if self.users:  # Mosquitto $7$ hashes computed in Python (live.acl), mode 0600
            from live.acl import write_passwd

            write_passwd(self.workdir / "passwd", self.users)
        if self.acl:
            (self.workdir / "acl").write_text("\n".join(self.acl) + "\n")

    def start(self, timeout: float = 10.0, attempts: int = 3) -> MosquittoBroker:
        """Start the broker and wait until it accepts connections.  A port this object
        picked (none given) that another process takes between the pick and Mosquitto's
        bind is picked again, up to ``attempts`` times."""
        for attempt in range(attempts):
            try:
                return self._start(timeout)
            except BrokerError as err:
                if not (self._pick_port and err.port_taken) or attempt == attempts - 1:
                    raise
                log.warning("port %d was taken before mosquitto could bind it; picking another",
                            self.port)
                self.port = free_port(self.host)
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> MosquittoBroker:
        if self.running:
            return self
        self._write_files()
        out = self.log_path.open("ab")
        logged = out.tell()  # what this start writes begins here
        try:
            self.proc = subprocess.Popen(
                [str(self.binary), "-c", str(self.config_path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                said = self.log_tail(since=logged)
                raise BrokerError(f"mosquitto exited with {code}: {said}",
                                  port_taken="Address already in use" in said)
            # the port answering is not enough: another process's listener on a port
            # taken before mosquitto could bind it answers too (and mosquitto then exits)
            if wait_port(self.host, self.port, timeout=0.2) and speaks_mqtt(self.host,
                                                                           self.port):
                return self
        self.stop()
        raise BrokerError(f"mosquitto did not listen on {self.url} within {timeout}s")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; returns once the port is released."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the broker (a crash, for failure tests)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, optionally stay down ``down_s`` seconds, and start again on the same port."""
        self.stop()
        if down_s > 0:
            time.sleep(down_s)
        self.start()

    def log_tail(self, n: int = 2000, since: int = 0) -> str:
        """The last ``n`` characters of the broker's log (from byte ``since`` on)."""
        with contextlib.suppress(OSError), self.log_path.open("rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace")[-n:]
        return ""

    def close(self) -> None:
        """Stop and remove the generated directory (when this object created it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
