"""``dpe-ingest status``: where the ingestion stands, per department.

Sources (each may be down: it is then shown as unavailable with the reason, never a crash):

- the producers' checkpoint topic (PRODUCER_CHECKPOINT_TOPIC): rows produced, API total, done;
- the dead-letter topic (KAFKA_DLQ_TOPIC): dead letters per department and stage;
- PostgreSQL (DATABASE_URL, DB_TABLE): rows stored per department, energy labels;
- the consumer group (CONSUMER_GROUP) on KAFKA_TOPIC: lag = end offsets - committed offsets;
- Kubernetes (``--kube``, or automatically when a kubeconfig / in-cluster service account exists):
  the state of each department's producer Job.

Three modules, each importing only those below it: :mod:`dpe_ingest.status_model` (the data types
and pure helpers), :mod:`dpe_ingest.status_sources` (the I/O: :class:`Collector` reads every source and
returns a :class:`Status`) and this one (:func:`render_text`, :func:`to_json`, pure functions of a
Status, and the CLI).
See docs/run-and-status.md for the JSON keys and the exit codes:

0  every department finished and reconciled (stored + consumer dead letters = produced, lag 0)
1  still in progress (or nothing started yet)
2  a source is unavailable, or a department's Job failed
4  finished, but the counts do not reconcile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import departments
# the data types and their pure helpers, re-exported: ``from dpe_ingest.status import Status`` keeps working
from .status_model import (COMPONENT_LABEL, CONSUMING, DEPARTMENT_LABEL, DONE, EXIT_DONE,
                           EXIT_IN_PROGRESS, EXIT_MISMATCH, EXIT_PROBLEM, FAILED, INSTANCE_LABEL, MISMATCH,
                           PENDING, PRODUCED, PRODUCING, SOURCE_NAMES, Checkpoint, DepartmentView, JobState, Lag,
                           Source, Status, job_state, jobs_by_department, now_iso)
from .status_sources import Collector, Settings

JSON_VERSION = 1
LABELS = tuple("ABCDEFG")
BAR_WIDTH = 24


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


def api_without_department(status: Status) -> dict | None:
    """The latest count of rows without a department a producer read from the API."""
    if not status.source_ok("checkpoints"):
        return None
    found = [ck.api_without_department for ck in status.checkpoints.values()
             if isinstance(ck.api_without_department, dict) and ck.api_without_department.get("count") is not None]
    return max(found, key=lambda d: str(d.get("at") or "")) if found else None


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
    without = api_without_department(status)
    if without is not None:
        lines.append(f"rows without a department in the API: {without['count']} (as of {without.get('at')}; "
                     "department none fetches them)")
    for code, ck in sorted(status.checkpoints.items()):
        r = ck.refresh if status.source_ok("checkpoints") else None
        if r:
            lines.append(f"refresh of {code} at {r.get('at')}: {r.get('updated')} updated, {r.get('inserted')} new, "
                         f"{r.get('deleted')} deleted (deactivated in the API)")
    if status.source_ok("consumer_lag") and status.lag is not None:
        lines.append(f"consumer lag: {status.lag.total} message{'s' if status.lag.total != 1 else ''} "
                     f"(topic {status.lag.topic}, group {status.lag.group})")
    else:
        lines.append("consumer lag: unknown")
    alag, asrc = status.analytics_lag, status.sources.get("analytics_lag")
    if asrc is not None and asrc.used:  # the second consumer group (dpe-ingest analytics)
        if not asrc.ok or alag is None:
            lines.append("analytics lag: unknown")
        elif asrc.note and "committed nothing" in asrc.note:
            lines.append(f"analytics lag: {alag.total} messages (group {alag.group} has committed nothing: "
                         "not running yet?)")
        else:
            lines.append(f"analytics lag: {alag.total} message{'s' if alag.total != 1 else ''} (group {alag.group})")
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


def _lag_json(lag: Lag | None, src: Source | None) -> dict | None:
    if lag is None or src is None or not (src.used and src.ok):
        return None
    return {"topic": lag.topic, "group": lag.group, "total": lag.total,
            "partitions": {str(p): n for p, n in sorted(lag.partitions.items())}}


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
            "refresh": (status.checkpoints[v.code].refresh if v.code in status.checkpoints
                        and status.source_ok("checkpoints") else None),
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
        "analytics_lag": _lag_json(status.analytics_lag, status.sources.get("analytics_lag")),
        "api_without_department": api_without_department(status),
        "departments": deps,
    }


# ---------------------------------------------------------------------------------------------
# collecting (I/O lives in status_sources)
# ---------------------------------------------------------------------------------------------
def collect(settings: Settings | None = None, collector: Collector | None = None,
            only: list[str] | None = None) -> Status:
    """Read every source once and return the :class:`Status` (never raises for a source that is down).

    ``collector`` (a :class:`dpe_ingest.status_sources.Collector`) keeps topic readers open between
    calls, so ``--watch`` reads only what is new; without one, a fresh one is used and closed."""
    settings = settings or Settings.from_env()
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
    logs.setup(level=None if "LOG_LEVEL" in os.environ else "WARNING")  # the contract's LOG_LEVEL; quieter by default for a CLI
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


__all__ = [
    # this module: rendering and the CLI
    "JSON_VERSION", "BAR_WIDTH", "bar", "render_text", "to_json", "collect", "build_parser", "main",
    # re-exported from status_model (data types, pure helpers) and status_sources (collecting)
    "EXIT_DONE", "EXIT_IN_PROGRESS", "EXIT_PROBLEM", "EXIT_MISMATCH", "SOURCE_NAMES", "PENDING", "PRODUCING",
    "PRODUCED", "CONSUMING", "DONE", "MISMATCH", "FAILED", "DEPARTMENT_LABEL", "COMPONENT_LABEL", "INSTANCE_LABEL",
    "Source", "JobState", "Checkpoint", "Lag", "Status", "DepartmentView", "job_state", "jobs_by_department",
    "now_iso", "Collector", "Settings",
]
