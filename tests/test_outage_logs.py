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
def _producer_paging(broker, srv, department: str, prefix: str, tmp_path, **extra: str):
    """(topic, process, log path) of ``dpe-ingest produce`` for ``department``, once it has logged its
    first page (its topics on ``broker``, fresh names from ``prefix``)."""
    topic = f"{prefix}-{os.getpid()}-{int(time.time())}"
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "ADEME_API_URL": srv.url, "DEPARTMENT": department,
           "ADEME_PAGE_SIZE": "500", "KAFKA_TOPIC": topic, "KAFKA_DLQ_TOPIC": topic + "-dlq",
           "PRODUCER_CHECKPOINT_TOPIC": topic + "-ckpt", "KAFKA_TOPIC_PARTITIONS": "3", **extra}
    log_path = tmp_path / "producer.log"
    proc = start(command("produce"), env, log_path)
    deadline = time.monotonic() + 120
    while not events(log_path.read_text(errors="replace"), "page"):
        if proc.poll() is not None or time.monotonic() >= deadline:
            proc.kill()
            proc.wait(30)
            raise AssertionError(log_path.read_text()[-3000:])
        time.sleep(0.05)
    return topic, proc, log_path


def test_a_producer_blocked_by_a_frozen_broker_logs_every_10s_and_its_recovery(kafka_broker_factory,
                                                                             standin_factory, tmp_path):
    broker = kafka_broker_factory()
    ds = Dataset({"38": 20_000}, default_rows=0, seed=21)
    srv = standin_factory(ds)
    topic, proc, log_path = _producer_paging(broker, srv, "38", "outage", tmp_path)
    try:
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


# ---------------------------------------------------------------------------------------------
# a broker stopped and restarted, PostgreSQL stopped and restarted: the producer, the consumer and the
# analytics say so at least every 10 s, naming the server, and once when it answers again; nothing is
# lost or written twice
# ---------------------------------------------------------------------------------------------
LINE_GAP_S = 10.5  # "at least every 10 s", on the lines' own millisecond timestamps (+ the line's own write)


def _outage_lines(text: str, names: tuple[str, ...], field: str, value: str) -> list[dict]:
    """Our warning/error lines of these events naming the server (``field`` = ``value``), in time order."""
    out = [e for name in names for e in events(text, name)
           if e.get(field) == value and e.get("level") in ("warning", "error")]
    return sorted(out, key=_ts)


def _assert_spoke_through(text: str, who: str, lines: list[dict], down_at: float, up_at: float,
                          recovered: list[dict]) -> None:
    """Lines from at most LINE_GAP_S after ``down_at`` until the server came back at ``up_at``, never
    more than LINE_GAP_S apart, then one recovery line after ``up_at``."""
    during = [_ts(e) for e in lines if down_at <= _ts(e) <= up_at + 1.0]
    assert during, f"{who}: no line while the server was down:\n{text[-4000:]}"
    assert during[0] - down_at <= LINE_GAP_S, (who, down_at, during[:3])
    gaps = [round(b - a, 2) for a, b in zip(during, during[1:])]
    assert all(g <= LINE_GAP_S for g in gaps), (who, gaps)
    assert up_at - during[-1] <= LINE_GAP_S, (who, up_at, during[-1])
    assert any(_ts(r) >= up_at - 1.0 for r in recovered), f"{who}: no recovery line after {up_at}:\n{text[-4000:]}"
    print(f"{who}: {len(during)} lines while down {up_at - down_at:.0f}s, gaps {gaps}")


@pytest.mark.kafka
def test_a_producer_says_kafka_is_down_while_the_broker_is_stopped_and_delivers_exactly(
        kafka_broker_factory, standin_factory, tmp_path):
    broker = kafka_broker_factory()
    ds = Dataset({"69": 20_000}, default_rows=0, seed=23)
    srv = standin_factory(ds)
    topic, proc, log_path = _producer_paging(broker, srv, "69", "stop", tmp_path, ADEME_MAX_RPS="20")
    try:
        broker.kill()  # SIGKILL: connections refused until it is back
        down_at = time.time()
        time.sleep(25)
        broker.restart()
        up_at = time.time()
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text(errors="replace")
    assert [e for e in events(text, "page") if _ts(e) < down_at], "the outage did not land mid-run"
    lines = _outage_lines(text, ("kafka_waiting", "kafka_wait"), "bootstrap", broker.bootstrap)
    assert lines, text[-4000:]
    _assert_spoke_through(text, "producer", lines, down_at, up_at, events(text, "kafka_recovered"))
    records = read_topic(broker.bootstrap, topic)
    keys = [r.key.decode() for r in records]
    assert sorted(keys) == sorted(ds.current_rows("69")), "every row of the department exactly once"


def _group_run(env: dict, tmp_path, tag: str):
    from kafka_util import start as start_proc

    sink = start_proc(command("consume"), env, tmp_path / f"sink-{tag}.log")
    analytics = start_proc(command("analytics"), env, tmp_path / f"analytics-{tag}.log")
    return {"consume": (sink, tmp_path / f"sink-{tag}.log"), "analytics": (analytics, tmp_path / f"analytics-{tag}.log")}


def _wait(pred, what: str, procs: dict, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        for name, (p, log) in procs.items():
            assert p.poll() is None, f"{name} exited {p.returncode} while waiting for {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def _stop_all(procs: dict) -> None:
    for name, (p, log) in procs.items():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for name, (p, log) in procs.items():
        try:
            assert p.wait(120) == 0, f"{name}:\n{log.read_text()[-4000:]}"
        finally:
            if p.poll() is None:
                p.kill()


def _counted(database_url: str, prefix: str) -> int:
    import psycopg2

    import reconcile as rec

    try:
        return sum(sum(v.values()) for v in rec.read_counts(database_url, prefix)["labels"].values())
    except psycopg2.Error:
        return -1


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.parametrize("server", ["kafka", "postgresql"])
def test_consumer_and_analytics_say_which_server_is_down_every_10s_and_when_it_is_back(
        server, kafka_broker_factory, kafka_bootstrap, postgres_factory, database_url, tmp_path):
    from test_analytics import assert_exact, names
    from test_consumer import doc, produce, reconcile, table_count

    broker = kafka_broker_factory() if server == "kafka" else None
    pg = postgres_factory() if server == "postgresql" else None
    bootstrap = broker.bootstrap if broker else kafka_bootstrap
    db = pg.url if pg else database_url
    n = names()
    # the default backoff cap (30 s): the lines keep their 10 s whatever the backoff
    env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": db, "LOG_FORMAT": "logfmt",
           "RETRY_MAX_BACKOFF_S": "30", **n}
    from test_consumer import create_topic

    create_topic(bootstrap, n["KAFKA_TOPIC"], 3)
    sent = produce(bootstrap, n["KAFKA_TOPIC"], [doc(i, tag="O") for i in range(1500)])
    procs = _group_run(env, tmp_path, server)
    try:
        _wait(lambda: table_count(db, n["DB_TABLE"]) == 1500 and _counted(db, n["ANALYTICS_TABLE_PREFIX"]) == 1500,
              "the first 1500 messages written and counted", procs)
        if broker:
            broker.kill()
        else:
            pg.kill()
        down_at = time.time()
        if pg:  # the consumers need PostgreSQL only when they have something to write
            sent += produce(bootstrap, n["KAFKA_TOPIC"], [doc(i, tag="O") for i in range(1500, 2000)])
        time.sleep(25)
        if broker:
            broker.restart()
        else:
            pg.restart()
        up_at = time.time()
        if broker:
            sent += produce(bootstrap, n["KAFKA_TOPIC"], [doc(i, tag="O") for i in range(1500, 2000)])
        _wait(lambda: table_count(db, n["DB_TABLE"]) == 2000 and _counted(db, n["ANALYTICS_TABLE_PREFIX"]) == 2000,
              "every message written and counted after the outage", procs)
    finally:
        _stop_all(procs)
    for name, (p, log) in procs.items():
        text = log.read_text(errors="replace")
        if broker:
            lines = _outage_lines(text, ("kafka_unavailable", "kafka_waiting"), "bootstrap", bootstrap)
            recovered = events(text, "kafka_recovered")
        else:
            lines = _outage_lines(text, ("db_unavailable", "db_waiting", "db_error"), "database",
                                  _safe(db))
            recovered = events(text, "db_recovered")
        _assert_spoke_through(text, name, lines, down_at, up_at, recovered)
    reconcile(db, n["DB_TABLE"], sent)
    assert_exact(env, db)


def _safe(url: str) -> str:
    from dpe_ingest.pg_connection import safe_url

    return safe_url(url)
