"""``dpe-ingest consume``: the Kafka topic into the PostgreSQL table, in batches, exactly once in effect.

The protocol, for every batch (see docs/consumer.md for the reasoning):

1. poll messages (raw bytes) until BATCH_SIZE are in memory or BATCH_IDLE_MS passed without a new one;
   each message is validated: a bad one becomes a dead letter of the batch, never a crash;
2. write the batch's rows in ONE database transaction (idempotent upsert); while the database is
   down, retry the same batch with capped exponential backoff, never skipping it;
3. after the DB commit, send the batch's dead letters to the DLQ topic and wait for acks=all;
4. THEN commit the Kafka offsets of exactly the messages of the batch (last offset + 1 per partition).

A crash anywhere replays at most the uncommitted batch, and replaying it is harmless (the upsert
leaves an identical row untouched), so every numero_dpe ends up in the table exactly once with the
content of its last message.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError
from kafka.structs import OffsetAndMetadata

from . import deadletter, kafka_io, logs, metrics
from . import kafka_consumer as kc
from .config import ConfigError, ConsumerConfig, metrics_port
from .sink import DatabaseUnavailable, Invalid, Row, Sink, WriteResult, parse_message

log = logging.getLogger("dpe_ingest.consumer")

CRASH_POINTS = ("after_poll", "after_insert", "after_db_commit", "after_dlq_send")
PROGRESS_EVERY_S = 10.0


class Abandon(Exception):
    """Shutting down and the grace period is over: leave the batch uncommitted (it will be replayed)."""


# ---------------------------------------------------------------------------------------------
# the in-memory batch
# ---------------------------------------------------------------------------------------------
@dataclass
class Batch:
    rows: dict[TopicPartition, list[Row]] = field(default_factory=dict)
    dead: dict[TopicPartition, list[tuple[bytes | None, bytes, list]]] = field(default_factory=dict)
    last: dict[TopicPartition, int] = field(default_factory=dict)
    first: dict[TopicPartition, int] = field(default_factory=dict)
    count: int = 0
    first_at: float = 0.0

    def _seen(self, tp: TopicPartition, offset: int) -> None:
        if self.count == 0:
            self.first_at = time.monotonic()
        self.count += 1
        self.last[tp] = max(offset, self.last.get(tp, -1))
        self.first[tp] = min(offset, self.first.get(tp, offset))

    def add_row(self, tp: TopicPartition, row: Row) -> None:
        self._seen(tp, row.offset)
        self.rows.setdefault(tp, []).append(row)

    def add_dead(self, tp: TopicPartition, offset: int, letter: tuple[bytes | None, bytes, list]) -> None:
        self._seen(tp, offset)
        self.dead.setdefault(tp, []).append(letter)

    def drop(self, tps) -> dict[TopicPartition, tuple[int, int]]:
        """Forget the messages of partitions we no longer own.
        Returns {partition: (messages dropped, first offset dropped)}."""
        out = {}
        for tp in list(tps):
            n = len(self.rows.pop(tp, [])) + len(self.dead.pop(tp, []))
            self.last.pop(tp, None)
            first = self.first.pop(tp, None)
            if n:
                out[tp] = (n, first)
            self.count -= n
        return out

    def all_rows(self) -> list[Row]:
        return [r for rows in self.rows.values() for r in rows]

    def all_dead(self) -> list[tuple[bytes | None, bytes, list]]:
        return [d for ds in self.dead.values() for d in ds]

    def n_dead(self) -> int:
        return sum(len(d) for d in self.dead.values())

    def offsets(self) -> dict[TopicPartition, int]:
        return {tp: off + 1 for tp, off in self.last.items()}


@dataclass
class Totals:
    batches: int = 0
    rows: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    dead_letters: int = 0
    started: float = field(default_factory=time.monotonic)

    def add(self, res: WriteResult, dead: int) -> None:
        self.batches += 1
        self.rows += res.rows
        self.inserted += res.inserted
        self.updated += res.updated
        self.unchanged += res.unchanged
        self.dead_letters += dead


# ---------------------------------------------------------------------------------------------
# the test-only crash hook
# ---------------------------------------------------------------------------------------------
class CrashHook:
    """``DPE_TEST_CRASH_AT=after_poll|after_insert|after_db_commit|after_dlq_send`` with ``DPE_TEST_CRASH_AFTER_BATCHES=N``:
    once N batches are fully done, SIGKILL ourselves at that point of the next batch.  TESTS ONLY."""

    def __init__(self, env) -> None:
        self.point = (env.get("DPE_TEST_CRASH_AT") or "").strip() or None
        if self.point is not None and self.point not in CRASH_POINTS:
            raise ConfigError(f"DPE_TEST_CRASH_AT={self.point!r}: expected one of {', '.join(CRASH_POINTS)}")
        raw = (env.get("DPE_TEST_CRASH_AFTER_BATCHES") or "0").strip()
        try:
            self.after = int(raw)
        except ValueError:
            raise ConfigError(f"DPE_TEST_CRASH_AFTER_BATCHES={raw!r} is not a whole number") from None

    def __call__(self, point: str, batches_done: int) -> None:
        if point == self.point and batches_done >= self.after:
            logs.event(log, "test_crash", f"test crash hook: SIGKILL at {point} after {batches_done} batches",
                       logging.WARNING, point=point, batches=batches_done)
            for h in logging.getLogger().handlers:
                h.flush()
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# the consumer
# ---------------------------------------------------------------------------------------------
class Consumer:
    def __init__(self, cfg: ConsumerConfig, *, exit_when_idle_s: float | None = None,
                 shutdown_timeout_s: float = 20.0, crash: CrashHook | None = None,
                 sink: Sink | None = None):
        self.cfg = cfg
        self.exit_when_idle_s = exit_when_idle_s
        self.shutdown_timeout_s = shutdown_timeout_s
        self.crash = crash or CrashHook({})
        self.sink = sink or Sink(cfg.database_url, cfg.table)
        self.consumer = None
        self.producer = None
        self.batch = Batch()
        self.uncommitted: dict[TopicPartition, int] = {}  # written to the DB, offsets not committed yet
        self.next_offset: dict[TopicPartition, int] = {}  # for the lag figure
        self.carry: list = []  # (tp, message) polled while a batch was being written: for the next batch
        # partitions revoked with unwritten messages: where to seek if the group gives them back to us
        self.rewind: dict[TopicPartition, int] = {}
        # partitions revoked with written but uncommitted offsets: to commit if they come back to us
        self.revoked_uncommitted: dict[TopicPartition, int] = {}
        self.totals = Totals()
        self.metrics = metrics.ConsumerMetrics()  # served on /metrics by main() when METRICS_PORT is set
        self.writing = False
        self.stop_at: float | None = None  # monotonic deadline once a stop signal arrived
        self.last_message_at = time.monotonic()
        self.last_batch_at = time.monotonic()
        self.last_progress_at = time.monotonic()
        self.need_migrate = True
        self.joined = False  # the group assigned us partitions (possibly none) at least once

    # -- signals -------------------------------------------------------------------------------
    @property
    def stopping(self) -> bool:
        return self.stop_at is not None

    def request_stop(self, signum=None, _frame=None) -> None:
        name = signal.Signals(signum).name if signum else "stop"
        if self.stop_at is None:
            self.stop_at = time.monotonic() + self.shutdown_timeout_s
            logs.event(log, "stopping", f"{name}: writing the current batch, committing, then exiting",
                       signal=name, batch_rows=self.batch.count, grace_s=self.shutdown_timeout_s)
        else:
            self.stop_at = time.monotonic()  # a second signal: give up the wait now
            logs.event(log, "stopping", f"second {name}: exiting without waiting", logging.WARNING, signal=name)

    def _check_deadline(self) -> None:
        """Raise :class:`Abandon` once stopping and either the grace period is over or there is nothing
        in flight to save (e.g. a signal while still waiting for the database at start)."""
        if self.stop_at is None:
            return
        idle = not self.writing and self.batch.count == 0 and not self.uncommitted
        if idle or time.monotonic() >= self.stop_at:
            raise Abandon()

    # -- rebalance listener (runs on kafka-python's IO thread while our poll() waits) ------------
    def on_partitions_revoked(self, revoked) -> None:
        revoked = set(revoked)
        gone = self.batch.drop(revoked)
        rewind = {tp: first for tp, (_n, first) in gone.items()}
        dropped = sum(n for n, _first in gone.values())
        kept = []
        for tp, m in self.carry:
            if tp in revoked:
                rewind[tp] = min(m.offset, rewind.get(tp, m.offset))
                dropped += 1
            else:
                kept.append((tp, m))
        self.carry = kept
        # kafka-python keeps the fetch position of a partition that is assigned to us again: it must
        # then go back to the first message we dropped, or those messages would be skipped
        for tp, offset in rewind.items():
            self.rewind[tp] = min(offset, self.rewind.get(tp, offset))
        lost_commits = [tp for tp in revoked if tp in self.uncommitted]
        for tp in lost_commits:
            self.revoked_uncommitted[tp] = max(self.uncommitted.pop(tp), self.revoked_uncommitted.get(tp, 0))
        for tp in revoked:
            self.next_offset.pop(tp, None)
        if revoked:
            logs.event(log, "partitions_revoked",
                       f"partitions revoked: {_tps(revoked)}; {dropped} uncommitted message(s) left to the next owner",
                       partitions=_tps(revoked), dropped=dropped, uncommitted_dropped=len(lost_commits))

    def on_partitions_lost(self, lost) -> None:
        """We were evicted from the group: kafka-python forgets the positions (they will come from the
        committed offsets, which another member may have moved on), so nothing to seek or re-commit."""
        self.on_partitions_revoked(lost)
        for tp in lost:
            self.rewind.pop(tp, None)
            self.revoked_uncommitted.pop(tp, None)

    def on_partitions_assigned(self, assigned) -> None:
        assigned = set(assigned)
        self.joined = True
        for tp, offset in self.rewind.items():
            if tp in assigned:
                self.consumer.seek(tp, offset)  # re-read what we dropped at the revocation
        for tp, offset in self.revoked_uncommitted.items():
            if tp in assigned:  # ours again, and these rows are in the table: commit them
                self.uncommitted[tp] = max(offset, self.uncommitted.get(tp, 0))
        self.rewind, self.revoked_uncommitted = {}, {}
        self.last_message_at = time.monotonic()  # --exit-when-idle: give new partitions a full idle period
        if self.writing and assigned and self.consumer is not None:
            self.consumer.pause(*assigned)  # no new data while the current batch is being written
        logs.event(log, "partitions_assigned", f"partitions assigned: {_tps(assigned) or 'none'}",
                   partitions=_tps(assigned))

    # -- waiting while something is down ------------------------------------------------------
    def _keepalive(self, seconds: float) -> None:
        """Wait ``seconds`` while staying a live member of the group: poll with every partition paused."""
        end = time.monotonic() + seconds
        while True:
            self._check_deadline()
            left = end - time.monotonic()
            if left <= 0:
                return
            if self.consumer is None:
                time.sleep(min(left, 0.5))
                continue
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.pause(*assigned)
            try:
                records = self.consumer.poll(timeout_ms=int(min(left, 1.0) * 1000) or 1, max_records=1)
            except KafkaError as exc:
                logs.event(log, "kafka_error", f"poll while waiting: {exc}", logging.WARNING, error=_short(exc))
                time.sleep(min(left, 0.5))
                continue
            for tp, msgs in records.items():  # should not happen (all paused); never lose them
                for m in msgs:
                    if self.writing:
                        self.carry.append((tp, m))  # not into the batch being written: into the next one
                    else:
                        self._add(tp, m)

    def _backoff(self, attempt: int) -> float:
        return min(self.cfg.retry_max_backoff_s, 0.5 * (2 ** min(attempt, 20)))

    # -- database ------------------------------------------------------------------------------
    def _db_call(self, fn: Callable, what: str):
        import psycopg2

        attempt = 0
        while True:
            self._check_deadline()
            try:
                if self.need_migrate:
                    self.sink.migrate()
                    self.need_migrate = False
                result = fn()
                if attempt and self.sink.conn is not None:  # (a write with nothing left to write connects not)
                    logs.event(log, "db_recovered", f"database back after {attempt} failed attempt(s)",
                               what=what, attempts=attempt)
                return result
            except DatabaseUnavailable as exc:
                wait = self._backoff(attempt)
                logs.event(log, "db_unavailable",
                           f"database unavailable during {what}: {exc}; retrying in {wait:.1f}s (batch kept)",
                           logging.WARNING, what=what, attempt=attempt + 1, retry_in=round(wait, 1),
                           error=_short(exc), batch_rows=self.batch.count)
            except psycopg2.Error as exc:
                # not a connection problem (table dropped, permissions, …): migrate again and retry
                wait = self._backoff(attempt)
                self.need_migrate = True
                logs.event(log, "db_error", f"database error during {what}: {_short(exc)}; retrying in {wait:.1f}s",
                           logging.ERROR, what=what, attempt=attempt + 1, retry_in=round(wait, 1),
                           error=_short(exc), batch_rows=self.batch.count)
            attempt += 1
            self._keepalive(wait)

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
                wait = self._backoff(attempt)
                logs.event(log, "kafka_unavailable", f"Kafka unavailable during {what}: {_short(exc)}; "
                           f"retrying in {wait:.1f}s", logging.WARNING, what=what, attempt=attempt + 1,
                           retry_in=round(wait, 1), error=_short(exc))
            attempt += 1
            self._keepalive(wait)

    def _connect_kafka(self) -> None:
        k = self.cfg.kafka
        created = self._kafka_call(lambda: kc.ensure_topics(k), "topic check")
        if created:
            logs.event(log, "topics_created", f"created topics {','.join(created)}", topics=",".join(created))
        self.consumer = self._kafka_call(lambda: kc.make_consumer(k, self.cfg.group, self.cfg.batch_size),
                                         "consumer connect")
        self.consumer.subscribe([k.topic], listener=_Listener(self))

    def _dlq_send(self, letters) -> int:
        if self.producer is None:
            self.producer = kc.make_dlq_producer(self.cfg.kafka)
        return kc.send_dead_letters(self.producer, self.cfg.kafka.dlq_topic, letters)

    # -- messages ------------------------------------------------------------------------------
    def _add(self, tp: TopicPartition, msg) -> None:
        self.next_offset[tp] = msg.offset + 1
        try:
            row = parse_message(msg.value, msg.partition, msg.offset)
        except Invalid as bad:
            value, headers = deadletter.build(
                bad.reason, "consumer", payload=bad.payload, raw=bad.raw,
                letter_id=deadletter.consumer_id(msg.topic, msg.partition, msg.offset),
                department=bad.department,
                source={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset},
            )
            self.batch.add_dead(tp, msg.offset, (msg.key, value, headers))
            logs.event(log, "dead_letter", f"message refused: {bad.reason}", logging.WARNING, reason=bad.reason,
                       partition=msg.partition, offset=msg.offset)
            return
        self.batch.add_row(tp, row)

    def _refused_to_dead(self, refused: list[tuple[Row, str]]) -> None:
        topic = self.cfg.kafka.topic
        for row, reason in refused:
            tp = TopicPartition(topic, row.partition)
            payload = {"numero_dpe": row.numero_dpe,
                       "date_reception_dpe": row.date_reception_dpe.isoformat() if row.date_reception_dpe else None,
                       "code_postal_ban": row.code_postal_ban, "etiquette_dpe": row.etiquette_dpe,
                       "departement": row.departement, **row.extra}
            value, headers = deadletter.build(reason, "consumer", payload=payload, department=row.departement,
                                              letter_id=deadletter.consumer_id(topic, row.partition, row.offset),
                                              source={"topic": topic, "partition": row.partition,
                                                      "offset": row.offset})
            self.batch.dead.setdefault(tp, []).append((row.numero_dpe.encode("utf-8"), value, headers))
            logs.event(log, "dead_letter", reason, logging.WARNING, reason=reason, partition=row.partition,
                       offset=row.offset)

    # -- one batch -----------------------------------------------------------------------------
    def flush(self) -> None:
        if self.batch.count == 0 and not self.uncommitted:
            return
        batch = self.batch
        messages = batch.count
        self.writing = True
        t0 = time.monotonic()
        n_dead = 0
        try:
            if self.consumer is not None and self.consumer.assignment():
                self.consumer.pause(*self.consumer.assignment())
            done = self.totals.batches
            result = WriteResult()
            if batch.rows:
                def write():
                    return self.sink.write(batch.all_rows(), before_commit=lambda: self.crash("after_insert", done))
                result = self._db_call(write, "batch write")
                if result.refused:
                    self._refused_to_dead(result.refused)
            if messages:
                self.crash("after_db_commit", done)
            n_dead = batch.n_dead()
            if n_dead:
                self._kafka_call(lambda: self._dlq_send(batch.all_dead()), "dead-letter send")
                self.crash("after_dlq_send", done)
            for tp, off in batch.offsets().items():
                self.uncommitted[tp] = max(off, self.uncommitted.get(tp, 0))
            self._commit()
        finally:
            self.writing = False
            if self.consumer is not None:
                paused = self.consumer.paused()
                if paused:
                    self.consumer.resume(*paused)
        now = time.monotonic()
        rows = result.rows
        if messages:
            self.totals.add(result, n_dead)
            self.metrics.batch(result.inserted, result.updated, result.unchanged, getattr(result, "deleted", 0),
                               n_dead, result.seconds if batch.rows else None)
            self.metrics.lag.set(self.lag_by_partition())
            interval = max(now - self.last_batch_at, 1e-6)
            logs.event(log, "batch",
                       f"batch {self.totals.batches}: {rows} rows ({result.inserted} new, {result.updated} updated, "
                       f"{result.unchanged} unchanged), {n_dead} dead letters",
                       rows=rows, inserted=result.inserted, updated=result.updated, unchanged=result.unchanged,
                       dead_letters=n_dead, partitions=len(batch.last), write_ms=round(result.seconds * 1000, 1),
                       batch_ms=round((now - t0) * 1000, 1), lag=self.lag(), rate=f"{rows / interval:.0f}rows/s",
                       total=self.totals.rows)
        self.last_batch_at = now
        self.batch = Batch()
        carried, self.carry = self.carry, []
        for tp, m in carried:
            self._add(tp, m)

    def _commit(self) -> None:
        """Commit the written offsets; retry while the broker is away; give up (harmlessly: the next
        owner replays) only when the group says we no longer own the partitions."""
        attempt = 0
        while self.uncommitted:
            self._check_deadline()
            offsets = {tp: OffsetAndMetadata(off, "", -1) for tp, off in self.uncommitted.items()}
            try:
                self.consumer.commit(offsets, timeout_ms=15000)
                self.metrics.committed()
                if attempt:
                    logs.event(log, "kafka_recovered", f"offsets committed after {attempt} failed attempt(s)",
                               what="offset commit", attempts=attempt)
                for tp, off in list(self.uncommitted.items()):
                    if offsets.get(tp) is not None and offsets[tp].offset == off:
                        del self.uncommitted[tp]
                return
            except Exception as exc:  # noqa: BLE001 - every failure is either retried or harmless
                if kc.is_ownership_error(exc):
                    logs.event(log, "commit_failed",
                               f"offset commit refused ({type(exc).__name__}): the group rebalanced; the next owner "
                               f"replays these rows (the upsert makes that harmless)", logging.WARNING,
                               error=_short(exc), partitions=_tps(offsets))
                    for tp in offsets:
                        # if the next assignment gives the partition straight back (its position kept),
                        # these offsets are committed then; otherwise the next owner replays the rows
                        off = self.uncommitted.pop(tp, None)
                        if off is not None:
                            self.revoked_uncommitted[tp] = max(off, self.revoked_uncommitted.get(tp, 0))
                    return
                if not isinstance(exc, (KafkaError, OSError)):
                    raise
                wait = self._backoff(attempt)
                logs.event(log, "commit_failed", f"offset commit failed ({_short(exc)}); retrying in {wait:.1f}s",
                           logging.WARNING, error=_short(exc), attempt=attempt + 1, retry_in=round(wait, 1))
                attempt += 1
                self._keepalive(wait)

    # -- lag / progress ------------------------------------------------------------------------
    def _position(self, tp: TopicPartition) -> int | None:
        """Next offset we will read from ``tp`` (None if not known yet); never blocks."""
        if tp in self.next_offset:
            return self.next_offset[tp]
        try:  # kafka-python's fetch position (set from the committed offset after an assignment)
            state = self.consumer._subscription.assignment[tp]
            return state.position.offset if state.position is not None else None
        except Exception:  # noqa: BLE001 - private API: a figure for logs only
            return None

    def lag(self) -> int | None:
        """Messages behind the last known end of the assigned partitions (None if unknown)."""
        per = self.lag_by_partition()
        return sum(per.values()) if per else None

    def lag_by_partition(self) -> dict[tuple[str, int], int] | None:
        """{(topic, partition): messages behind the last known end} of the assigned partitions whose
        end and position are known (None when not known at all)."""
        if self.consumer is None:
            return None
        out = {}
        try:
            for tp in self.consumer.assignment():
                hw = self.consumer.highwater(tp)
                pos = self._position(tp)
                if hw is not None and pos is not None:
                    out[(tp.topic, tp.partition)] = max(0, hw - pos)
        except Exception:  # noqa: BLE001
            return None
        return out or None

    def _progress(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_progress_at < PROGRESS_EVERY_S:
            return
        self.last_progress_at = now
        self.metrics.lag.set(self.lag_by_partition())
        t = self.totals
        elapsed = max(now - t.started, 1e-6)
        assigned = self.consumer.assignment() if self.consumer is not None else set()
        logs.event(log, "progress", f"{t.rows} rows in {t.batches} batches, {t.dead_letters} dead letters",
                   batches=t.batches, rows=t.rows, inserted=t.inserted, updated=t.updated, unchanged=t.unchanged,
                   dead_letters=t.dead_letters, lag=self.lag(), partitions=_tps(assigned) or None,
                   rate=f"{t.rows / elapsed:.0f}rows/s", uptime=logs.human_duration(elapsed))

    def _idle_done(self) -> bool:
        """True when --exit-when-idle applies: nothing in flight, nothing new for that long, no lag."""
        if self.exit_when_idle_s is None or self.batch.count or self.uncommitted:
            return False
        if time.monotonic() - self.last_message_at < self.exit_when_idle_s:
            return False
        if not self.joined:
            return False
        assigned = self.consumer.assignment()
        if not assigned:
            return True  # the group gave us nothing to do (more consumers than partitions)
        # the group's committed offsets (from the broker) must reach the end of every assigned partition
        try:
            ends = self.consumer.end_offsets(list(assigned), timeout_ms=10000)
            committed = kafka_io.group_offsets(self.cfg.kafka.bootstrap_servers, self.cfg.group)
        except Exception as exc:  # noqa: BLE001
            logs.event(log, "kafka_error", f"idle check: {_short(exc)}", logging.WARNING, error=_short(exc))
            self.last_message_at = time.monotonic()
            return False
        behind = {tp: end - committed.get(tp, 0) for tp, end in ends.items() if end > committed.get(tp, 0)}
        if behind:
            self.last_message_at = time.monotonic()  # check again after another idle period
            return False
        return True

    # -- main loop -----------------------------------------------------------------------------
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
            idle_s = cfg.batch_idle_ms / 1000.0
            max_age_s = max(10 * idle_s, 5.0)
            while not self.stopping:
                now = time.monotonic()
                if self.batch.count:
                    wait = min(self.last_message_at + idle_s, self.batch.first_at + max_age_s) - now
                else:
                    wait = 1.0
                wait = max(0.0, min(wait, 1.0))
                want = max(1, cfg.batch_size - self.batch.count)
                try:
                    records = self.consumer.poll(timeout_ms=int(wait * 1000), max_records=want)
                except KafkaError as exc:
                    logs.event(log, "kafka_error", f"poll failed: {_short(exc)}", logging.WARNING, error=_short(exc))
                    time.sleep(1.0)
                    records = {}
                if records:
                    logs.event(log, "polled", "polled messages", logging.DEBUG,
                               messages=sum(len(m) for m in records.values()),
                               batch=self.batch.count + sum(len(m) for m in records.values()))
                    self.crash("after_poll", self.totals.batches)
                    self.last_message_at = time.monotonic()
                    for tp, msgs in records.items():
                        for m in msgs:
                            self._add(tp, m)
                now = time.monotonic()
                if self.batch.count and (
                    self.batch.count >= cfg.batch_size
                    or now - self.last_message_at >= idle_s
                    or now - self.batch.first_at >= max_age_s
                ):
                    self.flush()
                elif self.uncommitted and not self.batch.count:
                    self.flush()  # leftovers of an earlier commit that failed
                self._progress()
                if self._idle_done():
                    reason = "idle"
                    logs.event(log, "idle", f"topic idle for {self.exit_when_idle_s:.0f}s and fully committed: exiting",
                               idle_s=self.exit_when_idle_s)
                    break
            # graceful stop: write what we have, commit, leave the group
            if self.batch.count or self.uncommitted:
                self.flush()
        except Abandon:
            if self.batch.count or self.uncommitted:
                logs.event(log, "abandoned", f"grace period over: {self.batch.count} message(s) left uncommitted "
                           "(the next consumer replays them)", logging.WARNING, batch_rows=self.batch.count,
                           uncommitted_partitions=len(self.uncommitted))
        finally:
            self.close()
        self._progress(force=True)
        logs.event(log, "stop", f"consumer stopped ({reason}): {self.totals.rows} rows in {self.totals.batches} batches",
                   reason=reason, batches=self.totals.batches, rows=self.totals.rows, inserted=self.totals.inserted,
                   updated=self.totals.updated, unchanged=self.totals.unchanged,
                   dead_letters=self.totals.dead_letters)
        return 0

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close(autocommit=False, timeout_ms=5000)
            except Exception as exc:  # noqa: BLE001
                logs.event(log, "kafka_error", f"closing the consumer: {_short(exc)}", logging.WARNING)
        if self.producer is not None:
            try:
                self.producer.close(timeout=5)
            except Exception:  # noqa: BLE001
                pass
        self.sink.close()


class _Listener(ConsumerRebalanceListener):
    """Forwards kafka-python's rebalance callbacks to the :class:`Consumer`."""

    def __init__(self, owner: Consumer):
        self.owner = owner

    def on_partitions_revoked(self, revoked):
        self.owner.on_partitions_revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self.owner.on_partitions_assigned(assigned)

    def on_partitions_lost(self, lost):
        self.owner.on_partitions_lost(lost)


def _tps(tps) -> str:
    return ",".join(f"{tp.topic}:{tp.partition}" for tp in sorted(tps, key=lambda t: (t.topic, t.partition)))


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


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
        crash = CrashHook(os.environ)
        port = metrics_port()
    except ConfigError as exc:
        print(f"dpe-ingest consume: {exc}", file=sys.stderr)
        return 2
    consumer = Consumer(cfg, exit_when_idle_s=args.exit_when_idle, shutdown_timeout_s=args.shutdown_timeout,
                        crash=crash)
    return metrics.run_service(consumer, port, "dpe-ingest consume", "consumer", log)


if __name__ == "__main__":
    sys.exit(main())
