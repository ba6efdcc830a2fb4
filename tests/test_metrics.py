"""/metrics of the sink and of the analytics consumer, scraped over HTTP from the real processes and
parsed with prometheus_client's own parser; the producer's Pushgateway summary."""

from __future__ import annotations

import http.server
import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid

import psycopg2
import pytest
from kafka import KafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from dpe_ingest import metrics
from kafka_util import command, start

SLOW = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of http://127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def wait_for(pred, what: str, proc, log_path):
    deadline = time.monotonic() + SLOW
    while time.monotonic() < deadline:
        try:
            got = pred()
        except urllib.error.URLError:  # not listening yet (the process is starting)
            got = None
        if got:
            return got
        assert proc.poll() is None, f"exited while waiting for {what}:\n{log_path.read_text()[-4000:]}"
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}:\n{log_path.read_text()[-4000:]}")


def send(bootstrap: str, topic: str, items) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for item in items:
            if isinstance(item, dict):
                producer.send(topic, key=item["numero_dpe"].encode(), value=json.dumps(item).encode())
            else:
                producer.send(topic, value=item)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=10)


def doc(i: int, label: str | None = None) -> dict:
    return {"numero_dpe": f"MX{i:06d}", "date_reception_dpe": f"2024-{1 + i % 12:02d}-0{1 + i % 9}",
            "etiquette_dpe": label or "ABCDEFG"[i % 7], "departement": ("69", "01", "38")[i % 3]}


@pytest.mark.kafka
@pytest.mark.postgres
def test_metrics_endpoints_count_what_was_written(kafka_bootstrap, database_url, tmp_path):
    tag = uuid.uuid4().hex[:10]
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "DATABASE_URL": database_url, "KAFKA_TOPIC": f"mx-{tag}",
           "KAFKA_DLQ_TOPIC": f"mx-{tag}-dlq", "CONSUMER_GROUP": f"mx-{tag}-sink", "DB_TABLE": f"dpe_mx_{tag}",
           "ANALYTICS_GROUP": f"mx-{tag}-an", "ANALYTICS_TABLE_PREFIX": f"dpe_mx_{tag}_a", "BATCH_SIZE": "50",
           "BATCH_IDLE_MS": "200", "KAFKA_TOPIC_PARTITIONS": "3", "LOG_FORMAT": "logfmt"}
    n = 1000
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([NewTopic(env["KAFKA_TOPIC"], 3, 1)])
    finally:
        admin.close()
    send(kafka_bootstrap, env["KAFKA_TOPIC"], [doc(i) for i in range(n)] + [b"not json", b'{"no": "key"}'])
    sink_port, an_port = free_port(), free_port()
    sink_log, an_log = tmp_path / "sink.log", tmp_path / "analytics.log"
    sink = start(command("consume"), {**env, "METRICS_PORT": str(sink_port)}, sink_log)
    an = start(command("analytics"), {**env, "METRICS_PORT": str(an_port)}, an_log)
    try:
        def sink_done():  # the two bad messages went to any partition: their batch may come after the rows'
            s = scrape(sink_port)
            return s if (value(s, "dpe_consumer_rows_total", result="inserted") == n
                         and value(s, "dpe_consumer_rows_total", result="dead_lettered") == 2) else None

        s = wait_for(sink_done, "the sink's counters", sink, sink_log)
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(f'SELECT count(*) FROM "{env["DB_TABLE"]}"')
            assert cur.fetchone()[0] == n
        assert value(s, "dpe_consumer_rows_total", result="dead_lettered") == 2
        assert value(s, "dpe_consumer_rows_total", result="updated") == 0
        batches = value(s, "dpe_consumer_batches_total")
        assert batches >= n / 50
        assert value(s, "dpe_consumer_batch_write_seconds_count") == batches
        assert value(s, "dpe_consumer_batch_write_seconds_sum") > 0
        assert value(s, "dpe_consumer_batch_write_seconds_bucket", le="+Inf") == batches
        age = value(s, "dpe_consumer_last_commit_age_seconds")
        assert not math.isnan(age) and age >= 0
        assert value(s, "dpe_consumer_last_commit_timestamp_seconds") > 1.7e9
        # a new version of 10 rows and 5 exact duplicates: updated and unchanged
        send(kafka_bootstrap, env["KAFKA_TOPIC"], [doc(i, "G") for i in range(0, 70, 7)] +
             [doc(i) for i in range(1, 6)])
        s = wait_for(lambda: (lambda s: s if value(s, "dpe_consumer_rows_total", result="updated") == 10
                              and value(s, "dpe_consumer_rows_total", result="unchanged") == 5 else None)(
            scrape(sink_port)), "updated/unchanged counters", sink, sink_log)
        assert value(s, "dpe_consumer_rows_total", result="inserted") == n
        lag = wait_for(lambda: (lambda s: s if value(s, "dpe_consumer_lag_total") == 0 else None)(scrape(sink_port)),
                       "sink lag 0", sink, sink_log)
        parts = {dict(k[1])["partition"] for k in lag if k[0] == "dpe_consumer_lag"}
        assert parts == {"0", "1", "2"}

        # the analytics consumer: rows per department and label == GROUP BY on the sink's table
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(f'SELECT departement, etiquette_dpe, count(*) FROM "{env["DB_TABLE"]}" GROUP BY 1, 2')
            expected = {(d, lab): c for d, lab, c in cur.fetchall()}

        def analytics_done():
            s = scrape(an_port)
            got = {(dict(k[1])["department"], dict(k[1])["label"]): v for k, v in s.items()
                   if k[0] == "dpe_analytics_rows" and v}
            return s if got == expected else None

        s = wait_for(analytics_done, "the analytics gauges to match dpe_data", an, an_log)
        assert value(s, "dpe_analytics_skipped", reason="not_json") == 1
        assert value(s, "dpe_analytics_skipped", reason="no_numero_dpe") == 1
        fg = sum(v for (d, lab), v in expected.items() if d == "69" and lab in "FG")
        total69 = sum(v for (d, _lab), v in expected.items() if d == "69")
        assert value(s, "dpe_analytics_fg_share", department="69") == pytest.approx(fg / total69)
        assert value(s, "dpe_analytics_rows", department="69", label="unknown") == 0
        assert value(s, "dpe_analytics_messages_total", outcome="changed") == 10
        assert value(s, "dpe_analytics_messages_total", outcome="new") == n
        s = wait_for(lambda: (lambda s: s if value(s, "dpe_analytics_lag_total") == 0 else None)(scrape(an_port)),
                     "analytics lag 0", an, an_log)
        assert value(s, "dpe_analytics_batch_seconds_count") >= 1
        # a batch of dead letters alone is still one transaction (its offsets): counted and timed
        before = value(scrape(sink_port), "dpe_consumer_batches_total")
        send(kafka_bootstrap, env["KAFKA_TOPIC"], [b"alone and not json"])
        s = wait_for(lambda: (lambda s: s if value(s, "dpe_consumer_rows_total", result="dead_lettered") == 3
                              else None)(scrape(sink_port)), "the third dead letter", sink, sink_log)
        assert value(s, "dpe_consumer_batches_total") == before + 1
        assert value(s, "dpe_consumer_batch_write_seconds_count") == before + 1
    finally:
        for p in (sink, an):
            if p.poll() is None:
                p.terminate()
                p.wait(60)
    assert sink.returncode == 0 and an.returncode == 0


class Pushgateway:
    """A Pushgateway on a free 127.0.0.1 port that keeps every PUT as (path, body), in a list of its own."""

    def __init__(self) -> None:
        got: list[tuple[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                got.append((self.path, body.decode()))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.got = got
        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()  # returns at once when already shut down
        self.server.server_close()


@pytest.fixture
def pushgateway():
    gw = Pushgateway()
    yield gw
    gw.stop()


def test_producer_summary_is_pushed_to_a_pushgateway_and_a_dead_one_is_only_a_warning(pushgateway, caplog):
    url = pushgateway.url
    assert metrics.push_producer_summary(url, "2A", rows=1234, dead=5, seconds=12.5, ok=True)
    pushgateway.stop()
    ((path, body),) = pushgateway.got
    assert path == "/metrics/job/dpe-producer/department/2A"
    samples = {(s.name, s.labels.get("department")): s.value
               for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples[("dpe_producer_rows", "2A")] == 1234
    assert samples[("dpe_producer_dead_letters", "2A")] == 5
    assert samples[("dpe_producer_success", "2A")] == 1
    assert {name for name, _ in samples} <= metrics.exported_names()
    # nothing listens there any more: a warning, never an exception
    assert metrics.push_producer_summary(url, "2A", rows=1, dead=0, seconds=1.0, ok=True, timeout_s=2) is False
    # a password in the URL never reaches the warning
    secret_url = url.replace("http://", "http://dpe:s3cret-pw@")
    with caplog.at_level(logging.WARNING, logger="dpe_ingest.metrics"):
        assert metrics.push_producer_summary(secret_url, "2A", rows=1, dead=0, seconds=1.0, ok=True, timeout_s=2) is False
    assert caplog.records and "s3cret-pw" not in caplog.text + repr([r.__dict__ for r in caplog.records])
    assert metrics.push_producer_summary("", "2A", rows=1, dead=0, seconds=1.0, ok=True) is False


@pytest.mark.parametrize("grouping", ["job=other", "department=69", "namespace", "bad-name=x", "__x=1", "release="])
def test_a_bad_pushgateway_grouping_stops_the_producer_before_anything(grouping, pushgateway):
    from kafka_util import command as cmd, run

    res = run(cmd("produce"), {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "DEPARTMENT": "69",
                               "METRICS_PUSHGATEWAY_URL": pushgateway.url, "METRICS_PUSHGATEWAY_GROUPING": grouping})
    assert res.returncode == 2, res.stderr[-2000:]
    assert "METRICS_PUSHGATEWAY_GROUPING" in res.stderr and "Kafka" not in res.stderr, res.stderr[-2000:]
    assert pushgateway.got == []


@pytest.mark.kafka
def test_a_producer_pushes_its_summary_when_a_pushgateway_is_set(kafka_bootstrap, standin_factory, pushgateway):
    from dpe_ingest.standin import Dataset
    from kafka_util import command as cmd, run

    srv = standin_factory(Dataset({"69": 700}, seed=4))
    tag = uuid.uuid4().hex[:10]
    res = run(cmd("produce"), {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "ADEME_API_URL": srv.url,
                               "DEPARTMENT": "69", "KAFKA_TOPIC": f"px-{tag}", "KAFKA_DLQ_TOPIC": f"px-{tag}-dlq",
                               "PRODUCER_CHECKPOINT_TOPIC": f"px-{tag}-ckpt",
                               "METRICS_PUSHGATEWAY_URL": pushgateway.url,
                               "METRICS_PUSHGATEWAY_GROUPING": "namespace=dpe-a, release=r1"})  # the chart's
    assert res.returncode == 0, res.stderr[-3000:]
    ((path, body),) = pushgateway.got
    # one group per department of one release: two releases sharing a Pushgateway do not overwrite
    parts = path.split("/")[2:]  # /metrics/<label>/<value>/...: the group's labels (in any order)
    assert dict(zip(parts[::2], parts[1::2])) == {"job": "dpe-producer", "namespace": "dpe-a", "release": "r1",
                                                  "department": "69"}, path
    samples = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples["dpe_producer_rows"] == 700 and samples["dpe_producer_success"] == 1
    assert "event=metrics_pushed" in res.stderr


def test_a_producer_that_gives_up_pushes_a_failed_summary(pushgateway):
    """The chart's DpeIngestProducerFailed alert reads dpe_producer_success == 0: a run that fails must
    push it (an API that never answers: exit 1 after its retries), a run that succeeds pushes 1 (above)."""
    from kafka_util import command as cmd, run

    res = run(cmd("produce"), {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}",
                               "ADEME_API_URL": f"http://127.0.0.1:{free_port()}/data-fair/api/v1/datasets/dpe03existant",
                               "ADEME_MAX_RETRIES": "0", "ADEME_TIMEOUT_S": "2", "DEPARTMENT": "69",
                               "METRICS_PUSHGATEWAY_URL": pushgateway.url})
    assert res.returncode == 1, res.stderr[-3000:]
    assert "event=gave_up" in res.stderr
    ((path, body),) = pushgateway.got
    assert path == "/metrics/job/dpe-producer/department/69"
    samples = {s.name: s.value for f in text_string_to_metric_families(body) for s in f.samples}
    assert samples["dpe_producer_success"] == 0 and samples["dpe_producer_rows"] == 0
