"""A release of the chart on the test node, in a namespace of its own: what test_cluster_day2.py and
test_cluster_production.py do with it (helm, kubectl, psql in the PostgreSQL pod, the exact
reconciliation of ``tests/reconcile.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import yaml

import reconcile as rec
from dpe_ingest.standin.data import Dataset

HERE = Path(__file__).resolve().parent
CHART = HERE.parents[1] / "charts" / "dpe-ingest"
TEST_VALUES = HERE / "values-test-cluster.yaml"
RESTRICTED = {f"pod-security.kubernetes.io/{m}": "restricted" for m in ("enforce", "warn", "audit")}
SLOW = 600  # generous bound of a wait, only reached on failure
_VALUES = yaml.safe_load(TEST_VALUES.read_text())
EXTRA_FIELDS = tuple(f for f in _VALUES["ademe"]["extraFields"].split(",") if f)


class NodeRelease:
    def __init__(self, cluster, helm_bin, namespace: str, release: str, rows_per_department: int,
                 analytics_prefix: str | None = "dpe_analytics"):
        self.cluster, self.helm_bin, self.ns, self.name = cluster, str(helm_bin), namespace, release
        self.dataset = Dataset(rows_per_department=rows_per_department)
        self.analytics_prefix = analytics_prefix

    # -- tools -------------------------------------------------------------------------------------------
    def create_namespace(self) -> None:
        self.cluster.apply([{"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": self.ns, "labels": RESTRICTED}}])

    def helm(self, *args: str, timeout: float = SLOW, check: bool = True) -> subprocess.CompletedProcess:
        home = str(self.cluster.workdir / "helm")
        env = dict(os.environ, KUBECONFIG=str(self.cluster.kubeconfig), HELM_CACHE_HOME=home,
                   HELM_CONFIG_HOME=home, HELM_DATA_HOME=home)
        res = subprocess.run([self.helm_bin, *args, "--namespace", self.ns], capture_output=True, text=True,
                             timeout=timeout, env=env, stdin=subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}\n"
                                 f"{self.describe()}")
        return res

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        return self.cluster.kubectl("-n", self.ns, *args, check=check, timeout=timeout)

    def get(self, *args: str) -> dict:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def describe(self) -> str:
        parts = []
        for args in (["get", "pods,jobs,pvc,networkpolicies,pdb", "-o", "wide"],
                     ["get", "events", "--sort-by=.lastTimestamp"]):
            res = self.kubectl(*args, check=False)
            parts.append(res.stdout[-6000:] + res.stderr[-2000:])
        return "\n".join(parts)

    def uninstall(self) -> None:
        self.helm("uninstall", self.name, "--wait", "--timeout", "5m", check=False)
        self.cluster.kubectl("delete", "namespace", self.ns, "--wait=false", check=False)

    # -- what is stored --------------------------------------------------------------------------------------
    def psql(self, sql: str) -> str:
        return self.kubectl("exec", f"{self.name}-postgresql-0", "-c", "postgresql", "--", "psql", "-U", "dpe",
                            "-d", "dpe", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql).stdout

    def stored(self) -> dict[str, int]:
        out = self.psql("SELECT departement, count(*) FROM dpe_data GROUP BY 1")
        return {dep: int(n) for dep, n in (line.split("|") for line in out.split())}

    def jobs(self) -> dict[str, dict]:
        """The newest producer Job of each department."""
        found: dict[str, dict] = {}
        for job in self.get("jobs", "-l", "app.kubernetes.io/component=producer")["items"]:
            dep = job["metadata"]["labels"]["dpe-ingest/department"]
            if dep not in found or job["metadata"]["creationTimestamp"] > found[dep]["metadata"]["creationTimestamp"]:
                found[dep] = job
        return found

    def wait_jobs_complete(self, departments: list[str], timeout: float = SLOW) -> dict[str, dict]:
        """The newest Job of each department once those of ``departments`` all succeeded (none failed)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs()
            failed = [d for d, j in jobs.items() if (j.get("status") or {}).get("failed")]
            assert not failed, f"producer Jobs with failed pods: {failed}\n{self.describe()}"
            done = {d for d, j in jobs.items() if (j.get("status") or {}).get("succeeded")}
            if set(departments) <= done:
                return jobs
            assert time.monotonic() < deadline, f"Jobs not complete after {timeout}s: " \
                                                f"{sorted(set(departments) - done)}\n{self.describe()}"
            time.sleep(2)

    def wait_reconciled(self, departments: list[str], timeout: float = SLOW) -> dict[str, int]:
        """Every Job complete, then dpe_data is exactly the stand-in's rows of ``departments`` (every
        stored column, from the seeded dataset) and the analytics tables their counts."""
        self.wait_jobs_complete(departments, timeout)
        want_n = {d: self.dataset.count(d) for d in departments}
        deadline = time.monotonic() + timeout
        while True:
            got = self.stored()
            if got == want_n:
                break
            over = {d: n for d, n in got.items() if n > want_n.get(d, 0)}
            assert not over, f"more rows than the API serves: {over} > {want_n}"
            assert time.monotonic() < deadline, f"table {got} != dataset {want_n}\n{self.describe()}"
            time.sleep(2)
        want = rec.expected_rows(self.dataset, departments, EXTRA_FIELDS)
        rec.assert_rows(want, rec.parse_rows(self.psql(rec.rows_sql("dpe_data")).splitlines()),
                        f"dpe_data of release {self.name}")
        if self.analytics_prefix:
            counts = rec.expected_counts(want)
            while True:
                have = rec.parse_counts(self.psql(rec.counts_sql(self.analytics_prefix)).splitlines())
                if all(have[k] == counts[k] for k in counts):
                    break
                if time.monotonic() > deadline:
                    rec.assert_counts(counts, have, f"the analytics tables of release {self.name}")
                time.sleep(2)
        return got

    def ready_pods(self, component: str) -> list[dict]:
        pods = self.get("pods", "-l", f"app.kubernetes.io/component={component}")["items"]
        return [p for p in pods if not p["metadata"].get("deletionTimestamp") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions", []))]
