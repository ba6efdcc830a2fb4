"""Section ``analytics``: our consumer alone, beside the analytics group paused far behind and running,
and the analytics consumer alone (``--rows`` rows of department 69)."""

from __future__ import annotations

import signal
import time

from harness import PY, Bench, Proc, Runner, ratios

TITLE = "\nanalytics: the sink alone and with the analytics group paused far behind, {N} rows"


def analytics_section(r: Runner, env: dict[str, str], api: str, rows: int) -> None:
    """The sink alone, then with the analytics group paused far behind (its process SIGSTOPped after it
    joined), then with the analytics consumer running beside it; and the analytics consumer alone.
    Rounds alternate so that a slow moment of the shared machine does not favour one side."""
    import psycopg2

    topic = r.name("an")
    r.produce("69", topic, api).wait().check("producer")

    def analytics(group: str, prefix: str) -> Proc:
        env_a = {**env, "KAFKA_TOPIC": topic, "KAFKA_DLQ_TOPIC": topic + "-dlq", "ANALYTICS_GROUP": group,
                 "ANALYTICS_TABLE_PREFIX": prefix, "LOG_LEVEL": "WARNING"}
        return Proc([PY, "-m", "dpe_ingest", "analytics"], env_a, r.log("analytics"))

    def applied(prefix: str) -> int:
        try:
            with psycopg2.connect(env["DATABASE_URL"]) as conn, conn.cursor() as cur:
                cur.execute(f'SELECT coalesce(sum(next_offset), 0) FROM "{prefix}_offsets"')
                return int(cur.fetchone()[0])
        except psycopg2.Error:
            return 0

    def wait_applied(proc: Proc, prefix: str, n: int) -> float:
        while applied(prefix) < n:
            proc.sample()
            if proc.p.poll() is not None:
                raise RuntimeError(f"analytics exited {proc.p.returncode}: {proc.log}")
            time.sleep(0.05)
        return time.perf_counter() - proc.t0

    # the analytics consumer alone
    prefix = r.name("a")
    a = analytics(r.name("g"), prefix)
    secs = wait_applied(a, prefix, rows)
    a.p.send_signal(signal.SIGTERM)
    a.wait(120).check("analytics")
    r.record("analytics.dpe_ingest", rows, secs, a.peak_rss_mb)
    alone, paused = [], []
    for _round in range(2):
        secs, p = r.consume_until(topic, rows)
        alone.append(r.record("consumer.alone", rows, secs, p.peak_rss_mb))
        prefix = r.name("a")
        a = analytics(r.name("g"), prefix)
        while applied(prefix) < min(1000, rows):  # joined and counting: then paused, lagging behind
            time.sleep(0.05)
        a.p.send_signal(signal.SIGSTOP)
        try:
            secs, p = r.consume_until(topic, rows)
        finally:
            a.p.send_signal(signal.SIGCONT)
            a.p.send_signal(signal.SIGTERM)
            a.wait(120).check("analytics")
        behind = rows - applied(prefix)
        paused.append(r.record("consumer.with_analytics_paused", rows, secs, p.peak_rss_mb, analytics_behind=behind))
    prefix = r.name("a")
    a = analytics(r.name("g"), prefix)
    secs, p = r.consume_until(topic, rows)
    a.p.send_signal(signal.SIGTERM)
    a.wait(120).check("analytics")
    running = r.record("consumer.with_analytics_running", rows, secs, p.peak_rss_mb)
    best_alone = max(alone, key=lambda x: x["rows_per_s"])
    best_paused = max(paused, key=lambda x: x["rows_per_s"])
    best_paused["ratio_to"] = ratios(best_paused, {"consumer_alone": best_alone})
    running["ratio_to"] = ratios(running, {"consumer_alone": best_alone})


def measure(b: Bench) -> None:
    print(TITLE.format(N=b.rows), flush=True)
    analytics_section(b.runner, b.env, b.api, b.rows)
