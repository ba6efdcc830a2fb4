"""The chart's NetworkPolicies, enforced on the test node (issue 23).

The node's policy engine is kube-router's firewall (``testbed.cluster``).  One release in a namespace
of its own, with the in-cluster stand-in serving a small dataset: while the pipeline runs departments
69, 01 and 38 to exact reconciliation (every row and column, the analytics counts), probe pods try
to open Kafka's and PostgreSQL's ports, through their Services and at the pods' own addresses:

- a pod of another namespace wearing the consumer's labels, and a pod of the release's namespace
  without the pipeline's labels: refused (or timed out) within a few seconds;
- a pod of the release's namespace labelled as the chart's test pods: connects (the probe can connect
  when it is let in);
- after ``helm upgrade --set networkPolicy.enabled=false``: the two refused pods connect, so the
  engine, not a broken network, refused them.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

import reconcile as rec
from dpe_ingest.standin.data import Dataset

pytestmark = pytest.mark.cluster

HERE = Path(__file__).resolve().parent
CHART = HERE.parents[1] / "charts" / "dpe-ingest"
NS = "dpe-netpol"
OUTSIDE = "dpe-netpol-outside"
RELEASE = "np"
DEPARTMENTS = ["69", "01", "38"]
ROWS = 300  # per department: small, the point is the network
#: the producers read 20 rows a call, 0.3 calls a second: ~50 s per department, so that the probes run
#: while the Jobs do (asserted)
SLOW_PRODUCERS = ["--set", "ademe.pageSize=20", "--set", "ademe.maxRps=0.3"]
RESTRICTED = {f"pod-security.kubernetes.io/{m}": "restricted" for m in ("enforce", "warn", "audit")}
SLOW = 600  # a generous bound, only reached on failure
_VALUES = yaml.safe_load((HERE / "values-test-cluster.yaml").read_text())
DATASET = Dataset(rows_per_department=ROWS)
EXTRA_FIELDS = tuple(f for f in _VALUES["ademe"]["extraFields"].split(",") if f)
ANALYTICS_PREFIX = "dpe_analytics"
CONNECT_TIMEOUT = 4  # seconds a probe waits for a connection

#: connects to each host:port given, all at once, and prints {target: connected|refused|timed out|error}
PROBE = """
import errno, json, socket, sys, threading
out = {}
def probe(target):
    host, port = target.rsplit(':', 1)
    try:
        socket.create_connection((host, int(port)), timeout=%d).close()
        out[target] = 'connected'
    except socket.timeout:
        out[target] = 'timed out'
    except ConnectionRefusedError:
        out[target] = 'refused'
    except OSError as e:
        out[target] = errno.errorcode.get(e.errno, str(e))
threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1:]]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps(out))
""" % CONNECT_TIMEOUT

PIPELINE_LABELS = {"app.kubernetes.io/name": "dpe-ingest", "app.kubernetes.io/instance": RELEASE}


class NetpolRelease:
    def __init__(self, cluster, helm: str, say):
        self.cluster, self.helm_bin, self.say = cluster, helm, say

    def helm(self, *args: str, timeout: float = SLOW, check: bool = True) -> subprocess.CompletedProcess:
        home = str(self.cluster.workdir / "helm")
        env = dict(os.environ, KUBECONFIG=str(self.cluster.kubeconfig), HELM_CACHE_HOME=home,
                   HELM_CONFIG_HOME=home, HELM_DATA_HOME=home)
        res = subprocess.run([self.helm_bin, *args, "--namespace", NS], capture_output=True, text=True,
                             timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        assert not check or res.returncode == 0, f"helm {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n" \
                                    f"{self.describe()}"
        return res

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cluster.kubectl("-n", NS, *args, check=check, timeout=timeout)

    def get(self, *args: str, namespace: str = NS) -> dict:
        return json.loads(self.cluster.kubectl("-n", namespace, "get", *args, "-o", "json").stdout)

    def describe(self) -> str:
        parts = []
        for args in (["get", "pods,jobs,networkpolicies", "-o", "wide"], ["get", "events", "--sort-by=.lastTimestamp"]):
            res = self.kubectl(*args, check=False)
            parts.append(res.stdout[-5000:] + res.stderr[-1000:])
        return "\n".join(parts)

    # -- the pipeline -------------------------------------------------------------------------------
    def psql(self, sql: str) -> str:
        return self.kubectl("exec", f"{RELEASE}-postgresql-0", "-c", "postgresql", "--", "psql", "-U", "dpe",
                            "-d", "dpe", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql).stdout

    def jobs_running(self) -> list[str]:
        """The departments whose producer Job has a pod running and has not completed."""
        return sorted(j["metadata"]["labels"]["dpe-ingest/department"]
                      for j in self.get("jobs", "-l", "app.kubernetes.io/component=producer")["items"]
                      if (j.get("status") or {}).get("active") and not (j.get("status") or {}).get("succeeded"))

    def stored(self) -> dict[str, int]:
        out = self.psql("SELECT departement, count(*) FROM dpe_data GROUP BY 1")
        return {dep: int(n) for dep, n in (line.split("|") for line in out.split())}

    def wait_reconciled(self) -> None:
        """Every producer Job complete and none failed, then dpe_data is exactly the dataset's rows of
        the departments (every column), then the analytics tables hold their counts."""
        deadline = time.monotonic() + SLOW
        while True:
            jobs = {j["metadata"]["labels"]["dpe-ingest/department"]: j.get("status") or {}
                    for j in self.get("jobs", "-l", "app.kubernetes.io/component=producer")["items"]}
            assert not [d for d, st in jobs.items() if st.get("failed")], f"failed producer pods: {jobs}\n{self.describe()}"
            if set(DEPARTMENTS) <= {d for d, st in jobs.items() if st.get("succeeded")}:
                break
            assert time.monotonic() < deadline, f"Jobs not complete: {jobs}\n{self.describe()}"
            time.sleep(2)
        want = {d: DATASET.count(d) for d in DEPARTMENTS}
        while True:
            got = self.stored()
            if got == want:
                break
            assert all(got.get(d, 0) <= n for d, n in want.items()), f"more rows than served: {got} > {want}"
            assert time.monotonic() < deadline, f"table {got} != dataset {want}\n{self.describe()}"
            time.sleep(2)
        rows = rec.expected_rows(DATASET, DEPARTMENTS, EXTRA_FIELDS)
        rec.assert_rows(rows, rec.parse_rows(self.psql(rec.rows_sql("dpe_data")).splitlines()), "dpe_data")
        counts = rec.expected_counts(rows)
        while True:
            got_counts = rec.parse_counts(self.psql(rec.counts_sql(ANALYTICS_PREFIX)).splitlines())
            if all(got_counts[k] == counts[k] for k in counts):
                return
            if time.monotonic() > deadline:
                rec.assert_counts(counts, got_counts, "the analytics tables")
            time.sleep(2)

    # -- the probes ---------------------------------------------------------------------------------
    def targets(self) -> dict[str, str]:
        """what -> host:port: Kafka and PostgreSQL through their Services and at their pods' addresses."""
        svc = f"{NS}.svc.cluster.local"
        kafka_ip = self.get("pod", f"{RELEASE}-kafka-0")["status"]["podIP"]
        pg_ip = self.get("pod", f"{RELEASE}-postgresql-0")["status"]["podIP"]
        return {"kafka service": f"{RELEASE}-kafka.{svc}:9092", "kafka pod": f"{kafka_ip}:9092",
                "postgresql service": f"{RELEASE}-postgresql.{svc}:5432", "postgresql pod": f"{pg_ip}:5432"}

    def start_probe_pod(self, namespace: str, name: str, labels: dict) -> None:
        from dpe_devkit.testbed.images import CLUSTER_IMAGES

        self.cluster.apply([{
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "labels": labels},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "terminationGracePeriodSeconds": 0,
                     "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                         "seccompProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "probe", "image": CLUSTER_IMAGES["producer"], "imagePullPolicy": "Never",
                                     "command": ["python", "-c", "import time; time.sleep(3600)"],
                                     "securityContext": {"allowPrivilegeEscalation": False,
                                                         "capabilities": {"drop": ["ALL"]}}}]}}])

    def wait_probe_pods(self, pods: list[tuple[str, str]]) -> None:
        deadline = time.monotonic() + 180
        for namespace, name in pods:
            while self.get("pod", name, namespace=namespace)["status"].get("phase") != "Running":
                assert time.monotonic() < deadline, f"probe pod {namespace}/{name} not running\n{self.describe()}"
                time.sleep(0.5)

    def probe(self, namespace: str, name: str, targets: dict[str, str]) -> dict[str, str]:
        """what -> connected / refused / timed out / an errno name, from inside pod namespace/name."""
        res = self.cluster.kubectl("-n", namespace, "exec", name, "--", "python", "-c", PROBE, *targets.values(),
                                   timeout=60)
        got = json.loads(res.stdout.strip().splitlines()[-1])
        return {what: got[target] for what, target in targets.items()}

    def wait_probe(self, namespace: str, name: str, targets: dict[str, str], ok, what: str,
                   timeout: float = 90) -> tuple[dict[str, str], float]:
        """Probe until ``ok(result)``: the engine applies a policy change asynchronously (its own
        informers), so a change is awaited, never assumed; returns the result and how long it took."""
        t0 = time.monotonic()
        while True:
            got = self.probe(namespace, name, targets)
            if ok(got):
                return got, time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, f"{what}: {namespace}/{name} got {got} after {timeout}s\n" \
                                                    f"{self.describe()}\n{self.engine_rules()}"
            time.sleep(2)

    def engine_rules(self) -> str:
        """kube-router's chains in the node's filter table (shown when a probe does not get its answer)."""
        res = subprocess.run(self.cluster.in_node(["iptables", "-t", "filter", "-S"]), capture_output=True,
                             text=True, timeout=30, stdin=subprocess.DEVNULL)
        return "\n".join(line for line in res.stdout.splitlines() if "KUBE-" in line and "ROUTER" in line
                         or "KUBE-POD-FW" in line or "KUBE-NWPLCY" in line)[-6000:]


def _refused(got: dict[str, str]) -> bool:
    return all(v in ("refused", "timed out") for v in got.values())


def _connected(got: dict[str, str]) -> bool:
    return all(v == "connected" for v in got.values())


@pytest.fixture(scope="module")
def netpol(cluster, helm_bin, summary_line):
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": RESTRICTED}},
                   {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OUTSIDE, "labels": RESTRICTED}}])
    rel = NetpolRelease(cluster, str(helm_bin), say=lambda line: (print(line), summary_line(line)))
    t0 = time.monotonic()
    yield rel
    rel.helm("uninstall", RELEASE, "--wait", "--timeout", "2m", timeout=150, check=False)
    for ns in (NS, OUTSIDE):
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
    # the node is shared with the next modules: its pods and volumes gone before they start
    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and any(
            cluster.kubectl("get", "namespace", ns, check=False).returncode == 0 for ns in (NS, OUTSIDE)):
        time.sleep(2)
    rel.say(f"cluster: test_cluster_networkpolicy module wall time {time.monotonic() - t0:.0f}s (teardown included)")


OUTSIDER = (OUTSIDE, "probe-outsider")      # another namespace, the consumer's labels
STRANGER = (NS, "probe-unlabelled")         # the release's namespace, none of the pipeline's labels
INSIDER = (NS, "probe-test-labels")         # the release's namespace, labelled as the helm test pods


def test_the_node_runs_a_policy_engine(cluster):
    """kube-router runs in the node's namespace and its chains are hooked into the filter table (the
    probes below show them filtering)."""
    assert cluster.procs["kube-router"].poll() is None, "kube-router exited"
    res = subprocess.run(cluster.in_node(["iptables", "-t", "filter", "-S", "FORWARD"]), capture_output=True,
                         text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert "-j KUBE-ROUTER-FORWARD" in res.stdout, res.stdout


def test_install_has_the_policies_on_by_default(netpol):
    rel = netpol
    # the probe pods first, so that they probe as soon as the release is up
    rel.start_probe_pod(*OUTSIDER, labels={**PIPELINE_LABELS, "app.kubernetes.io/component": "consumer"})
    rel.start_probe_pod(*STRANGER, labels={"app": "debug"})
    rel.start_probe_pod(*INSIDER, labels={**PIPELINE_LABELS, "app.kubernetes.io/component": "test"})
    rel.wait_probe_pods([OUTSIDER, STRANGER, INSIDER])
    t0 = time.monotonic()
    rel.helm("install", RELEASE, str(CHART), "-f", str(CHART / "values-offline.yaml"),
             "-f", str(HERE / "values-test-cluster.yaml"), "--set", "departments={" + ",".join(DEPARTMENTS) + "}",
             "--set", f"standin.rowsPerDepartment={ROWS}", *SLOW_PRODUCERS, "--wait", "--timeout", "8m",
             timeout=540)
    nps = {n["metadata"]["name"] for n in rel.get("networkpolicies")["items"]}
    assert {f"{RELEASE}-kafka", f"{RELEASE}-postgresql", f"{RELEASE}-standin", f"{RELEASE}-metrics"} <= nps, nps
    rel.say(f"cluster: netpol release installed (--wait) in {time.monotonic() - t0:.0f}s")


def test_strangers_cannot_open_kafka_or_postgresql_while_the_pipeline_runs(netpol):
    rel = netpol
    targets = rel.targets()
    before = rel.jobs_running()
    for pod in (OUTSIDER, STRANGER):
        got, took = rel.wait_probe(*pod, targets, _refused, "with the policies, refused")
        rel.say(f"cluster: netpol on: {pod[0]}/{pod[1]} -> {got} (after {took:.0f}s)")
    got, _ = rel.wait_probe(*INSIDER, targets, _connected, "labelled as the test pods, connects")
    after = rel.jobs_running()
    rel.say(f"cluster: netpol on: {INSIDER[0]}/{INSIDER[1]} -> {got}; producer Jobs running before the probes "
            f"{before}, after them {after}; rows stored after them {rel.stored()}")
    # the probes ran while the pipeline did: Kafka and PostgreSQL busy with the release's own pods
    assert set(before) & set(after), f"no producer Job ran throughout the probes: {before} / {after}"


def test_the_pipeline_reconciles_exactly_through_the_policies(netpol):
    netpol.wait_reconciled()  # every row, every count
    netpol.say(f"cluster: netpol on: {DEPARTMENTS} reconciled exactly ({ROWS} rows per department served)")
    targets = netpol.targets()
    for pod in (OUTSIDER, STRANGER):  # and still refused once the pipeline is done
        assert _refused(netpol.probe(*pod, targets)), pod


def test_without_the_policies_the_same_pods_connect(netpol):
    """The same release upgraded with networkPolicy.enabled=false: the engine, not the network, refused."""
    rel = netpol
    rel.helm("upgrade", RELEASE, str(CHART), "--reuse-values", "--set", "networkPolicy.enabled=false",
             "--wait", "--timeout", "5m", timeout=360)
    assert not rel.get("networkpolicies")["items"]
    targets = rel.targets()
    for pod in (OUTSIDER, STRANGER):
        got, took = rel.wait_probe(*pod, targets, _connected, "without the policies, connects")
        rel.say(f"cluster: netpol off: {pod[0]}/{pod[1]} -> {got} (after {took:.0f}s)")
    rel.wait_reconciled()  # nothing changed in the table
