"""The chart's analytics consumer and metrics: rendered objects, the ServiceMonitor against the
prometheus-operator CRD schema (vendored in tests/schemas), the Grafana dashboard against the metric
names the code exports, and an install on the test API server under Pod Security ``restricted``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid

import pytest
import yaml

from dpe_ingest import config, metrics
from chartlib import CHART, ROOT, by_kind, container, env_of, named, pod_spec

CRD = ROOT / "tests" / "schemas" / "prometheus-operator-v0.93.0-servicemonitors.crd.yaml"
DASHBOARD = CHART / "dashboards" / "dpe-ingest.json"
ALL_ON = {"analytics.enabled": "true", "metrics.enabled": "true", "metrics.serviceMonitor.enabled": "true",
          "metrics.grafanaDashboard.enabled": "true"}


def _crd_schema() -> dict:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def _pruned(obj, schema, path="") -> list[str]:
    """Fields the API server would silently drop (not in the structural schema): a misspelt key
    passes a plain JSON-schema validation of a CRD, because CRDs prune instead of refusing."""
    out = []
    if isinstance(obj, dict) and schema.get("type") == "object":
        props = schema.get("properties")
        if props is None or schema.get("x-kubernetes-preserve-unknown-fields"):
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                for k, v in obj.items():
                    out += _pruned(v, extra, f"{path}.{k}")
            return out
        for k, v in obj.items():
            if k not in props:
                out.append(f"{path}.{k}")
            else:
                out += _pruned(v, props[k], f"{path}.{k}")
    elif isinstance(obj, list) and "items" in schema:
        for i, v in enumerate(obj):
            out += _pruned(v, schema["items"], f"{path}[{i}]")
    return out


def test_analytics_is_on_by_default_with_its_own_group_and_no_metrics_objects(render):
    docs = render.template()
    dep = named(docs, "Deployment", "dpe-analytics")
    c = container(dep, "analytics")
    assert c["command"] == ["dpe-ingest", "analytics"]
    env = env_of(c)
    assert set(env) - {"PGPASSWORD"} <= set(config.CONTRACT)
    cfg = config.AnalyticsConfig.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    consumer_env = env_of(container(named(docs, "Deployment", "dpe-consumer")))
    assert cfg.group == "dpe-analytics" != consumer_env["CONSUMER_GROUP"]
    assert cfg.table_prefix == "dpe_analytics" and cfg.alert_share == 0.3
    assert env["DATABASE_URL"] == consumer_env["DATABASE_URL"]
    assert "PGPASSWORD" in env
    assert env["METRICS_PORT"] == "9100"  # for its probes (issue 23); no metrics objects below
    assert pod_spec(dep)["securityContext"]["runAsNonRoot"] is True
    assert not by_kind(docs, "ServiceMonitor")
    assert not [s for s in by_kind(docs, "Service") if s["metadata"]["name"].endswith("-metrics")]
    assert not [m for m in by_kind(docs, "ConfigMap") if "grafana_dashboard" in m["metadata"]["labels"]]


def test_analytics_can_be_turned_off_and_refuses_the_sinks_group(render):
    docs = render.template(sets={"analytics.enabled": "false", "metrics.enabled": "true"})
    assert "dpe-analytics" not in {d["metadata"]["name"] for d in by_kind(docs, "Deployment")}
    assert {s["metadata"]["name"] for s in by_kind(docs, "Service") if "metrics" in s["metadata"]["name"]} == {
        "dpe-consumer-metrics"}
    err = render.template_error(sets={"analytics.group": "dpe-sink"})
    assert "needs a consumer group of its own" in err
    err = render.template_error(sets={"analytics.alertShare": "1.5"})
    assert "alertShare" in err


def test_metrics_services_select_the_pods_and_reach_their_metrics_port(render):
    docs = render.template(sets={**ALL_ON, "metrics.port": "9200"})
    for comp in ("consumer", "analytics"):
        dep = named(docs, "Deployment", f"dpe-{comp}")
        svc = named(docs, "Service", f"dpe-{comp}-metrics")
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        (port,) = svc["spec"]["ports"]
        c = container(dep, comp)
        (cport,) = [p for p in c["ports"] if p["name"] == port["targetPort"]]
        assert cport["containerPort"] == port["port"] == 9200
        assert env_of(c)["METRICS_PORT"] == "9200"
        assert config.metrics_port({"METRICS_PORT": env_of(c)["METRICS_PORT"]}) == 9200


def test_service_monitor_matches_the_crd_schema_and_selects_the_metrics_services(render):
    import jsonschema

    docs = render.template(sets={**ALL_ON, "metrics.serviceMonitor.labels.release": "kube-prometheus-stack"})
    (sm,) = by_kind(docs, "ServiceMonitor")
    schema = _crd_schema()
    jsonschema.validate(sm, schema)
    assert _pruned(sm, schema) == []
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    sel = sm["spec"]["selector"]["matchLabels"]
    selected = {s["metadata"]["name"] for s in by_kind(docs, "Service") if sel.items() <= s["metadata"]["labels"].items()}
    assert selected == {"dpe-consumer-metrics", "dpe-analytics-metrics"}
    assert {e["port"] for e in sm["spec"]["endpoints"]} == {"metrics"}
    # the check can fail: a misspelt field, a bad interval
    bad = json.loads(json.dumps(sm))
    bad["spec"]["endpoints"][0]["intervall"] = "30s"
    assert _pruned(bad, schema) == [".spec.endpoints[0].intervall"]
    bad["spec"]["endpoints"][0]["interval"] = "30 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    # only rendered when asked
    assert not by_kind(render.template(sets={"metrics.enabled": "true"}), "ServiceMonitor")


def _dashboard_metric_names(dash: dict) -> set[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    return set(re.findall(r"\b(dpe_[a-z0-9_]+)\b", " ".join(exprs)))


def test_dashboard_parses_ships_as_a_configmap_and_uses_only_exported_metrics(render):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "dpe-ingest" and dash["panels"]
    assert all(p["targets"] and all(t["expr"] for t in p["targets"]) for p in dash["panels"])
    used = _dashboard_metric_names(dash)
    exported = metrics.exported_names()
    assert used and used <= exported, f"not exported by the code: {sorted(used - exported)}"
    for family in ("dpe_consumer_rows_total", "dpe_consumer_batch_write_seconds_bucket", "dpe_consumer_lag_total",
                   "dpe_analytics_rows", "dpe_analytics_fg_share", "dpe_analytics_lag_total"):
        assert family in used, family
    # the check can fail: a name the code does not export
    assert "dpe_consumer_rows_stored_total" not in exported
    docs = render.template(sets=ALL_ON)
    (cm,) = [m for m in by_kind(docs, "ConfigMap") if m["metadata"]["labels"].get("grafana_dashboard") == "1"]
    assert json.loads(cm["data"]["dpe-ingest.json"]) == dash
    assert not [m for m in by_kind(render.template(sets={"metrics.enabled": "true"}), "ConfigMap")
                if "grafana_dashboard" in m["metadata"]["labels"]]


# ---------------------------------------------------------------------------------------------
# on the test API server
# ---------------------------------------------------------------------------------------------
RESTRICTED = {f"pod-security.kubernetes.io/{mode}": "restricted" for mode in ("enforce", "warn", "audit")}


@pytest.mark.kube
def test_install_with_analytics_metrics_and_service_monitor_in_a_restricted_namespace(helm, kubeconfig):
    from kubernetes import client, config as kconfig

    cfg = client.Configuration()
    kconfig.load_kube_config(config_file=str(kubeconfig), client_configuration=cfg)
    api = client.ApiClient(cfg)
    try:
        ext = client.ApiextensionsV1Api(api)
        crd = yaml.safe_load(CRD.read_text())
        try:  # the CRD of the vendored schema: the API server validates the ServiceMonitor with it
            ext.create_custom_resource_definition(crd)
        except client.ApiException as exc:
            if exc.status != 409:
                raise
        for _ in range(100):
            got = ext.read_custom_resource_definition(crd["metadata"]["name"])
            if any(c.type == "Established" and c.status == "True" for c in (got.status.conditions or [])):
                break
            import time

            time.sleep(0.1)
        ns = f"t-{uuid.uuid4().hex[:10]}"
        core = client.CoreV1Api(api)
        core.create_namespace({"metadata": {"name": ns, "labels": RESTRICTED}})
        try:
            try:
                core.create_namespaced_service_account(ns, {"metadata": {"name": "default"}})
            except client.ApiException as exc:
                if exc.status != 409:
                    raise
            args = [a for k, v in ALL_ON.items() for a in ("--set", f"{k}={v}")]
            res = subprocess.run([helm, "install", "dpe", str(CHART), "--namespace", ns, "--set", "departments={69}",
                                  *args], capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                                 env=dict(os.environ, KUBECONFIG=str(kubeconfig)))
            assert res.returncode == 0, res.stderr
            assert "Warning" not in res.stderr and "would violate" not in res.stderr, res.stderr
            deps = {d.metadata.name for d in client.AppsV1Api(api).list_namespaced_deployment(ns).items}
            assert {"dpe-consumer", "dpe-analytics"} <= deps
            svcs = {s.metadata.name for s in core.list_namespaced_service(ns).items}
            assert {"dpe-consumer-metrics", "dpe-analytics-metrics"} <= svcs
            sms = client.CustomObjectsApi(api).list_namespaced_custom_object("monitoring.coreos.com", "v1", ns,
                                                                             "servicemonitors")["items"]
            assert [s["metadata"]["name"] for s in sms] == ["dpe"]
            assert sms[0]["spec"]["endpoints"][0]["interval"] == "30s"  # kept: not pruned
            cm = core.read_namespaced_config_map("dpe-grafana-dashboard", ns)
            assert cm.metadata.labels["grafana_dashboard"] == "1"
        finally:
            core.delete_namespace(ns)
    finally:
        api.close()
