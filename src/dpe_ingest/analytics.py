"""``dpe-ingest analytics``: live statistics of the DPE stream, a second consumer group on the data topic.

The course's exercise 6: next to the PostgreSQL sink (group ``dpe-sink``), a consumer group of its own
(``ANALYTICS_GROUP``, default ``dpe-analytics``) counts, per department, the certificates per energy
label A..G (anything else: ``unknown``) and per reception month, the share of F+G ("passoires
thermiques") and the latest reception date, and logs a rate-limited alert summary per department.

Exact under crashes (see docs/analytics.md): the state lives in PostgreSQL tables next to the offsets
it reflects, and each batch moves both in ONE transaction:

- ``<prefix>_keys``: one row per numero_dpe (department, label, month, reception date) -- what makes a
  duplicate count once and a new version of a certificate move it from its old label to its new one;
- ``<prefix>_labels`` / ``<prefix>_months``: the counts, updated by deltas;
- ``<prefix>_skipped``: messages skipped, by reason;
- ``<prefix>_offsets``: per partition, the next offset to apply.  A batch is applied only if it starts
  exactly there (checked under ``SELECT … FOR UPDATE``): a replay after a crash, a stale member after a
  rebalance or a position from the Kafka group behind the database are refused and re-positioned.

The Kafka group offsets are committed too, after the database, but only so that ``dpe-ingest status``
can show the group's lag: they are never trusted for correctness.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from . import logs, metrics
from .config import AnalyticsConfig
from .analytics_report import LABELS, UNKNOWN, Report
from .group_consumer import Batch, GroupConsumer, OffsetClaim, Refused, Stale, Written, main_of, no_crash
from .messages import DELETED_FLAG, Deletion, settle
from .sink import Database, Invalid, parse_message

log = logging.getLogger("dpe_ingest.analytics")

NO_DEPARTMENT = "none"  # rows without a department (departement NULL in dpe_data)
SKIP_REASONS = ("not_json", "no_numero_dpe", "invalid")
OUTCOMES = ("new", "changed", "unchanged", "deleted", "skipped")  # of a message, in Applied and the metrics
REFRESH_COUNTS_S = 2.0
CRASH_POINTS = ("before_db_commit", "after_db_commit")
__all__ = ["Analytics", "CRASH_POINTS", "main", "no_crash"]


def label_of(value: Any) -> str:
    return value if isinstance(value, str) and value in LABELS else UNKNOWN


def month_of(date: dt.date | None) -> str:
    return date.strftime("%Y-%m") if date is not None else UNKNOWN


# ---------------------------------------------------------------------------------------------
# one message -> one fact (or a skip)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fact:
    """The latest version of one certificate, as the analytics sees it (``deleted``: it is gone)."""

    key: str
    department: str
    label: str
    month: str
    date: dt.date | None
    deleted: bool = False

    def cell(self) -> tuple[str, str, str, dt.date | None]:
        return (self.department, self.label, self.month, self.date)


def classify(value: bytes | None, partition: int = 0, offset: int = 0) -> Fact | str:
    """A :class:`Fact`, or the reason the message is skipped (one of :data:`SKIP_REASONS`).

    The same validation as the sink (:func:`dpe_ingest.sink.parse_message`): what the sink refuses
    (and dead-letters) is skipped here, so the counts match ``dpe_data``."""
    try:
        doc = json.loads(value) if value is not None else None
    except (ValueError, UnicodeDecodeError):
        return "not_json"
    if not isinstance(doc, dict):
        return "not_json"
    if not isinstance(doc.get("numero_dpe"), str) or not doc["numero_dpe"].strip():
        return "no_numero_dpe"
    if doc.get(DELETED_FLAG) is True:
        dep = doc.get("departement")
        return Fact(doc["numero_dpe"], NO_DEPARTMENT if dep in (None, "") else str(dep), UNKNOWN, UNKNOWN, None,
                    deleted=True)
    try:
        row = parse_message(value, partition, offset)
    except Invalid:
        return "invalid"
    return Fact(row.numero_dpe, row.departement if row.departement is not None else NO_DEPARTMENT,
                label_of(row.etiquette_dpe), month_of(row.date_reception_dpe), row.date_reception_dpe)


# ---------------------------------------------------------------------------------------------
# the store: state, counts and offsets in PostgreSQL
# ---------------------------------------------------------------------------------------------
@dataclass
class Applied:
    new: int = 0
    changed: int = 0
    unchanged: int = 0
    deleted: int = 0
    skipped: int = 0
    #: department -> certificates that became F or G in this batch
    new_fg: dict[str, int] = field(default_factory=dict)


class Store(Database):
    """The analytics tables (``<prefix>_*``): state, counts and offsets."""

    APPLICATION = "dpe-ingest-analytics"

    def __init__(self, database_url: str, prefix: str, **kw):
        super().__init__(database_url, **kw)
        self.sql = self._pg.sql
        self.prefix = prefix
        self.t = {name: self.sql.Identifier(f"{prefix}_{name}")
                  for name in ("keys", "labels", "months", "skipped", "offsets")}

    def migrate(self) -> None:
        t, q = self.t, self.sql.SQL
        with self.transaction() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('dpe_ingest.migrate'), hashtext(%s))", (self.prefix,))
            cur.execute(q("CREATE TABLE IF NOT EXISTS {} (numero_dpe text PRIMARY KEY, departement text NOT NULL, "
                          "label text NOT NULL, month text NOT NULL, date_reception date)").format(t["keys"]))
            cur.execute(q("CREATE INDEX IF NOT EXISTS {} ON {} (departement, date_reception)")
                        .format(self.sql.Identifier(f"{self.prefix}_keys_dep_date"), t["keys"]))
            cur.execute(q("CREATE TABLE IF NOT EXISTS {} (departement text NOT NULL, label text NOT NULL, "
                          "n bigint NOT NULL, PRIMARY KEY (departement, label))").format(t["labels"]))
            cur.execute(q("CREATE TABLE IF NOT EXISTS {} (departement text NOT NULL, month text NOT NULL, "
                          "n bigint NOT NULL, PRIMARY KEY (departement, month))").format(t["months"]))
            cur.execute(q("CREATE TABLE IF NOT EXISTS {} (reason text PRIMARY KEY, n bigint NOT NULL)")
                        .format(t["skipped"]))
            cur.execute(q("CREATE TABLE IF NOT EXISTS {} (topic text NOT NULL, part integer NOT NULL, "
                          "next_offset bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), "
                          "PRIMARY KEY (topic, part))").format(t["offsets"]))

    def stored_offsets(self, group: str, topic: str) -> dict[int, int]:
        """{partition: next offset to apply} of ``topic`` (the tables are the group's own)."""
        with self.transaction(commit=False) as conn, conn.cursor() as cur:
            cur.execute(self.sql.SQL("SELECT part, next_offset FROM {} WHERE topic = %s AND next_offset >= 0")
                        .format(self.t["offsets"]), (topic,))
            return {int(p): int(o) for p, o in cur.fetchall()}

    def apply(self, topic: str, starts: dict[int, int], ends: dict[int, int], facts: list[Fact],
              skipped: dict[str, int], before_commit=None) -> Applied:
        """One transaction: check that every partition's batch starts at its stored offset, fold the
        facts into state and counts, store the new offsets.  Raises :class:`Stale` (nothing written)."""
        from psycopg2.extras import execute_values

        t, q = self.t, self.sql.SQL
        res = Applied(skipped=sum(skipped.values()))
        with self.transaction() as conn, conn.cursor() as cur:
            parts = sorted(starts)
            execute_values(cur, q("INSERT INTO {} (topic, part, next_offset) VALUES %s "
                                  "ON CONFLICT (topic, part) DO NOTHING").format(t["offsets"]).as_string(conn),
                           [(topic, p, -1) for p in parts])
            cur.execute(q("SELECT part, next_offset FROM {} WHERE topic = %s AND part = ANY(%s) "
                          "ORDER BY part FOR UPDATE").format(t["offsets"]), (topic, parts))
            stored = {int(p): int(o) for p, o in cur.fetchall()}
            stale = {p: stored[p] for p in parts if stored[p] >= 0 and stored[p] != starts[p]}
            if stale:
                raise Stale(stale)
            # in offset order per partition: one action per key, as applying the facts in order would
            # leave it (a deletion only removes a certificate still of its department)
            settled = settle(facts, attrgetter("key"), attrgetter("department"), attrgetter("deleted"))
            last: dict[str, Fact | Deletion] = {f.key: f for f in settled.upserts}
            last.update((d.key, d) for d in settled.deletions)
            keys = sorted(last)
            old: dict[str, tuple] = {}
            if keys:
                cur.execute(q("SELECT numero_dpe, departement, label, month, date_reception FROM {} "
                              "WHERE numero_dpe = ANY(%s) ORDER BY numero_dpe FOR UPDATE").format(t["keys"]),
                            (keys,))
                old = {k: (d, lab, m, day) for k, d, lab, m, day in cur.fetchall()}
            labels: dict[tuple[str, str], int] = {}
            months: dict[tuple[str, str], int] = {}
            upserts, deletes = [], []

            def move(cell, sign):
                d, lab, m = cell[0], cell[1], cell[2]
                labels[(d, lab)] = labels.get((d, lab), 0) + sign
                months[(d, m)] = months.get((d, m), 0) + sign

            for k in keys:
                f, before = last[k], old.get(k)
                if isinstance(f, Deletion):
                    if before is None or not f.applies_to(before[0]):
                        res.unchanged += 1
                        continue
                    move(before, -1)
                    deletes.append(k)
                    res.deleted += 1
                    continue
                now = f.cell()
                if before == now:
                    res.unchanged += 1
                    continue
                if before is None:
                    res.new += 1
                else:
                    move(before, -1)
                    res.changed += 1
                move(now, +1)
                upserts.append((k, *now))
                if f.label in ("F", "G") and (before is None or before[1] not in ("F", "G")):
                    res.new_fg[f.department] = res.new_fg.get(f.department, 0) + 1
            if upserts:
                execute_values(cur, q("INSERT INTO {} (numero_dpe, departement, label, month, date_reception) "
                                      "VALUES %s ON CONFLICT (numero_dpe) DO UPDATE SET departement = "
                                      "EXCLUDED.departement, label = EXCLUDED.label, month = EXCLUDED.month, "
                                      "date_reception = EXCLUDED.date_reception").format(t["keys"])
                               .as_string(conn), upserts, page_size=1000)
            if deletes:
                cur.execute(q("DELETE FROM {} WHERE numero_dpe = ANY(%s)").format(t["keys"]), (deletes,))
            for table, cols, deltas in ((t["labels"], ("departement", "label"), labels),
                                        (t["months"], ("departement", "month"), months)):
                rows = sorted((a, b, n) for (a, b), n in deltas.items() if n)
                if rows:
                    execute_values(cur, q("INSERT INTO {} (departement, {}, n) VALUES %s ON CONFLICT "
                                          "(departement, {}) DO UPDATE SET n = {}.n + EXCLUDED.n")
                                   .format(table, self.sql.Identifier(cols[1]), self.sql.Identifier(cols[1]),
                                           table).as_string(conn), rows)
            if skipped:
                execute_values(cur, q("INSERT INTO {} (reason, n) VALUES %s ON CONFLICT (reason) DO UPDATE "
                                      "SET n = {}.n + EXCLUDED.n").format(t["skipped"], t["skipped"])
                               .as_string(conn), sorted(skipped.items()))
            for p in parts:
                cur.execute(q("UPDATE {} SET next_offset = %s, updated_at = now() WHERE topic = %s AND part = %s")
                            .format(t["offsets"]), (ends[p], topic, p))
            if before_commit is not None:
                before_commit()
        return res

    def counts(self) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
        """(department -> label -> n, reason -> skipped): what the gauges and the alerts show."""
        labels: dict[str, dict[str, int]] = {}
        with self.transaction(commit=False) as conn, conn.cursor() as cur:
            cur.execute(self.sql.SQL("SELECT departement, label, n FROM {}").format(self.t["labels"]))
            for d, lab, n in cur.fetchall():
                labels.setdefault(d, {})[lab] = int(n)
            cur.execute(self.sql.SQL("SELECT reason, n FROM {}").format(self.t["skipped"]))
            skipped = {r: int(n) for r, n in cur.fetchall()}
        return labels, skipped

    def read(self) -> Report:
        """Everything the report shows, read in one snapshot."""
        t, q = self.t, self.sql.SQL
        rep = Report()
        with self.transaction(commit=False) as conn, conn.cursor() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute("SELECT to_regclass(%s)", (f"{self.prefix}_offsets",))
            if cur.fetchone()[0] is None:
                return rep
            cur.execute(q("SELECT departement, label, n FROM {} WHERE n <> 0").format(t["labels"]))
            for d, lab, n in cur.fetchall():
                rep.labels.setdefault(d, {})[lab] = int(n)
            cur.execute(q("SELECT departement, month, n FROM {} WHERE n <> 0").format(t["months"]))
            for d, m, n in cur.fetchall():
                rep.months.setdefault(d, {})[m] = int(n)
            cur.execute(q("SELECT reason, n FROM {}").format(t["skipped"]))
            rep.skipped = {r: int(n) for r, n in cur.fetchall()}
            cur.execute(q("SELECT topic, part, next_offset FROM {} ORDER BY 1, 2").format(t["offsets"]))
            rep.offsets = {f"{topic}:{p}": int(o) for topic, p, o in cur.fetchall()}
            deps = sorted(rep.labels)
            for d in deps:  # the (departement, date_reception) index answers each in one step
                cur.execute(q("SELECT max(date_reception) FROM {} WHERE departement = %s").format(t["keys"]), (d,))
                day = cur.fetchone()[0]
                rep.latest[d] = day.isoformat() if day is not None else None
        return rep


# ---------------------------------------------------------------------------------------------
# alerts: a rate-limited summary per department
# ---------------------------------------------------------------------------------------------
class Alerts:
    """Counts new F/G certificates per department and logs, at most once per ``interval_s`` and
    department, one line: new F/G since the last line, the current count and share; WARNING when
    the share is above ``share`` (ANALYTICS_ALERT_SHARE)."""

    def __init__(self, share: float, interval_s: float, counter=None):
        self.share, self.interval_s, self.counter = share, interval_s, counter
        self.pending: dict[str, int] = {}
        self.last_at: dict[str, float] = {}

    def add(self, new_fg: dict[str, int]) -> None:
        for d, n in new_fg.items():
            self.pending[d] = self.pending.get(d, 0) + n

    def _due(self, d: str, force: bool, now: float) -> bool:
        return bool(self.pending[d]) and (force or now - self.last_at.get(d, -1e18) >= self.interval_s)

    def due(self, now: float | None = None) -> bool:
        """Whether :meth:`emit` would write a summary now (the caller then reads fresh counts first)."""
        now = time.monotonic() if now is None else now
        return any(self._due(d, False, now) for d in self.pending)

    def emit(self, counts: dict[str, dict[str, int]], force: bool = False, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        lines = 0
        for d in sorted(self.pending):
            if not self._due(d, force, now):
                continue
            n = self.pending[d]
            by = counts.get(d, {})
            total = sum(by.values())
            fg = by.get("F", 0) + by.get("G", 0)
            share = fg / total if total else 0.0
            above = share > self.share
            level = logging.WARNING if above else logging.INFO
            logs.event(log, "fg_alert",
                       f"department {d}: {n} new F/G certificate(s) (passoires thermiques) since the last summary; "
                       f"{fg} of {total} = {100 * share:.1f}%" + (f", above the {100 * self.share:.0f}% threshold"
                                                                  if above else ""),
                       level, department=d, new_fg=n, fg=fg, rows=total, fg_share=round(share, 4),
                       threshold=self.share, above=above)
            if self.counter is not None:
                self.counter.labels("warning" if above else "info").inc()
            self.pending[d] = 0
            self.last_at[d] = now
            lines += 1
        return lines


# ---------------------------------------------------------------------------------------------
# the consumer
# ---------------------------------------------------------------------------------------------
class Analytics(GroupConsumer):
    """The analytics group: facts folded into the counts with their offsets, skips counted by reason."""

    log = log
    NAME = "analytics"
    CRASH_POINTS = CRASH_POINTS

    def __init__(self, cfg: AnalyticsConfig, *, exit_when_idle_s: float | None = None, store: Store | None = None,
                 crash=None):
        # messages per transaction: 5 x BATCH_SIZE (counting is cheaper than storing whole rows)
        super().__init__(cfg, metrics.AnalyticsMetrics(), batch_size=cfg.batch_size * 5,
                         exit_when_idle_s=exit_when_idle_s, crash=crash, store=store)
        self.alerts = Alerts(cfg.alert_share, cfg.alert_interval_s, self.metrics.alerts)
        self.counts: dict[str, dict[str, int]] = {}
        self.counts_at = 0.0

    def open_store(self) -> Store:
        return Store(self.cfg.database_url, self.cfg.table_prefix)

    def parse(self, msg):
        got = classify(msg.value, msg.partition, msg.offset)
        if isinstance(got, str):
            logs.event(log, "skipped", f"message skipped: {got}", logging.DEBUG, reason=got,
                       partition=msg.partition, offset=msg.offset)
            return Refused(got)
        return got

    def write(self, store: Store, batch: Batch, claim: OffsetClaim, crash) -> Applied:
        """The facts, the skips and the offsets of ``batch`` in one transaction (:meth:`Store.apply`)."""
        return store.apply(claim.topic, {p: s for p, (s, _) in claim.ranges.items()},
                           {p: n for p, (_, n) in claim.ranges.items()}, batch.all_rows(),
                           dict(Counter(batch.all_dead())), before_commit=lambda: crash("before_db_commit"))

    def written(self, w: Written) -> None:
        res = w.result
        self.metrics.batch_seconds.observe(w.seconds)
        for outcome in OUTCOMES:
            n = getattr(res, outcome)
            if n:
                self.metrics.messages.labels(outcome).inc(n)
                self.totals[outcome] += n
        self.alerts.add(res.new_fg)
        logs.event(log, "batch", f"batch {self.totals['batches']}: {res.new} new, {res.changed} changed, {res.unchanged} "
                   f"unchanged, {res.deleted} deleted, {res.skipped} skipped", logging.DEBUG, new=res.new,
                   changed=res.changed, unchanged=res.unchanged, deleted=res.deleted, skipped=res.skipped)

    def _refresh_counts(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.counts_at < REFRESH_COUNTS_S:
            return
        reader = self._reader()
        labels, skipped = self.db_call(reader.counts, "counts read", store=reader)
        self.counts, self.counts_at = labels, time.monotonic()
        self.metrics.set_counts(labels, skipped)

    def ready(self) -> None:
        self._refresh_counts(force=True)

    def tick(self) -> None:
        # a summary's F/G total is read when it is written: its new F/G and its totals are of one moment
        self._refresh_counts(force=self.alerts.due())
        self.alerts.emit(self.counts)

    def start_line(self) -> None:
        cfg = self.cfg
        logs.event(log, "start", f"analytics starting: {cfg.kafka.topic} (group {cfg.group}) -> tables "
                   f"{cfg.table_prefix}_*", topic=cfg.kafka.topic, group=cfg.group, prefix=cfg.table_prefix,
                   alert_share=cfg.alert_share, alert_interval_s=cfg.alert_interval_s)

    def progress_line(self, interval_s: float, lag: int | None) -> None:
        t = {"batches": self.totals["batches"], **{o: self.totals[o] for o in OUTCOMES}}
        logs.event(log, "progress", "{batches} batches: {new} new, {changed} changed, {unchanged} unchanged, "
                   "{deleted} deleted, {skipped} skipped".format(**t), **t, lag=lag, departments=len(self.counts))

    def stop_line(self, reason: str) -> None:
        logs.event(log, "stop", f"analytics stopped ({reason})", reason=reason, batches=self.totals["batches"])

    def close(self) -> None:
        try:  # the last summaries, with the counts as they are now (one attempt)
            labels, skipped = self._reader().counts()
            self.counts = labels
            self.metrics.set_counts(labels, skipped)
            self.alerts.emit(self.counts, force=True)
        except Exception:  # noqa: BLE001
            pass
        super().close()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpe-ingest analytics",
        description="Live statistics of the DPE topic in a consumer group of its own (ANALYTICS_GROUP, default "
        "dpe-analytics): per department, certificates per energy label and reception month, F+G share, latest "
        "reception date, and a rate-limited alert summary. Exact under crashes: counts and offsets move in one "
        "PostgreSQL transaction (DATABASE_URL, tables ANALYTICS_TABLE_PREFIX_*). See docs/analytics.md.")
    p.add_argument("--report", action="store_true", help="print the counts per department and exit")
    p.add_argument("--json", action="store_true", help="print the counts as one JSON document and exit")
    p.add_argument("--exit-when-idle", type=float, metavar="SECONDS",
                   help="exit 0 once nothing arrived for SECONDS and every assigned partition is applied to its end "
                   "(local runs and tests; the Deployment runs forever)")
    return p


def report(cfg: AnalyticsConfig) -> Report:
    store = Store(cfg.database_url, cfg.table_prefix)
    try:
        return store.read()
    finally:
        store.close()


def _report(args, cfg: AnalyticsConfig) -> int | None:
    """--report / --json: print the counts (exit 0, or 1 when the tables cannot be read); else None."""
    if not (args.report or args.json):
        return None
    try:
        rep = report(cfg)
    except Exception as exc:  # noqa: BLE001
        print(f"dpe-ingest analytics: cannot read the analytics tables: {logs.short_error(exc)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rep.to_json(), indent=2))
    else:
        sys.stdout.write(rep.render())
    return 0


def main(argv: list[str] | None = None) -> int:
    return main_of(build_parser(), argv, AnalyticsConfig.from_env,
                   lambda cfg, args: Analytics(cfg, exit_when_idle_s=args.exit_when_idle), log, "analytics", _report)


if __name__ == "__main__":
    sys.exit(main())
