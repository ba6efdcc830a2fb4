"""/livez and /readyz of the consumer and the analytics (issue 23), with a real engine, a real broker and a
real PostgreSQL.

The engine runs in this process (its crash hook, which the product calls at fixed points and which does
nothing in a pod, here holds a thread to stall the poll loop or wedge a batch mid-transaction) and its
metrics port is served by ``metrics.serve`` as ``run_service`` serves it; the analytics runs as a real
process.  Waits are bounded and fail on timeout; nothing asserts a duration."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

import pytest

from dpe_ingest import config, consumer, metrics
from test_consumer import create_topic, doc, new_names, produce, reconcile, table_count

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

SLOW = 120.0  # seconds: the bound of every wait (only reached on failure)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def probe(port: int, path: str) -> tuple[int, str]:
    """(HTTP status, body) of one probe request, as the kubelet makes it (its own timeout)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except urllib.error.URLError as e:  # not listening yet: the kubelet counts it as a failure too
        return 0, str(e.reason)


def wait_probe(port: int, path: str, status: int, what: str, alive=lambda: True, saying: str = "") -> str:
    """The probe's body once it answers ``status`` (and, when given, says ``saying``)."""
    deadline = time.monotonic() + SLOW
    last = None
    while time.monotonic() < deadline:
        last = probe(port, path)
        if last[0] == status and saying in last[1]:
            return last[1]
        assert alive(), f"the engine stopped while waiting for {what}; last answer {last}"
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {path} answered {last}")


class Hold:
    """The engine's crash hook: at ``point``, once armed, it holds the calling thread until released."""

    def __init__(self):
        self.armed: dict[str, threading.Event] = {}
        self.held: dict[str, threading.Event] = {}
        self.release: dict[str, threading.Event] = {}

    def arm(self, point: str) -> None:
        self.held[point], self.release[point] = threading.Event(), threading.Event()
        self.armed[point] = threading.Event()
        self.armed[point].set()

    def __call__(self, point: str, batches_done: int) -> None:
        armed = self.armed.get(point)
        if armed is not None and armed.is_set():
            armed.clear()
            self.held[point].set()
            assert self.release[point].wait(SLOW), f"hold at {point} never released"


def test_livez_fails_when_the_loop_stalls_or_a_batch_cannot_commit_and_readyz_follows_the_database(
        kafka_bootstrap, postgres_factory, tmp_path, caplog):
    pg = postgres_factory()
    names = new_names("probe")
    topic, table = names["KAFKA_TOPIC"], names["DB_TABLE"]
    create_topic(kafka_bootstrap, topic, 3)
    sent = produce(kafka_bootstrap, topic, [doc(i, tag="L") for i in range(300)])
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "DATABASE_URL": pg.url, "RETRY_MAX_BACKOFF_S": "1",
           "LIVENESS_STALL_S": "3", "BATCH_COMMIT_TIMEOUT_S": "4", **names}
    cfg = config.ConsumerConfig.from_env(env)
    hold = Hold()
    app = consumer.Consumer(cfg, crash=hold)
    port = free_port()
    server = metrics.serve(app.metrics.registry, port, "127.0.0.1", probes=app)
    # before the engine runs: live (nothing stalled yet), not ready (not in the group)
    status, body = probe(port, "/readyz")
    assert status == 503 and "not a member of the consumer group" in body, body
    outcome: list = []
    runner = threading.Thread(target=lambda: outcome.append(app.run()), name="engine", daemon=True)
    caplog.set_level(logging.INFO)
    runner.start()
    alive = runner.is_alive
    try:
        # a member with no partitions is ready too (a spare replica): the group's first round may
        # assign none before the topic's partitions are known, so wait for ours
        body = wait_probe(port, "/readyz", 200, "ready: assigned and PostgreSQL answering", alive, saying=topic)
        assert "PostgreSQL answers" in body, body
        deadline = time.monotonic() + SLOW
        while table_count(pg.url, table) != 300:
            assert time.monotonic() < deadline and alive(), "the first 300 rows"
            time.sleep(0.2)
        assert probe(port, "/livez")[0] == 200

        # 1. the poll loop stalls (its thread held right after a poll): /livez fails, naming the setting
        hold.arm("after_poll")
        sent += produce(kafka_bootstrap, topic, [doc(i, tag="L") for i in range(300, 400)])
        assert hold.held["after_poll"].wait(SLOW), "no poll after the new messages"
        body = wait_probe(port, "/livez", 503, "/livez to fail while the loop is held", alive)
        assert "poll loop has not turned" in body and "LIVENESS_STALL_S=3" in body, body
        hold.release["after_poll"].set()
        wait_probe(port, "/livez", 200, "/livez to pass once the loop turns again", alive)

        # 2. a batch cannot commit (the writer held inside its transaction) while the loop turns: /livez
        # fails on the batch's age, and the engine says it is waiting, at least every 10 s
        hold.arm("after_insert")
        sent += produce(kafka_bootstrap, topic, [doc(i, tag="L") for i in range(400, 500)])
        assert hold.held["after_insert"].wait(SLOW), "no batch write after the new messages"
        body = wait_probe(port, "/livez", 503, "/livez to fail on the batch that does not commit", alive)
        assert "has not committed" in body and "BATCH_COMMIT_TIMEOUT_S=4" in body, body
        assert "poll loop" not in body  # the loop itself goes on
        deadline = time.monotonic() + SLOW
        while not [r for r in caplog.records if getattr(r, "event", None) == "db_waiting"]:
            assert time.monotonic() < deadline, "no db_waiting line while the batch is held"
            time.sleep(0.2)
        hold.release["after_insert"].set()
        wait_probe(port, "/livez", 200, "/livez to pass once the batch committed", alive)
        assert [r for r in caplog.records if getattr(r, "event", None) == "db_recovered"]

        # 3. PostgreSQL down: not ready (naming it), still live (nothing to write); back: ready again
        deadline = time.monotonic() + SLOW
        while table_count(pg.url, table) != 500:
            assert time.monotonic() < deadline and alive(), "all 500 rows"
            time.sleep(0.2)
        pg.kill()
        body = wait_probe(port, "/readyz", 503, "/readyz to fail with PostgreSQL down", alive)
        assert "PostgreSQL at" in body and "does not answer" in body, body
        assert probe(port, "/livez")[0] == 200
        pg.restart()
        wait_probe(port, "/readyz", 200, "/readyz to pass with PostgreSQL back", alive)
    finally:
        for h in hold.release.values():
            h.set()
        app.request_stop()
        runner.join(SLOW)
        server.shutdown()
    assert outcome == [0]
    reconcile(pg.url, table, sent)


def test_analytics_serves_its_probes_from_its_command(kafka_bootstrap, postgres_factory, tmp_path):
    """``dpe-ingest analytics`` (run_service) answers /livez and /readyz on METRICS_PORT, and /readyz
    turns 503 when its database goes away."""
    pg = postgres_factory()
    tag = uuid.uuid4().hex[:8]
    topic = f"aprobe-{tag}"
    create_topic(kafka_bootstrap, topic, 2)
    produce(kafka_bootstrap, topic, [doc(i, tag="A") for i in range(50)])
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "DATABASE_URL": pg.url,
           "KAFKA_TOPIC": topic, "KAFKA_DLQ_TOPIC": topic + "-dlq", "ANALYTICS_GROUP": f"aprobe-{tag}",
           "ANALYTICS_TABLE_PREFIX": f"aprobe_{tag}", "METRICS_PORT": str(port), "RETRY_MAX_BACKOFF_S": "1"}
    log_path = tmp_path / "analytics.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dpe_ingest", "analytics"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    alive = lambda: proc.poll() is None  # noqa: E731
    try:
        wait_probe(port, "/readyz", 200, "analytics ready", alive)
        assert probe(port, "/livez")[0] == 200
        assert b"dpe_analytics_lag_total" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        pg.kill()
        body = wait_probe(port, "/readyz", 503, "analytics not ready without its database", alive)
        assert "PostgreSQL at" in body, body
        pg.restart()
        wait_probe(port, "/readyz", 200, "analytics ready again", alive)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(SLOW) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
