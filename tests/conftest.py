"""Shared fixtures: a real Mosquitto broker on a free loopback port.

``mosquitto`` is function-scoped so a test may stop, kill or restart its broker; it skips
(with the reason) only when the ``mosquitto`` binary is not installed.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A started :class:`live.broker.MosquittoBroker`; ``.url`` is ``mqtt://127.0.0.1:PORT``."""
    from live.broker import MosquittoBroker, find_mosquitto

    if find_mosquitto() is None:
        pytest.skip(
            "mosquitto binary not found (apt-get install mosquitto, or set EVSIM_MOSQUITTO)"
        )
    broker = MosquittoBroker(workdir=tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    try:
        yield broker
    finally:
        broker.close()
