"""``dpe-ingest status``: pure rendering against known states, Job states from recorded Kubernetes
objects, and ``collect`` against a real pipeline state on the bench."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dpe_ingest import status as st
from dpe_ingest.status import (Checkpoint, Lag, Source, Status, bar, job_state, jobs_by_department,
                               render_text, to_json)
from dpe_ingest.status_sources import Collector, Settings

FIXTURES = Path(__file__).parent / "fixtures" / "k8s"
SETTINGS = {"bootstrap": "127.0.0.1:9092", "topic": "dpe-lines", "dlq_topic": "dpe-lines-dlq",
            "checkpoint_topic": "dpe-producer-checkpoints", "group": "dpe-sink", "table": "dpe_data",
            "database": "postgresql://dpe@127.0.0.1:5432/dpe", "kube": None, "namespace": None, "release": None}


def ok_sources(kube: bool = False) -> dict[str, Source]:
    out = {n: Source() for n in ("checkpoints", "dead_letters", "database", "consumer_lag")}
    out["kubernetes"] = Source() if kube else Source(used=False)
    return out


def known_status(**changes) -> Status:
    """69 finished with 20 dead letters, 01 half-way, 38 not started."""
    base = dict(
        generated_at="2025-11-25T21:30:00Z", settings=dict(SETTINGS), sources=ok_sources(),
        checkpoints={"69": Checkpoint(rows=1980, dead=20, total=2000, done=True, page=4, at="2025-11-25T21:29:00Z"),
                     "01": Checkpoint(rows=1000, dead=0, total=2000, done=False, page=2, at="2025-11-25T21:29:30Z")},
        dead_letters={"69": {"producer": 20}},
        stored={"69": 1980, "01": 600},
        labels={"69": {"A": 30, "B": 60, "C": 380, "D": 670, "E": 500, "F": 200, "G": 140}},
        lag=Lag("dpe-lines", "dpe-sink", 400, {0: 150, 1: 250}),
        only=["69", "01", "38"],
    )
    base.update(changes)
    return Status(**base)


# ---------------------------------------------------------------------------------------------
# pure rendering
# ---------------------------------------------------------------------------------------------
def test_progress_bar_is_exact():
    assert bar(0.0) == "[........................]   0.0%"
    assert bar(0.5) == "[############............]  50.0%"
    assert bar(0.3) == "[#######.................]  30.0%"
    assert bar(1.0) == "[########################] 100.0%"
    assert bar(1.7) == "[########################] 100.0%"  # clamped
    assert bar(None) == "[????????????????????????]      ?"


def test_render_text_of_a_known_state():
    text = render_text(known_status())
    assert text.splitlines() == [
        "dpe-ingest status at 2025-11-25T21:30:00Z",
        "kafka 127.0.0.1:9092  topic dpe-lines  group dpe-sink  table dpe_data",
        "",
        "DEP  STATE      PROGRESS (stored+dead / API total)  API TOTAL  PRODUCED  STORED  DEAD",
        "69   done       [########################] 100.0%        2000      1980    1980    20",
        "01   producing  [#######.................]  30.0%        2000      1000     600     0",
        "38   pending    [????????????????????????]      ?           -         0       0     0",
        "",
        "consumer lag: 400 messages (topic dpe-lines, group dpe-sink)",
        "sources: checkpoints ok; dead letters ok; database ok; consumer lag ok; kubernetes not used",
        "result: in progress (1 producing, 1 pending) (exit 1)",
    ]


def test_to_json_of_a_known_state():
    doc = to_json(known_status())
    assert list(doc) == ["version", "generated_at", "overall", "settings", "sources", "consumer_lag", "analytics_lag",
                         "api_without_department", "departments"]
    assert doc["version"] == 1
    assert doc["overall"] == {"state": "in_progress", "exit_code": 1, "message": "in progress (1 producing, 1 pending)"}
    assert doc["consumer_lag"] == {"topic": "dpe-lines", "group": "dpe-sink", "total": 400,
                                   "partitions": {"0": 150, "1": 250}}
    assert doc["sources"]["kubernetes"] == {"used": False, "ok": None, "error": None, "note": None}
    assert doc["sources"]["database"] == {"used": True, "ok": True, "error": None, "note": None}
    d69, d01, d38 = doc["departments"]
    assert d69 == {
        "department": "69", "state": "done", "api_total": 2000, "produced": 1980, "producer_dead_letters": 20,
        "stored": 1980, "dead_letters": 20, "dead_letters_by_stage": {"producer": 20}, "producer_done": True,
        "checkpoint_at": "2025-11-25T21:29:00Z", "progress": 1.0,
        "labels": {"A": 30, "B": 60, "C": 380, "D": 670, "E": 500, "F": 200, "G": 140}, "job": None,
        "refresh": None,
    }
    assert (d01["state"], d01["produced"], d01["stored"], d01["progress"], d01["producer_done"]) == \
        ("producing", 1000, 600, 0.3, False)
    assert (d38["state"], d38["api_total"], d38["produced"], d38["stored"], d38["progress"]) == \
        ("pending", None, 0, 0, None)
    json.dumps(doc)  # serialisable as is


def test_finished_and_reconciled_is_exit_0_and_a_mismatch_is_exit_4():
    done = known_status(
        checkpoints={"69": Checkpoint(rows=1980, dead=20, total=2000, done=True)},
        stored={"69": 1980}, lag=Lag("dpe-lines", "dpe-sink", 0, {0: 0}), only=None)
    assert done.overall() == ("done", 0, "every department finished and reconciled")
    assert render_text(done).splitlines()[-1] == "result: every department finished and reconciled (exit 0)"
    # all consumed (lag 0) but 5 rows missing from the table
    short = known_status(
        checkpoints={"69": Checkpoint(rows=1980, dead=20, total=2000, done=True)},
        stored={"69": 1975}, lag=Lag("dpe-lines", "dpe-sink", 0, {0: 0}), only=None)
    assert short.department("69").state == "mismatch"
    assert short.overall()[:2] == ("mismatch", 4)
    # the same shortfall while messages are still in flight is just "consuming"
    flight = known_status(
        checkpoints={"69": Checkpoint(rows=1980, dead=20, total=2000, done=True)},
        stored={"69": 1975}, lag=Lag("dpe-lines", "dpe-sink", 5, {0: 5}), only=None)
    assert flight.department("69").state == "consuming"
    assert flight.overall()[:2] == ("in_progress", 1)


def test_consumer_dead_letters_count_as_accounted_for():
    s = known_status(
        checkpoints={"69": Checkpoint(rows=100, dead=0, total=100, done=True)},
        dead_letters={"69": {"consumer": 3}}, stored={"69": 97}, lag=Lag("dpe-lines", "dpe-sink", 0, {}), only=None)
    v = s.department("69")
    assert (v.state, v.dead_letters, v.progress) == ("done", 3, 1.0)


def test_a_dead_letter_sent_again_by_a_replay_is_counted_once():
    from types import SimpleNamespace

    from dpe_ingest import messages

    def letter(letter_id, dep="69", stage="consumer"):
        value, _ = messages.build("bad", stage, letter_id=letter_id, department=dep)
        return SimpleNamespace(value=value)

    c = Collector(settings=None)
    for rec in (letter("consumer:t/0/5"), letter("consumer:t/0/5"), letter("consumer:t/1/5"),
                letter("producer:2A/-/3", "2A", "producer"), letter("producer:2A/-/3", "2A", "producer"),
                letter("producer:2A/abc/3", "2A", "producer"), SimpleNamespace(value=b"not json")):
        c._on_dead_letter(rec)
    assert c.dead == {"69": {"consumer": 2}, "2A": {"producer": 2}, "?": {"?": 1}}
    c._forget_dead_letters()  # the topic is read again from its start: nothing is remembered
    c._on_dead_letter(letter("consumer:t/0/5"))
    assert c.dead == {"69": {"consumer": 1}}


def test_a_source_down_is_shown_with_its_reason_and_gives_exit_2():
    sources = ok_sources()
    sources["database"] = Source(ok=False, error="OperationalError: connection refused")
    s = known_status(sources=sources, stored={})
    text = render_text(s)
    assert "database UNAVAILABLE (OperationalError: connection refused)" in text
    assert "69   produced   [????????????????????????]      ?        2000      1980       -    20" in text.splitlines()
    assert s.overall() == ("unavailable", 2, "source unavailable: database")
    doc = to_json(s)
    assert doc["sources"]["database"] == {"used": True, "ok": False, "error": "OperationalError: connection refused",
                                          "note": None}
    assert doc["departments"][0]["stored"] is None and doc["departments"][0]["labels"] is None
    # Kafka down: nothing is known about checkpoints nor lag, the numbers show as "-"
    sources = ok_sources()
    for name in ("checkpoints", "dead_letters", "consumer_lag"):
        sources[name] = Source(ok=False, error="KafkaTimeoutError: Unable to bootstrap from 127.0.0.1:1")
    s = known_status(sources=sources, lag=None)
    lines = render_text(s).splitlines()
    assert "69   done" not in "\n".join(lines)
    assert "consumer lag: unknown" in lines
    assert s.overall()[:2] == ("unavailable", 2)


def test_no_department_yet():
    s = known_status(checkpoints={}, dead_letters={}, stored={}, labels={}, lag=Lag("dpe-lines", "dpe-sink", 0),
                     only=None)
    assert "no department found (no checkpoint, stored row, dead letter or Job yet)" in render_text(s)
    assert s.overall() == ("in_progress", 1, "no department started yet")
    assert to_json(s)["departments"] == []


# ---------------------------------------------------------------------------------------------
# Kubernetes Jobs from recorded API objects (kubectl get jobs -o json)
# ---------------------------------------------------------------------------------------------
def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text())


def test_recorded_jobs_are_valid_kubernetes_objects():
    """The fixtures deserialize into the Kubernetes client's V1Job models (they are realistic)."""
    from kubernetes.client import ApiClient

    api = ApiClient()

    jl = api.deserialize((FIXTURES / "jobs.json").read_text(), "V1JobList", "application/json")
    assert len(jl.items) == 5
    job = api.deserialize((FIXTURES / "job-failed-backoff.json").read_text(), "V1Job", "application/json")
    assert job.status.failed == 5 and job.spec.backoff_limit == 4
    assert [c.type for c in job.status.conditions] == ["FailureTarget", "Failed"]


@pytest.mark.parametrize("name,expected", [
    ("job-running.json", ("Running", 1, 1, 0, None)),
    ("job-succeeded.json", ("Succeeded", 0, 0, 1, None)),
    ("job-failed-backoff.json", ("Failed", 0, 5, 0, "BackoffLimitExceeded")),
])
def test_job_state_of_recorded_jobs(name, expected):
    js = job_state(load(name))
    assert (js.state, js.active, js.retries, js.succeeded, js.reason) == expected
    assert js.backoff_limit == 4
    assert js.name.startswith("dpe-producer-")


def test_jobs_by_department_keeps_the_newest_job_of_each_department():
    jobs = jobs_by_department(load("jobs.json"))
    assert sorted(jobs) == ["01", "2A", "38", "69"]
    assert jobs["01"].name == "dpe-producer-01-a04b7d21" and jobs["01"].state == "Succeeded"  # not the old failed one
    assert jobs["2A"].state == "Pending"  # a pod exists but is not ready (init container waiting for Kafka)
    assert jobs["38"].state == "Failed" and jobs["38"].message == "Job has reached the specified backoff limit"
    assert jobs["69"].state == "Running" and jobs["69"].retries == 1
    assert jobs_by_department(load("jobs.json"), release="other") == {}


def test_job_states_through_the_collector_and_the_screen():
    """The recorded JobList goes through the same path as the live API answer (Collector.read_jobs)."""
    settings = Settings.from_env({}, kube=True, namespace="default", timeout_s=1)
    asked = []

    def lister(namespace, release, timeout_s):
        asked.append((namespace, release))
        return load("jobs.json"), "default"

    col = Collector(settings, job_lister=lister)
    src, jobs = col.read_jobs()
    assert src.ok and src.used and asked == [("default", None)]
    s = known_status(sources=ok_sources(kube=True), jobs=jobs, only=None,
                     checkpoints={"69": Checkpoint(rows=1500, dead=0, total=2000, done=False),
                                  "01": Checkpoint(rows=2000, dead=0, total=2000, done=True),
                                  "38": Checkpoint(rows=500, dead=0, total=3000, done=False)},
                     stored={"69": 1000, "01": 2000, "38": 500}, dead_letters={},
                     lag=Lag("dpe-lines", "dpe-sink", 500, {0: 500}))
    s.settings["namespace"] = "default"
    lines = render_text(s).splitlines()
    assert lines[1].endswith("namespace default")
    assert lines[3] == ("DEP  STATE      PROGRESS (stored+dead / API total)  API TOTAL  PRODUCED  STORED  DEAD  JOB")
    assert lines[4] == ("01   done       [########################] 100.0%        2000      2000    2000     0  "
                        "Succeeded")
    assert lines[5] == ("2A   pending    [????????????????????????]      ?           -         0       0     0  "
                        "Pending")
    assert lines[6] == ("38   failed     [####....................]  16.7%        3000       500     500     0  "
                        "Failed (5 retries of 4, BackoffLimitExceeded)")
    assert lines[7] == ("69   producing  [############............]  50.0%        2000      1500    1000     0  "
                        "Running (1 retry of 4)")
    assert s.overall() == ("failed", 2, "producer Job failed for 38")
    doc = to_json(s)
    job38 = doc["departments"][2]["job"]
    assert job38["state"] == "Failed" and job38["retries"] == 5 and job38["backoff_limit"] == 4
    assert job38["reason"] == "BackoffLimitExceeded" and job38["name"] == "dpe-producer-38-c71e09b4"


def test_kubernetes_unreachable_is_shown_not_raised():
    settings = Settings.from_env({}, kube=True, timeout_s=1)

    def lister(namespace, release, timeout_s):
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    src, jobs = Collector(settings, job_lister=lister).read_jobs()
    assert (src.ok, src.used, jobs) == (False, True, {})
    assert "Connection refused" in src.error
    # explicit --kube: a cluster that cannot be read is a problem (exit 2)
    s = known_status(sources={**ok_sources(), "kubernetes": src})
    s.settings["kube"] = True
    assert s.overall()[:2] == ("unavailable", 2)
    # auto-detected kubeconfig that does not answer: shown, but not an error of the pipeline
    s.settings["kube"] = None
    assert s.overall()[:2] == ("in_progress", 1)
    assert "kubernetes UNAVAILABLE (" in render_text(s)


def test_kube_is_not_used_without_kubeconfig(tmp_path):
    settings = Settings.from_env({})
    env = {"HOME": str(tmp_path)}
    from dpe_ingest.status_sources import kube_available

    assert kube_available(env) is False
    (tmp_path / ".kube").mkdir()
    (tmp_path / ".kube" / "config").write_text("apiVersion: v1\nkind: Config\n")
    assert kube_available(env) is True
    assert kube_available({"KUBECONFIG": str(tmp_path / "nope")}) is False
    assert settings.kube is None


def test_bad_usage_exits_2(capsys):
    assert st.main(["99"]) == 2
    assert "invalid department code '99'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        st.main(["--json", "--watch", "1"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------
# collect against a real state on the bench: the real producer and consumer, then status --json
# ---------------------------------------------------------------------------------------------
def _cmd(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpe_ingest", *args], env={**os.environ, **env,
                          "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def pipeline_env(kafka_bootstrap, database_url, unique_name):
    base = unique_name("status")
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "DATABASE_URL": database_url, "KAFKA_TOPIC": base,
           "KAFKA_DLQ_TOPIC": base + "_dlq", "PRODUCER_CHECKPOINT_TOPIC": base + "_ckpt",
           "CONSUMER_GROUP": base + "_sink", "DB_TABLE": base, "KAFKA_TOPIC_PARTITIONS": "3",
           "BATCH_IDLE_MS": "200", "ADEME_PAGE_SIZE": "400"}
    yield env
    import psycopg2

    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f'DROP TABLE IF EXISTS "{base}"')
    conn.close()


@pytest.mark.kafka
@pytest.mark.postgres
def test_status_json_follows_a_real_pipeline(pipeline_env, standin_factory):
    from dpe_ingest.standin.data import Dataset

    ds = Dataset({"69": 1200, "2A": 900}, seed=3, malformed_rate=0.02)
    api = standin_factory(ds)
    env = {**pipeline_env, "ADEME_API_URL": api.url}
    dead = {d: ds.expected_malformed(d) for d in ("69", "2A")}
    assert dead["69"] > 0 and dead["2A"] > 0

    # nothing yet: no department, in progress; the topics do not even exist
    res = _cmd(["status", "--json"], env, timeout=120)
    doc = json.loads(res.stdout)
    assert res.returncode == 1 and doc["departments"] == [] and doc["overall"]["state"] == "in_progress"
    assert doc["sources"]["checkpoints"]["ok"] is True and "does not exist yet" in doc["sources"]["checkpoints"]["note"]
    assert doc["sources"]["database"]["note"] == f"table {env['DB_TABLE']} does not exist yet"

    # produced, not consumed: rows in Kafka, none stored, the whole topic is lag
    for dep in ("69", "2A"):
        res = _cmd(["produce"], {**env, "DEPARTMENT": dep})
        assert res.returncode == 0, res.stderr[-3000:]
    res = _cmd(["status", "--json"], env, timeout=120)
    doc = json.loads(res.stdout)
    assert res.returncode == 1, res.stdout
    by = {d["department"]: d for d in doc["departments"]}
    assert sorted(by) == ["2A", "69"]
    for dep, total in (("69", 1200), ("2A", 900)):
        d = by[dep]
        assert (d["api_total"], d["produced"], d["producer_dead_letters"], d["stored"]) == \
            (total, total - dead[dep], dead[dep], 0)
        assert d["dead_letters"] == dead[dep] and d["dead_letters_by_stage"] == {"producer": dead[dep]}
        assert d["producer_done"] is True and d["state"] == "consuming"
        assert d["progress"] == round(dead[dep] / total, 4)
    assert doc["consumer_lag"]["total"] == 2100 - sum(dead.values())
    assert doc["sources"]["consumer_lag"]["note"] == f"group {env['CONSUMER_GROUP']} has committed nothing yet"

    # consumed: everything stored, lag 0, done, exit 0
    res = _cmd(["consume", "--exit-when-idle", "2"], env)
    assert res.returncode == 0, res.stderr[-3000:]
    res = _cmd(["status", "--json", "69", "2A"], env, timeout=120)
    doc = json.loads(res.stdout)
    assert res.returncode == 0, res.stdout
    assert doc["overall"] == {"state": "done", "exit_code": 0, "message": "every department finished and reconciled"}
    assert doc["consumer_lag"]["total"] == 0
    assert [d["department"] for d in doc["departments"]] == ["69", "2A"]
    for d, total in zip(doc["departments"], (1200, 900)):
        dep = d["department"]
        assert (d["state"], d["stored"], d["progress"]) == ("done", total - dead[dep], 1.0)
        labels = collections_counter(ds, dep)
        assert d["labels"] == labels
    assert all(doc["sources"][n]["ok"] for n in ("checkpoints", "dead_letters", "database", "consumer_lag"))
    assert doc["sources"]["kubernetes"]["used"] is False

    # the text screen of the same state
    res = _cmd(["status", "--no-kube"], env, timeout=120)
    assert res.returncode == 0
    lines = res.stdout.splitlines()
    assert lines[4].split() == ["2A", "done", "[########################]", "100.0%", "900", str(900 - dead["2A"]),
                                str(900 - dead["2A"]), str(dead["2A"])]
    assert lines[-1] == "result: every department finished and reconciled (exit 0)"


def collections_counter(ds, dep: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, row in enumerate(ds.iter_rows(dep)):
        if not ds.is_malformed(dep, i):
            out[row["etiquette_dpe"]] = out.get(row["etiquette_dpe"], 0) + 1
    return dict(sorted(out.items()))


@pytest.mark.kafka
def test_status_with_the_database_down_says_so_and_exits_2(pipeline_env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**pipeline_env, "DATABASE_URL": f"postgresql://dpe@127.0.0.1:{port}/dpe"}
    res = _cmd(["status", "--timeout", "2"], env, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "database UNAVAILABLE (OperationalError: " in res.stdout
    assert res.stdout.splitlines()[-1] == "result: source unavailable: database (exit 2)"


def test_status_with_kafka_down_shows_every_source_and_does_not_crash():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "DATABASE_URL": f"postgresql://dpe@127.0.0.1:{port}/x"}
        res = _cmd(["status", "--json", "--timeout", "1", "--no-kube"], env, timeout=120)
    assert res.returncode == 2, res.stderr
    doc = json.loads(res.stdout)
    for name in ("checkpoints", "dead_letters", "consumer_lag", "database"):
        assert doc["sources"][name]["ok"] is False and doc["sources"][name]["error"], name
    assert doc["overall"]["state"] == "unavailable"
    assert doc["consumer_lag"] is None and doc["departments"] == []
