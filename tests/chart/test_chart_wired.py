"""The chart, wired to the bench: run what the chart renders as local processes.

The chart is rendered with values pointing at the bench (its Kafka, its PostgreSQL, a stand-in of the
ADEME API on 127.0.0.1).  Then each producer Job's containers (the wait-for-kafka init container,
then the producer) and the consumer Deployment's container run here as processes, with exactly the
``command``/``args`` and ``env`` the chart gives them (secretKeyRef values resolved as the kubelet
would, from the Secret the user would have created).  The test passes when the table holds exactly
the stand-in's rows of every department, on every stored column (``tests/reconcile.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

import reconcile as rec
from chartlib import ROOT, container, env_of, named, pod_spec, producer_jobs

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]

VENV_BIN = ROOT / ".venv" / "bin"
ROWS = {"69": 240, "2A": 130, "971": 75}
EXTRA_FIELDS = ("surface_habitable_logement", "type_batiment")  # ademe.extraFields: stored in extra
SECRET_NAME, SECRET_KEY = "bench-db", "password"


def _split_password(url: str) -> tuple[str, str | None]:
    """postgresql://u:p@h:port/db -> (postgresql://u@h:port/db, p): the chart takes the URL without it."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url, None
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc)), urllib.parse.unquote(parts.password)


def _resolve_env(c: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    env = {}
    for name, value in env_of(c).items():
        if isinstance(value, str):
            env[name] = value
            continue
        ref = value["secretKeyRef"]
        env[name] = secrets[ref["name"]][ref["key"]]
    return env


def _process_env(env: dict[str, str]) -> dict[str, str]:
    """A pod-like environment: nothing of ours leaks in but PATH (the image's) and the container env."""
    base = {"PATH": f"{VENV_BIN}{os.pathsep}/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1"}
    return {**base, **env}


def _argv(c: dict) -> list[str]:
    return list(c["command"]) + list(c.get("args", []))


def _count_rows(database_url: str, table: str) -> dict[str, int]:
    import psycopg2

    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (table,))
        if not cur.fetchone()[0]:
            return {}
        cur.execute(f'SELECT departement, count(*) FROM "{table}" GROUP BY 1')
        return dict(cur.fetchall())


def _sql(database_url: str, statement: str, params: tuple = ()) -> None:
    import psycopg2

    conn = psycopg2.connect(database_url)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(statement, params)
    finally:
        conn.close()


def test_rendered_jobs_and_consumer_fill_postgresql(render, kafka_bootstrap, database_url, standin_factory,
                                                    tmp_path: Path):
    from dpe_ingest.standin.data import Dataset

    assert (VENV_BIN / "dpe-ingest").exists(), "the package is not installed in .venv"
    suffix = uuid.uuid4().hex[:8]
    table, topic = f"chart_wired_{suffix}", f"chart-wired-{suffix}"
    db_url, password = _split_password(database_url)
    secrets = {SECRET_NAME: {SECRET_KEY: password or ""}}

    ds = Dataset(rows_per_department=ROWS, default_rows=0)
    srv = standin_factory(dataset=ds)
    procs: list[subprocess.Popen] = []
    try:
        sets = {
            "departments": "{" + ",".join(ROWS) + "}",
            "kafka.enabled": "false",
            "externalKafka.bootstrapServers": kafka_bootstrap.replace(",", r"\,"),
            "postgresql.enabled": "false",
            "externalPostgresql.url": db_url,
            "ademe.apiUrl": srv.url,
            "ademe.pageSize": "50",
            "ademe.extraFields": r"\,".join(EXTRA_FIELDS),
            "kafka.topic": topic,
            "kafka.dlqTopic": f"{topic}-dlq",
            "kafka.topicPartitions": "3",
            "producer.checkpointTopic": f"{topic}-ckpt",
            "consumer.table": table,
            "consumer.group": f"chart-wired-{suffix}",
            "consumer.batchSize": "40",
            "consumer.batchIdleMs": "200",
        }
        if password is not None:
            sets["externalPostgresql.existingSecret"] = SECRET_NAME
            sets["externalPostgresql.passwordKey"] = SECRET_KEY
        docs = render.template(sets=sets)
        jobs = producer_jobs(docs)
        assert set(jobs) == set(ROWS)
        consumer = container(named(docs, "Deployment", "dpe-consumer"))
        consumer_env = _resolve_env(consumer, secrets)
        assert consumer_env["DATABASE_URL"] == db_url  # the password only ever travels in PGPASSWORD

        # the consumer Deployment's container
        log = open(tmp_path / "consumer.log", "wb")
        procs.append(subprocess.Popen(_argv(consumer), env=_process_env(consumer_env), stdout=log,
                                      stderr=subprocess.STDOUT, cwd=tmp_path))

        # each Job: its init containers, then its container; like the kubelet, one after the other
        producers = {}
        for code, job in jobs.items():
            spec = pod_spec(job)
            for init in spec.get("initContainers", []):
                done = subprocess.run(_argv(init), env=_process_env(_resolve_env(init, secrets)),
                                      capture_output=True, text=True, timeout=120, cwd=tmp_path)
                assert done.returncode == 0, f"{code} {init['name']}: {done.stdout}{done.stderr}"
            c = container(job, "producer")
            plog = open(tmp_path / f"producer-{code}.log", "wb")
            producers[code] = subprocess.Popen(_argv(c), env=_process_env(_resolve_env(c, secrets)), stdout=plog,
                                               stderr=subprocess.STDOUT, cwd=tmp_path)
        procs.extend(producers.values())
        for code, p in producers.items():
            rc = p.wait(timeout=300)
            assert rc == 0, f"producer {code} exited {rc}:\n{(tmp_path / f'producer-{code}.log').read_text()}"

        counts: dict[str, int] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = _count_rows(database_url, table)
            if counts == ROWS or procs[0].poll() is not None:
                break
            time.sleep(0.5)
        assert counts == ROWS, f"rows per department {counts}, expected {ROWS}\n" + \
            (tmp_path / "consumer.log").read_text()[-3000:]
        want = rec.expected_rows(ds, ROWS, EXTRA_FIELDS)
        rec.assert_rows(want, rec.read_table(database_url, table))
        # counter-test: one label flipped behind the check's back is seen, and named
        key = sorted(want)[100]
        flipped = "A" if want[key]["etiquette_dpe"] != "A" else "B"
        _sql(database_url, f'UPDATE "{table}" SET etiquette_dpe = %s WHERE numero_dpe = %s', (flipped, key))
        with pytest.raises(AssertionError, match=f"different: {key} .*etiquette_dpe '{flipped}' in the table"):
            rec.assert_rows(want, rec.read_table(database_url, table))

        # the consumer stops cleanly on SIGTERM (what Kubernetes sends), within its grace period
        procs[0].send_signal(signal.SIGTERM)
        rc = procs[0].wait(timeout=60)
        assert rc in (0, 143), f"consumer exited {rc}:\n" + (tmp_path / "consumer.log").read_text()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            _sql(database_url, f'DROP TABLE IF EXISTS "{table}"')
        except Exception:  # the bench may be gone already; nothing to clean then
            pass
