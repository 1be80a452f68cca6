"""Durable storage of one company server: SQLAlchemy 2 Core, one database per company.

SQLite (the default, ``sqlite:///./evsim-{company}.db``) runs in WAL mode with
``synchronous=FULL``: a transaction is on disk (fsynced WAL) when ``commit`` returns, and
the server acknowledges nothing (no HTTP response, no protocol message) before the commit
that stores it.  Only plain Core types are used, so a ``postgresql://`` URL works as well.

Tables
------
``schema_meta``   key/value; ``schema_version`` guards against opening a newer database.
``vehicles``      registered vehicles: id, SHA-256 of the bearer token, home company.
``protocol_log``  append-only protocol records (``evsim.protocol.encode_record``) per node id,
                  ordered by ``seq`` (written by :class:`live.server.node.ProtocolHost`'s
                  commit leader, many concurrent steps per transaction: group commit);
                  ``Participant.from_log`` / ``Coordinator.from_log`` rebuild the nodes from
                  it after a restart.  Written *before* the messages returned by the same
                  protocol call are sent (write-ahead rule).
``trips``         trips this server coordinates: owner vehicle and the request (the bookings
                  view: the trip's state lives in the coordinator, rebuilt from the log).
``sessions``      charging sessions, CDR-like, with the OCPI price breakdown.
``walkin_queue``  walk-ins that queued at a station (``POST /sessions`` with ``queue``, 202):
                  vehicle, station, the request (plan inputs, JSON), arrival time and
                  patience deadline, in arrival order (``seq``); ``status`` QUEUED while
                  waiting, then ACTIVE (its ``sessions`` row is written in the same
                  transaction) or ABANDONED.  A restarted server rebuilds its FIFO queues
                  from the QUEUED rows (:class:`live.server.sessions.SessionManager`).
``idempotency``   ``Idempotency-Key`` replays: request hash, status code and response JSON.
``trace``         rows in the :mod:`evsim.trace` schema, collected by the launcher.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.pool import StaticPool

from evsim.protocol import Record, decode_record, encode_record
from evsim.trace import COLUMNS as TRACE_COLUMNS

SCHEMA_VERSION = 2  # 2: walkin_queue (added by create_all; a version-1 file is upgraded)

metadata = MetaData()

schema_meta = Table(
    "schema_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

vehicles = Table(
    "vehicles",
    metadata,
    Column("vehicle_id", String(128), primary_key=True),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("home_company", String(64), nullable=False),
    Column("created_t_min", Float, nullable=False),
)

protocol_log = Table(
    "protocol_log",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("node_id", String(128), nullable=False),
    Column("record", Text, nullable=False),
    Index("ix_protocol_log_node", "node_id", "seq"),
)

trips = Table(
    "trips",
    metadata,
    Column("trip_id", String(200), primary_key=True),
    Column("vehicle_id", String(128), nullable=False, index=True),
    Column("created_t_min", Float, nullable=False),
    Column("request", Text, nullable=False),  # JSON: the stops as requested
)

sessions = Table(
    "sessions",
    metadata,
    Column("session_id", String(128), primary_key=True),
    Column("vehicle_id", String(128), nullable=False, index=True),
    Column("station_id", String(64), nullable=False),
    Column("company_id", String(64), nullable=False),
    Column("connector_id", String(128), nullable=False),
    Column("booking_id", String(256), nullable=False),
    Column("walk_in", Integer, nullable=False),  # 1: booking made for this session
    Column("status", String(16), nullable=False),  # ACTIVE | COMPLETED
    Column("start_t_min", Float, nullable=False),
    Column("end_t_min", Float),
    Column("soc_start", Float, nullable=False),
    Column("soc_end", Float),
    Column("target_soc", Float, nullable=False),
    Column("battery_kwh", Float, nullable=False),
    Column("power_kw", Float, nullable=False),
    Column("metered_kwh", Float),  # last energy reported by the station (meter/events)
    Column("energy_kwh", Float),
    Column("charge_min", Float),
    Column("parking_min", Float),
    Column("price_energy", Float),
    Column("price_time", Float),
    Column("price_parking", Float),
    Column("price_flat", Float),
    Column("price_total", Float),
    Column("currency", String(3), nullable=False),
    Column("energy_source", String(16)),  # "meter" | "model"
)

walkin_queue = Table(
    "walkin_queue",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # arrival order
    Column("session_id", String(128), nullable=False, unique=True),
    Column("vehicle_id", String(128), nullable=False, index=True),
    Column("station_id", String(64), nullable=False),
    Column("status", String(16), nullable=False),  # QUEUED | ACTIVE | ABANDONED
    Column("arrive_t_min", Float, nullable=False),
    Column("deadline_min", Float, nullable=False),  # arrive + patience
    Column("wait_min", Float),  # arrival -> plug-in or leaving
    Column("request", Text, nullable=False),  # JSON: the SessionCreate body
    Index("ix_walkin_queue_status", "status", "seq"),
)

idempotency = Table(
    "idempotency",
    metadata,
    Column("owner", String(128), primary_key=True),  # vehicle id, "" for anonymous
    Column("key", String(255), primary_key=True),
    Column("method_path", String(300), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("status_code", Integer, nullable=False),
    Column("response", Text, nullable=False),
)

_TRACE_TYPES = {"double": Float, "float64": Float, "int64": Integer, "string": Text}
trace = Table(
    "trace",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    *[
        Column(name, _TRACE_TYPES[str(dtype)], nullable=name not in ("t_min", "kind"))
        for name, dtype in TRACE_COLUMNS
    ],
)
TRACE_NAMES = tuple(name for name, _ in TRACE_COLUMNS)
_TRACE_NAME_SET = frozenset(TRACE_NAMES)


class _Append:
    """An INSERT of fixed columns, compiled once per dialect and run through the driver
    (``exec_driver_sql``).  The hot appends (protocol records and trace rows, every protocol
    step) carry only strings, numbers and NULLs, which need no bind processing, so skipping
    SQLAlchemy's per-call statement handling is safe; it saves about a third of a small
    transaction's time.  Positional dialects (SQLite ``?``) get tuples in the compiled
    order, named ones (``%(name)s``, PostgreSQL) the rows as they are."""

    def __init__(self, table: Table, columns: Sequence[str]) -> None:
        self.table = table
        self.columns = tuple(columns)
        self._sql: dict[str, tuple[str, tuple[str, ...] | None]] = {}

    def __call__(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        dialect = conn.dialect
        hit = self._sql.get(dialect.name)
        if hit is None:
            stmt = insert(self.table).values({c: bindparam(c) for c in self.columns})
            compiled = stmt.compile(dialect=dialect)
            order = tuple(compiled.positiontup or ()) if compiled.positional else None
            hit = self._sql[dialect.name] = (str(compiled), order)
        sql, order = hit
        params: list[Any]
        if order is None:
            params = [dict(r) for r in rows]
        else:
            params = [tuple(r[k] for k in order) for r in rows]
        conn.exec_driver_sql(sql, params if len(params) > 1 else params[0])


_append_log = _Append(protocol_log, ("node_id", "record"))
_append_trace = _Append(trace, TRACE_NAMES)
_append_trip = _Append(trips, ("trip_id", "vehicle_id", "created_t_min", "request"))


class StorageError(RuntimeError):
    """The database cannot be used (newer schema, corrupt protocol log...)."""


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.close()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL + synchronous=FULL on every connection."""
    if url.startswith("sqlite"):
        memory = url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url
        kw: dict[str, Any] = {"connect_args": {"check_same_thread": False}}
        if memory:
            kw["poolclass"] = StaticPool
        engine = create_engine(url, **kw)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class Storage:
    """All persistence of one company server (thread-safe: one transaction per call)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._write = threading.Lock()  # SQLite has one writer; serialise to avoid busy errors
        self._writer: Connection | None = None  # the connection writes use (see begin)
        # token hash -> vehicle row: vehicles are never deleted nor re-keyed, so a hit stays
        # valid; saves a query on every authenticated request
        self._by_token: dict[str, dict[str, Any]] = {}
        self._trips: dict[str, dict[str, Any]] = {}  # trips rows are insert-only: cache hits
        metadata.create_all(self.engine)
        with self.begin() as conn:
            row = conn.execute(
                select(schema_meta.c.value).where(schema_meta.c.key == "schema_version")
            ).first()
            if row is None:
                conn.execute(
                    insert(schema_meta).values(key="schema_version", value=str(SCHEMA_VERSION))
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise StorageError(
                    f"{url}: schema version {row[0]} is newer than this server ({SCHEMA_VERSION})"
                )
            elif int(row[0]) < SCHEMA_VERSION:  # additive changes only: create_all did them
                conn.execute(
                    update(schema_meta)
                    .where(schema_meta.c.key == "schema_version")
                    .values(value=str(SCHEMA_VERSION))
                )

    def close(self) -> None:
        with self._write:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self.engine.dispose()

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One write transaction (committed on exit, rolled back on error).

        Writes share one connection kept open (they are serialised anyway): no pool
        check-out and reset-on-return (a ROLLBACK) around every group commit.  After any
        error the connection is closed and the next write opens a fresh one, so a broken
        connection (a restarted PostgreSQL) costs one failed transaction."""
        with self._write:
            conn = self._writer
            if conn is None:
                conn = self._writer = self.engine.connect()
            try:
                with conn.begin():
                    yield conn
            except BaseException:
                self._writer = None
                with contextlib.suppress(Exception):
                    conn.close()
                raise

    def journal_mode(self) -> str:
        """SQLite journal mode (``wal``), or the dialect name for other databases."""
        if self.engine.dialect.name != "sqlite":
            return self.engine.dialect.name
        with self.engine.connect() as conn:
            return str(conn.execute(text("PRAGMA journal_mode")).scalar())

    # ------------------------------------------------------------------ protocol log

    @staticmethod
    def append_records(conn: Connection, *logs: tuple[str, Sequence[Record]]) -> None:
        """Append each ``(node id, records)`` in turn, all in one INSERT (a server's
        participant and coordinator records of a group commit: one statement, not two)."""
        _append_log(
            conn,
            [{"node_id": nid, "record": encode_record(r)} for nid, recs in logs for r in recs],
        )

    def load_records(self, node_id: str) -> list[Record]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(protocol_log.c.seq, protocol_log.c.record)
                .where(protocol_log.c.node_id == node_id)
                .order_by(protocol_log.c.seq)
            ).all()
        out = []
        for seq, rec in rows:
            try:
                out.append(decode_record(rec))
            except Exception as exc:  # a corrupt log must stop the server, loudly
                raise StorageError(f"protocol_log seq {seq} ({node_id}): {exc}") from exc
        return out

    # ------------------------------------------------------------------ vehicles

    def add_vehicle(self, vehicle_id: str, token_hash: str, home: str, t_min: float) -> bool:
        """Insert a vehicle; False if the id is taken."""
        with self.begin() as conn:
            if conn.execute(
                select(vehicles.c.vehicle_id).where(vehicles.c.vehicle_id == vehicle_id)
            ).first():
                return False
            conn.execute(
                insert(vehicles).values(
                    vehicle_id=vehicle_id, token_hash=token_hash, home_company=home,
                    created_t_min=t_min,
                )
            )
        return True

    def vehicle(self, vehicle_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(vehicles).where(vehicles.c.vehicle_id == vehicle_id)).first()
        return None if row is None else dict(row._mapping)

    def cached_vehicle(self, token_hash: str) -> dict[str, Any] | None:
        """The vehicle row for ``token_hash`` if it is cached (no query), else None."""
        hit = self._by_token.get(token_hash)
        return None if hit is None else dict(hit)

    def vehicle_by_token_hash(self, token_hash: str) -> dict[str, Any] | None:
        hit = self._by_token.get(token_hash)
        if hit is not None:
            return dict(hit)
        with self.engine.connect() as conn:
            row = conn.execute(select(vehicles).where(vehicles.c.token_hash == token_hash)).first()
        if row is None:
            return None
        if len(self._by_token) >= 100_000:
            self._by_token.clear()
        self._by_token[token_hash] = d = dict(row._mapping)
        return dict(d)

    # ------------------------------------------------------------------ trips

    @staticmethod
    def add_trip(
        conn: Connection, trip_id: str, vehicle_id: str, t_min: float, request: Any
    ) -> None:
        _append_trip(conn, [{"trip_id": trip_id, "vehicle_id": vehicle_id,
                             "created_t_min": t_min, "request": json.dumps(request)}])

    def trip(self, trip_id: str) -> dict[str, Any] | None:
        hit = self._trips.get(trip_id)
        if hit is not None:
            return {**hit, "request": json.loads(hit["request"])}
        with self.engine.connect() as conn:
            row = conn.execute(select(trips).where(trips.c.trip_id == trip_id)).first()
        if row is None:
            return None
        d = dict(row._mapping)
        if len(self._trips) >= 100_000:
            self._trips.clear()
        self._trips[trip_id] = dict(d)  # committed (read back), so safe to serve again
        d["request"] = json.loads(d["request"])
        return d

    def cache_trip(self, trip_id: str, vehicle_id: str, t_min: float, request: Any) -> None:
        """Remember a trips row the caller has just committed (saves the read-back)."""
        if len(self._trips) >= 100_000:
            self._trips.clear()
        self._trips[trip_id] = {"trip_id": trip_id, "vehicle_id": vehicle_id,
                                "created_t_min": t_min, "request": json.dumps(request)}

    def trips_of(self, vehicle_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(trips)
                .where(trips.c.vehicle_id == vehicle_id)
                .order_by(trips.c.created_t_min)
            ).all()
        return [dict(r._mapping) | {"request": json.loads(r.request)} for r in rows]

    # ------------------------------------------------------------------ sessions

    @staticmethod
    def add_session(conn: Connection, row: Mapping[str, Any]) -> None:
        conn.execute(insert(sessions).values(**row))

    @staticmethod
    def update_session(conn: Connection, session_id: str, **values: Any) -> None:
        conn.execute(update(sessions).where(sessions.c.session_id == session_id).values(**values))

    def session(self, session_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(sessions).where(sessions.c.session_id == session_id)).first()
        return None if row is None else dict(row._mapping)

    def sessions_where(self, **eq: Any) -> list[dict[str, Any]]:
        q = select(sessions)
        for k, v in eq.items():
            q = q.where(sessions.c[k] == v)
        with self.engine.connect() as conn:
            rows = conn.execute(q.order_by(sessions.c.start_t_min, sessions.c.session_id)).all()
        return [dict(r._mapping) for r in rows]

    def set_metered(self, session_id: str, energy_kwh: float) -> None:
        with self.begin() as conn:
            conn.execute(
                update(sessions)
                .where(sessions.c.session_id == session_id, sessions.c.status == "ACTIVE",
                       # cumulative: a late or repeated reading never lowers it
                       or_(sessions.c.metered_kwh.is_(None),
                           sessions.c.metered_kwh < energy_kwh))
                .values(metered_kwh=energy_kwh)
            )

    # ------------------------------------------------------------------ walk-in queue

    @staticmethod
    def add_queued(conn: Connection, row: Mapping[str, Any]) -> None:
        """A walk-in joins a queue (``request``: any JSON-able mapping)."""
        conn.execute(insert(walkin_queue).values(
            **{**row, "status": "QUEUED", "request": json.dumps(row["request"])}))

    @staticmethod
    def update_queued(conn: Connection, session_id: str, **values: Any) -> None:
        conn.execute(
            update(walkin_queue).where(walkin_queue.c.session_id == session_id).values(**values)
        )

    def queued(self, status: str = "QUEUED") -> list[dict[str, Any]]:
        """Queue rows with ``status`` in arrival order (``request`` left as JSON text)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(walkin_queue).where(walkin_queue.c.status == status)
                .order_by(walkin_queue.c.seq)
            ).all()
        return [dict(r._mapping) for r in rows]

    def queue_entry(self, session_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(walkin_queue).where(walkin_queue.c.session_id == session_id)
            ).first()
        return None if row is None else dict(row._mapping)

    # ------------------------------------------------------------------ idempotency

    def idempotent(self, owner: str, key: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(idempotency).where(idempotency.c.owner == owner, idempotency.c.key == key)
            ).first()
        if row is None:
            return None
        d = dict(row._mapping)
        d["response"] = json.loads(d["response"])
        return d

    def remember(
        self, owner: str, key: str, method_path: str, request_hash: str, status: int,
        response: Any,
    ) -> None:
        with self.begin() as conn:
            exists = conn.execute(
                select(idempotency.c.key).where(
                    idempotency.c.owner == owner, idempotency.c.key == key
                )
            ).first()
            if not exists:
                conn.execute(
                    insert(idempotency).values(
                        owner=owner, key=key, method_path=method_path,
                        request_hash=request_hash, status_code=status,
                        response=json.dumps(response),
                    )
                )

    # ------------------------------------------------------------------ trace

    @staticmethod
    def add_trace(conn: Connection, rows: Iterable[Mapping[str, Any]]) -> None:
        out = []
        for r in rows:
            if not _TRACE_NAME_SET.issuperset(r):
                raise ValueError(f"unknown trace columns {sorted(set(r) - _TRACE_NAME_SET)}")
            out.append({name: r.get(name) for name in TRACE_NAMES})
        _append_trace(conn, out)

    def trace_rows(self, after_seq: int = 0, limit: int = 10_000) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(trace).where(trace.c.seq > after_seq).order_by(trace.c.seq).limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]
