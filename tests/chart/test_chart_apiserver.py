"""The chart against a real Kubernetes API server (kube-apiserver v1.37.2 + etcd, see
``dpe_devkit.testbed.apiserver``; or your cluster through DPE_TEST_KUBECONFIG).

No image can be pulled here, so no pod runs; what the control plane does with what helm sends is
real: server-side validation of every object, Pod Security admission at ``restricted`` (enforced
on pods, warned on workloads), helm's install/upgrade/uninstall bookkeeping, Job immutability, and
``dpe-ingest status`` reading the Jobs through the Kubernetes API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import yaml

from chartlib import CHART

pytestmark = pytest.mark.kube

RESTRICTED = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}


@pytest.fixture(scope="module")
def api(kubeconfig):
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    api_client = client.ApiClient(cfg)
    yield api_client
    api_client.close()


@pytest.fixture
def ns(api):
    """A fresh namespace enforcing the ``restricted`` Pod Security Standard, with its ``default``
    ServiceAccount (made by the controller-manager on a full cluster)."""
    from kubernetes import client

    name = f"t-{uuid.uuid4().hex[:10]}"
    core = client.CoreV1Api(api)
    core.create_namespace({"metadata": {"name": name, "labels": RESTRICTED}})
    try:
        core.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
    except client.ApiException as exc:
        if exc.status != 409:  # on a full cluster the controller-manager was quicker
            raise
    yield name
    core.delete_namespace(name)  # (without a controller-manager it stays Terminating: harmless)


def helm_(helm, kubeconfig, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=300, env=env,
                          stdin=subprocess.DEVNULL)


def install(helm, kubeconfig, ns: str, *args: str, release: str = "dpe", verb: str = "install"):
    res = helm_(helm, kubeconfig, verb, release, str(CHART), "--namespace", ns, *args)
    assert res.returncode == 0, res.stderr
    # Pod Security warnings (and any other API warning) are printed on stderr: there must be none
    assert "Warning" not in res.stderr and "would violate" not in res.stderr, res.stderr
    return res


def producer_jobs(api, ns: str, release: str = "dpe") -> dict[str, object]:
    from kubernetes import client

    jobs = client.BatchV1Api(api).list_namespaced_job(
        ns, label_selector=f"app.kubernetes.io/instance={release},app.kubernetes.io/component=producer").items
    return {j.metadata.labels["dpe-ingest/department"]: j for j in jobs}


def test_install_in_a_restricted_namespace_is_admitted_without_a_warning(helm, kubeconfig, api, ns):
    from kubernetes import client

    res = install(helm, kubeconfig, ns, "--set", "departments={69,01,38}")
    assert "helm test dpe" in res.stdout  # NOTES
    jobs = producer_jobs(api, ns)
    assert sorted(jobs) == ["01", "38", "69"]
    assert all(j.metadata.name.startswith(f"dpe-producer-{code}-") for code, j in jobs.items())
    apps = client.AppsV1Api(api)
    assert {s.metadata.name for s in apps.list_namespaced_stateful_set(ns).items} == {"dpe-kafka", "dpe-postgresql"}
    assert {d.metadata.name for d in apps.list_namespaced_deployment(ns).items} == {"dpe-consumer", "dpe-kafdrop",
                                                                                 "dpe-analytics"}
    secret = client.CoreV1Api(api).read_namespaced_secret("dpe-postgresql", ns)
    assert secret.data and secret.data.get("password")


@pytest.mark.parametrize("values", sorted(p.name for p in (CHART / "ci").glob("*.yaml")) +
                         sorted(p.name for p in CHART.glob("values-*.yaml")))
def test_every_shipped_values_file_installs(helm, kubeconfig, api, ns, values):
    path = CHART / "ci" / values if (CHART / "ci" / values).is_file() else CHART / values
    install(helm, kubeconfig, ns, "-f", str(path))
    assert producer_jobs(api, ns), "every values file runs at least one department"


def test_helm_test_pods_are_admitted_by_pod_security(helm, kubeconfig, api, ns):
    """``helm test`` pods are bare Pods: Pod Security *enforces* on them.  Created with dryRun=All
    (nothing would run them here), which goes through the same admission."""
    from kubernetes import client

    install(helm, kubeconfig, ns, "--set", "departments={69}")
    hooks = helm_(helm, kubeconfig, "get", "hooks", "dpe", "--namespace", ns)
    assert hooks.returncode == 0, hooks.stderr
    pods = [d for d in yaml.safe_load_all(hooks.stdout) if d and d.get("kind") == "Pod"]
    assert len(pods) >= 2, hooks.stdout[:2000]
    core = client.CoreV1Api(api)
    for pod in pods:
        assert "helm.sh/hook" in pod["metadata"]["annotations"]
        core.create_namespaced_pod(ns, pod, dry_run="All")  # ApiException 403 if Pod Security refuses it


def test_pod_security_would_catch_a_privileged_setting(helm, kubeconfig, ns):
    """The check above can fail: the same install with one unsafe setting is refused a clean bill."""
    res = helm_(helm, kubeconfig, "install", "dpe", str(CHART), "--namespace", ns, "--set", "departments={69}",
                "--set", "consumer.containerSecurityContext.allowPrivilegeEscalation=true")
    assert res.returncode == 0, res.stderr
    assert "would violate PodSecurity" in res.stderr and "restricted:latest" in res.stderr, res.stderr
    assert "allowPrivilegeEscalation" in res.stderr and "consumer" in res.stderr, res.stderr


def test_upgrades_add_and_rerun_departments_without_touching_the_others(helm, kubeconfig, api, ns):
    install(helm, kubeconfig, ns, "--set", "departments={69,01}")
    before = producer_jobs(api, ns)
    # add a department: a new Job; the running ones are not replaced (a Job's pod template is
    # immutable: had the chart changed it, the API server would have refused the upgrade)
    install(helm, kubeconfig, ns, "--reuse-values", "--set", "departments={69,01,38}", verb="upgrade")
    after = producer_jobs(api, ns)
    assert sorted(after) == ["01", "38", "69"]
    for code in ("69", "01"):
        assert after[code].metadata.uid == before[code].metadata.uid
    # re-run one department: its Job is replaced by a new one, the others stay
    install(helm, kubeconfig, ns, "--reuse-values", "--set", "producer.rerun.69=1", verb="upgrade")
    rerun = producer_jobs(api, ns)
    assert sorted(rerun) == ["01", "38", "69"]
    assert rerun["69"].metadata.uid != after["69"].metadata.uid
    assert rerun["69"].metadata.name != after["69"].metadata.name
    assert {c: rerun[c].metadata.uid for c in ("01", "38")} == {c: after[c].metadata.uid for c in ("01", "38")}
    env = {e.name: e.value for e in rerun["69"].spec.template.spec.containers[0].env or []}
    assert env.get("PRODUCER_RESTART") == "true"


def test_uninstall_removes_everything_but_the_password_secret(helm, kubeconfig, api, ns):
    from kubernetes import client

    install(helm, kubeconfig, ns, "--set", "departments={69}")
    res = helm_(helm, kubeconfig, "uninstall", "dpe", "--namespace", ns, "--wait", "--timeout", "60s")
    assert res.returncode == 0, res.stderr
    assert not producer_jobs(api, ns)
    apps = client.AppsV1Api(api)
    assert not apps.list_namespaced_stateful_set(ns).items and not apps.list_namespaced_deployment(ns).items
    # kept (helm.sh/resource-policy: keep): the data volumes still hold a database with this password
    assert client.CoreV1Api(api).read_namespaced_secret("dpe-postgresql", ns).data["password"]


@pytest.mark.kafka
@pytest.mark.postgres
def test_status_reads_the_producer_jobs_through_the_api(helm, kubeconfig, ns, kafka_bootstrap, database_url,
                                                        unique_name):
    install(helm, kubeconfig, ns, "--set", "departments={69,2A}")
    base = unique_name("kstatus")
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), KAFKA_BOOTSTRAP_SERVERS=kafka_bootstrap,
               DATABASE_URL=database_url, KAFKA_TOPIC=base, KAFKA_DLQ_TOPIC=base + "_dlq",
               PRODUCER_CHECKPOINT_TOPIC=base + "_ckpt", CONSUMER_GROUP=base + "_sink", DB_TABLE=base)
    res = subprocess.run([sys.executable, "-m", "dpe_ingest", "status", "--json", "--kube", "--namespace", ns,
                          "--release", "dpe"], capture_output=True, text=True, timeout=180, env=env,
                         stdin=subprocess.DEVNULL)
    doc = json.loads(res.stdout)
    assert doc["sources"]["kubernetes"]["ok"] is True, doc["sources"]
    by = {d["department"]: d for d in doc["departments"]}
    assert sorted(by) == ["2A", "69"]
    for code, d in by.items():
        assert d["job"]["name"].startswith(f"dpe-producer-{code.lower()}-")
        assert d["job"]["succeeded"] == 0 and d["job"]["failed"] == 0  # nothing runs pods here
    assert res.returncode == 1, res.stdout  # in progress: the Jobs have not finished
