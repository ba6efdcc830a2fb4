"""One engine for both consumer groups: ``dpe-ingest consume`` (the PostgreSQL sink) and
``dpe-ingest analytics``, exactly once whatever crashes when.

quix-streams' shape: the engine owns the poll loop, the rebalances, the offsets stored with what is
written, the pipelining, the stop and its grace period, the waits while the database is down, the lag,
the metrics it shares and the crash points; an application (a subclass) only says how a message is
read (:meth:`GroupConsumer.parse`) and what a batch writes in which transaction
(:meth:`GroupConsumer.write`).  The protocol (docs/consumer.md has the reasoning):

1. on assignment, each partition is positioned where the DATABASE says (the next offset per partition
   stored with the data); for a partition it does not know yet, the sink alone falls back to the
   group's Kafka offset of an earlier version (``LEGACY_KAFKA_OFFSETS``), then the beginning;
2. messages are polled into a batch until it is full or ``BATCH_IDLE_MS`` passed without a new one;
   each is parsed: what cannot be written is a refusal of the batch (a dead letter, a skip), never a
   crash;
3. the batch goes to the writer thread, which writes it AND moves its partitions' offsets in ONE
   database transaction, only if the stored offsets are still where the batch started (else
   :class:`Stale`, nothing written: the batch was written already, before a crash or by another
   member); while the database is down it retries the same batch with capped exponential backoff;
4. meanwhile the main thread fetches and parses the next batch (never more than one in flight);
5. the group's Kafka offsets are committed asynchronously from the stored ones: advisory, for lag and
   ``dpe-ingest status``, never read back for a partition the database knows.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from . import logs, metrics
from . import kafka_consumer as kc
from .config import ConfigError, GroupConfig, metrics_port
from .kafka_security import access_error
from .pg_connection import safe_url
from .writer_thread import WriterThread

PROGRESS_EVERY_S = 10.0
#: the Kafka group offsets (advisory) are committed at most this often, and at exit
KAFKA_COMMIT_EVERY_S = 1.0
#: the metadata of the group's Kafka offsets the engine commits: they only mirror the database's
#: offsets.  A committed offset WITHOUT it was written by a version that kept its positions in Kafka
#: (the table already holds the rows before it): the one case where a Kafka offset positions a partition.
KAFKA_MIRROR_METADATA = "dpe-ingest: mirror of dpe_ingest_offsets"
#: messages taken from kafka-python per poll (each poll is a round trip to its network thread); the
#: ones beyond the current batch wait in memory, in order, for the next one
POLL_RECORDS = 500
#: with no message for this long, the main loop asks Kafka for an end offset (at most this often, waiting at
#: most KAFKA_PROBE_TIMEOUT_MS): an idle topic and a broker gone look the same to poll() otherwise
KAFKA_PROBE_S = 4.0
KAFKA_PROBE_TIMEOUT_MS = 2000
#: /readyz asks PostgreSQL (a connection of its own, this connect timeout) at most this often
DB_CHECK_EVERY_S = 2.0
DB_CHECK_TIMEOUT_S = 3


def no_crash(point: str, batches_done: int) -> None:
    """Called at each crash point with the batches written so far: does nothing.  No setting changes
    it; only a test hands an application another hook (tests/crashing.py: SIGKILL at a point)."""


def backoff(attempt: int, cap_s: float) -> float:
    """Seconds to wait before attempt ``attempt + 1``: 0.5 s doubling, at most ``cap_s``."""
    return min(cap_s, 0.5 * (2 ** min(attempt, 20)))


def main_of(parser, argv: list[str] | None, read_config: Callable, make_app: Callable, log: logging.Logger,
            what: str, other: Callable | None = None) -> int:
    """``main()`` of a consumer command: its options, the logs, its settings (exit 2 naming what is
    wrong), then ``other(args, config)``'s exit code if it has one, else ``make_app(config, args)`` run
    as a service (:func:`dpe_ingest.metrics.run_service`)."""
    args = parser.parse_args(argv)
    logs.setup()
    if args.exit_when_idle is not None and args.exit_when_idle <= 0:
        print(f"{parser.prog}: --exit-when-idle must be > 0 seconds", file=sys.stderr)
        return 2
    try:
        cfg, port = read_config(), metrics_port()
    except ConfigError as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 2
    code = other(args, cfg) if other is not None else None
    if code is not None:
        return code
    return metrics.run_service(make_app(cfg, args), port, parser.prog, what, log)


class Abandon(Exception):
    """Shutting down and the grace period is over: leave the batch unwritten (it will be read again)."""


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or the connection broke: retry later with the same batch."""


class Stale(Exception):
    """The database's offsets are not where the batch starts, for these partitions: it was written
    already (before a crash, or by another member of the group).  Nothing was written."""

    def __init__(self, stored: dict[int, int | None]):
        super().__init__(f"batch not at the stored offsets: {stored}")
        self.stored = stored  # partition -> stored next offset (None: no row)


@dataclass(frozen=True)
class OffsetClaim:
    """A batch's place in the topic: for each partition, the offset its reading started from (where
    the previous batch ended, or where the partition was positioned) and the next offset after it."""

    group: str
    topic: str
    ranges: dict[int, tuple[int, int]]  # partition -> (start, next)


@dataclass(frozen=True)
class Refused:
    """What :meth:`GroupConsumer.parse` returns for a message that is not written as a row (a dead
    letter for the sink, a skip reason for the analytics): it still moves the offsets of its batch."""

    what: Any


# ---------------------------------------------------------------------------------------------
# the in-memory batch
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    rows: dict[TopicPartition, list] = field(default_factory=dict)
    dead: dict[TopicPartition, list] = field(default_factory=dict)
    #: per partition: the offset reading this batch began from (the previous batch's end, or where the
    #: partition was positioned) and the offset after its last message
    start: dict[TopicPartition, int] = field(default_factory=dict)
    next: dict[TopicPartition, int] = field(default_factory=dict)
    count: int = 0
    first_at: float = 0.0

    def _seen(self, tp: TopicPartition, offset: int, start: int) -> None:
        if self.count == 0:
            self.first_at = time.monotonic()
        self.count += 1
        self.start.setdefault(tp, start)
        self.next[tp] = max(offset + 1, self.next.get(tp, 0))

    def add_row(self, tp: TopicPartition, row, start: int, offset: int | None = None) -> None:
        self._seen(tp, row.offset if offset is None else offset, start)
        self.rows.setdefault(tp, []).append(row)

    def add_dead(self, tp: TopicPartition, offset: int, letter, start: int) -> None:
        self._seen(tp, offset, start)
        self.dead.setdefault(tp, []).append(letter)

    def drop(self, tps) -> int:
        """Forget the messages of these partitions; returns how many."""
        n = 0
        for tp in list(tps):
            n += len(self.rows.pop(tp, [])) + len(self.dead.pop(tp, []))
            self.start.pop(tp, None)
            self.next.pop(tp, None)
        self.count -= n
        return n

    def claim(self, group: str, topic: str) -> OffsetClaim:
        return OffsetClaim(group, topic, {tp.partition: (self.start[tp], self.next[tp]) for tp in self.start})

    def all_rows(self) -> list:
        return [r for rows in self.rows.values() for r in rows]

    def all_dead(self) -> list:
        return [d for ds in self.dead.values() for d in ds]


@dataclass
class Written:
    """What the writer thread did with one batch (``result``: what the application's write returned)."""

    batch: Batch
    result: Any
    #: partitions whose stored offset was not where the batch started: {partition: stored next offset}
    stale: dict[int, int | None] = field(default_factory=dict)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------
# the engine
# ---------------------------------------------------------------------------------------------
class GroupConsumer:
    """A member of one consumer group that writes its topic in batches with their offsets.

    A subclass sets ``log``, ``NAME`` (in the Kafka client id and the log lines), ``CRASH_POINTS`` and
    ``LEGACY_KAFKA_OFFSETS``, and provides :meth:`open_store`, :meth:`parse`, :meth:`write`,
    :meth:`written`, :meth:`start_line`, :meth:`stop_line` and :meth:`progress_line`."""

    log = logging.getLogger("dpe_ingest.group_consumer")
    NAME = "consumer"
    CRASH_POINTS: tuple[str, ...] = ()
    #: a partition the database does not know starts at the group's Kafka offset when an earlier version
    #: (positions kept in Kafka) committed it; else, and always when False, at the beginning
    LEGACY_KAFKA_OFFSETS = False

    def __init__(self, cfg: GroupConfig, metrics, *, batch_size: int | None = None,
                 exit_when_idle_s: float | None = None, shutdown_timeout_s: float = 20.0,
                 crash: Callable[[str, int], None] | None = None, store=None):
        self.cfg = cfg
        self.metrics = metrics  # served on /metrics by metrics.run_service when METRICS_PORT is set
        self.batch_size = batch_size or cfg.batch_size
        self.exit_when_idle_s = exit_when_idle_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.crash = crash or no_crash
        self.store = store or self.open_store()  # the writer thread's connection
        self.reader = None  # the main thread's connection (stored offsets, reads)
        self.consumer = None
        self.writer: WriterThread | None = None
        self.batch = Batch()
        self.pending: deque = deque()  # (tp, message) polled, not in a batch yet
        self.in_flight_messages = 0  # messages of the batch handed to the writer thread
        self.written_batches = 0  # batches written and collected (the crash hook counts these)
        # where the next message of each positioned partition is read from; a partition assigned but
        # not positioned from the database yet is in ``unsynced`` (its messages are not used)
        self.read_pos: dict[TopicPartition, int] = {}
        self.unsynced: set[TopicPartition] = set()
        self.to_commit: dict[TopicPartition, int] = {}  # stored offsets of the assigned partitions, for Kafka
        self.last_kafka_commit = 0.0
        self.kafka_commit_due = False
        self.stale_batches = 0
        self.totals: Counter = Counter()  # "batches" written, and what the application counts
        self.started = time.monotonic()
        self.stop_at: float | None = None  # monotonic deadline once a stop signal arrived
        self.last_message_at = time.monotonic()
        self.last_progress_at = time.monotonic()
        self.need_migrate = True
        self.joined = False  # the group assigned us partitions (possibly none) at least once
        # what the probes read (/livez, /readyz: metrics.serve's threads) and the outage lines
        self.loop_at = time.monotonic()  # the main thread last turned its loop (or a wait's)
        self.batch_since: float | None = None  # the batch in flight was handed to the writer then
        self.assigned_text = ""
        self.db_outage = logs.Outage(self.log, "db", "PostgreSQL", safe_url(cfg.database_url))
        self.kafka_outage = logs.Outage(self.log, "kafka", "Kafka", cfg.kafka.bootstrap_servers)
        self.kafka_ok_at = time.monotonic()  # Kafka last answered (messages, a probe)
        self.kafka_probe_at = 0.0
        self._db_check: tuple[float, bool, str] = (float("-inf"), False, "")

    # -- what an application provides ------------------------------------------------------------
    def open_store(self):
        """A new database connection object: ``migrate()``, ``stored_offsets(group, topic)``, ``close()``
        and whatever :meth:`write` uses.  Connection problems raise :class:`DatabaseUnavailable`."""
        raise NotImplementedError

    def parse(self, msg):
        """One Kafka message: its row, or :class:`Refused`."""
        raise NotImplementedError

    def write(self, store, batch: Batch, claim: OffsetClaim, crash: Callable[[str], None]):
        """Write ``batch`` and move ``claim`` in ONE transaction of ``store`` (on the writer thread);
        raise :class:`Stale` when the claim does not hold.  ``crash(point)`` is the crash hook."""
        raise NotImplementedError

    def written(self, w: Written) -> None:
        """A batch some partitions of which were written (main thread): totals, metrics, its log line."""

    def ready(self) -> None:
        """The tables are migrated (main thread, before Kafka)."""

    def tick(self) -> None:
        """Once per turn of the main loop (main thread)."""

    # and the lines ``start_line()``, ``stop_line(reason)``, ``progress_line(interval_s, lag)``

    # -- signals -------------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self.stop_at is not None

    @property
    def in_flight(self) -> bool:
        return self.writer is not None and self.writer.busy

    def request_stop(self, signum=None, _frame=None) -> None:
        name = signal.Signals(signum).name if signum else "stop"
        if self.stop_at is None:
            self.stop_at = time.monotonic() + self.shutdown_timeout_s
            logs.event(self.log, "stopping", f"{name}: writing the current batch, then exiting",
                       signal=name, batch_rows=self.batch.count, grace_s=self.shutdown_timeout_s)
        else:
            self.stop_at = time.monotonic()  # a second signal: give up the wait now
            logs.event(self.log, "stopping", f"second {name}: exiting without waiting", logging.WARNING, signal=name)

    def _check_deadline(self, *, idle_exits: bool = True) -> None:
        """Raise :class:`Abandon` once stopping and either the grace period is over or (``idle_exits``)
        there is nothing in flight to save (e.g. a signal while still waiting for the database at start)."""
        if self.stop_at is None:
            return
        idle = idle_exits and not self.in_flight and self.batch.count == 0
        if idle or time.monotonic() >= self.stop_at:
            raise Abandon()

    def _sleep(self, seconds: float) -> None:
        """The writer thread's wait between attempts: cut short by the end of the grace period."""
        end = time.monotonic() + seconds
        while True:
            self._check_deadline(idle_exits=False)
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.2))

    # -- rebalance listener (kafka-python calls it while our poll() waits): no I/O here ------------
    def on_partitions_revoked(self, revoked) -> None:
        revoked = set(revoked)
        dropped = self.batch.drop(revoked) + self._drop_pending(revoked)
        for tp in revoked:
            self.read_pos.pop(tp, None)
            self.to_commit.pop(tp, None)
        self.unsynced -= revoked
        self.assigned_text = ""
        # a batch of these partitions being written goes on: the database's offsets decide, for it and
        # for the next owner's first batch, which one is written
        if revoked:
            logs.event(self.log, "partitions_revoked", f"partitions revoked: {kc.partitions_text(revoked)}; "
                       f"{dropped} unwritten message(s) left to the next owner",
                       partitions=kc.partitions_text(revoked), dropped=dropped, writing=self.in_flight)

    def _drop_pending(self, tps) -> int:
        before = len(self.pending)
        if before:
            self.pending = deque(item for item in self.pending if item[0] not in tps)
        return before - len(self.pending)

    def on_partitions_assigned(self, assigned) -> None:
        assigned = set(assigned)
        self.joined = True
        self.assigned_text = kc.partitions_text(assigned)
        # positioned from the database by the main loop (_sync) before any of their messages is used
        self.unsynced |= assigned
        if assigned and self.consumer is not None:
            self.consumer.pause(*assigned)
        self.last_message_at = time.monotonic()  # --exit-when-idle: give new partitions a full idle period
        logs.event(self.log, "partitions_assigned", f"partitions assigned: {kc.partitions_text(assigned) or 'none'}",
                   partitions=kc.partitions_text(assigned))

    # -- waiting while something is down or busy --------------------------------------------
    def _keepalive(self, seconds: float) -> None:
        """Wait ``seconds`` while staying a live member of the group: poll with every partition paused
        (rebalance callbacks run; the messages of a paused partition are not returned).  The main loop
        resumes them before its next poll."""
        end = time.monotonic() + seconds
        while True:
            self._check_deadline()
            self._watch()
            left = end - time.monotonic()
            if left <= 0:
                return
            if self.consumer is None:
                time.sleep(min(left, 0.5))
                continue
            self._poll_paused(min(left, 1.0))

    def _poll_paused(self, seconds: float) -> None:
        assigned = self.consumer.assignment()
        if assigned:
            self.consumer.pause(*assigned)
        try:
            records = self.consumer.poll(timeout_ms=int(seconds * 1000) or 1, max_records=1)
        except KafkaError as exc:
            logs.event(self.log, "kafka_error", f"poll while waiting: {exc}", logging.WARNING,
                       error=logs.short_error(exc))
            time.sleep(min(seconds, 0.5))
            return
        for tp, msgs in records.items():  # paused: should not happen; never use them out of place
            if tp in self.read_pos and tp not in self.unsynced:
                self._seek(tp, msgs[0].offset)

    def _resume(self) -> None:
        """Fetch again what a wait paused (the unsynced stay paused until positioned)."""
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*(set(paused) - self.unsynced))

    def _seek(self, tp: TopicPartition, offset: int) -> bool:
        try:
            self.consumer.seek(tp, offset)
            return True
        except Exception as exc:  # noqa: BLE001 - no longer assigned (a rebalance meanwhile)
            logs.event(self.log, "seek_skipped", f"not positioning {kc.partitions_text([tp])}: "
                       f"{logs.short_error(exc)}", logging.DEBUG)
            return False

    def _retry(self, fn: Callable, what: str, errors: tuple, down: str, wait: Callable[[float], None],
               idle_exits: bool, fields: Callable[[], dict] = dict):
        """``fn()``, again after a capped backoff while it raises one of ``errors`` (each logged as
        ``<down>_unavailable``, or ``db_error`` for a database error that is not a connection problem);
        while the backoff lasts, ``<down>_waiting`` at least every 10 s (:class:`dpe_ingest.logs.Outage`),
        and ``<down>_recovered`` once ``fn()`` succeeds after a failure."""
        outage = self.db_outage if down == "db" else self.kafka_outage
        attempt = 0
        while True:
            self._check_deadline(idle_exits=idle_exits)
            try:
                result = fn()
                if attempt or outage.down:
                    outage.recovered(what, attempts=attempt)
                return result
            except errors as exc:
                refused = access_error(exc, self.cfg.kafka.security, what,
                                       f"topic {self.cfg.kafka.topic} / group {self.cfg.group}") if down == "kafka" else None
                if refused is not None:  # a missing ACL: waiting would not grant it (exit 2)
                    raise refused from exc
                pause = backoff(attempt, self.cfg.retry_max_backoff_s)
                error = logs.short_error(exc)
                if down == "db" and not isinstance(exc, DatabaseUnavailable):
                    # not a connection problem (table dropped, permissions, …): migrate again and retry
                    self.need_migrate = True
                    outage.failed(what, error, detail=f"; retrying in {pause:.1f}s", level=logging.ERROR,
                                  event_name="db_error", attempt=attempt + 1, retry_in=round(pause, 1), **fields())
                else:
                    outage.failed(what, error, detail=f"; retrying in {pause:.1f}s"
                                  + (" (batch kept)" if down == "db" else ""),
                                  attempt=attempt + 1, retry_in=round(pause, 1), **fields())
            attempt += 1
            end = time.monotonic() + pause
            while (left := end - time.monotonic()) > 0:  # in slices: a line at least every 10 s
                wait(min(left, 1.0))
                outage.waiting(what, **fields())

    def db_call(self, fn: Callable, what: str, store=None, on_writer: bool = False, batch_rows: int | None = None):
        """``fn()``, retried while the database is unavailable (migrating first when needed).  Between
        attempts the main thread keeps the group alive (:meth:`_keepalive`); the writer thread sleeps."""
        import psycopg2

        store = store or self.store

        def attempt():
            if self.need_migrate:
                store.migrate()
                self.need_migrate = False
            return fn()

        rows = self.batch.count if batch_rows is None else batch_rows
        return self._retry(attempt, what, (DatabaseUnavailable, psycopg2.Error), "db",
                           self._sleep if on_writer else self._keepalive, not on_writer,
                           lambda: {"batch_rows": rows})

    def _kafka_call(self, fn: Callable, what: str):
        return self._retry(fn, what, (KafkaError, OSError), "kafka", self._keepalive, True)

    def _reader(self):
        if self.reader is None:
            self.reader = self.open_store()
        return self.reader

    def _connect_kafka(self) -> None:
        k = self.cfg.kafka
        created = self._kafka_call(lambda: kc.ensure_topics(k), "topic check")
        if created:
            logs.event(self.log, "topics_created", f"created topics {','.join(created)}", topics=",".join(created))
        self.consumer = self._kafka_call(lambda: kc.make_consumer(
            k, self.cfg.group, self.batch_size, client_id=f"dpe-ingest-{self.NAME}-{self.cfg.group}"),
            "consumer connect")
        self.consumer.subscribe([k.topic], listener=kc.RebalanceListener(self))

    # -- positions -----------------------------------------------------------------------------
    def _sync(self) -> None:
        """Position the newly assigned partitions where the database says (see LEGACY_KAFKA_OFFSETS for
        the others), once no batch is being written (it may move those offsets)."""
        self._drain()
        todo = set(self.unsynced)
        if not todo:
            return
        reader = self._reader()
        stored = self.db_call(lambda: reader.stored_offsets(self.cfg.group, self.cfg.kafka.topic),
                              "stored offsets read", store=reader)
        todo &= self.unsynced  # a rebalance while reading may have taken some away
        unknown = [tp for tp in todo if tp.partition not in stored]
        fallback: dict[TopicPartition, int] = {}
        if unknown:
            def kafka_positions():
                # from the group's Kafka offset only if an earlier version (positions kept in Kafka)
                # committed it; a mirror of ours means the database lost or dropped the offsets (and
                # what was written with them, same transactions): from the beginning
                legacy = {}
                if self.LEGACY_KAFKA_OFFSETS:
                    committed = {tp: self.consumer.committed(tp, metadata=True) for tp in unknown}
                    legacy = {tp: c.offset for tp, c in committed.items()
                              if c is not None and c.offset >= 0 and c.metadata != KAFKA_MIRROR_METADATA}
                rest = [tp for tp in unknown if tp not in legacy]
                begin = self.consumer.beginning_offsets(rest) if rest else {}
                return {**begin, **legacy}
            fallback = self._kafka_call(kafka_positions, "group offsets read")
        todo &= self.unsynced
        where = {}
        for tp in todo:
            offset = stored.get(tp.partition, fallback.get(tp))
            if self._seek(tp, offset):
                self.read_pos[tp] = offset
                where[tp] = offset
                if tp.partition in stored:  # the group's Kafka offset may be behind (advisory, async)
                    self.to_commit[tp] = offset
                    self.kafka_commit_due = True
        self.unsynced -= todo
        if where:
            self.consumer.resume(*where)
            new = sorted(tp.partition for tp in where if tp.partition not in stored)
            legacy = "an earlier version's group offset, else " if self.LEGACY_KAFKA_OFFSETS else ""
            logs.event(self.log, "positioned", "partitions positioned at the offsets stored with the data: "
                       + ", ".join(f"{tp.partition}@{o}" for tp, o in sorted(where.items(), key=lambda i: i[0].partition))
                       + (f" (not in the database yet: {','.join(map(str, new))}; from {legacy}the beginning)"
                          if new else ""),
                       partitions=kc.partitions_text(todo))

    def _add(self, tp: TopicPartition, msg) -> None:
        start = self.read_pos[tp]
        self.read_pos[tp] = msg.offset + 1
        got = self.parse(msg)
        if isinstance(got, Refused):
            self.batch.add_dead(tp, msg.offset, got.what, start)
        else:
            self.batch.add_row(tp, got, start, msg.offset)

    # -- one batch, on the writer thread ----------------------------------------------------------
    def _write(self, batch: Batch) -> Written:
        """Write ``batch`` with its offsets; retried until done (or the grace period ends).  Partitions
        the database says were written already are dropped from ``batch`` (``Written.stale`` says which):
        what is left in it is what was written."""
        started = time.monotonic()
        done = self.written_batches
        topic = self.cfg.kafka.topic
        stale: dict[int, int | None] = {}
        result = None
        while True:
            claim = batch.claim(self.cfg.group, topic)
            if not claim.ranges:
                break
            try:
                result = self.db_call(lambda: self.write(self.store, batch, claim, lambda p: self.crash(p, done)),
                                      "batch write", on_writer=True, batch_rows=batch.count)
                break
            except Stale as exc:
                stale.update(exc.stored)
                batch.drop(TopicPartition(topic, p) for p in exc.stored)
        if claim.ranges:
            self.crash("after_db_commit", done)
        return Written(batch, result, stale, time.monotonic() - started)

    # -- batches, on the main thread --------------------------------------------------------------
    def _submit(self) -> None:
        """Hand the current batch to the writer thread (which must be free) and start a new one."""
        batch, self.batch = self.batch, Batch()
        self.in_flight_messages = batch.count
        self.batch_since = time.monotonic()
        if self.writer is None:
            self.writer = WriterThread()
        self.writer.submit(lambda: self._write(batch))

    def _collect(self, timeout: float = 0.0) -> bool:
        """Take the outcome of the batch written meanwhile, if any (waiting up to ``timeout``)."""
        if self.writer is None:
            return False
        ok, w = self.writer.collect(timeout)  # (re-raises the writer's Abandon: in_flight_messages stays)
        if not ok:
            return False
        self.in_flight_messages = 0
        self.batch_since = None
        self.db_outage.recovered("batch write")  # (a line only if the batch was said to be waiting)
        self.written_batches += 1
        if w.stale:
            self._after_stale(w)
        assigned = self.consumer.assignment() if self.consumer is not None else set()
        for tp, off in w.batch.next.items():
            if tp in assigned:
                self.to_commit[tp] = max(off, self.to_commit.get(tp, 0))
                self.kafka_commit_due = True
        if w.batch.start:  # some partition of it was written
            self.totals["batches"] += 1
            self.written(w)
            self.metrics.committed()
            self.metrics.lag.set(self.lag_by_partition())
        self._commit_kafka()
        return True

    def _after_stale(self, w: Written) -> None:
        """Some partitions of the batch were written already (by us before a restart, or by another
        member of the group): read them again from where the database says."""
        self.stale_batches += 1
        for p, stored in w.stale.items():
            tp = TopicPartition(self.cfg.kafka.topic, p)
            if tp not in self.read_pos:
                continue  # not ours any more
            self.batch.drop([tp])  # what follows the stale messages is not where the database is either
            self._drop_pending([tp])
            if stored is None:
                self.unsynced.add(tp)
                self.consumer.pause(tp)
                continue
            if self._seek(tp, stored):
                self.read_pos[tp] = stored
        logs.event(self.log, "stale_batch", "the database's offsets are past this batch (it was written already, "
                   "by a previous run or another member): re-reading from the stored offsets, nothing written twice",
                   logging.WARNING, stored=",".join(f"{p}@{o}" for p, o in sorted(w.stale.items())))

    def _commit_kafka(self, force: bool = False) -> None:
        """The group's Kafka offsets follow the stored ones, asynchronously: for lag, Kafdrop and
        ``dpe-ingest status``; the engine itself positions from the database."""
        if not self.kafka_commit_due or self.consumer is None:
            return
        now = time.monotonic()
        if not force and now - self.last_kafka_commit < KAFKA_COMMIT_EVERY_S:
            return
        offsets = {tp: OffsetAndMetadata(off, KAFKA_MIRROR_METADATA, -1) for tp, off in self.to_commit.items()}
        self.last_kafka_commit = now
        self.kafka_commit_due = False
        try:
            if force:
                self.consumer.commit(offsets, timeout_ms=5000)
            else:
                self.consumer.commit_async(offsets, callback=self._commit_done)
        except Exception as exc:  # noqa: BLE001 - advisory: the database holds the truth
            self._commit_done(offsets, exc, logging.WARNING if force else logging.DEBUG)

    def _commit_done(self, offsets, response, level: int = logging.DEBUG) -> None:
        if isinstance(response, Exception):
            logs.event(self.log, "kafka_commit_failed", f"Kafka offset commit failed (advisory, the offsets are "
                       f"stored with the data): {logs.short_error(response)}", level,
                       error=logs.short_error(response))

    def _due_at(self) -> float:
        """When the partial batch in memory is to be written: BATCH_IDLE_MS after the last message, or
        once it is older than max(10 x BATCH_IDLE_MS, 5 s) (monotonic clock)."""
        idle_s = self.cfg.batch_idle_ms / 1000.0
        return min(self.last_message_at + idle_s, self.batch.first_at + max(10 * idle_s, 5.0))

    def _ready(self) -> bool:
        """The batch should be written now (full, idle, or old)."""
        if not self.batch.count:
            return False
        return self.batch.count >= self.batch_size or time.monotonic() >= self._due_at()

    def _drain(self) -> None:
        """Wait for the batch in flight (keeping the group alive)."""
        while self.in_flight:
            self._watch()
            if not self._collect(timeout=0.5) and self.in_flight:
                self._check_deadline()
                self._poll_paused(0.01)

    # -- health: what the loop watches, what /livez and /readyz answer ---------------------------
    def _watch(self) -> None:
        """Each turn of the main thread (its loop, or a wait): the loop is alive; a batch in flight for
        10 s or more is said to wait for PostgreSQL (a line at least every 10 s); Kafka is asked whether it
        answers when no message came for a while (a line at least every 10 s while it does not)."""
        now = self.loop_at = time.monotonic()
        since = self.batch_since
        if since is not None and now - since >= logs.WAIT_LOG_S:
            self.db_outage.waiting("batch commit", since=since, batch_rows=self.in_flight_messages)
        self._probe_kafka(now)

    def _probe_kafka(self, now: float) -> None:
        if self.consumer is None or self.stopping:
            return
        if now - self.kafka_ok_at < KAFKA_PROBE_S or now - self.kafka_probe_at < KAFKA_PROBE_S:
            return
        try:
            self.consumer.end_offsets([TopicPartition(self.cfg.kafka.topic, 0)], timeout_ms=KAFKA_PROBE_TIMEOUT_MS)
        except (KafkaError, OSError) as exc:
            self.kafka_probe_at = time.monotonic()
            # a line per failed probe (about every KAFKA_PROBE_S + its timeout), and at least every 10 s
            self.kafka_outage.failed("poll", logs.short_error(exc), since=self.kafka_ok_at,
                                     min_gap_s=KAFKA_PROBE_S + 1.0,
                                     detail=" (no answer to an end-offset request; kafka-python retries)")
            self.kafka_outage.waiting("poll")
            return
        self.kafka_ok_at = self.kafka_probe_at = time.monotonic()
        self.kafka_outage.recovered("poll")

    def livez(self) -> tuple[bool, str]:
        """/livez: the main loop turned within LIVENESS_STALL_S and the batch in flight (if any) is younger
        than BATCH_COMMIT_TIMEOUT_S.  Read from another thread: only plain attributes."""
        now = time.monotonic()
        stalled = now - self.loop_at
        if stalled > self.cfg.liveness_stall_s:
            return False, (f"the poll loop has not turned for {stalled:.0f}s "
                           f"(LIVENESS_STALL_S={self.cfg.liveness_stall_s:g})")
        since = self.batch_since
        if since is not None and now - since > self.cfg.batch_commit_timeout_s:
            return False, (f"the batch in flight ({self.in_flight_messages} messages) has not committed for "
                           f"{now - since:.0f}s (BATCH_COMMIT_TIMEOUT_S={self.cfg.batch_commit_timeout_s:g})")
        batch = "" if since is None else f"; batch in flight for {now - since:.1f}s"
        return True, f"the poll loop turned {stalled:.1f}s ago{batch}"

    def readyz(self) -> tuple[bool, str]:
        """/readyz: a member of the group (its assignment received; an empty one when the group has more
        members than partitions), Kafka answering, and PostgreSQL answering a query now."""
        if self.stopping:
            return False, "stopping"
        if not self.joined:
            return False, "not a member of the consumer group yet (no assignment received)"
        if self.kafka_outage.down:
            return False, f"Kafka at {self.cfg.kafka.bootstrap_servers} not answering for {self.kafka_outage.waited():.0f}s"
        ok, why = self.db_answers()
        if not ok:
            return False, f"PostgreSQL at {safe_url(self.cfg.database_url)} does not answer: {why}"
        return True, f"assigned: {self.assigned_text or 'none'}; PostgreSQL answers"

    def db_answers(self) -> tuple[bool, str]:
        """PostgreSQL answers ``SELECT 1`` on a connection of its own (connect timeout DB_CHECK_TIMEOUT_S),
        asked at most every DB_CHECK_EVERY_S (the answer is kept meanwhile)."""
        at, ok, why = self._db_check
        if time.monotonic() - at < DB_CHECK_EVERY_S:
            return ok, why
        from . import pg_connection

        try:
            conn = pg_connection.connect(self.cfg.database_url, connect_timeout=DB_CHECK_TIMEOUT_S)
            try:
                with conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    cur.fetchone()
            finally:
                conn.close()
            ok, why = True, ""
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; the reason is shown
            ok, why = False, logs.short_error(exc, 200)
        self._db_check = (time.monotonic(), ok, why)
        return ok, why

    # -- lag / progress ------------------------------------------------------------------------
    def lag(self) -> int | None:
        """Messages behind the last known end of the assigned partitions (None if unknown)."""
        per = self.lag_by_partition()
        return sum(per.values()) if per else None

    def lag_by_partition(self) -> dict[tuple[str, int], int] | None:
        """{(topic, partition): messages behind the last known end} of the positioned partitions, from
        the engine's own read positions (None when not known at all)."""
        if self.consumer is None:
            return None
        out = {}
        try:
            for tp, pos in list(self.read_pos.items()):
                hw = self.consumer.highwater(tp)
                if hw is not None:
                    out[(tp.topic, tp.partition)] = max(0, hw - pos)
        except Exception:  # noqa: BLE001 - a figure for metrics and logs only
            return None
        return out or None

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress_at < PROGRESS_EVERY_S:
            return
        interval = max(now - self.last_progress_at, 1e-6)
        self.last_progress_at = now
        per = self.lag_by_partition()
        self.metrics.lag.set(per)
        self.progress_line(interval, sum(per.values()) if per else None)

    def _idle_done(self) -> bool:
        """True when --exit-when-idle applies: nothing in flight, nothing new for that long, and the
        database's offsets reach the end of every assigned partition."""
        if self.exit_when_idle_s is None or self.batch.count or self.pending or self.in_flight or self.unsynced:
            return False
        if time.monotonic() - self.last_message_at < self.exit_when_idle_s:
            return False
        if not self.joined:
            return False
        assigned = self.consumer.assignment()
        if not assigned:
            return True  # the group gave us nothing to do (more consumers than partitions)
        try:
            ends = self.consumer.end_offsets(list(assigned), timeout_ms=10000)
            stored = self._reader().stored_offsets(self.cfg.group, self.cfg.kafka.topic)
        except Exception as exc:  # noqa: BLE001
            logs.event(self.log, "kafka_error", f"idle check: {logs.short_error(exc)}", logging.WARNING,
                       error=logs.short_error(exc))
            self.last_message_at = time.monotonic()
            return False
        behind = {tp: end for tp, end in ends.items() if end > stored.get(tp.partition, self.read_pos.get(tp, 0))}
        if behind:
            self.last_message_at = time.monotonic()  # check again after another idle period
            return False
        return True

    # -- main loop -----------------------------------------------------------------------------
    def _step(self) -> None:
        """One turn of the main loop: collect, position, hand over, fetch."""
        self._collect()
        if self.unsynced:
            self._sync()
        if self._ready() and not self.in_flight:
            self._submit()
        room = self.batch_size - self.batch.count
        if room <= 0:
            # full, and the previous batch still being written: wait for it (the group stays alive)
            if not self._collect(timeout=0.5) and self.in_flight:
                self._poll_paused(0.01)
            return
        if self.pending:
            self._take(room)
            return
        self._resume()
        wait = self._due_at() - time.monotonic() if self.batch.count else 1.0
        if self.in_flight:
            wait = min(wait, 0.05)  # come back soon to hand over the next batch
        wait = max(0.0, min(wait, 1.0))
        try:
            records = self.consumer.poll(timeout_ms=int(wait * 1000), max_records=max(room, POLL_RECORDS))
        except KafkaError as exc:
            refused = access_error(exc, self.cfg.kafka.security, "READ (poll)",
                                   f"topic {self.cfg.kafka.topic} / group {self.cfg.group}")
            if refused is not None:  # a missing ACL: waiting would not grant it (exit 2)
                raise refused from exc
            logs.event(self.log, "kafka_error", f"poll failed: {logs.short_error(exc)}", logging.WARNING,
                       error=logs.short_error(exc))
            time.sleep(1.0)
            records = {}
        if records:
            self.last_message_at = self.kafka_ok_at = time.monotonic()
            if self.kafka_outage.down:
                self.kafka_outage.recovered("poll")
            n = 0
            for tp, msgs in records.items():
                if tp not in self.read_pos or tp in self.unsynced:
                    continue  # not positioned from the database yet: read again once it is
                n += len(msgs)
                self.pending.extend((tp, m) for m in msgs)
            self._take(room)
            if self.log.isEnabledFor(logging.DEBUG):
                logs.event(self.log, "polled", "polled messages", logging.DEBUG, messages=n, batch=self.batch.count,
                           pending=len(self.pending))

    def _take(self, room: int) -> None:
        """Move up to ``room`` polled messages into the batch, in order."""
        pending = self.pending
        for _ in range(min(room, len(pending))):
            tp, m = pending.popleft()
            self._add(tp, m)
        if self.batch.count:
            self.crash("after_poll", self.written_batches)  # polled into a batch, nothing of it written

    def run(self) -> int:
        self.start_line()
        reason = "signal"
        try:
            self.db_call(lambda: None, "migration")
            self.ready()
            self._connect_kafka()
            while not self.stopping:
                self._watch()
                self._step()
                self._commit_kafka()
                self.tick()
                self._progress()
                if self._idle_done():
                    reason = "idle"
                    logs.event(self.log, "idle", f"topic idle for {self.exit_when_idle_s:.0f}s and fully written: "
                               "exiting", idle_s=self.exit_when_idle_s)
                    break
            # graceful stop: finish the batch in flight, write the one in memory, leave the group
            self._drain()
            if self.batch.count:
                self._submit()
                self._drain()
            self._commit_kafka(force=True)
        except Abandon:
            unwritten = self.batch.count + self.in_flight_messages
            if unwritten:
                logs.event(self.log, "abandoned", f"grace period over: {unwritten} message(s) left unwritten "
                           "(the next member reads them from the stored offsets)", logging.WARNING,
                           batch_rows=unwritten, writing=self.in_flight)
        finally:
            self.close()
        self._progress(force=True)
        self.stop_line(reason)
        return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False, timeout_ms=5000)
            except Exception as exc:  # noqa: BLE001
                logs.event(self.log, "kafka_error", f"closing the consumer: {logs.short_error(exc)}", logging.WARNING)
        if not self.in_flight:
            self.store.close()  # (a write still running on an abandoned batch keeps its connection)
        if self.reader is not None:
            self.reader.close()
