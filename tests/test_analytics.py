"""``dpe-ingest analytics``: the second consumer group, exact counts whatever crashes when.

Every integration test compares the analytics tables with ``GROUP BY departement, etiquette_dpe`` on
the table the sink (``dpe-ingest consume``) wrote from the same topic, on the testbed's real Kafka
and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import signal
import uuid

import psycopg2
import pytest
from kafka import KafkaProducer

from dpe_ingest import analytics
from dpe_ingest.analytics import Alerts, classify
from dpe_ingest.analytics_report import Report
from dpe_ingest.standin import Dataset, Faults
import crashing
import reconcile as rec
from kafka_util import command, run, start

SLOW = 300


# ---------------------------------------------------------------------------------------------
# pure parts
# ---------------------------------------------------------------------------------------------
def _msg(**over) -> bytes:
    d = {"numero_dpe": "K1", "date_reception_dpe": "2024-03-05", "etiquette_dpe": "F", "departement": "69"}
    d.update(over)
    return json.dumps(d).encode()


def test_classify_skips_bad_messages_with_a_reason_and_counts_unknown_labels():
    assert classify(b"\xff not json") == "not_json"
    assert classify(b"[1, 2]") == "not_json"
    assert classify(None) == "not_json"
    assert classify(b'{"foo": 1}') == "no_numero_dpe"
    assert classify(b'{"numero_dpe": "  "}') == "no_numero_dpe"
    assert classify(_msg(date_reception_dpe="not a date")) == "invalid"  # the sink dead-letters it too
    f = classify(_msg())
    assert (f.key, f.department, f.label, f.month, f.date) == ("K1", "69", "F", "2024-03", dt.date(2024, 3, 5))
    assert classify(_msg(etiquette_dpe="Z")).label == "unknown"
    assert classify(_msg(etiquette_dpe=None)).label == "unknown"
    assert classify(_msg(etiquette_dpe="f")).label == "unknown"  # stored as 'f' by the sink: not a label
    assert classify(_msg(departement=None)).department == "none"
    assert classify(_msg(date_reception_dpe=None)).month == "unknown"
    gone = classify(json.dumps({"numero_dpe": "K1", "departement": "69", "_deleted": True}).encode())
    assert gone.deleted and gone.key == "K1"


def test_report_months_bars_and_json():
    rep = Report(labels={"69": {"A": 1, "F": 2, "G": 1}, "01": {"C": 4}},
                 months={"69": {"2023-01": 1, "2024-02": 3}, "01": {"unknown": 4}},
                 latest={"69": "2024-02-10", "01": None}, skipped={"not_json": 2})
    months = rep.last_months("69")
    assert len(months) == 12 and months[-1] == ("2024-02", 3) and months[0] == ("2023-03", 0)
    assert rep.fg_share("69") == 0.75
    doc = rep.to_json()
    assert list(doc["departments"]) == ["01", "69"]
    assert doc["departments"]["69"]["labels"] == {"A": 1, "B": 0, "C": 0, "D": 0, "E": 0, "F": 2, "G": 1,
                                                   "unknown": 0}
    assert doc["departments"]["69"]["fg"] == 3 and doc["skipped"] == {"not_json": 2}
    text = rep.render()
    assert "department 69: 4 certificates, F+G 75.0% (3), latest reception 2024-02-10" in text
    assert "  F       2   50.0%  " + "#" * 25 + "\n" in text
    assert "    2024-02  3  " + "#" * 40 in text
    assert "no reception date: 4" in text and "skipped messages: not_json 2" in text


def test_alerts_are_one_summary_per_department_and_interval(caplog):
    import logging

    alerts = Alerts(share=0.3, interval_s=60)
    counts = {"69": {"A": 6, "F": 2, "G": 2}, "01": {"A": 9, "G": 1}}
    with caplog.at_level(logging.INFO, logger="dpe_ingest.analytics"):
        assert not alerts.due(now=1000.0)
        alerts.add({"69": 3, "01": 1})
        assert alerts.due(now=1000.0)  # the loop then reads fresh counts: a summary's figures are of one moment
        assert alerts.emit(counts, now=1000.0) == 2
        alerts.add({"69": 5})
        assert not alerts.due(now=1030.0)
        assert alerts.emit(counts, now=1030.0) == 0  # within the interval: held back, not lost
        assert alerts.due(now=1061.0)
        alerts.add({"69": 1})
        assert alerts.emit(counts, now=1061.0) == 1
    lines = [r for r in caplog.records if getattr(r, "event", None) == "fg_alert"]
    assert [(r.fields["department"], r.fields["new_fg"], r.levelno) for r in lines] == [
        ("01", 1, logging.INFO), ("69", 3, logging.WARNING), ("69", 6, logging.WARNING)]
    assert lines[1].fields["fg_share"] == 0.4 and lines[1].fields["above"] is True


# ---------------------------------------------------------------------------------------------
# on the testbed
# ---------------------------------------------------------------------------------------------
def names() -> dict:
    tag = uuid.uuid4().hex[:10]
    return {"KAFKA_TOPIC": f"an-{tag}", "KAFKA_DLQ_TOPIC": f"an-{tag}-dlq", "CONSUMER_GROUP": f"an-{tag}-sink",
            "ANALYTICS_GROUP": f"an-{tag}-analytics", "DB_TABLE": f"dpe_an_{tag}",
            "ANALYTICS_TABLE_PREFIX": f"dpe_an_{tag}_a", "PRODUCER_CHECKPOINT_TOPIC": f"an-{tag}-ckpt",
            "KAFKA_TOPIC_PARTITIONS": "3"}


def env_of(kafka_bootstrap: str, database_url: str, n: dict, **extra) -> dict:
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "DATABASE_URL": database_url, "BATCH_SIZE": "100",
           "BATCH_IDLE_MS": "300", "RETRY_MAX_BACKOFF_S": "2", "LOG_FORMAT": "logfmt", **n}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def send(bootstrap: str, topic: str, items) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for item in items:
            if isinstance(item, dict):
                key = item.get("numero_dpe") if isinstance(item.get("numero_dpe"), str) else None
                producer.send(topic, key=key.encode() if key else None, value=json.dumps(item).encode())
            else:
                producer.send(topic, key=None, value=item)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)


def run_ok(args: list[str], env: dict, timeout: float = SLOW):
    res = run(command(*args), env, timeout=timeout)
    assert res.returncode == 0, f"dpe-ingest {' '.join(args)} exited {res.returncode}:\n{res.stderr[-5000:]}"
    return res


def sink_and_analytics(env: dict, tmp_path, idle: float = 3.0) -> None:
    """The sink and the analytics consumer side by side until both drained the topic."""
    sink = start(command("consume", "--exit-when-idle", str(idle)), env, tmp_path / f"sink-{uuid.uuid4().hex[:6]}.log")
    try:
        run_ok(["analytics", "--exit-when-idle", str(idle)], env)
        assert sink.wait(SLOW) == 0
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait(30)


def group_by(database_url: str, table: str) -> dict[str, dict[str, int]]:
    """GROUP BY departement, etiquette_dpe of the sink's table, in the analytics' vocabulary."""
    out: dict[str, dict[str, int]] = {}
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT departement, etiquette_dpe, count(*) FROM "{table}" GROUP BY 1, 2')
        for dep, label, n in cur.fetchall():
            dep = "none" if dep is None else dep
            label = label if label in tuple("ABCDEFG") else "unknown"
            out.setdefault(dep, {})[label] = out.get(dep, {}).get(label, 0) + int(n)
    return out


def months_by(database_url: str, table: str) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT coalesce(departement, 'none'), coalesce(to_char(date_reception_dpe, 'YYYY-MM'), "
                    f"'unknown'), count(*) FROM \"{table}\" GROUP BY 1, 2")
        for dep, month, n in cur.fetchall():
            out.setdefault(dep, {})[month] = int(n)
    return out


def analytics_report(env: dict) -> dict:
    res = run_ok(["analytics", "--json"], env, timeout=60)
    return json.loads(res.stdout)


def assert_exact(env: dict, database_url: str) -> dict:
    doc = analytics_report(env)
    got = {d: {k: n for k, n in v["labels"].items() if n} for d, v in doc["departments"].items()}
    assert got == group_by(database_url, env["DB_TABLE"]), "analytics counts == GROUP BY on dpe_data"
    assert {d: v["months"] for d, v in doc["departments"].items()} == months_by(database_url, env["DB_TABLE"])
    return doc


@pytest.mark.kafka
@pytest.mark.postgres
def test_clean_run_of_three_departments_with_bad_messages(kafka_bootstrap, database_url, standin_factory, tmp_path):
    n = names()
    env = env_of(kafka_bootstrap, database_url, n)
    ds = Dataset({"69": 1500, "01": 1200, "38": 900}, seed=5)
    srv = standin_factory(ds)
    for dep in ("69", "01", "38"):
        run_ok(["produce"], {**env, "ADEME_API_URL": srv.url, "DEPARTMENT": dep, "ADEME_PAGE_SIZE": "500"})
    odd = [{"numero_dpe": "ODD-LABEL-1", "date_reception_dpe": "2024-01-02", "etiquette_dpe": "Z", "departement": "69"},
           {"numero_dpe": "NO-LABEL-1", "date_reception_dpe": "2024-01-03", "etiquette_dpe": None, "departement": "01"}]
    send(kafka_bootstrap, n["KAFKA_TOPIC"], [
        b"\x00\xffnot json", b"{not json either", b'{"foo": "no numero_dpe"}',
        {"numero_dpe": "BAD-DATE-1", "date_reception_dpe": "31/12/2024", "etiquette_dpe": "A", "departement": "69"},
        *odd])
    sink_and_analytics(env, tmp_path)
    doc = assert_exact(env, database_url)
    # both tables against the dataset's rows: the sink's row by row, the analytics' counts
    want = {**rec.expected_rows(ds, ["69", "01", "38"]), **{d["numero_dpe"]: rec.stored_row(d) for d in odd}}
    rec.assert_rows(want, rec.read_table(database_url, n["DB_TABLE"]))
    rec.assert_counts(rec.expected_counts(want), rec.read_counts(database_url, n["ANALYTICS_TABLE_PREFIX"]))
    assert set(doc["departments"]) == {"69", "01", "38"}
    assert sum(v["rows"] for v in doc["departments"].values()) == 1500 + 1200 + 900 + 2
    assert doc["departments"]["69"]["labels"]["unknown"] >= 1 and doc["departments"]["01"]["labels"]["unknown"] >= 1
    assert doc["skipped"] == {"not_json": 2, "no_numero_dpe": 1, "invalid": 1}
    for d, v in doc["departments"].items():
        fg = v["labels"]["F"] + v["labels"]["G"]
        assert v["fg"] == fg and abs(v["fg_share"] - fg / v["rows"]) < 1e-6
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(f'SELECT max(date_reception_dpe) FROM "{n["DB_TABLE"]}" WHERE departement = %s', (d,))
            assert v["latest_reception"] == cur.fetchone()[0].isoformat()
    # dpe-ingest status: the analytics group's lag next to the sink's
    res = run(command("status", "--json", "--no-kube"), env, timeout=120)
    st = json.loads(res.stdout)
    assert st["analytics_lag"]["group"] == n["ANALYTICS_GROUP"] and st["analytics_lag"]["total"] == 0
    assert st["consumer_lag"]["group"] == n["CONSUMER_GROUP"] and st["consumer_lag"]["total"] == 0
    text = run(command("status", "--no-kube"), env, timeout=120).stdout
    assert f"analytics lag: 0 messages (group {n['ANALYTICS_GROUP']})" in text
    text = run_ok(["analytics", "--report"], env, timeout=60).stdout
    assert "department 69: 1501 certificates" in text and "rows per month (last 12 months):" in text
    assert "skipped messages: invalid 1, no_numero_dpe 1, not_json 2" in text


@pytest.mark.kafka
@pytest.mark.postgres
def test_five_sigkills_a_resumed_producer_and_a_refresh_keep_the_counts_exact(
        kafka_bootstrap, database_url, standin_factory, tmp_path):
    n = names()
    env = env_of(kafka_bootstrap, database_url, n, BATCH_SIZE="20")
    ds = Dataset({"38": 4000, "69": 3000}, seed=9)
    srv = standin_factory(ds, Faults(p_slow=1.0, slow_s=0.1))
    penv = {**env, "ADEME_API_URL": srv.url, "ADEME_PAGE_SIZE": "500"}
    # a producer killed mid-department and resumed: the last page before the kill is sent twice
    log1 = tmp_path / "producer-38.log"
    proc = start(command("produce"), {**penv, "DEPARTMENT": "38"}, log1)
    try:
        import time

        deadline = time.monotonic() + SLOW
        while "page=3 " not in log1.read_text(errors="replace"):
            assert proc.poll() is None and time.monotonic() < deadline, log1.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    srv.faults = Faults()
    run_ok(["produce"], {**penv, "DEPARTMENT": "38"})
    run_ok(["produce"], {**penv, "DEPARTMENT": "69"})
    # and a department fetched again from the start (PRODUCER_RESTART): every one of its rows twice
    run_ok(["produce"], {**penv, "DEPARTMENT": "69", "PRODUCER_RESTART": "true"})
    from kafka_util import duplicates, read_topic

    records = read_topic(kafka_bootstrap, n["KAFKA_TOPIC"])
    assert duplicates(records) >= 3000, "the topic holds duplicates"
    # a refresh: new versions of existing certificates, with other labels (and a few moved months)
    rng = random.Random(12)
    latest = {}
    for r in records:
        latest[r.json()["numero_dpe"]] = r.json()
    changed = []
    for key in rng.sample(sorted(latest), 800):
        d = dict(latest[key])
        d["etiquette_dpe"] = rng.choice("ABCDEFG" if d["etiquette_dpe"] in ("F", "G") else "FG")
        if rng.random() < 0.2:
            d["date_reception_dpe"] = "2019-06-15"
        changed.append(d)
    again = [latest[k] for k in rng.sample(sorted(latest), 300)]  # older versions again: they win over a change
    send(kafka_bootstrap, n["KAFKA_TOPIC"], changed[:400])
    send(kafka_bootstrap, n["KAFKA_TOPIC"], again)
    send(kafka_bootstrap, n["KAFKA_TOPIC"], changed[400:] + [b"garbage"])
    total = len(read_topic(kafka_bootstrap, n["KAFKA_TOPIC"]))
    # five SIGKILLs of the analytics consumer, at seeded random points: inside the transaction before
    # COMMIT, or after COMMIT before the Kafka offsets, after a random number of batches
    kills = [(rng.choice(analytics.CRASH_POINTS), rng.randint(0, 12)) for _ in range(5)]
    for point, after in kills:
        res = run(crashing.command("analytics", point, after, "--exit-when-idle", "30"), env, timeout=SLOW)
        assert res.returncode == -signal.SIGKILL, f"{point}/{after} did not crash:\n{res.stderr[-3000:]}"
        assert "event=test_crash" in res.stderr
    applied = sum(analytics_report(env)["offsets"].values())
    assert 0 < applied < total, "the kills landed before the end of the topic"
    sink_and_analytics(env, tmp_path)
    doc = assert_exact(env, database_url)
    assert sum(doc["offsets"].values()) == total
    assert doc["skipped"] == {"not_json": 1}
    # the refresh moved certificates between labels: the latest message of each key won
    final = dict(latest)
    for d in changed[:400] + again + changed[400:]:
        final[d["numero_dpe"]] = d
    fg = sum(1 for d in final.values() if d["etiquette_dpe"] in ("F", "G"))
    assert sum(v["fg"] for v in doc["departments"].values()) == fg
    # the analytics tables against the counts of the rows sent last, not only against the sink's table
    want = {k: rec.stored_row(d) for k, d in final.items()}
    assert len(want) == 7000  # every row of the dataset's two departments
    rec.assert_counts(rec.expected_counts(want), rec.read_counts(database_url, n["ANALYTICS_TABLE_PREFIX"]))
    rec.assert_rows(want, rec.read_table(database_url, n["DB_TABLE"]))


@pytest.mark.kafka
@pytest.mark.postgres
def test_two_analytics_members_and_a_sigkilled_one_count_each_certificate_once(kafka_bootstrap, database_url,
                                                                               tmp_path):
    import time

    n = names()
    env = env_of(kafka_bootstrap, database_url, n, BATCH_SIZE="10")
    docs = [{"numero_dpe": f"M{i:06d}", "date_reception_dpe": f"2023-{1 + i % 12:02d}-01",
             "etiquette_dpe": "ABCDEFGX"[i % 8], "departement": ["69", "01", None][i % 3]} for i in range(6000)]
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([NewTopic(n["KAFKA_TOPIC"], 3, 1)])
    finally:
        admin.close()
    send(kafka_bootstrap, n["KAFKA_TOPIC"], docs[:3000])
    logs = {m: tmp_path / f"{m}.log" for m in "ab"}
    procs = {m: start(command("analytics"), env, logs[m]) for m in "ab"}

    def assigned(m: str) -> list[str]:
        return [ln.split("partitions=")[1].split()[0] for ln in logs[m].read_text(errors="replace").splitlines()
                if "event=partitions_assigned" in ln and "partitions=" in ln]

    def wait(pred, what):
        deadline = time.monotonic() + SLOW
        while not pred():
            assert time.monotonic() < deadline, f"{what}:\n" + "\n".join(p.read_text()[-3000:] for p in logs.values())
            time.sleep(0.2)

    try:
        wait(lambda: assigned("a") and assigned("b"), "both members own partitions")
        send(kafka_bootstrap, n["KAFKA_TOPIC"], docs[3000:] + docs[:500])
        procs["a"].send_signal(signal.SIGKILL)  # mid-stream: its partitions go to b after the session timeout
        procs["a"].wait(30)
        wait(lambda: assigned("b") and assigned("b")[-1].count(":") == 3, "b owns every partition")
        wait(lambda: sum(analytics_report(env)["offsets"].values()) == 6500, "b applied the whole topic")
        procs["b"].terminate()
        assert procs["b"].wait(60) == 0
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(30)
    run_ok(["consume", "--exit-when-idle", "3"], env)
    doc = assert_exact(env, database_url)
    assert sum(v["rows"] for v in doc["departments"].values()) == 6000
    want = {d["numero_dpe"]: rec.stored_row(d) for d in docs}
    rec.assert_counts(rec.expected_counts(want), rec.read_counts(database_url, n["ANALYTICS_TABLE_PREFIX"]))
    assert doc["departments"]["none"]["labels"]["unknown"] == sum(
        1 for i in range(6000) if i % 3 == 2 and i % 8 == 7)


@pytest.mark.kafka
@pytest.mark.postgres
def test_a_database_outage_during_a_batch_write_loses_no_message(kafka_bootstrap, postgres_factory, tmp_path):
    """PostgreSQL killed while the analytics consumer writes a batch, then back: every message is
    counted, against counts taken from the messages sent (the test cluster's PostgreSQL pod deletion
    left the partitions paused by the wait, so the rest of the topic was never applied)."""
    import time

    pg = postgres_factory()
    n = names()
    env = env_of(kafka_bootstrap, pg.url, n, BATCH_SIZE="50", RETRY_MAX_BACKOFF_S="1")
    docs = [{"numero_dpe": f"O{i:06d}", "date_reception_dpe": f"2024-{1 + i % 12:02d}-03",
             "etiquette_dpe": "ABCDEFG"[i % 7], "departement": ["69", "2A"][i % 2]} for i in range(2500)]
    send(kafka_bootstrap, n["KAFKA_TOPIC"], docs[:1000])
    log_path = tmp_path / "analytics.log"
    proc = start(command("analytics", "--exit-when-idle", "6"), env, log_path)

    def counted() -> int:
        try:
            return sum(sum(v.values()) for v in rec.read_counts(pg.url, n["ANALYTICS_TABLE_PREFIX"])["labels"].values())
        except psycopg2.Error:
            return -1

    def wait(pred, what):
        deadline = time.monotonic() + SLOW
        while not pred():
            assert proc.poll() is None and time.monotonic() < deadline, f"{what}:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.3)

    try:
        wait(lambda: counted() == 1000, "the first 1000 messages counted")
        pg.kill()
        send(kafka_bootstrap, n["KAFKA_TOPIC"], docs[1000:])
        wait(lambda: log_path.read_text().count('event=db_unavailable what="batch write"') >= 2,
             "batch writes refused while the database is down")
        pg.restart()
        wait(lambda: counted() == 2500, "every message counted once the database is back")
        assert proc.wait(SLOW) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    want = rec.expected_counts({d["numero_dpe"]: rec.stored_row(d) for d in docs})
    rec.assert_counts(want, rec.read_counts(pg.url, n["ANALYTICS_TABLE_PREFIX"]))
