"""Issue 23 at the chart level: the consumer's and the analytics' livenessProbe/readinessProbe reach the
product's /livez and /readyz on the metrics port with what /livez checks (LIVENESS_STALL_S,
BATCH_COMMIT_TIMEOUT_S), and the consumer's PodDisruptionBudget when it has more than one replica.
What the probes answer is tested against a real engine in tests/test_probes.py, and on the test node
(tests/cluster/test_cluster_day2.py: a SIGSTOPped consumer is restarted by the kubelet)."""

from __future__ import annotations

import pytest

from dpe_ingest import config, metrics
from chartlib import by_kind, container, env_of, named, pod_spec

COMPONENTS = ("consumer", "analytics")


def _plain_env(c: dict) -> dict[str, str]:
    return {k: v for k, v in env_of(c).items() if isinstance(v, str)}


@pytest.mark.parametrize("component", COMPONENTS)
def test_probes_reach_livez_and_readyz_on_the_metrics_port_by_default(render, component):
    docs = render.template()  # metrics.enabled is false: the port is served for the probes alone
    c = container(named(docs, "Deployment", f"dpe-{component}"), component)
    env = _plain_env(c)
    (port,) = [p for p in c["ports"] if p["name"] == "metrics"]
    assert int(env["METRICS_PORT"]) == port["containerPort"] == config.metrics_port(env)
    paths = {c["livenessProbe"]["httpGet"]["path"]: "livez", c["readinessProbe"]["httpGet"]["path"]: "readyz"}
    assert paths == metrics.PROBE_PATHS  # the paths the product answers, each with its own check
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "metrics"
        assert c[probe]["periodSeconds"] == 10 and c[probe]["failureThreshold"] == 3 and c[probe]["timeoutSeconds"] == 5
    assert c["livenessProbe"]["initialDelaySeconds"] == 10
    # a container the liveness probe failed is killed after 10 s, not the pod's 30-60 s grace
    assert c["livenessProbe"]["terminationGracePeriodSeconds"] == 10 < pod_spec(
        named(docs, "Deployment", f"dpe-{component}"))["terminationGracePeriodSeconds"]
    assert "terminationGracePeriodSeconds" not in c["readinessProbe"]  # the API refuses it there
    read = (config.ConsumerConfig if component == "consumer" else config.AnalyticsConfig).from_env(env)
    assert (read.liveness_stall_s, read.batch_commit_timeout_s) == (60.0, 300.0)
    # no Service, no ServiceMonitor for the probes alone: those stay with metrics.enabled
    assert not [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")]


@pytest.mark.parametrize("component", COMPONENTS)
def test_probe_settings_reach_the_container(render, component):
    docs = render.template(sets={f"{component}.probes.stallSeconds": "25",
                                 f"{component}.probes.batchCommitTimeoutSeconds": "90",
                                 f"{component}.probes.liveness.periodSeconds": "4",
                                 f"{component}.probes.readiness.failureThreshold": "6", "metrics.port": "9300"})
    c = container(named(docs, "Deployment", f"dpe-{component}"), component)
    env = _plain_env(c)
    assert (env["LIVENESS_STALL_S"], env["BATCH_COMMIT_TIMEOUT_S"], env["METRICS_PORT"]) == ("25", "90", "9300")
    assert c["livenessProbe"]["periodSeconds"] == 4 and c["readinessProbe"]["failureThreshold"] == 6
    assert [p["containerPort"] for p in c["ports"]] == [9300]


@pytest.mark.parametrize("component", COMPONENTS)
def test_probes_off_and_metrics_off_leave_no_port(render, component):
    docs = render.template(sets={f"{component}.probes.enabled": "false"})
    c = container(named(docs, "Deployment", f"dpe-{component}"), component)
    assert "livenessProbe" not in c and "readinessProbe" not in c and "ports" not in c
    assert not {"METRICS_PORT", "LIVENESS_STALL_S", "BATCH_COMMIT_TIMEOUT_S"} & set(env_of(c))
    # metrics on, probes off: /metrics only
    c = container(named(render.template(sets={f"{component}.probes.enabled": "false", "metrics.enabled": "true"}),
                        "Deployment", f"dpe-{component}"), component)
    assert "livenessProbe" not in c and env_of(c)["METRICS_PORT"] == "9100"


@pytest.mark.parametrize("values, path, detail", [
    ({"consumer.probes.stallSeconds": "0"}, "/consumer/probes/stallSeconds", "minimum: got 0, want 1"),
    ({"analytics.probes.liveness.period": "5"}, "/analytics/probes/liveness", "period"),
    ({"consumer.probes.readiness.timeoutSeconds": "0"}, "/consumer/probes/readiness/timeoutSeconds", "want 1"),
    ({"consumer.podDisruptionBudget.maxUnavailable": "half"}, "/consumer/podDisruptionBudget/maxUnavailable", "half"),
])
def test_schema_names_a_bad_probe_or_budget_setting(render, values, path, detail):
    err = render.template_error(sets=values)
    assert f"at '{path}'" in err and detail in err, err


def _pods_selected(docs: list[dict], selector: dict) -> set[str]:
    out = set()
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        meta = {"CronJob": lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["metadata"],
                "Pod": lambda d: d["metadata"]}.get(doc["kind"], lambda d: d["spec"]["template"]["metadata"])(doc)
        labels = meta.get("labels", {})
        if selector.items() <= labels.items():
            out.add(f"{doc['kind']}/{doc['metadata']['name']}")
    return out


def test_consumer_pdb_only_with_more_than_one_replica(render):
    assert not by_kind(render.template(), "PodDisruptionBudget")  # one replica: a PDB would block every drain
    docs = render.template(sets={"consumer.replicas": "3", "analytics.replicas": "2", "refresh.schedule": "0 3 * * 0",
                                 "standin.enabled": "true"})
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["metadata"]["name"] == "dpe-consumer"
    assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
    assert pdb["metadata"]["labels"]["app.kubernetes.io/component"] == "consumer"
    # it selects the consumer's pods and nothing else of the release
    assert _pods_selected(docs, pdb["spec"]["selector"]["matchLabels"]) == {"Deployment/dpe-consumer"}
    other = render.template(sets={"consumer.replicas": "2", "consumer.podDisruptionBudget.minAvailable": "50%"})
    (pdb,) = by_kind(other, "PodDisruptionBudget")
    assert pdb["spec"] == {"minAvailable": "50%", "selector": pdb["spec"]["selector"]}
    off = render.template(sets={"consumer.replicas": "3", "consumer.podDisruptionBudget.enabled": "false"})
    assert not by_kind(off, "PodDisruptionBudget")
