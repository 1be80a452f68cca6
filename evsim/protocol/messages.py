"""Wire messages of the booking protocol, with a strict JSON codec.

Every message is a frozen dataclass with a ``msg_id`` and the sending node's
id ``src``; ``encode(msg)`` produces a JSON object with a ``type``
discriminator and ``decode(text)`` rebuilds the message, rejecting anything
malformed with a :class:`ProtocolError` that names the offending field.  The
live network sends exactly these objects over MQTT; the SimPy model and the
tests pass them around in memory.

Message ids are deterministic (``src:TYPE:key``): a retransmission carries the
same id as the original, so logs and traces show duplicates as duplicates.
Receivers do not rely on ids for idempotency, though: every handler is
idempotent by booking id / trip id and answers a duplicate from current state.

Flows (``V`` vehicle, ``C`` coordinator = the vehicle's home company, ``P``
participant = a station owner)::

    V->C TripRequest            C->V TripResult (BOOKED | REJECTED | FAILED | CANCELED)
    C->P Prepare                P->C Vote (yes / no + reason + alternatives)
    C->P Commit                 P->C CommitAck | CommitFailed
    C->P Abort                  P->C AbortAck
    C->P CancelRequest          P->C CancelReply        (compensation, trip cancel)
    P->C QueryDecision          C->P Commit | Abort | CancelRequest (presumed abort)
    P->C StopCanceled           C->P CancelRequest      (the station owner canceled a
                                                         reserved stop: the trip is canceled)
    V->C TripCancel             C->V TripResult (CANCELED)
    X->P BookRequest            P->X BookReply          (single-stop booking)
    X->P CancelRequest          P->X CancelReply
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from evsim.protocol.states import ProtocolError

# --------------------------------------------------------------------------- nested values


@dataclass(frozen=True, slots=True)
class Alternative:
    """A free window offered instead of a refused one."""

    connector_id: str
    start_min: float
    end_min: float


@dataclass(frozen=True, slots=True)
class StopRequest:
    """One leg of a trip: a window at a station, optionally on one connector
    (``connector_id``) or on any of some of its connectors (``connector_ids``: e.g. those
    of one class, the power and plug the vehicle planned with); by default any."""

    participant: str
    station_id: str
    start_min: float
    end_min: float
    grace_min: float = 10.0
    connector_id: str | None = None
    connector_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BookedStop:
    """A reserved stop as reported to the vehicle."""

    booking_id: str
    participant: str
    station_id: str
    connector_id: str
    start_min: float
    end_min: float


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Message:
    """Base of all wire messages.

    ``BEFORE_LOG``: the write-ahead rule (persist ``new_records()``, then send) holds for
    every message except those whose class sets it, and BOOKED answers
    (:func:`before_log`).  :class:`Prepare` sets it: under presumed abort a coordinator
    need not force its TripStarted record before the PREPAREs leave (see
    :mod:`evsim.protocol.coordinator`), so adapters may send it while the step's records
    are still being written (:func:`split_before_log`).
    """

    TYPE: ClassVar[str] = ""
    BEFORE_LOG: ClassVar[bool] = False
    msg_id: str
    src: str


@dataclass(frozen=True, slots=True)
class TripRequest(Message):
    """Vehicle -> coordinator: book every stop of a trip, or none."""

    TYPE: ClassVar[str] = "TRIP_REQUEST"
    trip_id: str
    vehicle_id: str
    stops: tuple[StopRequest, ...]


@dataclass(frozen=True, slots=True)
class TripCancel(Message):
    """Vehicle -> coordinator: cancel a booked trip."""

    TYPE: ClassVar[str] = "TRIP_CANCEL"
    trip_id: str


@dataclass(frozen=True, slots=True)
class TripResult(Message):
    """Coordinator -> vehicle: the definitive answer for a trip."""

    TYPE: ClassVar[str] = "TRIP_RESULT"
    trip_id: str
    outcome: str  # a TripOutcome value
    reason: str = ""
    bookings: tuple[BookedStop, ...] = ()
    failed_stop: int | None = None
    alternatives: tuple[Alternative, ...] = ()


@dataclass(frozen=True, slots=True)
class Prepare(Message):
    """Coordinator -> participant: place a hold (tentative booking) with a lease."""

    TYPE: ClassVar[str] = "PREPARE"
    BEFORE_LOG: ClassVar[bool] = True  # presumed abort: TripStarted is not forced
    trip_id: str
    booking_id: str
    station_id: str
    connector_id: str | None
    start_min: float
    end_min: float
    grace_min: float
    lease_min: float
    priority_start_min: float  # the trip's first-leg start; lower wins contention
    connector_ids: tuple[str, ...] = ()  # hold one of these (empty: any of the station)


@dataclass(frozen=True, slots=True)
class Vote(Message):
    """Participant -> coordinator: YES (hold placed) or NO with a reason."""

    TYPE: ClassVar[str] = "VOTE"
    trip_id: str
    booking_id: str
    yes: bool
    reason: str = ""
    connector_id: str = ""
    lease_until_min: float | None = None  # participant's clock, informational
    alternatives: tuple[Alternative, ...] = ()


@dataclass(frozen=True, slots=True)
class Commit(Message):
    """Coordinator -> participant: turn the hold into a reservation."""

    TYPE: ClassVar[str] = "COMMIT"
    trip_id: str
    booking_id: str


@dataclass(frozen=True, slots=True)
class CommitAck(Message):
    """Participant -> coordinator: the booking is RESERVED."""

    TYPE: ClassVar[str] = "COMMIT_ACK"
    trip_id: str
    booking_id: str
    connector_id: str


@dataclass(frozen=True, slots=True)
class CommitFailed(Message):
    """Participant -> coordinator: COMMIT refused (hold expired, preempted, ...)."""

    TYPE: ClassVar[str] = "COMMIT_FAILED"
    trip_id: str
    booking_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class Abort(Message):
    """Coordinator -> participant: release the hold."""

    TYPE: ClassVar[str] = "ABORT"
    trip_id: str
    booking_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class AbortAck(Message):
    """Participant -> coordinator: the hold is released (or never existed)."""

    TYPE: ClassVar[str] = "ABORT_ACK"
    trip_id: str
    booking_id: str


@dataclass(frozen=True, slots=True)
class CancelRequest(Message):
    """Anyone -> participant: cancel a booking (hold or reservation)."""

    TYPE: ClassVar[str] = "CANCEL"
    booking_id: str
    trip_id: str = ""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class CancelReply(Message):
    """Participant -> requester: the booking's state after the cancel."""

    TYPE: ClassVar[str] = "CANCEL_REPLY"
    booking_id: str
    trip_id: str
    state: str  # a BookingState value, or "UNKNOWN"


@dataclass(frozen=True, slots=True)
class StopCanceled(Message):
    """Participant -> coordinator: the station owner canceled a reserved stop of the trip
    (station offline...).  Re-sent until the coordinator answers with a CancelRequest."""

    TYPE: ClassVar[str] = "STOP_CANCELED"
    trip_id: str
    booking_id: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class QueryDecision(Message):
    """Participant -> coordinator: what was decided for this hold?"""

    TYPE: ClassVar[str] = "QUERY_DECISION"
    trip_id: str
    booking_id: str


@dataclass(frozen=True, slots=True)
class BookRequest(Message):
    """Anyone -> participant: book one window directly (no two-phase commit)."""

    TYPE: ClassVar[str] = "BOOK_REQUEST"
    booking_id: str
    station_id: str
    start_min: float
    end_min: float
    grace_min: float = 10.0
    connector_id: str | None = None


@dataclass(frozen=True, slots=True)
class BookReply(Message):
    """Participant -> requester: RESERVED on a connector, or REJECTED."""

    TYPE: ClassVar[str] = "BOOK_REPLY"
    booking_id: str
    state: str  # a BookingState value
    connector_id: str = ""
    reason: str = ""
    alternatives: tuple[Alternative, ...] = ()


class Outgoing(NamedTuple):
    """A message a node wants delivered to node ``dst``."""

    dst: str
    msg: Message


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        TripRequest,
        TripCancel,
        TripResult,
        Prepare,
        Vote,
        Commit,
        CommitAck,
        CommitFailed,
        Abort,
        AbortAck,
        CancelRequest,
        CancelReply,
        QueryDecision,
        StopCanceled,
        BookRequest,
        BookReply,
    )
}


def before_log(msg: Message) -> bool:
    """May ``msg`` leave before the records of the step that made it are durable?

    PREPARE (``BEFORE_LOG``), and a BOOKED :class:`TripResult`: what BOOKED rests on is
    already durable when the last COMMIT_ACK comes in (the ALL_YES decision was forced
    before any COMMIT left, each participant forced its commit before acknowledging), and
    a coordinator restarted without the ALL_ACKED record waits for every stop's answer
    instead of compensating on its ack deadline (:mod:`evsim.protocol.coordinator`)."""
    return msg.BEFORE_LOG or (isinstance(msg, TripResult) and msg.outcome == "BOOKED")


def split_before_log(outs: Sequence[Outgoing]) -> tuple[list[Outgoing], list[Outgoing]]:
    """``(early, after)``: the messages that may be sent before the step's records are
    durable (:func:`before_log`), and the rest, which must wait for them."""
    early: list[Outgoing] = []
    after: list[Outgoing] = []
    for o in outs:
        (early if before_log(o.msg) else after).append(o)
    return early, after


def msg_id(src: str, kind: str, key: str) -> str:
    """Deterministic message id: retransmissions share the id of the original."""
    return f"{src}:{kind}:{key}"


# --------------------------------------------------------------------------- codec

_Decoder = Callable[[Any, str], Any]
_FIELD_DECODERS: dict[type, list[tuple[str, bool, _Decoder]]] = {}
_KNOWN: dict[type, frozenset[str]] = {}


def _dec_str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise ProtocolError(f"{where}: expected string, got {type(v).__name__}")
    return v


def _dec_float(v: Any, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ProtocolError(f"{where}: expected number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ProtocolError(f"{where}: number must be finite")
    return float(v)


def _dec_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ProtocolError(f"{where}: expected integer, got {type(v).__name__}")
    return v


def _dec_bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(f"{where}: expected boolean, got {type(v).__name__}")
    return v


_SIMPLE: dict[Any, _Decoder] = {str: _dec_str, float: _dec_float, int: _dec_int, bool: _dec_bool}


def _decoder_for(tp: Any) -> _Decoder:
    if tp in _SIMPLE:
        return _SIMPLE[tp]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (types.UnionType, typing.Union) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        inner_dec = _decoder_for(inner)

        def dec_opt(v: Any, where: str) -> Any:
            return None if v is None else inner_dec(v, where)

        return dec_opt
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item_dec = _decoder_for(args[0])

        def dec_tuple(v: Any, where: str) -> tuple[Any, ...]:
            if not isinstance(v, list | tuple):
                raise ProtocolError(f"{where}: expected list, got {type(v).__name__}")
            return tuple(item_dec(x, f"{where}[{i}]") for i, x in enumerate(v))

        return dec_tuple
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        cls: type = tp

        def dec_obj(v: Any, where: str) -> Any:
            if not isinstance(v, dict):
                raise ProtocolError(f"{where}: expected object, got {type(v).__name__}")
            return _build(cls, v, where)

        return dec_obj
    raise TypeError(f"unsupported field type {tp!r}")  # pragma: no cover - programming error


def _field_decoders(cls: type) -> list[tuple[str, bool, _Decoder]]:
    cached = _FIELD_DECODERS.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = []
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            cached.append((f.name, required, _decoder_for(hints[f.name])))
        _FIELD_DECODERS[cls] = cached
        _KNOWN[cls] = frozenset(name for name, _, _ in cached) | {"type"}
    return cached


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    decoders = _field_decoders(cls)
    known = _KNOWN[cls]
    if not known.issuperset(data):
        extra = sorted(k for k in data if k not in known)
        raise ProtocolError(f"{where}: unknown field(s) {', '.join(extra)}")
    kwargs: dict[str, Any] = {}
    for name, required, dec in decoders:
        if name in data:
            kwargs[name] = dec(data[name], where + "." + name)
        elif required:
            raise ProtocolError(f"{where}: missing field {name!r}")
    return cls(**kwargs)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_SCALARS = (str, float, int, bool, type(None))


def to_jsonable(obj: Any) -> Any:
    """Convert a (nested) dataclass to plain JSON types (tuples become lists)."""
    if isinstance(obj, _SCALARS):
        return obj
    cls = type(obj)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        if isinstance(obj, tuple | list):
            return [to_jsonable(x) for x in obj]
        if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
            return obj
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(obj))
    out = {}
    for name in names:
        v = getattr(obj, name)
        out[name] = v if isinstance(v, _SCALARS) else to_jsonable(v)
    return out


# one encoder for every message and record: json.dumps with non-default options builds a
# new encoder on each call, a quarter of the time of encoding a small record
_ENCODE = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def encode_tagged(obj: Any) -> str:
    """JSON text of a dataclass with a ``TYPE`` class attribute, tagged ``type``."""
    d = {"type": obj.TYPE}
    d.update(to_jsonable(obj))
    return _ENCODE(d)


def _parse_json(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError(f"{what}: invalid JSON: {exc}") from None


def decode_tagged(text: str | bytes, registry: dict[str, type], what: str) -> Any:
    """Parse tagged JSON into the registered dataclass; raise ProtocolError if bad."""
    return _from_data(_parse_json(text, what), registry, what)


def _from_data(data: Any, registry: dict[str, type], what: str) -> Any:
    if not isinstance(data, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {type(data).__name__}")
    tag = data.get("type")
    if not isinstance(tag, str):
        raise ProtocolError(f"{what}: missing or non-string 'type'")
    cls = registry.get(tag)
    if cls is None:
        raise ProtocolError(f"{what}: unknown type {tag!r}")
    return _build(cls, data, tag)


def encode(msg: Message) -> str:
    """Encode a message as JSON text with a ``type`` discriminator."""
    return encode_tagged(msg)


def decode(text: str | bytes) -> Message:
    """Decode JSON text produced by :func:`encode`; raise ProtocolError if malformed."""
    msg = decode_tagged(text, MESSAGE_TYPES, "message")
    return typing.cast(Message, msg)


MAX_BATCH = 1024  # messages in one encode_batch() payload at most


def encode_batch(msgs: Sequence[Message]) -> str:
    """Several messages (one sender to one node, in order) as one JSON array of
    :func:`encode` objects: a transport batches them into one payload."""
    if not 0 < len(msgs) <= MAX_BATCH:
        raise ValueError(f"a batch holds 1..{MAX_BATCH} messages, got {len(msgs)}")
    return "[" + ",".join(encode(m) for m in msgs) + "]"


def pack_batches(texts: Sequence[str], limit: int, most: int = MAX_BATCH) -> list[str]:
    """:func:`encode` outputs (one sender to one node, in order) as payloads for a
    transport: one alone as itself, several as JSON arrays of at most ``most`` messages and
    about ``limit`` characters (a single larger message goes alone).  Each payload decodes
    with :func:`decode_batch`; taken in order, they give the messages in order."""
    if len(texts) == 1:
        return [texts[0]]
    out: list[str] = []
    chunk: list[str] = []
    size = 2
    for t in texts:
        if chunk and (size + len(t) + 1 > limit or len(chunk) >= most):
            out.append(_joined(chunk))
            chunk, size = [], 2
        chunk.append(t)
        size += len(t) + 1
    out.append(_joined(chunk))
    return out


def _joined(chunk: list[str]) -> str:
    return chunk[0] if len(chunk) == 1 else "[" + ",".join(chunk) + "]"


def decode_batch(text: str | bytes) -> list[Message]:
    """Decode :func:`encode` or :func:`encode_batch` output: the messages in order. Raise
    ProtocolError naming the first bad element; a batch is taken whole or not at all."""
    data = _parse_json(text, "message")
    if isinstance(data, dict):
        return [typing.cast(Message, _from_data(data, MESSAGE_TYPES, "message"))]
    if not isinstance(data, list):
        raise ProtocolError(f"message: expected a JSON object or array, got "
                            f"{type(data).__name__}")
    if not 0 < len(data) <= MAX_BATCH:
        raise ProtocolError(f"message batch: 1..{MAX_BATCH} messages, got {len(data)}")
    return [typing.cast(Message, _from_data(d, MESSAGE_TYPES, f"message[{i}]"))
            for i, d in enumerate(data)]
