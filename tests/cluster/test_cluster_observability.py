"""Observability on the test node (issue 24): the chart's ServiceMonitor, PrometheusRule, Grafana
dashboard and Pushgateway support, read by a real Prometheus Operator and Prometheus.

In namespace ``monitoring``: prometheus-operator v0.93.0 (its CRDs, ServiceAccounts, ClusterRoles
and Deployment from the module's own ``example/`` directory, the image ours), a ``Prometheus``
selecting ServiceMonitors and PrometheusRules the way kube-prometheus-stack does by default (label
``release: kube-prometheus-stack``, every namespace; scrape and evaluation every 5 s), a Pushgateway
v1.11.1 (scraped with ``honorLabels``).  Images: ``dpe-test/monitoring`` (``testbed.images``), binaries
from the Go module proxy (``testbed.gobuild``).  The chart is installed with ``metrics.enabled``, its
ServiceMonitor and PrometheusRule labelled for that Prometheus, ``metrics.pushgatewayUrl`` the
Pushgateway, and short ``for:`` durations.  After departments 69, 01, 38 reconcile:

- every target of the release's ServiceMonitor is up in ``/api/v1/targets``;
- every panel query of ``dashboards/dpe-ingest.json``, its template variables substituted the way
  Grafana does, returns at least one series through ``/api/v1/query`` (an empty one is named);
- the Pushgateway holds one group per department, with the rows its producer sent;
- the consumer Deployment scaled to 0 while department 13's rows arrive: DpeIngestConsumerDown and
  DpeIngestConsumerLagNotDecreasing fire, then resolve once it is scaled back to 1 (and the four
  departments reconcile).
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import yaml

from noderelease import CHART, NodeRelease, TEST_VALUES

pytestmark = pytest.mark.cluster

NS = "dpe-obs"
RELEASE = "obs"
MON = "monitoring"
DEPARTMENTS = ["69", "01", "38"]
LATER = "13"  # the department whose rows arrive while the consumer is scaled to 0
ROWS = 300  # per department: the point is the metrics
SCRAPE_S = 5  # the Prometheus' scrapeInterval and evaluationInterval, the ServiceMonitor's interval
DOWN_FOR_S = 15  # metrics.prometheusRule.downFor / lagFor here
LAG_WINDOW = "30s"
SD_UPDATE_S = 5  # Prometheus' discovery manager passes target updates on at most every 5 s
SELECT = {"release": "kube-prometheus-stack"}  # what kube-prometheus-stack's Prometheus selects by default
SLOW = 600  # a generous bound of a wait, only reached on failure
DASHBOARD = CHART / "dashboards" / "dpe-ingest.json"

#: GET argv[1] and print the body (run inside the node's network namespace: pod IPs reachable)
GET = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


def _values() -> list[str]:
    sets = {
        "standin.rowsPerDepartment": ROWS, "metrics.enabled": "true",
        "metrics.serviceMonitor.enabled": "true", "metrics.serviceMonitor.interval": f"{SCRAPE_S}s",
        "metrics.serviceMonitor.scrapeTimeout": f"{SCRAPE_S - 1}s",
        "metrics.serviceMonitor.labels.release": SELECT["release"],
        "metrics.prometheusRule.enabled": "true", "metrics.prometheusRule.labels.release": SELECT["release"],
        "metrics.prometheusRule.downFor": f"{DOWN_FOR_S}s", "metrics.prometheusRule.lagFor": f"{DOWN_FOR_S}s",
        "metrics.prometheusRule.lagWindow": LAG_WINDOW,
        "metrics.pushgatewayUrl": f"http://pushgateway.{MON}:9091",
    }
    out = ["-f", str(CHART / "values-offline.yaml"), "-f", str(TEST_VALUES)]
    for k, v in sets.items():
        out += ["--set", f"{k}={v}"]
    return out


def _departments(deps: list[str]) -> list[str]:
    return ["--set", "departments={" + ",".join(deps) + "}"]


# -- the monitoring stack ------------------------------------------------------------------------------
def _example(operator_dir: Path, rel: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((operator_dir / "example" / rel).read_text()) if d]


def _stack_objects(operator_dir: Path, image: str) -> list[dict]:
    """The operator's and Prometheus' ServiceAccounts, ClusterRoles and bindings and the operator's
    Deployment as its module's example/rbac has them (namespace ``monitoring``, our image), then a
    Pushgateway and the Prometheus."""
    objs: list[dict] = []
    for rel in ("rbac/prometheus-operator/prometheus-operator-service-account.yaml",
                "rbac/prometheus-operator/prometheus-operator-cluster-role.yaml",
                "rbac/prometheus-operator/prometheus-operator-cluster-role-binding.yaml",
                "rbac/prometheus-operator/prometheus-operator-deployment.yaml",
                "rbac/prometheus/prometheus-service-account.yaml",
                "rbac/prometheus/prometheus-cluster-role.yaml",
                "rbac/prometheus/prometheus-cluster-role-binding.yaml"):
        objs += _example(operator_dir, rel)
    for o in objs:
        if o["kind"] in ("ServiceAccount", "Deployment"):
            o["metadata"]["namespace"] = MON
        for s in o.get("subjects", []):
            s["namespace"] = MON
        if o["kind"] == "Deployment":
            c = o["spec"]["template"]["spec"]["containers"][0]
            c.update(image=image, imagePullPolicy="Never", command=["/bin/operator"])
            c["args"] = [a for a in c["args"] if not a.startswith(("--kubelet-", "--prometheus-config-reloader="))]
            c["args"].append(f"--prometheus-config-reloader={image}")
    pgw = {"app.kubernetes.io/name": "pushgateway"}
    objs += [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "pushgateway", "namespace": MON, "labels": pgw},
         "spec": {"replicas": 1, "selector": {"matchLabels": pgw}, "template": {"metadata": {"labels": pgw}, "spec": {
             "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "seccompProfile": {"type": "RuntimeDefault"}},
             "containers": [{"name": "pushgateway", "image": image, "imagePullPolicy": "Never",
                             "command": ["/bin/pushgateway"], "ports": [{"name": "http", "containerPort": 9091}],
                             "readinessProbe": {"httpGet": {"path": "/-/ready", "port": "http"}, "periodSeconds": 2},
                             "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                                 "capabilities": {"drop": ["ALL"]}}}]}}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "pushgateway", "namespace": MON, "labels": pgw},
         "spec": {"selector": pgw, "ports": [{"name": "http", "port": 9091, "targetPort": "http"}]}},
    ]
    return objs


def _crs(image: str) -> list[dict]:
    """The Prometheus (kube-prometheus-stack's default selectors) and the Pushgateway's ServiceMonitor."""
    return [
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
         "metadata": {"name": "pushgateway", "namespace": MON, "labels": SELECT},
         "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "pushgateway"}},
                  "endpoints": [{"port": "http", "honorLabels": True, "interval": f"{SCRAPE_S}s"}]}},
        {"apiVersion": "monitoring.coreos.com/v1", "kind": "Prometheus", "metadata": {"name": "k8s", "namespace": MON},
         "spec": {"version": "v3.10.0", "image": image, "imagePullPolicy": "Never", "replicas": 1,
                  "serviceAccountName": "prometheus",
                  "serviceMonitorSelector": {"matchLabels": SELECT}, "serviceMonitorNamespaceSelector": {},
                  "ruleSelector": {"matchLabels": SELECT}, "ruleNamespaceSelector": {},
                  "podMonitorSelector": {"matchLabels": SELECT}, "podMonitorNamespaceSelector": {},
                  "scrapeInterval": f"{SCRAPE_S}s", "evaluationInterval": f"{SCRAPE_S}s",
                  "securityContext": {"runAsNonRoot": True, "runAsUser": 65534, "fsGroup": 65534},
                  "resources": {"requests": {"cpu": "50m", "memory": "200Mi"}}}},
    ]


def _crd_name(path: Path) -> str:
    """monitoring.coreos.com_servicemonitors.yaml -> servicemonitors.monitoring.coreos.com (the files
    hold YAML that PyYAML does not read: a list item ``=``, the 1.1 ``value`` tag)."""
    group, plural = path.stem.split("_", 1)
    return f"{plural}.{group}"


class Stack:
    def __init__(self, cluster, say):
        self.cluster, self.say = cluster, say

    def kubectl(self, *args: str, check: bool = True, timeout: float = 120):
        return self.cluster.kubectl("-n", MON, *args, check=check, timeout=timeout)

    def describe(self) -> str:
        parts = []
        for args in (["get", "pods,statefulsets,deployments,prometheuses,servicemonitors", "-o", "wide"],
                     ["get", "events", "--sort-by=.lastTimestamp"], ["logs", "deploy/prometheus-operator", "--tail=30"]):
            res = self.kubectl(*args, check=False)
            parts.append(res.stdout[-4000:] + res.stderr[-1000:])
        return "\n".join(parts)

    def pod_ip(self, selector: str) -> str:
        deadline = time.monotonic() + SLOW
        while True:
            pods = json.loads(self.kubectl("get", "pods", "-l", selector, "-o", "json").stdout)["items"]
            ready = [p for p in pods if not p["metadata"].get("deletionTimestamp") and any(
                c["type"] == "Ready" and c["status"] == "True" for c in (p.get("status") or {}).get("conditions", []))]
            if ready:
                return ready[0]["status"]["podIP"]
            assert time.monotonic() < deadline, f"no ready pod {selector} in {MON}\n{self.describe()}"
            time.sleep(1)

    def get(self, url: str) -> str:
        res = self.cluster.run_in_network([sys.executable, "-c", GET, url], timeout=30)
        if res.returncode != 0:
            raise AssertionError(f"GET {url}: {res.stderr.strip()[-600:]}")
        return res.stdout

    def api(self, path: str, **params) -> dict:
        body = json.loads(self.get(f"http://{self.prom}:9090{path}" + (f"?{urlencode(params)}" if params else "")))
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("/api/v1/query", query=expr)["result"]

    def alerts(self) -> dict[str, str]:
        """alertname -> state (pending or firing) of the alerts of our release's namespace and the producers."""
        out: dict[str, str] = {}
        for a in self.api("/api/v1/alerts")["alerts"]:
            name = a["labels"]["alertname"]
            if name.startswith("DpeIngest") and out.get(name) != "firing":
                out[name] = a["state"]
        return out


@pytest.fixture(scope="module")
def stack(cluster, summary_line):
    from dpe_devkit.testbed import gobuild
    from dpe_devkit.testbed.images import CLUSTER_IMAGES

    t0 = time.monotonic()
    image = CLUSTER_IMAGES["monitoring"]
    operator_dir = gobuild.module_dir("prometheus-operator")
    st = Stack(cluster, summary_line)
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": MON}}])
    crds = sorted((operator_dir / "example" / "prometheus-operator-crd-full").glob("*.yaml"))
    assert len(crds) >= 9, f"the operator's CRDs are missing from {operator_dir}"
    for crd in crds:  # server-side: the Prometheus CRD is larger than the last-applied annotation allows
        cluster.kubectl("apply", "--server-side", "-f", str(crd), timeout=300)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=120s",
                    *[f"crd/{_crd_name(c)}" for c in crds], timeout=180)
    cluster.apply(_stack_objects(operator_dir, image))
    st.kubectl("rollout", "status", "deploy/prometheus-operator", "--timeout=300s", timeout=320)
    cluster.apply(_crs(image))
    st.prom = st.pod_ip("app.kubernetes.io/name=prometheus")
    st.pgw = st.pod_ip("app.kubernetes.io/name=pushgateway")
    deadline = time.monotonic() + SLOW
    while "ready" not in st.get(f"http://{st.prom}:9090/-/ready").lower():
        assert time.monotonic() < deadline, st.describe()
        time.sleep(1)
    summary_line(f"observability: operator, Prometheus and Pushgateway ready in {time.monotonic() - t0:.0f}s")
    yield st
    cluster.kubectl("delete", "namespace", MON, "--wait=false", check=False)


@pytest.fixture(scope="module")
def release(cluster, helm_bin, stack):
    rel = NodeRelease(cluster, helm_bin, NS, RELEASE, ROWS)
    rel.create_namespace()
    rel.helm("install", RELEASE, str(CHART), *_values(), *_departments(DEPARTMENTS), "--timeout", "10m")
    rel.wait_reconciled(DEPARTMENTS)
    yield rel
    rel.uninstall()


def _targets(stack: Stack) -> list[dict]:
    return [t for t in stack.api("/api/v1/targets", state="active")["activeTargets"]
            if t["scrapePool"].startswith(f"serviceMonitor/{NS}/{RELEASE}/")]


def test_every_target_of_the_servicemonitor_is_up(stack, release):
    deadline = time.monotonic() + SLOW
    while True:
        targets = _targets(stack)
        jobs = {t["labels"].get("job") for t in targets}
        if jobs == {"consumer", "analytics"} and all(t["health"] == "up" for t in targets):
            break
        assert time.monotonic() < deadline, "targets of the ServiceMonitor not all up: " + json.dumps(
            [{k: t.get(k) for k in ("scrapePool", "scrapeUrl", "health", "lastError")} for t in targets], indent=1)
        time.sleep(2)
    print(f"{len(targets)} targets up: {sorted(t['scrapeUrl'] for t in targets)}")


# -- the dashboard --------------------------------------------------------------------------------------
def _regex_escape(value: str) -> str:
    """Grafana's escaping of a value put into a Prometheus regex matcher (``prometheusRegularEscape``
    of its Prometheus datasource): the regex metacharacters get a backslash."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\1", value)


def _format(values: list[str]) -> str:
    """A variable's value in a Prometheus query, as Grafana formats it: one value escaped, several
    ``(a|b)``."""
    esc = [_regex_escape(v) for v in values]
    return esc[0] if len(esc) == 1 else "(" + "|".join(esc) + ")"


def _variables(stack: Stack, dashboard: dict, chosen: dict[str, list[str]]) -> dict[str, str]:
    """The dashboard's variables: a ``query`` variable's options from Prometheus as Grafana gets them
    (``label_values(metric, label)`` = /api/v1/label/<label>/values?match[]=metric), the chosen value
    among them; a ``datasource`` variable does not appear in queries."""
    out: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name, kind = var["name"], var.get("type")
        if kind == "datasource":
            continue
        assert kind == "query", f"variable {name}: type {kind} not handled by this test"
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*(\w+)\s*\)\s*", q)
        assert m, f"variable {name}: query {q!r} is not label_values(metric, label)"
        options = stack.api(f"/api/v1/label/{m.group(2)}/values", **{"match[]": m.group(1)})
        want = chosen[name]
        assert set(want) <= set(options), f"variable {name}: {want} not among its options {options} ({q})"
        out[name] = _format(want)
    return out


def _substitute(expr: str, variables: dict[str, str], panel: str) -> str:
    builtin = {"__rate_interval": f"{4 * SCRAPE_S}s", "__interval": f"{SCRAPE_S}s", "__range": "1h"}
    allv = {**builtin, **variables}

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in allv, f"panel {panel!r}: variable ${name} is not defined by the dashboard ({expr})"
        return allv[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", sub, expr)


def _panel_queries(dashboard: dict) -> list[tuple[str, str]]:
    out = []
    panels = list(dashboard["panels"])
    while panels:
        p = panels.pop(0)
        panels += p.get("panels", [])  # rows hold panels
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((f"{p.get('title')} [{t.get('refId') or t.get('legendFormat')}]", t["expr"]))
    return out


def test_every_dashboard_panel_returns_data(stack, release):
    dashboard = json.loads(DASHBOARD.read_text())
    variables = _variables(stack, dashboard, {"namespace": [NS]})
    queries = [(panel, _substitute(expr, variables, panel)) for panel, expr in _panel_queries(dashboard)]
    assert len(queries) >= len(dashboard["panels"]), "a panel without a query"
    deadline = time.monotonic() + 120  # the rates need two scrapes of every series (5 s apart)
    while True:
        empty = [(panel, expr) for panel, expr in queries if not stack.query(expr)]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(SCRAPE_S)
    assert not empty, "panels with no series:\n" + "\n".join(f"  {p}: {e}" for p, e in empty)
    print(f"{len(queries)} panel queries of {len(dashboard['panels'])} panels, each with data")


def test_dashboard_check_names_an_empty_panel(stack, release):
    """The check above can fail: a panel whose namespace is one with no pipeline comes back empty."""
    dashboard = json.loads(DASHBOARD.read_text())
    panel, expr = next((p, e) for p, e in _panel_queries(dashboard) if "$namespace" in e)
    assert stack.query(_substitute(expr, {"namespace": "no-such-namespace"}, panel)) == []
    assert stack.query(_substitute(expr, {"namespace": NS}, panel)), panel


# -- the Pushgateway --------------------------------------------------------------------------------------
def test_pushgateway_holds_one_group_per_department(stack, release):
    groups = json.loads(stack.get(f"http://{stack.pgw}:9091/api/v1/metrics"))["data"]
    ours = [g for g in groups if g["labels"].get("job") == "dpe-producer"]
    by_dep: dict[str, list[dict]] = {}
    for g in ours:
        by_dep.setdefault(g["labels"].get("department"), []).append(g)
    assert sorted(by_dep) == sorted(DEPARTMENTS), f"groups: {[g['labels'] for g in ours]}"
    for dep, gs in by_dep.items():
        assert len(gs) == 1, f"department {dep}: {len(gs)} groups {[g['labels'] for g in gs]}"
        # grouped by the release too (METRICS_PUSHGATEWAY_GROUPING): releases sharing it keep a group each
        assert gs[0]["labels"] == {"job": "dpe-producer", "department": dep, "namespace": NS, "release": RELEASE}, \
            gs[0]["labels"]
        rows = gs[0]["dpe_producer_rows"]["metrics"]
        assert [float(m["value"]) for m in rows] == [float(release.dataset.count(dep))], (dep, rows)
        assert [m["labels"]["department"] for m in rows] == [dep]
        assert float(gs[0]["dpe_producer_success"]["metrics"][0]["value"]) == 1.0, (dep, gs[0])
    # and through Prometheus (honorLabels: the pushed job, department, namespace and release kept)
    got = {r["metric"]["department"]: float(r["value"][1])
           for r in stack.query(f'dpe_producer_rows{{job="dpe-producer", namespace="{NS}", release="{RELEASE}"}}')}
    assert got == {d: float(release.dataset.count(d)) for d in DEPARTMENTS}, got


# -- the alerts -----------------------------------------------------------------------------------------------
def _wait_firing(stack: Stack, names: set[str], since: float, bound: float, what: str) -> float:
    while True:
        alerts = stack.alerts()
        if all(alerts.get(n) == "firing" for n in names):
            return time.monotonic() - since
        assert time.monotonic() - since < bound, f"{what}: {sorted(names)} not firing {bound:.0f}s after; alerts {alerts}"
        time.sleep(1)


def test_alerts_fire_with_the_consumer_scaled_to_0_and_resolve_after(stack, release, summary_line):
    watched = {"DpeIngestConsumerDown", "DpeIngestConsumerLagNotDecreasing"}
    before = stack.alerts()
    assert not watched & set(before), f"alerts active before the test: {before}"
    release.kubectl("scale", f"deploy/{RELEASE}-consumer", "--replicas=0")
    deadline = time.monotonic() + SLOW
    while release.get("pods", "-l", "app.kubernetes.io/component=consumer")["items"]:
        assert time.monotonic() < deadline, release.describe()
        time.sleep(0.5)
    gone = time.monotonic()
    # the consumer-down bound: its for: plus two scrape intervals, plus the discovery's update
    # period and one rule evaluation (the ticks that see the target gone and the for: elapsed)
    bound = DOWN_FOR_S + 2 * SCRAPE_S + SD_UPDATE_S + SCRAPE_S
    down_s = _wait_firing(stack, {"DpeIngestConsumerDown"}, gone, bound, "consumer scaled to 0")

    # rows arrive for nobody: department 13's producer runs; the analytics consumer reads them
    seen = float(stack.query(f'sum(dpe_analytics_messages_total{{namespace="{NS}"}})')[0]["value"][1])
    # (the upgrade keeps the consumer at 0: it would otherwise set the chart's replicas back)
    release.helm("upgrade", RELEASE, str(CHART), *_values(), *_departments(DEPARTMENTS + [LATER]),
                 "--set", "consumer.replicas=0")
    deadline = time.monotonic() + SLOW
    while float(stack.query(f'sum(dpe_analytics_messages_total{{namespace="{NS}"}})')[0]["value"][1]) <= seen:
        assert time.monotonic() < deadline, f"the analytics consumer read no message of {LATER}\n{release.describe()}"
        time.sleep(1)
    arriving = time.monotonic()
    assert release.stored().get(LATER, 0) == 0, "rows stored with no consumer running"
    lag_s = _wait_firing(stack, watched, arriving,
                         DOWN_FOR_S + 2 * SCRAPE_S + 2 * SCRAPE_S, "rows waiting for the sink")

    release.kubectl("scale", f"deploy/{RELEASE}-consumer", "--replicas=1")
    t = time.monotonic()
    while watched & set(stack.alerts()):
        assert time.monotonic() - t < SLOW, f"alerts still firing after the scale-up: {stack.alerts()}"
        time.sleep(1)
    resolved_s = time.monotonic() - t
    release.wait_reconciled(DEPARTMENTS + [LATER])
    summary_line(f"observability: DpeIngestConsumerDown firing {down_s:.0f}s after the consumer pods were gone "
                 f"(for: {DOWN_FOR_S}s, scrape {SCRAPE_S}s), DpeIngestConsumerLagNotDecreasing {lag_s:.0f}s after "
                 f"department {LATER}'s rows arrived; both resolved {resolved_s:.0f}s after the scale-up")
