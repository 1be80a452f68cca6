"""Timestamps along a booking's path through a company server, for ``bench/live_hops.py``.

Python imports ``sitecustomize`` at start-up from the path; ``bench/live_hops.py`` puts this
folder on the servers' ``PYTHONPATH`` and sets ``EVSIM_HOPTRACE`` to a folder. Only then does
this module do anything: it wraps a few methods of the server (HTTP entry, FastAPI's
dependency solving, the protocol host's steps and commits, the MQTT bus's receive and
publish) to note ``(time.monotonic_ns(), thread name, what)``, and writes the notes to
``$EVSIM_HOPTRACE/{company}-{pid}.tsv`` when the process exits or is stopped by SIGTERM.
``CLOCK_MONOTONIC`` is one clock for every process of the machine, so the notes of the
servers and of the bench line up. A wrapper costs about a microsecond; nothing else
changes.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

_notes: list[tuple[int, str, str]] = []


def note(what: str) -> None:
    _notes.append((time.monotonic_ns(), threading.current_thread().name, what))


def _dump(folder: str) -> None:
    name = f"{os.environ.get('EVSIM_COMPANY', 'x')}-{os.getpid()}.tsv"
    with open(os.path.join(folder, name), "w") as f:
        f.writelines(f"{t}\t{th}\t{w}\n" for t, th, w in _notes)


def _wrap(owner: Any, name: str, label: str | None = None) -> None:
    """Note ``label`` when ``owner.name`` is called and ``label-end`` when it returns."""
    orig = getattr(owner, name)
    tag = label or name
    if inspect.iscoroutinefunction(orig):
        @functools.wraps(orig)
        async def awrapped(*a: Any, **k: Any) -> Any:
            note(tag)
            try:
                return await orig(*a, **k)
            finally:
                note(tag + "-end")
        setattr(owner, name, awrapped)
    else:
        @functools.wraps(orig)
        def wrapped(*a: Any, **k: Any) -> Any:
            note(tag)
            try:
                return orig(*a, **k)
            finally:
                note(tag + "-end")
        setattr(owner, name, wrapped)


def install() -> None:
    import fastapi
    import fastapi.routing

    import live.mqtt
    import live.server.node
    import live.server.service
    import live.server.steps

    bus = live.mqtt.MqttBus
    on_message: Callable[..., None] = bus._on_message
    publish: Callable[..., None] = bus.publish

    def _on_message(self: Any, client: Any, userdata: Any, msg: Any) -> None:
        note("rx " + msg.topic)
        on_message(self, client, userdata, msg)

    def _publish(self: Any, topic: str, payload: bytes, qos: int = 1,
                 retain: bool = False) -> None:
        note("tx " + topic)
        publish(self, topic, payload, qos, retain)

    bus._on_message = _on_message  # type: ignore[method-assign]
    bus.publish = _publish  # type: ignore[method-assign]
    _wrap(bus, "_dispatch", "dispatch")
    host = live.server.node.ProtocolHost
    for name in ("execute", "_commit", "wait_result_async"):
        _wrap(host, name)
    _wrap(live.server.steps.QueuedStep, "write_all", "_write")  # a commit's statements
    service = live.server.service.CompanyService
    for name in ("book_async", "_trip_answer"):
        _wrap(service, name)
    _wrap(fastapi.routing, "solve_dependencies", "dependencies")
    try:  # uvicorn's C parser (the live extra installs it); else no "http in" note
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        pass
    else:
        data_received = HttpToolsProtocol.data_received

        def _data_received(self: Any, data: bytes) -> None:
            note("http in")
            data_received(self, data)

        HttpToolsProtocol.data_received = _data_received  # type: ignore[method-assign]
    app_call = fastapi.FastAPI.__call__

    async def _call(self: Any, scope: Any, receive: Any, send: Any) -> None:
        note("asgi " + str(scope.get("path", "")))

        async def _send(message: Any) -> None:
            note("http " + str(message.get("type")))
            await send(message)

        await app_call(self, scope, receive, _send)

    fastapi.FastAPI.__call__ = _call  # type: ignore[method-assign]


def _on_term(signum: int, frame: Any) -> None:
    # uvicorn handles SIGTERM itself, and once shut down restores the handler it found (this
    # one) and raises the signal again, which would end the process before atexit runs
    _dump(os.environ["EVSIM_HOPTRACE"])
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


_folder = os.environ.get("EVSIM_HOPTRACE")
if _folder:
    install()
    atexit.register(_dump, _folder)
    signal.signal(signal.SIGTERM, _on_term)
