"""``values-production.yaml`` on the test node: ``helm install -f values-production.yaml`` with the
test cluster's overlays on top (``values-offline.yaml``: the in-cluster stand-in, small Kafka;
``values-test-cluster.yaml``: the test images, few rows), departments 69, 01 and 38, in a namespace
enforcing Pod Security ``restricted``.  What production changes runs: two consumer pods (and their
PodDisruptionBudget), the NetworkPolicies, no Kafdrop, every container with its requests and limits;
``helm test`` passes and ``dpe_data`` reconciles exactly (every row and column, and the analytics
counts)."""

from __future__ import annotations

import pytest
import yaml

from noderelease import CHART, TEST_VALUES, NodeRelease

pytestmark = pytest.mark.cluster

NS = "dpe-production"
RELEASE = "prod"
DEPARTMENTS = ["69", "01", "38"]
PRODUCTION = CHART / "values-production.yaml"


@pytest.fixture(scope="module")
def release(cluster, helm_bin):
    rows = yaml.safe_load(TEST_VALUES.read_text())["standin"]["rowsPerDepartment"]
    rel = NodeRelease(cluster, helm_bin, NS, RELEASE, rows)
    rel.create_namespace()
    yield rel
    rel.uninstall()


def test_production_values_install_pass_helm_test_and_reconcile(release):
    release.helm("install", RELEASE, str(CHART), "-f", str(PRODUCTION), "-f", str(CHART / "values-offline.yaml"),
                 "-f", str(TEST_VALUES), "--set", "departments={" + ",".join(DEPARTMENTS) + "}",
                 "--wait", "--wait-for-jobs", "--timeout", "10m")
    production = yaml.safe_load(PRODUCTION.read_text())
    consumers = release.ready_pods("consumer")
    assert len(consumers) == production["consumer"]["replicas"] == 2, [p["metadata"]["name"] for p in consumers]
    assert not release.get("deployments", "-l", "app.kubernetes.io/component=kafdrop")["items"]
    policies = {p["metadata"]["name"] for p in release.get("networkpolicies")["items"]}
    assert {f"{RELEASE}-kafka", f"{RELEASE}-postgresql"} <= policies, policies
    pdbs = release.get("pdb")["items"]
    assert [p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] for p in pdbs] == ["consumer"], pdbs
    for pod in release.get("pods")["items"]:
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            res = c.get("resources") or {}
            assert {"cpu", "memory"} <= set(res.get("requests", {})) and {"cpu", "memory"} <= set(
                res.get("limits", {})), (pod["metadata"]["name"], c["name"], res)
    got = release.wait_reconciled(DEPARTMENTS)
    res = release.helm("test", RELEASE, "--logs", "--timeout", "5m")
    assert res.stdout.count("Phase:          Succeeded") == 2, res.stdout
    print(f"\nvalues-production.yaml on the node: consumers {len(consumers)}, policies {sorted(policies)}, rows {got}")
