"""``dpe-ingest testbed``: the local servers from the command line.

    dpe-ingest testbed up      start Kafka, PostgreSQL and the ADEME stand-in in the foreground, print
                             the export lines, stop everything on Ctrl-C / SIGTERM
    dpe-ingest testbed fetch   download/build everything into the cache (Kafka jars, storage and
                             PostgreSQL templates, helm, kube-apiserver + etcd), e.g. to warm up CI;
                             no server is left running
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpe-ingest testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", metavar="ACTION")
    up = sub.add_parser("up", help="start Kafka + PostgreSQL + the ADEME stand-in in the foreground")
    up.add_argument("--workdir", type=Path, help="data and logs here (default: a temp dir, deleted at exit)")
    up.add_argument("--kafka-port", type=int, help="Kafka port on 127.0.0.1 (default: a free one)")
    up.add_argument("--postgres-port", type=int, help="PostgreSQL port on 127.0.0.1 (default: a free one)")
    up.add_argument("--standin-port", type=int, default=0, help="stand-in port (default: a free one)")
    up.add_argument("--no-standin", action="store_true", help="do not start the ADEME stand-in")
    up.add_argument("--rows", type=int, default=1000, help="stand-in rows per department (default 1000)")
    up.add_argument("--seed", type=int, default=1, help="stand-in dataset seed (default 1)")
    fetch = sub.add_parser("fetch", help="fetch/build Kafka jars, templates, helm, kube-apiserver and etcd into the cache")
    fetch.add_argument("--quiet", action="store_true", help="one summary line when everything is cached")
    fetch.add_argument("--no-helm", action="store_true", help="skip helm, kube-apiserver and etcd (only the tests need them)")
    return p


def _fetch(quiet: bool = False, helm_too: bool = True) -> int:
    """Fetch/build every piece; each failure is reported, the others are still done; 1 if any failed."""
    from . import cache_dir
    from ._proc import LaunchError
    from .helm import HELM_VERSION, ensure_helm
    from .kafka import KAFKA_VERSION, KafkaBroker, _cds_archive, _storage_template, ensure_kafka_jars, find_java
    from .postgres import ensure_template, find_bindir, server_major

    t0 = time.monotonic()
    done: list[str] = []
    failed: list[str] = []

    def kafka() -> str:
        java, major = find_java()
        libs = ensure_kafka_jars()
        _storage_template(java, libs)
        if not _cds_archive(java).is_file():  # one broker run writes the class-data archive
            with tempfile.TemporaryDirectory(prefix="dpe-testbed-fetch-") as tmp:
                broker = KafkaBroker(Path(tmp))
                try:
                    broker.start()
                finally:
                    broker.stop()
        return f"Kafka {KAFKA_VERSION} jars in {libs} (Java {major}: {java})"

    def postgres() -> str:
        bindir = find_bindir()
        tpl = ensure_template(bindir)
        return f"PostgreSQL {server_major(bindir)} ({bindir}), template {tpl}"

    def helm() -> str:
        return f"helm {HELM_VERSION} at {ensure_helm()}"

    def kube() -> str:
        from .gobuild import BUILDS, ensure

        return ", ".join(f"{name} {BUILDS[name].version} ({len(ensure(name, quiet))} binaries)" for name in BUILDS)

    def actionlint() -> str:
        from .actionlint import ACTIONLINT_VERSION, ensure_actionlint

        return f"actionlint {ACTIONLINT_VERSION} at {ensure_actionlint(quiet)}"

    steps = [("kafka", kafka), ("postgres", postgres)] + (
        [("helm", helm), ("kube", kube), ("actionlint", actionlint)] if helm_too else [])
    for name, step in steps:
        try:
            line = step()
            done.append(line)
            if not quiet:
                print(f"testbed fetch: {line}", flush=True)
        except LaunchError as exc:
            failed.append(name)
            print(f"testbed fetch: {name} FAILED: {exc}", file=sys.stderr, flush=True)
    took = time.monotonic() - t0
    if failed:
        print(f"testbed fetch: failed: {', '.join(failed)} ({took:.1f}s)", file=sys.stderr, flush=True)
        return 1
    print(f"testbed fetch: cache {cache_dir()} ready ({took:.1f}s)", flush=True)
    return 0


def _up(args: argparse.Namespace) -> int:
    from . import LocalServers

    stop = threading.Event()

    def _on_signal(signum, _frame):
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    servers = LocalServers(args.workdir, standin=not args.no_standin, rows_per_department=args.rows, seed=args.seed,
                  kafka_port=args.kafka_port, postgres_port=args.postgres_port, standin_port=args.standin_port)
    print(f"testbed: starting PostgreSQL and Kafka (data and logs in {servers.workdir})", file=sys.stderr, flush=True)
    try:
        servers.start()
        t = servers.timings
        print(f"testbed: up (PostgreSQL {t.get('postgres', 0):.1f}s, Kafka {t.get('kafka', 0):.1f}s); "
              "paste these lines in another shell, Ctrl-C here to stop:", file=sys.stderr, flush=True)
        print(servers.exports(), flush=True)
        while not stop.wait(1.0):
            for name, server in (("Kafka", servers.kafka), ("PostgreSQL", servers.postgres)):
                if server is not None and not server.running:
                    print(f"testbed: {name} exited unexpectedly; log {server.log_path}", file=sys.stderr, flush=True)
                    return 1
    finally:
        print("testbed: stopping", file=sys.stderr, flush=True)
        servers.stop()
    print("testbed: stopped", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    from ._proc import LaunchError

    args = _parser().parse_args(argv)
    try:
        if args.action == "up":
            return _up(args)
        if args.action == "fetch":
            return _fetch(args.quiet, helm_too=not args.no_helm)
    except LaunchError as exc:
        print(f"dpe-ingest testbed: {exc}", file=sys.stderr)
        return 1
    _parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
