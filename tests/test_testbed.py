"""The testbed's servers are real: Kafka takes and serves messages, PostgreSQL stores rows, both keep
their data over a crash and a restart, helm is the pinned version."""

from __future__ import annotations

import subprocess
import time

import psycopg2
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic

from dpe_devkit.testbed import LocalServers
from dpe_devkit.testbed.helm import HELM_VERSION


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        admin.close()


def _produce(bootstrap: str, topic: str, n: int, tag: str) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for i in range(n):
            producer.send(topic, key=f"k{i}".encode(), value=f"{tag}-{i}".encode())
        producer.flush(60)
    finally:
        producer.close()


def _read_all(bootstrap: str, topic: str, expected: int, timeout_s: float = 60.0) -> list[bytes]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    try:
        parts = None
        deadline = time.monotonic() + timeout_s
        while parts is None and time.monotonic() < deadline:
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                time.sleep(0.2)
        assert parts, f"topic {topic} not found"
        consumer.assign([TopicPartition(topic, p) for p in parts])
        consumer.seek_to_beginning()
        values: list[bytes] = []
        while len(values) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                values += [r.value for r in records]
        return values
    finally:
        consumer.close()


@pytest.mark.kafka
def test_kafka_topic_with_partitions_produce_consume(kafka_bootstrap, unique_name):
    topic = unique_name("bench")
    _create_topic(kafka_bootstrap, topic, 4)
    _produce(kafka_bootstrap, topic, 200, "a")

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
    try:
        assert consumer.partitions_for_topic(topic) == {0, 1, 2, 3}
        tps = [TopicPartition(topic, p) for p in range(4)]
        ends = consumer.end_offsets(tps)
    finally:
        consumer.close()
    assert sum(ends.values()) == 200
    assert sum(1 for n in ends.values() if n > 0) > 1  # keys spread over the partitions

    values = _read_all(kafka_bootstrap, topic, 200)
    assert sorted(values) == sorted(f"a-{i}".encode() for i in range(200))


@pytest.mark.postgres
def test_postgres_create_insert_select(database_url, unique_name):
    table = unique_name("bench")
    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, label text NOT NULL)")
            cur.executemany(f"INSERT INTO {table} VALUES (%s, %s)", [(i, f"row {i}") for i in range(50)])
        with conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*), max(label) FROM {table}")
            assert cur.fetchone() == (50, "row 9")
            cur.execute(f"INSERT INTO {table} VALUES (1, 'again') ON CONFLICT (id) DO NOTHING")
            assert cur.rowcount == 0
            cur.execute(f"DROP TABLE {table}")
    finally:
        conn.close()


@pytest.mark.postgres
def test_postgres_refuses_a_wrong_password(postgres_factory):
    pg = postgres_factory()
    assert pg.url.startswith("postgresql://dpe:dpe@127.0.0.1:")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(host="127.0.0.1", port=pg.port, user="dpe", password="wrong", dbname="dpe",
                         connect_timeout=10)


@pytest.mark.kafka
@pytest.mark.slow
def test_private_broker_keeps_data_over_crash_and_restart(kafka_broker_factory, unique_name):
    broker = kafka_broker_factory()
    bootstrap = broker.bootstrap
    topic = unique_name("crash")
    _create_topic(bootstrap, topic, 2)
    _produce(bootstrap, topic, 100, "before")

    broker.kill()  # SIGKILL: no clean shutdown
    assert not broker.running
    broker.restart()
    assert broker.running and broker.bootstrap == bootstrap
    _produce(bootstrap, topic, 10, "after")

    values = _read_all(bootstrap, topic, 110)
    expected = [f"before-{i}".encode() for i in range(100)] + [f"after-{i}".encode() for i in range(10)]
    assert sorted(values) == sorted(expected)


@pytest.mark.postgres
def test_private_postgres_keeps_committed_rows_over_crash_and_restart(postgres_factory):
    pg = postgres_factory()
    url = pg.url
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE kept (id int PRIMARY KEY)")
        cur.executemany("INSERT INTO kept VALUES (%s)", [(i,) for i in range(100)])
    uncommitted = psycopg2.connect(url)
    ucur = uncommitted.cursor()
    ucur.execute("INSERT INTO kept SELECT generate_series(1000, 1099)")  # never committed
    conn.close()

    pg.kill()  # SIGKILL to the postmaster and every backend
    assert not pg.running
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(url, connect_timeout=3)
    uncommitted.close()
    pg.restart()
    assert pg.url == url
    with psycopg2.connect(url) as conn2, conn2.cursor() as cur:
        cur.execute("SELECT count(*), min(id), max(id) FROM kept")
        assert cur.fetchone() == (100, 0, 99)
    conn2.close()


def test_testbed_gives_the_environment_of_its_servers(unique_name):
    with LocalServers(kafka=False, standin=True, rows_per_department=5) as servers:
        env = servers.env
        assert set(env) == {"DATABASE_URL", "ADEME_API_URL"}
        assert env["DATABASE_URL"] == servers.postgres.url
        import requests

        page = requests.get(env["ADEME_API_URL"] + "/lines", params={"size": 3}, timeout=30).json()
        assert len(page["results"]) == 3
        with psycopg2.connect(env["DATABASE_URL"]) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database()")
            assert cur.fetchone() == ("dpe", "dpe")
        conn.close()
        assert f"export DATABASE_URL={env['DATABASE_URL']}" in servers.exports()
    assert not servers.postgres.running


def test_helm_binary_is_the_pinned_version(helm_bin):
    out = subprocess.run([str(helm_bin), "version", "--template", "{{.Version}}"], capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    assert out == HELM_VERSION


def test_relay_joins_tcp_to_unix_to_tcp_both_ways(tmp_path):
    """The two relays that carry the tests' API calls into the test cluster's network namespace."""
    import socket
    import subprocess
    import sys
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def echo() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(4096):
                conn.sendall(data.upper())
    threading.Thread(target=echo, daemon=True).start()
    sock = tmp_path / "relay.sock"
    inner = subprocess.Popen([sys.executable, "-m", "dpe_devkit.testbed.relay", f"unix:{sock}",
                              f"tcp:127.0.0.1:{server.getsockname()[1]}"], stdout=subprocess.PIPE, text=True)
    outer = subprocess.Popen([sys.executable, "-m", "dpe_devkit.testbed.relay", "tcp:127.0.0.1:0", f"unix:{sock}"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert inner.stdout.readline().startswith(f"listening {sock}")
        port = int(outer.stdout.readline().split(":")[-1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
            payload = b"kubectl exec " * 10000
            c.sendall(payload)
            c.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := c.recv(65536):
                got += chunk
        assert got == payload.upper()
    finally:
        for p in (inner, outer):
            p.terminate()
            p.wait(10)
        server.close()


# --------------------------------------------------------------------------------------------
# dpe-ingest testbed / run where the harness is not installed (as in the images)
# --------------------------------------------------------------------------------------------
def _cli(paths: list[str], *args: str) -> subprocess.CompletedProcess:
    """``python -m dpe_ingest ARGS`` with only ``paths`` (relative to the checkout) importable: ``-S``
    leaves site-packages (and the editable installs of both distributions) out, PYTHONPATH puts in
    what the test wants, as an image has the product and not its harness."""
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join(str(root / p) for p in paths)
    return subprocess.run([sys.executable, "-S", "-m", "dpe_ingest", *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=root / "docs")


@pytest.mark.parametrize("command", [["testbed", "up"], ["testbed", "cluster", "up"], ["testbed", "--help"],
                                     ["run", "69", "01"], ["run", "--help"]])
def test_without_the_harness_its_commands_exit_2_saying_how_to_install_it(command):
    cp = _cli(["src"], *command)
    assert cp.returncode == 2, (cp.returncode, cp.stdout, cp.stderr)
    assert cp.stdout == ""
    assert cp.stderr == (f"dpe-ingest {command[0]}: this command is part of the development harness (dpe_devkit), "
                         "which is not installed here (the images never carry it). From a checkout: bash "
                         "scripts/setup (or pip install -e devkit)\n"), cp.stderr


def test_without_the_harness_the_product_commands_still_answer():
    cp = _cli(["src"], "--version")
    assert (cp.returncode, cp.stdout.strip()) == (0, "0.1.0"), cp.stderr
    cp = _cli(["src"], "--help")
    assert cp.returncode == 0 and "testbed" in cp.stdout and "produce" in cp.stdout, cp.stderr


def test_with_the_harness_on_the_path_the_same_command_loads_it():
    """The counter-test: the same interpreter and flags, devkit/src added, and testbed answers itself."""
    cp = _cli(["src", "devkit/src"], "testbed", "--help")
    assert cp.returncode == 0, cp.stderr
    assert "cluster up" in cp.stdout and "development harness" not in cp.stderr, (cp.stdout, cp.stderr)
