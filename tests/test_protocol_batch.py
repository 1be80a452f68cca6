"""Protocol messages batched into one payload: codec, packing, and the receiving server.

Under load a company server sends the messages of a batch of steps that go to the same node
as one payload (a JSON array, in order).  The receiver takes a batch whole or drops it whole,
and checks the sender of every element.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evsim.protocol import (
    Commit,
    Prepare,
    ProtocolError,
    Vote,
    decode,
    decode_batch,
    encode,
    encode_batch,
)
from evsim.protocol.messages import MAX_BATCH

VOTES = [Vote(f"zap:VOTE:t{i}/1:yes", "zap", f"t{i}", f"t{i}/1", True, "", "zap_bravo/1", 1.0)
         for i in range(5)]


def test_batch_round_trip_keeps_order_and_values() -> None:
    msgs = [*VOTES, Commit("acme.coord:COMMIT:t0/1", "acme.coord", "t0", "t0/1")]
    assert decode_batch(encode_batch(msgs)) == msgs
    assert decode_batch(encode(VOTES[0])) == [VOTES[0]]  # a single message is a batch of one
    assert decode_batch(encode_batch(VOTES[:1]).encode()) == [VOTES[0]]
    assert json.loads(encode_batch(VOTES)) == [json.loads(encode(v)) for v in VOTES]


@pytest.mark.parametrize("payload, match", [
    ("[]", r"1\.\.1024 messages, got 0"),
    ("[" + ",".join([encode(VOTES[0])] * (MAX_BATCH + 1)) + "]", "got 1025"),
    ("[" + encode(VOTES[0]) + ",42]", r"message\[1\]: expected a JSON object"),
    ("[" + encode(VOTES[0]) + ',{"type":"VOTE"}]', r"VOTE: missing field"),
    ('[{"type":"NOPE"}]', r"message\[0\]: unknown type 'NOPE'"),
    ('"just a string"', "expected a JSON object or array"),
    ("[" * 100_000, "invalid JSON"),
])
def test_bad_batches_are_refused_whole(payload: str, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_batch(payload)


def test_encode_batch_bounds() -> None:
    with pytest.raises(ValueError):
        encode_batch([])
    with pytest.raises(ValueError):
        encode_batch([VOTES[0]] * (MAX_BATCH + 1))


def test_pack_splits_by_count_and_size_and_keeps_order() -> None:
    from evsim.protocol.messages import pack_batches

    def _pack(texts: list[str], limit: int = 32_000, most: int = MAX_BATCH) -> list[str]:
        return pack_batches(texts, limit, most)

    texts = [encode(v) for v in VOTES]
    assert _pack(texts[:1]) == [texts[0]]  # alone: the plain message
    out = _pack(texts, most=2)
    assert [len(decode_batch(p)) for p in out] == [2, 2, 1]
    assert [m for p in out for m in decode_batch(p)] == VOTES
    small = _pack(texts, limit=len(texts[0]) * 2 + 4)  # two messages fit, three do not
    assert all(len(p) <= len(texts[0]) * 2 + 4 for p in small)
    assert [m for p in small for m in decode_batch(p)] == VOTES
    huge = "x" * 100
    assert _pack([huge, huge], limit=50) == [huge, huge]  # each alone


def test_server_takes_a_batch_whole_or_drops_it_whole(tmp_path: Path) -> None:
    pytest.importorskip("fastapi")
    from test_live_api import Net

    from live import topics

    net = Net(tmp_path)
    acme = net.svc("acme").host
    before = (acme.participant.durable_state(), acme.coordinator.durable_state())
    p = Prepare("zap.coord:PREPARE:z1/0", "zap.coord", "z1", "z1/0", "acme_alpha", None,
                500.0, 530.0, 0.0, 10.0, 500.0)
    spoofed = Prepare("volt.coord:PREPARE:z2/0", "volt.coord", "z2", "z2/0", "acme_alpha",
                      None, 600.0, 630.0, 0.0, 10.0, 600.0)
    net.bus.publish(topics.protocol_topic("acme", "zap"), encode_batch([p, spoofed]).encode())
    assert acme.dropped == 1  # one element speaks for another company: nothing of it applied
    assert (acme.participant.durable_state(), acme.coordinator.durable_state()) == before
    p2 = Prepare("zap.coord:PREPARE:z2/0", "zap.coord", "z2", "z2/0", "acme_alpha", None,
                 600.0, 630.0, 0.0, 10.0, 600.0)
    net.bus.publish(topics.protocol_topic("acme", "zap"), encode_batch([p, p2]).encode())
    assert acme.dropped == 1
    held = {v.booking_id for v in acme.participant.bookings()}
    assert {"z1/0", "z2/0"} <= held  # both holds placed, in one step
    votes = [decode(x) for _, x in net.bus.messages(topics.protocol_topic("zap.coord", "acme"))]
    assert [v.booking_id for v in votes if isinstance(v, Vote)] == ["z1/0", "z2/0"]
