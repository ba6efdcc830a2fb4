"""The data of ``dpe-ingest status``: what each source said (:class:`Status`), the state of one
department derived from it (:class:`DepartmentView`), and pure helpers (Kubernetes Job JSON ->
:class:`JobState`, the current time).

Below both the code that collects (:mod:`dpe_ingest.status_sources`, I/O) and the code that renders
(:mod:`dpe_ingest.status`, text/JSON and the CLI): it imports neither.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import departments

EXIT_DONE, EXIT_IN_PROGRESS, EXIT_PROBLEM, EXIT_MISMATCH = 0, 1, 2, 4
SOURCE_NAMES = ("checkpoints", "dead_letters", "database", "consumer_lag", "kubernetes")

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
    #: {"count", "at"}: rows of the whole dataset without a department, as the API said (producer)
    api_without_department: dict | None = None
    #: the last `produce --refresh`: {"at", "updated", "inserted", "deleted", …}
    refresh: dict | None = None


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
    #: the analytics consumer group's lag (``dpe-ingest analytics``, ANALYTICS_GROUP), next to the sink's
    analytics_lag: Lag | None = None
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


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


__all__ = [
    "EXIT_DONE", "EXIT_IN_PROGRESS", "EXIT_PROBLEM", "EXIT_MISMATCH", "SOURCE_NAMES",
    "PENDING", "PRODUCING", "PRODUCED", "CONSUMING", "DONE", "MISMATCH", "FAILED",
    "Source", "JobState", "Checkpoint", "Lag", "Status", "DepartmentView",
    "DEPARTMENT_LABEL", "COMPONENT_LABEL", "INSTANCE_LABEL", "job_state", "jobs_by_department", "now_iso",
]
