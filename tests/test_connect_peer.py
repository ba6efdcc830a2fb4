"""The bench's peer, Kafka Connect (standalone) + Debezium's JDBC sink, on a small topic: what it writes
must be exactly the rows produced.

Our rows (the JSON our producer writes) go to a topic; ``copy_enveloped`` copies them with a
JsonConverter schema envelope to a second topic, as the bench does; the connector upserts that copy
(batch.size=100, max.poll.records=100) into its own table.  The table must then hold every numero_dpe
once with the fields of its message.  First use fetches Kafka Connect and the Debezium plug-in from
Maven Central (``.cache/``); nothing asserts a duration.
"""

from __future__ import annotations

import datetime as dt
import json
import time

import psycopg2
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic

from dpe_devkit.testbed import LaunchError
from dpe_devkit.testbed.connect import ConnectStandalone, copy_enveloped, envelope, envelope_schema, \
    jdbc_from_database_url, jdbc_sink_config

from kafka_util import read_topic

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

ROWS = 300
SLOW = 240  # seconds: upper bound of a wait, only reached on failure


def row(i: int) -> dict:
    d = {"numero_dpe": f"CX{i:07d}Z", "date_reception_dpe": (dt.date(2021, 7, 1) + dt.timedelta(days=i % 900)).isoformat(),
         "code_postal_ban": f"{69001 + i % 9:05d}", "etiquette_dpe": "ABCDEFG"[i % 7], "departement": "69"}
    if i % 11 == 0:
        d["code_postal_ban"] = None
    if i % 13 == 0:
        d["etiquette_dpe"] = "É"  # non-ASCII survives the envelope and the JDBC driver
    return d


def table_rows(database_url: str, table: str) -> dict[str, tuple]:
    try:
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT numero_dpe, date_reception_dpe::text, code_postal_ban, etiquette_dpe, departement "
                        f"FROM {table}")
            return {r[0]: r[1:] for r in cur}
    except psycopg2.errors.UndefinedTable:
        return {}


def test_envelope_is_a_jsonconverter_value():
    schema = envelope_schema({"type_batiment"})
    doc = json.loads(envelope({"numero_dpe": "A1", "date_reception_dpe": "1970-01-11", "code_postal_ban": 69001,
                               "etiquette_dpe": None, "departement": "69", "type_batiment": "maison"}, schema))
    assert [f["field"] for f in doc["schema"]["fields"]] == [
        "numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe", "departement", "type_batiment"]
    assert doc["schema"]["fields"][1]["name"] == "org.apache.kafka.connect.data.Date"
    assert doc["payload"] == {"numero_dpe": "A1", "date_reception_dpe": 10, "code_postal_ban": "69001",
                              "etiquette_dpe": None, "departement": "69", "type_batiment": "maison"}
    with pytest.raises(ValueError, match="not in the schema"):
        envelope({"numero_dpe": "A1", "surface": 3}, schema)
    with pytest.raises(ValueError, match="not a date"):
        envelope({"numero_dpe": "A1", "date_reception_dpe": "01/07/2021"}, schema)
    assert jdbc_from_database_url("postgresql://dpe:p%40ss@127.0.0.1:5433/dpe") == (
        "jdbc:postgresql://127.0.0.1:5433/dpe", "dpe", "p@ss")


def test_connect_debezium_jdbc_sink_writes_exactly_the_rows(kafka_bootstrap, database_url, unique_name, tmp_path):
    source, topic, table = unique_name("cp_src"), unique_name("cp_env"), unique_name("dpe_connect")
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([NewTopic(source, 3, 1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    want = {}
    for i in range(ROWS):
        d = row(i)
        producer.send(source, key=d["numero_dpe"].encode(), value=json.dumps(d).encode())
        want[d["numero_dpe"]] = (d["date_reception_dpe"], d["code_postal_ban"], d["etiquette_dpe"], d["departement"])
    # one key sent twice: the upsert keeps the last value and one row
    again = dict(row(7), etiquette_dpe="G")
    producer.send(source, key=again["numero_dpe"].encode(), value=json.dumps(again).encode())
    want[again["numero_dpe"]] = (again["date_reception_dpe"], again["code_postal_ban"], "G", "69")
    producer.flush()
    producer.close()

    assert copy_enveloped(kafka_bootstrap, source, topic) == ROWS + 1
    copied = read_topic(kafka_bootstrap, topic)
    assert len(copied) == ROWS + 1 and all(set(r.json()) == {"schema", "payload"} for r in copied)

    worker = ConnectStandalone(tmp_path / "connect", kafka_bootstrap, heap=("64M", "512M"))
    try:
        worker.start()
    except LaunchError as exc:
        pytest.fail(f"could not start Kafka Connect: {exc}", pytrace=False)
    try:
        name = unique_name("dbz_jdbc")
        worker.create(name, jdbc_sink_config(topic=topic, table=table, database_url=database_url,
                                             batch_size=100, max_poll_records=100))
        worker.wait_running(name, timeout=SLOW)
        deadline = time.monotonic() + SLOW
        got = table_rows(database_url, table)
        while got != want and time.monotonic() < deadline:
            worker.check(name)  # a FAILED task fails the test at once, with its trace
            time.sleep(0.2)
            got = table_rows(database_url, table)
        assert len(got) == len(want), f"{len(got)} rows in {table}, {len(want)} keys produced"
        assert got == want
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT data_type FROM information_schema.columns WHERE table_name = %s "
                        "AND column_name = 'date_reception_dpe'", (table,))
            assert cur.fetchone() == ("date",)
            cur.execute(f"SELECT count(*), count(DISTINCT numero_dpe) FROM {table}")
            assert cur.fetchone() == (ROWS, ROWS)
        worker.delete(name)
    finally:
        worker.stop()
