"""dpe-ingest benchmarks: how fast, against what, and how cost grows.

``make bench`` (or ``.venv/bin/python bench/run.py``) starts the bench (real Kafka, real PostgreSQL,
the ADEME stand-in in its own process) unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are set, runs
every measurement side by side in one run, prints a table and writes ``bench/results.json``.

The peer a data engineer would pick, Kafka Connect (standalone) with Debezium's JDBC sink, is measured
beside our consumer on the same rows (section ``connect``, ``bench/kafka_connect.py``, bench/README.md).

Every program measured runs as its own process: wall seconds of the work, and its peak resident
memory (the kernel's high-water mark, ``VmHWM``).  Ratios compare rows/s measured in this same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from dpe_devkit.testbed import KAFKA_VERSION, LocalServers  # noqa: E402
from dpe_devkit.testbed.connect import CONNECT_VERSION, DEBEZIUM_VERSION  # noqa: E402
from kafka_connect import connect_section  # noqa: E402
from pg import db_count  # noqa: E402

PY = sys.executable


# ------------------------------------------------------------------------------------------- processes
class Proc:
    """A child process and its peak resident memory.

    The peak is the kernel's high-water mark of the process (``VmHWM`` in /proc/PID/status), sampled
    while it runs; ``ru_maxrss`` from wait4 is not used because a forked child starts with the
    driver's resident pages counted, which would floor every figure at the driver's size.
    """

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.fh = open(log, "wb")
        self.p = subprocess.Popen(args, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
                                  stdout=subprocess.PIPE if args[1].endswith("baselines.py") else self.fh,
                                  stderr=self.fh)
        self.t0 = time.perf_counter()
        self.rc: int | None = None
        self.hwm_kb = 0
        self.seconds: float | None = None

    def sample(self) -> None:
        try:
            with open(f"/proc/{self.p.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
                        return
        except (OSError, ValueError):
            pass

    @property
    def peak_rss_mb(self) -> float | None:
        return self.hwm_kb / 1024.0 if self.hwm_kb else None

    def wait(self, timeout: float = 3600) -> "Proc":
        deadline = time.monotonic() + timeout
        while self.p.poll() is None:
            self.sample()
            if time.monotonic() > deadline:
                self.p.kill()
                raise TimeoutError(f"{self.p.args} did not finish in {timeout}s; see {self.log}")
            time.sleep(0.02)
        self.seconds = time.perf_counter() - self.t0
        self.rc = self.p.returncode
        self.fh.close()
        return self

    def stdout_json(self) -> dict:
        return json.loads(self.p.stdout.read().decode().strip().splitlines()[-1])

    def check(self, what: str) -> "Proc":
        if self.rc not in (0,):
            raise RuntimeError(f"{what} exited {self.rc}; log: {self.log}\n{self.log.read_text()[-2000:]}")
        return self


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=2)
            return
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


# ------------------------------------------------------------------------------------------- the runner
class Runner:
    def __init__(self, env: dict[str, str], workdir: Path, rows: int, baseline_rows: int):
        self.env, self.workdir, self.rows, self.baseline_rows = env, workdir, rows, baseline_rows
        self.results: list[dict] = []
        self.n = 0

    def name(self, prefix: str) -> str:
        return f"bench_{prefix}_{uuid.uuid4().hex[:8]}"

    def log(self, what: str) -> Path:
        self.n += 1
        return self.workdir / f"{self.n:02d}-{what}.log"

    def record(self, name: str, rows: int, seconds: float, peak_rss_mb: float | None, **extra) -> dict:
        r = {"name": name, "rows": rows, "seconds": round(seconds, 3),
             "rows_per_s": round(rows / seconds, 1) if seconds > 0 else None,
             "peak_rss_mb": None if peak_rss_mb is None else round(peak_rss_mb, 1), **extra}
        self.results.append(r)
        print(f"  {name:<54} {rows:>9} rows {seconds:>8.2f} s {r['rows_per_s'] or 0:>10.0f} rows/s"
              + (f" {peak_rss_mb:>7.1f} MB" if peak_rss_mb else ""), flush=True)
        return r

    # -- programs
    def produce(self, dep: str, topic: str, api_url: str, code: dict[str, str] | None = None) -> Proc:
        env = {**self.env, **(code or {}), "DEPARTMENT": dep, "ADEME_API_URL": api_url, "KAFKA_TOPIC": topic,
               "KAFKA_DLQ_TOPIC": topic + "-dlq", "PRODUCER_CHECKPOINT_TOPIC": topic + "-ckpt",
               "KAFKA_TOPIC_PARTITIONS": "6", "LOG_LEVEL": "WARNING"}
        return Proc([PY, "-m", "dpe_ingest", "produce"], env, self.log(f"produce-{dep}"))

    def consume_until(self, topic: str, expected: int, table: str | None = None) -> tuple[float, Proc]:
        """Run our consumer until ``expected`` rows are stored; seconds from start to the last row."""
        table = table or self.name("t")
        env = {**self.env, "KAFKA_TOPIC": topic, "KAFKA_DLQ_TOPIC": topic + "-dlq", "DB_TABLE": table,
               "CONSUMER_GROUP": self.name("g"), "LOG_LEVEL": "WARNING"}
        proc = Proc([PY, "-m", "dpe_ingest", "consume"], env, self.log("consume"))
        seconds = self._wait_rows(proc, table, expected)
        proc.p.send_signal(signal.SIGTERM)
        proc.wait(120).check("consumer")
        return seconds, proc

    def _wait_rows(self, proc: Proc, table: str, expected: int, timeout: float = 3600,
                   also: tuple[Proc, ...] = ()) -> float:
        deadline = time.monotonic() + timeout
        proc.first_row = None  # (seconds from start, rows) when the first rows were seen in the table
        while True:
            for p in (proc, *also):
                p.sample()
            n = db_count(self.env["DATABASE_URL"], table)
            if n and proc.first_row is None:
                proc.first_row = (time.perf_counter() - proc.t0, n)
            if n >= expected:
                return time.perf_counter() - proc.t0
            if proc.p.poll() is not None:
                raise RuntimeError(f"consumer exited {proc.p.returncode} with {n}/{expected} rows: {proc.log}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n}/{expected} rows after {timeout}s")
            time.sleep(0.02)

    @staticmethod
    def from_first_row(proc: Proc, seconds: float, rows: int) -> dict:
        """The same run timed like the limits (from the first message to the last): from the first rows
        seen in the table to the last, start-up (process, group join, first batch) left out."""
        t_first, n_first = proc.first_row
        steady = seconds - t_first
        return {"seconds_from_first_row": round(steady, 3),
                "rows_per_s_from_first_row": round((rows - n_first) / steady, 1) if steady > 0 else None}

    def baseline(self, name: str, **kw) -> tuple[dict, Proc]:
        args = [PY, str(HERE / "baselines.py"), name]
        for k, v in kw.items():
            args += [f"--{k.replace('_', '-')}", str(v)]
        proc = Proc(args, {}, self.log(name)).wait()
        proc.check(name)
        return proc.stdout_json(), proc


def refresh_section(r: "Runner", env: dict[str, str], rows: int) -> None:
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
                "KAFKA_TOPIC_PARTITIONS": "6", "DB_TABLE": table, "CONSUMER_GROUP": group, "LOG_LEVEL": "WARNING"}
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


def analytics_section(r: "Runner", env: dict[str, str], api: str, rows: int) -> None:
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


def end_to_end(r: "Runner", env: dict[str, str], api: str, n: int, name: str, tree: Path | None) -> dict:
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


def ratios(r: dict, others: dict[str, dict]) -> dict:
    return {k: round(r["rows_per_s"] / o["rows_per_s"], 2) for k, o in others.items() if o.get("rows_per_s")}


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="dpe-benchmark-"))
    external = bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("DATABASE_URL"))
    bench = None
    if external:
        env = {"KAFKA_BOOTSTRAP_SERVERS": os.environ["KAFKA_BOOTSTRAP_SERVERS"],
               "DATABASE_URL": os.environ["DATABASE_URL"]}
    else:
        print("starting the bench (Kafka, PostgreSQL)…", flush=True)
        bench = LocalServers(work / "servers").start()
        env = bench.env
    sizes = [int(s) for s in args.scale.split(",") if s]
    N = args.rows
    scale_pool = ["75", "59", "13", "33", "31", "44"]  # departments the comparisons do not use
    if len(sizes) > len(scale_pool):
        raise SystemExit(f"--scale takes at most {len(scale_pool)} sizes")
    scale_deps = dict(zip(sizes, scale_pool))
    counts = {"69": N, "01": N, "38": N, **{dep: size for size, dep in scale_deps.items()}}
    port = free_port()
    standin_args = [PY, "-m", "dpe_ingest", "ademe-standin", "--port", str(port), "--rows-per-department", "0"]
    for dep, n in counts.items():
        standin_args += ["--rows", f"{dep}={n}"]
    standin = subprocess.Popen(standin_args, stdout=subprocess.DEVNULL, stderr=open(work / "standin.log", "wb"))
    api = f"http://127.0.0.1:{port}/data-fair/api/v1/datasets/dpe03existant"
    wait_http(api)
    r = Runner(env, work, N, args.baseline_rows)
    t_all = time.perf_counter()
    sections = set(args.sections.split(","))
    try:
        if "refresh" in sections:
            print(f"\nrefresh: one department of {N} rows, a week of changes, against a full pass", flush=True)
            refresh_section(r, env, N)
        if "analytics" in sections:
            print(f"\nanalytics: the sink alone and with the analytics group paused far behind, {N} rows", flush=True)
            analytics_section(r, env, api, N)
        if "connect" in sections and "main" not in sections:
            print(CONNECT_TITLE.format(N=N), flush=True)
            connect_section(r, api, N)
        if "main" not in sections:
            raise _Done

        # ---------------------------------------------------------------- producer
        print(f"\nproducer: API (stand-in) -> Kafka, department 69, {N} rows", flush=True)
        res, p = r.baseline("api-raw", api_url=api, department="69")
        api_raw = r.record("producer.limit.api_raw_pages", res["rows"], res["seconds"], p.peak_rss_mb)
        topic = r.name("prod")
        p = r.produce("69", topic, api).wait().check("producer")
        ours_p = r.record("producer.dpe_ingest", N, p.seconds, p.peak_rss_mb)
        res, p = r.baseline("course-producer", bootstrap=env["KAFKA_BOOTSTRAP_SERVERS"], topic=r.name("course"),
                            api_url=api, department="69", max_rows=args.baseline_rows)
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
                            max_rows=args.baseline_rows)
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
        if "connect" in sections:  # the peer, on an enveloped copy of the same topic
            print(CONNECT_TITLE.format(N=N), flush=True)
            connect_section(r, api, N, ours=ours_c, topic=topic, ours_table=ours_table)

        # ---------------------------------------------------------------- end to end
        print(f"\nend to end: departments 69, 01, 38 x {N} rows, from start to all rows stored", flush=True)
        before = before_tree(args.before, work) if args.before else None
        runs = [("end_to_end.3_departments", None)]
        if before is not None:  # the code before issue 13, same machine, same run, run first
            runs.insert(0, (f"end_to_end.3_departments.before_{args.before}", before))
        e2e = {}
        for name, tree in runs:
            e2e[name] = end_to_end(r, env, api, N, name, tree)
        if before is not None:
            ours_e, old_e = e2e["end_to_end.3_departments"], e2e[runs[0][0]]
            ours_e["ratio_to"] = ratios(ours_e, {f"before_{args.before}": old_e})
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                           capture_output=True, timeout=120)

        # ---------------------------------------------------------------- scale
        print(f"\nscale: one department of {', '.join(map(str, sizes))} rows: time per row and peak memory",
              flush=True)
        for size in sizes:
            dep = scale_deps[size]
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
    except _Done:
        pass
    finally:
        standin.terminate()
        standin.wait(10)
        if bench is not None:
            bench.stop()
    return {
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds_total": round(time.perf_counter() - t_all, 1),
        "machine": machine(),
        "settings": {"rows": N, "baseline_rows": args.baseline_rows, "scale": sizes, "batch_size": 100,
                     "page_size": 500, "kafka": KAFKA_VERSION, "bench_external": external,
                     **({"kafka_connect": CONNECT_VERSION, "debezium_jdbc": DEBEZIUM_VERSION}
                        if "connect" in sections else {})},
        "measurements": r.results,
    }


CONNECT_TITLE = (f"\nconnect: Kafka Connect {CONNECT_VERSION} (standalone) + Debezium JDBC sink {DEBEZIUM_VERSION}, "
                 "the same {N} rows as our consumer (an enveloped copy of its topic), from connector created "
                 "to all rows stored")


class _Done(Exception):
    """The sections asked for are measured."""


def machine() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    pg = subprocess.run(["bash", "-c", "ls -d /usr/lib/postgresql/*/ | tail -1"], capture_output=True, text=True)
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem, 1), "python": platform.python_version(),
            "os": platform.platform(), "postgresql": Path(pg.stdout.strip() or "?").name}


def print_table(doc: dict) -> None:
    print("\n" + "=" * 100)
    m = doc["machine"]
    print(f"dpe-ingest benchmarks — {m['cpus']} cores ({m['cpu']}), {m['memory_gib']} GiB, Python {m['python']}, "
          f"Kafka {doc['settings']['kafka']}, PostgreSQL {m['postgresql']}")
    print(f"{'measurement':<56} {'rows':>9} {'seconds':>9} {'rows/s':>10} {'peak MB':>8}  ratios")
    for r in doc["measurements"]:
        rat = "  ".join(f"{v:g}x {k}" for k, v in (r.get("ratio_to") or {}).items())
        if r.get("api_requests") is not None:
            rat = f"{r['api_requests']} API requests  " + rat
        if r.get("rows_per_s_from_first_row") is not None:
            rat = f"{r['rows_per_s_from_first_row']:.0f} rows/s from its first row  " + rat
        if r.get("seconds_from_worker_start") is not None:
            rat = (f"{r['seconds_from_worker_start']:.2f} s from worker start, {r['seconds_from_task_running']:.2f} s "
                   "from task RUNNING  " + rat)
        print(f"{r['name']:<56} {r['rows']:>9} {r['seconds']:>9.2f} {r['rows_per_s'] or 0:>10.0f} "
              f"{r['peak_rss_mb'] or 0:>8.1f}  {rat}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000, help="rows per department of the comparisons (100000)")
    p.add_argument("--baseline-rows", type=int, default=20_000,
                   help="rows the slow per-row baselines process (their rows/s is what is compared)")
    p.add_argument("--scale", default="10000,100000,1000000", help="department sizes of the scale test")
    p.add_argument("--sections", default="main,refresh,analytics,connect",
                   help="what to measure: main (producer, consumer, end to end, scale), refresh, analytics, "
                        "connect (the Kafka Connect + Debezium JDBC sink peer, beside our consumer)")
    p.add_argument("--before", default="e274184", metavar="REV",
                   help="also run the end-to-end measurement with this commit's code (default: the commit "
                        "before issue 13's changes; '' for none)")
    p.add_argument("--out", default=str(HERE / "results.json"))
    args = p.parse_args()
    doc = run(args)
    print_table(doc)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
