"""The I/O of ``dpe-ingest status``: read each source, turn failures into "unavailable: reason".

:class:`Collector` keeps its topic readers between calls (``--watch`` reads only the new records of
the checkpoint and dead-letter topics); every other source is asked afresh each time.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from . import departments, messages
from .config import CONTRACT, KafkaSecurity, KafkaSettings, setting
from . import pg_connection
from .kafka_security import client_options
from .status_model import Checkpoint, Lag, Source, Status, jobs_by_department, now_iso

log = logging.getLogger("dpe_ingest.status")


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if type(exc).__name__ not in text:
        text = f"{type(exc).__name__}: {text}"
    return text[:300]


@dataclass
class Settings:
    bootstrap: str
    topic: str
    dlq_topic: str
    checkpoint_topic: str
    group: str
    database_url: str
    table: str
    kube: bool | None = None  # None: auto (when a kubeconfig or in-cluster env exists)
    namespace: str | None = None
    release: str | None = None
    timeout_s: float = 10.0
    analytics_group: str = CONTRACT["ANALYTICS_GROUP"][0] or "dpe-analytics"
    kafka_security: KafkaSecurity = KafkaSecurity()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        env = dict(os.environ if env is None else env)
        if overrides.get("bootstrap"):
            env["KAFKA_BOOTSTRAP_SERVERS"] = overrides["bootstrap"]
        kafka = KafkaSettings.from_env(env)  # validates host:port
        table = str(setting("DB_TABLE", env))
        return cls(
            bootstrap=kafka.bootstrap_servers, topic=kafka.topic, dlq_topic=kafka.dlq_topic,
            checkpoint_topic=str(setting("PRODUCER_CHECKPOINT_TOPIC", env)), group=str(setting("CONSUMER_GROUP", env)),
            database_url=overrides.get("database_url") or str(setting("DATABASE_URL", env)), table=table,
            kube=overrides.get("kube"), namespace=overrides.get("namespace"), release=overrides.get("release"),
            timeout_s=float(overrides.get("timeout_s") or 10.0), analytics_group=str(setting("ANALYTICS_GROUP", env)),
            kafka_security=kafka.security,
        )

    def public(self) -> dict[str, Any]:
        """Shown in the text header and the JSON ``settings`` (no password)."""
        return {"bootstrap": self.bootstrap, "topic": self.topic, "dlq_topic": self.dlq_topic,
                "checkpoint_topic": self.checkpoint_topic, "group": self.group, "table": self.table,
                "database": pg_connection.safe_url(self.database_url),
                "kube": self.kube, "namespace": self.namespace, "release": self.release}


# ---------------------------------------------------------------------------------------------
# Kafka topics read from the beginning, then incrementally
# ---------------------------------------------------------------------------------------------
class TopicReader:
    """Reads a topic from its beginning and folds every record into ``on_record``; each
    :meth:`refresh` reads up to the end offsets of that moment."""

    def __init__(self, bootstrap: str, topic: str, on_record: Callable[[Any], None], timeout_s: float = 10.0,
                 security: KafkaSecurity | None = None):
        self.bootstrap, self.topic, self.on_record, self.timeout_s = bootstrap, topic, on_record, timeout_s
        self.security = security
        self.consumer = None
        self.tps: list = []

    def _open(self):
        from kafka import KafkaConsumer

        ms = int(self.timeout_s * 1000)
        self.consumer = KafkaConsumer(bootstrap_servers=self.bootstrap.split(","), group_id=None,
                                      enable_auto_commit=False, client_id="dpe-ingest-status",
                                      request_timeout_ms=max(ms, 5000), bootstrap_timeout_ms=ms,
                                      consumer_timeout_ms=ms, reconnect_backoff_max_ms=2000,
                                      **client_options(self.security))

    def refresh(self) -> bool:
        """Read what is new; False when the topic does not exist (yet).  Raises on Kafka errors."""
        import time

        from kafka import TopicPartition

        if self.consumer is None:
            self._open()
        c = self.consumer
        parts = c.partitions_for_topic(self.topic)  # asks the broker when not cached
        if not parts:
            return False
        tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        new = [tp for tp in tps if tp not in self.tps]
        if new:
            self.tps = sorted(set(self.tps) | set(new), key=lambda tp: tp.partition)
            c.assign(self.tps)
            c.seek_to_beginning(*new)
        end = c.end_offsets(self.tps)
        deadline = time.monotonic() + max(self.timeout_s * 3, 30.0)
        while any(c.position(tp) < end[tp] for tp in self.tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {self.topic} to its end in time")
            for records in c.poll(timeout_ms=500, max_records=5000).values():
                for rec in records:
                    self.on_record(rec)
        return True

    def close(self) -> None:
        if self.consumer is not None:
            try:
                self.consumer.close()
            except Exception:  # noqa: BLE001
                pass
            self.consumer = None
            self.tps = []


# ---------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


def kube_available(env: Mapping[str, str] | None = None) -> bool:
    """A kubeconfig ($KUBECONFIG or ~/.kube/config) or an in-cluster service account exists."""
    env = os.environ if env is None else env
    if env.get("KUBERNETES_SERVICE_HOST") and (SA_DIR / "token").exists():
        return True
    paths = [p for p in (env.get("KUBECONFIG") or "").split(os.pathsep) if p]
    paths = paths or [str(Path(env.get("HOME") or Path.home()) / ".kube" / "config")]
    return any(Path(p).is_file() for p in paths)


def list_producer_jobs(namespace: str | None, release: str | None, timeout_s: float) -> tuple[dict, str]:
    """The raw JobList JSON of the producer Jobs (same shape as ``kubectl get jobs -o json``) and the
    namespace asked."""
    from kubernetes import client, config

    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (SA_DIR / "token").exists()
    if in_cluster:
        config.load_incluster_config()
        default_ns = (SA_DIR / "namespace").read_text().strip() if (SA_DIR / "namespace").exists() else "default"
    else:
        config.load_kube_config()
        try:
            _, active = config.list_kube_config_contexts()
            default_ns = (active or {}).get("context", {}).get("namespace") or "default"
        except Exception:  # noqa: BLE001
            default_ns = "default"
    ns = namespace or default_ns
    selector = "app.kubernetes.io/component=producer,dpe-ingest/department"
    if release:
        selector += f",app.kubernetes.io/instance={release}"
    api = client.BatchV1Api()
    resp = api.list_namespaced_job(ns, label_selector=selector, _preload_content=False,
                                   _request_timeout=timeout_s)
    return json.loads(resp.data), ns


# ---------------------------------------------------------------------------------------------
# the collector
# ---------------------------------------------------------------------------------------------
@dataclass
class Collector:
    settings: Settings
    #: replaces :func:`list_producer_jobs` (tests feed recorded JobList JSON through it)
    job_lister: Callable[[str | None, str | None, float], tuple[dict, str]] | None = None
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)
    dead: dict[str, dict[str, int]] = field(default_factory=dict)
    #: ids of the dead letters counted: a letter sent again by a replay is counted once
    dead_ids: set[str] = field(default_factory=set)
    _readers: dict[str, TopicReader] = field(default_factory=dict)

    # -- folding records ----------------------------------------------------------------------
    def _on_checkpoint(self, rec) -> None:
        if rec.key is None:
            return
        key = rec.key.decode("utf-8", "replace")
        if rec.value is None:
            self.checkpoints.pop(key, None)  # tombstone
            return
        try:
            doc = json.loads(rec.value)
            self.checkpoints[key] = Checkpoint(rows=int(doc.get("rows") or 0), dead=int(doc.get("dead") or 0),
                                               total=doc.get("total"), done=bool(doc.get("done")),
                                               page=int(doc.get("page") or 0), at=doc.get("at"),
                                               api_without_department=doc.get("api_without_department"),
                                               refresh=doc.get("refresh"))
        except (ValueError, TypeError, AttributeError):
            log.warning("unreadable checkpoint for key %s", key)

    def _on_dead_letter(self, rec) -> None:
        try:
            doc = messages.parse_dead_letter(rec.value)
            dep = doc.get("department") or "?"
            stage = doc.get("stage") or "?"
            letter_id = doc.get("id")
        except (ValueError, AttributeError, UnicodeDecodeError):
            dep, stage, letter_id = "?", "?", None
        if isinstance(letter_id, str):
            if letter_id in self.dead_ids:
                return  # the same refused row, sent again by a replay
            self.dead_ids.add(letter_id)
        if dep != "?":
            try:
                dep = departments.normalize(dep)
            except departments.InvalidDepartment:
                pass
        by = self.dead.setdefault(dep, {})
        by[stage] = by.get(stage, 0) + 1

    def _forget_dead_letters(self) -> None:
        self.dead.clear()
        self.dead_ids.clear()

    def _reader(self, name: str, topic: str, fold) -> TopicReader:
        r = self._readers.get(name)
        if r is None:
            r = self._readers[name] = TopicReader(self.settings.bootstrap, topic, fold, self.settings.timeout_s,
                                                                 self.settings.kafka_security)
        return r

    def _read_topic(self, name: str, topic: str, fold, reset) -> Source:
        reader = self._reader(name, topic, fold)
        try:
            exists = reader.refresh()
        except Exception as exc:  # noqa: BLE001
            reader.close()
            reset()  # the next successful read starts again from the beginning
            return Source(ok=False, error=_short(exc))
        return Source(note=None if exists else f"topic {topic} does not exist yet")

    # -- sources ------------------------------------------------------------------------------
    def read_database(self) -> tuple[Source, dict[str, int], dict[str, dict[str, int]]]:
        try:
            from psycopg2 import sql
        except ImportError:
            return Source(ok=False, error="psycopg2 is not installed (pip install 'dpe-ingest[consumer]')"), {}, {}
        s = self.settings
        try:
            conn = pg_connection.connect(s.database_url, connect_timeout=max(1, int(s.timeout_s)),
                                         application_name="dpe-ingest-status")
        except Exception as exc:  # noqa: BLE001
            return Source(ok=False, error=_short(exc)), {}, {}
        try:
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = %s", (int(max(s.timeout_s, 30) * 1000),))
                cur.execute("SELECT to_regclass(%s)", (sql.Identifier(s.table).as_string(conn),))
                if cur.fetchone()[0] is None:
                    return Source(note=f"table {s.table} does not exist yet"), {}, {}
                cur.execute(sql.SQL("SELECT departement, etiquette_dpe, count(*) FROM {} GROUP BY 1, 2")
                            .format(sql.Identifier(s.table)))
                stored: dict[str, int] = {}
                labels: dict[str, dict[str, int]] = {}
                for dep, label, n in cur.fetchall():
                    dep = dep if dep is not None else departments.NONE  # rows without a department
                    stored[dep] = stored.get(dep, 0) + int(n)
                    key = label if label is not None else "none"
                    labels.setdefault(dep, {})[key] = labels.get(dep, {}).get(key, 0) + int(n)
            return Source(), stored, labels
        except Exception as exc:  # noqa: BLE001
            return Source(ok=False, error=_short(exc)), {}, {}
        finally:
            conn.close()

    def read_lag(self, group: str | None = None) -> tuple[Source, Lag | None]:
        """The lag of the sink's group (CONSUMER_GROUP), or of ``group`` (e.g. the analytics group)."""
        s = self.settings
        group = group or s.group
        try:
            from kafka import KafkaConsumer, TopicPartition

            ms = int(s.timeout_s * 1000)
            c = KafkaConsumer(bootstrap_servers=s.bootstrap.split(","), group_id=None, enable_auto_commit=False,
                              client_id="dpe-ingest-status", request_timeout_ms=max(ms, 5000),
                              bootstrap_timeout_ms=ms, **client_options(s.kafka_security))
            try:
                parts = sorted(c.partitions_for_topic(s.topic) or ())
                if not parts:
                    return Source(note=f"topic {s.topic} does not exist yet"), Lag(s.topic, group, 0, {})
                tps = [TopicPartition(s.topic, p) for p in parts]
                end = c.end_offsets(tps)
                begin = c.beginning_offsets(tps)
            finally:
                c.close()
            from .kafka_io import group_offsets

            committed = group_offsets(s.bootstrap, group, ms, security=s.kafka_security)
            per: dict[int, int] = {}
            for tp in tps:
                pos = committed.get(tp)
                per[tp.partition] = max(0, end[tp] - (pos if pos is not None else begin[tp]))
            note = None if any(tp in committed for tp in tps) else f"group {group} has committed nothing yet"
            return Source(note=note), Lag(s.topic, group, sum(per.values()), per)
        except Exception as exc:  # noqa: BLE001
            return Source(ok=False, error=_short(exc)), None

    def read_jobs(self) -> tuple[Source, dict]:
        s = self.settings
        use = s.kube if s.kube is not None else (self.job_lister is not None or kube_available())
        if not use:
            return Source(used=False), {}
        lister = self.job_lister or list_producer_jobs
        try:
            doc, ns = lister(s.namespace, s.release, s.timeout_s)
        except ImportError:
            return Source(ok=False, error="the kubernetes package is missing (pip install 'dpe-ingest[status]')"), {}
        except Exception as exc:  # noqa: BLE001
            return Source(ok=False, error=_short(exc)), {}
        if s.namespace is None:
            s.namespace = ns
        return Source(), jobs_by_department(doc, s.release)

    # -- all together -------------------------------------------------------------------------
    def collect(self, only: list[str] | None = None) -> Status:
        s = self.settings
        sources: dict[str, Source] = {}
        sources["checkpoints"] = self._read_topic("checkpoints", s.checkpoint_topic, self._on_checkpoint,
                                                  self.checkpoints.clear)
        sources["dead_letters"] = self._read_topic("dead_letters", s.dlq_topic, self._on_dead_letter,
                                                   self._forget_dead_letters)
        sources["database"], stored, labels = self.read_database()
        sources["consumer_lag"], lag = self.read_lag()
        sources["analytics_lag"], analytics_lag = self.read_lag(s.analytics_group)
        sources["kubernetes"], jobs = self.read_jobs()
        settings = s.public()
        return Status(generated_at=now_iso(), settings=settings, sources=sources,
                      checkpoints={k: Checkpoint(**vars(v)) for k, v in self.checkpoints.items()},
                      dead_letters={k: dict(v) for k, v in self.dead.items()}, stored=stored, labels=labels,
                      lag=lag, jobs=jobs, only=only, analytics_lag=analytics_lag)

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()


__all__ = ["Settings", "Collector", "TopicReader", "kube_available", "list_producer_jobs", "CONTRACT"]
