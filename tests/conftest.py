"""Session fixtures: the testbed's real servers, started lazily and stopped at the end.

- ``kafka_bootstrap`` (str): $KAFKA_BOOTSTRAP_SERVERS (your own Kafka) or a session KafkaBroker.
- ``database_url`` (str): $DATABASE_URL (your own PostgreSQL) or a session PostgresServer.
- ``kafka_broker_factory`` / ``postgres_factory``: ``factory()`` starts a PRIVATE server (always the
  bench's, never yours) that the test may kill/restart; stopped when the test ends.
- ``standin_factory``: ``factory(dataset=None, faults=None, **kw)`` starts an ADEME stand-in.
- ``helm_bin`` (Path): helm v3.22.0 ($HELM or the cache's, built when missing).
- ``kubeconfig`` (Path): admin kubeconfig of a real API server: $DPE_TEST_KUBECONFIG (your cluster)
  or a session kube-apiserver v1.37.2 + etcd (no kubelet: objects are validated and admitted, no
  pod ever runs).
- ``unique_name``: ``unique_name("prefix")`` -> ``prefix_1a2b3c4d``, a fresh name valid as a topic,
  a consumer group and a table name.

A server that cannot start makes the test FAIL (with the reason and the server's log), never skip.
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

import hypothesis_profiles
from dpe_devkit.testbed import LaunchError, KafkaBroker, PostgresServer, ensure_helm
from dpe_devkit.testbed.kafka import KAFKA_VERSION

PROPERTY_PROFILES = hypothesis_profiles  # registers the "ci" (default) and "fuzz" profiles of the property tests

_started: list[object] = []  # every server started in this session (safety net at exit)
_timings: list[str] = []


def _env(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def pytest_configure(config):
    # SIGTERM (CI timeouts, `kill`) becomes a KeyboardInterrupt: pytest then runs the fixture
    # teardowns and every server is stopped cleanly (the parent-death signal covers SIGKILL).
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        def _term(signum, frame):
            raise KeyboardInterrupt(f"signal {signum}")
        signal.signal(signal.SIGTERM, _term)


def pytest_report_header(config):
    kafka = f"KAFKA_BOOTSTRAP_SERVERS={_env('KAFKA_BOOTSTRAP_SERVERS')} (yours)" if _env("KAFKA_BOOTSTRAP_SERVERS") \
        else f"testbed Kafka {KAFKA_VERSION} (started on first use)"
    pg = "DATABASE_URL (yours)" if _env("DATABASE_URL") else "testbed PostgreSQL (started on first use)"
    kube = "DPE_TEST_KUBECONFIG (yours)" if _env("DPE_TEST_KUBECONFIG") else \
        "testbed kube-apiserver (started on first use)"
    return f"testbed: {kafka}; {pg}; {kube}"


def pytest_terminal_summary(terminalreporter):
    if _timings:
        terminalreporter.write_line("testbed: " + "; ".join(_timings))


def pytest_unconfigure(config):
    for server in reversed(_started):  # normally already stopped by the fixtures
        try:
            (getattr(server, "cleanup", None) or server.stop)()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


def _start(server, what: str):
    _started.append(server)
    t0 = time.monotonic()
    try:
        server.start()
    except LaunchError as exc:
        pytest.fail(f"could not start the testbed's {what}: {exc}", pytrace=False)
    _timings.append(f"{what} started in {time.monotonic() - t0:.1f}s")
    return server


def _stop(server) -> None:
    (getattr(server, "cleanup", None) or server.stop)()
    if server in _started:
        _started.remove(server)


# -------------------------------------------------------------------------------------------------
# Session servers (or the user's own)
# -------------------------------------------------------------------------------------------------
def _session_server(tmp_path_factory, env_name: str, make, what: str, value, user_value=str):
    """Fixture body: the user's own server when ``env_name`` is set, else one the bench starts."""
    user = _env(env_name)
    if user:
        yield user_value(user)
        return
    server = _start(make(tmp_path_factory.mktemp(what.lower().replace(" ", "-"))), what)
    try:
        yield value(server)
    finally:
        _stop(server)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory) -> str:
    yield from _session_server(tmp_path_factory, "KAFKA_BOOTSTRAP_SERVERS", KafkaBroker, "Kafka broker",
                               lambda broker: broker.bootstrap)


@pytest.fixture(scope="session")
def database_url(tmp_path_factory) -> str:
    yield from _session_server(tmp_path_factory, "DATABASE_URL", PostgresServer, "PostgreSQL",
                               lambda server: server.url)


@pytest.fixture
def table(database_url):
    """A fresh table name in the session's database; the table (and the analytics tables a store may
    have made with it as their prefix) dropped afterwards."""
    import psycopg2

    name = f"dpe_t_{uuid.uuid4().hex[:10]}"
    yield name
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        for suffix in ("", "_keys", "_labels", "_months", "_skipped", "_offsets"):
            cur.execute(f'DROP TABLE IF EXISTS "{name}{suffix}"')


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory) -> Path:
    """Admin kubeconfig of a real Kubernetes API server: the testbed's kube-apiserver + etcd, or the
    cluster of DPE_TEST_KUBECONFIG (tests create and delete namespaces ``t-…`` of their own there)."""
    from dpe_devkit.testbed.apiserver import KubeAPIServer

    yield from _session_server(tmp_path_factory, "DPE_TEST_KUBECONFIG", KubeAPIServer, "Kubernetes API server",
                               lambda server: server.kubeconfig, lambda user: Path(user).expanduser())


# -------------------------------------------------------------------------------------------------
# Private servers a test may kill and restart
# -------------------------------------------------------------------------------------------------
def _private_servers(tmp_path_factory, cls, dirname: str, what: str):
    """A factory fixture's body: ``factory(**kwargs)`` starts a new ``cls``; all are stopped after the test."""
    servers = []

    def factory(**kwargs):
        server = cls(tmp_path_factory.mktemp(dirname), **kwargs)
        servers.append(server)
        return _start(server, what)

    yield factory
    for server in servers:
        _stop(server)


@pytest.fixture
def kafka_broker_factory(tmp_path_factory):
    """``factory(**kwargs) -> KafkaBroker`` started (kwargs: port, controller_port, heap)."""
    yield from _private_servers(tmp_path_factory, KafkaBroker, "kafka-private", "private Kafka broker")


@pytest.fixture
def postgres_factory(tmp_path_factory):
    """``factory(**kwargs) -> PostgresServer`` started (kwargs: port)."""
    yield from _private_servers(tmp_path_factory, PostgresServer, "postgres-private", "private PostgreSQL")


@pytest.fixture
def standin_factory():
    """``factory(dataset=None, faults=None, **kwargs) -> StandinServer`` started on a free port."""
    from dpe_ingest.standin.server import StandinServer

    servers = []

    def factory(dataset=None, faults=None, **kwargs):
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("port", 0)
        server = StandinServer(dataset=dataset, faults=faults, **kwargs)
        servers.append(server)
        return server.start()

    yield factory
    for server in servers:
        server.stop()


# -------------------------------------------------------------------------------------------------
# Tools and names
# -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def helm_bin() -> Path:
    try:
        return ensure_helm()
    except LaunchError as exc:
        pytest.fail(f"no helm binary: {exc}", pytrace=False)


@pytest.fixture
def unique_name():
    """``unique_name(prefix)``: a new lowercase name, valid as Kafka topic, group and SQL table."""

    def make(prefix: str = "t") -> str:
        clean = re.sub(r"[^a-z0-9_]", "_", prefix.lower()) or "t"
        if clean[0].isdigit():
            clean = "t" + clean
        return f"{clean}_{uuid.uuid4().hex[:8]}"

    return make
