"""Section ``main``: the producer and the consumer against their limits and baselines on the same topic
(department 69, ``--rows`` rows), end to end (three departments, also with the code of ``--before``),
and scale (time per row and peak memory from 10 000 to 1 000 000 rows)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from harness import PY, ROOT, Bench, Proc, Runner, ratios


def before_tree(rev: str, work: Path) -> Path | None:
    """A checkout of ``rev`` (e.g. the code before this issue) whose ``src`` the end-to-end run can use."""
    tree = work / f"before-{rev}"
    try:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), rev],
                       check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"  (no end-to-end comparison with {rev}: {exc})", flush=True)
        return None
    return tree


def end_to_end(r: Runner, env: dict[str, str], api: str, n: int, name: str, tree: Path | None) -> dict:
    """Three producers and one consumer from start to every row stored (``tree``: another checkout's code)."""
    topic = r.name("e2e")
    table = r.name("e2e")
    code = {"PYTHONPATH": str(tree / "src")} if tree is not None else {}
    t0 = time.perf_counter()
    env_c = {**env, **code, "KAFKA_TOPIC": topic, "KAFKA_DLQ_TOPIC": topic + "-dlq", "DB_TABLE": table,
             "CONSUMER_GROUP": r.name("g"), "LOG_LEVEL": "WARNING", "KAFKA_TOPIC_PARTITIONS": "6"}
    producers = []
    for d in ("69", "01", "38"):
        p = r.produce(d, topic, api, code)
        producers.append(p)
    consumer = Proc([PY, "-m", "dpe_ingest", "consume"], env_c, r.log("consume-e2e"))
    consumer.t0 = t0
    seconds = r._wait_rows(consumer, table, 3 * n, also=tuple(producers))
    for p in producers:
        p.wait().check("producer")
    consumer.p.send_signal(signal.SIGTERM)
    consumer.wait(120).check("consumer")
    return r.record(name, 3 * n, seconds, max([consumer.peak_rss_mb] + [p.peak_rss_mb for p in producers]))


def measure(b: Bench, before: str = "", consumer_measured: Callable[[dict, str, str], None] | None = None) -> None:
    """``before``: a revision whose code also runs the end-to-end measurement ('' for none);
    ``consumer_measured(record, topic, table)``: called once our consumer's figures are taken (the
    connect section measures its peer on the same topic then)."""
    r, env, api, N = b.runner, b.env, b.api, b.rows
    # ---------------------------------------------------------------- producer
    print(f"\nproducer: API (stand-in) -> Kafka, department 69, {N} rows", flush=True)
    res, p = r.baseline("api-raw", api_url=api, department="69")
    api_raw = r.record("producer.limit.api_raw_pages", res["rows"], res["seconds"], p.peak_rss_mb)
    topic = r.name("prod")
    p = r.produce("69", topic, api).wait().check("producer")
    ours_p = r.record("producer.dpe_ingest", N, p.seconds, p.peak_rss_mb)
    res, p = r.baseline("course-producer", bootstrap=env["KAFKA_BOOTSTRAP_SERVERS"], topic=r.name("course"),
                        api_url=api, department="69", max_rows=b.baseline_rows)
    course_p = r.record("producer.baseline.course_blocking_send", res["rows"], res["seconds"], p.peak_rss_mb)
    ours_p["ratio_to"] = ratios(ours_p, {"course_blocking_send": course_p, "api_raw_pages": api_raw})

    # ---------------------------------------------------------------- consumer (same topic)
    print(f"\nconsumer: Kafka -> PostgreSQL, the same topic of {N} rows", flush=True)
    res, p = r.baseline("kafka-read", bootstrap=env["KAFKA_BOOTSTRAP_SERVERS"], topic=topic)
    kread = r.record("consumer.limit.kafka_read_no_db", res["rows"], res["seconds"], p.peak_rss_mb)
    res, p = r.baseline("copy", bootstrap=env["KAFKA_BOOTSTRAP_SERVERS"], topic=topic,
                        database_url=env["DATABASE_URL"], table=r.name("copy"))
    copy = r.record("consumer.limit.copy_no_kafka", res["rows"], res["seconds"], p.peak_rss_mb)
    res, p = r.baseline("sink-batches", bootstrap=env["KAFKA_BOOTSTRAP_SERVERS"], topic=topic,
                        database_url=env["DATABASE_URL"], table=r.name("sink"))
    sink_only = r.record("consumer.limit.sink_batches_100_no_kafka", res["rows"], res["seconds"], p.peak_rss_mb)
    ours_table = r.name("t")
    seconds, p = r.consume_until(topic, N, ours_table)
    ours_c = r.record("consumer.dpe_ingest", N, seconds, p.peak_rss_mb, **r.from_first_row(p, seconds, N))
    res, p = r.baseline("course-consumer", bootstrap=env["KAFKA_BOOTSTRAP_SERVERS"], topic=topic,
                        group=r.name("g"), database_url=env["DATABASE_URL"], table=r.name("course"),
                        max_rows=b.baseline_rows)
    course_c = r.record("consumer.baseline.course_insert_commit_per_row", res["rows"], res["seconds"],
                        p.peak_rss_mb)
    res, p = r.baseline("executemany-100", bootstrap=env["KAFKA_BOOTSTRAP_SERVERS"], topic=topic,
                        group=r.name("g"), database_url=env["DATABASE_URL"], table=r.name("em"))
    em = r.record("consumer.baseline.executemany_batch_100", res["rows"], res["seconds"], p.peak_rss_mb)
    ours_c["ratio_to"] = ratios(ours_c, {"course_insert_commit_per_row": course_c,
                                         "executemany_batch_100": em, "copy_no_kafka": copy})
    # the limits are timed from their first message: so is this ratio (start-up left out; the one
    # including it is kept beside)
    steady = {"rows_per_s": ours_c["rows_per_s_from_first_row"]}
    ours_c["ratio_to"].update({
        "kafka_read_no_db": ratios(steady, {"x": kread})["x"],
        "kafka_read_no_db_start_up_included": ratios(ours_c, {"x": kread})["x"],
        "sink_batches_100_no_kafka": ratios(steady, {"x": sink_only})["x"]})
    if consumer_measured is not None:
        consumer_measured(ours_c, topic, ours_table)

    # ---------------------------------------------------------------- end to end
    print(f"\nend to end: departments 69, 01, 38 x {N} rows, from start to all rows stored", flush=True)
    old_tree = before_tree(before, b.work) if before else None
    runs = [("end_to_end.3_departments", None)]
    if old_tree is not None:  # the code before issue 13, same machine, same run, run first
        runs.insert(0, (f"end_to_end.3_departments.before_{before}", old_tree))
    e2e = {}
    for name, tree in runs:
        e2e[name] = end_to_end(r, env, api, N, name, tree)
    if old_tree is not None:
        ours_e, old_e = e2e["end_to_end.3_departments"], e2e[runs[0][0]]
        ours_e["ratio_to"] = ratios(ours_e, {f"before_{before}": old_e})
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)],
                       capture_output=True, timeout=120)

    # ---------------------------------------------------------------- scale
    print(f"\nscale: one department of {', '.join(map(str, b.sizes))} rows: time per row and peak memory",
          flush=True)
    for size in b.sizes:
        dep = b.scale_deps[size]
        topic = r.name(f"scale{size}")
        p = r.produce(dep, topic, api).wait().check("producer")
        rp = r.record(f"scale.producer.{size}", size, p.seconds, p.peak_rss_mb)
        rp["us_per_row"] = round(1e6 * p.seconds / size, 1)
        seconds, c = r.consume_until(topic, size)
        rc = r.record(f"scale.consumer.{size}", size, seconds, c.peak_rss_mb)
        rc["us_per_row"] = round(1e6 * seconds / size, 1)
        for rec, what in ((rp, "producer"), (rc, "consumer")):
            ref = next((x for x in r.results if x["name"] == f"scale.{what}.100000"), None)
            if ref is not None and size > 100000 and ref["peak_rss_mb"] and rec["peak_rss_mb"]:
                rec["ratio_to"] = {"peak_rss_of_100000": round(rec["peak_rss_mb"] / ref["peak_rss_mb"], 2)}
