"""The MQTT topic tree of the live network -- the single source of truth.

All topics live under ``evsim/``.  ``{company}``, ``{station_id}``,
``{node_id}`` and ``{vehicle_id}`` are scenario ids / server-issued ids and must
not contain ``/``, ``+``, ``#``.  Payloads are JSON objects
(:func:`live.bus.encode_json`), except protocol messages, which use
:func:`evsim.protocol.encode`.  ``t_min`` is scenario minutes.

============================================  ========  ======  ===========================
topic                                         dir       retain  payload
============================================  ========  ======  ===========================
evsim/{company}/stations/{station_id}/status  st->all   yes     STATUS (LWT: offline)
evsim/{company}/stations/{station_id}/meter   st->srv   no      METER
evsim/{company}/stations/{station_id}/cmd     srv->st   no      CMD (start/stop)
evsim/{company}/stations/{station_id}/events  st->srv   no      EVENT
evsim/protocol/{node_id}/{src_company}        srv->srv  no      evsim.protocol message
evsim/vehicles/{vehicle_id}/notify            srv->veh  no      NOTIFY
============================================  ========  ======  ===========================

STATUS  ``{station_id, company_id, online, t_min, busy, queued,
connectors: [{connector_id, power_kw, type, status}], heartbeat_s}``; the station agent's
MQTT last will is ``{station_id, company_id, online: false}`` retained on the
same topic.  The agent re-publishes the status every ``heartbeat_s`` wall seconds; servers
mark a station offline after 1.5 silent periods (:mod:`live.server.status`).

METER  ``{station_id, connector_id, session_id, energy_kwh, power_kw, soc, t_min}``.

CMD  ``{cmd: "start"|"stop", session_id, connector_id, vehicle_id, soc,
battery_kwh, target_soc, max_dc_kw, max_ac_kw, t_min}`` (``stop`` needs only
``cmd, session_id, connector_id, t_min``).

EVENT  ``{event: "session_started"|"session_finished"|"fault", session_id,
connector_id, energy_kwh, soc, t_min, ...}``.

NOTIFY  ``{event, vehicle_id, t_min, ...}`` with event one of ``booking_confirmed`` /
``booking_rejected`` / ``booking_failed`` / ``booking_cancelled`` (trip outcome: + trip_id,
outcome, reason, bookings), ``booking_expired`` (+ booking_id), ``charging_started`` /
``charging_finished`` (+ session_id, station_id; finished: energy_kwh, price, currency).

All topics are published with QoS 1.  See docs/topics.md for the prose version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ROOT = "evsim"

StationChannel = Literal["status", "meter", "cmd", "events"]
STATION_CHANNELS: tuple[str, ...] = ("status", "meter", "cmd", "events")

CMD_START = "start"
CMD_STOP = "stop"
CMD_QUEUE = "queue"  # server -> station: walk-in queue length (published in its status)
EV_SESSION_STARTED = "session_started"
EV_SESSION_FINISHED = "session_finished"
EV_FAULT = "fault"

QOS = 1


def _check(part: str, what: str) -> str:
    if not part or any(c in part for c in "/+#") or "\x00" in part:
        raise ValueError(f"invalid {what} for a topic level: {part!r}")
    return part


def station_topic(company: str, station_id: str, channel: str) -> str:
    if channel not in STATION_CHANNELS:
        raise ValueError(f"unknown station channel {channel!r}")
    return (
        f"{ROOT}/{_check(company, 'company')}/stations/"
        f"{_check(station_id, 'station_id')}/{channel}"
    )


def status_topic(company: str, station_id: str) -> str:
    return station_topic(company, station_id, "status")


def meter_topic(company: str, station_id: str) -> str:
    return station_topic(company, station_id, "meter")


def cmd_topic(company: str, station_id: str) -> str:
    return station_topic(company, station_id, "cmd")


def events_topic(company: str, station_id: str) -> str:
    return station_topic(company, station_id, "events")


def protocol_topic(node_id: str, src: str) -> str:
    """Where company ``src`` sends protocol messages for node ``node_id``.

    The sender's company is the last level so the broker ACL can pin it to the sender's
    credentials (``server-{src}`` may publish only on ``evsim/protocol/+/{src}``)."""
    return f"{ROOT}/protocol/{_check(node_id, 'node_id')}/{_check(src, 'src company')}"


def protocol_filter(node_id: str) -> str:
    """Every protocol message for ``node_id``, from any company (``evsim/protocol/{node}/+``)."""
    return f"{ROOT}/protocol/{_check(node_id, 'node_id')}/+"


def vehicle_notify_topic(vehicle_id: str) -> str:
    return f"{ROOT}/vehicles/{_check(vehicle_id, 'vehicle_id')}/notify"


# --- subscription filters ---------------------------------------------------

ALL_STATUS = f"{ROOT}/+/stations/+/status"


def company_filter(company: str, channel: str) -> str:
    """All stations of one company on one channel, e.g. ``evsim/acme/stations/+/events``."""
    if channel not in STATION_CHANNELS:
        raise ValueError(f"unknown station channel {channel!r}")
    return f"{ROOT}/{_check(company, 'company')}/stations/+/{channel}"


def vehicle_filter(vehicle_id: str) -> str:
    return vehicle_notify_topic(vehicle_id)


# --- parsing ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """A parsed topic. ``kind`` is a station channel, ``"protocol"`` or ``"notify"``."""

    kind: str
    company: str | None = None
    station_id: str | None = None
    node_id: str | None = None
    vehicle_id: str | None = None
    src: str | None = None  # protocol: the sending company


def parse(topic: str) -> TopicInfo | None:
    """Parse a concrete topic; ``None`` if it is not part of the tree."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT or any(not p for p in parts):
        return None
    if len(parts) == 4 and parts[1] == "protocol":
        return TopicInfo(kind="protocol", node_id=parts[2], src=parts[3])
    if len(parts) == 4 and parts[1] == "vehicles" and parts[3] == "notify":
        return TopicInfo(kind="notify", vehicle_id=parts[2])
    if len(parts) == 5 and parts[2] == "stations" and parts[4] in STATION_CHANNELS:
        if parts[1] in ("protocol", "vehicles"):
            return None
        return TopicInfo(kind=parts[4], company=parts[1], station_id=parts[3])
    return None
