"""``dpe-ingest status``: where the ingestion stands, per department.

Sources (each may be down: it is then shown as unavailable with the reason, never a crash):

- the producers' checkpoint topic (PRODUCER_CHECKPOINT_TOPIC): rows produced, API total, done;
- the dead-letter topic (KAFKA_DLQ_TOPIC): dead letters per department and stage;
- PostgreSQL (DATABASE_URL, DB_TABLE): rows stored per department, energy labels;
- the consumer group (CONSUMER_GROUP) on KAFKA_TOPIC: lag = end offsets - committed offsets;
- Kubernetes (``--kube``, or automatically when a kubeconfig / in-cluster service account exists):
  the state of each department's producer Job.

The code is split in two: :func:`collect` does the I/O (in :mod:`dpe_ingest.status_sources`) and
returns a :class:`Status`; :func:`render_text` and :func:`to_json` are pure functions of a Status.
See docs/run-and-status.md for the JSON keys and the exit codes:

0  every department finished and reconciled (stored + consumer dead letters = produced, lag 0)
1  still in progress (or nothing started yet)
2  a source is unavailable, or a department's Job failed
4  finished, but the counts do not reconcile
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping

from . import departments

if TYPE_CHECKING:
    from .status_sources import Settings

EXIT_DONE, EXIT_IN_PROGRESS, EXIT_PROBLEM, EXIT_MISMATCH = 0, 1, 2, 4
JSON_VERSION = 1
SOURCE_NAMES = ("checkpoints", "dead_letters", "database", "consumer_lag", "kubernetes")
LABELS = tuple("ABCDEFG")
BAR_WIDTH = 24

# department states, in the order a department goes through them
PENDING, PRODUCING, PRODUCED, CONSUMING, DONE, MISMATCH, FAILED = (
    "pending", "producing", "produced", "consuming", "done", "mismatch", "failed")


# ---------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One data source: ``ok`` False means it could not be read (``error`` says why)."""

    ok: bool = True
    error: str | None = None
    used: bool = True  # False: not consulted (e.g. Kubernetes without a cluster)
    note: str | None = None  # e.g. "topic does not exist yet"


@dataclass
class JobState:
    """A department's producer Job, as derived from its Kubernetes status."""

    name: str
    state: str  # Pending | Running | Succeeded | Failed
    active: int = 0
    ready: int | None = None
    succeeded: int = 0
    failed: int = 0  # failed pods = retries so far
    backoff_limit: int | None = None
    reason: str | None = None
    message: str | None = None
    run: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None

    @property
    def retries(self) -> int:
        return self.failed


@dataclass
class Checkpoint:
    rows: int = 0
    dead: int = 0
    total: int | None = None
    done: bool = False
    page: int = 0
    at: str | None = None


@dataclass
class Lag:
    topic: str
    group: str
    total: int
    partitions: dict[int, int] = field(default_factory=dict)


@dataclass
class Status:
    """Everything status shows.  ``None`` values mean "unknown" (source down or no data yet)."""

    generated_at: str
    settings: dict[str, Any]
    sources: dict[str, Source]
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)
    dead_letters: dict[str, dict[str, int]] = field(default_factory=dict)  # dep -> stage -> n
    stored: dict[str, int] = field(default_factory=dict)
    labels: dict[str, dict[str, int]] = field(default_factory=dict)  # dep -> label -> n
    lag: Lag | None = None
    jobs: dict[str, JobState] = field(default_factory=dict)
    only: list[str] | None = None  # departments asked for on the command line

    # -- derived -----------------------------------------------------------------------------
    def department_codes(self) -> list[str]:
        if self.only:
            return list(self.only)
        found = set(self.checkpoints) | set(self.jobs) | set(self.stored) | set(self.dead_letters)
        valid = [d for d in departments.ALL_DEPARTMENTS if d in found]
        return valid + sorted(d for d in found if d not in departments.ALL_DEPARTMENTS)

    def source_ok(self, name: str) -> bool:
        src = self.sources.get(name)
        return src is not None and src.used and src.ok

    def department(self, code: str) -> "DepartmentView":
        return DepartmentView.build(self, code)

    def views(self) -> list["DepartmentView"]:
        return [self.department(c) for c in self.department_codes()]

    def overall(self) -> tuple[str, int, str]:
        """(state, exit code, sentence) of the whole ingestion."""
        views = self.views()
        down = [n for n in SOURCE_NAMES if self.sources.get(n) and self.sources[n].used and not self.sources[n].ok
                and (n != "kubernetes" or self.settings.get("kube") is True)]
        failed = [v.code for v in views if v.state == FAILED]
        if failed:
            return "failed", EXIT_PROBLEM, f"producer Job failed for {', '.join(failed)}"
        if down:
            return "unavailable", EXIT_PROBLEM, f"source unavailable: {', '.join(down)}"
        if not views:
            return "in_progress", EXIT_IN_PROGRESS, "no department started yet"
        waiting = [v for v in views if v.state not in (DONE, MISMATCH)]
        if waiting:
            counts: dict[str, int] = {}
            for v in waiting:
                counts[v.state] = counts.get(v.state, 0) + 1
            what = ", ".join(f"{n} {s}" for s, n in counts.items())
            return "in_progress", EXIT_IN_PROGRESS, f"in progress ({what})"
        bad = [v.code for v in views if v.state == MISMATCH]
        if bad:
            return "mismatch", EXIT_MISMATCH, f"finished, but counts do not reconcile for {', '.join(bad)}"
        return "done", EXIT_DONE, "every department finished and reconciled"


@dataclass
class DepartmentView:
    code: str
    state: str
    api_total: int | None
    produced: int | None
    producer_dead: int | None  # from the checkpoint (exact)
    stored: int | None
    dead_letters: int | None  # from the DLQ topic (all stages)
    dead_by_stage: dict[str, int] | None
    producer_done: bool | None
    checkpoint_at: str | None
    progress: float | None
    job: JobState | None

    @classmethod
    def build(cls, st: Status, code: str) -> "DepartmentView":
        ck = st.checkpoints.get(code) if st.source_ok("checkpoints") else None
        have_ck = st.source_ok("checkpoints")
        produced = ck.rows if ck else (0 if have_ck else None)
        stored = st.stored.get(code, 0) if st.source_ok("database") else None
        by_stage = dict(st.dead_letters.get(code, {})) if st.source_ok("dead_letters") else None
        dead = sum(by_stage.values()) if by_stage is not None else None
        consumer_dead = (by_stage or {}).get("consumer", 0)
        job = st.jobs.get(code) if st.source_ok("kubernetes") else None
        total = ck.total if ck else None
        # progress: every API row is either stored or dead-lettered
        progress = None
        if total is not None and stored is not None:
            accounted = stored + (dead if dead is not None else (ck.dead if ck else 0))
            progress = 1.0 if total == 0 else min(1.0, accounted / total)
        lag_total = st.lag.total if (st.lag is not None and st.source_ok("consumer_lag")) else None
        if job is not None and job.state == "Failed":
            state = FAILED
        elif job is not None and job.state in ("Pending", "Running"):
            state = PRODUCING if ck else PENDING
        elif ck is None:
            state = PENDING
        elif not ck.done:
            state = PRODUCING
        elif stored is not None and stored + consumer_dead == ck.rows:
            state = DONE  # (the lag is per topic: other departments may still be in flight)
        elif stored is None or lag_total is None:
            state = PRODUCED
        elif lag_total > 0:
            state = CONSUMING
        else:
            state = MISMATCH  # everything consumed, yet stored + consumer dead letters != produced
        return cls(code=code, state=state, api_total=total, produced=produced, producer_dead=ck.dead if ck else None,
                   stored=stored, dead_letters=dead, dead_by_stage=by_stage, producer_done=ck.done if ck else None,
                   checkpoint_at=ck.at if ck else None, progress=progress, job=job)


# ---------------------------------------------------------------------------------------------
# Kubernetes Jobs: pure parsing of the API's JSON (``kubectl get jobs -o json`` has the same shape)
# ---------------------------------------------------------------------------------------------
DEPARTMENT_LABEL = "dpe-ingest/department"
COMPONENT_LABEL = "app.kubernetes.io/component"
INSTANCE_LABEL = "app.kubernetes.io/instance"


def job_state(job: Mapping[str, Any]) -> JobState:
    """The state of one Job object (a dict in the API's camelCase JSON)."""
    meta = job.get("metadata") or {}
    spec = job.get("spec") or {}
    st = job.get("status") or {}
    conds = {c.get("type"): c for c in (st.get("conditions") or []) if str(c.get("status")) == "True"}
    active, ready = int(st.get("active") or 0), st.get("ready")
    failed, succeeded = int(st.get("failed") or 0), int(st.get("succeeded") or 0)
    reason = message = None
    if "Failed" in conds or "FailureTarget" in conds:
        c = conds.get("Failed") or conds["FailureTarget"]
        state, reason, message = "Failed", c.get("reason"), c.get("message")
    elif "Complete" in conds or "SuccessCriteriaMet" in conds:
        state = "Succeeded"
    elif active > 0:
        # a pod exists; "ready" (Kubernetes >= 1.24) stays 0 while it waits (image pull, init container)
        state = "Pending" if ready is not None and int(ready) == 0 else "Running"
    else:
        state = "Pending"  # just created, or waiting for the next retry after a failed pod
    if state == "Pending" and failed:
        reason = "waiting for retry"
    labels = meta.get("labels") or {}
    return JobState(
        name=str(meta.get("name", "?")), state=state, active=active,
        ready=None if ready is None else int(ready), succeeded=succeeded, failed=failed,
        backoff_limit=spec.get("backoffLimit"), reason=reason, message=message, run=labels.get("dpe-ingest/run"),
        created_at=meta.get("creationTimestamp"), started_at=st.get("startTime"),
        completed_at=st.get("completionTime"),
    )


def jobs_by_department(doc: Mapping[str, Any], release: str | None = None) -> dict[str, JobState]:
    """Producer Jobs of a Job list (``{"kind": "JobList", "items": [...]}``) by department.

    Only Jobs labelled ``app.kubernetes.io/component=producer`` and ``dpe-ingest/department=<code>``
    (and ``app.kubernetes.io/instance=<release>`` when given) count; when a department has several
    Jobs (an upgrade or a re-run replaced its Job), the newest one wins."""
    newest: dict[str, tuple[str, JobState]] = {}
    for item in doc.get("items") or []:
        labels = (item.get("metadata") or {}).get("labels") or {}
        if labels.get(COMPONENT_LABEL) != "producer" or DEPARTMENT_LABEL not in labels:
            continue
        if release and labels.get(INSTANCE_LABEL) != release:
            continue
        try:
            code = departments.normalize(labels[DEPARTMENT_LABEL])
        except departments.InvalidDepartment:
            continue
        js = job_state(item)
        key = (js.created_at or "", js.name)
        if code not in newest or key >= newest[code][0]:
            newest[code] = (key, js)  # type: ignore[assignment]
    return {code: js for code, (_, js) in newest.items()}


# ---------------------------------------------------------------------------------------------
# rendering (pure)
# ---------------------------------------------------------------------------------------------
def bar(fraction: float | None, width: int = BAR_WIDTH) -> str:
    """``[##########..............]  41.7%``; unknown: ``[??????????????????????]      ?``."""
    if fraction is None:
        return "[" + "?" * width + "]" + "      ?"
    fraction = max(0.0, min(1.0, fraction))
    filled = int(fraction * width + 1e-9)
    return "[" + "#" * filled + "." * (width - filled) + "]" + f" {fraction * 100:5.1f}%"


def _n(value: int | None) -> str:
    return "-" if value is None else str(value)


def _job_text(job: JobState | None, kube_used: bool) -> str:
    if not kube_used:
        return ""
    if job is None:
        return "no Job"
    text = job.state
    extra = []
    if job.retries:
        extra.append(f"{job.retries} retr{'y' if job.retries == 1 else 'ies'}"
                     + (f" of {job.backoff_limit}" if job.backoff_limit is not None else ""))
    if job.reason:
        extra.append(job.reason)
    return text + (f" ({', '.join(extra)})" if extra else "")


def render_text(status: Status) -> str:
    """The screen of ``dpe-ingest status`` (plain ASCII, no colours)."""
    s = status.settings
    kube_used = status.sources.get("kubernetes", Source(used=False)).used
    lines = [
        f"dpe-ingest status at {status.generated_at}",
        f"kafka {s.get('bootstrap')}  topic {s.get('topic')}  group {s.get('group')}  table {s.get('table')}"
        + (f"  namespace {s.get('namespace')}" if kube_used else ""),
        "",
    ]
    header = ["DEP", "STATE", "PROGRESS (stored+dead / API total)", "API TOTAL", "PRODUCED", "STORED", "DEAD"]
    rows = []
    for v in status.views():
        rows.append([v.code, v.state, bar(v.progress), _n(v.api_total), _n(v.produced), _n(v.stored),
                     _n(v.dead_letters)] + ([_job_text(v.job, True)] if kube_used else []))
    if kube_used:
        header.append("JOB")
    if rows:
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        right = {3, 4, 5, 6}
        for r in [header] + rows:
            cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
            lines.append("  ".join(cells).rstrip())
    else:
        lines.append("no department found (no checkpoint, stored row, dead letter or Job yet)")
    lines.append("")
    if status.source_ok("consumer_lag") and status.lag is not None:
        lines.append(f"consumer lag: {status.lag.total} message{'s' if status.lag.total != 1 else ''} "
                     f"(topic {status.lag.topic}, group {status.lag.group})")
    else:
        lines.append("consumer lag: unknown")
    parts = []
    for name in SOURCE_NAMES:
        src = status.sources.get(name)
        label = name.replace("_", " ")
        if src is None or not src.used:
            parts.append(f"{label} not used")
        elif src.ok:
            parts.append(f"{label} ok" + (f" ({src.note})" if src.note else ""))
        else:
            parts.append(f"{label} UNAVAILABLE ({src.error})")
    lines.append("sources: " + "; ".join(parts))
    state, code, sentence = status.overall()
    lines.append(f"result: {sentence} (exit {code})")
    return "\n".join(lines) + "\n"


def _job_json(job: JobState | None) -> dict | None:
    if job is None:
        return None
    return {"name": job.name, "state": job.state, "active": job.active, "ready": job.ready,
            "succeeded": job.succeeded, "failed": job.failed, "retries": job.retries,
            "backoff_limit": job.backoff_limit, "reason": job.reason, "message": job.message, "run": job.run,
            "created_at": job.created_at, "started_at": job.started_at, "completed_at": job.completed_at}


def to_json(status: Status) -> dict:
    """The ``--json`` document (keys documented in docs/run-and-status.md; version 1)."""
    state, code, sentence = status.overall()
    deps = []
    for v in status.views():
        labels = status.labels.get(v.code) if status.source_ok("database") else None
        deps.append({
            "department": v.code, "state": v.state, "api_total": v.api_total, "produced": v.produced,
            "producer_dead_letters": v.producer_dead, "stored": v.stored, "dead_letters": v.dead_letters,
            "dead_letters_by_stage": v.dead_by_stage, "producer_done": v.producer_done,
            "checkpoint_at": v.checkpoint_at,
            "progress": None if v.progress is None else round(v.progress, 4),
            "labels": None if labels is None else {k: labels.get(k, 0) for k in sorted(labels)},
            "job": _job_json(v.job),
        })
    lag = None
    if status.lag is not None and status.source_ok("consumer_lag"):
        lag = {"topic": status.lag.topic, "group": status.lag.group, "total": status.lag.total,
               "partitions": {str(p): n for p, n in sorted(status.lag.partitions.items())}}
    return {
        "version": JSON_VERSION,
        "generated_at": status.generated_at,
        "overall": {"state": state, "exit_code": code, "message": sentence},
        "settings": dict(status.settings),
        "sources": {name: {"used": src.used, "ok": src.ok if src.used else None, "error": src.error,
                           "note": src.note}
                    for name, src in ((n, status.sources.get(n, Source(used=False))) for n in SOURCE_NAMES)},
        "consumer_lag": lag,
        "departments": deps,
    }


# ---------------------------------------------------------------------------------------------
# collecting (I/O lives in status_sources)
# ---------------------------------------------------------------------------------------------
def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def collect(settings: "Settings | None" = None, collector: "Any | None" = None,
            only: list[str] | None = None) -> Status:
    """Read every source once and return the :class:`Status` (never raises for a source that is down).

    ``collector`` (a :class:`dpe_ingest.status_sources.Collector`) keeps topic readers open between
    calls, so ``--watch`` reads only what is new; without one, a fresh one is used and closed."""
    from .status_sources import Collector, Settings as _Settings

    settings = settings or _Settings.from_env()
    own = collector is None
    collector = collector or Collector(settings)
    try:
        return collector.collect(only=only)
    finally:
        if own:
            collector.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpe-ingest status",
        description="Show where the ingestion stands, per department: API total, rows produced, rows stored, "
        "dead letters, consumer lag and (on Kubernetes) each producer Job's state. Settings come from the "
        "environment (KAFKA_BOOTSTRAP_SERVERS, KAFKA_TOPIC, KAFKA_DLQ_TOPIC, PRODUCER_CHECKPOINT_TOPIC, "
        "CONSUMER_GROUP, DATABASE_URL, DB_TABLE); flags override them.",
        epilog="exit codes: 0 every department finished and reconciled; 1 still in progress; 2 a source is "
        "unavailable or a producer Job failed; 4 finished but counts do not reconcile. See docs/run-and-status.md.")
    p.add_argument("departments", nargs="*", help="only these departments (default: every department found)")
    p.add_argument("--json", action="store_true", help="print one JSON document and exit")
    p.add_argument("--watch", nargs="?", const=2.0, type=float, metavar="SECONDS",
                   help="refresh the screen every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (default $KAFKA_BOOTSTRAP_SERVERS)")
    p.add_argument("--database-url", help="PostgreSQL URL (default $DATABASE_URL)")
    kube = p.add_mutually_exclusive_group()
    kube.add_argument("--kube", dest="kube", action="store_true", default=None,
                      help="read the producer Jobs from Kubernetes (default: when a kubeconfig or an in-cluster "
                      "service account is found)")
    kube.add_argument("--no-kube", dest="kube", action="store_false", help="do not ask Kubernetes")
    p.add_argument("--namespace", help="namespace of the release (default: the kubeconfig context's, else default)")
    p.add_argument("--release", help="Helm release name: only its Jobs (default: every dpe-ingest producer Job)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="per-source timeout (default 10)")
    return p


def main(argv: list[str] | None = None) -> int:
    from . import logs
    from .config import ConfigError
    from .status_sources import Collector, Settings

    p = build_parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.json and args.watch is not None:
        p.error("--json and --watch cannot be combined")
    if args.watch is not None and args.watch <= 0:
        p.error("--watch SECONDS must be > 0")
    if args.timeout <= 0:
        p.error("--timeout must be > 0")
    try:
        only = departments.parse_list(args.departments) if args.departments else None
    except departments.InvalidDepartment as exc:
        print(f"dpe-ingest status: {exc}", file=sys.stderr)
        return 2
    logs.setup(level=os.environ.get("LOG_LEVEL", "WARNING"))
    try:
        settings = Settings.from_env(os.environ, bootstrap=args.bootstrap, database_url=args.database_url,
                                     kube=args.kube, namespace=args.namespace, release=args.release,
                                     timeout_s=args.timeout)
    except ConfigError as exc:
        print(f"dpe-ingest status: {exc}", file=sys.stderr)
        return 2
    collector = Collector(settings)
    try:
        if args.watch is None:
            st = collector.collect(only=only)
            if args.json:
                print(json.dumps(to_json(st), indent=2, sort_keys=False))
            else:
                sys.stdout.write(render_text(st))
            return st.overall()[1]
        tty = sys.stdout.isatty()
        code = EXIT_IN_PROGRESS
        try:
            while True:
                st = collector.collect(only=only)
                code = st.overall()[1]
                text = render_text(st) + f"(refreshing every {args.watch:g}s, Ctrl-C to quit)\n"
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J" + text)
                else:
                    sys.stdout.write(text + "\n")
                sys.stdout.flush()
                time.sleep(args.watch)
        except KeyboardInterrupt:
            return code
    finally:
        collector.close()
