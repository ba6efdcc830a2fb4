"""The bench's harness: what every section shares (bench/run.py runs the sections, one file each).

- ``Bench``: the servers (real Kafka and PostgreSQL of the devkit's testbed, unless
  KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are set) and the ADEME stand-in in its own process, with
  the rows of every department the sections read, started and stopped together;
- ``Proc``: a program measured as its own process, with its peak resident memory;
- ``Runner``: names, logs, our producer and consumer run as processes, the baselines
  (``bench/baselines.py``), and ``record`` — one measurement, printed as it is taken;
- ``ratios``, ``db_count``; ``results`` (the document written to bench/results.json), ``print_table``.

The sections import this module and nothing else of bench/; this module imports no section.
"""

from __future__ import annotations

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
# The stand-ins of the sections main, refresh and analytics enforce no limits (the france section's
# does): producers measured against them are not paced to data-fair's bandwidth and compute.
UNPACED = {"ADEME_BANDWIDTH_BYTES_S": "0", "ADEME_COMPUTE_MS": "0"}


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
               "KAFKA_TOPIC_PARTITIONS": "6", "LOG_LEVEL": "WARNING", **UNPACED}
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


def ratios(r: dict, others: dict[str, dict]) -> dict:
    return {k: round(r["rows_per_s"] / o["rows_per_s"], 2) for k, o in others.items() if o.get("rows_per_s")}


def db_count(database_url: str, table: str) -> int:
    """Rows in ``table`` (0 while it does not exist yet)."""
    import psycopg2

    try:
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            return cur.fetchone()[0]
    except psycopg2.errors.UndefinedTable:
        return 0


# ------------------------------------------------------------------------------------------- set-up
#: departments the scale measurements use (the comparisons use 69, 01 and 38)
SCALE_POOL = ("75", "59", "13", "33", "31", "44")


class Bench:
    """The servers and the stand-in of one bench run; ``with Bench(rows, sizes) as b: b.runner …``.

    The stand-in serves ``rows`` rows for departments 69, 01 and 38 (the comparisons) and one
    department of each size of ``sizes`` (``scale_deps``: size -> department)."""

    def __init__(self, rows: int, baseline_rows: int, sizes: list[int]):
        if len(sizes) > len(SCALE_POOL):
            raise SystemExit(f"--scale takes at most {len(SCALE_POOL)} sizes")
        self.rows, self.sizes = rows, sizes
        self.scale_deps = dict(zip(sizes, SCALE_POOL))
        self.work = Path(tempfile.mkdtemp(prefix="dpe-benchmark-"))
        self.external = bool(os.environ.get("KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("DATABASE_URL"))
        self.servers: LocalServers | None = None
        self.standin: subprocess.Popen | None = None
        self.env: dict[str, str] = {}
        self.api = ""
        self.baseline_rows = baseline_rows
        self.runner: Runner | None = None

    def __enter__(self) -> "Bench":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if self.external:
            self.env = {"KAFKA_BOOTSTRAP_SERVERS": os.environ["KAFKA_BOOTSTRAP_SERVERS"],
                        "DATABASE_URL": os.environ["DATABASE_URL"]}
        else:
            print("starting the bench (Kafka, PostgreSQL)…", flush=True)
            self.servers = LocalServers(self.work / "servers").start()
            self.env = self.servers.env
        counts = {"69": self.rows, "01": self.rows, "38": self.rows,
                  **{dep: size for size, dep in self.scale_deps.items()}}
        port = free_port()
        args = [PY, "-m", "dpe_ingest", "ademe-standin", "--port", str(port), "--rows-per-department", "0"]
        for dep, n in counts.items():
            args += ["--rows", f"{dep}={n}"]
        self.standin = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(self.work / "standin.log", "wb"))
        self.api = f"http://127.0.0.1:{port}/data-fair/api/v1/datasets/dpe03existant"
        wait_http(self.api)
        self.runner = Runner(self.env, self.work, self.rows, self.baseline_rows)

    def stop(self) -> None:
        if self.standin is not None:
            self.standin.terminate()
            self.standin.wait(10)
            self.standin = None
        if self.servers is not None:
            self.servers.stop()
            self.servers = None


# ------------------------------------------------------------------------------------------- results
def results(bench: Bench, seconds_total: float, extra_settings: dict) -> dict:
    """The document bench/results.json holds: when, where, with what settings, every measurement."""
    return {
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds_total": round(seconds_total, 1),
        "machine": machine(),
        "settings": {"rows": bench.rows, "baseline_rows": bench.baseline_rows, "scale": bench.sizes,
                     "batch_size": 100, "page_size": 500, "kafka": KAFKA_VERSION, "bench_external": bench.external,
                     **extra_settings},
        "measurements": bench.runner.results if bench.runner is not None else [],
    }


def write_results(doc: dict, out: Path | str) -> None:
    print_table(doc)
    Path(out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwritten {out}")


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
