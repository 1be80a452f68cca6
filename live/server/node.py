"""Hosting the sans-IO protocol nodes of one company: a Participant and a Coordinator.

``ProtocolHost`` is the only place that calls into the state machines (they are not
thread-safe; one re-entrant lock serialises every call, from HTTP handlers, the bus worker
and the ticker alike).  Every call follows the same steps (:meth:`ProtocolHost.execute`):

1. under the lock, run the operation at ``now = clock()``; messages addressed to this
   company's own nodes are delivered in-process right away (a trip with a stop at home
   needs no broker round trip), TripResults addressed to the API node are collected; the
   ``tracers`` turn the step into trace rows; the step's records (both nodes'
   ``new_records()``, the trace rows and the caller's ``extra`` writes) are queued for the
   next group commit, in lock order;
2. release the lock and wait until the step is durable.  Group commit with a **leader**, no
   thread of its own: the first waiter that finds no commit in progress takes every queued
   step and writes them in one transaction (one fsync for many concurrent requests), in queue
   order, while later arrivals queue up behind it for the next batch.  A lone request thus
   commits on its own thread, with no hand-over to another thread and back (each costs a
   wake-up on the critical path of every protocol hop);
3. publish the messages for other companies on ``evsim/protocol/{dst}/{company}`` (QoS 1),
   then run the post-commit hooks (vehicle notifications; for a lazy or deferred step,
   below, right after step 1, as nothing they tell rests on its records).  Publishing
   outside the lock means a synchronous bus (tests) or a slow broker can never deadlock two
   servers.

Write-ahead rule: nothing of a step is sent or answered before its records are committed,
except what the protocol says may precede them (:func:`evsim.protocol.before_log`): PREPARE
(presumed abort) leaves as soon as the step has run, so a trip's first hop overlaps the
coordinator's first commit, and a BOOKED answer wakes its request before ALL_ACKED is
written (see :mod:`evsim.protocol.coordinator` for why both are safe).  A trip's start goes
further (``execute(..., lazy=True)``): its records (TripStarted, the holds at home) are not
forced on their own but ride on the trip's decision, which is.  So does a trip's end: a step
whose records are all ALL_ACKED (:func:`evsim.protocol.may_defer`) and that answers only
BOOKED is not forced at all; it rides on the next commit, and the ticker writes a step that
stayed queued for a whole tick (:meth:`ProtocolHost.tick`).  A trip thus costs its
coordinator one fsync, the decision's (forcing its start and its end too would take three),
and a crash loses at most the ALL_ACKED records of the last two ticks, which a restarted
coordinator gets again by asking the stops.
A step that wrote nothing but sends or answers something still waits until every step
queued before it is durable (what it sends may depend on their effects), and readers that
answer from in-memory state (:meth:`barrier`) do the same, so no reply shows a state that a
crash could undo.  Steps that read the database inside ``op`` (``execute(...,
pipelined=False)``, the default) first wait for every queued step, so they see their
predecessors' rows; the protocol paths (messages, timers, bookings) are pipelined: the
next step runs while the previous commits.

A failed commit (the database refuses a write): every step of that batch and every step
queued behind it fails with :class:`CommitError` (503 ``storage_unavailable`` for an HTTP
caller), nothing of them is sent, and the next step first rebuilds both nodes from the log,
so the nodes never act on, and the log never gets, a record built on one that was lost.
Reads and record-less steps that saw the lost state fail the same way (:attr:`epoch`).

Batching on the bus: when the bus can say that its worker has run out of queued work
(``bus.on_idle``, :class:`live.mqtt.MqttBus`), protocol messages that arrive while more are
queued are buffered and handled together, as one step with one transaction, when the worker
goes idle (or after :data:`MAX_BATCH` messages).  One message alone is handled at once, as
before; under load every hop costs one fsync per burst instead of one per message.  A bus
without ``on_idle`` (:class:`live.bus.InMemoryBus`) gets every message handled on arrival.

Node ids: the participant is ``{company}``, the coordinator ``{company}.coord`` and the API
front end (the "vehicle node" TripResults go to) ``{company}.api``.  Garbage on the protocol
topics is logged and dropped; it never reaches the state machines.

Fault injection (:mod:`live.faults`, only when ``EVSIM_FAULT`` / ``EVSIM_FAULT_FILE`` is set):
the commit leader calls the injector right after each commit, once per step (step 2), and the
host before / after each publish (step 3); it drops protocol traffic in and out while an
injected partition lasts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection

from evsim.protocol import (
    Coordinator,
    Message,
    Outgoing,
    Participant,
    ProtocolError,
    TripChanged,
    TripEvent,
    TripResult,
    before_log,
    decode_batch,
    encode,
    may_defer,
    split_before_log,
)
from evsim.protocol.messages import pack_batches
from live import topics
from live.bus import MAX_PAYLOAD_BYTES, Bus
from live.faults import FaultInjector
from live.server.periodic import Periodic
from live.server.steps import CommitError, Effects, QueuedStep, node_ids
from live.storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_BATCH = 256  # protocol messages handled in one step at most (bus batching)
MAX_UNSTARTED = 1024  # answers kept for trips never started (see ProtocolHost._results)
_ALL_YES = TripEvent.ALL_YES.value


class ProtocolHost:
    """A company's Participant + Coordinator behind one lock, persisted and wired to a bus."""

    def __init__(
        self,
        company: str,
        stations: Mapping[str, Sequence[str]],
        storage: Storage,
        clock: Callable[[], float],
        *,
        participant_config: Mapping[str, Any] | None = None,
        coordinator_config: Mapping[str, Any] | None = None,
        faults: FaultInjector | None = None,
    ) -> None:
        self.company = company
        self.pid, self.cid, self.api = node_ids(company)
        self.storage = storage
        self.clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        # trip id -> Event of each request waiting for its TripResult (set after the commit
        # that stores the result; waking only that waiter, not every waiting request)
        self._waiters: dict[str, threading.Event] = {}
        # trip id -> (loop, future) of each async request waiting for it (wait_result_async)
        self._async_waiters: dict[str, list[tuple[asyncio.AbstractEventLoop,
                                                   asyncio.Future[None]]]] = {}
        self._participant_config = dict(participant_config or {})
        self._coordinator_config = dict(coordinator_config or {})
        self.participant = Participant.from_log(
            self.pid, stations, storage.load_records(self.pid), **self._participant_config
        )
        self.coordinator = Coordinator.from_log(
            self.cid, storage.load_records(self.cid), **self._coordinator_config
        )
        # the database is the log: no copy of every record in memory (evsim.protocol.log)
        self.participant.forget_log()
        self.coordinator.forget_log()
        self.bus: Bus | None = None
        self.hooks: list[Callable[[Effects], None]] = []
        # tracers(fx) -> trace rows, under the lock; written in the step's own transaction
        self.tracers: list[Callable[[Effects], list[dict[str, Any]]]] = []
        # group commit: steps queued in lock order, made durable by a leader (a waiter)
        self._queue: list[QueuedStep] = []
        self._qcond = threading.Condition(threading.Lock())
        self._enqueued = 0  # seq of the last queued step
        self._durable = 0  # every step with seq <= this is committed
        self._committing = False  # a leader is writing a batch
        # a commit failed: the nodes in memory are ahead of the log (and so is every step
        # computed since); the next execute rebuilds them from the log first (_resync),
        # which starts a new epoch.  _failure: (epoch, first seq that failed) of the last
        # failure, for the reads and the record-less steps computed on that state
        self._broken = False
        self.epoch = 0
        self._failure: tuple[int, int] | None = None
        self.commits = 0  # transactions written (for benchmarks)
        # answers for trips the coordinator never started (an invalid request): a started
        # trip's answer is read from the coordinator; the last MAX_UNSTARTED are kept
        self._results: dict[str, TripResult] = {}
        # trip id -> seq of the step that logged its ALL_YES decision, while that step may
        # not be durable yet: a BOOKED answer waits for that step (and no other)
        self._decided: dict[str, int] = {}
        self.dropped = 0  # garbage / misaddressed protocol payloads ignored
        # bus batching: (destination node, message) buffered on the bus worker until it
        # goes idle; only that worker touches the list
        self._inbox: list[tuple[str, Message]] = []
        self._batching = False
        self.batches = 0  # steps that handled buffered bus messages (for benchmarks)
        self._ticker: Periodic | None = None
        self._queued_at_tick = 0  # the last step queued when the previous tick ran
        # fault injection (live.faults): None unless EVSIM_FAULT / EVSIM_FAULT_FILE is set
        self.faults = faults if faults is not None else FaultInjector.from_env()

    # ------------------------------------------------------------------ bus

    def attach(self, bus: Bus) -> None:
        """Subscribe this company's protocol topics on ``bus`` and send through it."""
        self.bus = bus
        on_idle = getattr(bus, "on_idle", None)
        if callable(on_idle):
            on_idle(self.flush_inbox)
            self._batching = True
        bus.subscribe(topics.protocol_filter(self.pid), self.on_payload)  # [access] {dst}/+
        bus.subscribe(topics.protocol_filter(self.cid), self.on_payload)

    def on_payload(self, topic: str, payload: bytes) -> None:
        """Bus handler for ``evsim/protocol/{node}/{src}``; never raises."""
        if self.faults is not None and self.faults.partitioned():
            return  # injected partition (live.faults): this company is cut off the bus
        info = topics.parse(topic)
        if info is None or info.kind != "protocol" or info.node_id not in (self.pid, self.cid):
            self.dropped += 1
            log.warning("protocol message on unexpected topic %s ignored", topic)
            return
        if len(payload) > MAX_PAYLOAD_BYTES:
            self.dropped += 1
            log.warning("oversized protocol payload (%d bytes) on %s ignored", len(payload), topic)
            return
        try:
            msgs = decode_batch(payload)  # one message, or a sender's batch (taken whole)
        except (ProtocolError, UnicodeDecodeError, ValueError, TypeError) as exc:
            self.dropped += 1
            log.warning("malformed protocol payload on %s ignored: %s", topic, exc)
            return
        if info.src is not None:  # [access] no spoofing, for every message of a batch
            bad = next((m for m in msgs if m.src not in node_ids(info.src)), None)
            if bad is not None:
                self.dropped += 1
                log.warning("protocol message from %r on %s (sender %r) ignored", bad.src,
                            topic, info.src)
                return
        dst = info.node_id or ""
        if self._batching:
            self._inbox.extend((dst, m) for m in msgs)
            if len(self._inbox) >= MAX_BATCH:
                self.flush_inbox()
            return  # the bus worker calls flush_inbox() as soon as its queue is empty
        for msg in msgs:
            try:
                self.deliver(dst, msg)
            except Exception:  # state machines reject some inputs with ProtocolError
                self.dropped += 1
                log.exception("protocol message %s on %s could not be handled", msg.msg_id,
                              topic)

    def deliver(self, dst: str, msg: Message) -> None:
        node: Participant | Coordinator = self.participant if dst == self.pid else self.coordinator
        self.execute(lambda now: (None, node.handle(msg, now)), pipelined=True)

    def flush_inbox(self) -> None:
        """Handle the buffered bus messages as one step (bus worker; never raises)."""
        if not self._inbox:
            return
        batch, self._inbox = self._inbox, []

        def op(now: float) -> tuple[None, list[Outgoing]]:
            outs: list[Outgoing] = []
            for dst, msg in batch:
                node = self.participant if dst == self.pid else self.coordinator
                try:
                    outs.extend(node.handle(msg, now))
                except Exception:  # one rejected message never costs the others theirs
                    self.dropped += 1
                    log.exception("protocol message %s to %s could not be handled",
                                  msg.msg_id, dst)
            return None, outs

        try:
            self.execute(op, pipelined=True)
            self.batches += 1
        except Exception:
            log.exception("a batch of %d protocol messages failed", len(batch))

    # ------------------------------------------------------------------ the one path in

    def execute(
        self,
        op: Callable[[float], tuple[T, list[Outgoing]]],
        *,
        extra: Callable[[Connection, T, Effects], None] | None = None,
        pipelined: bool = False,
        lazy: bool = False,
    ) -> T:
        """Run ``op(now)`` on the nodes, persist, then send; returns op's value.

        ``extra(conn, value, effects)`` runs inside the same transaction as the protocol
        records (on the thread leading the commit, after the operation and its local deliveries: it
        must only write what ``value`` / ``effects`` say).  ``pipelined=False`` (default)
        waits for every queued step before running ``op``, for operations that read the
        database; the protocol paths pass ``True``.  ``lazy=True``: if the step sends
        nothing that must wait for the log and answers no trip, return without waiting for
        its records: they are written with the next commit, and a crash before it loses
        them (for a trip's start, which presumed abort allows: see
        :func:`evsim.protocol.before_log`).  The caller must not answer anything that rests
        on them before a later wait (:meth:`wait_result` with the step's epoch).
        """
        remote: list[Outgoing] = []
        with self.lock:
            if not pipelined:
                self._wait_durable(self._enqueued)
            if self._broken:  # (after that wait: the steps it waited for may have failed)
                self._resync()
            epoch = self.epoch
            now = self.clock()
            value, outs = op(now)
            fx = Effects(now)
            queue = deque(outs)
            while queue:
                o = queue.popleft()
                if o.dst == self.pid:
                    queue.extend(self.participant.handle(o.msg, now))
                elif o.dst == self.cid:
                    queue.extend(self.coordinator.handle(o.msg, now))
                elif o.dst == self.api:
                    if isinstance(o.msg, TripResult):
                        fx.results.append(o.msg)
                        if self.coordinator.trip_state(o.msg.trip_id) is None:
                            self._keep_unstarted(o.msg)
                else:
                    remote.append(o)
            fx.participant_records = self.participant.new_records()
            fx.coordinator_records = self.coordinator.new_records()
            fx.sent = remote
            changed = bool(fx.results or fx.participant_records or fx.coordinator_records)
            if changed:
                for tracer in self.tracers:
                    try:
                        fx.trace_rows.extend(tracer(fx))
                    except Exception:
                        log.exception("tracer %r failed", tracer)
            step: QueuedStep | None = None
            if fx.participant_records or fx.coordinator_records or extra is not None \
                    or fx.trace_rows:
                step = self._enqueue(fx, value, extra)
                for rec in fx.coordinator_records:
                    if isinstance(rec, TripChanged) and rec.event == _ALL_YES:
                        self._decided[rec.trip_id] = step.seq
            upto = self._enqueued
        early, remote = split_before_log(remote)
        if early:  # PREPAREs (presumed abort): they need not wait for the commit below
            self._send(early)
        booked = [r for r in fx.results if before_log(r)]
        if booked:  # nor does a BOOKED answer (ALL_ACKED is not forced): wake its request,
            # which still waits for the step that decided the trip (wait_result)
            with self.lock:
                self._wake(booked)
        # a step that only records ALL_ACKED and only answers BOOKED rests on no commit
        deferred = (step is not None and not remote and extra is None
                    and len(booked) == len(fx.results)
                    and all(map(may_defer, fx.participant_records + fx.coordinator_records)))
        if deferred or (not remote and not fx.results and (step is None or lazy)):
            # nothing left to send, nobody to answer: nothing here rests on a commit.  A
            # record-less step (a vote that decides nothing yet) need not wait for the steps
            # before it; a lazy or deferred step's records ride on the next commit (a later
            # step's, a barrier's or, within two ticks, the ticker's): a trip's start and
            # its ALL_ACKED cost no fsync of their own
            if deferred:
                with self.lock:
                    self.changed.notify_all()
            if step is not None:
                self._run_hooks(fx)
            return value
        # what we send may depend on steps still committing: wait for all up to ours
        self._wait_durable(step.seq if step is not None else upto)
        if step is not None and step.error is not None:
            raise step.error
        self._check(epoch, upto)  # a step before ours failed: what we send may be unlogged
        if changed:
            with self.lock:
                self.changed.notify_all()
                self._wake(fx.results)
        self._send(remote)
        if changed:
            self._run_hooks(fx)
        return value

    def _run_hooks(self, fx: Effects) -> None:
        for hook in self.hooks:
            try:
                hook(fx)
            except Exception:
                log.exception("post-commit hook %r failed", hook)

    def _wake(self, results: Sequence[TripResult]) -> None:
        """Wake the requests waiting for these trips' results (caller holds the lock)."""
        for res in results:
            ev = self._waiters.get(res.trip_id)
            if ev is not None:
                ev.set()
            for loop, fut in self._async_waiters.get(res.trip_id, ()):
                _wake_on(loop, fut)

    # ------------------------------------------------------------------ group commit

    def _enqueue(self, fx: Effects, value: Any, extra: Any) -> QueuedStep:
        """Queue a step for the next commit (caller holds ``self.lock``: lock order = seq)."""
        with self._qcond:
            self._enqueued += 1
            step = QueuedStep(self._enqueued, fx, value, extra)
            if self._broken:  # computed on nodes ahead of the log: never written
                step.error = CommitError("an earlier write failed; nothing was stored")
            else:
                self._queue.append(step)
        return step

    def _wait_durable(self, seq: int) -> None:
        """Return once every step with ``seq`` or less is committed, leading the commit of
        the queued batch whenever no other thread is writing one."""
        while True:
            with self._qcond:
                while self._durable < seq and self._committing:
                    self._qcond.wait()
                if self._durable >= seq or not self._queue:
                    return
                steps, self._queue = self._queue, []
                self._committing = True
            try:
                self._commit(steps)
            except BaseException as exc:  # the steps' callers raise it; nothing is sent
                for st in steps:
                    st.error = st.error or exc
                raise
            finally:
                with self._qcond:
                    self._committing = False
                    self._durable = max(self._durable, steps[-1].seq)
                    self._qcond.notify_all()

    def wait_decided(self, trip_id: str, epoch: int) -> None:
        """Return once the step that logged ``trip_id``'s ALL_YES decision is durable: all a
        BOOKED answer rests on besides the stops' own commits.  (Usually it already is; not
        when the trip was decided and booked in one step, every stop at home, nor when the
        trip's start was queued lazily and rides on the decision's commit.)  Raises
        :class:`CommitError` if that commit, or one before it in ``epoch`` (the host's
        epoch when the caller read the result), failed."""
        with self.lock:
            seq = self._decided.get(trip_id)
        if seq is not None:
            self._wait_durable(seq)
        # a failed commit at or before the decision (or, with the decision's seq gone, a
        # rebuild since): the answer may rest on records the log never got
        self._check(epoch, seq if seq is not None else self._enqueued)
        if seq is None:
            return
        with self.lock:
            self._decided.pop(trip_id, None)
            if len(self._decided) > 4096:  # decisions nobody waited for, long durable
                done = self._durable
                self._decided = {t: q for t, q in self._decided.items() if q > done}

    def _resync(self) -> None:
        """Rebuild both nodes from the log after a failed commit (caller holds the lock;
        nothing is queued: the failure dropped it all).  Requests waiting for a trip are
        woken to read what the log says."""
        self.participant = Participant.from_log(
            self.pid, self.participant.stations, self.storage.load_records(self.pid),
            **self._participant_config,
        )
        self.coordinator = Coordinator.from_log(
            self.cid, self.storage.load_records(self.cid), **self._coordinator_config
        )
        self.participant.forget_log()
        self.coordinator.forget_log()
        self._results.clear()
        self._decided.clear()
        with self._qcond:
            self._broken = False
            self.epoch += 1
        for ev in self._waiters.values():
            ev.set()
        for waiting in self._async_waiters.values():
            for loop, fut in waiting:
                _wake_on(loop, fut)
        self.changed.notify_all()
        log.warning("protocol nodes of %s rebuilt from the log", self.company)

    def barrier(self, epoch: int | None = None) -> None:
        """Wait until every step queued so far is durable (call before answering a read
        from in-memory protocol state; must not be called from an ``extra``).  Raises
        :class:`CommitError` if one of them failed: the state read may not be in the log.
        ``epoch``: the host's :attr:`epoch` when the state was read (under the lock)."""
        with self._qcond:
            upto = self._enqueued
            if epoch is None:
                epoch = self.epoch
        self._wait_durable(upto)
        self._check(epoch, upto)

    def _check(self, epoch: int, upto: int) -> None:
        """Raise :class:`CommitError` if a write failed for a step up to ``upto`` of the
        given epoch (state computed or read then is ahead of the log)."""
        failure = self._failure
        if failure is not None and failure[0] == epoch and upto >= failure[1]:
            raise CommitError("a write failed; the protocol state is being rebuilt")

    def _commit(self, steps: list[QueuedStep]) -> None:
        """Write ``steps`` in one transaction.  If it fails, every step of the batch fails,
        and so does every step queued behind it: each was computed on the nodes' state
        after the failed ones (a decision on top of a trip the log never got), so writing
        any of them could leave a log that no longer replays.  The nodes are then ahead of
        the log; ``_broken`` makes the next :meth:`execute` rebuild them from it."""
        try:
            with self.storage.begin() as conn:
                QueuedStep.write_all(conn, steps, self.pid, self.cid)
            self.commits += 1
        except Exception as exc:
            log.exception("commit of %d step(s) failed; the protocol nodes will be rebuilt "
                          "from the log", len(steps))
            err = CommitError(f"the database refused the write: {exc}")
            with self._qcond:
                if not self._broken:
                    self._failure = (self.epoch, steps[0].seq)
                self._broken = True
                dropped, self._queue = self._queue, []
                if dropped:
                    self._durable = max(self._durable, dropped[-1].seq)
            for st in (*steps, *dropped):
                st.error = st.error or err
            return
        if self.faults is not None:  # injected crash right after the commit of a step
            for st in steps:
                if st.error is None:
                    try:
                        self.faults.after_commit(st.fx.participant_records
                                                 + st.fx.coordinator_records)
                    except BaseException as exc:  # in-process "crash" (tests): the step's
                        st.error = exc  # caller raises it, nothing of the step is sent

    def close(self) -> None:
        """Commit what is queued."""
        self.barrier()

    def _send(self, outs: list[Outgoing]) -> None:
        bus, faults = self.bus, self.faults
        if bus is not None and faults is None and len(outs) > 1:
            self._send_bundled(bus, outs)
            return
        for o in outs:
            if bus is None:
                log.warning("no bus attached; %s to %s not sent", type(o.msg).__name__, o.dst)
                continue
            if faults is not None:  # live.faults: partition, crash before a publish
                if faults.partitioned():
                    continue
                faults.before_send(o.msg)
            try:
                bus.publish(topics.protocol_topic(o.dst, self.company),  # [access]
                            encode(o.msg).encode(), qos=1)
            except Exception:  # retries are the protocol's business (tick re-sends)
                log.exception("publishing %s to %s failed", type(o.msg).__name__, o.dst)
            if faults is not None:  # crash / pause / cut right after the broker has it
                faults.after_send(o.msg, bus)

    def _send_bundled(self, bus: Bus, outs: list[Outgoing]) -> None:
        """Messages to the same node go out as one payload (a JSON array, in order, split
        under the payload limit): under load a batch of steps sends one publish per peer
        node instead of one per message.  Not with fault injection, whose hooks act per
        message."""
        by_dst: dict[str, list[str]] = {}
        for o in outs:
            by_dst.setdefault(o.dst, []).append(encode(o.msg))
        for dst, texts in by_dst.items():
            topic = topics.protocol_topic(dst, self.company)  # [access]
            for payload in pack_batches(texts, MAX_PAYLOAD_BYTES // 2):
                try:
                    bus.publish(topic, payload.encode(), qos=1)
                except Exception:  # retries are the protocol's business (tick re-sends)
                    log.exception("publishing %d message(s) to %s failed",
                                  payload.count('"msg_id"'), dst)

    # ------------------------------------------------------------------ timers

    def tick(self) -> None:
        """Advance both nodes' timers to ``clock()`` and route what they emit; then commit
        the steps left queued since the previous tick (lazy or deferred steps that no later
        commit took along: a trip's last ALL_ACKED before the server went quiet)."""
        self.execute(
            lambda now: (None, self.participant.tick(now) + self.coordinator.tick(now)),
            pipelined=True,
        )
        with self._qcond:
            oldest = self._queue[0].seq if self._queue else 0
        if oldest and oldest <= self._queued_at_tick:
            self.barrier()
        self._queued_at_tick = self._enqueued

    def start_ticker(self, interval_s: float) -> None:
        if self._ticker is None:
            self._ticker = Periodic(f"ticker-{self.company}", interval_s, self.tick)
            self._ticker.start()

    def stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.stop(5.0)
            self._ticker = None

    # ------------------------------------------------------------------ trip results

    def _keep_unstarted(self, res: TripResult) -> None:
        results = self._results
        results.pop(res.trip_id, None)
        results[res.trip_id] = res
        if len(results) > MAX_UNSTARTED:  # the oldest: long answered
            del results[next(iter(results))]

    def result(self, trip_id: str) -> TripResult | None:
        """The trip's definitive result (current coordinator state first), or None."""
        with self.lock:
            return self.coordinator.trip_result(trip_id) or self._results.get(trip_id)

    async def wait_result_async(self, trip_id: str, timeout_s: float) -> TripResult | None:
        """Wait on the event loop, up to ``timeout_s`` wall seconds, for a trip's definitive
        result: no thread waits for it (the protocol worker's wake-up resolves a future on
        the loop). Unlike :meth:`wait_result` it waits for no commit: the caller answers
        only after :meth:`booked_durable` (or the blocking path)."""
        loop = asyncio.get_running_loop()
        with self.lock:
            res = self.result(trip_id)
            if res is not None:
                return res
            fut: asyncio.Future[None] = loop.create_future()
            entry = (loop, fut)
            self._async_waiters.setdefault(trip_id, []).append(entry)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, timeout_s)
        finally:
            with self.lock:
                waiting = self._async_waiters.get(trip_id, [])
                if entry in waiting:
                    waiting.remove(entry)
                if not waiting:
                    self._async_waiters.pop(trip_id, None)
        return self.result(trip_id)

    def booked_durable(self, trip_id: str, epoch: int) -> bool:
        """Can a BOOKED answer for ``trip_id`` go out now, without waiting (or leading) a
        commit? True when the step that logged its decision is durable and no commit of
        ``epoch`` failed since: then :meth:`wait_decided` returns at once. (For a trip
        with stops at other companies it always is by the time BOOKED comes: the decision
        was forced before any COMMIT left.)"""
        with self.lock:
            seq = self._decided.get(trip_id)
        with self._qcond:
            upto = seq if seq is not None else self._enqueued
            if seq is not None and self._durable < seq:
                return False
        failure = self._failure
        return not (failure is not None and failure[0] == epoch and upto >= failure[1])

    def wait_result(self, trip_id: str, timeout_s: float,
                    epoch: int | None = None) -> TripResult | None:
        """Block up to ``timeout_s`` wall seconds for a trip's definitive result.

        Answers nothing a crash could still undo: it waits until what is queued is durable,
        except for a BOOKED result, which rests only on the trip's decision (and the stops'
        commits, durable before they were acknowledged): it waits for the step that logged
        the decision (:meth:`wait_decided`), not for ALL_ACKED
        (:func:`evsim.protocol.before_log`).  ``epoch``: the host's :attr:`epoch` when the
        caller's own step ran (read under the lock, as in ``op``), for a step queued lazily:
        a commit of that epoch that failed since raises :class:`CommitError`."""
        with self.lock:
            if epoch is None:
                epoch = self.epoch
            res = self.result(trip_id)
            if res is None:
                ev = self._waiters.setdefault(trip_id, threading.Event())
        if res is None:
            try:
                ev.wait(timeout_s)
            finally:
                with self.lock:
                    self._waiters.pop(trip_id, None)
            res = self.result(trip_id)
        if res is None or not before_log(res):
            self.barrier(epoch)
        else:
            self.wait_decided(trip_id, epoch)
        return res


def _wake_on(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
    """Resolve an async waiter's future on its own loop (from any thread)."""
    with contextlib.suppress(RuntimeError):  # its loop has closed: the server is stopping
        loop.call_soon_threadsafe(_resolve, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
