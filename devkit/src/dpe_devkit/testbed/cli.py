"""``dpe-ingest testbed``: the local servers from the command line.

    dpe-ingest testbed up      start Kafka, PostgreSQL and the ADEME stand-in in the foreground, print
                             the export lines, stop everything on Ctrl-C / SIGTERM
    dpe-ingest testbed fetch   download/build everything into the cache (Kafka jars, storage and
                             PostgreSQL templates, helm, kube-apiserver + etcd), e.g. to warm up CI;
                             no server is left running
    dpe-ingest testbed cluster up
                             the test cluster (a real single-node Kubernetes, the images loaded) in
                             the foreground: prints the KUBECONFIG to export and how to install the
                             chart, tears everything down on Ctrl-C / SIGTERM (root)
    dpe-ingest testbed cluster load
                             rebuild the images that changed and load them into the running cluster
"""

from __future__ import annotations

import argparse
import shutil
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
    cluster = sub.add_parser("cluster", help="the test cluster by hand: up (foreground), load (images)")
    csub = cluster.add_subparsers(dest="cluster_action", metavar="ACTION", required=True)
    cup = csub.add_parser("up", help="start the test cluster, print the KUBECONFIG, stop it on Ctrl-C")
    cup.add_argument("--workdir", type=Path, help="the cluster's files here (default: a temp dir, deleted at exit)")
    cload = csub.add_parser("load", help="rebuild the images that changed and load them into the running cluster")
    cload.add_argument("--workdir", type=Path, help="the work directory of the cluster (default: the one running)")
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


def _cluster_howto(cluster, root: Path | None) -> str:
    """What a contributor pastes and runs against ``cluster``: export lines, then commands (comments)."""
    from .images import CLUSTER_IMAGES

    kubectl = cluster.bin["kubectl"]
    lines = [f"export KUBECONFIG={cluster.kubeconfig}",
             f"export PATH={kubectl.parent}:$PATH   # the cluster's kubectl and the tests' helm",
             "#",
             "# kubectl get nodes",
             f"# the images are in the node already: {', '.join(sorted(set(CLUSTER_IMAGES.values())))}",
             "# (nothing can be pulled: imagePullPolicy Never/IfNotPresent). After changing the code or a",
             "# Dockerfile: dpe-ingest testbed cluster load   (rebuilds what changed, loads it into the node)"]
    chart = "charts/dpe-ingest"
    if root is not None:
        lines += ["# the chart, as the cluster tests install it (the in-cluster ADEME stand-in, the test images):",
                  f"# cd {root}",
                  f"# helm install dpe {chart} -f {chart}/values-offline.yaml -f tests/cluster/values-test-cluster.yaml "
                  '--set departments="{69,01,38}"',
                  "# kubectl logs -f -l app.kubernetes.io/component=producer --prefix"]
    return "\n".join(lines)


def _running_cluster_workdir() -> Path:
    """The work directory of the test cluster running on this machine (its record in REGISTRY)."""
    import json

    from ._proc import LaunchError
    from .cluster import REGISTRY, _alive

    found = []
    for record in sorted(REGISTRY.glob("dpe-*.json")):
        try:
            info = json.loads(record.read_text())
            if _alive(int(info["pid"])):
                found.append(Path(info["workdir"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if len(found) != 1:
        raise LaunchError(f"{len(found)} test clusters are running here ({', '.join(map(str, found)) or 'none'}): "
                          "start one with dpe-ingest testbed cluster up, or name it with --workdir")
    return found[0]


def _cluster_load(args: argparse.Namespace) -> int:
    from ._proc import LaunchError
    from .cluster import Cluster
    from .gobuild import ensure
    from .images import ensure_cluster_images, tarball_tags

    workdir = (args.workdir or _running_cluster_workdir()).resolve()
    cluster = Cluster(workdir, quiet=False)
    if not cluster.containerd_sock.exists():
        raise LaunchError(f"no running test cluster in {workdir} (no {cluster.containerd_sock})")
    cluster.bin.update(ensure("containerd", True))
    tar = ensure_cluster_images(quiet=False)
    t0 = time.monotonic()
    cluster._ctr("images", "import", "--no-unpack=false", str(tar), timeout=600)
    print(f"testbed cluster: loaded {', '.join(tarball_tags(tar))} into {workdir} in {time.monotonic() - t0:.0f}s; "
          "pods pick a new image up when they are re-created (kubectl rollout restart, or a new Job)",
          file=sys.stderr, flush=True)
    return 0


def _cluster_up(args: argparse.Namespace) -> int:
    """Start the test cluster, print how to use it, wait for Ctrl-C / SIGTERM / SIGHUP, tear down."""
    from ._proc import repo_root
    from .cluster import Cluster, _mountpoints

    stop = threading.Event()
    started = threading.Event()

    def _on_signal(signum, _frame):
        if not started.is_set():
            raise KeyboardInterrupt  # during the start: Cluster.start undoes what it did, then stops
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    own = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="dpe-cluster-")) if own else args.workdir
    cluster = Cluster(workdir, quiet=False)
    print(f"testbed cluster: starting a single-node Kubernetes in {cluster.workdir} (log {cluster.log_path})",
          file=sys.stderr, flush=True)
    rc = 0
    try:
        try:
            cluster.start()
        except KeyboardInterrupt:
            print("testbed cluster: interrupted while starting; what was started is stopped", file=sys.stderr,
                  flush=True)
            return 130
        started.set()
        print(f"testbed cluster: up in {cluster.timings.get('total', 0):.0f}s, network namespace {cluster.netns} "
              f"(no route out of the machine), API {cluster.url}; paste these lines in another shell, "
              "Ctrl-C here to stop and remove everything:", file=sys.stderr, flush=True)
        print(_cluster_howto(cluster, repo_root()), flush=True)
        while not stop.wait(1.0):
            dead = [name for name, proc in cluster.procs.items() if proc.poll() is not None]
            if dead:
                print(f"testbed cluster: {', '.join(dead)} exited unexpectedly; logs in {cluster.workdir / 'logs'}",
                      file=sys.stderr, flush=True)
                rc = 1
                break
    finally:
        if started.is_set():
            print("testbed cluster: stopping", file=sys.stderr, flush=True)
            cluster.stop()
        if own and not [m for m in _mountpoints() if m.startswith(str(cluster.workdir) + "/")]:
            shutil.rmtree(workdir, ignore_errors=True)  # (never through a mount stop() could not undo)
    print("testbed cluster: stopped, nothing left behind", file=sys.stderr, flush=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    from ._proc import LaunchError

    args = _parser().parse_args(argv)
    try:
        if args.action == "up":
            return _up(args)
        if args.action == "fetch":
            return _fetch(args.quiet, helm_too=not args.no_helm)
        if args.action == "cluster":
            return _cluster_up(args) if args.cluster_action == "up" else _cluster_load(args)
    except LaunchError as exc:
        print(f"dpe-ingest testbed: {exc}", file=sys.stderr)
        return 1
    _parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
