"""A producer kept waiting by Kafka says so, naming the broker, at least every 10 s, and says when it
recovers (issue 23: with the broker SIGKILLed for 10 s two producers wrote nothing for 25-27 s)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import time

import pytest
from kafka.errors import KafkaTimeoutError

from dpe_ingest import kafka_io
from dpe_ingest.kafka_io import KafkaUnavailable, flush_logging
from dpe_ingest.standin.data import Dataset
from kafka_util import command, events, read_topic, start


class _SlowBroker:
    """A producer whose flush times out ``n`` times (each after the slice asked) before it succeeds."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def flush(self, timeout=None):
        self.calls += 1
        if self.calls <= self.n:
            time.sleep(timeout)
            raise KafkaTimeoutError("Timeout waiting for future")


def test_flush_warns_while_kafka_keeps_it_waiting_then_says_it_recovered(monkeypatch, caplog):
    import logging

    monkeypatch.setattr(kafka_io, "WAIT_LOG_S", 0.2)
    monkeypatch.setattr(kafka_io, "_FLUSH_SLICE_S", 0.1)
    with caplog.at_level(logging.INFO, logger="dpe_ingest.kafka"):
        flush_logging(_SlowBroker(8), 30, "12 sends", "kafka:9092", {"department": "69"})
    names = [getattr(r, "event", None) for r in caplog.records]
    assert names.count("kafka_waiting") >= 3 and names[-1] == "kafka_recovered", names
    waiting = [r for r in caplog.records if getattr(r, "event", None) == "kafka_waiting"]
    assert "Kafka at kafka:9092" in waiting[0].getMessage() and waiting[0].fields["department"] == "69"
    assert waiting[0].levelno == logging.WARNING
    # fine at once: not a word
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpe_ingest.kafka"):
        flush_logging(_SlowBroker(0), 30, "12 sends", "kafka:9092")
    assert not caplog.records
    # never acknowledged: KafkaUnavailable past the timeout, naming the broker
    with pytest.raises(KafkaUnavailable, match="kafka:9092"):
        flush_logging(_SlowBroker(10**6), 0.5, "12 sends", "kafka:9092")


def _ts(fields: dict) -> float:
    return dt.datetime.fromisoformat(fields["ts"].replace("Z", "+00:00")).timestamp()


@pytest.mark.kafka
def test_a_producer_blocked_by_a_frozen_broker_logs_every_10s_and_its_recovery(kafka_broker_factory,
                                                                             standin_factory, tmp_path):
    broker = kafka_broker_factory()
    ds = Dataset({"38": 20_000}, default_rows=0, seed=21)
    srv = standin_factory(ds)
    topic = f"outage-{os.getpid()}-{int(time.time())}"
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "ADEME_API_URL": srv.url, "DEPARTMENT": "38",
           "ADEME_PAGE_SIZE": "500", "KAFKA_TOPIC": topic, "KAFKA_DLQ_TOPIC": topic + "-dlq",
           "PRODUCER_CHECKPOINT_TOPIC": topic + "-ckpt", "KAFKA_TOPIC_PARTITIONS": "3"}
    log_path = tmp_path / "producer.log"
    proc = start(command("produce"), env, log_path)
    try:
        deadline = time.monotonic() + 120
        while not events(log_path.read_text(errors="replace"), "page"):
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(broker.proc.pid, signal.SIGSTOP)  # frozen: connections stay open, nothing answers
        frozen_at = time.time()
        try:
            time.sleep(25)
        finally:
            os.kill(broker.proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=240) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text(errors="replace")
    pages = events(text, "page")
    assert int(pages[-1]["rows"]) == 20_000 and len(events(text, "page")) >= 2
    waiting = events(text, "kafka_waiting")
    assert len(waiting) >= 2, text[-4000:]
    assert all(w["bootstrap"] == broker.bootstrap and w["department"] == "38" for w in waiting)
    # the first within ~10 s of the freeze (plus the page in flight), then at most 10 s apart
    stamps = [_ts(w) for w in waiting]
    assert stamps[0] - frozen_at <= 12, (frozen_at, stamps)
    assert all(b - a <= 10.5 for a, b in zip(stamps, stamps[1:])), stamps
    recovered = events(text, "kafka_recovered")
    assert recovered and _ts(recovered[0]) >= frozen_at + 20, text[-3000:]
    records = read_topic(broker.bootstrap, topic)
    assert {r.key.decode() for r in records} == set(ds.current_rows("38"))


def test_kafka_client_warnings_reach_our_log_once_per_kind_every_30s():
    """kafka-python's warnings (a broker gone, a coordinator lost) are our event lines, rate-limited."""
    import io
    import logging

    from dpe_ingest import logs

    now = [1000.0]
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(logs.EventFormatter("logfmt"))
    handler.addFilter(logs.ClientLines("kafka", 30.0, clock=lambda: now[0]))
    client = logging.getLogger("kafka.conn.test")
    client.addHandler(handler)
    client.propagate = False
    try:
        for _ in range(5):
            client.warning("Connect attempt to %s returned error %s", "<broker 1>", 111)
        client.warning("Marking the coordinator dead (node %s)", 1)
        now[0] += 31
        client.warning("Connect attempt to %s returned error %s", "<broker 1>", 111)
        logging.getLogger("dpe_ingest.test").addHandler(handler)  # our own lines are never held back
    finally:
        client.removeHandler(handler)
    lines = handler.stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert all("event=kafka_client" in line and "level=warning" in line for line in lines)
    assert "returned error 111" in lines[0] and "suppressed" not in lines[0]
    assert "coordinator dead" in lines[1]
    assert "suppressed=4" in lines[2]  # the four held back are counted on the next line that passes
    assert logs.ClientLines("kafka", 30.0).filter(logging.LogRecord("dpe_ingest.x", 30, "", 0, "m", (), None))
