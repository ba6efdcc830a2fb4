"""Section ``refresh``: ``produce --refresh`` after a week of changes against a full pass (API
requests and seconds), on a department of ``--rows`` rows served by a stand-in of its own."""

from __future__ import annotations

import signal
import time

from harness import PY, UNPACED, Bench, Proc, Runner

TITLE = "\nrefresh: one department of {N} rows, a week of changes, against a full pass"


def refresh_section(r: Runner, env: dict[str, str], rows: int) -> None:
    """A refresh of one department against a full pass: API requests and seconds.

    The stand-in runs in this process (its dataset is changed between the two runs): department 974
    of ``rows`` rows, a virtual dataset like dpe03existant; a full pass into an empty table; then a week
    of changes (1 % of the rows updated, 0.5 % new, 0.5 % deactivated) and ``produce --refresh``.  The
    table must then equal the API's rows, key for key."""
    from dpe_ingest.standin import Dataset, StandinServer

    dep = "974"
    ds = Dataset({dep: rows}, default_rows=0, virtual=True, seed=16)
    srv = StandinServer(ds).start()
    try:
        topic, table, group = r.name("refresh"), r.name("refresh"), r.name("g")
        base = {**env, "DEPARTMENT": dep, "ADEME_API_URL": srv.url, "KAFKA_TOPIC": topic,
                "KAFKA_DLQ_TOPIC": topic + "-dlq", "PRODUCER_CHECKPOINT_TOPIC": topic + "-ckpt",
                "KAFKA_TOPIC_PARTITIONS": "6", "DB_TABLE": table, "CONSUMER_GROUP": group, "LOG_LEVEL": "WARNING",
                **UNPACED}
        consumer = Proc([PY, "-m", "dpe_ingest", "consume"], base, r.log("consume-refresh"))
        before = srv.requests_served
        p = Proc([PY, "-m", "dpe_ingest", "produce"], base, r.log("produce-full-pass")).wait().check("full pass")
        full_requests = srv.requests_served - before
        full = r.record("refresh.full_pass", rows, p.seconds, p.peak_rss_mb, api_requests=full_requests)
        r._wait_rows(consumer, table, rows)
        ds.advance_days(7)
        live = ds.live_indices(dep)
        n_upd, n_new, n_gone = rows // 100, rows // 200, rows // 200
        for i in live[7::max(1, len(live) // n_upd)][:n_upd]:
            ds.update(dep, i)
        for i in live[3::max(1, len(live) // n_gone)][:n_gone]:
            if ds.is_live(dep, i):
                ds.deactivate(dep, i)
        ds.insert(dep, n_new)
        before = srv.requests_served
        p = Proc([PY, "-m", "dpe_ingest", "produce", "--refresh"], base, r.log("produce-refresh")).wait()
        p.check("refresh")
        refresh_requests = srv.requests_served - before
        want = set(ds.current_rows(dep))
        deadline = time.monotonic() + 600
        while True:
            import psycopg2

            with psycopg2.connect(env["DATABASE_URL"]) as conn, conn.cursor() as cur:
                cur.execute(f"SELECT numero_dpe FROM {table}")
                got = {row[0] for row in cur}
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        consumer.p.send_signal(signal.SIGTERM)
        consumer.wait(120).check("consumer")
        rec = r.record("refresh.1pct_updated_0.5pct_new_0.5pct_deactivated", rows, p.seconds, p.peak_rss_mb,
                       api_requests=refresh_requests, exact=got == want,
                       changes={"updated": ds.changes["updated"], "inserted": ds.changes["inserted"],
                                "deactivated": ds.changes["deactivated"]})
        rec["ratio_to"] = {"full_pass_requests": round(refresh_requests / full_requests, 3),
                           "full_pass_seconds": round(p.seconds / full["seconds"], 3)}
        if got != want:
            raise RuntimeError(f"after the refresh the table differs from the API: {len(got ^ want)} keys")
    finally:
        srv.stop()


def measure(b: Bench) -> None:
    print(TITLE.format(N=b.rows), flush=True)
    refresh_section(b.runner, b.env, b.rows)
