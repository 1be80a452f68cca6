"""The message-bus contract shared by the company server and the MQTT agents.

``Bus`` is the narrow interface every live component talks to; ``live.mqtt``
implements it over paho-mqtt and :class:`InMemoryBus` implements it in-process
for tests (synchronous delivery, MQTT wildcard matching, retained messages).

Rules every implementation honours:

* ``publish`` never blocks on the network for long and never raises for a
  disconnected broker (the MQTT bus queues / relies on QoS 1 redelivery).
* ``subscribe`` handlers run on the bus's own worker thread or loop, never on
  paho's network thread; a handler must not raise -- if it does, the bus logs
  the exception and drops the message (one bad payload never kills the bus).
* payloads are bytes; JSON helpers :func:`encode_json` / :func:`decode_json`
  give one uniform codec with a size limit and clear errors.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], None]

MAX_PAYLOAD_BYTES = 64 * 1024


class BadPayload(ValueError):
    """A payload that is not a JSON object within the size limit."""


@runtime_checkable
class Bus(Protocol):
    """Publish/subscribe transport (MQTT semantics: topics, wildcards, retain)."""

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None: ...

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None: ...

    def close(self) -> None: ...


# one encoder for every payload (json.dumps with options builds a new one on each call)
_ENCODE = json.JSONEncoder(separators=(",", ":"), sort_keys=True, allow_nan=False).encode


def encode_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON (sorted keys so identical objects give identical bytes)."""
    return _ENCODE(obj).encode()


def decode_json(payload: bytes | bytearray | str) -> dict[str, Any]:
    """Decode a JSON object payload or raise :class:`BadPayload` saying why."""
    if isinstance(payload, str):
        payload = payload.encode()
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise BadPayload(f"payload too large: {len(payload)} bytes > {MAX_PAYLOAD_BYTES}")
    try:
        obj = json.loads(bytes(payload).decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BadPayload(f"payload is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise BadPayload(f"payload is not JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise BadPayload("payload is nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadPayload(f"payload must be a JSON object, got {type(obj).__name__}")
    return obj


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching with ``+`` (one level) and ``#`` (rest, incl. parent)."""
    f_parts = topic_filter.split("/")
    t_parts = topic.split("/")
    for i, f in enumerate(f_parts):
        if f == "#":
            return i == len(f_parts) - 1
        if i >= len(t_parts):
            return False
        if f != "+" and f != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


def validate_filter(topic_filter: str) -> None:
    """Raise ``ValueError`` for filters MQTT would reject."""
    if not topic_filter:
        raise ValueError("empty topic filter")
    parts = topic_filter.split("/")
    for i, p in enumerate(parts):
        if "#" in p and (p != "#" or i != len(parts) - 1):
            raise ValueError(f"'#' must be the last whole level: {topic_filter!r}")
        if "+" in p and p != "+":
            raise ValueError(f"'+' must be a whole level: {topic_filter!r}")


def safe_call(handler: Handler, topic: str, payload: bytes) -> None:
    """Run a handler, logging (never propagating) its exceptions."""
    try:
        handler(topic, payload)
    except Exception:
        log.exception("bus handler %r failed on topic %s; message dropped", handler, topic)


class InMemoryBus:
    """Synchronous in-process bus for tests.

    ``publish`` delivers to every matching subscription before returning (in
    subscription order); retained messages are replayed to later subscribers;
    publishing an empty retained payload clears the retained message (MQTT).
    Re-entrant publishes from inside handlers are queued and delivered after the
    current delivery finishes, so handlers never recurse into each other.
    ``published`` records every (topic, payload, retain) for assertions.
    """

    def __init__(self) -> None:
        self._subs: list[tuple[str, Handler]] = []
        self.retained: dict[str, bytes] = {}
        self.published: list[tuple[str, bytes, bool]] = []
        self._lock = threading.RLock()
        self._queue: list[tuple[str, bytes]] = []
        self._delivering = False
        self.closed = False

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if self.closed:
            return
        if "+" in topic or "#" in topic:
            raise ValueError(f"cannot publish to a wildcard topic: {topic!r}")
        with self._lock:
            self.published.append((topic, bytes(payload), retain))
            if retain:
                if payload:
                    self.retained[topic] = bytes(payload)
                else:
                    self.retained.pop(topic, None)
            self._queue.append((topic, bytes(payload)))
            if self._delivering:
                return
            self._delivering = True
            try:
                while self._queue:
                    t, p = self._queue.pop(0)
                    for f, h in list(self._subs):
                        if topic_matches(f, t):
                            safe_call(h, t, p)
            finally:
                self._delivering = False

    def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        validate_filter(topic_filter)
        with self._lock:
            self._subs.append((topic_filter, handler))
            for t, p in list(self.retained.items()):
                if topic_matches(topic_filter, t):
                    safe_call(handler, t, p)

    def close(self) -> None:
        self.closed = True
        self._subs.clear()

    def messages(self, topic_filter: str = "#") -> list[tuple[str, bytes]]:
        """Published (topic, payload) pairs matching a filter (test helper)."""
        return [(t, p) for t, p, _ in self.published if topic_matches(topic_filter, t)]
