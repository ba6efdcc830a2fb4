"""``dpe-ingest run``: the whole pipeline on one machine, without Kubernetes, then a summary.

What it does, in order:

1. Kafka and PostgreSQL: the testbed's (``dpe_devkit.testbed``, started here and stopped at the end)
   unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL point at your own;
2. the API: the real ADEME API (ADEME_API_URL, default data.ademe.fr) when it answers a short probe,
   or with ``--standin`` the local stand-in, started in this process.  An API that does not answer
   falls back to the stand-in only when the run owns the Kafka and PostgreSQL it writes to (the
   testbed's, neither KAFKA_BOOTSTRAP_SERVERS nor DATABASE_URL set); with yours it is an error (exit 1):
   synthetic certificates never go into a real table unless ``--standin`` asks for them;
3. one ``dpe-ingest consume`` process, one ``dpe-ingest analytics`` process (the second consumer group)
   and one ``dpe-ingest produce`` process per department, in parallel; their log lines are relayed to
   stderr, prefixed with the department (or consumer, analytics);
4. waits until every producer has exited and the consumer has drained the topic (consumer group lag
   0), stops the consumer (SIGTERM: it commits and exits 0), then prints a summary table per
   department (API total, produced, stored, dead letters), the energy-label distribution, and the
   analytics report, whose rows per label must equal dpe_data's (else exit 4).

Exit codes (stable, for scripts):

0    every department finished and the counts reconcile (API total = produced + producer dead letters,
     produced = stored + consumer dead letters)
1    a producer or the consumer failed (non-zero exit, or the consumer did not drain in time), or the
     API is unreachable while KAFKA_BOOTSTRAP_SERVERS or DATABASE_URL is set (nothing started)
2    bad usage (bad department code, bad option)
4    everything ran, but the counts do not reconcile
130  interrupted (SIGINT / Ctrl-C, or SIGTERM): producers checkpointed, the consumer committed, every
     process started here is stopped
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

from dpe_ingest import departments, logs
from dpe_ingest.config import CONTRACT, DEFAULT_API_URL

log = logging.getLogger("dpe_ingest.run")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_MISMATCH, EXIT_INTERRUPTED = 0, 1, 2, 4, 130
PRODUCER_EXIT_MEANING = {0: "done", 1: "gave up after retries", 2: "bad configuration", 3: "API refused the request",
                         143: "stopped by SIGTERM, checkpoint saved"}

# The children run this: die with us (PR_SET_PDEATHSIG) even if we are SIGKILLed, then be ``dpe-ingest``.
_CHILD_BOOT = (
    "import os, signal, sys\n"
    "try:\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)\n"
    "from dpe_ingest.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


# ---------------------------------------------------------------------------------------------
# children
# ---------------------------------------------------------------------------------------------
@dataclass
class Child:
    name: str  # department code or "consumer"
    proc: subprocess.Popen
    relay: threading.Thread | None = None
    terminated_at: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def terminate(self) -> None:
        if self.proc.poll() is None and self.terminated_at is None:
            self.terminated_at = time.monotonic()
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass


class Relay:
    """Copies the children's output lines to our stderr, each prefixed with its source."""

    def __init__(self, out: IO[str], width: int):
        self.out, self.width, self.lock = out, width, threading.Lock()

    def start(self, name: str, stream: IO[bytes]) -> threading.Thread:
        prefix = f"{name:<{self.width}} | "

        def pump() -> None:
            for raw in iter(stream.readline, b""):
                line = raw.decode("utf-8", "replace").rstrip("\n")
                with self.lock:
                    try:
                        self.out.write(prefix + line + "\n")
                        self.out.flush()
                    except (OSError, ValueError):
                        pass
            stream.close()

        t = threading.Thread(target=pump, name=f"relay-{name}", daemon=True)
        t.start()
        return t


def spawn(name: str, args: list[str], env: dict[str, str], relay: Relay) -> Child:
    cmd = [sys.executable, "-c", _CHILD_BOOT, str(os.getpid()), *args]
    # own session: a Ctrl-C in the terminal reaches us only; we stop the children in order
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    child = Child(name, proc)
    child.relay = relay.start(name, proc.stdout)  # type: ignore[arg-type]
    return child


# ---------------------------------------------------------------------------------------------
# infrastructure: testbed servers, API
# ---------------------------------------------------------------------------------------------
class Infra:
    """Kafka, PostgreSQL and the API: started here when not given, stopped in :meth:`stop`."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.servers: Any = None  # dpe_devkit.testbed.LocalServers, in this process (dies with us)
        self.detached: subprocess.Popen | None = None  # ``dpe-ingest testbed up`` for --keep
        self.detached_dir: str | None = None
        self.standin: Any = None
        self.kafka_origin = self.db_origin = self.api_origin = "given"

    def start_testbed(self, keep: bool) -> None:
        need_kafka = not (self.env.get("KAFKA_BOOTSTRAP_SERVERS") or "").strip()
        need_pg = not (self.env.get("DATABASE_URL") or "").strip()
        if not (need_kafka or need_pg):
            return
        what = " and ".join(w for w, need in (("Kafka", need_kafka), ("PostgreSQL", need_pg)) if need)
        logs.event(log, "testbed", f"{'KAFKA_BOOTSTRAP_SERVERS' if need_kafka else 'DATABASE_URL'} not set: starting "
                   f"the testbed's {what} on 127.0.0.1" + (" (kept running after the run: --keep)" if keep else ""))
        if keep:
            got = self._start_detached()
        else:
            from .testbed import LocalServers

            self.servers = LocalServers(kafka=need_kafka, postgres=need_pg)
            self.servers.start()
            got = self.servers.env
        if need_kafka:
            self.env["KAFKA_BOOTSTRAP_SERVERS"] = got["KAFKA_BOOTSTRAP_SERVERS"]
            self.kafka_origin = "testbed"
        if need_pg:
            self.env["DATABASE_URL"] = got["DATABASE_URL"]
            self.db_origin = "testbed"

    def _start_detached(self, timeout_s: float = 300.0) -> dict[str, str]:
        """``dpe-ingest testbed up`` in its own session, not tied to us: it outlives the run (--keep)."""
        import tempfile

        self.detached_dir = tempfile.mkdtemp(prefix="dpe-run-testbed-")
        out = os.path.join(self.detached_dir, "testbed.env")
        with open(out, "wb") as fo, open(os.path.join(self.detached_dir, "testbed.log"), "wb") as fe:
            self.detached = subprocess.Popen(
                [sys.executable, "-m", "dpe_ingest", "testbed", "up", "--no-standin",
                 "--workdir", os.path.join(self.detached_dir, "data")],
                stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, start_new_session=True, env=self.env)
        deadline = time.monotonic() + timeout_s
        while True:
            got = {}
            with open(out) as fh:
                for line in fh:
                    if line.startswith("export ") and "=" in line:
                        k, v = line[len("export "):].strip().split("=", 1)
                        got[k] = v.strip("'\"")
            if "KAFKA_BOOTSTRAP_SERVERS" in got and "DATABASE_URL" in got:
                return got
            if self.detached.poll() is not None or time.monotonic() > deadline:
                self._stop_detached()
                raise RuntimeError(f"dpe-ingest testbed up did not come up; see {self.detached_dir}/testbed.log")
            time.sleep(0.5)

    def _stop_detached(self) -> None:
        if self.detached is not None and self.detached.poll() is None:
            self.detached.terminate()
            try:
                self.detached.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.detached.kill()
                self.detached.wait()

    def given_servers(self) -> list[str]:
        """The variables naming a Kafka or PostgreSQL of the user's (the run does not own them)."""
        return [k for k in ("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL") if (self.env.get(k) or "").strip()]

    def choose_api(self, use_standin: bool, probe_timeout_s: float, dataset_args: dict) -> bool:
        """The API the producers read; False (nothing started) when the real one is unreachable and the
        run writes to servers of the user's: the stand-in's synthetic rows never go there unasked."""
        url = (self.env.get("ADEME_API_URL") or "").strip() or DEFAULT_API_URL
        if not use_standin:
            reason = probe(url, probe_timeout_s)
            if reason is None:
                logs.event(log, "api", f"using the ADEME API at {url}", api=url)
                self.env["ADEME_API_URL"] = url
                return True
            given = self.given_servers()
            if given:
                logs.event(log, "api_unreachable", f"the ADEME API at {url} is unreachable ({reason}); "
                           f"{' and '.join(given)} point at your own servers, so the run does not fill them with "
                           "the stand-in's synthetic rows: nothing was started. Check the API (ADEME_API_URL), "
                           "or pass --standin to run on synthetic data on purpose", logging.ERROR, api=url,
                           reason=reason)
                return False
            logs.event(log, "api_unreachable", f"the ADEME API at {url} is unreachable ({reason}): using the "
                       "local stand-in instead (synthetic data, into the testbed's Kafka and PostgreSQL)",
                       logging.WARNING, api=url, reason=reason)
        from dpe_ingest.standin import Dataset, StandinServer

        self.standin = StandinServer(Dataset(**dataset_args)).start()
        self.env["ADEME_API_URL"] = self.standin.url
        self.api_origin = "stand-in"
        logs.event(log, "standin", f"local stand-in of the ADEME API at {self.standin.url} "
                   f"({dataset_args['rows_per_department']} rows per department, malformed rate "
                   f"{dataset_args['malformed_rate']})", api=self.standin.url, **dataset_args)
        return True

    def stop(self, keep: bool) -> None:
        if self.standin is not None:
            self.standin.stop()
            self.standin = None
        if self.servers is not None:
            try:
                self.servers.stop()
            except Exception as exc:  # noqa: BLE001
                logs.event(log, "testbed_stop_failed", f"stopping the testbed: {exc}", logging.WARNING)
            self.servers = None
        if self.detached is not None:
            if keep and self.detached.poll() is None:
                print(f"# --keep: the testbed is still running (pid {self.detached.pid}, data and logs in "
                      f"{self.detached_dir}); to use it, then stop it:\n"
                      f"export KAFKA_BOOTSTRAP_SERVERS={self.env.get('KAFKA_BOOTSTRAP_SERVERS')}\n"
                      f"export DATABASE_URL='{self.env.get('DATABASE_URL')}'\n"
                      f"kill {self.detached.pid}", file=sys.stderr, flush=True)
            else:
                self._stop_detached()
            self.detached = None


def probe(url: str, timeout_s: float) -> str | None:
    """None when the dataset URL answers 2xx within ``timeout_s``, else why not."""
    import requests

    try:
        resp = requests.get(url, timeout=timeout_s, headers={"Accept": "application/json"})
    except requests.RequestException as exc:
        return type(exc).__name__
    if not resp.ok:
        return f"HTTP {resp.status_code}"
    return None


# ---------------------------------------------------------------------------------------------
# the summary
# ---------------------------------------------------------------------------------------------
@dataclass
class Line:
    department: str
    api_total: int | None
    produced: int | None
    stored: int | None
    dead: int | None
    producer_dead: int | None
    consumer_dead: int
    producer_exit: int | None
    problems: list[str] = field(default_factory=list)


def reconcile(status, deps: list[str], exits: dict[str, int | None]) -> list[Line]:
    """One summary line per department, with the reasons it does not reconcile (if any)."""
    out = []
    for code in deps:
        v = status.department(code)
        consumer_dead = (v.dead_by_stage or {}).get("consumer", 0)
        dead = v.dead_letters if v.dead_letters is not None else v.producer_dead
        line = Line(code, v.api_total, v.produced, v.stored, dead, v.producer_dead, consumer_dead, exits.get(code))
        rc = exits.get(code)
        if rc not in (0, None):
            line.problems.append(f"producer exit {rc} ({PRODUCER_EXIT_MEANING.get(rc, 'failed')})")
        if v.producer_done is not True:
            line.problems.append("not finished")
        elif v.produced is None or v.stored is None:
            line.problems.append("counts unavailable")
        else:
            if v.api_total is not None and v.producer_dead is not None and v.api_total != v.produced + v.producer_dead:
                line.problems.append(f"API total {v.api_total} != produced {v.produced} + dead {v.producer_dead}")
            if v.stored + consumer_dead != v.produced:
                extra = f" + consumer dead {consumer_dead}" if consumer_dead else ""
                line.problems.append(f"stored {v.stored}{extra} != produced {v.produced}")
        out.append(line)
    return out


def _n(v: int | None) -> str:
    return "-" if v is None else str(v)


def render_summary(lines: list[Line], labels: dict[str, int] | None, header: str, result: str) -> str:
    rows = [["department", "API total", "produced", "stored", "dead letters", "check"]]
    for ln in lines:
        rows.append([ln.department, _n(ln.api_total), _n(ln.produced), _n(ln.stored), _n(ln.dead),
                     "ok" if not ln.problems else "; ".join(ln.problems)])

    def tot(attr: str) -> str:
        vals = [getattr(ln, attr) for ln in lines]
        return "-" if any(v is None for v in vals) else str(sum(vals))

    rows.append(["total", tot("api_total"), tot("produced"), tot("stored"), tot("dead"), ""])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    out = [header, ""]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [r[i].rjust(widths[i]) for i in range(1, 5)] + [r[5]]
        out.append("  ".join(cells).rstrip())
    out.append("")
    if labels is None:
        out.append("energy labels: unavailable (database not readable)")
    else:
        total = sum(labels.values())
        out.append(f"energy labels (etiquette_dpe) of the {total} stored rows of {', '.join(ln.department for ln in lines)}:")
        keys = list("ABCDEFG") + sorted(k for k in labels if k not in "ABCDEFG")
        w = max([len(str(labels.get(k, 0))) for k in keys] + [1])
        for k in keys:
            n = labels.get(k, 0)
            if k not in "ABCDEFG" and not n:
                continue
            pct = 100.0 * n / total if total else 0.0
            out.append(f"  {k:<4} {n:>{w}}  {pct:5.1f}%  " + "#" * int(round(pct / 2)))
    out.append("")
    out.append(result)
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
class Stop:
    """SIGINT/SIGTERM: the first asks for a clean stop, the second kills what is still running."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.count = 0
        self.signame = ""

    def __call__(self, signum, _frame) -> None:
        self.count += 1
        self.signame = signal.Signals(signum).name
        if self.count == 1:
            logs.event(log, "interrupt", f"{self.signame}: stopping the producers (they checkpoint), the consumer "
                       "(it commits) and the servers", logging.WARNING, signal=self.signame)
        else:
            logs.event(log, "interrupt", f"second {self.signame}: killing what is still running", logging.WARNING)
        self.event.set()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpe-ingest run",
        description="Run the whole pipeline locally as processes (no Kubernetes): Kafka and PostgreSQL from the "
        "testbed unless KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are set, one producer per department, one consumer; "
        "then print a summary per department. Other settings come from the environment (docs/configuration.md).",
        epilog="exit codes: 0 counts match; 1 a producer or the consumer failed, or the API is unreachable with "
        "your own Kafka/PostgreSQL; 2 bad usage; 4 counts do not reconcile; 130 interrupted. See "
        "docs/run-and-status.md.")
    p.add_argument("departments", nargs="*", default=["69"],
                   help=f"department codes ({departments.VALID_FORMS}); default 69")
    p.add_argument("--standin", action="store_true",
                   help="use the local stand-in of the ADEME API (default: only when the real API is unreachable "
                   "and KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL are not set; with them that is an error)")
    p.add_argument("--rows-per-department", type=int, default=2000, metavar="N",
                   help="stand-in: rows per department (default 2000)")
    p.add_argument("--malformed-rate", type=float, default=0.0, metavar="RATE",
                   help="stand-in: share of malformed rows, 0..1 (default 0): they become dead letters")
    p.add_argument("--seed", type=int, default=1, help="stand-in: dataset seed (default 1)")
    p.add_argument("--page-size", type=int, metavar="N",
                   help=f"rows per API call, 1..10000 (default $ADEME_PAGE_SIZE or {CONTRACT['ADEME_PAGE_SIZE'][0]})")
    p.add_argument("--restart", action="store_true",
                   help="fetch departments again even if their checkpoint says done (PRODUCER_RESTART=true)")
    p.add_argument("--keep", action="store_true",
                   help="leave the testbed's Kafka and PostgreSQL running at the end (prints how to reach them)")
    p.add_argument("--probe-timeout", type=float, default=3.0, metavar="SECONDS",
                   help="how long to wait for the real API before using the stand-in (default 3)")
    p.add_argument("--drain-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="after the producers, how long the consumer may take to drain the topic (default 600)")
    p.add_argument("--quiet", action="store_true", help="do not relay the producers' and consumer's log lines")
    return p


def parse_args(argv: list[str]) -> tuple[argparse.Namespace | None, list[str], str | None]:
    """(args, departments, error).  Never raises for bad input; the error is a sentence."""
    p = build_parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:
        return None, [], "" if exc.code == 0 else "bad usage"
    try:
        deps = departments.parse_list(" ".join(str(d) for d in args.departments))
    except departments.InvalidDepartment as exc:
        return args, [], str(exc)
    if args.rows_per_department < 0:
        return args, deps, "--rows-per-department must be >= 0"
    if not 0.0 <= args.malformed_rate <= 1.0:
        return args, deps, "--malformed-rate must be between 0 and 1"
    if args.page_size is not None and not 1 <= args.page_size <= 10000:
        return args, deps, "--page-size must be between 1 and 10000"
    if args.probe_timeout <= 0 or args.drain_timeout <= 0:
        return args, deps, "--probe-timeout and --drain-timeout must be > 0"
    return args, deps, None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, deps, error = parse_args(argv)
    if args is None:
        return EXIT_OK if error == "" else EXIT_USAGE
    if error:
        print(f"dpe-ingest run: {error}", file=sys.stderr)
        return EXIT_USAGE
    logs.setup()
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    if args.page_size is not None:
        env["ADEME_PAGE_SIZE"] = str(args.page_size)
    if args.restart:
        env["PRODUCER_RESTART"] = "true"
    from dpe_ingest.config import ConfigError, ConsumerConfig, ProducerConfig

    try:  # check the whole environment before starting anything
        probe_env = {**env, "KAFKA_BOOTSTRAP_SERVERS": env.get("KAFKA_BOOTSTRAP_SERVERS") or "127.0.0.1:1",
                     "DEPARTMENT": deps[0]}
        ProducerConfig.from_env(probe_env)
        ConsumerConfig.from_env(probe_env)
    except ConfigError as exc:
        print(f"dpe-ingest run: {exc}", file=sys.stderr)
        return EXIT_USAGE

    stop = Stop()
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    infra = Infra(env)
    try:
        return Run(args, deps, env, infra, stop).execute()
    finally:
        infra.stop(keep=args.keep)
        for s, h in old.items():
            signal.signal(s, h)


class Run:
    def __init__(self, args: argparse.Namespace, deps: list[str], env: dict[str, str], infra: Infra, stop: Stop):
        self.args, self.deps, self.env, self.infra, self.stop = args, deps, env, infra, stop
        self.children: list[Child] = []
        self.consumer: Child | None = None
        self.producers: dict[str, Child] = {}
        self.exits: dict[str, int | None] = {d: None for d in deps}
        self.analytics: Child | None = None  # dpe-ingest analytics: the second consumer group
        self.relay = Relay(sys.stderr, max([len("analytics")] + [len(d) for d in deps]))
        self.out = sys.stdout
        self.t0 = time.monotonic()

    # -- lifecycle -----------------------------------------------------------------------------
    def execute(self) -> int:
        a = self.args
        # the API first: whether the stand-in may stand in depends on whose servers these are
        if not self.infra.choose_api(a.standin, a.probe_timeout, {"rows_per_department": a.rows_per_department,
                                                                  "seed": a.seed, "malformed_rate": a.malformed_rate,
                                                                  # department none: the rows without one
                                                                  "rows_without_department": a.rows_per_department}):
            return EXIT_FAILED
        try:
            self.infra.start_testbed(keep=a.keep)
        except Exception as exc:  # noqa: BLE001
            logs.event(log, "testbed_failed", f"could not start the testbed: {exc}", logging.ERROR)
            return EXIT_FAILED
        if self.stop.event.is_set():
            return self.interrupted()
        logs.event(log, "start", f"running {len(self.deps)} department(s) {', '.join(self.deps)}: Kafka "
                   f"{self.env['KAFKA_BOOTSTRAP_SERVERS']} ({self.infra.kafka_origin}), PostgreSQL "
                   f"({self.infra.db_origin}), API {self.env['ADEME_API_URL']} ({self.infra.api_origin})",
                   departments=",".join(self.deps), bootstrap=self.env["KAFKA_BOOTSTRAP_SERVERS"],
                   api=self.env["ADEME_API_URL"])
        try:
            return self._pipeline()
        finally:
            self._stop_children(timeout_s=60.0)

    def _spawn(self, name: str, args: list[str], extra: dict[str, str]) -> Child:
        relay = self.relay if not self.args.quiet else Relay(open(os.devnull, "w"), 1)
        child = spawn(name, args, {**self.env, **extra}, relay)
        self.children.append(child)
        logs.event(log, "spawned", f"{name}: dpe-ingest {' '.join(args)} (pid {child.pid})", child=name,
                   pid=child.pid)
        return child

    def _pipeline(self) -> int:
        self.consumer = self._spawn("consumer", ["consume"], {})
        self.analytics = self._spawn("analytics", ["analytics"], {})
        for dep in self.deps:
            self.producers[dep] = self._spawn(dep, ["produce"], {"DEPARTMENT": dep})
        from dpe_ingest.status_sources import Collector, Settings

        settings = Settings.from_env(self.env, kube=False, timeout_s=10.0)
        collector = Collector(settings)
        try:
            drained_at = None
            producers_done_at = None
            last_note = 0.0
            while drained_at is None:
                if self.stop.event.wait(1.0):
                    return self.interrupted(collector)
                for dep, child in self.producers.items():
                    rc = child.poll()
                    if rc is not None and self.exits[dep] is None:
                        self.exits[dep] = rc
                        level = logging.INFO if rc == 0 else logging.ERROR
                        logs.event(log, "producer_exit", f"producer {dep} exited with {rc} "
                                   f"({PRODUCER_EXIT_MEANING.get(rc, 'failed')})", level, department=dep,
                                   exit_code=rc)
                rc = self.analytics.poll()
                if rc is not None:
                    logs.event(log, "analytics_exit", f"the analytics consumer exited early with {rc}", logging.ERROR,
                               exit_code=rc)
                    return self.finish(collector, EXIT_FAILED, f"the analytics consumer exited with {rc}")
                rc = self.consumer.poll()
                if rc is not None:
                    logs.event(log, "consumer_exit", f"the consumer exited early with {rc}", logging.ERROR,
                               exit_code=rc)
                    return self.finish(collector, EXIT_FAILED, f"the consumer exited with {rc} before draining")
                if any(v is None for v in self.exits.values()):
                    continue
                if producers_done_at is None:
                    producers_done_at = time.monotonic()
                    logs.event(log, "producers_done", "every producer has exited; waiting for the consumer to "
                               "drain the topic")
                src, lag = collector.read_lag()
                asrc, alag = collector.read_lag(settings.analytics_group)
                if not (asrc.ok and alag is not None and alag.total == 0):
                    src, lag = asrc, alag  # drained means both groups: the sink and the analytics
                if src.ok and lag is not None and lag.total == 0:
                    drained_at = time.monotonic()
                elif time.monotonic() - producers_done_at > self.args.drain_timeout:
                    why = src.error if not src.ok else f"lag {lag.total if lag else '?'}"
                    return self.finish(collector, EXIT_FAILED, f"the consumer did not drain the topic in "
                                       f"{self.args.drain_timeout:.0f}s ({why})")
                elif time.monotonic() - last_note > 15:
                    last_note = time.monotonic()
                    logs.event(log, "draining", f"consumer lag {lag.total if lag else '?'}",
                               lag=lag.total if lag else None)
            # drained: stop the consumer cleanly (it commits and exits 0), and the analytics consumer
            self.analytics.terminate()
            if _wait(self.analytics, 60.0) != 0:
                return self.finish(collector, EXIT_FAILED, "the analytics consumer did not stop cleanly")
            self.consumer.terminate()
            rc = _wait(self.consumer, 60.0)
            if rc != 0:
                return self.finish(collector, EXIT_FAILED, f"the consumer exited with {rc} when stopped")
            failed = [d for d, rc in self.exits.items() if rc != 0]
            if failed:
                return self.finish(collector, EXIT_FAILED, f"producer failed for {', '.join(failed)}")
            return self.finish(collector, None, "")
        finally:
            collector.close()

    def finish(self, collector, code: int | None, why: str) -> int:
        """Print the summary; ``code`` None means "decide by reconciliation"."""
        self._stop_children(timeout_s=60.0)
        status = collector.collect(only=self.deps)
        lines = reconcile(status, self.deps, self.exits)
        analytics_text, disagree = self.analytics_summary(status)
        if code is None:
            bad = [ln.department for ln in lines if ln.problems]
            if bad:
                code, why = EXIT_MISMATCH, f"counts do not reconcile for {', '.join(bad)}"
            elif disagree:
                code, why = EXIT_MISMATCH, disagree
            else:
                code = EXIT_OK
        if code == EXIT_OK:
            result = "result: ok, every row announced by the API is stored or dead-lettered (exit 0)"
        else:
            result = f"result: {why} (exit {code})"
        labels = None
        if status.source_ok("database"):
            labels = {}
            for dep in self.deps:
                for k, n in status.labels.get(dep, {}).items():
                    labels[k] = labels.get(k, 0) + n
        header = (f"dpe-ingest run: {len(self.deps)} department(s) in {logs.human_duration(time.monotonic() - self.t0)}"
                  f", API {self.env.get('ADEME_API_URL')} ({self.infra.api_origin})")
        from dpe_ingest.status import api_without_department

        without = api_without_department(status)
        if without is not None:  # as a producer read it from the API: what department none fetches
            result = (f"rows without a department in the API: {without['count']} (department none fetches them)\n"
                      + result)
        self.out.write(render_summary(lines, labels, header, analytics_text + result))
        self.out.flush()
        logs.event(log, "finished", result.removeprefix("result: "), exit_code=code)
        return code

    def analytics_summary(self, status) -> tuple[str, str | None]:
        """The analytics report of the departments run, and whether its counts per label agree with
        ``dpe_data`` (a sentence when they do not)."""
        from dpe_ingest.analytics import report
        from dpe_ingest.analytics_report import LABELS, UNKNOWN, Report
        from dpe_ingest.config import AnalyticsConfig

        try:
            cfg = AnalyticsConfig.from_env(self.env)
            full = report(cfg)
        except Exception as exc:  # noqa: BLE001
            return f"analytics: unavailable ({exc})\n\n", f"analytics unreadable: {exc}"
        rep = Report(labels={d: v for d, v in full.labels.items() if d in self.deps},
                     months={d: v for d, v in full.months.items() if d in self.deps},
                     latest={d: v for d, v in full.latest.items() if d in self.deps}, skipped=full.skipped)
        text = f"analytics (consumer group {cfg.group}, tables {cfg.table_prefix}_*):\n" + rep.render()
        if not status.source_ok("database"):
            return text + "\n", None
        differ = []
        for dep in self.deps:
            stored: dict[str, int] = {}
            for k, n in status.labels.get(dep, {}).items():
                key = k if k in LABELS else UNKNOWN
                stored[key] = stored.get(key, 0) + n
            counted = {k: n for k, n in rep.labels.get(dep, {}).items() if n}
            if stored != counted:
                differ.append(dep)
        if differ:
            text += f"analytics vs dpe_data: rows per label DIFFER for {', '.join(differ)}\n\n"
            return text, f"analytics counts differ from dpe_data for {', '.join(differ)}"
        return text + "analytics vs dpe_data: rows per label agree for every department\n\n", None

    def interrupted(self, collector=None) -> int:
        self._stop_children(timeout_s=60.0)
        for dep, child in self.producers.items():
            self.exits[dep] = child.poll()
        if collector is not None:
            try:
                status = collector.collect(only=self.deps)
                lines = reconcile(status, self.deps, self.exits)
                self.out.write(render_summary(lines, None, "dpe-ingest run: interrupted, where it stopped:",
                                              f"result: interrupted by {self.stop.signame} (exit 130); run it "
                                              "again to resume from the checkpoints"))
                self.out.flush()
            except Exception as exc:  # noqa: BLE001
                logs.event(log, "summary_failed", f"no summary: {exc}", logging.WARNING)
        logs.event(log, "finished", f"interrupted by {self.stop.signame}", exit_code=EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED

    def _stop_children(self, timeout_s: float) -> None:
        """SIGTERM every child still running (producers checkpoint, the consumer commits), wait, then
        SIGKILL what is left (or at once on a second signal)."""
        live = [c for c in self.children if c.poll() is None]
        for c in live:
            c.terminate()
        deadline = time.monotonic() + timeout_s
        while any(c.poll() is None for c in live):
            if time.monotonic() > deadline or self.stop.count >= 2:
                for c in live:
                    if c.poll() is None:
                        logs.event(log, "killed", f"{c.name} (pid {c.pid}) did not stop: killing it",
                                   logging.WARNING, child=c.name, pid=c.pid)
                        c.kill()
                break
            time.sleep(0.1)
        for c in self.children:
            try:
                c.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                c.kill()
                c.proc.wait()
            if c.relay is not None:
                c.relay.join(timeout=5)
        for c in live:
            rc = c.poll()
            logs.event(log, "stopped", f"{c.name} stopped (exit {rc})", child=c.name, exit_code=rc)


def _wait(child: Child, timeout_s: float) -> int | None:
    try:
        return child.proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.proc.wait()
        return None
