"""MQTT implementation of the :class:`live.bus.Bus` contract over paho-mqtt 2.x.

Threading model (the aiomqtt idea, with threads): paho's network thread only *hands work
over*. Its callbacks put items on a :class:`queue.Queue` and return; a :class:`Dispatcher`
worker thread takes them off and runs the subscription handlers. So a slow or failing handler
never stalls the MQTT keep-alive, and nothing blocks inside a paho callback. One dispatcher can
serve several clients (the station agent opens one client per station, each with its own last
will, and shares one worker between them).

Everything paho-specific stays in this module: reason codes and paho exceptions are turned
into :class:`BusError`; callers see the three-method Bus protocol plus a few extras
(:meth:`MqttBus.flush`, :meth:`MqttBus.wait_connected`, connect hooks).

Latency: the client sets ``TCP_NODELAY`` on its socket as soon as paho opens it
(``on_socket_open``). Measured on loopback, a QoS 1 publish -> subscriber -> reply round trip
takes ~88 ms without it (Nagle + delayed ACK) and ~0.3 ms with it on both client and broker
(:mod:`live.broker` sets ``set_tcp_nodelay true``).

Flow control: paho allows 20 QoS 1 messages in flight by default and queues the rest; we raise
it (``max_inflight``) to match the broker, and leave the client-side queue unbounded so a
``publish`` while the broker is away is kept and sent after the reconnect (``publish`` never
raises for a disconnected broker).

Reconnect: paho's loop thread reconnects with a capped exponential back-off
(``reconnect_delay``); on every (re)connect all subscriptions are renewed and the connect
hooks run on the worker (the station agent uses one to re-publish its retained status, which a
restarted broker without persistence has lost).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from live.bus import Handler, safe_call, topic_matches, validate_filter

__all__ = ["BrokerAddress", "BusError", "Dispatcher", "MqttBus", "Will", "parse_mqtt_url"]

log = logging.getLogger(__name__)

_STOP = object()


class BusError(RuntimeError):
    """An MQTT operation failed (bad topic, connection refused, timeout...)."""


@dataclass(frozen=True, slots=True)
class Will:
    """MQTT last will: published by the broker when the client vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None


def parse_mqtt_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://[user[:password]@]host[:port]`` (``mqtts://`` for TLS, default 8883)."""
    parts = urlsplit(url if "://" in url else f"mqtt://{url}")
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise BusError(f"unsupported MQTT URL scheme {parts.scheme!r} in {url!r}")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise BusError(f"bad port in MQTT URL {url!r}") from exc
    return BrokerAddress(
        host=parts.hostname or "127.0.0.1",
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


class Dispatcher:
    """One worker thread that runs handlers for one or more :class:`MqttBus` clients.

    Items are ``(callable, args)`` pairs; exceptions are logged and never stop the worker.
    """

    def __init__(self, name: str = "mqtt-dispatch") -> None:
        self._q: queue.Queue[Any] = queue.Queue()
        self._idle_hooks: list[Callable[[], None]] = []
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.handled = 0

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        self._q.put((fn, args))

    def on_idle(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` on the worker whenever it has just emptied its queue: handlers
        that batch (the protocol host buffers messages while more are queued and writes
        them in one transaction) flush there."""
        self._idle_hooks.append(hook)

    def _run(self) -> None:
        q = self._q
        while True:
            item = q.get()
            if item is _STOP:
                return
            fn, args = item
            try:
                fn(*args)
            except Exception:
                log.exception("mqtt dispatcher: %r failed; continuing", fn)
            self.handled += 1
            if self._idle_hooks and q.empty():
                for hook in list(self._idle_hooks):
                    try:
                        hook()
                    except Exception:
                        log.exception("mqtt dispatcher: idle hook %r failed; continuing", hook)

    @property
    def backlog(self) -> int:
        return self._q.qsize()

    def drain(self, timeout: float = 5.0) -> bool:
        """Wait until everything submitted so far has run (not from the worker itself)."""
        done = threading.Event()
        self._q.put((done.set, ()))
        return done.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        if threading.current_thread() is self._thread:
            self._q.put(_STOP)
            return
        if self._thread.is_alive():
            self._q.put(_STOP)
            self._thread.join(timeout)


def _published(info: paho.MQTTMessageInfo) -> bool:
    """Acknowledged by the broker? (paho's ``is_published`` raises for messages that were
    queued while disconnected even after they went out, so read the flag it sets.)"""
    return bool(getattr(info, "_published", False))


def _nodelay(client: paho.Client, userdata: Any, sock: Any) -> None:
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttBus:
    """A paho-mqtt client behind the :class:`live.bus.Bus` protocol.

    ``url`` is ``mqtt://host:port`` (credentials in the URL or as arguments). With
    ``connect_timeout`` set the constructor waits for the first CONNACK and raises
    :class:`BusError` if none came; with ``None`` it returns at once and keeps trying in the
    background (components started before the broker). ``will`` sets the last will.
    ``dispatcher`` shares a worker thread with other clients (the caller then closes it).
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        url: str = "mqtt://127.0.0.1:1883",
        *,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        keepalive: int = 30,
        connect_timeout: float | None = 10.0,
        max_inflight: int = 1000,
        max_queued: int = 0,
        reconnect_delay: tuple[float, float] = (0.1, 2.0),
        clean_session: bool = True,
        dispatcher: Dispatcher | None = None,
        tls_ca: str | None = None,
    ) -> None:
        addr = parse_mqtt_url(url)
        self.address = addr
        self.client_id = client_id or f"evsim-{uuid.uuid4().hex[:12]}"
        self._own_dispatcher = dispatcher is None
        self.dispatcher = dispatcher or Dispatcher(f"mqtt-dispatch-{next(self._ids)}")
        self._subs: list[tuple[str, Handler, int]] = []
        self._subs_lock = threading.Lock()
        self._connect_hooks: list[Callable[[], None]] = []
        self._connected = threading.Event()
        self._sub_cond = threading.Condition()
        self._sub_acked: set[int] = set()
        self._infos: deque[paho.MQTTMessageInfo] = deque()
        self._closed = False
        self.connects = 0
        self.last_error: str | None = None

        c = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean_session,
            protocol=paho.MQTTv311,
        )
        c.on_socket_open = _nodelay
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(max_queued)
        c.reconnect_delay_set(*reconnect_delay)  # type: ignore[arg-type]
        user = username if username is not None else addr.username
        pw = password if password is not None else addr.password
        if user is not None:
            c.username_pw_set(user, pw)
        if addr.tls:
            c.tls_set(ca_certs=tls_ca)
        if will is not None:
            try:
                c.will_set(will.topic, will.payload, will.qos, will.retain)
            except ValueError as exc:
                raise BusError(f"bad last will: {exc}") from exc
        self._client = c
        try:
            c.connect_async(addr.host, addr.port, keepalive)
        except (OSError, ValueError) as exc:
            raise BusError(f"cannot connect to {url}: {exc}") from exc
        if c.loop_start() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BusError("paho loop thread did not start")
        if connect_timeout is not None and not self.wait_connected(connect_timeout):
            err = self.last_error or "no CONNACK"
            self.close(publish_disconnect=False)
            raise BusError(
                f"could not connect to {addr.host}:{addr.port} in {connect_timeout}s: {err}"
            )

    # -- paho callbacks: network thread; they only record state and hand work over --------

    def _on_connect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        if reason.is_failure:
            self.last_error = str(reason)
            log.warning("mqtt %s: connection refused: %s", self.client_id, reason)
            return
        self.connects += 1
        with self._sub_cond:
            self._sub_acked.clear()
        with self._subs_lock:
            # one step with subscribe()'s: a filter added from here on sees the connection
            # and subscribes itself; one added before is in this list (apart, a filter
            # added between the two found neither, and was never subscribed)
            filters = [(f, q) for f, _, q in self._subs]
            self._connected.set()
        for f, q in dict(filters).items():  # renew subscriptions (non-blocking: queues packets)
            client.subscribe(f, q)
        if self.connects > 1:
            log.info("mqtt %s: reconnected", self.client_id)
        for hook in list(self._connect_hooks):
            self.dispatcher.submit(hook)

    def _on_disconnect(
        self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected.clear()
        if not self._closed:
            self.last_error = str(reason)
            log.info("mqtt %s: disconnected (%s); reconnecting", self.client_id, reason)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        self.dispatcher.submit(self._dispatch, msg.topic, bytes(msg.payload))

    def _on_subscribe(
        self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any
    ) -> None:
        with self._sub_cond:
            self._sub_acked.add(mid)
            self._sub_cond.notify_all()

    # -- worker thread ---------------------------------------------------------------------

    def _dispatch(self, topic: str, payload: bytes) -> None:
        with self._subs_lock:
            handlers = [h for f, h, _ in self._subs if topic_matches(f, topic)]
        for h in handlers:
            safe_call(h, topic, payload)

    # -- Bus protocol ----------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Queue a message. Never raises for a disconnected broker (QoS>0 is sent later)."""
        if self._closed:
            return
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except (ValueError, TypeError) as exc:
            raise BusError(f"cannot publish to {topic!r}: {exc}") from exc
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BusError(f"publish to {topic!r} failed: {paho.error_string(info.rc)}")
        if qos > 0:
            infos = self._infos
            infos.append(info)
            while infos and _published(infos[0]):
                infos.popleft()

    def subscribe(
        self, topic_filter: str, handler: Handler, qos: int = 1, timeout: float = 5.0
    ) -> None:
        """Subscribe ``handler(topic, payload)``; waits for the SUBACK when connected."""
        try:
            validate_filter(topic_filter)
        except ValueError as exc:
            raise BusError(str(exc)) from exc
        with self._subs_lock:  # (see _on_connect)
            known = any(f == topic_filter for f, _, _ in self._subs)
            self._subs.append((topic_filter, handler, qos))
            connected = self._connected.is_set()
        if known or not connected:
            return  # the broker already has it, or on_connect will subscribe
        rc, mid = self._client.subscribe(topic_filter, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # disconnected meanwhile: renewed on reconnect
        if threading.current_thread() is getattr(self._client, "_thread", None):
            return  # never wait inside paho's own thread
        deadline = time.monotonic() + timeout
        with self._sub_cond:
            while mid not in self._sub_acked:
                left = deadline - time.monotonic()
                if left <= 0 or not self._connected.is_set():
                    log.warning("mqtt %s: no SUBACK for %s", self.client_id, topic_filter)
                    return
                self._sub_cond.wait(min(left, 0.1))
            self._sub_acked.discard(mid)

    def close(self, publish_disconnect: bool = True, timeout: float = 2.0) -> None:
        """Flush QoS 1 messages (briefly), DISCONNECT cleanly (no last will), stop threads."""
        if self._closed:
            return
        if publish_disconnect and self._connected.is_set():
            self.flush(timeout)
        self._closed = True
        with contextlib.suppress(Exception):
            self._client.disconnect()
        with contextlib.suppress(Exception):
            self._client.loop_stop()
        if self._own_dispatcher:
            self.dispatcher.close()

    # -- extras ----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float = 10.0) -> bool:
        return self._connected.wait(timeout)

    def on_idle(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` on the worker each time its queue runs empty (see
        :meth:`Dispatcher.on_idle`)."""
        self.dispatcher.on_idle(hook)

    def on_connected(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` on the worker after every (re)connect (and now, if connected)."""
        self._connect_hooks.append(hook)
        if self._connected.is_set():
            self.dispatcher.submit(hook)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every QoS>0 message published so far is acknowledged by the broker."""
        deadline = time.monotonic() + timeout
        while self._infos:
            info = self._infos[0]
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if _published(info):
                self._infos.popleft()
                continue
            try:
                info.wait_for_publish(min(left, 0.2))
            except (RuntimeError, ValueError):  # queued while disconnected: resent later
                time.sleep(min(left, 0.01))
        return True

    def drop_connection(self) -> None:
        """Close the TCP socket without DISCONNECT (a crash as the broker sees it: the last
        will is published). For failure tests; the client does not reconnect afterwards."""
        self._closed = True
        sock = self._client.socket()
        with contextlib.suppress(Exception):
            self._client.loop_stop()
        if isinstance(sock, socket.socket):  # (TLS sockets are socket.socket too)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()
        self._connected.clear()
        if self._own_dispatcher:
            self.dispatcher.close()

    def __enter__(self) -> MqttBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
