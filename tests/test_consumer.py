"""The consumer end to end: a real broker, a real PostgreSQL, ``dpe-ingest consume`` as a real process.

Every test reconciles exactly: the set of numero_dpe in the table is the set produced, every row's
fields equal its source message (partition and offset included), and the group's committed offsets
are the topic's end offsets.  Waits are generous (2 shared cores) and nothing asserts a duration.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from dpe_ingest import messages
from dpe_ingest.kafka_io import group_offsets
from dpe_ingest.status_sources import Collector

import crashing
import reconcile as rec
from kafka_util import command, read_topic, run

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

SLOW = 240  # seconds: generous upper bound of any wait (only reached on failure)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sent:
    key: str | None
    value: bytes
    partition: int
    offset: int

    @property
    def doc(self):
        return json.loads(self.value)


def new_names(prefix: str = "c") -> dict:
    tag = uuid.uuid4().hex[:10]
    return {"KAFKA_TOPIC": f"{prefix}-{tag}", "KAFKA_DLQ_TOPIC": f"{prefix}-{tag}-dlq",
            "CONSUMER_GROUP": f"{prefix}-{tag}-sink", "DB_TABLE": f"dpe_{prefix}_{tag}"}


def create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        admin.close()


def doc(i: int, tag: str = "T", **over) -> dict:
    d = {"numero_dpe": f"{tag}{i:07d}X", "date_reception_dpe": (dt.date(2021, 7, 1) + dt.timedelta(days=i % 900)).isoformat(),
         "code_postal_ban": f"{69001 + i % 9:05d}", "etiquette_dpe": "ABCDEFG"[i % 7], "departement": "69"}
    if i % 3 == 0:
        d["surface_habitable_logement"] = 20 + i % 180 + 0.5
    if i % 5 == 0:
        d["type_batiment"] = "appartement" if i % 2 else "maison"
    if i % 11 == 0:
        d["code_postal_ban"] = None
    d.update(over)
    return d


def produce(bootstrap: str, topic: str, items, key_of=None) -> list[Sent]:
    """Send ``items`` (dicts -> JSON, or raw bytes) keyed by numero_dpe; return where each landed."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        pending = []
        for item in items:
            if isinstance(item, dict):
                value = json.dumps(item, ensure_ascii=False).encode()
                key = item.get("numero_dpe") if isinstance(item.get("numero_dpe"), str) else None
            else:
                value, key = item, (key_of(item) if key_of else None)
            pending.append((key, value, producer.send(topic, key=key.encode() if key else None, value=value)))
        producer.flush(timeout=120)
        out = []
        for key, value, fut in pending:
            md = fut.get(timeout=60)
            out.append(Sent(key, value, md.partition, md.offset))
        return out
    finally:
        producer.close(timeout=10)


def wait_all_assigned(*members: "Proc") -> None:
    """Wait until every member's last ``partitions_assigned`` event gave it at least one partition."""

    def all_assigned():
        last = [p.events("partitions_assigned") for p in members]
        return all(e and e[-1]["partitions"] not in ("", None) for e in last)

    members[0].wait_for(all_assigned, f"all {len(members)} consumers to own partitions")


class Proc:
    """``dpe-ingest consume`` as a subprocess, its stderr in a file; ``crash=(point, n)`` arms a crash
    point (tests/crashing.py: SIGKILL at ``point`` once ``n`` batches are written)."""

    def __init__(self, env: dict, tmp: Path, *args: str, name: str = "consumer", crash: tuple[str, int] | None = None):
        self.log_path = tmp / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")
        full = {**os.environ, "PYTHONUNBUFFERED": "1", **{k: str(v) for k, v in env.items()}}
        argv = crashing.command("consume", *crash, *args) if crash else \
            [sys.executable, "-m", "dpe_ingest", "consume", *args]
        self.p = subprocess.Popen(argv, env=full, stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout: float = SLOW) -> int:
        try:
            return self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(30)
            raise AssertionError(f"consumer did not exit in {timeout}s; log:\n{self.text()[-6000:]}")
        finally:
            self._log.close()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict]:
        return [e for e in map(parse_logfmt, self.text().splitlines()) if e.get("event") == name]

    def wait_for(self, pred, what: str, timeout: float = SLOW):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = pred()
            if got:
                return got
            if self.p.poll() is not None:
                raise AssertionError(f"consumer exited ({self.p.returncode}) while waiting for {what}:\n"
                                     f"{self.text()[-6000:]}")
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; log:\n{self.text()[-6000:]}")

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(30)
        if not self._log.closed:
            self._log.close()


def parse_logfmt(line: str) -> dict:
    out, i, n = {}, 0, len(line)
    while i < n:
        while i < n and line[i] == " ":
            i += 1
        j = line.find("=", i)
        if j < 0:
            break
        key, i = line[i:j], j + 1
        if i < n and line[i] == '"':
            dec = json.JSONDecoder()
            try:
                val, end = dec.raw_decode(line, i)
            except ValueError:
                break
            out[key], i = val, end
        else:
            j = line.find(" ", i)
            j = n if j < 0 else j
            out[key], i = line[i:j], j
    return out


@pytest.fixture
def procs():
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def consumer_env(bootstrap: str, database_url: str, names: dict, **extra) -> dict:
    env = {"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "DATABASE_URL": database_url, "BATCH_SIZE": "100",
           "BATCH_IDLE_MS": "1000", "RETRY_MAX_BACKOFF_S": "2", "KAFKA_TOPIC_PARTITIONS": "6",
           "LOG_FORMAT": "logfmt", "LOG_LEVEL": "DEBUG", **names}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def table_rows(database_url: str, table: str) -> dict[str, dict]:
    """numero_dpe -> the row's stored columns and the Kafka position it was written from."""
    return rec.read_table(database_url, table, rec.COLUMNS + ("kafka_partition", "kafka_offset"))


def table_count(database_url: str, table: str) -> int:
    try:
        with psycopg2.connect(database_url, connect_timeout=5) as conn, conn.cursor() as cur:
            cur.execute(f'SELECT count(*) FROM "{table}"')
            n = cur.fetchone()[0]
        conn.close()
        return n
    except psycopg2.Error:
        return -1


def expected_row(s: Sent) -> dict:
    return {**rec.stored_row(s.doc), "kafka_partition": s.partition, "kafka_offset": s.offset}


def reconcile(database_url: str, table: str, good: list[Sent]) -> None:
    """The table holds exactly one row per produced numero_dpe, equal to its (last) message."""
    want = {s.doc["numero_dpe"]: expected_row(s) for s in good}
    rec.assert_rows(want, table_rows(database_url, table))


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    return {tp.partition: off for tp, off in group_offsets(bootstrap, group).items() if tp.topic == topic}


def stored_offsets(database_url: str, group: str, topic: str) -> dict[int, int]:
    """The offsets the consumer keeps in PostgreSQL with the rows (its truth)."""
    with psycopg2.connect(database_url, connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("SELECT partition, next_offset FROM dpe_ingest_offsets WHERE consumer_group = %s AND topic = %s",
                    (group, topic))
        out = dict(cur.fetchall())
    conn.close()
    return out


def assert_fully_committed(bootstrap: str, group: str, sent: list[Sent], topic: str,
                           database_url: str | None = None) -> None:
    """The group's Kafka offsets (advisory, committed at least every second and at exit) and, with
    ``database_url``, the offsets stored with the rows are the end of every partition written to."""
    ends: dict[int, int] = {}
    for s in sent:
        ends[s.partition] = max(ends.get(s.partition, 0), s.offset + 1)
    committed = committed_offsets(bootstrap, group, topic)
    assert {p: committed.get(p) for p in ends} == ends
    if database_url is not None:
        stored = stored_offsets(database_url, group, topic)
        assert {p: stored.get(p) for p in ends} == ends


def stored_and_committed(database_url: str, table: str, rows: int, bootstrap: str, group: str, sent: list[Sent],
                         topic: str, not_yet: tuple[type[BaseException], ...] = (AssertionError,)) -> bool:
    """``rows`` rows are in the table and every sent offset is committed (a ``wait_for`` predicate)."""
    if table_count(database_url, table) != rows:
        return False
    try:
        assert_fully_committed(bootstrap, group, sent, topic, database_url)
        return True
    except not_yet:
        return False


def stored_prefix(database_url: str, group: str, topic: str, sent: list[Sent]) -> set[str]:
    """The keys of the messages before the offsets stored with the rows."""
    stored = stored_offsets(database_url, group, topic)
    return {s.doc["numero_dpe"] for s in sent if s.offset < stored.get(s.partition, 0)}


def batch_totals(*ps: Proc) -> dict:
    t = {"rows": 0, "inserted": 0, "updated": 0, "unchanged": 0, "dead_letters": 0, "batches": 0}
    for p in ps:
        for e in p.events("batch"):
            t["batches"] += 1
            for k in ("rows", "inserted", "updated", "unchanged", "dead_letters"):
                t[k] += int(e[k])
    return t


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_clean_run_writes_every_row_exactly_once(kafka_bootstrap, database_url, procs, tmp_path):
    names = new_names("clean")
    create_topic(kafka_bootstrap, names["KAFKA_TOPIC"], 6)
    sent = produce(kafka_bootstrap, names["KAFKA_TOPIC"], [doc(i) for i in range(5000)])
    assert len({s.partition for s in sent}) == 6
    p = Proc(consumer_env(kafka_bootstrap, database_url, names), tmp_path, "--exit-when-idle", "5")
    procs.append(p)
    assert p.wait() == 0, p.text()[-4000:]
    reconcile(database_url, names["DB_TABLE"], sent)
    assert_fully_committed(kafka_bootstrap, names["CONSUMER_GROUP"], sent, names["KAFKA_TOPIC"], database_url)
    batches = p.events("batch")
    assert all(int(b["rows"]) <= 100 for b in batches)
    assert batch_totals(p) == {"rows": 5000, "inserted": 5000, "updated": 0, "unchanged": 0, "dead_letters": 0,
                               "batches": len(batches)}
    assert len(batches) >= 50
    assert all("lag" in b and "write_ms" in b and b["level"] == "debug" for b in batches)  # one per batch: DEBUG
    assert all(e["rate"].endswith("rows/s") for e in p.events("progress"))  # INFO: every 10 s and at the end
    assert p.events("start") and p.events("stop")[0]["reason"] == "idle"
    # a second run over the same, fully committed topic has nothing to do
    again = Proc(consumer_env(kafka_bootstrap, database_url, names), tmp_path, "--exit-when-idle", "3")
    procs.append(again)
    assert again.wait() == 0
    assert again.events("batch") == []


def test_a_new_version_of_a_row_updates_it_and_a_replay_changes_nothing(kafka_bootstrap, database_url, procs, tmp_path):
    names = new_names("upd")
    create_topic(kafka_bootstrap, names["KAFKA_TOPIC"], 3)
    first = produce(kafka_bootstrap, names["KAFKA_TOPIC"], [doc(i) for i in range(300)])
    p = Proc(consumer_env(kafka_bootstrap, database_url, names), tmp_path, "--exit-when-idle", "4")
    procs.append(p)
    assert p.wait() == 0
    second = produce(kafka_bootstrap, names["KAFKA_TOPIC"],
                     [doc(i, etiquette_dpe="Z") if i < 50 else doc(i) for i in range(300)])
    p2 = Proc(consumer_env(kafka_bootstrap, database_url, names), tmp_path, "--exit-when-idle", "4")
    procs.append(p2)
    assert p2.wait() == 0
    assert batch_totals(p2)["updated"] == 50 and batch_totals(p2)["unchanged"] == 250
    # rows that changed carry the offset of their new message; identical ones keep the first one
    rec.assert_rows({s1.doc["numero_dpe"]: expected_row(s2 if s2.doc["etiquette_dpe"] != s1.doc["etiquette_dpe"] else s1)
                     for s1, s2 in zip(first, second)}, table_rows(database_url, names["DB_TABLE"]))
    assert_fully_committed(kafka_bootstrap, names["CONSUMER_GROUP"], first + second, names["KAFKA_TOPIC"], database_url)


def test_the_crash_variables_in_a_pods_environment_kill_nothing(kafka_bootstrap, database_url, procs, tmp_path):
    """``DPE_TEST_CRASH_AT`` / ``DPE_TEST_CRASH_AFTER_BATCHES`` in the environment of ``dpe-ingest
    consume`` and ``dpe-ingest analytics`` (a pod's, or one ``dpe-ingest run`` passes on) arm nothing:
    both drain the topic and exit 0 (tests arm a crash point through tests/crashing.py only)."""
    names = new_names("nocrash")
    tag = names["KAFKA_TOPIC"].split("-")[-1]
    names.update(ANALYTICS_GROUP=f"nocrash-{tag}-an", ANALYTICS_TABLE_PREFIX=f"dpe_nocrash_{tag}_a")
    create_topic(kafka_bootstrap, names["KAFKA_TOPIC"], 3)
    sent = produce(kafka_bootstrap, names["KAFKA_TOPIC"], [doc(i, tag="N") for i in range(300)])
    env = consumer_env(kafka_bootstrap, database_url, names)
    sink = Proc({**env, "DPE_TEST_CRASH_AT": "after_poll", "DPE_TEST_CRASH_AFTER_BATCHES": 0}, tmp_path,
                "--exit-when-idle", "3")
    procs.append(sink)
    counted = run(command("analytics", "--exit-when-idle", "3"),
                  {**env, "DPE_TEST_CRASH_AT": "before_db_commit", "DPE_TEST_CRASH_AFTER_BATCHES": "0"})
    assert counted.returncode == 0 and "test_crash" not in counted.stderr, counted.stderr[-3000:]
    assert sink.wait() == 0 and sink.events("test_crash") == [], sink.text()[-3000:]
    reconcile(database_url, names["DB_TABLE"], sent)
    want = rec.expected_counts({s.doc["numero_dpe"]: rec.stored_row(s.doc) for s in sent})
    rec.assert_counts(want, rec.read_counts(database_url, names["ANALYTICS_TABLE_PREFIX"]))


@pytest.mark.slow
@pytest.mark.parametrize("point", ["after_poll", "after_insert", "after_db_commit"])
def test_sigkill_at_each_critical_point_loses_and_duplicates_nothing(point, kafka_bootstrap, database_url, procs,
                                                                     tmp_path):
    """Rows and offsets move in one transaction: whatever the crash point, the table is exactly the
    messages before the stored offsets, and no row is ever written twice (no ``unchanged``, no
    ``updated``: nothing is replayed into the table)."""
    names = new_names("kill")
    topic, group, table = names["KAFKA_TOPIC"], names["CONSUMER_GROUP"], names["DB_TABLE"]
    create_topic(kafka_bootstrap, topic, 4)
    sent = produce(kafka_bootstrap, topic, [doc(i, tag=point[:5]) for i in range(2000)])
    all_keys = {s.doc["numero_dpe"] for s in sent}
    # full batches only while crashing (the topic is pre-filled; a partial batch would need 60 s idle)
    env = consumer_env(kafka_bootstrap, database_url, names, BATCH_IDLE_MS=60000)
    crashed = []
    hidden = 0  # rows of batches committed just before a crash, so never logged
    for n in (2, 3, 5):  # each run dies at a later batch of its own
        p = Proc(env, tmp_path, name=f"crash{n}", crash=(point, n))
        procs.append(p)
        assert p.wait() == -signal.SIGKILL, p.text()[-4000:]
        assert [e["point"] for e in p.events("test_crash")] == [point]
        assert len(p.events("batch")) == n  # it died inside the next batch (or, after_poll, while it was written)
        crashed.append(p)
        in_db = set(table_rows(database_url, table))
        assert in_db == stored_prefix(database_url, group, topic, sent)  # the table is what the offsets say
        assert in_db <= all_keys
        hidden = len(in_db) - sum(int(e["inserted"]) for c in crashed for e in c.events("batch"))
        if point == "after_db_commit":
            assert hidden == 100 * len(crashed)  # each crash hid exactly one committed batch from the logs
        elif point == "after_insert":
            assert hidden == 0  # the transaction never committed
    final = Proc(env | {"BATCH_IDLE_MS": "1000"}, tmp_path, "--exit-when-idle", "5", name="final")
    procs.append(final)
    assert final.wait() == 0, final.text()[-4000:]
    reconcile(database_url, table, sent)
    assert_fully_committed(kafka_bootstrap, group, sent, topic, database_url)
    totals = batch_totals(*crashed, final)
    # nothing written twice: no replay reached the table
    assert totals["updated"] == 0 and totals["unchanged"] == 0
    assert totals["inserted"] + hidden == 2000
    assert not any(c.events("stale_batch") for c in (*crashed, final))


@pytest.mark.slow
def test_postgres_restart_mid_run(kafka_bootstrap, postgres_factory, procs, tmp_path):
    pg = postgres_factory()
    names = new_names("pgr")
    topic = names["KAFKA_TOPIC"]
    create_topic(kafka_bootstrap, topic, 3)
    sent = produce(kafka_bootstrap, topic, [doc(i, tag="P") for i in range(1000)])
    p = Proc(consumer_env(kafka_bootstrap, pg.url, names, RETRY_MAX_BACKOFF_S=1), tmp_path,
             "--exit-when-idle", "6")
    procs.append(p)
    p.wait_for(lambda: table_count(pg.url, names["DB_TABLE"]) == 1000, "the first 1000 rows")
    pg.kill()
    sent += produce(kafka_bootstrap, topic, [doc(i, tag="P") for i in range(1000, 2500)])
    p.wait_for(lambda: len(p.events("db_unavailable")) >= 2, "db_unavailable retries")
    pg.restart()
    assert p.wait() == 0, p.text()[-4000:]
    waits = p.events("db_unavailable")
    assert all(float(w["retry_in"]) <= 1.0 for w in waits)  # capped at RETRY_MAX_BACKOFF_S
    assert all(int(w["batch_rows"]) > 0 for w in waits) and p.events("db_recovered")
    reconcile(pg.url, names["DB_TABLE"], sent)
    assert_fully_committed(kafka_bootstrap, names["CONSUMER_GROUP"], sent, topic, pg.url)
    assert batch_totals(p)["inserted"] == 2500


@pytest.mark.slow
def test_sigterm_while_the_database_is_down_commits_nothing_and_the_batch_is_replayed(
        kafka_bootstrap, postgres_factory, procs, tmp_path):
    pg = postgres_factory()
    names = new_names("pgdown")
    topic, table, group = names["KAFKA_TOPIC"], names["DB_TABLE"], names["CONSUMER_GROUP"]
    create_topic(kafka_bootstrap, topic, 2)
    sent = produce(kafka_bootstrap, topic, [doc(i, tag="D") for i in range(50)])
    env = consumer_env(kafka_bootstrap, pg.url, names, RETRY_MAX_BACKOFF_S=1)
    p = Proc(env, tmp_path, "--shutdown-timeout", "4")
    procs.append(p)
    p.wait_for(lambda: table_count(pg.url, table) == 50, "the first 50 rows")
    p.wait_for(lambda: sum(committed_offsets(kafka_bootstrap, group, topic).values()) == 50, "their commit")
    pg.kill()
    sent += produce(kafka_bootstrap, topic, [doc(i, tag="D") for i in range(50, 80)])
    p.wait_for(lambda: p.events("db_unavailable"), "the outage to be noticed")
    p.p.send_signal(signal.SIGTERM)
    assert p.wait() == 0, p.text()[-4000:]
    assert p.events("abandoned")
    # nothing of the unwritten batch was committed: it is still there for the next consumer
    assert sum(committed_offsets(kafka_bootstrap, group, topic).values()) == 50
    pg.restart()
    p2 = Proc(env, tmp_path, "--exit-when-idle", "4")
    procs.append(p2)
    assert p2.wait() == 0, p2.text()[-4000:]
    assert batch_totals(p2)["inserted"] == 30
    reconcile(pg.url, table, sent)
    assert_fully_committed(kafka_bootstrap, group, sent, topic, pg.url)


@pytest.mark.slow
def test_broker_restart_mid_run(kafka_broker_factory, database_url, procs, tmp_path):
    broker = kafka_broker_factory()
    bootstrap = broker.bootstrap
    names = new_names("brk")
    topic, table, group = names["KAFKA_TOPIC"], names["DB_TABLE"], names["CONSUMER_GROUP"]
    create_topic(bootstrap, topic, 3)
    sent = produce(bootstrap, topic, [doc(i, tag="B") for i in range(20000)])
    p = Proc(consumer_env(bootstrap, database_url, names), tmp_path)
    procs.append(p)
    p.wait_for(lambda: table_count(database_url, table) >= 1000, "the first rows")
    broker.kill()  # mid-run: thousands of rows still to go
    time.sleep(3)  # let the consumer notice (not an assertion)
    broker.restart()
    sent += produce(broker.bootstrap, topic, [doc(i, tag="B") for i in range(20000, 21000)])

    p.wait_for(lambda: stored_and_committed(database_url, table, 21000, bootstrap, group, sent, topic,
                                            not_yet=(Exception,)),  # the broker may still be coming back
               "all 21000 rows written and committed")
    p.p.send_signal(signal.SIGTERM)
    assert p.wait() == 0, p.text()[-4000:]
    reconcile(database_url, table, sent)
    assert_fully_committed(bootstrap, group, sent, topic, database_url)


@pytest.mark.slow
def test_two_consumers_share_the_partitions_and_write_each_row_once(kafka_bootstrap, database_url, procs, tmp_path):
    names = new_names("two")
    topic = names["KAFKA_TOPIC"]
    create_topic(kafka_bootstrap, topic, 6)
    env = consumer_env(kafka_bootstrap, database_url, names)
    a = Proc(env, tmp_path, "--exit-when-idle", "10", name="a")
    b = Proc(env, tmp_path, "--exit-when-idle", "10", name="b")
    procs += [a, b]

    wait_all_assigned(a, b)
    sent = []
    for chunk in range(4):  # keep producing while they consume
        sent += produce(kafka_bootstrap, topic, [doc(i, tag="W") for i in range(chunk * 1000, chunk * 1000 + 1000)])
    assert a.wait() == 0 and b.wait() == 0, a.text()[-3000:] + b.text()[-3000:]
    assert batch_totals(a)["rows"] > 0 and batch_totals(b)["rows"] > 0
    reconcile(database_url, names["DB_TABLE"], sent)
    assert_fully_committed(kafka_bootstrap, names["CONSUMER_GROUP"], sent, topic, database_url)
    assert batch_totals(a, b)["inserted"] == 4000


def events_since_last_assignment(p: "Proc", name: str) -> list[dict]:
    out: list[dict] = []
    for e in map(parse_logfmt, p.text().splitlines()):
        if e.get("event") == "partitions_assigned":
            out = []
        elif e.get("event") == name:
            out.append(e)
    return out


@pytest.mark.slow
def test_a_member_joining_while_a_partial_batch_is_in_memory(kafka_bootstrap, database_url, procs, tmp_path):
    """The first consumer holds an unwritten partial batch of all 6 partitions when a second one joins:
    the rebalance drops it, the first consumer keeps 3 partitions and must read their messages again
    (kafka-python keeps the fetch position of a partition it gets back), the second reads the others."""
    names = new_names("join")
    topic, table, group = names["KAFKA_TOPIC"], names["DB_TABLE"], names["CONSUMER_GROUP"]
    create_topic(kafka_bootstrap, topic, 6)
    sent = produce(kafka_bootstrap, topic, [doc(i, tag="J") for i in range(60)])
    # partial batches are never written by the timer here: only the final SIGTERM writes them
    env = consumer_env(kafka_bootstrap, database_url, names, BATCH_IDLE_MS=600000, LOG_LEVEL="DEBUG")
    a = Proc(env, tmp_path, name="a")
    procs.append(a)
    a.wait_for(lambda: any(int(e["batch"]) == 60 for e in a.events("polled")), "a to hold all 60 messages")
    b = Proc(env, tmp_path, name="b")
    procs.append(b)

    def settled():
        owned = [p.events("partitions_assigned") for p in (a, b)]
        if not all(o and o[-1]["partitions"] not in ("", None) for o in owned):
            return False
        held = [max((int(e["batch"]) for e in events_since_last_assignment(p, "polled")), default=0) for p in (a, b)]
        return sum(held) == 60

    a.wait_for(settled, "both consumers to hold their partitions' messages again")
    assert any(int(e["dropped"]) > 0 for e in a.events("partitions_revoked"))
    assert table_count(database_url, table) == 0
    for p in (a, b):
        p.p.send_signal(signal.SIGTERM)
    assert a.wait() == 0 and b.wait() == 0
    reconcile(database_url, table, sent)
    assert_fully_committed(kafka_bootstrap, group, sent, topic, database_url)
    assert batch_totals(a, b)["inserted"] == 60


@pytest.mark.slow
def test_a_consumer_killed_mid_run_is_replaced_by_the_other_member(kafka_bootstrap, database_url, procs, tmp_path):
    """A member dies without a word (SIGKILL, as an OOM kill would): after its session times out the
    group gives its partitions to the survivor, which starts where the database says: right after the
    dead member's last batch, committed with its offsets just before the kill."""
    names = new_names("surv")
    topic, table, group = names["KAFKA_TOPIC"], names["DB_TABLE"], names["CONSUMER_GROUP"]
    create_topic(kafka_bootstrap, topic, 6)
    env = consumer_env(kafka_bootstrap, database_url, names)
    # the victim dies inside its 3rd batch, right after its DB commit: rows and offsets in the table, the
    # group's Kafka offsets not committed yet
    victim = Proc(env, tmp_path, name="victim", crash=("after_db_commit", 2))
    survivor = Proc(env, tmp_path, name="survivor")
    procs += [victim, survivor]

    wait_all_assigned(victim, survivor)
    sent = produce(kafka_bootstrap, topic, [doc(i, tag="V") for i in range(6000)])
    assert victim.wait() == -signal.SIGKILL

    survivor.wait_for(lambda: stored_and_committed(database_url, table, 6000, kafka_bootstrap, group, sent, topic),
                      "every row written and committed")
    assert len(survivor.events("partitions_assigned")) >= 2  # it took the dead member's partitions over
    survivor.p.send_signal(signal.SIGTERM)
    assert survivor.wait() == 0
    reconcile(database_url, table, sent)
    # the victim's last batch was committed with its offsets: the survivor started after it, wrote nothing twice
    both = batch_totals(victim, survivor)
    assert both["unchanged"] == 0 and both["updated"] == 0
    assert 0 < 6000 - both["inserted"] <= 100  # the rows of the victim's last batch, never logged


@pytest.mark.slow
def test_rebalance_while_the_database_is_down(kafka_bootstrap, postgres_factory, procs, tmp_path):
    """A member leaves while the other is retrying a batch against a dead database: the rebalance drops
    the pending rows of the revoked partitions (the new owner -- here the same consumer -- replays them)
    and, once the database is back, every row is in the table exactly once."""
    pg = postgres_factory()
    names = new_names("rbdb")
    topic, table, group = names["KAFKA_TOPIC"], names["DB_TABLE"], names["CONSUMER_GROUP"]
    create_topic(kafka_bootstrap, topic, 6)
    env = consumer_env(kafka_bootstrap, pg.url, names, RETRY_MAX_BACKOFF_S=1)
    a = Proc(env, tmp_path, name="a")
    b = Proc(env, tmp_path, "--shutdown-timeout", "3", name="b")
    procs += [a, b]

    wait_all_assigned(a, b)
    sent = produce(kafka_bootstrap, topic, [doc(i, tag="R") for i in range(1200)])
    a.wait_for(lambda: table_count(pg.url, table) == 1200, "the first 1200 rows")
    pg.kill()
    sent += produce(kafka_bootstrap, topic, [doc(i, tag="R") for i in range(1200, 2400)])
    a.wait_for(lambda: a.events("db_unavailable") and b.events("db_unavailable"), "both to retry the database")
    b.p.send_signal(signal.SIGTERM)  # b gives its batch up after 3 s and leaves the group
    assert b.wait() == 0 and b.events("abandoned")
    a.wait_for(lambda: any(int(e["dropped"]) > 0 for e in a.events("partitions_revoked")),
               "a's pending rows to be dropped by the rebalance")
    a.wait_for(lambda: len(a.events("partitions_assigned")) >= 2 and a.events("partitions_assigned")[-1][
        "partitions"].count(",") == 5, "a to own all 6 partitions")
    pg.restart()

    a.wait_for(lambda: stored_and_committed(pg.url, table, 2400, kafka_bootstrap, group, sent, topic),
               "every row written and committed")
    a.p.send_signal(signal.SIGTERM)
    assert a.wait() == 0
    reconcile(pg.url, table, sent)


@pytest.mark.slow
def test_database_down_at_start_is_waited_for(kafka_bootstrap, postgres_factory, procs, tmp_path):
    pg = postgres_factory()
    url = pg.url
    pg.stop()
    names = new_names("late")
    create_topic(kafka_bootstrap, names["KAFKA_TOPIC"], 2)
    sent = produce(kafka_bootstrap, names["KAFKA_TOPIC"], [doc(i, tag="L") for i in range(150)])
    env = consumer_env(kafka_bootstrap, url, names, RETRY_MAX_BACKOFF_S=1)
    # a signal while waiting for the database: nothing in flight, so it exits at once (not after the
    # 600 s grace period)
    early = Proc(env, tmp_path, "--shutdown-timeout", "600", name="early")
    procs.append(early)
    early.wait_for(lambda: early.events("db_unavailable"), "the consumer to wait for the database")
    early.p.send_signal(signal.SIGTERM)
    assert early.wait(timeout=120) == 0
    assert early.events("stop") and not early.events("abandoned")
    p = Proc(env, tmp_path, "--exit-when-idle", "4")
    procs.append(p)
    p.wait_for(lambda: len(p.events("db_unavailable")) >= 2, "the consumer to wait for the database")
    assert {e["what"] for e in p.events("db_unavailable")} == {"migration"}
    pg.start()
    assert p.wait() == 0, p.text()[-4000:]
    reconcile(url, names["DB_TABLE"], sent)
    assert_fully_committed(kafka_bootstrap, names["CONSUMER_GROUP"], sent, names["KAFKA_TOPIC"], url)


POISON_REASONS = ["not JSON", "not valid UTF-8", "missing numero_dpe", "empty numero_dpe", "is not a date",
                  "not an object", "NUL character"]


def produce_with_poison(bootstrap: str, topic: str) -> tuple[list[Sent], list[Sent], list[Sent]]:
    """300 good rows over 2 partitions and 7 poison messages between the good rows of partition 0;
    returns (every message, the good ones, the poison ones) in the order sent."""
    create_topic(bootstrap, topic, 2)
    poison = [b"this is not json", b"\xff\xfe\x00binary", json.dumps({"date_reception_dpe": "2023-01-01"}).encode(),
              json.dumps({"numero_dpe": "", "departement": "69"}).encode(),
              json.dumps(doc(9001, tag="Z", date_reception_dpe="31/12/2023")).encode(),
              json.dumps(["an", "array"]).encode(), json.dumps(doc(9002, tag="Z", etiquette_dpe="nul\u0000")).encode()]
    items = []
    for i in range(300):
        items.append(doc(i, tag="G"))
        if i % 40 == 5 and poison:
            items.append(poison.pop(0))
    assert not poison
    # every poison message goes to partition 0, between good rows of that partition
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    sent = []
    for item in items:
        raw = json.dumps(item).encode() if isinstance(item, dict) else item
        part = 0 if not isinstance(item, dict) else int(item["numero_dpe"][1:8]) % 2
        md = producer.send(topic, value=raw, key=b"k" if not isinstance(item, dict) else item["numero_dpe"].encode(),
                           partition=part).get(60)
        sent.append(Sent(None, raw, md.partition, md.offset))
    producer.close()
    good = [s for s, item in zip(sent, items) if isinstance(item, dict)]
    bad = [s for s, item in zip(sent, items) if not isinstance(item, dict)]
    return sent, good, bad


def test_poison_messages_go_to_the_dlq_and_do_not_block_their_partition(kafka_bootstrap, database_url, procs,
                                                                       tmp_path):
    names = new_names("poison")
    topic = names["KAFKA_TOPIC"]
    sent, good, bad = produce_with_poison(kafka_bootstrap, topic)
    p = Proc(consumer_env(kafka_bootstrap, database_url, names), tmp_path, "--exit-when-idle", "5")
    procs.append(p)
    assert p.wait() == 0, p.text()[-4000:]
    reconcile(database_url, names["DB_TABLE"], good)
    assert_fully_committed(kafka_bootstrap, names["CONSUMER_GROUP"], sent, topic, database_url)
    letters = read_topic(kafka_bootstrap, names["KAFKA_DLQ_TOPIC"], timeout_s=SLOW)
    docs = sorted((messages.parse_dead_letter(r.value) for r in letters), key=lambda d: d["source"]["offset"])
    assert [(d["source"]["topic"], d["source"]["partition"], d["source"]["offset"]) for d in docs] == \
        [(topic, s.partition, s.offset) for s in bad]
    assert [d["id"] for d in docs] == [messages.consumer_id(topic, s.partition, s.offset) for s in bad]
    for d, s, reason in zip(docs, bad, POISON_REASONS):
        assert reason in d["reason"] and d["stage"] == "consumer"
        if d["payload_b64"] is not None:
            import base64

            assert base64.b64decode(d["payload_b64"]) == s.value
        else:
            assert d["payload"] == json.loads(s.value)
    assert all(dict(r.headers)["dlq.stage"] == b"consumer" for r in letters)
    assert batch_totals(p)["dead_letters"] == 7


@pytest.mark.slow
def test_dead_letters_resent_by_a_replay_keep_their_id_and_are_counted_once(kafka_bootstrap, database_url, procs,
                                                                           tmp_path):
    names = new_names("dlqre")
    topic = names["KAFKA_TOPIC"]
    sent, good, bad = produce_with_poison(kafka_bootstrap, topic)
    env = consumer_env(kafka_bootstrap, database_url, names, BATCH_IDLE_MS=60000)
    # dies once the first batch's dead letters are acknowledged, before its offsets are committed
    crashed = Proc(env, tmp_path, name="crash", crash=("after_dlq_send", 0))
    procs.append(crashed)
    assert crashed.wait() == -signal.SIGKILL, crashed.text()[-4000:]
    assert [e["point"] for e in crashed.events("test_crash")] == ["after_dlq_send"]
    first = read_topic(kafka_bootstrap, names["KAFKA_DLQ_TOPIC"], timeout_s=SLOW)
    assert first, "the crashed run had sent dead letters"
    final = Proc(env | {"BATCH_IDLE_MS": "1000"}, tmp_path, "--exit-when-idle", "5", name="final")
    procs.append(final)
    assert final.wait() == 0, final.text()[-4000:]
    reconcile(database_url, names["DB_TABLE"], good)
    assert_fully_committed(kafka_bootstrap, names["CONSUMER_GROUP"], sent, topic, database_url)

    letters = read_topic(kafka_bootstrap, names["KAFKA_DLQ_TOPIC"], timeout_s=SLOW)
    ids = [messages.parse_dead_letter(r.value)["id"] for r in letters]
    assert len(letters) == len(bad) + len(first), "the replay sent the crashed batch's letters again"
    assert sorted(set(ids)) == sorted(messages.consumer_id(topic, s.partition, s.offset) for s in bad)
    # what `dpe-ingest status` and `scripts/run` count: each refused message once
    collector = Collector(settings=None)
    for r in letters:
        collector._on_dead_letter(r)
    want: dict[str, dict[str, int]] = {}
    for s in bad:
        try:
            dep = json.loads(s.value).get("departement") or "?"
        except (ValueError, AttributeError):
            dep = "?"
        want.setdefault(dep, {"consumer": 0})["consumer"] += 1
    assert collector.dead == want and sum(v["consumer"] for v in want.values()) == len(bad)


def test_sigterm_writes_the_partial_batch_commits_and_exits_0(kafka_bootstrap, database_url, procs, tmp_path):
    names = new_names("term")
    topic = names["KAFKA_TOPIC"]
    create_topic(kafka_bootstrap, topic, 3)
    sent = produce(kafka_bootstrap, topic, [doc(i, tag="S") for i in range(37)])
    # a partial batch would wait 10 minutes: only the signal can write it
    p = Proc(consumer_env(kafka_bootstrap, database_url, names, BATCH_IDLE_MS=600000, LOG_LEVEL="DEBUG"), tmp_path)
    procs.append(p)
    p.wait_for(lambda: any(int(e["batch"]) == 37 for e in p.events("polled")), "the 37 messages in memory")
    assert p.events("batch") == [] and table_count(database_url, names["DB_TABLE"]) == 0
    p.p.send_signal(signal.SIGTERM)
    assert p.wait() == 0, p.text()[-4000:]
    assert [int(b["rows"]) for b in p.events("batch")] == [37]
    assert p.events("stop")[0]["reason"] == "signal"
    reconcile(database_url, names["DB_TABLE"], sent)
    assert_fully_committed(kafka_bootstrap, names["CONSUMER_GROUP"], sent, topic, database_url)


def test_a_partial_batch_is_written_after_batch_idle_ms(kafka_bootstrap, database_url, procs, tmp_path):
    names = new_names("idle")
    topic = names["KAFKA_TOPIC"]
    create_topic(kafka_bootstrap, topic, 3)
    p = Proc(consumer_env(kafka_bootstrap, database_url, names, BATCH_IDLE_MS=1500), tmp_path)
    procs.append(p)
    p.wait_for(lambda: p.events("partitions_assigned"), "the group assignment")
    sent = produce(kafka_bootstrap, topic, [doc(i, tag="I") for i in range(23)])
    p.wait_for(lambda: sum(int(b["rows"]) for b in p.events("batch")) == 23, "the partial batch")
    assert all(int(b["rows"]) < 100 for b in p.events("batch"))  # written partial, by the idle timer
    reconcile(database_url, names["DB_TABLE"], sent)
    assert_fully_committed(kafka_bootstrap, names["CONSUMER_GROUP"], sent, topic, database_url)
    assert p.p.poll() is None  # still running: it was the idle timer, not an exit
    p.p.send_signal(signal.SIGTERM)
    assert p.wait() == 0


# ---------------------------------------------------------------------------------------------
# where a partition starts: the database's offsets, an earlier version's group offsets, the beginning
# ---------------------------------------------------------------------------------------------
def commit_group_offsets(bootstrap: str, group: str, topic: str, offsets: dict[int, int], metadata: str) -> None:
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        c.commit({TopicPartition(topic, p): OffsetAndMetadata(o, metadata, -1) for p, o in offsets.items()})
    finally:
        c.close()


@pytest.mark.parametrize("metadata, expect_from", [("", 40), ("dpe-ingest: mirror of dpe_ingest_offsets", 0)])
def test_a_partition_unknown_to_the_database_starts_at_an_earlier_versions_offset_else_at_the_beginning(
        metadata, expect_from, kafka_bootstrap, database_url, procs, tmp_path):
    """An earlier version kept its positions in Kafka (its offsets carry no metadata): an upgrade goes on
    from there.  Offsets that only mirror the database's, with the database's gone (dropped, or lost with
    its rows), are not trusted: the partition is read from its beginning, nothing skipped."""
    from dpe_ingest.group_consumer import KAFKA_MIRROR_METADATA

    assert not metadata or metadata == KAFKA_MIRROR_METADATA
    names = new_names("start")
    topic, group = names["KAFKA_TOPIC"], names["CONSUMER_GROUP"]
    create_topic(kafka_bootstrap, topic, 2)
    sent = produce(kafka_bootstrap, topic, [doc(i, tag="S") for i in range(200)])
    commit_group_offsets(kafka_bootstrap, group, topic, {0: 40, 1: 40}, metadata)
    p = Proc(consumer_env(kafka_bootstrap, database_url, names), tmp_path, "--exit-when-idle", "4")
    procs.append(p)
    assert p.wait() == 0, p.text()[-4000:]
    reconcile(database_url, names["DB_TABLE"], [s for s in sent if s.offset >= expect_from])
    assert_fully_committed(kafka_bootstrap, group, sent, topic, database_url)
    assert "not in the database yet: 0,1" in p.events("positioned")[0]["msg"]


def test_at_info_the_log_does_not_grow_with_the_number_of_batches(kafka_bootstrap, database_url, procs, tmp_path):
    """One line per event worth reading (start, assignment, progress every 10 s, stop), none per batch:
    a million rows log a few hundred lines at most."""
    names = new_names("quiet")
    create_topic(kafka_bootstrap, names["KAFKA_TOPIC"], 3)
    sent = produce(kafka_bootstrap, names["KAFKA_TOPIC"], [doc(i, tag="Q") for i in range(6000)])
    env = consumer_env(kafka_bootstrap, database_url, names, LOG_LEVEL="INFO")
    p = Proc(env, tmp_path, "--exit-when-idle", "3")
    procs.append(p)
    assert p.wait() == 0, p.text()[-4000:]
    reconcile(database_url, names["DB_TABLE"], sent)
    lines = p.text().splitlines()
    events = [parse_logfmt(line).get("event") for line in lines]
    assert not {"batch", "polled"} & set(events)
    # kafka_client: kafka-python's own warnings (the group coordinator not ready at the start), one per kind
    assert set(events) <= {"start", "migrated", "topics_created", "partitions_assigned", "positioned", "progress",
                           "idle", "partitions_revoked", "stop", "kafka_client"}, events
    assert events.count("kafka_client") <= 3, lines
    assert len(lines) <= 12 + events.count("progress"), lines  # 60 batches, a handful of lines
    last = p.events("progress")[-1]
    assert int(last["rows"]) == 6000 and last["rate"].endswith("rows/s") and int(last["batches"]) >= 60
