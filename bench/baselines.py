"""Baselines and limits the benchmark compares dpe-ingest with, each run as its own process.

``python bench/baselines.py NAME [options]`` prints one JSON line ``{"rows": N, "seconds": S}`` (the
timed part only; set-up such as loading rows into memory is not timed).

- ``course-consumer``: the Kafka course's consumer (exercise 4): one INSERT and one commit per message.
- ``executemany-100``: a naive batch of 100 rows with ``cursor.executemany`` and a commit per batch.
- ``kafka-read``: kafka-python reading the topic (and decoding the JSON) with no database: the limit
  on the Kafka side.
- ``copy``: a direct COPY of the same rows into an indexed table with no Kafka: the limit on the
  PostgreSQL side.
- ``sink-batches``: dpe-ingest's own sink writing the same rows, parsed, from memory in transactions of
  100 with their offsets (what the consumer's writer thread does per batch), no Kafka: the limit of
  durable 100-row transactions on this PostgreSQL.
- ``course-producer``: the course's producer style: one blocking ``send(...).get()`` per row.
- ``api-raw``: walking the API cursor with no Kafka: the limit on the API side (the stand-in's raw page rate).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time

COLUMNS = ("numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe", "departement")


def _consumer(bootstrap: str, topic: str, group: str | None, **kw):
    from kafka import KafkaConsumer

    return KafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                         consumer_timeout_ms=kw.pop("consumer_timeout_ms", 10000), **kw)


def _table(conn, table: str) -> None:
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        cur.execute(f"CREATE TABLE {table} (numero_dpe text PRIMARY KEY, date_reception_dpe date, "
                    "code_postal_ban text, etiquette_dpe text, departement text)")
    conn.commit()


def course_consumer(a) -> dict:
    """Exercise 4 of the course, as written there: a row, an INSERT, a commit."""
    import psycopg2

    conn = psycopg2.connect(a.database_url)
    _table(conn, a.table)
    cur = conn.cursor()
    consumer = _consumer(a.bootstrap, a.topic, a.group, value_deserializer=lambda m: json.loads(m.decode("utf-8")))
    n = 0
    t0 = None
    for msg in consumer:
        if t0 is None:
            t0 = time.perf_counter()
        d = msg.value
        cur.execute("INSERT INTO " + a.table + " (numero_dpe, date_reception_dpe, code_postal_ban, etiquette_dpe, "
                    "departement) VALUES (%s, %s, %s, %s, %s)",
                    (d["numero_dpe"], d["date_reception_dpe"], d["code_postal_ban"], d["etiquette_dpe"],
                     d["departement"]))
        conn.commit()
        n += 1
        last = time.perf_counter()
        if n >= a.max_rows:
            break
    seconds = last - t0
    consumer.close()
    return {"rows": n, "seconds": seconds}


def executemany_100(a) -> dict:
    import psycopg2

    conn = psycopg2.connect(a.database_url)
    _table(conn, a.table)
    cur = conn.cursor()
    consumer = _consumer(a.bootstrap, a.topic, a.group, enable_auto_commit=False)
    sql = (f"INSERT INTO {a.table} (numero_dpe, date_reception_dpe, code_postal_ban, etiquette_dpe, departement) "
           "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (numero_dpe) DO NOTHING")
    batch, n, t0, last = [], 0, None, None
    for msg in consumer:
        if t0 is None:
            t0 = time.perf_counter()
        d = json.loads(msg.value)
        batch.append(tuple(d[c] for c in COLUMNS))
        if len(batch) == 100:
            cur.executemany(sql, batch)
            conn.commit()
            consumer.commit()
            n += len(batch)
            batch = []
            last = time.perf_counter()
            if n >= a.max_rows:
                break
    if batch:  # the consumer's idle timeout ended the loop: that wait is not part of the work
        cur.executemany(sql, batch)
        conn.commit()
        consumer.commit()
        n += len(batch)
        last = time.perf_counter()
    seconds = last - t0
    consumer.close()
    return {"rows": n, "seconds": seconds}


def kafka_read(a) -> dict:
    consumer = _consumer(a.bootstrap, a.topic, None, enable_auto_commit=False, consumer_timeout_ms=3000)
    n, t0, last = 0, None, None
    for msg in consumer:
        if t0 is None:
            t0 = time.perf_counter()
        json.loads(msg.value)
        n += 1
        last = time.perf_counter()
        if n >= a.max_rows:
            break
    consumer.close()
    return {"rows": n, "seconds": last - t0}


def copy(a) -> dict:
    import psycopg2

    consumer = _consumer(a.bootstrap, a.topic, None, enable_auto_commit=False, consumer_timeout_ms=3000)
    rows = {}
    for msg in consumer:  # load the same rows into memory first: not timed
        d = json.loads(msg.value)
        rows[d["numero_dpe"]] = d
        if len(rows) >= a.max_rows:
            break
    consumer.close()
    buf = io.StringIO()
    for d in rows.values():
        buf.write("\t".join("\\N" if d[c] is None else str(d[c]) for c in COLUMNS) + "\n")
    conn = psycopg2.connect(a.database_url)
    _table(conn, a.table)
    t0 = time.perf_counter()
    buf.seek(0)
    with conn.cursor() as cur:
        cur.copy_expert(f"COPY {a.table} ({', '.join(COLUMNS)}) FROM STDIN", buf)
    conn.commit()
    return {"rows": len(rows), "seconds": time.perf_counter() - t0}


def _pages(a):
    import requests

    s = requests.Session()
    url = a.api_url.rstrip("/") + "/lines"
    params = {"size": 500, "select": "numero_dpe,date_reception_dpe,code_postal_ban,etiquette_dpe",
              "qs": f'code_departement_ban:"{a.department}"'}
    while url:
        r = s.get(url, params=params, timeout=60)
        r.raise_for_status()
        body = r.json()
        yield body["results"]
        url, params = (body.get("next") if body["results"] else None), None


def api_raw(a) -> dict:
    t0, n = time.perf_counter(), 0
    for rows in _pages(a):
        n += len(rows)
    return {"rows": n, "seconds": time.perf_counter() - t0}


def course_producer(a) -> dict:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=a.bootstrap, value_serializer=lambda v: json.dumps(v).encode("utf-8"))
    t0, n = time.perf_counter(), 0
    for rows in _pages(a):
        for row in rows:
            row["departement"] = a.department
            producer.send(a.topic, row).get(timeout=30)
            n += 1
        if n >= a.max_rows:
            break
    seconds = time.perf_counter() - t0
    producer.close()
    return {"rows": n, "seconds": seconds}


def sink_batches(a) -> dict:
    from dpe_ingest.sink import OffsetClaim, Sink, parse_message

    consumer = _consumer(a.bootstrap, a.topic, None, enable_auto_commit=False, consumer_timeout_ms=3000)
    rows = []
    for msg in consumer:  # read and parse the same messages first: not timed
        rows.append(parse_message(msg.value, 0, len(rows)))
        if len(rows) >= a.max_rows:
            break
    consumer.close()
    sink = Sink(a.database_url, a.table)
    sink.migrate()
    t0 = time.perf_counter()
    for i in range(0, len(rows), a.batch_size):
        batch = rows[i:i + a.batch_size]
        sink.write(batch, OffsetClaim(a.table, a.topic, {0: (i, i + len(batch))}))
    seconds = time.perf_counter() - t0
    sink.close()
    return {"rows": len(rows), "seconds": seconds}


BASELINES = {"course-consumer": course_consumer, "executemany-100": executemany_100, "kafka-read": kafka_read,
             "copy": copy, "api-raw": api_raw, "course-producer": course_producer, "sink-batches": sink_batches}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BASELINES))
    p.add_argument("--bootstrap")
    p.add_argument("--topic")
    p.add_argument("--group")
    p.add_argument("--database-url")
    p.add_argument("--table", default="bench_baseline")
    p.add_argument("--api-url")
    p.add_argument("--department", default="69")
    p.add_argument("--max-rows", type=int, default=10**9)
    p.add_argument("--batch-size", type=int, default=100)
    a = p.parse_args()
    print(json.dumps(BASELINES[a.name](a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
