"""The Kafka Connect peer of the bench: Kafka Connect (standalone) + Debezium's JDBC sink, side by side
with ``dpe-ingest consume`` on the same rows (section ``connect``: ``bench/run.py --sections connect``; bench/README.md).

The sink needs schema'd records: the rows our producer wrote are copied, before anything is timed, to
a topic of their own as JsonConverter values with a schema envelope (same keys, same partitions).
Each variant runs in a fresh worker JVM: worker started (not timed), connector created through the
REST API (t0 of ``seconds``, the figure the ratios use), then the table's count is polled until it
holds every row.  The table must then equal our consumer's, row for row, or the bench fails.
"""

from __future__ import annotations

import time

from dpe_devkit.testbed.connect import (CONNECT_VERSION, DEBEZIUM_DEFAULT_BATCH_SIZE, DEBEZIUM_VERSION,
                                        ConnectStandalone, copy_enveloped, jdbc_sink_config)
from harness import Bench, Runner, db_count

TITLE = (f"\nconnect: Kafka Connect {CONNECT_VERSION} (standalone) + Debezium JDBC sink {DEBEZIUM_VERSION}, "
         "the same {N} rows as our consumer (an enveloped copy of its topic), from connector created "
         "to all rows stored")
#: what bench/results.json's settings say of the peer when this section ran
SETTINGS = {"kafka_connect": CONNECT_VERSION, "debezium_jdbc": DEBEZIUM_VERSION}

PEER = "kafka_connect_debezium_jdbc"
#: (label, batch.size, consumer.override.max.poll.records): None keeps the default (500 both)
VARIANTS = (("batch_100", 100, 100), ("batch_default", None, None))
STALL_S = 180.0  # no new row for this long: the peer is stuck, the bench fails


def table_digest(database_url: str, table: str) -> tuple[int, int, str | None]:
    """(rows, distinct numero_dpe, md5 of every row's (numero_dpe, date, code postal, label, department))."""
    import psycopg2

    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(DISTINCT numero_dpe), md5(string_agg(concat_ws('|', numero_dpe, "
            "coalesce(date_reception_dpe::text, '-'), coalesce(code_postal_ban, '-'), coalesce(etiquette_dpe, '-'), "
            f"coalesce(departement, '-')), E'\\n' ORDER BY numero_dpe)) FROM {table}")
        n, distinct, digest = cur.fetchone()
        return int(n), int(distinct), digest


def run_peer(r: Runner, topic: str, rows: int, label: str, batch_size: int | None,
             max_poll_records: int | None) -> tuple[dict, str]:
    """One measurement in a fresh worker; returns (its record, its table)."""
    database_url = r.env["DATABASE_URL"]
    table, name = r.name("connect"), r.name("dbz")
    worker = ConnectStandalone(r.workdir / f"connect-{label}", r.env["KAFKA_BOOTSTRAP_SERVERS"])
    worker.start()
    peak = worker.peak_rss_mb() or 0.0
    try:
        t_submit = time.perf_counter()
        worker.create(name, jdbc_sink_config(topic=topic, table=table, database_url=database_url,
                                             batch_size=batch_size, max_poll_records=max_poll_records))
        t_running = None
        last_n, last_change, last_check = -1, time.monotonic(), 0.0
        while True:
            peak = max(peak, worker.peak_rss_mb() or 0.0)
            if time.monotonic() - last_check > 0.5 or t_running is None:
                last_check = time.monotonic()
                if worker.check(name) and t_running is None:  # raises when the connector or its task FAILED
                    t_running = time.perf_counter()
            n = db_count(database_url, table)
            if n >= rows:
                t_done = time.perf_counter()
                break
            if n != last_n:
                last_n, last_change = n, time.monotonic()
            elif time.monotonic() - last_change > STALL_S:
                raise RuntimeError(f"Kafka Connect peer ({label}): {n}/{rows} rows in {table} and none for "
                                   f"{STALL_S:.0f}s; log {worker.log_path}")
            time.sleep(0.05)
        peak = max(peak, worker.peak_rss_mb() or 0.0)
        worker.delete(name)
    finally:
        worker.stop()
    rec = r.record(f"consumer.peer.{PEER}_{label}", rows, t_done - t_submit, peak or None,
                   seconds_from_worker_start=round(t_done - worker.t_launch, 3),
                   seconds_from_task_running=round(t_done - (t_running or t_submit), 3),
                   rows_per_s_from_task_running=round(rows / (t_done - (t_running or t_submit)), 1),
                   worker_start_s=round(worker.start_seconds or 0.0, 3),
                   settings={"batch.size": batch_size or DEBEZIUM_DEFAULT_BATCH_SIZE,
                             "max.poll.records": max_poll_records or 500, "tasks.max": 1,
                             "insert.mode": "upsert", "primary.key.mode": "record_value",
                             "schema.evolution": "basic", "input": "enveloped copy (JsonConverter schema)",
                             "kafka_connect": CONNECT_VERSION, "debezium_jdbc": DEBEZIUM_VERSION})
    return rec, table


def connect_section(r: Runner, api: str, rows: int, ours: dict | None = None, topic: str | None = None,
                    ours_table: str | None = None) -> list[dict]:
    """The peer on the rows of department 69, with the connector's default batch.size and with 100.

    ``ours``/``topic``/``ours_table``: our consumer's record, the topic it read and its table, when the
    main section measured it; else this section produces the topic and measures our consumer first.
    Adds the peers to ``ours["ratio_to"]``; raises when a peer's table differs from ours."""
    if ours is None or topic is None or ours_table is None:
        topic = r.name("cpeer")
        r.produce("69", topic, api).wait().check("producer")
        ours_table = r.name("t")
        seconds, p = r.consume_until(topic, rows, ours_table)
        ours = r.record("consumer.dpe_ingest", rows, seconds, p.peak_rss_mb)
    want = table_digest(r.env["DATABASE_URL"], ours_table)
    if want[:2] != (rows, rows):
        raise RuntimeError(f"our consumer's table {ours_table} has {want[0]} rows ({want[1]} keys), not {rows}")
    enveloped = r.name("cenv")
    copied = copy_enveloped(r.env["KAFKA_BOOTSTRAP_SERVERS"], topic, enveloped)  # set-up, not timed
    if copied != rows:
        raise RuntimeError(f"copied {copied} records of {topic} to {enveloped}, expected {rows}")
    peers = []
    for label, batch_size, max_poll in VARIANTS:
        rec, table = run_peer(r, enveloped, rows, label, batch_size, max_poll)
        got = table_digest(r.env["DATABASE_URL"], table)
        rec["verified"] = got == want
        if got != want:
            raise RuntimeError(f"Kafka Connect peer ({label}): table {table} (rows, keys, md5) = {got}, our "
                               f"consumer's {ours_table} = {want}")
        peers.append(rec)
    # as harness.ratios: our rows/s over the peer's, measured in this run
    ours.setdefault("ratio_to", {}).update({p["name"].rsplit(".", 1)[1]: round(ours["rows_per_s"] / p["rows_per_s"], 2)
                                            for p in peers if p.get("rows_per_s") and ours.get("rows_per_s")})
    return peers


def measure(b: Bench, ours: dict | None = None, topic: str | None = None, ours_table: str | None = None) -> None:
    print(TITLE.format(N=b.rows), flush=True)
    connect_section(b.runner, b.api, b.rows, ours=ours, topic=topic, ours_table=ours_table)
