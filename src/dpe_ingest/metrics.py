"""Prometheus metrics of the long-running parts (the ``prometheus_client`` package).

- :class:`ConsumerMetrics`: the PostgreSQL sink (``dpe-ingest consume``);
- :class:`AnalyticsMetrics`: the analytics consumer (``dpe-ingest analytics``);
- :func:`push_producer_summary`: a producer Job is too short-lived to be scraped: it logs its summary
  (``event=done``) and, when ``METRICS_PUSHGATEWAY_URL`` is set, pushes it to a Pushgateway.

Each object owns its own :class:`~prometheus_client.CollectorRegistry` (several consumers may live in
one test process); :func:`serve` exposes one on ``/metrics`` (``METRICS_PORT``, 0 = none), with the probes ``/livez`` and
``/readyz`` of a consumer (:meth:`dpe_ingest.group_consumer.GroupConsumer.livez` / ``readyz``).
:func:`exported_names` lists every sample name the code can export: the Grafana dashboard of the
chart may use only those (a test checks it).
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from socketserver import ThreadingMixIn
from typing import Any, Iterable
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from . import logs
from .config import ConfigError
from .pg_connection import safe_url

log = logging.getLogger("dpe_ingest.metrics")

#: the label values of ``dpe_consumer_rows_total{result=…}``
CONSUMER_RESULTS = ("inserted", "updated", "unchanged", "deleted", "dead_lettered")
#: energy labels of the analytics (anything else counts as ``unknown``)
ENERGY_LABELS = ("A", "B", "C", "D", "E", "F", "G", "unknown")
#: the reasons the analytics consumer skips a message for (``analytics.SKIP_REASONS``; a test keeps the two
#: equal) and the levels of its alert summary lines: the label values of ``dpe_analytics_skipped`` and
#: ``dpe_analytics_alerts_total``, each series there from the start (0), so that the dashboard's panels
#: show 0, not "no data", while nothing was skipped or alerted
SKIP_REASONS = ("not_json", "no_numero_dpe", "invalid")
ALERT_LEVELS = ("warning", "info")
WRITE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _LastCommit:
    def __init__(self) -> None:
        self.at: float | None = None

    def age(self) -> float:
        return float("nan") if self.at is None else max(0.0, time.time() - self.at)


class _Lag:
    """``<prefix>_lag{partition}`` and ``<prefix>_lag_total``; partitions no longer ours are removed."""

    def __init__(self, prefix: str, what: str, registry: CollectorRegistry):
        self.per = Gauge(f"{prefix}_lag", f"Messages of the topic not yet processed by {what}, per partition "
                         "(end offset - position, as last seen)", ["topic", "partition"], registry=registry)
        self.total = Gauge(f"{prefix}_lag_total", f"Messages of the topic not yet processed by {what} "
                           "(sum over the assigned partitions)", registry=registry)
        self._seen: set[tuple[str, str]] = set()

    def set(self, lags: dict[tuple[str, int], int] | None) -> None:
        if lags is None:
            return
        now = {(t, str(p)) for t, p in lags}
        for gone in self._seen - now:
            try:
                self.per.remove(*gone)
            except KeyError:
                pass
        for (t, p), n in lags.items():
            self.per.labels(t, str(p)).set(n)
        self._seen = now
        self.total.set(sum(lags.values()))


class ConsumerMetrics:
    """The sink: rows by result, batch write seconds, lag per partition, last offset commit."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rows = Counter("dpe_consumer_rows", "Rows handled by the sink, by result: inserted (new in the table), "
                            "updated (content changed), unchanged (a replay or an identical version), deleted, "
                            "dead_lettered (refused, sent to the DLQ)", ["result"], registry=r)
        for res in CONSUMER_RESULTS:
            self.rows.labels(res)  # every series exists from the start (0), so rate() sees the first batch
        self.batches = Counter("dpe_consumer_batches", "Batches written (one database transaction each)",
                               registry=r)
        self.write_seconds = Histogram("dpe_consumer_batch_write_seconds", "Seconds to write one batch into "
                                       "PostgreSQL (rows and offsets in one statement, then the commit)", buckets=WRITE_BUCKETS, registry=r)
        self.lag = _Lag("dpe_consumer", "the sink", r)
        self._last = _LastCommit()
        self.last_commit_ts = Gauge("dpe_consumer_last_commit_timestamp_seconds",
                                    "Unix time of the last batch committed (rows and offsets) to PostgreSQL", registry=r)
        g = Gauge("dpe_consumer_last_commit_age_seconds", "Seconds since the last batch (rows and offsets) was committed "
                  "(NaN before the first)", registry=r)
        g.set_function(self._last.age)

    def batch(self, inserted: int, updated: int, unchanged: int, deleted: int, dead: int,
              write_seconds: float) -> None:
        """One batch written: one transaction (its rows, or only its offsets and dead letters).  The
        batch is counted before its rows: a scrape that sees a batch's rows sees the batch."""
        self.write_seconds.observe(write_seconds)
        self.batches.inc()
        for res, n in zip(CONSUMER_RESULTS, (inserted, updated, unchanged, deleted, dead)):
            if n:
                self.rows.labels(res).inc(n)

    def committed(self) -> None:
        self._last.at = time.time()
        self.last_commit_ts.set(self._last.at)


class AnalyticsMetrics:
    """The analytics consumer: current counts per department and label (read back from its tables),
    messages by outcome, skipped messages by reason, batch seconds, lag, last commit."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rows = Gauge("dpe_analytics_rows", "Distinct certificates (numero_dpe) per department and energy "
                          "label, latest version of each (exact: read from the analytics tables)",
                          ["department", "label"], registry=r)
        self.fg_share = Gauge("dpe_analytics_fg_share", "Share of F and G labels (passoires thermiques) among a "
                              "department's certificates, 0..1", ["department"], registry=r)
        self.messages = Counter("dpe_analytics_messages", "Messages processed by this process, by outcome: new "
                                "(a certificate not seen before), changed (a new version of a known one), "
                                "unchanged (a duplicate), deleted, skipped (not JSON, no numero_dpe, invalid)",
                                ["outcome"], registry=r)
        for outcome in ("new", "changed", "unchanged", "deleted", "skipped"):
            self.messages.labels(outcome)
        self.skipped = Gauge("dpe_analytics_skipped", "Messages skipped since the analytics began, by reason "
                             "(exact: read from the analytics tables)", ["reason"], registry=r)
        self.batch_seconds = Histogram("dpe_analytics_batch_seconds", "Seconds to apply one batch (one "
                                       "PostgreSQL transaction: state, counts and offsets)", buckets=WRITE_BUCKETS,
                                       registry=r)
        self.alerts = Counter("dpe_analytics_alerts", "Alert summary lines logged, by level (warning: the F+G "
                              "share is above ANALYTICS_ALERT_SHARE)", ["level"], registry=r)
        for level in ALERT_LEVELS:
            self.alerts.labels(level)
        for reason in SKIP_REASONS:
            self.skipped.labels(reason).set(0)
        self.lag = _Lag("dpe_analytics", "the analytics consumer", r)
        self._last = _LastCommit()
        g = Gauge("dpe_analytics_last_commit_age_seconds", "Seconds since the last batch was committed "
                  "(NaN before the first)", registry=r)
        g.set_function(self._last.age)
        self._rows_seen: set[tuple[str, str]] = set()

    def committed(self) -> None:
        self._last.at = time.time()

    def set_counts(self, labels: dict[str, dict[str, int]], skipped: dict[str, int]) -> None:
        seen = set()
        for dep, by in labels.items():
            total = sum(by.values())
            for label in ENERGY_LABELS:
                self.rows.labels(dep, label).set(by.get(label, 0))
                seen.add((dep, label))
            self.fg_share.labels(dep).set((by.get("F", 0) + by.get("G", 0)) / total if total else 0.0)
        for gone in self._rows_seen - seen:
            try:
                self.rows.remove(*gone)
            except KeyError:
                pass
        self._rows_seen = seen
        for reason, n in skipped.items():
            self.skipped.labels(reason).set(n)


def producer_registry(department: str, rows: int, dead: int, seconds: float, ok: bool,
                      registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """The producer's summary as metrics (what :func:`push_producer_summary` pushes)."""
    r = registry or CollectorRegistry()
    Gauge("dpe_producer_rows", "Rows the producer sent to Kafka in its run", ["department"],
          registry=r).labels(department).set(rows)
    Gauge("dpe_producer_dead_letters", "Rows the producer sent to the dead-letter topic in its run", ["department"],
          registry=r).labels(department).set(dead)
    Gauge("dpe_producer_duration_seconds", "Duration of the producer's run", ["department"],
          registry=r).labels(department).set(seconds)
    Gauge("dpe_producer_success", "1 when the producer's run ended well (exit 0), else 0", ["department"],
          registry=r).labels(department).set(1 if ok else 0)
    Gauge("dpe_producer_last_run_timestamp_seconds", "Unix time the producer's run ended", ["department"],
          registry=r).labels(department).set(time.time())
    return r


def push_producer_summary(url: str | None, department: str, rows: int, dead: int, seconds: float,
                          ok: bool, timeout_s: float = 10.0, grouping: dict[str, str] | None = None) -> bool:
    """Push the summary to a Pushgateway (job ``dpe-producer``, grouped by ``grouping``'s labels and the
    department: each group holds one department of one release).  Never raises: a Pushgateway that is
    down costs a warning, not the Job.  False when nothing was pushed."""
    if not url:
        return False
    from prometheus_client import push_to_gateway

    shown = safe_url(url)  # a password in the URL is never logged
    try:
        push_to_gateway(url, job="dpe-producer", grouping_key={**(grouping or {}), "department": department},
                        registry=producer_registry(department, rows, dead, seconds, ok), timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - a metrics sink must never fail the Job
        error = safe_url(str(exc))[:200]
        logs.event(log, "metrics_push_failed", f"could not push the summary to {shown}: {error}", logging.WARNING,
                   url=shown, error=error)
        return False
    logs.event(log, "metrics_pushed", f"summary pushed to {shown}", url=shown, department=department)
    return True


class _Quiet(WSGIRequestHandler):
    """No line per request (the kubelet asks every few seconds)."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a request in progress never holds the process at exit


#: the probes' paths on the metrics port (the chart's livenessProbe/readinessProbe) -> the method answering
PROBE_PATHS = {"/livez": "livez", "/readyz": "readyz"}


def probe_app(registry: CollectorRegistry, probes: Any = None):
    """The WSGI app of the metrics port: ``/livez`` and ``/readyz`` answer ``probes.livez()`` /
    ``probes.readyz()`` (``(ok, reason)``: 200 or 503 with the reason as text), everything else is
    prometheus_client's ``/metrics``."""
    from prometheus_client import make_wsgi_app

    metrics_app = make_wsgi_app(registry)

    def app(environ, start_response):
        check = PROBE_PATHS.get(environ.get("PATH_INFO", ""))
        if check is None or probes is None:
            return metrics_app(environ, start_response)
        try:
            ok, reason = getattr(probes, check)()
        except Exception as exc:  # noqa: BLE001 - a probe that fails says why
            ok, reason = False, f"{check} check failed: {logs.short_error(exc)}"
        body = f"{'ok' if ok else 'not ' + check[:-1]}: {reason}\n".encode()
        start_response("200 OK" if ok else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return app


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0", probes: Any = None):
    """Serve ``registry`` on http://addr:port/metrics and, with ``probes`` (an object with ``livez()`` and
    ``readyz()``), /livez and /readyz (daemon threads); returns the server (None when port is 0)."""
    if not port:
        return None
    import threading

    server = make_server(addr, port, probe_app(registry, probes), _Server, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    paths = "/metrics, /livez, /readyz" if probes is not None else "/metrics"
    logs.event(log, "metrics_listening", f"{paths} on http://{addr}:{port}", port=port)
    return server


def sample_names(registries: Iterable[CollectorRegistry]) -> set[str]:
    """Every sample name the registries expose (``_total``, ``_bucket``, ``_sum``, ``_count``… included)."""
    names: set[str] = set()
    for reg in registries:
        for family in reg.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
            names.update(family.name + suffix for suffix in suffixes)
            names.update(s.name for s in family.samples)
    return names


def exported_names() -> set[str]:
    """Every metric name of the consumer, the analytics consumer and the producer summary."""
    return sample_names([ConsumerMetrics().registry, AnalyticsMetrics().registry,
                         producer_registry("69", 0, 0, 0.0, True)])


def run_service(app: Any, port: int, prog: str, what: str, log: logging.Logger) -> int:
    """Run a long-lived consumer (``dpe-ingest consume`` or ``analytics``): its /metrics, /livez and
    /readyz on ``port`` (0 = none; 2 when the port cannot be bound), SIGTERM/SIGINT ask ``app.request_stop``, then
    ``app.run()``'s exit code; a crash is logged as one ``fatal`` event and exits 1."""
    try:
        serve(app.metrics.registry, port, probes=app if hasattr(app, "livez") else None)
    except OSError as exc:
        print(f"{prog}: METRICS_PORT={port}: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, app.request_stop)
    signal.signal(signal.SIGINT, app.request_stop)
    try:
        return app.run()
    except ConfigError as exc:  # the brokers or the database refused a setting (credentials, CA, ACL): exit 2
        logs.event(log, "config_error", f"{what}: {exc}", logging.ERROR)
        return 2
    except Exception as exc:  # noqa: BLE001
        short = (" ".join(str(exc).split()) or type(exc).__name__)[:300]
        log.error(f"{what} failed: {short}", exc_info=True, extra={"event": "fatal", "fields": {"error": short}})
        return 1
