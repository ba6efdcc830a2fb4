"""``dpe-ingest consume``: the Kafka topic into the PostgreSQL table, in batches, exactly once.

The protocol (see docs/consumer.md for the reasoning):

1. on assignment, each partition is positioned where the DATABASE says (``dpe_ingest_offsets``, the
   next offset per group/topic/partition; the group's Kafka offset for a partition the database
   does not know yet, then the beginning of the partition);
2. messages (raw bytes) are polled into a batch until BATCH_SIZE are in memory or BATCH_IDLE_MS passed
   without a new one; each is validated: a bad one becomes a dead letter of the batch, never a crash;
3. the batch goes to the writer thread, which writes its rows AND moves its partitions' offsets in ONE
   database transaction, only if the stored offsets are still where the batch started (else nothing is
   written: the batch was written already, before a crash or by another member); its dead letters are
   sent (acks=all) before that transaction commits; while the database is down it retries the same
   batch with capped exponential backoff, never skipping it;
4. meanwhile the main thread fetches and decodes the next batch (never more than one batch in flight);
5. the Kafka group offsets are committed asynchronously from the stored ones: advisory, for lag and
   Kafdrop, never read back by the consumer itself.

A crash anywhere leaves the table and its offsets in step, so no batch is replayed into the table: each
message is written once (the idempotent upsert stays as a second line of defence).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from kafka import TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from . import deadletter, logs, metrics
from . import kafka_consumer as kc
from .config import ConfigError, ConsumerConfig, metrics_port
from .sink import DatabaseUnavailable, Invalid, OffsetClaim, Row, Sink, Stale, WriteResult, parse_message
from .writer_thread import WriterThread

log = logging.getLogger("dpe_ingest.consumer")

CRASH_POINTS = ("after_poll", "after_insert", "after_dlq_send", "after_db_commit")
PROGRESS_EVERY_S = 10.0
#: the Kafka group offsets (advisory) are committed at most this often, and at exit
KAFKA_COMMIT_EVERY_S = 1.0
#: the metadata of the group's Kafka offsets this consumer commits: they only mirror the database's
#: offsets.  A committed offset WITHOUT it was written by a version that kept its positions in Kafka
#: (the table already holds the rows before it): the one case where a Kafka offset positions a partition.
KAFKA_MIRROR_METADATA = "dpe-ingest: mirror of dpe_ingest_offsets"
#: messages taken from kafka-python per poll (each poll is a round trip to its network thread); the
#: ones beyond the current batch wait in memory, in order, for the next one
POLL_RECORDS = 500

Letter = tuple[bytes | None, bytes, list]


class Abandon(Exception):
    """Shutting down and the grace period is over: leave the batch unwritten (it will be read again)."""


# ---------------------------------------------------------------------------------------------
# the in-memory batch
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    rows: dict[TopicPartition, list[Row]] = field(default_factory=dict)
    dead: dict[TopicPartition, list[Letter]] = field(default_factory=dict)
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

    def add_row(self, tp: TopicPartition, row: Row, start: int) -> None:
        self._seen(tp, row.offset, start)
        self.rows.setdefault(tp, []).append(row)

    def add_dead(self, tp: TopicPartition, offset: int, letter: Letter, start: int) -> None:
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

    def all_rows(self) -> list[Row]:
        return [r for rows in self.rows.values() for r in rows]

    def all_dead(self) -> list[Letter]:
        return [d for ds in self.dead.values() for d in ds]

    def n_dead(self) -> int:
        return sum(len(d) for d in self.dead.values())


@dataclass
class Written:
    """What the writer thread did with one batch."""

    batch: Batch
    result: WriteResult
    dead_letters: int = 0
    #: partitions whose stored offset was not where the batch started: {partition: stored next offset}
    stale: dict[int, int | None] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class Totals:
    batches: int = 0
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    dead_letters: int = 0
    stale_batches: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, res: WriteResult, dead: int) -> None:
        self.batches += 1
        self.rows += res.rows
        self.inserted += res.inserted
        self.updated += res.updated
        self.unchanged += res.unchanged
        self.dead_letters += dead


# ---------------------------------------------------------------------------------------------
# crash points: a hook point, nothing more
# ---------------------------------------------------------------------------------------------
def no_crash(point: str, batches_done: int) -> None:
    """Called at each of CRASH_POINTS with the batches written so far: does nothing.  No setting
    changes it; only a test hands the Consumer another hook (tests/crashing.py: SIGKILL at a point)."""


# ---------------------------------------------------------------------------------------------
# the consumer
# ---------------------------------------------------------------------------------------------
class Consumer:
    def __init__(self, cfg: ConsumerConfig, *, exit_when_idle_s: float | None = None,
                 shutdown_timeout_s: float = 20.0, crash: Callable[[str, int], None] | None = None,
                 sink: Sink | None = None):
        self.cfg = cfg
        self.exit_when_idle_s = exit_when_idle_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.crash = crash or no_crash
        self.sink = sink or Sink(cfg.database_url, cfg.table)  # the writer thread's connection
        self.reader: Sink | None = None  # the main thread's connection (stored offsets)
        self.consumer = None
        self.producer = None
        self.writer: WriterThread | None = None
        self.batch = Batch()
        self.pending: deque = deque()  # (tp, message) polled, not in a batch yet
        self.in_flight_messages = 0  # messages of the batch handed to the writer thread
        self.written = 0  # batches written and collected (the crash hook counts these)
        # where the next message of each positioned partition is read from; a partition assigned but
        # not positioned from the database yet is in ``unsynced`` (its messages are not used)
        self.read_pos: dict[TopicPartition, int] = {}
        self.unsynced: set[TopicPartition] = set()
        self.to_commit: dict[TopicPartition, int] = {}  # stored offsets of the assigned partitions, for Kafka
        self.last_kafka_commit = 0.0
        self.kafka_commit_due = False
        self.totals = Totals()
        self.metrics = metrics.ConsumerMetrics()  # served on /metrics by main() when METRICS_PORT is set
        self.stop_at: float | None = None  # monotonic deadline once a stop signal arrived
        self.last_message_at = time.monotonic()
        self.last_progress_at = time.monotonic()
        self.rows_at_progress = 0  # totals.rows at the last progress line (its rate is since then)
        self.need_migrate = True
        self.joined = False  # the group assigned us partitions (possibly none) at least once

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
            logs.event(log, "stopping", f"{name}: writing the current batch, then exiting",
                       signal=name, batch_rows=self.batch.count, grace_s=self.shutdown_timeout_s)
        else:
            self.stop_at = time.monotonic()  # a second signal: give up the wait now
            logs.event(log, "stopping", f"second {name}: exiting without waiting", logging.WARNING, signal=name)

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

    # -- rebalance listener (kafka-python calls it while our poll() waits) ---------------------------
    def on_partitions_revoked(self, revoked) -> None:
        revoked = set(revoked)
        dropped = self.batch.drop(revoked) + self._drop_pending(revoked)
        for tp in revoked:
            self.read_pos.pop(tp, None)
            self.to_commit.pop(tp, None)
        self.unsynced -= revoked
        # a batch of these partitions being written goes on: the database's offsets decide, for it and
        # for the next owner's first batch, which one is written
        if revoked:
            logs.event(log, "partitions_revoked",
                       f"partitions revoked: {kc.partitions_text(revoked)}; {dropped} unwritten message(s) left to the next owner",
                       partitions=kc.partitions_text(revoked), dropped=dropped, writing=self.in_flight)

    def _drop_pending(self, tps) -> int:
        before = len(self.pending)
        if before:
            self.pending = deque(item for item in self.pending if item[0] not in tps)
        return before - len(self.pending)

    def on_partitions_lost(self, lost) -> None:
        self.on_partitions_revoked(lost)

    def on_partitions_assigned(self, assigned) -> None:
        assigned = set(assigned)
        self.joined = True
        # positioned from the database by the main loop (_sync) before any of their messages is used
        self.unsynced |= assigned
        if assigned and self.consumer is not None:
            self.consumer.pause(*assigned)
        self.last_message_at = time.monotonic()  # --exit-when-idle: give new partitions a full idle period
        logs.event(log, "partitions_assigned", f"partitions assigned: {kc.partitions_text(assigned) or 'none'}",
                   partitions=kc.partitions_text(assigned))

    # -- waiting while something is down or busy --------------------------------------------
    def _keepalive(self, seconds: float) -> None:
        """Wait ``seconds`` while staying a live member of the group: poll with every partition paused
        (rebalance callbacks run; the messages of a paused partition are not returned)."""
        end = time.monotonic() + seconds
        while True:
            self._check_deadline()
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
            logs.event(log, "kafka_error", f"poll while waiting: {exc}", logging.WARNING, error=logs.short_error(exc))
            time.sleep(min(seconds, 0.5))
            return
        for tp, msgs in records.items():  # paused: should not happen; never use them out of place
            self._rewind(tp, msgs[0].offset)

    def _rewind(self, tp: TopicPartition, offset: int) -> None:
        """Messages from ``offset`` on were fetched and dropped (those before it are in a batch or waiting
        for one): read them again."""
        if tp in self.read_pos and tp not in self.unsynced:
            self._seek(tp, offset)

    def _seek(self, tp: TopicPartition, offset: int) -> bool:
        try:
            self.consumer.seek(tp, offset)
            return True
        except Exception as exc:  # noqa: BLE001 - no longer assigned (a rebalance meanwhile)
            logs.event(log, "seek_skipped", f"not positioning {kc.partitions_text([tp])}: {logs.short_error(exc)}", logging.DEBUG)
            return False

    def _backoff(self, attempt: int) -> float:
        return min(self.cfg.retry_max_backoff_s, 0.5 * (2 ** min(attempt, 20)))

    # -- database (main thread: migration, stored offsets) ---------------------------------
    def _db_call(self, fn: Callable, what: str, sink: Sink | None = None, on_writer: bool = False,
                 batch_rows: int | None = None):
        """``fn()``, retried while the database is unavailable.  Between attempts the main thread keeps
        the group alive (:meth:`_keepalive`); the writer thread (``on_writer``) sleeps."""
        import psycopg2

        sink = sink or self.sink
        wait = self._sleep if on_writer else self._keepalive
        if batch_rows is None:
            batch_rows = self.batch.count
        attempt = 0
        while True:
            self._check_deadline(idle_exits=not on_writer)
            try:
                if self.need_migrate:
                    sink.migrate()
                    self.need_migrate = False
                result = fn()
                if attempt:
                    logs.event(log, "db_recovered", f"database back after {attempt} failed attempt(s)",
                               what=what, attempts=attempt)
                return result
            except DatabaseUnavailable as exc:
                pause = self._backoff(attempt)
                logs.event(log, "db_unavailable",
                           f"database unavailable during {what}: {exc}; retrying in {pause:.1f}s (batch kept)",
                           logging.WARNING, what=what, attempt=attempt + 1, retry_in=round(pause, 1),
                           error=logs.short_error(exc), batch_rows=batch_rows)
            except psycopg2.Error as exc:
                # not a connection problem (table dropped, permissions, …): migrate again and retry
                pause = self._backoff(attempt)
                self.need_migrate = True
                logs.event(log, "db_error", f"database error during {what}: {logs.short_error(exc)}; retrying in {pause:.1f}s",
                           logging.ERROR, what=what, attempt=attempt + 1, retry_in=round(pause, 1),
                           error=logs.short_error(exc), batch_rows=batch_rows)
            attempt += 1
            wait(pause)

    # -- kafka setup ---------------------------------------------------------------------------
    def _kafka_call(self, fn: Callable, what: str):
        attempt = 0
        while True:
            self._check_deadline()
            try:
                result = fn()
                if attempt:
                    logs.event(log, "kafka_recovered", f"Kafka back after {attempt} failed attempt(s)",
                               what=what, attempts=attempt)
                return result
            except (KafkaError, OSError) as exc:
                pause = self._backoff(attempt)
                logs.event(log, "kafka_unavailable", f"Kafka unavailable during {what}: {logs.short_error(exc)}; "
                           f"retrying in {pause:.1f}s", logging.WARNING, what=what, attempt=attempt + 1,
                           retry_in=round(pause, 1), error=logs.short_error(exc))
            attempt += 1
            self._keepalive(pause)

    def _connect_kafka(self) -> None:
        k = self.cfg.kafka
        created = self._kafka_call(lambda: kc.ensure_topics(k), "topic check")
        if created:
            logs.event(log, "topics_created", f"created topics {','.join(created)}", topics=",".join(created))
        self.consumer = self._kafka_call(lambda: kc.make_consumer(k, self.cfg.group, self.cfg.batch_size),
                                         "consumer connect")
        self.consumer.subscribe([k.topic], listener=kc.RebalanceListener(self))

    def _dlq_send(self, letters) -> int:
        if self.producer is None:
            self.producer = kc.make_dlq_producer(self.cfg.kafka)
        return kc.send_dead_letters(self.producer, self.cfg.kafka.dlq_topic, letters)

    # -- positions -----------------------------------------------------------------------------
    def _sync(self) -> None:
        """Position the newly assigned partitions where the database says (then the group's Kafka
        offset, then the beginning), once no batch is being written (it may move those offsets)."""
        self._drain()
        todo = set(self.unsynced)
        if not todo:
            return
        if self.reader is None:
            self.reader = Sink(self.cfg.database_url, self.cfg.table)
        stored = self._db_call(lambda: self.reader.stored_offsets(self.cfg.group, self.cfg.kafka.topic),
                               "stored offsets read", sink=self.reader)
        todo &= self.unsynced  # a rebalance while reading may have taken some away
        unknown = [tp for tp in todo if tp.partition not in stored]
        fallback: dict[TopicPartition, int] = {}
        if unknown:
            def kafka_positions():
                # a partition the database does not know: from the group's Kafka offset only if an earlier
                # version (positions kept in Kafka) committed it; a mirror of ours means the database lost
                # or dropped the offsets (and the rows with them, same transactions): from the beginning
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
            logs.event(log, "positioned", "partitions positioned at the offsets stored with the rows: "
                       + ", ".join(f"{tp.partition}@{o}" for tp, o in sorted(where.items(), key=lambda i: i[0].partition))
                       + (f" (not in the database yet: {','.join(map(str, new))}; from an earlier version's group "
                          "offset, else the beginning)" if new else ""),
                       partitions=kc.partitions_text(todo))

    # -- messages ------------------------------------------------------------------------------
    def _add(self, tp: TopicPartition, msg) -> None:
        start = self.read_pos[tp]
        self.read_pos[tp] = msg.offset + 1
        try:
            row = parse_message(msg.value, msg.partition, msg.offset)
        except Invalid as bad:
            value, headers = deadletter.build(
                bad.reason, "consumer", payload=bad.payload, raw=bad.raw,
                letter_id=deadletter.consumer_id(msg.topic, msg.partition, msg.offset),
                department=bad.department,
                source={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
            )
            self.batch.add_dead(tp, msg.offset, (msg.key, value, headers), start)
            logs.event(log, "dead_letter", f"message refused: {bad.reason}", logging.WARNING, reason=bad.reason,
                       partition=msg.partition, offset=msg.offset)
            return
        self.batch.add_row(tp, row, start)

    def _refused_letters(self, refused: list[tuple[Row, str]]) -> list[Letter]:
        topic = self.cfg.kafka.topic
        out = []
        for row, reason in refused:
            payload = {"numero_dpe": row.numero_dpe,
                       "date_reception_dpe": row.date_reception_dpe.isoformat() if row.date_reception_dpe else None,
                       "code_postal_ban": row.code_postal_ban, "etiquette_dpe": row.etiquette_dpe,
                       "departement": row.departement, **row.extra}
            value, headers = deadletter.build(reason, "consumer", payload=payload, department=row.departement,
                                              letter_id=deadletter.consumer_id(topic, row.partition, row.offset),
                                              source={"topic": topic, "partition": row.partition,
                                                      "offset": row.offset})
            out.append((row.numero_dpe.encode("utf-8"), value, headers))
            logs.event(log, "dead_letter", reason, logging.WARNING, reason=reason, partition=row.partition,
                       offset=row.offset)
        return out

    # -- one batch, on the writer thread ----------------------------------------------------------
    def _write(self, batch: Batch) -> Written:
        """Rows, dead letters and offsets of ``batch``; retried until done (or the grace period ends).
        Partitions the database says were written already are dropped from ``batch`` (``Written.stale``
        says which): what is left in it is what was written."""
        started = time.monotonic()
        done = self.written
        topic = self.cfg.kafka.topic
        stale: dict[int, int | None] = {}
        sent = 0

        def before_commit(result: WriteResult) -> None:
            nonlocal sent
            self.crash("after_insert", done)
            letters = batch.all_dead() + self._refused_letters(result.refused)
            if letters:
                # acknowledged before the rows and offsets commit: a crash in between sends them again
                # (same ids), never loses them
                sent = self._dlq_send(letters)
                self.crash("after_dlq_send", done)

        while True:
            claim = batch.claim(self.cfg.group, topic)
            if not claim.ranges:
                result = WriteResult()
                break
            rows = batch.all_rows()
            try:
                result = self._db_call(lambda: self._write_or_kafka_retry(rows, claim, before_commit),
                                       "batch write", on_writer=True,
                                       batch_rows=batch.count)
                break
            except Stale as exc:
                stale.update(exc.stored)
                batch.drop(TopicPartition(topic, p) for p in exc.stored)
        if claim.ranges:
            self.crash("after_db_commit", done)
        return Written(batch, result, sent, stale, time.monotonic() - started)

    def _write_or_kafka_retry(self, rows, claim, before_commit) -> WriteResult:
        """One attempt; a dead-letter send that fails rolls the transaction back and is retried like an
        unavailable database."""
        try:
            return self.sink.write(rows, claim, before_commit=before_commit)
        except (KafkaError, OSError) as exc:
            raise DatabaseUnavailable(f"dead-letter send failed: {logs.short_error(exc)}") from exc

    # -- batches, on the main thread --------------------------------------------------------------
    def _submit(self) -> None:
        """Hand the current batch to the writer thread (which must be free) and start a new one."""
        batch, self.batch = self.batch, Batch()
        self.in_flight_messages = batch.count
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
        self.written += 1
        res, batch = w.result, w.batch
        if w.stale:
            self._after_stale(w)
        assigned = self.consumer.assignment() if self.consumer is not None else set()
        for tp, off in batch.next.items():
            if tp in assigned:
                self.to_commit[tp] = max(off, self.to_commit.get(tp, 0))
                self.kafka_commit_due = True
        kept_rows = sum(len(r) for r in batch.rows.values())
        if batch.start:  # some partition of it was written
            self.totals.add(res, w.dead_letters)
            self.metrics.batch(res.inserted, res.updated, res.unchanged, res.deleted, w.dead_letters,
                               res.seconds if kept_rows else None)
            self.metrics.committed()
            self.metrics.lag.set(self.lag_by_partition())
        if (kept_rows or w.dead_letters) and log.isEnabledFor(logging.DEBUG):
            logs.event(log, "batch",
                       f"batch {self.totals.batches}: {res.rows} rows ({res.inserted} new, {res.updated} updated, "
                       f"{res.unchanged} unchanged), {w.dead_letters} dead letters",
                       logging.DEBUG, rows=res.rows, inserted=res.inserted, updated=res.updated,
                       unchanged=res.unchanged, deleted=res.deleted, dead_letters=w.dead_letters,
                       partitions=len(batch.start), write_ms=round(res.seconds * 1000, 1),
                       batch_ms=round(w.seconds * 1000, 1), lag=self.lag(), total=self.totals.rows)
        self._commit_kafka()
        return True

    def _after_stale(self, w: Written) -> None:
        """Some partitions of the batch were written already (by us before a restart, or by another
        member of the group): read them again from where the database says."""
        self.totals.stale_batches += 1
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
        logs.event(log, "stale_batch", "the database's offsets are past this batch (it was written already, by a "
                   "previous run or another member): re-reading from the stored offsets, nothing written twice",
                   logging.WARNING, stored=",".join(f"{p}@{o}" for p, o in sorted(w.stale.items())))

    def _commit_kafka(self, force: bool = False) -> None:
        """The group's Kafka offsets follow the stored ones, asynchronously: for lag, Kafdrop and
        ``dpe-ingest status``; the consumer itself positions from the database."""
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
                self.consumer.commit_async(offsets, callback=_commit_done)
        except Exception as exc:  # noqa: BLE001 - advisory: the database holds the truth
            logs.event(log, "kafka_commit_failed", f"Kafka offset commit failed (advisory, the offsets are "
                       f"stored with the rows): {logs.short_error(exc)}", logging.DEBUG if not force else logging.WARNING,
                       error=logs.short_error(exc))

    def _due_at(self) -> float:
        """When the partial batch in memory is to be written: BATCH_IDLE_MS after the last message, or
        once it is older than max(10 x BATCH_IDLE_MS, 5 s) (monotonic clock)."""
        idle_s = self.cfg.batch_idle_ms / 1000.0
        return min(self.last_message_at + idle_s, self.batch.first_at + max(10 * idle_s, 5.0))

    def _ready(self) -> bool:
        """The batch should be written now (full, idle, or old)."""
        if not self.batch.count:
            return False
        return self.batch.count >= self.cfg.batch_size or time.monotonic() >= self._due_at()

    def _drain(self) -> None:
        """Wait for the batch in flight (keeping the group alive)."""
        while self.in_flight:
            if not self._collect(timeout=0.5) and self.in_flight:
                self._check_deadline()
                self._poll_paused(0.01)

    # -- lag / progress ------------------------------------------------------------------------
    def lag(self) -> int | None:
        """Messages behind the last known end of the assigned partitions (None if unknown)."""
        per = self.lag_by_partition()
        return sum(per.values()) if per else None

    def lag_by_partition(self) -> dict[tuple[str, int], int] | None:
        """{(topic, partition): messages behind the last known end} of the positioned partitions
        (None when not known at all)."""
        if self.consumer is None:
            return None
        out = {}
        try:
            for tp, pos in list(self.read_pos.items()):
                hw = self.consumer.highwater(tp)
                if hw is not None:
                    out[(tp.topic, tp.partition)] = max(0, hw - pos)
        except Exception:  # noqa: BLE001
            return None
        return out or None

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress_at < PROGRESS_EVERY_S:
            return
        interval = max(now - self.last_progress_at, 1e-6)
        self.last_progress_at = now
        self.metrics.lag.set(self.lag_by_partition())
        t = self.totals
        elapsed = max(now - t.started, 1e-6)
        recent, self.rows_at_progress = t.rows - self.rows_at_progress, t.rows
        assigned = self.consumer.assignment() if self.consumer is not None else set()
        logs.event(log, "progress", f"{t.rows} rows in {t.batches} batches, {t.dead_letters} dead letters",
                   batches=t.batches, rows=t.rows, inserted=t.inserted, updated=t.updated, unchanged=t.unchanged,
                   dead_letters=t.dead_letters, stale_batches=t.stale_batches, lag=self.lag(),
                   partitions=kc.partitions_text(assigned) or None, rate=f"{recent / interval:.0f}rows/s",
                   avg_rate=f"{t.rows / elapsed:.0f}rows/s", uptime=logs.human_duration(elapsed))

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
            stored = self.reader.stored_offsets(self.cfg.group, self.cfg.kafka.topic) if self.reader else {}
        except Exception as exc:  # noqa: BLE001
            logs.event(log, "kafka_error", f"idle check: {logs.short_error(exc)}", logging.WARNING, error=logs.short_error(exc))
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
        cfg = self.cfg
        self._collect()
        if self.unsynced:
            self._sync()
        if self._ready() and not self.in_flight:
            self._submit()
        room = cfg.batch_size - self.batch.count
        if room <= 0:
            # full, and the previous batch still being written: wait for it (the group stays alive)
            if not self._collect(timeout=0.5) and self.in_flight:
                self._poll_paused(0.01)
            return
        if self.pending:
            self._take(room)
            return
        paused = self.consumer.paused()
        if paused:
            self.consumer.resume(*(set(paused) - self.unsynced))
        wait = self._due_at() - time.monotonic() if self.batch.count else 1.0
        if self.in_flight:
            wait = min(wait, 0.05)  # come back soon to hand over the next batch
        wait = max(0.0, min(wait, 1.0))
        try:
            records = self.consumer.poll(timeout_ms=int(wait * 1000), max_records=max(room, POLL_RECORDS))
        except KafkaError as exc:
            logs.event(log, "kafka_error", f"poll failed: {logs.short_error(exc)}", logging.WARNING, error=logs.short_error(exc))
            time.sleep(1.0)
            records = {}
        if records:
            self.last_message_at = time.monotonic()
            n = 0
            for tp, msgs in records.items():
                if tp not in self.read_pos or tp in self.unsynced:
                    continue  # not positioned from the database yet: read again once it is
                n += len(msgs)
                self.pending.extend((tp, m) for m in msgs)
            self._take(room)
            if log.isEnabledFor(logging.DEBUG):
                logs.event(log, "polled", "polled messages", logging.DEBUG, messages=n, batch=self.batch.count,
                           pending=len(self.pending))

    def _take(self, room: int) -> None:
        """Move up to ``room`` polled messages into the batch, in order."""
        pending = self.pending
        for _ in range(min(room, len(pending))):
            tp, m = pending.popleft()
            self._add(tp, m)
        if self.batch.count:
            self.crash("after_poll", self.written)  # polled into a batch, nothing of it written

    def run(self) -> int:
        cfg = self.cfg
        logs.event(log, "start", f"consumer starting: {cfg.kafka.topic} -> table {cfg.table}",
                   topic=cfg.kafka.topic, dlq_topic=cfg.kafka.dlq_topic, group=cfg.group, table=cfg.table,
                   batch_size=cfg.batch_size, batch_idle_ms=cfg.batch_idle_ms, bootstrap=cfg.kafka.bootstrap_servers,
                   database=_safe_url(cfg.database_url), exit_when_idle=self.exit_when_idle_s)
        reason = "signal"
        try:
            self._db_call(lambda: None, "migration")
            logs.event(log, "migrated", f"table {cfg.table} ready", table=cfg.table)
            self._connect_kafka()
            while not self.stopping:
                self._step()
                self._commit_kafka()
                self._progress()
                if self._idle_done():
                    reason = "idle"
                    logs.event(log, "idle", f"topic idle for {self.exit_when_idle_s:.0f}s and fully written: exiting",
                               idle_s=self.exit_when_idle_s)
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
                logs.event(log, "abandoned", f"grace period over: {unwritten} message(s) left unwritten "
                           "(the next consumer reads them from the stored offsets)", logging.WARNING,
                           batch_rows=unwritten, writing=self.in_flight)
        finally:
            self.close()
        self._progress(force=True)
        logs.event(log, "stop", f"consumer stopped ({reason}): {self.totals.rows} rows in {self.totals.batches} batches",
                   reason=reason, batches=self.totals.batches, rows=self.totals.rows, inserted=self.totals.inserted,
                   updated=self.totals.updated, unchanged=self.totals.unchanged,
                   dead_letters=self.totals.dead_letters, stale_batches=self.totals.stale_batches)
        return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False, timeout_ms=5000)
            except Exception as exc:  # noqa: BLE001
                logs.event(log, "kafka_error", f"closing the consumer: {logs.short_error(exc)}", logging.WARNING)
        if self.producer is not None:
            try:
                self.producer.close(timeout=5)
            except Exception:  # noqa: BLE001
                pass
        if not self.in_flight:
            self.sink.close()  # (a write still running on an abandoned batch keeps its connection)
        if self.reader is not None:
            self.reader.close()


def _commit_done(offsets, response) -> None:
    if isinstance(response, Exception):
        logs.event(log, "kafka_commit_failed", f"Kafka offset commit failed (advisory, the offsets are stored with "
                   f"the rows): {logs.short_error(response)}", logging.DEBUG, error=logs.short_error(response))


def _safe_url(url: str) -> str:
    """The database URL without its password, for logs."""
    import re

    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", url)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpe-ingest consume",
        description="Write the Kafka topic into PostgreSQL in batches (the consumer Deployment). "
        "Settings come from the environment: DATABASE_URL, DB_TABLE, CONSUMER_GROUP, BATCH_SIZE, BATCH_IDLE_MS, "
        "RETRY_MAX_BACKOFF_S, KAFKA_BOOTSTRAP_SERVERS, KAFKA_TOPIC, KAFKA_DLQ_TOPIC (see docs/consumer.md).",
    )
    p.add_argument("--exit-when-idle", "--max-idle-exit", dest="exit_when_idle", type=float, metavar="SECONDS",
                   help="exit 0 once no message arrived for SECONDS and every assigned partition is fully "
                   "committed (local runs and tests; the Deployment runs forever)")
    p.add_argument("--shutdown-timeout", type=float, default=20.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, time allowed to write and commit the current batch (default 20, "
                   "keep it under the pod's terminationGracePeriodSeconds)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup()
    if args.exit_when_idle is not None and args.exit_when_idle <= 0:
        print("dpe-ingest consume: --exit-when-idle must be > 0 seconds", file=sys.stderr)
        return 2
    try:
        cfg = ConsumerConfig.from_env()
        port = metrics_port()
    except ConfigError as exc:
        print(f"dpe-ingest consume: {exc}", file=sys.stderr)
        return 2
    consumer = Consumer(cfg, exit_when_idle_s=args.exit_when_idle, shutdown_timeout_s=args.shutdown_timeout)
    return metrics.run_service(consumer, port, "dpe-ingest consume", "consumer", log)


if __name__ == "__main__":
    sys.exit(main())
