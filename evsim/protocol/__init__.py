"""Sans-IO booking protocol: atomic multi-company trip bookings (2PC with leases).

Pure state machines shared by the SimPy model and the live FastAPI/MQTT
network: no I/O, no clock reads (every call takes ``now_min``).

* :mod:`~evsim.protocol.states` -- enums and transition tables
* :mod:`~evsim.protocol.messages` -- wire messages and their JSON codec
* :mod:`~evsim.protocol.log` -- durable log records (event sourcing)
* :mod:`~evsim.protocol.participant` -- station owner: bookings, holds, sessions
* :mod:`~evsim.protocol.coordinator` -- vehicle's home company: trip 2PC
* :mod:`~evsim.protocol.network` -- deterministic in-memory lossy network
"""

from evsim.protocol.coordinator import Coordinator, booking_id_for
from evsim.protocol.log import (
    BookingChanged,
    BookingCreated,
    OwnerCanceled,
    Record,
    Tombstone,
    TripChanged,
    TripStarted,
    decode_record,
    dump_log,
    encode_record,
    load_log,
    may_defer,
)
from evsim.protocol.messages import (
    Abort,
    AbortAck,
    Alternative,
    BookedStop,
    BookReply,
    BookRequest,
    CancelReply,
    CancelRequest,
    Commit,
    CommitAck,
    CommitFailed,
    Message,
    Outgoing,
    Prepare,
    QueryDecision,
    StopCanceled,
    StopRequest,
    TripCancel,
    TripRequest,
    TripResult,
    Vote,
    before_log,
    decode,
    decode_batch,
    encode,
    encode_batch,
    split_before_log,
)
from evsim.protocol.participant import START_LATER_REASONS, BookingView, Participant
from evsim.protocol.states import (
    BookingEvent,
    BookingState,
    ConnectorStatus,
    ProtocolError,
    TripEvent,
    TripOutcome,
    TripState,
)

__all__ = [
    "START_LATER_REASONS",
    "Abort",
    "AbortAck",
    "Alternative",
    "BookReply",
    "BookRequest",
    "BookedStop",
    "BookingChanged",
    "BookingCreated",
    "BookingEvent",
    "BookingState",
    "BookingView",
    "CancelReply",
    "CancelRequest",
    "Commit",
    "CommitAck",
    "CommitFailed",
    "ConnectorStatus",
    "Coordinator",
    "Message",
    "Outgoing",
    "OwnerCanceled",
    "Participant",
    "Prepare",
    "ProtocolError",
    "QueryDecision",
    "Record",
    "StopCanceled",
    "StopRequest",
    "Tombstone",
    "TripCancel",
    "TripChanged",
    "TripEvent",
    "TripOutcome",
    "TripRequest",
    "TripResult",
    "TripStarted",
    "TripState",
    "Vote",
    "before_log",
    "booking_id_for",
    "decode",
    "decode_batch",
    "decode_record",
    "dump_log",
    "encode",
    "encode_batch",
    "encode_record",
    "load_log",
    "may_defer",
    "split_before_log",
]
