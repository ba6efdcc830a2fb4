"""``dpe-ingest consume``: the Kafka topic into the PostgreSQL table, in batches, exactly once.

The group, positions, batches, pipelining, stop and waits are :mod:`dpe_ingest.group_consumer`'s
(docs/consumer.md has the reasoning).  What the sink adds: each message is validated
(:func:`dpe_ingest.sink.parse_message`), a bad one becomes a dead letter of its batch, never a crash;
a batch's rows and its partitions' offsets go in ONE transaction (:meth:`dpe_ingest.sink.Sink.write`)
and its dead letters are sent (acks=all) before that transaction commits, so a crash anywhere leaves
the table and its offsets in step: each message is written once (the idempotent upsert stays as a
second line of defence).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from kafka.errors import KafkaError

from . import logs, metrics
from . import kafka_consumer as kc
from .config import ConsumerConfig
from .group_consumer import (Batch, DatabaseUnavailable, GroupConsumer, OffsetClaim, Refused, Written, no_crash,
                             main_of)
from .pg_connection import safe_url
from .messages import Letter, consumer_id, dead_letter
from .sink import Invalid, Row, Sink, WriteResult, parse_message

log = logging.getLogger("dpe_ingest.consumer")

CRASH_POINTS = ("after_poll", "after_insert", "after_dlq_send", "after_db_commit")
__all__ = ["Consumer", "CRASH_POINTS", "main", "no_crash"]


class Consumer(GroupConsumer):
    """The PostgreSQL sink: rows upserted with their offsets, refused messages to the dead-letter topic."""

    log = log
    NAME = "consumer"
    CRASH_POINTS = CRASH_POINTS
    LEGACY_KAFKA_OFFSETS = True  # the sink kept its positions in Kafka before they moved to the database

    def __init__(self, cfg: ConsumerConfig, *, exit_when_idle_s: float | None = None,
                 shutdown_timeout_s: float = 20.0, crash=None, sink: Sink | None = None):
        super().__init__(cfg, metrics.ConsumerMetrics(), exit_when_idle_s=exit_when_idle_s,
                         shutdown_timeout_s=shutdown_timeout_s, crash=crash, store=sink)
        self.producer = None  # of the dead letters
        self.rows_at_progress = 0  # totals["rows"] at the last progress line (its rate is since then)

    def open_store(self) -> Sink:
        return Sink(self.cfg.database_url, self.cfg.table)

    # -- messages ------------------------------------------------------------------------------
    def parse(self, msg):
        try:
            return parse_message(msg.value, msg.partition, msg.offset)
        except Invalid as bad:
            logs.event(log, "dead_letter", f"message refused: {bad.reason}", logging.WARNING, reason=bad.reason,
                       partition=msg.partition, offset=msg.offset)
            return Refused(dead_letter(
                bad.reason, "consumer", msg.key, payload=bad.payload, raw=bad.raw, department=bad.department,
                letter_id=consumer_id(msg.topic, msg.partition, msg.offset),
                source={"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}))

    def _refused_letters(self, refused: list[tuple[Row, str]]) -> list[Letter]:
        topic = self.cfg.kafka.topic
        out = []
        for row, reason in refused:
            payload = {"numero_dpe": row.numero_dpe,
                       "date_reception_dpe": row.date_reception_dpe.isoformat() if row.date_reception_dpe else None,
                       "code_postal_ban": row.code_postal_ban, "etiquette_dpe": row.etiquette_dpe,
                       "departement": row.departement, **row.extra}
            out.append(dead_letter(reason, "consumer", row.numero_dpe.encode("utf-8"), payload=payload,
                                   department=row.departement,
                                   letter_id=consumer_id(topic, row.partition, row.offset),
                                   source={"topic": topic, "partition": row.partition, "offset": row.offset}))
            logs.event(log, "dead_letter", reason, logging.WARNING, reason=reason, partition=row.partition,
                       offset=row.offset)
        return out

    # -- one batch, on the writer thread: rows, dead letters and offsets ------------------------
    def write(self, store: Sink, batch: Batch, claim: OffsetClaim, crash) -> tuple[WriteResult, int]:
        """One attempt; a dead-letter send that fails rolls the transaction back and is retried like an
        unavailable database."""
        sent = 0

        def before_commit(result: WriteResult) -> None:
            nonlocal sent
            crash("after_insert")
            letters = batch.all_dead() + self._refused_letters(result.refused)
            if letters:
                # acknowledged before the rows and offsets commit: a crash in between sends them again
                # (same ids), never loses them
                if self.producer is None:
                    self.producer = kc.make_dlq_producer(self.cfg.kafka)
                sent = kc.send_dead_letters(self.producer, self.cfg.kafka.dlq_topic, letters)
                crash("after_dlq_send")

        try:
            return store.write(batch.all_rows(), claim, before_commit=before_commit), sent
        except (KafkaError, OSError) as exc:
            raise DatabaseUnavailable(f"dead-letter send failed: {logs.short_error(exc)}") from exc

    # -- on the main thread ----------------------------------------------------------------------
    def ready(self) -> None:
        logs.event(log, "migrated", f"table {self.cfg.table} ready", table=self.cfg.table)

    def written(self, w: Written) -> None:
        (res, dead), batch = w.result, w.batch
        kept_rows = sum(len(r) for r in batch.rows.values())
        self.totals.update(rows=res.rows, inserted=res.inserted, updated=res.updated, unchanged=res.unchanged,
                           dead_letters=dead)
        self.metrics.batch(res.inserted, res.updated, res.unchanged, res.deleted, dead, res.seconds)
        if (kept_rows or dead) and log.isEnabledFor(logging.DEBUG):
            logs.event(log, "batch",
                       f"batch {self.totals['batches']}: {res.rows} rows ({res.inserted} new, {res.updated} updated, "
                       f"{res.unchanged} unchanged), {dead} dead letters",
                       logging.DEBUG, rows=res.rows, inserted=res.inserted, updated=res.updated,
                       unchanged=res.unchanged, deleted=res.deleted, dead_letters=dead,
                       partitions=len(batch.start), write_ms=round(res.seconds * 1000, 1),
                       batch_ms=round(w.seconds * 1000, 1), lag=self.lag(), total=self.totals["rows"])

    def start_line(self) -> None:
        cfg = self.cfg
        logs.event(log, "start", f"consumer starting: {cfg.kafka.topic} -> table {cfg.table}",
                   topic=cfg.kafka.topic, dlq_topic=cfg.kafka.dlq_topic, group=cfg.group, table=cfg.table,
                   batch_size=cfg.batch_size, batch_idle_ms=cfg.batch_idle_ms, bootstrap=cfg.kafka.bootstrap_servers,
                   database=safe_url(cfg.database_url), exit_when_idle=self.exit_when_idle_s)

    def progress_line(self, interval_s: float, lag: int | None) -> None:
        t = self.totals
        elapsed = max(time.monotonic() - self.started, 1e-6)
        recent, self.rows_at_progress = t["rows"] - self.rows_at_progress, t["rows"]
        assigned = self.consumer.assignment() if self.consumer is not None else set()
        logs.event(log, "progress", f"{t['rows']} rows in {t['batches']} batches, {t['dead_letters']} dead letters",
                   **self._totals(), lag=lag, partitions=kc.partitions_text(assigned) or None,
                   rate=f"{recent / interval_s:.0f}rows/s", avg_rate=f"{t['rows'] / elapsed:.0f}rows/s",
                   uptime=logs.human_duration(elapsed))

    def stop_line(self, reason: str) -> None:
        logs.event(log, "stop", f"consumer stopped ({reason}): {self.totals['rows']} rows in "
                   f"{self.totals['batches']} batches", reason=reason, **self._totals())

    def _totals(self) -> dict:
        t = self.totals
        return dict(batches=t["batches"], rows=t["rows"], inserted=t["inserted"], updated=t["updated"],
                    unchanged=t["unchanged"], dead_letters=t["dead_letters"], stale_batches=self.stale_batches)

    def close(self) -> None:
        super().close()
        if self.producer is not None:
            try:
                self.producer.close(timeout=5)
            except Exception:  # noqa: BLE001
                pass


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
    return main_of(build_parser(), argv, ConsumerConfig.from_env, lambda cfg, args: Consumer(
        cfg, exit_when_idle_s=args.exit_when_idle, shutdown_timeout_s=args.shutdown_timeout), log, "consumer")


if __name__ == "__main__":
    sys.exit(main())
