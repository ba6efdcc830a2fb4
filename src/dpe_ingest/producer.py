"""``dpe-ingest produce``: one department of the ADEME API into Kafka, then exit.

What a department's Kubernetes Job runs.  Flow per page: fetch (the next page is prefetched while the
current one is sent), validate each row (bad rows go to the dead-letter topic with the reason), send
the good ones keyed by numero_dpe (pipelined, idempotent, ``acks=all``), wait for every ack, then
checkpoint the page's cursor in Kafka.  A restart resumes after the last checkpoint; a finished
department is not fetched again unless PRODUCER_RESTART=true.

Exit codes: 0 the API ran dry (or the department was already finished); 1 gave up on the API or Kafka
after bounded retries (Kubernetes retries the Job); 2 bad configuration (e.g. an invalid department
code); 3 the API refused the request (a 4xx: retrying cannot help); 143 stopped by SIGTERM after
checkpointing (the next run resumes).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson

from . import departments, logs, messages
from .ademe import (MOD_FIELD, AdemeClient, ApiAuthError, ApiInterrupted, ApiRequestError, ApiUnavailable,
                    build_qs, cursor_line)
from .config import CONTRACT, ConfigError, ProducerConfig
from .kafka_io import (CheckpointStore, KafkaUnavailable, SendTracker, Slot, ensure_topics, make_producer,
                       pipeline_topics, slots_topic, wait_for_kafka)
from .budget import BudgetShare, budget_topic
from .kafka_security import check_topic_access

log = logging.getLogger("dpe_ingest.producer")

EXIT_OK, EXIT_GAVE_UP, EXIT_CONFIG, EXIT_REFUSED, EXIT_TERMINATED = 0, 1, 2, 3, 143
CHECKPOINT_VERSION = 2  # 2: + "dataset" (identity) and "hwm_i" (largest _i reached)
LABELS = frozenset("ABCDEFG")
_POSTCODE = re.compile(r"[0-9]{5}", re.ASCII)  # fullmatch: "$" also matched before a final newline
#: a pass restarted this many times because the dataset was re-created under it gives up (exit 1)
MAX_PASS_RESTARTS = 3
KEY_PAGE_SIZE = 10000  # key-only pages of a refresh (select=numero_dpe): data-fair's largest size


def validate_row(row: Any) -> str | None:
    """Return why ``row`` cannot be ingested, or None when it is fine."""
    if not isinstance(row, dict):
        return f"row is a {type(row).__name__}, not an object"
    numero = row.get("numero_dpe")
    if not isinstance(numero, str) or not numero.strip():
        return "missing numero_dpe"
    date = row.get("date_reception_dpe")
    if date is not None and not _is_iso_date(date):
        return f"unparsable date_reception_dpe {date!r} (expected YYYY-MM-DD)"
    label = row.get("etiquette_dpe")
    if label is not None and not (isinstance(label, str) and label in LABELS):
        return f"unparsable etiquette_dpe {label!r} (expected A..G)"
    postcode = row.get("code_postal_ban")
    if postcode is not None and not (isinstance(postcode, str) and _POSTCODE.fullmatch(postcode)):
        return f"unparsable code_postal_ban {postcode!r} (expected 5 digits)"
    return None


def _is_iso_date(value: Any) -> bool:
    """``YYYY-MM-DD`` (a time part after it is allowed and dropped by to_message)."""
    if not isinstance(value, str) or len(value) < 10:
        return False
    try:
        dt.date.fromisoformat(value[:10])
    except ValueError:
        return False
    return True


def encode_message(msg: dict) -> bytes:
    """The message as UTF-8 JSON, what ``json.dumps(msg, ensure_ascii=False)`` writes less its spaces.

    orjson writes the common message (every value a string or null) about 5x faster.  Anything else
    (ADEME_EXTRA_FIELDS may bring numbers, lists…) goes through the standard library as before: orjson
    would write NaN and infinities as null and refuses integers beyond 64 bits.  A string that is not
    valid Unicode (a lone surrogate, which JSON's \\u escapes can carry) raises UnicodeEncodeError."""
    for v in msg.values():
        if v is not None and type(v) is not str:
            return json.dumps(msg, ensure_ascii=False).encode("utf-8")
    try:
        return orjson.dumps(msg)
    except TypeError:  # a lone surrogate: the standard library says so in its own words
        return json.dumps(msg, ensure_ascii=False).encode("utf-8")


def to_message(row: dict, fields: tuple[str, ...], department: str) -> dict:
    msg = {f: row.get(f) for f in fields}
    if isinstance(msg.get("date_reception_dpe"), str):
        msg["date_reception_dpe"] = msg["date_reception_dpe"][:10]
    msg["departement"] = departments.stored_department(department)  # None (SQL NULL) for `none`
    return msg


@dataclass
class Progress:
    department: str
    started: float
    rows_at_start: int  # rows already sent by earlier runs (resume)
    rows: int = 0  # rows sent, all runs
    dead: int = 0
    pages: int = 0
    total: int | None = None

    def line(self, page_no: int, page_rows: int, share: float | None = None) -> None:
        """One ``event=page`` line; ``share``: of the API budget group, when this producer has one."""
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (self.rows + self.dead - self.rows_at_start) / elapsed
        done = self.rows + self.dead
        eta = (self.total - done) / rate if self.total is not None and rate > 0 else None
        # a row updated while the pass runs is served again later: never past 100 %
        pct = min(100.0, 100.0 * done / self.total) if self.total else None
        total_txt = f"/{self.total}" if self.total is not None else ""
        pct_txt = f" ({pct:.1f}%)" if pct is not None else ""
        logs.event(
            log, "page",
            f"dep {self.department} page {page_no}: {done}{total_txt} rows{pct_txt}, {rate:.0f} rows/s, "
            f"ETA {logs.human_duration(eta)}" + (f", API budget share {share:.3f}" if share is not None else ""),
            department=self.department, page=page_no, page_rows=page_rows, rows=self.rows, dead=self.dead,
            total=self.total, pct=None if pct is None else round(pct, 1), rate=round(rate, 1),
            eta_s=None if eta is None else round(eta), **({"share": round(share, 4)} if share is not None else {}),
        )


def _warm_up(producer, topics) -> None:
    """Ask for the topics' metadata in the background while the checkpoint is read: the first page need not
    wait for it (kafka-python waits up to 0.1 s before a new client's first metadata refresh)."""
    def run() -> None:
        for topic in topics:
            try:
                producer.partitions_for(topic)
            except Exception:  # noqa: BLE001 - only a head start: the first send waits or fails as usual
                return

    threading.Thread(target=run, name="metadata-warm-up", daemon=True).start()


class Producer:
    def __init__(self, cfg: ProducerConfig, stop: threading.Event | None = None, refresh: bool = False,
                 env: dict | None = None):
        self.cfg = cfg
        self.refresh = refresh
        self.env = dict(os.environ if env is None else env)  # a refresh reads DATABASE_URL, DB_TABLE…
        self.stop = stop or threading.Event()
        self.ctx = {"department": cfg.department}
        self.fields = cfg.fields  # a property that builds the tuple: once, not once per row
        self.budget = None
        self.progress: Progress | None = None  # the pass under way (what a failed run reports it sent)
        if cfg.budget_partitions > 0:  # the release's API budget, shared through a Kafka consumer group
            self.budget = BudgetShare(cfg.kafka.bootstrap_servers,
                                      budget_topic(cfg.kafka, cfg.checkpoint_topic, cfg.budget_partitions),
                                      context=self.ctx, security=cfg.kafka.security,
                                      join_timeout_s=min(60.0, cfg.kafka_wait_s))
        self.client = AdemeClient(cfg.api_url, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                                  retry_max_s=cfg.retry_max_s, max_rps=cfg.max_rps, context=self.ctx,
                                  api_key=cfg.api_key, rate_window_s=cfg.rate_window_s, stop=self.stop,
                                  budget_file=cfg.budget_file,
                                  share=self.budget.share if self.budget is not None else None,
                                  bandwidth=cfg.bandwidth, compute_ms=cfg.compute_ms,
                                  cost_base_ms=cfg.cost_base_ms, cost_per_row_ms=cfg.cost_per_row_ms)

    def _join_budget(self) -> None:
        """Take a share of the release's budget: right before the first page (the start-up requests go
        within the limiter's burst), so a producer still starting holds no share it cannot use."""
        if self.budget is not None:
            self.budget.fallback = 1.0 / max(1, self.client.limiter.departments)
            self.budget.join(stop=self.stop)
        self.client.limiter.stagger(self.cfg.page_size * self.client.bytes_per_row, self.client.rng)

    def _leave_budget(self) -> None:
        """Hand the share over to the producers still running (as soon as the last page is read)."""
        if self.budget is not None:
            self.budget.close()

    def fingerprint(self) -> dict:
        return {"department": self.cfg.department, "date_from": self.cfg.date_from,
                "date_to": self.cfg.date_to, "topic": self.cfg.kafka.topic, "api": self.cfg.api_url}

    def _same_dataset(self, ckpt: dict) -> dict | None:
        """The checkpoint, or None when it belongs to an earlier incarnation of the dataset.

        A re-created dataset restarts its ``_i`` from small values: a stored cursor would skip every
        row and mark the department done.  Two checks: the dataset's identity (id, createdAt) stored
        with the checkpoint, and the largest ``_i`` the dataset has now against the largest one the
        checkpoint reached (one cheap request, sort=-_i size=1)."""
        why = self._recreated_since(ckpt.get("dataset"), ckpt.get("hwm_i"), self.meta)
        if why is None:
            return ckpt
        logs.event(log, "dataset_recreated", f"the dataset was re-created ({why}): the checkpoint no longer "
                   f"applies, fetching department {self.cfg.department} in full again", logging.WARNING,
                   checkpoint_rows=ckpt.get("rows"), checkpoint_done=ckpt.get("done"), **self.ctx)
        return None

    def _recreated_since(self, identity: Any, hwm: int | None, meta_now: dict) -> str | None:
        """Why the dataset described by ``meta_now`` is not the one whose identity (id, createdAt) was
        ``identity`` and whose lines reached ``_i`` = ``hwm``; None when it is the same."""
        now = {"id": meta_now.get("id"), "createdAt": meta_now.get("createdAt")}
        if isinstance(identity, dict) and identity != now:
            return f"its identity changed ({json.dumps(identity)} -> {json.dumps(now)})"
        if hwm is not None:
            now_max = self.client.max_line()
            if now_max is None or now_max < hwm:
                return f"its largest _i is {now_max}, below the {hwm} this department had reached"
        return None

    def run(self) -> int:
        cfg, ctx = self.cfg, self.ctx
        t0 = time.monotonic()
        # the API first: a wrong API key (401) or URL fails here, before anything is written to Kafka
        self.meta = self.client.dataset_info()
        admin = wait_for_kafka(cfg.kafka.bootstrap_servers, timeout_s=cfg.kafka_wait_s, context=ctx,
                               security=cfg.kafka.security)
        # every ACL this Job needs, checked before its first write (a missing one is exit 2, nothing sent)
        needs = {cfg.kafka.topic: ("WRITE",), cfg.kafka.dlq_topic: ("WRITE",), cfg.checkpoint_topic: ("READ", "WRITE")}
        try:
            if not cfg.kafka.create_topics:
                # topics managed elsewhere: one our principal may not see (no ACL on it: WRITE or READ give
                # DESCRIBE) is an ACL to grant, not a topic to create
                check_topic_access(admin, cfg.kafka.security, needs)
            created = ensure_topics(admin, pipeline_topics(cfg.kafka, cfg.checkpoint_topic), cfg.kafka.security,
                                    create=cfg.kafka.create_topics)
            check_topic_access(admin, cfg.kafka.security, needs)
            if self.budget is not None:
                self.budget.prepare(admin, create=cfg.kafka.create_topics)
        finally:
            admin.close()
        if created:
            logs.event(log, "topics_created", f"created topics {', '.join(created)}", topics=",".join(created),
                       **ctx)
        slot = None
        if cfg.max_concurrent > 0:  # producer.maxConcurrent: wait for one of the slots
            slot = Slot(cfg.kafka.bootstrap_servers, slots_topic(cfg.kafka, cfg.checkpoint_topic, cfg.max_concurrent),
                        context=ctx, security=cfg.kafka.security)
            slot.acquire(stop=self.stop)
        producer = make_producer(cfg.kafka.bootstrap_servers, cfg.kafka.security)
        _warm_up(producer, (cfg.kafka.topic, cfg.checkpoint_topic))
        try:
            return self._run(producer, t0)
        finally:
            self._leave_budget()
            producer.close(timeout=30)
            if slot is not None:
                slot.release()

    def _run(self, producer, t0: float) -> int:
        cfg, ctx = self.cfg, self.ctx
        store = CheckpointStore(cfg.kafka.bootstrap_servers, cfg.checkpoint_topic, producer, context=ctx,
                                security=cfg.kafka.security)
        key = cfg.department
        ckpt = store.load(key)
        fp = self.fingerprint()
        meta = self.meta
        self.identity = {"id": meta.get("id"), "createdAt": meta.get("createdAt")}
        self.dataset_count = meta.get("count")
        if ckpt and ckpt.get("query") != fp:
            logs.event(log, "checkpoint_ignored", "checkpoint is for another query (dates, topic or API "
                       "changed): starting from the first page", checkpoint_query=json.dumps(ckpt.get("query")),
                       **ctx)
            ckpt = None
        if ckpt:
            ckpt = self._same_dataset(ckpt)
        if ckpt and cfg.restart:
            logs.event(log, "restart", "PRODUCER_RESTART=true: ignoring the checkpoint, fetching the "
                       "department again from the first page", **ctx)
            ckpt = None
        if ckpt and ckpt.get("done") and self.refresh:
            return self._refresh(producer, store, ckpt, t0)
        if ckpt and ckpt.get("done"):
            logs.event(log, "already_done", f"department {cfg.department} already finished "
                       f"({ckpt.get('rows', 0)} rows, {ckpt.get('dead', 0)} dead letters); nothing to do. "
                       "Set PRODUCER_RESTART=true to fetch it again.", rows=ckpt.get("rows"),
                       dead=ckpt.get("dead"), **ctx)
            return EXIT_OK
        restarts = 0
        while True:
            prog = self.progress = Progress(cfg.department, time.monotonic(), rows_at_start=0)
            outcome = self._pass(producer, store, ckpt, prog)
            if outcome != "recreated":
                break
            # the dataset was re-created while this pass read it: its cursor now points past the new
            # dataset's end and the pass ended short; what was sent stays correct (upserts by key)
            restarts += 1
            if restarts > MAX_PASS_RESTARTS:
                raise ApiUnavailable(f"the dataset was re-created {restarts} times during department "
                                     f"{cfg.department}'s pass; giving up (the next run starts over)")
            ckpt = None
        if outcome == "stopped":
            return EXIT_TERMINATED
        if self.refresh:  # a first pass (or a resumed one) of a refresh: bring the table in sync now
            return self._refresh(producer, store, store.load(cfg.department) or {}, t0)
        seconds = time.monotonic() - t0
        c = self.client
        rate = c.requests_made / seconds if seconds > 0 else 0.0
        logs.event(log, "done", f"department {cfg.department} done: {prog.rows} rows sent, {prog.dead} dead "
                   f"letters, {prog.pages} pages in {seconds:.1f}s (API total {prog.total}); "
                   f"{c.requests_made} API requests at {rate:.2f}/s, {c.throttled} answered 429 "
                   f"({c.throttled_s:.0f}s waited)",
                   rows=prog.rows, dead=prog.dead, pages=prog.pages, total=prog.total,
                   seconds=round(seconds, 1), api_requests=c.requests_made, api_rps=round(rate, 3),
                   api_retries=c.retries_made, api_throttled=c.throttled, api_throttled_s=round(c.throttled_s, 1),
                   api_throttled_rate=c.throttled_kinds.get("request_rate", 0),
                   api_throttled_compute=c.throttled_kinds.get("compute_budget", 0),
                   api_timeouts=c.timeouts, api_bytes=c.bytes_received, **ctx)
        self.push_summary(seconds, ok=True)
        return EXIT_OK

    def push_summary(self, seconds: float, ok: bool) -> None:
        """A Job is too short-lived to be scraped: its summary (the rows the pass under way sent) also goes
        to a Pushgateway when one is set, at the end of a run that succeeded and of one that failed
        (dpe_producer_success 0: the chart's DpeIngestProducerFailed alert)."""
        from . import metrics  # here: prometheus_client costs a tenth of a second at every start otherwise

        prog = self.progress
        metrics.push_producer_summary(self.cfg.pushgateway_url, self.cfg.department, prog.rows if prog else 0,
                                      prog.dead if prog else 0, seconds, ok=ok, grouping=dict(self.cfg.push_grouping))

    def _pass(self, producer, store, ckpt: dict | None, prog: Progress) -> str:
        """Read the department's pages into Kafka from the checkpoint (or the first page): "done",
        "stopped" (a signal; checkpoint saved) or "recreated" (the dataset was re-created during the
        pass: nothing marks the department done, the caller starts over)."""
        cfg, ctx = self.cfg, self.ctx
        after = None
        page_no = 0
        hwm = ckpt.get("hwm_i") if ckpt else None
        # the refresh mark: the latest date_derniere_modification_dpe of the department when this pass
        # starts, read from the API (never the local clock); a refresh re-reads what changed since
        mark = ckpt.get("mark") if ckpt else self._api_mark()
        # how many rows of the dataset have no department (what `none` fetches), from the API: shown by
        # `dpe-ingest status` and the run summary, so that "every department plus none" can be checked
        without = ckpt.get("api_without_department") if ckpt else self._api_without_department()
        if ckpt:
            after = ckpt.get("after")
            page_no, prog.rows, prog.dead = ckpt.get("page", 0), ckpt.get("rows", 0), ckpt.get("dead", 0)
            prog.total = ckpt.get("total")  # data-fair gives `total` on the first page only
            prog.rows_at_start = prog.rows + prog.dead
            logs.event(log, "resume", f"resuming department {cfg.department} after page {page_no} "
                       f"({prog.rows} rows already in Kafka)", page=page_no, rows=prog.rows, after=after, **ctx)
        else:
            logs.event(log, "start", f"department {cfg.department}: fetching {cfg.api_url} "
                       f"({cfg.page_size} rows per call) into topic {cfg.kafka.topic}",
                       api=cfg.api_url, topic=cfg.kafka.topic, page_size=cfg.page_size, **ctx)

        params = self.client.first_params(department=cfg.department, fields=cfg.fields, size=cfg.page_size,
                                          date_from=cfg.date_from, date_to=cfg.date_to, after=after)
        tracker = SendTracker(cfg.kafka.bootstrap_servers, ctx)
        fetched_with = after  # the cursor of the page at hand: what a resume re-reads it with
        self._join_budget()
        # the next page is fetched, checked and encoded in another thread while this one goes to Kafka
        for page in self.client.pages(params, prepare=self._encode_page):
            page_no += 1
            if page.total is not None:
                prog.total = page.total
            if not page.has_next:
                self._leave_budget()  # the last page is read: its share goes to the others now
            self._send_page(producer, tracker, page, page_no, fetched_with, prog)
            tracker.flush(producer, timeout_s=180)
            if not page.has_next and self._ended_short(page, page_no, prog, hwm):
                return "recreated"
            line = cursor_line(page.after)
            if line is not None and (hwm is None or line > hwm):
                hwm = line
            store.save(cfg.department, {
                "v": CHECKPOINT_VERSION, "query": self.fingerprint(), "dataset": self.identity, "hwm_i": hwm,
                "mark": mark, "api_without_department": without, "after": page.after, "page": page_no,
                "rows": prog.rows, "dead": prog.dead, "total": prog.total, "done": not page.has_next,
                "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            })
            fetched_with = page.after
            prog.pages += 1
            prog.line(page_no, len(page.rows), share=self.client.limiter.share() if self.budget is not None else None)
            if page.has_next and self.stop.is_set():
                logs.event(log, "stopped", f"stopped by signal after page {page_no}; checkpoint saved, "
                           "the next run resumes here", logging.WARNING, page=page_no, rows=prog.rows, **ctx)
                return "stopped"
        return "done"

    def _ended_short(self, page, page_no: int, prog: Progress, hwm: int | None) -> bool:
        """At the last page of a pass that looks short (fewer rows than the API's total, or an empty
        page where a ``next`` link led): whether the dataset was re-created meanwhile.  A short pass
        of the same dataset is rows deactivated while it ran, and ends normally."""
        short = (prog.total is not None and prog.rows + prog.dead < prog.total) or (page_no > 1 and not page.rows)
        if not short:
            return False
        meta = self.client.dataset_info()
        why = self._recreated_since(self.identity, hwm, meta)
        if why is None:
            logs.event(log, "short_pass", f"department {self.cfg.department}: the pass read {prog.rows + prog.dead} "
                       f"rows of the {prog.total} announced; the dataset is the same (rows deactivated while it "
                       "ran)", rows=prog.rows, dead=prog.dead, total=prog.total, **self.ctx)
            return False
        logs.event(log, "dataset_recreated", f"the dataset was re-created during the pass ({why}) after "
                   f"{prog.rows + prog.dead} of {prog.total} rows: reading department {self.cfg.department} "
                   "again from the first page", logging.WARNING, rows=prog.rows, dead=prog.dead, total=prog.total,
                   page=page_no, **self.ctx)
        self.meta, self.identity = meta, {"id": meta.get("id"), "createdAt": meta.get("createdAt")}
        return True

    # -------------------------------------------------------------------------------------------- refresh
    def _api_mark(self) -> str | None:
        """The largest date_derniere_modification_dpe of this department's query, from the API."""
        cfg = self.cfg
        body = self.client.get_json(self.client.dataset_url + "/metric_agg", {
            "metric": "max", "field": MOD_FIELD,
            "qs": build_qs(cfg.department, cfg.date_from, cfg.date_to)})
        value = body.get("metric")
        return value[:10] if isinstance(value, str) and len(value) >= 10 else None


    def _api_without_department(self) -> dict:
        """{"count", "at"}: the rows of the whole dataset without code_departement_ban, now."""
        page = self.client.fetch(self.client.lines_url, {"size": 0, "qs": build_qs(departments.NONE)})
        at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        return {"count": page.total, "at": at}

    def _refresh(self, producer, store, ckpt: dict, t0: float) -> int:
        """Bring dpe_data to the API's current state for this department, at the cost of what changed.

        1. wait until the consumer stored everything already in the topic, then read our keys of the
           department from dpe_data;
        2. the new mark (the API's latest date_derniere_modification_dpe, read now);
        3. the delta: ``qs=<department> AND date_derniere_modification_dpe:[<previous mark> TO *]``, sent
           like a pass (updated rows are upserted, new rows inserted);
        4. deactivated rows: the API's count of the department against ours (our keys plus the delta); where
           they differ, key-only pages (``select=numero_dpe``, ``size=10000``) give the API's keys, and every
           key of ours missing there gets a deletion message (the consumer deletes the row);
        5. a checkpoint with the new mark.
        """
        cfg, ctx = self.cfg, self.ctx
        from .config import ConsumerConfig
        from .kafka_io import wait_until_stored
        from .sink import department_keys

        db = ConsumerConfig.from_env(self.env)
        wait_until_stored(cfg.kafka.bootstrap_servers, cfg.kafka.topic, db.group, timeout_s=cfg.refresh_wait_s,
                          stop=self.stop, context=ctx, security=cfg.kafka.security)
        ours = department_keys(db.database_url, db.table, departments.stored_department(cfg.department))
        old_mark = ckpt.get("mark")
        new_mark = self._api_mark()
        logs.event(log, "refresh_start", f"refresh of department {cfg.department}: {len(ours)} rows in "
                   f"{db.table}; re-reading rows modified since {old_mark or 'ever (no mark: a full re-read)'}",
                   rows_ours=len(ours), mark=old_mark, new_mark=new_mark, **ctx)
        # 3. the delta
        params = self.client.first_params(department=cfg.department, fields=cfg.fields, size=cfg.page_size,
                                          date_from=cfg.date_from, date_to=cfg.date_to, modified_from=old_mark)
        tracker = SendTracker(cfg.kafka.bootstrap_servers, ctx)
        prog = Progress(cfg.department, time.monotonic(), rows_at_start=0)
        self._join_budget()
        seen: set[str] = set()
        inserted = updated = 0
        page_no = 0
        fetched_with = None
        for page in self.client.pages(params):
            page_no += 1
            for index, row in enumerate(page.rows):
                numero = self._send_row(producer, tracker, row, page, page_no, fetched_with, index, prog)
                if numero is not None and numero not in seen:
                    seen.add(numero)
                    if numero in ours:
                        updated += 1
                    else:
                        inserted += 1
            tracker.flush(producer, timeout_s=180)
            fetched_with = page.after
        # 4. deactivated rows
        api_count = self.client.fetch(self.client.lines_url, {
            "size": 0, "qs": build_qs(cfg.department, cfg.date_from, cfg.date_to)}).total
        mine = ours | seen
        deleted = 0
        key_pages = 0
        if api_count is None or api_count != len(mine):
            theirs: set[str] = set()
            for page in self.client.pages({"size": KEY_PAGE_SIZE, "select": "numero_dpe",
                                           "qs": build_qs(cfg.department, cfg.date_from, cfg.date_to)}):
                key_pages += 1
                theirs.update(r["numero_dpe"] for r in page.rows if isinstance(r, dict) and r.get("numero_dpe"))
            dep_value = departments.stored_department(cfg.department)
            for numero in sorted(mine - theirs):
                doc = messages.deletion(numero, dep_value)
                tracker.add(producer.send(cfg.kafka.topic, key=numero.encode("utf-8"),
                                          value=json.dumps(doc, ensure_ascii=False).encode("utf-8")))
                deleted += 1
            tracker.flush(producer, timeout_s=180)
        # 5. the new mark
        now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        doc = dict(ckpt)
        doc.update({"v": CHECKPOINT_VERSION, "query": self.fingerprint(), "dataset": self.identity,
                    "mark": new_mark if new_mark is not None else old_mark, "done": True, "at": now,
                    "refresh": {"at": now, "updated": updated, "inserted": inserted, "deleted": deleted,
                                "dead": prog.dead, "api_count": api_count, "key_pages": key_pages,
                                "api_requests": self.client.requests_made}})
        doc["dead"] = int(doc.get("dead") or 0) + prog.dead
        store.save(cfg.department, doc)
        seconds = time.monotonic() - t0
        logs.event(log, "refreshed", f"department {cfg.department} refreshed: {updated} updated, {inserted} new, "
                   f"{deleted} deleted (deactivated in the API), {prog.dead} dead letters; API count {api_count}; "
                   f"{self.client.requests_made} API requests in {seconds:.1f}s",
                   updated=updated, inserted=inserted, deleted=deleted, dead=prog.dead, api_count=api_count,
                   key_pages=key_pages, mark=new_mark, seconds=round(seconds, 1),
                   api_requests=self.client.requests_made, api_throttled=self.client.throttled, **ctx)
        return EXIT_OK


    def _encode_row(self, row) -> tuple[str | None, Any]:
        """(numero_dpe, the message's bytes) of a good row; (None, why it is refused) of a bad one."""
        reason = validate_row(row)
        if reason is None:
            msg = to_message(row, self.fields, self.cfg.department)
            try:
                return msg["numero_dpe"], encode_message(msg)
            except UnicodeEncodeError as exc:
                reason = f"a value is not valid Unicode text ({exc.reason}: {exc.object[exc.start:exc.end]!r})"
            except (ValueError, RecursionError) as exc:  # an integer beyond 4300 digits, lists nested ~1000 deep
                reason = f"a value cannot be written as JSON ({type(exc).__name__}: {str(exc)[:200]})"
        return None, reason

    def _encode_page(self, page) -> list[tuple[str | None, Any]]:
        """:meth:`_encode_row` of every row of a page (runs in the prefetch thread: see AdemeClient.pages)."""
        encode = self._encode_row
        return [encode(row) for row in page.rows]

    def _send_page(self, producer, tracker, page, page_no, fetched_with, prog) -> None:
        """Send the rows of a page prepared by :meth:`_encode_page`, and the dead letters of its bad rows."""
        send, topic, add = producer.send, self.cfg.kafka.topic, tracker.futures.append
        prepared = page.prepared if page.prepared is not None else self._encode_page(page)
        sent = 0
        for index, (numero, value) in enumerate(prepared):
            if numero is not None:
                add(send(topic, key=numero.encode("utf-8"), value=value))
                sent += 1
            else:
                self._dead_letter(producer, tracker, value, page.rows[index], page, page_no, fetched_with, index,
                                  prog)
        prog.rows += sent

    def _send_row(self, producer, tracker, row, page, page_no, fetched_with, index, prog) -> str | None:
        """Send one API row (or its dead letter); the numero_dpe sent, or None."""
        numero, value = self._encode_row(row)
        if numero is not None:
            tracker.add(producer.send(self.cfg.kafka.topic, key=numero.encode("utf-8"), value=value))
            prog.rows += 1
            return numero
        self._dead_letter(producer, tracker, value, row, page, page_no, fetched_with, index, prog)
        return None

    def _dead_letter(self, producer, tracker, reason, row, page, page_no, fetched_with, index, prog) -> None:
        cfg = self.cfg
        value, headers = messages.build(
            reason, "producer", payload=row, department=cfg.department,
            letter_id=messages.producer_id(cfg.department, fetched_with, index),
            source={"api_url": page.url, "page": page_no, "after": fetched_with, "index": index})
        numero = row.get("numero_dpe") if isinstance(row, dict) else None
        tracker.add(producer.send(cfg.kafka.dlq_topic, key=numero.encode("utf-8", "backslashreplace")
                                  if isinstance(numero, str) and numero else None, value=value, headers=headers))
        prog.dead += 1
        logs.event(log, "dead_letter", f"row refused: {reason}", logging.WARNING, page=page_no,
                   reason=reason, numero_dpe=numero, **self.ctx)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dpe-ingest produce",
        description="Page one department of the ADEME DPE API into Kafka, then exit. Settings come from "
                    "the environment (see docs/configuration.md); flags override them.",
        epilog="exit codes: 0 done, 1 gave up after retries, 2 bad configuration, 3 API refused the "
               "request, 143 stopped by SIGTERM (resumable)")
    p.add_argument("department", nargs="?", help=f"department code ({departments.VALID_FORMS}); "
                   "default $DEPARTMENT")
    p.add_argument("--restart", action="store_true", help="ignore the checkpoint: fetch the department again")
    p.add_argument("--refresh", action="store_true",
                   help="bring the table in sync with the API: re-read what changed since the last pass "
                        "(date_derniere_modification_dpe), delete the rows the API no longer has; needs "
                        "DATABASE_URL/DB_TABLE/CONSUMER_GROUP and a running consumer")
    p.add_argument("--page-size", type=int, help=f"rows per API call (default {CONTRACT['ADEME_PAGE_SIZE'][0]})")
    p.add_argument("--api-url", help="dataset URL (default $ADEME_API_URL)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logs.setup()
    env = dict(os.environ)
    if args.department:
        env["DEPARTMENT"] = args.department
    if args.restart:
        env["PRODUCER_RESTART"] = "true"
    if args.page_size is not None:
        env["ADEME_PAGE_SIZE"] = str(args.page_size)
    if args.api_url:
        env["ADEME_API_URL"] = args.api_url
    try:
        cfg = ProducerConfig.from_env(env)
    except ConfigError as exc:
        logs.event(log, "config_error", str(exc), logging.ERROR, department=env.get("DEPARTMENT"))
        print(f"dpe-ingest produce: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    stop = threading.Event()

    def on_signal(signum, _frame):
        logs.event(log, "signal", f"received {signal.Signals(signum).name}: finishing the current page",
                   logging.WARNING, department=cfg.department)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    t0 = time.monotonic()
    producer = Producer(cfg, stop, refresh=args.refresh, env=env)
    # a run that failed pushes its summary too; one stopped by a signal pushes nothing (the next run
    # resumes from its checkpoint and reports)
    try:
        code = _exit_code(producer, cfg)
    except Exception:
        producer.push_summary(time.monotonic() - t0, ok=False)
        raise
    if code not in (EXIT_OK, EXIT_TERMINATED):
        producer.push_summary(time.monotonic() - t0, ok=False)
    return code


def _exit_code(producer: Producer, cfg: ProducerConfig) -> int:
    """``producer.run()``, its failures turned into one error line and the exit code they mean."""
    try:
        return producer.run()
    except ConfigError as exc:  # KafkaAccessError: credentials, certificates or an ACL the brokers refused
        logs.event(log, "config_error", str(exc), logging.ERROR, department=cfg.department)
        print(f"dpe-ingest produce: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ApiAuthError as exc:
        msg = (f"the ADEME API does not know the API key (HTTP 401: {exc.detail}): check ADEME_API_KEY "
               "(chart: the Secret named by ademe.apiKey.existingSecret), or unset it to read anonymously")
        logs.event(log, "config_error", msg, logging.ERROR, department=cfg.department, status=exc.status)
        print(f"dpe-ingest produce: {msg}", file=sys.stderr)
        return EXIT_CONFIG
    except ApiInterrupted:
        logs.event(log, "stopped", "stopped by signal while waiting for the API; the last checkpoint stands, "
                   "the next run resumes there", logging.WARNING, department=cfg.department)
        return EXIT_TERMINATED
    except ApiRequestError as exc:
        logs.event(log, "api_refused", str(exc), logging.ERROR, department=cfg.department, status=exc.status)
        return EXIT_REFUSED
    except (ApiUnavailable, KafkaUnavailable) as exc:
        logs.event(log, "gave_up", f"{type(exc).__name__}: {exc}", logging.ERROR, department=cfg.department)
        return EXIT_GAVE_UP
