"""``dpe-ingest run``: the whole pipeline as local processes on the testbed's Kafka and PostgreSQL.

Each test runs ``dpe-ingest run`` as a real process, with KAFKA_BOOTSTRAP_SERVERS / DATABASE_URL set to
the session bench (so the run reuses it instead of starting its own) and topics, group and table
unique to the test.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg2
import pytest

import reconcile as rec
from dpe_devkit import local_run
from dpe_ingest.standin.data import Dataset

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]


@pytest.fixture
def run_env(kafka_bootstrap, database_url, unique_name):
    base = unique_name("run")
    table = re.sub(r"[^a-z0-9_]", "_", base.lower())
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "DATABASE_URL": database_url, "KAFKA_TOPIC": base,
           "KAFKA_DLQ_TOPIC": base + "-dlq", "PRODUCER_CHECKPOINT_TOPIC": base + "-ckpt",
           "CONSUMER_GROUP": base + "-sink", "DB_TABLE": table, "KAFKA_TOPIC_PARTITIONS": "3",
           "BATCH_IDLE_MS": "200", "BATCH_SIZE": "500", "DPE_TEST_RUN_MARKER": base,
           "ANALYTICS_GROUP": base + "-analytics", "ANALYTICS_TABLE_PREFIX": table + "_a"}
    yield env
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f'DROP TABLE IF EXISTS "{table}"')
        for part in ("keys", "labels", "months", "skipped", "offsets"):
            cur.execute(f'DROP TABLE IF EXISTS "{table}_a_{part}"')
    conn.close()


def dpe_run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "dpe_ingest", "run", *args], env=full, capture_output=True,
                          text=True, timeout=timeout)


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """department -> [API total, produced, stored, dead letters, check] from the summary table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split(None, 5)
        if parts and (re.fullmatch(r"\d\d\d?|2[AB]", parts[0]) or parts[0] == "total") and len(parts) >= 5:
            rows[parts[0]] = parts[1:]
    return rows


def processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment carries ``marker`` (our run's children inherit it)."""
    found = []
    needle = f"DPE_TEST_RUN_MARKER={marker}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                stat = (entry / "stat").read_text()
                if stat.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return found


def label_counts(ds: Dataset, deps: list[str]) -> collections.Counter:
    c = collections.Counter()
    for dep in deps:
        for i, row in enumerate(ds.iter_rows(dep)):
            if not ds.is_malformed(dep, i):
                c[row["etiquette_dpe"]] += 1
    return c


def test_three_departments_on_the_standin_reconcile_and_exit_0(run_env, database_url):
    deps = ["69", "01", "38"]
    res = dpe_run(["69", "1", "38", "--standin", "--rows-per-department", "2000", "--page-size", "500"], run_env)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    rows = summary_rows(res.stdout)
    for dep in deps:
        assert rows[dep][:4] == ["2000", "2000", "2000", "0"], res.stdout
        assert rows[dep][4] == "ok"
    assert rows["total"][:4] == ["6000", "6000", "6000", "0"]
    assert "result: ok, every row announced by the API is stored or dead-lettered (exit 0)" in res.stdout
    # the label distribution printed is the one of the stand-in's rows, and the table really has them
    expected = label_counts(Dataset(2000, seed=1), deps)
    for label in "ABCDEFG":
        n = expected[label]
        pct = 100.0 * n / 6000
        assert re.search(rf"^  {label}\s+{n}\s+{pct:5.1f}%", res.stdout, re.M), (label, n, res.stdout)
    # the table holds exactly the stand-in's rows, every column; the analytics tables their counts
    want = rec.expected_rows(Dataset(2000, seed=1), deps)
    rec.assert_rows(want, rec.read_table(database_url, run_env["DB_TABLE"]))
    rec.assert_counts(rec.expected_counts(want), rec.read_counts(database_url, run_env["ANALYTICS_TABLE_PREFIX"]))
    # counter-test: one label flipped behind the check's back is seen, and named
    key = sorted(want)[1234]
    flipped = "A" if want[key]["etiquette_dpe"] != "A" else "B"
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f'UPDATE "{run_env["DB_TABLE"]}" SET etiquette_dpe = %s WHERE numero_dpe = %s', (flipped, key))
    conn.close()
    with pytest.raises(AssertionError, match=f"different: {key} .*etiquette_dpe '{flipped}' in the table"):
        rec.assert_rows(want, rec.read_table(database_url, run_env["DB_TABLE"]))
    # the children's log lines came through, prefixed with their department
    assert re.search(r"^69\s+\| .*event=done", res.stderr, re.M)
    assert re.search(r"^consumer\s+\| .*event=stop", res.stderr, re.M)
    assert re.search(r"^analytics\s+\| .*event=stop", res.stderr, re.M)
    assert "analytics vs dpe_data: rows per label agree for every department" in res.stdout, res.stdout
    assert re.search(r"^department 69: 2000 certificates, F\+G \d+\.\d% \(\d+\)", res.stdout, re.M), res.stdout
    assert processes_with(run_env["DPE_TEST_RUN_MARKER"]) == []


def test_new_codes_and_rows_without_a_department_run_and_reconcile(run_env, database_url):
    res = dpe_run(["977", "none", "988", "--standin", "--rows-per-department", "600"], run_env)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    rows = {line.split()[0]: line.split()[1:5] for line in res.stdout.splitlines()
            if line.split() and line.split()[0] in ("977", "988", "none", "total")}
    assert rows["977"] == rows["988"] == rows["none"] == ["600", "600", "600", "0"], res.stdout
    assert "rows without a department in the API: 600 (department none fetches them)" in res.stdout
    want = rec.expected_rows(Dataset(600, seed=1, rows_without_department=600), ["977", "none", "988"])
    assert sum(1 for r in want.values() if r["departement"] is None) == 600
    rec.assert_rows(want, rec.read_table(database_url, run_env["DB_TABLE"]))


def unreachable_api() -> str:
    """A dataset URL on a local port nothing listens on: the probe fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/data-fair/api/v1/datasets/dpe03existant"


def test_malformed_rows_are_dead_lettered(run_env, database_url):
    res = dpe_run(["38", "--standin", "--rows-per-department", "1500", "--malformed-rate", "0.03", "--seed", "5"],
                  run_env)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    ds = Dataset(1500, seed=5, malformed_rate=0.03)
    dead = ds.expected_malformed("38")
    assert dead > 10
    assert summary_rows(res.stdout)["38"] == ["1500", str(1500 - dead), str(1500 - dead), str(dead), "ok"]
    rec.assert_rows(rec.expected_rows(ds, ["38"]), rec.read_table(database_url, run_env["DB_TABLE"]))


def test_an_unreachable_api_with_your_own_servers_is_an_error_and_writes_nothing(run_env, database_url,
                                                                                 kafka_bootstrap):
    """No synthetic certificate goes into a database or a Kafka of the user's unless --standin asks."""
    from kafka.admin import KafkaAdminClient

    api = unreachable_api()
    for given in (("KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"), ("KAFKA_BOOTSTRAP_SERVERS",), ("DATABASE_URL",)):
        env = {**os.environ, **run_env, "ADEME_API_URL": api, "PYTHONUNBUFFERED": "1"}
        for name in {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"} - set(given):
            env.pop(name, None)
        res = subprocess.run([sys.executable, "-m", "dpe_ingest", "run", "38", "--probe-timeout", "1"], env=env,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1, (given, res.stdout, res.stderr[-3000:])
        err = res.stderr
        assert f"the ADEME API at {api} is unreachable" in err and "pass --standin" in err, err[-3000:]
        assert f"{' and '.join(given)} point at your own servers" in err, err[-3000:]
        assert "event=spawned" not in err and "starting the testbed" not in err and "stand-in of the ADEME API at" \
            not in err, err[-3000:]
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (run_env["DB_TABLE"],))
        assert cur.fetchone()[0] is None, "the table was created"
    conn.close()
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap, request_timeout_ms=30000)
    try:
        topics = set(admin.list_topics())
    finally:
        admin.close()
    assert not {run_env["KAFKA_TOPIC"], run_env["PRODUCER_CHECKPOINT_TOPIC"]} & topics, "a topic was created"


def test_bad_department_code_exits_2_before_starting_anything(run_env):
    res = dpe_run(["69", "20"], run_env, timeout=60)
    assert res.returncode == 2
    assert "invalid department code '20': valid forms are 01..19, 2A, 2B, 21..95, 971..978, 988, none" in res.stderr
    assert "event=spawned" not in res.stderr
    res = dpe_run(["69", "--malformed-rate", "2"], run_env, timeout=60)
    assert res.returncode == 2 and "--malformed-rate must be between 0 and 1" in res.stderr
    res = dpe_run(["--no-such-option"], run_env, timeout=60)
    assert res.returncode == 2


def test_parse_args_normalises_departments():
    args, deps, error = local_run.parse_args(["1", "2a", "69,38", "69"])
    assert error is None and deps == ["01", "2A", "69", "38"]
    args, deps, error = local_run.parse_args([])
    assert error is None and deps == ["69"]


def test_sigint_mid_run_stops_everything_cleanly(run_env, tmp_path):
    log_path = tmp_path / "run.log"
    out_path = tmp_path / "run.out"
    full = {**os.environ, **run_env, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as err, open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dpe_ingest", "run", "69", "01", "--standin",
                                 "--rows-per-department", "400000", "--page-size", "200"],
                                env=full, stdout=out, stderr=err)
        try:
            deadline = time.monotonic() + 180
            while True:
                text = log_path.read_text(errors="replace")
                pages = {d for d in ("69", "01") if re.search(rf"^{d}\s+\| .*event=page .*page=2 ", text, re.M)}
                if pages == {"69", "01"}:
                    break
                assert proc.poll() is None, text[-3000:]
                assert time.monotonic() < deadline, "producers did not get going: " + text[-3000:]
                time.sleep(0.5)
            pids = [int(p) for p in re.findall(r"event=spawned .*pid=(\d+)", text)]
            assert len(pids) == 4  # consumer, analytics consumer, 2 producers
            proc.send_signal(signal.SIGINT)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log_path.read_text(errors="replace")
    stdout = out_path.read_text(errors="replace")
    assert rc == 130, text[-4000:]
    # the producers checkpointed and exited 143, the consumer committed and stopped
    for dep in ("69", "01"):
        assert re.search(rf"^{dep}\s+\| .*event=stopped ", text, re.M), text[-4000:]
    assert len(re.findall(r"event=stopped .*exit_code=143", text)) == 2
    assert re.search(r"^consumer\s+\| .*event=stop .*reason=signal", text, re.M)
    assert "result: interrupted by SIGINT (exit 130)" in stdout
    rows = summary_rows(stdout)
    assert "not finished" in rows["69"][4] and 0 < int(rows["69"][1]) < 400000
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" == (Path(f"/proc/{pid}/stat").read_text()
                                                              .rsplit(")", 1)[1].split()[0])
    assert processes_with(run_env["DPE_TEST_RUN_MARKER"]) == []


def _without_servers(env: dict[str, str]) -> dict[str, str]:
    """The run's environment with no Kafka/PostgreSQL of ours: the run must start the bench itself."""
    full = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    full.pop("KAFKA_BOOTSTRAP_SERVERS", None)
    full.pop("DATABASE_URL", None)
    return full


@pytest.mark.slow
def test_without_servers_the_run_starts_the_bench_and_an_unreachable_api_falls_back_to_the_standin(run_env):
    """The run owns the Kafka and PostgreSQL it writes to: an API that does not answer is replaced by
    the stand-in, with a warning (as docs/run-and-status.md says)."""
    full = {**_without_servers(run_env), "ADEME_API_URL": unreachable_api()}
    res = subprocess.run([sys.executable, "-m", "dpe_ingest", "run", "01", "--rows-per-department", "500",
                          "--probe-timeout", "1"], env=full, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    assert "starting the testbed's Kafka and PostgreSQL" in res.stderr
    assert re.search(r"level=warning .*event=api_unreachable .*using the local stand-in instead", res.stderr), \
        res.stderr[-4000:]
    assert "(stand-in)" in res.stdout.splitlines()[0], res.stdout
    assert summary_rows(res.stdout)["01"] == ["500", "500", "500", "0", "ok"]
    assert processes_with(run_env["DPE_TEST_RUN_MARKER"]) == []  # broker and PostgreSQL stopped too


@pytest.mark.slow
def test_keep_leaves_the_bench_running_for_status(run_env):
    full = _without_servers(run_env)
    res = subprocess.run([sys.executable, "-m", "dpe_ingest", "run", "38", "--standin", "--rows-per-department",
                          "300", "--keep"], env=full, capture_output=True, text=True, timeout=600)
    m = re.search(r"^kill (\d+)$", res.stderr, re.M)
    pid = int(m.group(1)) if m else None
    try:
        assert res.returncode == 0, res.stdout + res.stderr[-4000:]
        assert pid is not None, res.stderr[-3000:]
        exports = dict(re.findall(r"^export (\w+)='?([^'\n]*)'?$", res.stderr, re.M))
        assert set(exports) == {"KAFKA_BOOTSTRAP_SERVERS", "DATABASE_URL"}
        assert processes_with(run_env["DPE_TEST_RUN_MARKER"])  # the bench is still up
        # the kept bench answers: status sees the finished run
        st = subprocess.run([sys.executable, "-m", "dpe_ingest", "status", "--json", "--no-kube"],
                            env={**full, **exports}, capture_output=True, text=True, timeout=120)
        import json

        doc = json.loads(st.stdout)
        assert st.returncode == 0, st.stdout
        assert [(d["department"], d["stored"], d["state"]) for d in doc["departments"]] == [("38", 300, "done")]
    finally:
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 90
            while processes_with(run_env["DPE_TEST_RUN_MARKER"]) and time.monotonic() < deadline:
                time.sleep(0.5)
        d = re.search(r"data and logs in (\S+)\)", res.stderr)
        if d and Path(d.group(1)).name.startswith("dpe-run-testbed-"):
            shutil.rmtree(d.group(1), ignore_errors=True)
    assert processes_with(run_env["DPE_TEST_RUN_MARKER"]) == []
