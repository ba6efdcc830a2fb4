"""The chart, installed and run for real: pods on a single-node Kubernetes (``testbed.cluster``).

What users do, in order, on one release: ``helm install --wait --wait-for-jobs`` with departments
69, 01 and 38 and the in-cluster ADEME stand-in, into a namespace enforcing Pod Security
``restricted``; ``helm test``; ``kubectl logs`` of the producers; ``dpe-ingest status --kube``;
``helm upgrade`` adding departments while pods are deleted under the pipeline (the consumer, the
PostgreSQL pod, the Kafka pod, each while the new department's Job runs); ``helm uninstall``.  After
each step the rows in PostgreSQL (read with ``kubectl exec`` into the postgres pod) are exactly the
stand-in's rows, every stored column (``tests/reconcile.py``, from the seeded dataset), the analytics
tables hold the counts of those rows, and no Job has failed.  The tests of this module run in order and
share the release.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import reconcile as rec
from dpe_ingest.standin.data import Dataset
from noderelease import NodeRelease

pytestmark = pytest.mark.cluster

HERE = Path(__file__).resolve().parent
CHART = HERE.parents[1] / "charts" / "dpe-ingest"
NS = "dpe-e2e"
RELEASE = "dpe"
RESTRICTED = {f"pod-security.kubernetes.io/{m}": "restricted" for m in ("enforce", "warn", "audit")}
FIRST = ["69", "01", "38"]
SLOW = 600  # generous bound of a wait, only reached on failure
_VALUES = yaml.safe_load((HERE / "values-test-cluster.yaml").read_text())
#: what the in-cluster stand-in serves (its seed is the default, 1) and the fields the producers select
DATASET = Dataset(rows_per_department=_VALUES["standin"]["rowsPerDepartment"])
EXTRA_FIELDS = tuple(f for f in _VALUES["ademe"]["extraFields"].split(",") if f)
ANALYTICS_PREFIX = "dpe_analytics"  # the chart's analytics.tablePrefix


class Release(NodeRelease):
    """The release under test and the ways a user looks at it (helm, kubectl, psql: NodeRelease's)."""

    def __init__(self, cluster, helm: str, say=print):
        super().__init__(cluster, helm, NS, RELEASE, _VALUES["standin"]["rowsPerDepartment"], ANALYTICS_PREFIX)
        self.say = say
        self.departments: list[str] = []

    def values_args(self, departments: list[str]) -> list[str]:
        return ["-f", str(CHART / "values-offline.yaml"), "-f", str(HERE / "values-test-cluster.yaml"),
                "--set", "departments={" + ",".join(departments) + "}"]

    # -- what is in the pipeline (psql and stored: NodeRelease's) ----------------------------------------
    def table_rows(self) -> dict[str, dict]:
        """Every row of dpe_data, every stored column."""
        return rec.parse_rows(self.psql(rec.rows_sql("dpe_data")).splitlines())

    def analytics_counts(self) -> dict:
        return rec.parse_counts(self.psql(rec.counts_sql(ANALYTICS_PREFIX)).splitlines())

    def check_rows(self, departments: list[str]) -> dict[str, dict]:
        """dpe_data is exactly the dataset's rows of ``departments``; returns them."""
        want = rec.expected_rows(DATASET, departments, EXTRA_FIELDS)
        rec.assert_rows(want, self.table_rows(), "dpe_data in the cluster")
        return want

    def wait_counts(self, want_rows: dict[str, dict], timeout: float = 300) -> None:
        """The analytics tables reach the counts of ``want_rows`` (the dataset's, not the table's)."""
        want = rec.expected_counts(want_rows)
        t0 = time.monotonic()
        while True:
            got = self.analytics_counts()
            if all(got[k] == want[k] for k in want):
                if time.monotonic() - t0 > 10:  # not a check: what a user of the analytics would see
                    self.say(f"cluster: the analytics counts caught up {time.monotonic() - t0:.0f}s after dpe_data")
                return
            if time.monotonic() - t0 > timeout:
                try:
                    rec.assert_counts(want, got, "the analytics tables in the cluster")
                except AssertionError as exc:
                    logs = self.kubectl("logs", "-l", "app.kubernetes.io/component=analytics", "--tail=40",
                                        check=False)
                    raise AssertionError(f"{exc}\n{self.describe()}\n{logs.stdout}{logs.stderr}") from None
            time.sleep(2)

    def served(self, departments: list[str]) -> dict[str, int]:
        """The stand-in's total per department, asked inside its own pod as the producers ask it."""
        code = ("import json, sys, urllib.parse, urllib.request\n"
                "base = 'http://127.0.0.1:' + sys.argv[1] + '/data-fair/api/v1/datasets/dpe03existant/lines?'\n"
                "out = {}\n"
                "for d in sys.argv[2:]:\n"
                "    q = urllib.parse.urlencode({'size': 1, 'qs': 'code_departement_ban:\"%s\"' % d})\n"
                "    out[d] = json.load(urllib.request.urlopen(base + q, timeout=30))['total']\n"
                "print(json.dumps(out))\n")
        port = str(self.get("service", f"{RELEASE}-standin")["spec"]["ports"][0]["port"])
        res = self.kubectl("exec", f"deploy/{RELEASE}-standin", "--", "python", "-c", code, port, *departments)
        return json.loads(res.stdout)

    def wait_reconciled(self, departments: list[str], timeout: float = SLOW) -> dict[str, int]:
        """Every Job complete, then the table equals what the stand-in serves, department by department:
        the counts first (while the consumer catches up), then every row and column against the
        dataset, then the analytics tables against the dataset's counts."""
        self.wait_jobs_complete(departments, timeout)
        want = self.served(departments)
        assert want == {d: DATASET.count(d) for d in departments}, f"the stand-in serves {want}: not the dataset"
        assert all(n > 0 for n in want.values()), want
        deadline = time.monotonic() + timeout
        while True:
            got = self.stored()
            if {d: got.get(d, 0) for d in departments} == want:
                break
            over = {d: got.get(d, 0) for d in departments if got.get(d, 0) > want[d]}
            assert not over, f"more rows than the API serves: {over} > {want}"
            assert time.monotonic() < deadline, f"table {got} != API {want}\n{self.describe()}"
            time.sleep(2)
        extra = set(got) - set(departments)
        assert not extra, f"rows of departments never asked for: {extra}"
        rows = self.check_rows(departments)
        self.wait_counts(rows)
        return got

    def wait_rows(self, department: str, at_least: int = 1, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.stored().get(department, 0) < at_least:
            assert time.monotonic() < deadline, f"no rows of {department} after {timeout}s\n{self.describe()}"
            time.sleep(0.5)

    def pod_of(self, component: str) -> dict:
        pods = [p for p in self.get("pods", "-l", f"app.kubernetes.io/component={component}")["items"]
                if not p["metadata"].get("deletionTimestamp")]
        assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
        return pods[0]

    def wait_ready(self, component: str, not_uid: str | None = None, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                pod = self.pod_of(component)
                ready = any(c["type"] == "Ready" and c["status"] == "True"
                            for c in (pod.get("status") or {}).get("conditions", []))
                if ready and pod["metadata"]["uid"] != not_uid:
                    return pod
            except AssertionError:
                pass
            assert time.monotonic() < deadline, f"{component} not Ready after {timeout}s\n{self.describe()}"
            time.sleep(1)

    def upgrade_adding(self, new: str) -> None:
        self.departments = self.departments + [new]
        self.helm("upgrade", RELEASE, str(CHART), *self.values_args(self.departments))
        deadline = time.monotonic() + 120
        while new not in self.jobs():
            assert time.monotonic() < deadline, f"no Job for {new}\n{self.describe()}"
            time.sleep(0.5)

    def job_running(self, department: str) -> bool:
        """The newest Job of ``department`` has a pod running and has neither succeeded nor failed."""
        st = self.jobs()[department].get("status") or {}
        return bool(st.get("active")) and not st.get("succeeded") and not st.get("failed")

    def upgrade_deleting_mid_run(self, new: str, component: str) -> None:
        """``helm upgrade`` adding department ``new``; once its first rows are stored, while its Job
        still runs and the table holds fewer of its rows than the stand-in serves, the pod of
        ``component`` is deleted; its replacement must come up and every department reconcile exactly.
        The in-progress state at the deletion is asserted (read just before it, the Job again just
        after it) and printed."""
        pod = self.pod_of(component)
        self.upgrade_adding(new)
        served = self.served([new])[new]
        self.wait_rows(new)
        before, stored = self.job_running(new), self.stored().get(new, 0)
        self.kubectl("delete", "pod", pod["metadata"]["name"], "--wait=false")
        after = self.job_running(new)
        self.say(f"cluster: {component} pod deleted mid-run: Job of {new} running before the deletion {before}, "
                 f"after it {after}; {stored} of its {served} rows stored just before")
        assert before and after and 0 < stored < served, \
            f"the fault did not land mid-run: Job running {before}/{after}, {stored} of {served} rows stored"
        self.wait_ready(component, not_uid=pod["metadata"]["uid"])
        self.wait_reconciled(self.departments)


@pytest.fixture(scope="module")
def release(cluster, helm_bin, summary_line):
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": RESTRICTED}}])
    rel = Release(cluster, str(helm_bin), say=lambda line: (print(line), summary_line(line)))
    yield rel
    rel.helm("uninstall", RELEASE, "--wait", check=False)
    cluster.kubectl("delete", "namespace", NS, "--wait=false", check=False)


# ---------------------------------------------------------------------------------------------------
# the node
# ---------------------------------------------------------------------------------------------------
def test_the_node_cannot_reach_outside_the_machine(cluster):
    """Pods (and the node) live in a network namespace with no route out: a connection to any other
    address fails at once, no DNS name outside cluster.local resolves, the cluster's own names do."""
    from dpe_devkit.testbed.images import CLUSTER_IMAGES

    ns = "netcheck"
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}])
    probe = (
        "import errno, json, socket\n"
        "out = {}\n"
        "for host in ('192.0.2.10', '10.1.2.3', '8.8.8.8'):\n"
        "    s = socket.socket(); s.settimeout(10)\n"
        "    try:\n"
        "        s.connect((host, 443)); out[host] = 'connected'\n"
        "    except socket.timeout:\n"
        "        out[host] = 'timed out'\n"
        "    except OSError as e:\n"
        "        out[host] = errno.errorcode.get(e.errno, str(e))\n"
        "for name in ('example.com', 'data.ademe.fr', 'kubernetes.default.svc.cluster.local'):\n"
        "    try:\n"
        "        out[name] = socket.gethostbyname(name)\n"
        "    except OSError as e:\n"
        "        out[name] = 'unresolved'\n"
        "import struct\n"
        "def rcode(name):\n"  # one raw DNS query to the cluster's DNS Service: the answer's RCODE
        "    q = struct.pack('>HHHHHH', 0x1234, 0x0100, 1, 0, 0, 0)\n"
        "    q += b''.join(bytes([len(p)]) + p.encode() for p in name.split('.')) + b'\\0' + struct.pack('>HH', 1, 1)\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)\n"
        "    s.sendto(q, ('10.96.0.10', 53))\n"
        "    return s.recv(512)[3] & 0x0F\n"
        "out['rcode'] = {n: rcode(n) for n in ('example.com', 'data.ademe.fr', 'kubernetes.default.svc.cluster.local')}\n"
        "print(json.dumps(out))\n")
    out = cluster.run_pod(ns, "probe", CLUSTER_IMAGES["producer"], ["python", "-c", probe])
    got = json.loads(out.strip().splitlines()[-1])
    for host in ("192.0.2.10", "10.1.2.3", "8.8.8.8"):
        # refused by the routing table at once (no route: no packet left), not a timeout after a SYN
        assert got[host] in ("ENETUNREACH", "EHOSTUNREACH"), got
    assert got["example.com"] == got["data.ademe.fr"] == "unresolved", got
    assert got["kubernetes.default.svc.cluster.local"] == "10.96.0.1", got
    # CoreDNS forwards nothing: NXDOMAIN (3) for any name outside cluster.local, NOERROR (0) inside
    assert got["rcode"] == {"example.com": 3, "data.ademe.fr": 3, "kubernetes.default.svc.cluster.local": 0}, got
    # no interface of the machine's own network leads into the node's namespace
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert cluster.netns not in links, links
    routes = subprocess.run(["ip", "-n", cluster.netns, "route", "show", "table", "all"], capture_output=True,
                            text=True, check=True).stdout
    assert "default" not in routes, routes


# ---------------------------------------------------------------------------------------------------
# install, look at it, upgrade under faults, uninstall
# ---------------------------------------------------------------------------------------------------
def test_install_runs_every_department_into_postgresql(release):
    release.departments = list(FIRST)
    t0 = time.monotonic()
    release.helm("install", RELEASE, str(CHART), *release.values_args(FIRST), "--wait", "--wait-for-jobs",
                 "--timeout", "10m")
    took = time.monotonic() - t0
    jobs = release.wait_jobs_complete(FIRST)
    assert set(jobs) == set(FIRST)
    release.wait_ready("consumer")
    got = release.wait_reconciled(FIRST)
    print(f"\ninstall --wait --wait-for-jobs: {took:.0f}s; rows {got}")


def test_helm_test_passes(release):
    res = release.helm("test", RELEASE, "--logs", "--timeout", "5m")
    assert "Phase:          Succeeded" in res.stdout or "Succeeded" in res.stdout, res.stdout


def test_producer_logs_show_each_department_progress(release):
    """The README's way of watching: kubectl logs -l app.kubernetes.io/component=producer --prefix."""
    res = release.kubectl("logs", "-l", "app.kubernetes.io/component=producer", "--prefix", "--tail=-1",
                          "--max-log-requests", "20")
    for dep in FIRST:
        lines = [line for line in res.stdout.splitlines() if f"department={dep}" in line]
        assert any("event=page" in line and "rate=" in line for line in lines), (dep, res.stdout[-3000:])
        assert any(re.search(r"event=(done|finished)", line) for line in lines), (dep, lines[-5:])
        assert all(line.startswith("[pod/") for line in lines), lines[:3]


def test_status_in_the_cluster_network_shows_every_department_complete(release, cluster):
    """``dpe-ingest status --kube`` from a machine on the cluster's network (names resolved by the
    cluster's DNS), as docs/run-and-status.md suggests for a cluster."""
    secret = release.get("secret", f"{RELEASE}-postgresql")
    import base64
    password = base64.b64decode(secret["data"]["password"]).decode()
    svc = f"{NS}.svc.cluster.local"
    env = dict(os.environ, KUBECONFIG=str(cluster.node_kubeconfig),
               KAFKA_BOOTSTRAP_SERVERS=f"{RELEASE}-kafka.{svc}:9092",
               DATABASE_URL=f"postgresql://dpe:{password}@{RELEASE}-postgresql.{svc}:5432/dpe")
    res = cluster.run_in_network([sys.executable, "-m", "dpe_ingest", "status", "--kube", "--namespace", NS,
                                  "--release", RELEASE, "--json", "--timeout", "30"], env=env, timeout=180)
    assert res.returncode == 0, f"status exit {res.returncode}:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    doc = json.loads(res.stdout)
    assert doc["overall"]["state"] == "done", doc["overall"]
    assert all(src["ok"] is True for src in doc["sources"].values()), doc["sources"]
    deps = {d["department"]: d for d in doc["departments"]}
    assert set(deps) == set(FIRST), deps.keys()
    served = release.served(FIRST)
    for dep in FIRST:
        d = deps[dep]
        assert d["state"] == "done" and d["job"]["state"] == "Succeeded", d
        assert d["api_total"] == d["produced"] == d["stored"] == served[dep] and d["progress"] == 1.0, d


def test_upgrade_adds_2A_alone_and_survives_the_consumer_pod_deleted(release):
    before = {d: j["metadata"]["uid"] for d, j in release.jobs().items()}
    release.upgrade_deleting_mid_run("2A", "consumer")
    after = {d: j["metadata"]["uid"] for d, j in release.jobs().items()}
    assert {d: after[d] for d in FIRST} == before, "the Jobs of 69, 01, 38 must be left alone"
    assert after["2A"] not in before.values()


def test_postgresql_pod_deleted_mid_run_keeps_every_row(release):
    release.upgrade_deleting_mid_run("2B", "postgresql")  # the rows stored before the deletion are all there


def test_kafka_pod_deleted_while_producers_run(release):
    release.upgrade_deleting_mid_run("971", "kafka")


def test_a_changed_row_or_count_fails_the_reconciliation(release):
    """Counter-test of the checks above: one label flipped in dpe_data, one count changed in the
    analytics tables, behind the checks' back, and each check fails naming it; restored, they pass."""
    want = release.check_rows(release.departments)
    key = sorted(want)[len(want) // 2]
    label = want[key]["etiquette_dpe"]
    flipped = "A" if label != "A" else "B"
    release.psql(f"UPDATE dpe_data SET etiquette_dpe = '{flipped}' WHERE numero_dpe = '{key}'")
    try:
        with pytest.raises(AssertionError, match=f"different: {key} .*etiquette_dpe '{flipped}' in the table"):
            release.check_rows(release.departments)
    finally:
        release.psql(f"UPDATE dpe_data SET etiquette_dpe = '{label}' WHERE numero_dpe = '{key}'")
    release.check_rows(release.departments)
    dep = want[key]["departement"]
    where = f"WHERE departement = '{dep}' AND label = '{label}'"
    release.psql(f"UPDATE {ANALYTICS_PREFIX}_labels SET n = n + 1 {where}")
    try:
        with pytest.raises(AssertionError, match=f"labels of department {dep}, {label}: "):
            release.wait_counts(want, timeout=0)
    finally:
        release.psql(f"UPDATE {ANALYTICS_PREFIX}_labels SET n = n - 1 {where}")
    release.wait_counts(want, timeout=0)


def test_uninstall_leaves_what_the_docs_say(release):
    """docs/chart.md: the password Secret, the two data volumes and the finished helm test pods stay."""
    release.helm("uninstall", RELEASE, "--wait", "--timeout", "5m")
    tests = {f"{RELEASE}-test-kafka", f"{RELEASE}-test-postgresql"}
    deadline = time.monotonic() + 180
    while True:
        pods = {p["metadata"]["name"]: p["status"].get("phase") for p in release.get("pods")["items"]}
        if set(pods) <= tests:
            break
        assert time.monotonic() < deadline, f"pods left after uninstall: {pods}"
        time.sleep(1)
    assert pods == {name: "Succeeded" for name in tests}, pods
    left = {f"{o['kind']}/{o['metadata']['name']}"
            for kind in ("secrets", "pvc", "configmaps", "services", "jobs", "cronjobs", "statefulsets",
                         "deployments")
            for o in release.get(kind, "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]}
    assert left == {f"Secret/{RELEASE}-postgresql", f"PersistentVolumeClaim/data-{RELEASE}-postgresql-0",
                    f"PersistentVolumeClaim/data-{RELEASE}-kafka-0"}, left
