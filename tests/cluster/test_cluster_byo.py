"""Bring your own Kafka and PostgreSQL, on the test cluster (issue 22): the chart against a secured,
replicated Kafka and a TLS PostgreSQL laid out as Strimzi and CloudNativePG lay theirs out.

In namespace ``dpe-byo`` (Pod Security ``restricted``), ``dpe_devkit.testbed.secure_cluster`` runs a
3-node KRaft Kafka (the test Kafka image; a SASL_SSL SCRAM-SHA-512 listener, TLS between the nodes with
client certificates, certificates from a CA made here, StandardAuthorizer, super users only the brokers'
and the operators' certificates) and a PostgreSQL with ``ssl=on`` (server certificate from another CA made
here), with Strimzi's and CloudNativePG's Secrets.  This module does what their operators would: the
SCRAM users, exactly the ``always`` ACLs of docs/chart.md for the pipeline's user, the topics of the
KafkaTopics the chart renders (Strimzi's CRD installed, the Topic Operator's work done here).

Then, in order, on one release installed with docs/chart.md's Strimzi/CloudNativePG example as it is
(``kafka.enabled=false postgresql.enabled=false``, replication factor 3, min ISR 2; with the in-cluster
stand-in of values-offline.yaml and values-test-cluster.yaml):

* {69, 01, 38} to exact reconciliation row by row (tests/reconcile.py), the analytics tables too, every
  database connection of the pipeline TLS;
* ``helm upgrade`` adding 2A, one broker pod deleted while its producer runs: every Job succeeds with
  its one pod, nothing lost, nothing duplicated (the table, and the keys of the topic);
* the bad settings, each a Job or a pod of the chart's own rendering: exit 2 and one error line naming
  the setting, the Job failed at once, nothing written anywhere;
* no password, private key or certificate in any pod's log, in ``helm get values`` or in
  ``dpe-ingest status``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

import pytest
import yaml

import reconcile as rec
from dpe_ingest.standin.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chart"))
from test_chart_byo import BUDGET, doc_examples, pipeline_grants, with_budget  # noqa: E402 - the doc's example and ACL table
from noderelease import NodeRelease  # noqa: E402

pytestmark = pytest.mark.cluster

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CHART = ROOT / "charts" / "dpe-ingest"
CRD = ROOT / "tests" / "schemas" / "strimzi-1.2.0-kafkatopics.crd.yaml"
NS = "dpe-byo"
RELEASE = "dpe"
RESTRICTED = {f"pod-security.kubernetes.io/{m}": "restricted" for m in ("enforce", "warn", "audit")}
FIRST, FAULT, BAD = ["69", "01", "38"], "2A", "2B"
SLOW = 600  # generous bound of a wait, only reached on failure
#: few rows (the module's time), read slowly enough (16 pages of 25 rows, one a second) that the broker
#: pod is deleted while the new department's producer runs
OURS = {"standin": {"rowsPerDepartment": 400}, "ademe": {"pageSize": 25, "maxRps": 1}}
_TEST_VALUES = yaml.safe_load((HERE / "values-test-cluster.yaml").read_text())
DATASET = Dataset(rows_per_department=OURS["standin"]["rowsPerDepartment"])
EXTRA_FIELDS = tuple(f for f in _TEST_VALUES["ademe"]["extraFields"].split(",") if f)
ANALYTICS_PREFIX = "dpe_analytics"
_DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
#: the names of docs/chart.md's ACL table, as the chart's defaults set them
NAMES = with_budget({"kafka.topic": _DEFAULTS["kafka"]["topic"], "kafka.dlqTopic": _DEFAULTS["kafka"]["dlqTopic"],
                     "producer.checkpointTopic": _DEFAULTS["producer"]["checkpointTopic"],
                     "consumer.group": _DEFAULTS["consumer"]["group"], "analytics.group": _DEFAULTS["analytics"]["group"]})
#: the chart's KafkaTopics: the docs' three and the API budget's (producer.budgetPartitions > 0)
TOPICS = [NAMES["kafka.topic"], NAMES["kafka.dlqTopic"], NAMES["producer.checkpointTopic"], NAMES[BUDGET]]
MISSING_TOPIC = "dpe-checkpoints-elsewhere"


class Byo(NodeRelease):
    """The secured servers, the operators' work, the release and the ways a user looks at them (helm,
    kubectl and describe: :class:`noderelease.NodeRelease`'s)."""

    def __init__(self, cluster, helm: str, workdir: Path, say) -> None:
        from dpe_devkit.testbed.secure_cluster import CnpgPostgres, StrimziKafka
        from dpe_devkit.testbed.tls import TestCA

        super().__init__(cluster, helm, NS, RELEASE, OURS["standin"]["rowsPerDepartment"], ANALYTICS_PREFIX)
        self.workdir, self.say = workdir, say
        self.kafka = StrimziKafka(workdir / "kafka", NS)
        self.pg = CnpgPostgres(workdir / "pg", NS)
        self.operator = self.kafka.operator(cluster)
        self.other_ca = TestCA(workdir / "other-ca", name="a CA that signed nothing here")
        self.user = doc_examples()["values-byo.yaml"]["externalKafka"]["strimzi"]["user"]
        self.passwords = {name: "scram-" + secrets.token_hex(12) for name in (self.user, "dpe-nodlq", "dpe-topics")}
        self.wrong = {"kafka": "scram-" + secrets.token_hex(12), "pg": secrets.token_hex(12)}
        self.departments: list[str] = []
        self.values_file = workdir / "values-byo.yaml"
        self.values_file.write_text(yaml.safe_dump(doc_examples()["values-byo.yaml"]))  # the doc's, as it is
        self.ours_file = workdir / "values-ours.yaml"
        self.ours_file.write_text(yaml.safe_dump(OURS))

    def values_args(self, departments: list[str], **sets: str) -> list[str]:
        args = ["-f", str(CHART / "values-offline.yaml"), "-f", str(HERE / "values-test-cluster.yaml"),
                "-f", str(self.values_file), "-f", str(self.ours_file),
                "--set", "departments={" + ",".join(departments) + "}"]
        for key, value in sets.items():
            args += ["--set", f"{key}={value}"]
        return args

    def render(self, departments: list[str], **sets: str) -> list[dict]:
        out = self.helm("template", RELEASE, str(CHART), *self.values_args(departments, **sets)).stdout
        return [d for d in yaml.safe_load_all(out) if d]

    # -- the servers and what their operators do ---------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        k, pg = self.kafka, self.pg
        self.cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": RESTRICTED}}])
        # Strimzi's KafkaTopic CRD: the chart renders KafkaTopics (kafka.topics.strimzi.enabled)
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        users = [k.user_secret(u, pw) for u, pw in self.passwords.items()]
        wrong_user = k.user_secret(self.user, self.wrong["kafka"])
        wrong_user["metadata"]["name"] = "dpe-ingest-wrong-password"
        other_ca = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "other-ca", "namespace": NS},
                    "stringData": {"ca.crt": self.other_ca.cert.read_text()}}
        self.cluster.apply(k.manifests() + pg.manifests() + users + [
            wrong_user, other_ca, pg.app_secret(name="pg-app-wrong-password", password=self.wrong["pg"])])
        self.cluster.kubectl("wait", "--for=condition=Established", "crd/kafkatopics.kafka.strimzi.io", "--timeout=60s")
        brokers = self.operator.run({"op": "wait_brokers", "n": k.replicas, "timeout": 480}, timeout=540)[0]
        # the User Operator: the users; exactly the doc's ACLs for the pipeline's user
        grants = pipeline_grants(NAMES)
        no_dlq_write = [g for g in grants if g != ("WRITE", "TOPIC", NAMES["kafka.dlqTopic"], "LITERAL")]
        assert len(no_dlq_write) == len(grants) - 1, grants
        elsewhere = pipeline_grants(with_budget({**NAMES, "producer.checkpointTopic": MISSING_TOPIC}))
        ops = [{"op": "add_user", "name": u, "password": pw} for u, pw in self.passwords.items()]
        ops += [{"op": "allow", "user": self.user, "grants": grants},
                {"op": "allow", "user": "dpe-nodlq", "grants": no_dlq_write},
                {"op": "allow", "user": "dpe-topics", "grants": elsewhere}]
        # the Topic Operator: the topics of the KafkaTopics the chart renders (before the install: the
        # producers check they exist as soon as they start)
        topics = [{"name": t["spec"]["topicName"], "partitions": t["spec"]["partitions"],
                   "replicas": t["spec"]["replicas"], "config": t["spec"].get("config") or {}}
                  for t in self.render(FIRST) if t["kind"] == "KafkaTopic"]
        assert sorted(t["name"] for t in topics) == sorted(TOPICS), topics
        ops.append({"op": "create_topics", "topics": topics})
        self.operator.run(*ops)
        self.kubectl("rollout", "status", f"statefulset/{pg.cluster}", "--timeout=300s", timeout=320)
        self.say(f"byo: Kafka {brokers} (SASL_SSL, 3 KRaft nodes) and PostgreSQL (ssl=on) up, users, "
                 f"{len(grants)} ACLs and {len(topics)} topics in {time.monotonic() - t0:.0f}s")

    def stop(self) -> None:
        self.helm("uninstall", RELEASE, "--wait", "--timeout", "3m", check=False)
        self.cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)
        self.cluster.kubectl("delete", "crd", "kafkatopics.kafka.strimzi.io", "--wait=false", check=False)

    # -- what is in the pipeline ---------------------------------------------------------------------------
    def psql(self, sql: str) -> str:
        return self.kubectl("exec", self.pg.pod, "-c", "postgres", "--", "psql", "-U", self.pg.user,
                            "-d", self.pg.database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql).stdout

    def check_rows(self, departments: list[str]) -> dict[str, dict]:
        want = rec.expected_rows(DATASET, departments, EXTRA_FIELDS)
        rec.assert_rows(want, rec.parse_rows(self.psql(rec.rows_sql("dpe_data")).splitlines()), "dpe_data")
        return want

    def wait_counts(self, want_rows: dict[str, dict], timeout: float = 300) -> None:
        want = rec.expected_counts(want_rows)
        deadline = time.monotonic() + timeout
        while True:
            got = rec.parse_counts(self.psql(rec.counts_sql(ANALYTICS_PREFIX)).splitlines())
            if all(got[k] == want[k] for k in want):
                return
            if time.monotonic() > deadline:
                rec.assert_counts(want, got, "the analytics tables")
            time.sleep(2)

    def served(self, departments: list[str]) -> dict[str, int]:
        """The stand-in's total per department, asked inside its pod as the producers ask it."""
        code = ("import json, sys, urllib.parse, urllib.request\n"
                "base = 'http://127.0.0.1:' + sys.argv[1] + '/data-fair/api/v1/datasets/dpe03existant/lines?'\n"
                "out = {}\n"
                "for d in sys.argv[2:]:\n"
                "    q = urllib.parse.urlencode({'size': 1, 'qs': 'code_departement_ban:\"%s\"' % d})\n"
                "    out[d] = json.load(urllib.request.urlopen(base + q, timeout=30))['total']\n"
                "print(json.dumps(out))\n")
        port = str(self.get("service", f"{RELEASE}-standin")["spec"]["ports"][0]["port"])
        return json.loads(self.kubectl("exec", f"deploy/{RELEASE}-standin", "--", "python", "-c", code, port,
                                       *departments).stdout)

    def jobs(self) -> dict[str, dict]:
        found: dict[str, dict] = {}
        for job in self.get("jobs", "-l", f"app.kubernetes.io/component=producer,app.kubernetes.io/instance={RELEASE}")["items"]:
            dep = job["metadata"]["labels"]["dpe-ingest/department"]
            if dep not in found or job["metadata"]["creationTimestamp"] > found[dep]["metadata"]["creationTimestamp"]:
                found[dep] = job
        return found

    def wait_reconciled(self, departments: list[str], timeout: float = SLOW) -> dict[str, dict]:
        """Every Job complete, the table's counts equal what the stand-in serves, then every row and
        column against the dataset, then the analytics tables against the dataset's counts."""
        self.wait_jobs_complete(departments, timeout)
        want = self.served(departments)
        assert want == {d: DATASET.count(d) for d in departments} and all(want.values()), want
        deadline = time.monotonic() + timeout
        while True:
            got = self.stored()
            if {d: got.get(d, 0) for d in departments} == want:
                break
            over = {d: got.get(d, 0) for d in departments if got.get(d, 0) > want[d]}
            assert not over, f"more rows than the API serves: {over} > {want}"
            assert time.monotonic() < deadline, f"table {got} != API {want}\n{self.describe()}"
            time.sleep(2)
        assert set(got) == set(departments), f"rows of departments never asked for: {set(got) - set(departments)}"
        rows = self.check_rows(departments)
        self.wait_counts(rows)
        return rows

    def job_running(self, department: str) -> bool:
        st = self.jobs()[department].get("status") or {}
        return bool(st.get("active")) and not st.get("succeeded") and not st.get("failed")

    def pod_logs(self, pod: str, container: str) -> str:
        res = self.kubectl("logs", pod, "-c", container, check=False)
        return res.stdout + res.stderr

    def topic_ends(self) -> dict[str, int | None]:
        return self.operator.run({"op": "end_offsets", "topics": TOPICS + [MISSING_TOPIC]})[0]

    def pg_state(self) -> tuple[str, str]:
        """Every table of the database and the sink's rows (count and a digest of their keys)."""
        tables = self.psql("SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables "
                           "WHERE schemaname = 'public'").strip()
        rows = self.psql("SELECT count(*) || ' ' || md5(coalesce(string_agg(numero_dpe, ',' ORDER BY numero_dpe), '')) "
                         "FROM dpe_data").strip()
        return tables, rows


@pytest.fixture(scope="module")
def byo(cluster, helm_bin, summary_line, tmp_path_factory):
    t0 = time.monotonic()
    say = lambda line: (print(line), summary_line(line))  # noqa: E731
    b = Byo(cluster, str(helm_bin), tmp_path_factory.mktemp("byo"), say)
    try:
        b.start()
        yield b
    finally:
        b.stop()
        say(f"byo: tests/cluster/test_cluster_byo.py took {time.monotonic() - t0:.0f}s (servers to teardown)")


# ---------------------------------------------------------------------------------------------------
# install: the doc's Strimzi + CloudNativePG example, exact reconciliation
# ---------------------------------------------------------------------------------------------------
def test_install_with_the_docs_presets_reconciles_every_department(byo):
    byo.departments = list(FIRST)
    t0 = time.monotonic()
    byo.helm("install", RELEASE, str(CHART), *byo.values_args(FIRST), "--wait", "--wait-for-jobs", "--timeout", "10m")
    took = time.monotonic() - t0
    rows = byo.wait_reconciled(FIRST)
    byo.say(f"byo: install --wait --wait-for-jobs {took:.0f}s; {len(rows)} rows reconciled")

    # the topics: 3 replicas, all in sync, min.insync.replicas 2, as the chart's KafkaTopics say
    desc = byo.operator.run({"op": "describe_topics", "names": TOPICS})[0]
    kafkatopics = {t["spec"]["topicName"]: t["spec"] for t in byo.get("kafkatopics")["items"]}
    assert set(kafkatopics) == set(TOPICS), kafkatopics.keys()
    for name, spec in kafkatopics.items():
        d = desc[name]
        assert spec["replicas"] == 3 and spec["config"]["min.insync.replicas"] == 2, spec
        assert len(d["partitions"]) == spec["partitions"], (name, d)
        assert all(len(p["replicas"]) == 3 and len(p["isr"]) == 3 for p in d["partitions"].values()), (name, d)
        assert d["config"]["min.insync.replicas"] == "2", (name, d["config"])
    # the pipeline's database connections are TLS (verify-full against pg-ca: the chart's PGSSLMODE)
    out = byo.psql("SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                   f"WHERE a.usename = '{byo.pg.user}' AND a.backend_type = 'client backend' "
                   "AND a.pid <> pg_backend_pid() AND a.client_addr IS NOT NULL")
    n, all_tls = out.strip().split("|")
    assert int(n) >= 2 and all_tls == "t", out  # consumer and analytics at least
    # the producers shared the API budget through its group (the granted ACLs, the chart's KafkaTopic):
    # no fallback to the static share
    for pod in byo.get("pods", "-l", "app.kubernetes.io/component=producer")["items"]:
        text = byo.pod_logs(pod["metadata"]["name"], "producer")
        assert "budget_fallback" not in text and "budget_share" in text, (pod["metadata"]["name"], text[-3000:])


def test_a_broker_pod_deleted_while_a_producer_runs_loses_and_duplicates_nothing(byo):
    """RF 3 / min ISR 2: ``helm upgrade`` adds 2A; once its first rows are stored, while its Job runs, the
    broker leading the checkpoint topic (every producer writes there) is deleted.  Every Job succeeds with
    its one pod, the table is exactly the stand-in's rows, the topic holds each key once."""
    before = {d: j["metadata"]["uid"] for d, j in byo.jobs().items()}
    ckpt = NAMES["producer.checkpointTopic"]
    leader = byo.operator.run({"op": "describe_topics", "names": [ckpt]})[0][ckpt]["partitions"]["0"]["leader"]
    victim = byo.kafka.pod(leader)
    old_uid = byo.get("pod", victim)["metadata"]["uid"]
    byo.departments = FIRST + [FAULT]
    byo.helm("upgrade", RELEASE, str(CHART), *byo.values_args(byo.departments))
    served = byo.served([FAULT])[FAULT]
    deadline = time.monotonic() + 180
    while FAULT not in byo.jobs() or byo.stored().get(FAULT, 0) < 1:
        assert time.monotonic() < deadline, f"no rows of {FAULT} after 180s\n{byo.describe()}"
        time.sleep(0.5)
    running, stored = byo.job_running(FAULT), byo.stored().get(FAULT, 0)
    byo.kubectl("delete", "pod", victim, "--wait=false")
    after = byo.job_running(FAULT)
    byo.say(f"byo: broker {victim} (leader of {ckpt}) deleted mid-run: Job of {FAULT} running before {running}, "
            f"after {after}; {stored} of its {served} rows stored just before")
    assert running and after and 0 < stored < served, \
        f"the fault did not land mid-run: Job running {running}/{after}, {stored} of {served} rows stored"

    rows = byo.wait_reconciled(byo.departments)
    jobs = byo.jobs()
    assert {d: jobs[d]["metadata"]["uid"] for d in FIRST} == before, "the Jobs of 69, 01, 38 must be left alone"
    for dep, job in jobs.items():
        st = job["status"]
        assert st.get("succeeded") == 1 and not st.get("failed"), (dep, st)
    # the broker came back (same name, new pod) and caught up: every replica in sync again
    deadline = time.monotonic() + 300
    while True:
        res = byo.kubectl("get", "pod", victim, "-o", "json", check=False)  # NotFound while it is re-created
        pod = json.loads(res.stdout) if res.returncode == 0 else {"metadata": {"uid": old_uid}, "status": {}}
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
        desc = byo.operator.run({"op": "describe_topics", "names": TOPICS})[0] if ready else {}
        if ready and pod["metadata"]["uid"] != old_uid and all(
                len(p["isr"]) == 3 for d in desc.values() for p in d["partitions"].values()):
            break
        assert time.monotonic() < deadline, f"{victim} not back in sync after 300s: {desc}\n{byo.describe()}"
        time.sleep(3)
    # nothing duplicated in Kafka either: the idempotent producers' retries to the new leaders
    keys = byo.operator.run({"op": "keys", "topic": NAMES["kafka.topic"], "timeout": 120})[0]
    twice = {k: n for k, n in keys.items() if n > 1}
    assert not twice, f"{len(twice)} keys more than once in {NAMES['kafka.topic']}: {list(twice.items())[:5]}"
    assert set(rows) <= set(keys), "rows in the table that the topic does not hold"


# ---------------------------------------------------------------------------------------------------
# bad settings: exit 2, one line naming the setting, the Job failed at once, nothing written
# ---------------------------------------------------------------------------------------------------
#: case -> (what runs: the producer Job of BAD or a pod of the consumer's Deployment, the chart values that
#: make it bad, the container that must fail, what its one error line must name)
CASES = {
    "wrong-scram-password": ("producer", {"externalKafka.sasl.existingSecret": "dpe-ingest-wrong-password"},
                             "wait-for-kafka", ["KAFKA_SASL_PASSWORD"]),
    "ca-that-did-not-sign-the-brokers": ("producer", {"externalKafka.tls.caSecret": "other-ca"},
                                         "wait-for-kafka", ["KAFKA_SSL_CA_FILE"]),
    "no-write-acl-on-the-dlq": ("producer", {"externalKafka.strimzi.user": "dpe-nodlq"}, "producer",
                                [f"WRITE on topic {NAMES['kafka.dlqTopic']}", "User:dpe-nodlq"]),
    "topic-missing-with-createtopics-false": ("producer", {"externalKafka.strimzi.user": "dpe-topics",
                                                           "producer.checkpointTopic": MISSING_TOPIC},
                                              "producer", ["KAFKA_CREATE_TOPICS=false", MISSING_TOPIC]),
    "postgresql-ca-that-did-not-sign-the-server": ("consumer", {"externalPostgresql.caSecret": "other-ca"},
                                                   "consumer", ["PGSSLROOTCERT"]),
    "wrong-database-password": ("consumer", {"externalPostgresql.existingSecret": "pg-app-wrong-password"},
                                "consumer", ["PGPASSWORD"]),
}


def _bad_object(byo: Byo, case: str) -> dict:
    """The chart's own producer Job (department BAD) or consumer pod, rendered with the case's values and
    renamed: the Job is not labelled as the release's (its pods keep their labels: the stand-in's
    NetworkPolicy lets the release's producers in), the consumer pod not as the Deployment's (its
    ReplicaSet would adopt it)."""
    kind, sets, _, _ = CASES[case]
    docs = byo.render([BAD], **sets)
    labels = {"dpe-test/bad-input": case}
    if kind == "producer":
        (job,) = [d for d in docs if d["kind"] == "Job" and d["metadata"]["labels"].get("dpe-ingest/department") == BAD]
        job = copy.deepcopy(job)
        job["metadata"] = {"name": f"bad-{case}"[:63], "namespace": NS, "labels": labels}
        job["spec"]["template"]["metadata"]["labels"].update(labels)
        return job
    (dep,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == f"{RELEASE}-consumer"]
    spec = copy.deepcopy(dep["spec"]["template"]["spec"])
    spec["restartPolicy"] = "Never"
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"bad-{case}"[:63], "namespace": NS,
                                                            "labels": labels}, "spec": spec}


def _terminated(pod: dict, container: str) -> dict | None:
    for status in pod["status"].get("initContainerStatuses", []) + pod["status"].get("containerStatuses", []):
        if status["name"] == container:
            return (status.get("state") or {}).get("terminated")
    return None


@pytest.fixture(scope="module")
def bad_runs(byo):
    """Every case at once (they are independent): the objects applied, then each one's end state."""
    kafka_before, pg_before = byo.topic_ends(), byo.pg_state()
    assert kafka_before[MISSING_TOPIC] is None
    objects = {case: _bad_object(byo, case) for case in CASES}
    byo.cluster.apply(list(objects.values()))
    results: dict[str, dict] = {}
    deadline = time.monotonic() + 300
    while len(results) < len(CASES):
        by_case: dict[str, list] = {}
        for p in byo.get("pods", "-l", "dpe-test/bad-input")["items"]:
            by_case.setdefault(p["metadata"]["labels"]["dpe-test/bad-input"], []).append(p)
        for case, (kind, _, container, _) in CASES.items():
            if case in results or case not in by_case:
                continue
            pod = sorted(by_case[case], key=lambda p: p["metadata"]["creationTimestamp"])[0]
            if kind == "producer":
                job = byo.get("job", objects[case]["metadata"]["name"])
                failed = [c for c in job["status"].get("conditions", []) if c["type"] == "Failed" and c["status"] == "True"]
                # a second pod is a retry: the Job did not fail at once (no use waiting for its backoffLimit)
                if failed or len(by_case[case]) > 1:
                    results[case] = {"job": job, "pods": len(by_case[case]), "terminated": _terminated(pod, container),
                                     "log": byo.pod_logs(pod["metadata"]["name"], container)}
            elif pod["status"].get("phase") in ("Failed", "Succeeded"):
                results[case] = {"terminated": _terminated(pod, container),
                                 "log": byo.pod_logs(pod["metadata"]["name"], container)}
        assert time.monotonic() < deadline, f"bad-input runs not over after 300s: {sorted(set(CASES) - set(results))}" \
                                            f"\n{byo.describe()}"
        time.sleep(2)
    kafka_after, pg_after = byo.topic_ends(), byo.pg_state()
    yield {"results": results, "kafka": (kafka_before, kafka_after), "pg": (pg_before, pg_after)}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_setting_fails_at_once_naming_it_and_writes_nothing(byo, bad_runs, case):
    kind, _, container, needles = CASES[case]
    res = bad_runs["results"][case]
    log = res["log"]
    assert res["terminated"] and res["terminated"]["exitCode"] == 2, \
        f"{case}: container {container} ended {res['terminated']}, expected exit 2:\n{log[-3000:]}"
    errors = [line for line in log.splitlines() if "event=config_error" in line]
    assert len(errors) == 1, f"{case}: {len(errors)} config_error lines, expected one:\n{log[-3000:]}"
    (line,) = errors
    assert "level=error" in line and all(n in line for n in needles), f"{case}: {line}"
    if kind == "producer":
        # the Job failed at once (its podFailurePolicy), not after backoffLimit retries
        conditions = {c["type"]: c for c in res["job"]["status"].get("conditions", [])}
        assert res["pods"] == 1 and "Failed" in conditions, (case, res["pods"], res["job"]["status"])
        assert conditions["Failed"]["reason"] == "PodFailurePolicy", conditions["Failed"]
    print(f"{case}: {container} exit 2: {line}")
    # nothing written: no message on any topic, no topic created, the database as it was
    before, after = bad_runs["kafka"]
    assert after == before, f"the topics changed during the bad runs: {before} -> {after}"
    assert after[MISSING_TOPIC] is None
    before, after = bad_runs["pg"]
    assert after == before, f"the database changed during the bad runs: {before} -> {after}"


# ---------------------------------------------------------------------------------------------------
# secrets
# ---------------------------------------------------------------------------------------------------
def _pem_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("-----")]


def test_no_password_key_or_certificate_in_any_log_values_or_status(byo, bad_runs, cluster):
    k, pg = byo.kafka, byo.pg
    secret_strings = {f"password of {u}": pw for u, pw in byo.passwords.items()}
    secret_strings.update({"the wrong SCRAM password": byo.wrong["kafka"], "the database password": pg.password,
                           "the wrong database password": byo.wrong["pg"]})
    pems = {"broker key": k.broker_cert.key, "operator key": k.operator_cert.key, "cluster CA key": k.ca.key,
            "PostgreSQL server key": pg.server_cert.key, "PostgreSQL CA key": pg.ca.key,
            "broker certificate": k.broker_cert.cert, "cluster CA certificate": k.ca.cert,
            "PostgreSQL server certificate": pg.server_cert.cert, "PostgreSQL CA certificate": pg.ca.cert,
            "the other CA's certificate": byo.other_ca.cert}
    for what, path in pems.items():
        for i, line in enumerate(_pem_lines(path)):
            secret_strings[f"{what}, line {i + 1}"] = line

    texts: dict[str, str] = {}
    for pod in byo.get("pods")["items"]:
        name = pod["metadata"]["name"]
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            texts[f"pod {name}"] = texts.get(f"pod {name}", "") + byo.pod_logs(name, c["name"])
    assert any(t.startswith("pod bad-") for t in texts) and any(t.startswith(f"pod {k.statefulset}-") for t in texts)
    assert sum(t.startswith(f"pod {RELEASE}-producer-") for t in texts) == len(byo.departments), sorted(texts)
    for args in (["get", "values", RELEASE], ["get", "values", RELEASE, "--all"], ["get", "manifest", RELEASE]):
        texts["helm " + " ".join(args)] = byo.helm(*args).stdout

    # dpe-ingest status from a machine on the cluster's network, with the pipeline user's credentials
    env = {key: v for key, v in os.environ.items() if not key.startswith(("KAFKA_", "PG", "DATABASE_"))}
    env.update(KUBECONFIG=str(cluster.node_kubeconfig), KAFKA_BOOTSTRAP_SERVERS=k.bootstrap,
               KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
               KAFKA_SASL_USERNAME=byo.user, KAFKA_SASL_PASSWORD=byo.passwords[byo.user],
               KAFKA_SSL_CA_FILE=str(k.ca.cert), DATABASE_URL="postgresql://", PGHOST=pg.host, PGPORT="5432",
               PGDATABASE=pg.database, PGUSER=pg.user, PGPASSWORD=pg.password, PGSSLROOTCERT=str(pg.ca.cert))
    status = [sys.executable, "-m", "dpe_ingest", "status", "--kube", "--namespace", NS, "--release", RELEASE,
              "--timeout", "30"]
    res = cluster.run_in_network(status + ["--json"], env=env, timeout=180)
    assert res.returncode == 0, f"status exit {res.returncode}:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    doc = json.loads(res.stdout)
    assert doc["overall"]["state"] == "done" and all(s["ok"] is True for s in doc["sources"].values()), doc
    served = byo.served(byo.departments)
    deps = {d["department"]: d for d in doc["departments"]}
    for dep in byo.departments:
        assert deps[dep]["api_total"] == deps[dep]["produced"] == deps[dep]["stored"] == served[dep], deps[dep]
    texts["status --json"] = res.stdout + res.stderr
    res = cluster.run_in_network(status, env=env, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    texts["status"] = res.stdout + res.stderr

    leaks = [f"{what} in {where}" for where, text in texts.items() for what, s in secret_strings.items() if s in text]
    leaks += [f"a PEM block in {where}" for where, text in texts.items() if re.search(r"-----BEGIN [A-Z ]+-----", text)]
    assert not leaks, leaks
    print(f"searched {len(texts)} logs and outputs ({sum(map(len, texts.values()))} characters) for "
          f"{len(secret_strings)} secret strings: none found")
