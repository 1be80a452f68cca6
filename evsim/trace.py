"""The one event/trace schema shared by the simulation and the live network.

Every run (simulated or live) produces a table with one row per event. Reports and metrics
read only this table, so they work the same on either kind of run.

Columns (all present in every row; unused ones are null):

==============  =========  =====================================================================
column          type       meaning
==============  =========  =====================================================================
t_min           float64    event time, minutes since the scenario start
kind            string     event kind, one of :class:`Kind`
vehicle_id      string     vehicle (EV) id
station_id      string     charging station (OCPI Location) id
company_id      string     charge point operator that owns the station
connector_id    string     connector (OCPI EVSE/connector) id, unique across the network
session_id      string     charging session id: links arrive/session_start/session_end
booking_id      string     reservation id (booking events), or trip id for trip events
soc             float64    vehicle state of charge in [0, 1] at the event
energy_kwh      float64    energy delivered by the connector in the session (session_end)
price           float64    price of the session in the tariff currency (session_end)
power_kw        float64    connector rated power (connector_status) or mean session power
distance_km     float64    distance driven (trip_end/stranded) or detour (station_chosen)
wait_min        float64    arrival at the station -> plug-in (session_start)
queue_len       int64      vehicles in the station's walk-in line after the event (booked
                           vehicles waiting for their window are not in it)
status          string     connector or booking status (OCPP/OCPI words), or a reason
detail          string     free text (origin->destination, policy name, error, ...)
==============  =========  =====================================================================

Event kinds and what they fill are listed in :class:`Kind`. A run also stores JSON run
information (scenario name, policy, seed, horizon) in the Parquet key-value metadata under
``evsim``; metrics only need ``horizon_min`` from it and fall back to the last event time.

Traces are streamed to Parquet in record batches (:class:`TraceWriter`), so a run with millions
of sessions never holds its rows as Python objects.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

__all__ = ["COLUMNS", "SCHEMA", "Kind", "TraceWriter", "read_trace", "run_info"]


class Kind(StrEnum):
    """Event kinds. Comments say which columns each fills besides t_min and kind."""

    CONNECTOR_STATUS = "connector_status"  # station, company, connector, power_kw, status
    TRIP_START = "trip_start"  # vehicle, soc, booking_id=trip id, detail "origin->dest"
    STATION_CHOSEN = "station_chosen"  # vehicle, station, company, soc, distance_km=detour
    NO_STATION = "no_station"  # vehicle, soc: no reachable station when charging was needed
    ARRIVE = "arrive"  # vehicle, station, company, session, soc, queue_len (after joining)
    SESSION_START = "session_start"  # + connector, wait_min, queue_len (after leaving queue)
    SESSION_END = "session_end"  # + connector, soc (after), energy_kwh, price, power_kw
    ABANDON = "abandon"  # vehicle left the queue without charging (session, wait_min)
    TRIP_END = "trip_end"  # vehicle, soc, distance_km
    STRANDED = "stranded"  # vehicle, soc=0, distance_km
    BOOKING = "booking"  # booking_id, vehicle, station, connector, status (OCPI booking word)
    TRIP_BOOKING = "trip_booking"  # booking_id=trip id, vehicle, status (BOOKED/REJECTED/...)
    SERVER_STATUS = "server_status"  # company, status (up/down)


COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("t_min", pa.float64()),
    ("kind", pa.string()),
    ("vehicle_id", pa.string()),
    ("station_id", pa.string()),
    ("company_id", pa.string()),
    ("connector_id", pa.string()),
    ("session_id", pa.string()),
    ("booking_id", pa.string()),
    ("soc", pa.float64()),
    ("energy_kwh", pa.float64()),
    ("price", pa.float64()),
    ("power_kw", pa.float64()),
    ("distance_km", pa.float64()),
    ("wait_min", pa.float64()),
    ("queue_len", pa.int64()),
    ("status", pa.string()),
    ("detail", pa.string()),
)
SCHEMA = pa.schema([pa.field(name, dtype) for name, dtype in COLUMNS])
_NAMES = tuple(name for name, _ in COLUMNS)
# Arrow memory for the rows' columns: the C library's allocator. A run turns its rows into
# columns batch by batch (allocated, gathered, written, freed); with Arrow's default pool
# (mimalloc) that cost 7-10% more of a whole 10x Bahia run, and varied more from run to run,
# than with malloc (bench/sim_throughput.py, same machine, ARROW_DEFAULT_MEMORY_POOL)
_POOL = pa.system_memory_pool()


def _take(values: pa.Array, indices: pa.Array | np.ndarray) -> pa.Array:
    return pc.take(values, indices, memory_pool=_POOL)

_WIDTH = len(_NAMES)  # cells per row


class TraceWriter:
    """Collects events as rows and streams them to Parquet in column batches.

    ``emit`` takes keyword columns; columns not given are null. Hot paths get a dedicated
    appender from :meth:`row_writer` instead (positional values, no per-row keyword work).
    With ``path=None`` the rows stay in memory (tests, small runs) and :meth:`to_frame` returns
    them.

    Rows are appended in time order. A row known before its time (a simulated event nothing
    can change any more) may be written *ahead* (``row_writer(..., ahead=True)``): it waits
    and joins the trace, in time order, just before the first later row, or when
    :meth:`release` says its time has come; rows at the same time keep the order they were
    written in, those written ahead after the others. Rows ahead that are not due when the
    writer closes are not written (they lie past the end of the run).

    Rows written ahead are not kept sorted one by one (a heap of Python tuples cost a tenth
    of a simulation's run time): they collect in a buffer of their own, and each batch puts
    the due ones in place with array operations (a stable sort by time, and a binary search
    in the running maximum of the other rows' times for where each goes).
    """

    def __init__(
        self,
        path: str | Path | None = None,
        *,
        batch_rows: int = 65_536,
        run_info: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.batch_rows = batch_rows
        self.rows_written = 0
        # the rows' cells one after the other (_WIDTH per row, in _NAMES order): a row adds
        # no object of its own that the cyclic garbage collector would have to look at (a
        # tuple per row set it off every few hundred rows). The list lives as long as the
        # writer (flush empties it in place): the generated appenders hold its ``extend``
        self._rows: list[Any] = []
        self._emitters: dict[tuple[str, ...], Callable[..., None]] = {}
        self._writers: dict[tuple[str | bool, ...], Callable[..., None]] = {}
        # rows written ahead since the last batch (or the last write_ahead), cell by cell as
        # ``_rows``, in the order written
        self._later: list[Any] = []
        # rows ahead as column chunks, in the order written: those a batch found not yet
        # due, then any given as columns (write_ahead), each after the cells before it
        self._pending: list[list[pa.Array]] = []
        self._clock = -math.inf  # the latest time of a row (not ahead) in a batch so far
        self._batches: list[pa.RecordBatch] = []
        meta = {b"evsim": json.dumps(dict(run_info or {}), default=str).encode()}
        self._schema = SCHEMA.with_metadata(meta)
        self._writer: pq.ParquetWriter | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, self._schema, compression="zstd")

    def emit(self, t_min: float, kind: str, **cols: Any) -> None:
        # one appender per distinct set (and order) of keyword columns, checked once
        key = tuple(cols)
        fn = self._emitters.get(key)
        if fn is None:
            fn = self._emitters[key] = self._appender(None, key)
        fn(float(t_min), str(kind), *cols.values())

    def row_writer(self, kind: str, *columns: str, ahead: bool = False) -> Callable[..., None]:
        """A function ``(t_min, *values)`` that appends one ``kind`` row whose ``columns``
        (in that order) get ``values`` and whose other columns are null: what ``emit(t_min,
        kind, **dict(zip(columns, values)))`` does, for a fixed set of columns, without the
        per-row keyword and conversion work. ``t_min`` must already be a float (SimPy's
        clock is one once the run has started; an int is stored as the same float). With
        ``ahead`` the row is written ahead of time (see the class). One function per distinct
        ``(kind, *columns, ahead)``, made once."""
        key: tuple[str | bool, ...] = (str(kind), *columns, ahead)
        fn = self._writers.get(key)
        if fn is None:
            fn = self._writers[key] = self._appender(str(kind), columns, ahead)
        return fn

    def release(self, until: float = math.inf) -> None:
        """Append the rows written ahead whose time is before ``until`` (all by default),
        after every row so far."""
        self.flush(until)

    def write_ahead(self, n: int, **columns: pa.Array | np.ndarray | Sequence[Any]) -> None:
        """Write ``n`` rows ahead (see the class) given as columns: each keyword is a column
        of ``n`` values (an Arrow array, a NumPy array or a sequence; ``kind`` included),
        the columns not given are null. They come after every row written ahead so far, in
        their own order: what ``n`` calls of an ``ahead`` row writer would write, at the
        cost of a few array operations (for many rows at once)."""
        unknown = set(columns) - set(_NAMES)
        if unknown:
            raise TypeError(f"unknown trace column(s): {sorted(unknown)}")
        if "t_min" not in columns or "kind" not in columns:
            raise TypeError("write_ahead needs the t_min and kind columns")
        for name, values in columns.items():
            if len(values) != n:
                raise ValueError(f"trace column {name}: {len(values)} values for {n} rows")
        if n == 0:
            return
        arrays = []
        for name, dtype in COLUMNS:
            values = columns.get(name)
            if values is None:
                arrays.append(pa.nulls(n, dtype, memory_pool=_POOL))
                continue
            a = (
                values
                if isinstance(values, pa.Array)
                else pa.array(values, type=dtype, memory_pool=_POOL)
            )
            arrays.append(a if a.type == dtype else a.cast(dtype))
        if self._later:  # the cells written ahead before these rows go before them
            self._pending.append(_columns(self._later))
            self._later.clear()
        self._pending.append(arrays)

    def _appender(
        self, kind: str | None, key: Sequence[str], ahead: bool = False
    ) -> Callable[..., None]:
        """Generate the appender for rows whose given columns are ``key``: ``(t_min, kind,
        *values)``, or ``(t_min, *values)`` with ``kind`` fixed. Generated source (as
        ``dataclasses`` and ``namedtuple`` do) so a row is a single tuple display (added
        cell by cell to the rows; kept whole while written ahead)."""
        unknown = set(key) - set(_NAMES[2:])
        if unknown:
            raise TypeError(f"unknown trace column(s): {sorted(unknown)}")
        if len(set(key)) != len(key):
            raise TypeError(f"repeated trace column(s) in {key}")
        args = [f"_v{i}" for i in range(len(key))]
        slot = dict(zip(key, args, strict=True))
        params = ["t_min", *([] if kind is not None else ["kind"]), *args]
        cells = ["t_min", "kind", *(slot.get(name, "None") for name in _NAMES[2:])]
        buffer = self._later if ahead else self._rows
        src = (
            f"def append_row({', '.join(params)}):\n"
            f"    extend(({', '.join(cells)}))\n"
            f"    if len(rows) >= writer.batch_rows * {_WIDTH}:\n"
            f"        flush()\n"
        )
        scope: dict[str, Any] = {
            "extend": buffer.extend,
            "rows": buffer,
            "writer": self,
            "flush": self.flush,
            "kind": kind,
        }
        exec(src, scope)  # the source above is built from known column names only
        return scope["append_row"]

    def extend(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append already-formed rows (for example events gathered by the live network)."""
        for row in rows:
            row = dict(row)
            self.emit(row.pop("t_min"), row.pop("kind"), **row)

    def flush(self, until: float = -math.inf) -> None:
        """Write the rows so far as one batch, with the rows written ahead that are due: those
        before a later row, or before ``until``; the others wait for a later batch."""
        rows, later = self._rows, self._later
        if not rows and not later and (not self._pending or until == -math.inf):
            return
        columns = _columns(rows)
        n = len(rows) // _WIDTH
        rows.clear()
        if n:
            times = columns[0].to_numpy()
            # where a row ahead goes: before the first row whose time is later than its own,
            # i.e. the first place the running maximum of the rows' times passes it
            running = np.maximum.accumulate(times)
            np.maximum(running, self._clock, out=running)
            self._clock = float(running[-1])
        else:
            running = np.empty(0)
        if later or self._pending:
            chunks = self._pending
            if later:
                chunks.append(_columns(later))
                later.clear()
            ahead = (
                chunks[0]
                if len(chunks) == 1
                else [pa.concat_arrays(list(c), _POOL) for c in zip(*chunks, strict=True)]
            )
            t_ahead = ahead[0].to_numpy()
            is_due = t_ahead < max(self._clock, until)
            due = np.flatnonzero(is_due)
            due = due[np.argsort(t_ahead[due], kind="stable")]  # by time, then as written
            wait = np.flatnonzero(~is_due)
            self._pending = [[_take(a, wait) for a in ahead]] if wait.size else []
            if due.size:
                # sort keys: row i -> 2i + 1, a row ahead going before row i -> 2i (ties keep
                # the time order just made)
                keys = np.concatenate(
                    [2 * np.arange(n) + 1, 2 * np.searchsorted(running, t_ahead[due], "right")]
                )
                order = np.argsort(keys, kind="stable")
                # one gather per column from the rows followed by every row ahead: the
                # sorted positions, with a due row's mapped to where it is among them
                order = np.concatenate([np.arange(n), n + due])[order]
                at = pa.array(order, memory_pool=_POOL)
                columns = [
                    _take(pa.concat_arrays([c, a], _POOL), at)
                    for c, a in zip(columns, ahead, strict=True)
                ]
                n += due.size
        if not n:
            return
        batch = pa.RecordBatch.from_arrays(columns, schema=self._schema)
        if self._writer is not None:
            self._writer.write_batch(batch)
        else:
            self._batches.append(batch)
        self.rows_written += n

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def to_frame(self, ahead: bool = True) -> pd.DataFrame:
        """All rows so far as a DataFrame (in-memory writers only), with the rows written
        ahead (``ahead``: for a run that has ended, when no later row can come) or without."""
        if self.path is not None:
            raise RuntimeError("to_frame() is for in-memory traces; use read_trace(path)")
        if ahead:
            self.release()
        self.flush()
        table = pa.Table.from_batches(self._batches, schema=self._schema)
        return _to_pandas(table)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _columns(cells: list[Any]) -> list[pa.Array]:
    """The rows laid out cell by cell (``_WIDTH`` per row) as one array per column."""
    return [
        pa.array(cells[c::_WIDTH], type=t, memory_pool=_POOL) for c, (_, t) in enumerate(COLUMNS)
    ]


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    df = table.to_pandas(memory_pool=_POOL)
    df.attrs["evsim"] = run_info_from_schema(table.schema)
    return df


def run_info_from_schema(schema: pa.Schema) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(b"evsim")
    return json.loads(raw) if raw else {}


def read_trace(path: str | Path) -> pd.DataFrame:
    """Read a trace written by the simulation or the live network.

    ``path`` is a Parquet file or a run directory containing ``trace.parquet``. The run
    information is in ``df.attrs["evsim"]``. Raises ``ValueError`` when a column is missing.
    """
    p = Path(path)
    if p.is_dir():
        p = p / "trace.parquet"
    if not p.exists():
        raise FileNotFoundError(f"no trace at {p}")
    table = pq.read_table(p)
    missing = [name for name in _NAMES if name not in table.column_names]
    if missing:
        raise ValueError(f"{p}: not an evsim trace, missing columns {missing}")
    return _to_pandas(table)


def run_info(df: pd.DataFrame) -> dict[str, Any]:
    """Run information stored with a trace (empty dict when there is none)."""
    return dict(df.attrs.get("evsim", {}))
