"""The table stays in sync with the live dataset (issue #16): rows are updated, inserted and
deactivated while producers page; a pass plus one ``produce --refresh`` leaves dpe_data equal to the
API's current rows.  Real processes: producers, the consumer, Kafka, PostgreSQL, the stand-in."""

from __future__ import annotations

import signal
import time

import psycopg2
import pytest

from dpe_ingest.standin import Dataset, LiveChanges

from kafka_util import command, events, run, start
from test_producer import env_for

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

FIELDS = "date_derniere_modification_dpe,conso_5_usages_par_m2_ep"


@pytest.fixture
def names(unique_name):
    base = unique_name("refresh")
    return {"KAFKA_TOPIC": base, "KAFKA_DLQ_TOPIC": base + "-dlq", "PRODUCER_CHECKPOINT_TOPIC": base + "-ckpt",
            "KAFKA_TOPIC_PARTITIONS": "3", "DB_TABLE": base, "CONSUMER_GROUP": base + "-sink"}


@pytest.fixture
def consumer(kafka_bootstrap, database_url, names, tmp_path):
    """A running `dpe-ingest consume` on the test's topic and table."""
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "DATABASE_URL": database_url, "BATCH_IDLE_MS": "200",
           **{k: names[k] for k in ("KAFKA_TOPIC", "KAFKA_DLQ_TOPIC", "DB_TABLE", "CONSUMER_GROUP")}}
    proc = start(command("consume"), env, tmp_path / "consumer.log")
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except Exception:
        proc.kill()
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f'DROP TABLE IF EXISTS "{names["DB_TABLE"]}"')


def producer_env(kafka_bootstrap, database_url, srv, names, dep, **extra):
    return env_for(kafka_bootstrap, srv, {k: names[k] for k in names}, dep, DATABASE_URL=database_url,
                   ADEME_EXTRA_FIELDS=FIELDS, REFRESH_WAIT_S="240", **extra)


def table(database_url, name, dep):
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        where = "departement IS NULL" if dep == "none" else "departement = %s"
        cur.execute(f'SELECT numero_dpe, date_reception_dpe::text, code_postal_ban, etiquette_dpe, departement, extra '
                    f'FROM "{name}" WHERE {where}', () if dep == "none" else (dep,))
        rows = cur.fetchall()
    out = {}
    for numero, date, cp, label, departement, extra in rows:
        assert numero not in out, f"duplicate {numero}"
        out[numero] = {"numero_dpe": numero, "date_reception_dpe": date, "code_postal_ban": cp,
                       "etiquette_dpe": label, "departement": departement,
                       **{k: extra.get(k) for k in FIELDS.split(",")}}
    return out


def api_now(ds, dep):
    out = {}
    for numero, row in ds.current_rows(dep).items():
        out[numero] = {"numero_dpe": numero, "date_reception_dpe": row["date_reception_dpe"],
                       "code_postal_ban": row.get("code_postal_ban"), "etiquette_dpe": row["etiquette_dpe"],
                       "departement": None if dep == "none" else dep,
                       **{k: row.get(k) for k in FIELDS.split(",")}}
    return out


def wait_equal(database_url, name, ds, dep, timeout=180):
    deadline = time.monotonic() + timeout
    while True:
        got, want = table(database_url, name, dep), api_now(ds, dep)
        if got == want or time.monotonic() > deadline:
            return got, want
        time.sleep(0.5)


def test_pass_while_rows_move_then_one_refresh_reconciles_exactly(kafka_bootstrap, database_url, standin_factory,
                                                                  names, consumer):
    ds = Dataset({"69": 6_000}, default_rows=0, rows_without_department=1_500, virtual=True, seed=31)
    changes = LiveChanges(["69", "none"], every=2, updates=6, inserts=3, deactivations=2, seed=5)
    srv = standin_factory(ds, changes=changes)
    for dep in ("69", "none"):
        res = run(command("produce"), producer_env(kafka_bootstrap, database_url, srv, names, dep))
        assert res.returncode == 0, res.stderr[-3000:]
        pages = events(res.stderr, "page")
        assert all(float(p["pct"]) <= 100.0 for p in pages)  # re-served rows never push progress past 100 %
    assert changes.rounds >= 6 and ds.changes["updated"] >= 60 and ds.changes["deactivated"] >= 20
    changes.enabled = False
    # during the pass, rows were re-served (updated) and vanished: the pass alone is not exact
    for dep in ("69", "none"):
        res = run(command("produce", "--refresh"), producer_env(kafka_bootstrap, database_url, srv, names, dep))
        assert res.returncode == 0, res.stderr[-3000:]
        done = events(res.stderr, "refreshed")
        assert done, res.stderr[-3000:]
        assert int(done[0]["deleted"]) > 0 and int(done[0]["updated"]) > 0, done[0]
        got, want = wait_equal(database_url, names["DB_TABLE"], ds, dep)
        assert set(got) == set(want), (len(got), len(want), len(set(got) ^ set(want)))
        assert got == want


def test_refresh_costs_what_changed_and_counts_it(kafka_bootstrap, database_url, standin_factory, names, consumer):
    ds = Dataset({"38": 20_000}, default_rows=0, virtual=True, seed=32)
    srv = standin_factory(ds)
    env = producer_env(kafka_bootstrap, database_url, srv, names, "38")
    first = run(command("produce"), env)
    assert first.returncode == 0, first.stderr[-3000:]
    full_requests = int(events(first.stderr, "done")[0]["api_requests"])
    ds.advance_days(7)  # a week later
    live = ds.live_indices("38")
    updated = live[100:300]  # 1 %
    gone = live[5000:5100]  # 0.5 %
    for i in updated:
        ds.update("38", i)
    for i in gone:
        ds.deactivate("38", i)
    ds.insert("38", 100)  # 0.5 %
    res = run(command("produce", "--refresh"), env)
    assert res.returncode == 0, res.stderr[-3000:]
    done = events(res.stderr, "refreshed")[0]
    # the mark is a day: the rows last modified on the mark's own day are read again (never missed)
    lo, hi = ds.index_range("38", "2025-12-31", "2025-12-31")
    same_day = hi - lo
    assert 0 < same_day < 50
    assert (done["updated"], done["inserted"], done["deleted"]) == (str(200 + same_day), "100", "100"), done
    assert int(done["api_requests"]) * 5 <= full_requests, (done["api_requests"], full_requests)
    got, want = wait_equal(database_url, names["DB_TABLE"], ds, "38")
    assert got == want
    # nothing changed since: a second refresh finds nothing to do, and no key pages are needed
    again = run(command("produce", "--refresh"), env)
    d2 = events(again.stderr, "refreshed")[0]
    # (the 300 rows modified on the new mark's day are read again: cheap, and nothing can slip through)
    assert (d2["updated"], d2["inserted"], d2["deleted"], d2["key_pages"]) == ("300", "0", "0", "0"), d2
