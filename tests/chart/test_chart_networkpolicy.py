"""The chart's NetworkPolicies (networkPolicy.*, issue 23) select exactly the right pods.

The policies are read as a network plugin reads them: a small evaluator of the NetworkPolicy rules
(label selectors with matchLabels and matchExpressions, peers with and without namespaceSelector,
ports) is run against the pod templates the chart itself renders (Deployments, StatefulSets, Jobs,
CronJobs, the helm test pods: their labels as rendered, not as this test assumes them), plus pods the
chart does not render: a ``dpe-ingest status`` pod labelled as docs/chart.md says, the same labels in
another namespace or of another release, an unlabelled pod, a Prometheus pod.  The test cluster
(tests/cluster/test_cluster_networkpolicy.py) shows an engine enforcing them.
"""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

from chartlib import CHART, KUBE_VERSION, by_kind, pod_spec

NS = "dpe"          # the namespace the Renderer renders into
RELEASE = "dpe"
NAME = "dpe-ingest"
ALL_ON = {"departments": "{69,01}", "refresh.schedule": "0 3 * * 0", "kafdrop.enabled": "true",
          "analytics.enabled": "true", "metrics.enabled": "true"}


# ----------------------------------------------------------------------------- a NetworkPolicy reader
def selects(selector: dict | None, labels: dict) -> bool:
    """Kubernetes' LabelSelector semantics ({} selects everything)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if op == "In" and (key not in labels or labels[key] not in values):
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


class Pod:
    def __init__(self, what: str, labels: dict, namespace: str = NS, ns_labels: dict | None = None,
                 ports: tuple[int, ...] = ()):
        self.what, self.labels, self.namespace, self.ports = what, labels, namespace, ports
        self.ns_labels = {"kubernetes.io/metadata.name": namespace, **(ns_labels or {})}

    @property
    def component(self) -> str | None:
        return self.labels.get("app.kubernetes.io/component")

    def __repr__(self) -> str:
        return f"{self.what}@{self.namespace}"


def admits(policy: dict, src: Pod, port: int) -> bool:
    """Does one of ``policy``'s ingress rules let ``src`` in on TCP ``port``?"""
    for rule in policy["spec"].get("ingress") or []:
        ports = rule.get("ports")
        if ports and not any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports):
            continue
        peers = rule.get("from")
        if not peers:
            return True
        for peer in peers:
            if "ipBlock" in peer:
                continue  # pods are not addressed by CIDR here
            in_ns = (selects(peer["namespaceSelector"], src.ns_labels) if "namespaceSelector" in peer
                     else src.namespace == NS)
            if in_ns and selects(peer.get("podSelector"), src.labels):
                return True
    return False


def rendered_pods(docs: list[dict]) -> list[Pod]:
    """Every pod the chart would make, with the labels and container ports of its template."""
    pods = []
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        if d["kind"] == "Pod":
            meta = d["metadata"]
        elif d["kind"] == "CronJob":
            meta = d["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
        else:
            meta = d["spec"]["template"]["metadata"]
        ports = tuple(p["containerPort"] for c in spec["containers"] for p in c.get("ports") or [])
        pods.append(Pod(f"{d['kind']}/{d['metadata']['name']}", dict(meta.get("labels") or {}), ports=ports))
    return pods


def release_labels(component: str, release: str = RELEASE) -> dict:
    return {"app.kubernetes.io/name": NAME, "app.kubernetes.io/instance": release,
            "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "dpe-ingest"}


def outsiders() -> list[Pod]:
    """Pods the chart does not render, none of which may reach a server (but status Kafka)."""
    return [Pod("unlabelled", {}), Pod("other-app", {"app": "debug"}),
            Pod("consumer-labels-elsewhere", release_labels("consumer"), namespace="elsewhere"),
            Pod("test-labels-other-release", release_labels("test", "other")),
            Pod("impostor-component", release_labels("intruder"))]


STATUS = Pod("status", release_labels("status"))
PROMETHEUS = Pod("prometheus", {"app.kubernetes.io/name": "prometheus"}, namespace="monitoring")


def policies(docs: list[dict]) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in by_kind(docs, "NetworkPolicy")}


def selected(policy: dict, pods: list[Pod]) -> set[str]:
    return {p.what for p in pods if p.namespace == NS and selects(policy["spec"]["podSelector"], p.labels)}


def admitted(policy: dict, pods: list[Pod], port: int) -> set[str | None]:
    """The components (of pods of the release's namespace) let in on ``port``."""
    return {p.component for p in pods if admits(policy, p, port)}


# ----------------------------------------------------------------------------- the defaults
def test_on_by_default_one_policy_per_server_ingress_only(render):
    docs = render.template(sets={"departments": "{69,01}", "kafdrop.enabled": "true"},
                           values_files=[CHART / "values-offline.yaml"])
    nps = policies(docs)
    assert set(nps) == {"dpe-kafka", "dpe-postgresql", "dpe-kafdrop", "dpe-standin", "dpe-metrics"}, set(nps)
    pods = rendered_pods(docs)
    for name, np in nps.items():
        # no egress section anywhere: the producers keep their way to the API, every pod its DNS
        assert np["spec"]["policyTypes"] == ["Ingress"] and "egress" not in np["spec"], name
        # a policy on its server's pods only: no producer, refresh or test pod is ever isolated
        assert not {p.component for p in pods if p.what in selected(np, pods)} & {"producer", "refresh", "test"}, name
        kubernetes_validate.validate(np, KUBE_VERSION, strict=True)


def test_each_policy_selects_exactly_its_servers_pods_and_opens_their_port(render):
    docs = render.template(sets=ALL_ON, values_files=[CHART / "values-offline.yaml"])
    pods, nps = rendered_pods(docs), policies(docs)
    by_component = {}
    for p in pods:
        by_component.setdefault(p.component, set()).add(p.what)
    want = {"dpe-kafka": {"kafka"}, "dpe-postgresql": {"postgresql"}, "dpe-kafdrop": {"kafdrop"},
            "dpe-standin": {"standin"}, "dpe-metrics": {"consumer", "analytics"}}
    assert set(nps) == set(want)
    for name, components in want.items():
        assert selected(nps[name], pods) == set().union(*(by_component[c] for c in components)), name
        # the port let in is the one the selected containers listen on
        for p in pods:
            if p.what in selected(nps[name], pods):
                for rule in nps[name]["spec"]["ingress"]:
                    for port in rule["ports"]:
                        assert port["port"] in p.ports, (name, p, port, p.ports)


def test_who_may_open_each_port(render):
    docs = render.template(sets=ALL_ON, values_files=[CHART / "values-offline.yaml"])
    pods, nps = rendered_pods(docs), policies(docs)
    assert {p.component for p in pods} == {"producer", "refresh", "consumer", "analytics", "kafka", "postgresql",
                                           "kafdrop", "standin", "test"}
    everyone = pods + outsiders() + [STATUS, PROMETHEUS]
    assert admitted(nps["dpe-kafka"], everyone, 9092) == {"producer", "consumer", "analytics", "refresh", "status",
                                                          "test", "kafdrop"}
    assert admitted(nps["dpe-kafka"], everyone, 9093) == set()  # the controller port: the broker alone
    assert admitted(nps["dpe-postgresql"], everyone, 5432) == {"consumer", "analytics", "refresh", "test"}
    assert admitted(nps["dpe-standin"], everyone, 8000) == {"producer", "refresh"}
    # Kafdrop: any pod of the release's namespace (the default from), nobody from elsewhere
    kafdrop_in = {p.what for p in everyone if admits(nps["dpe-kafdrop"], p, 9000)}
    assert kafdrop_in == {p.what for p in everyone if p.namespace == NS}
    # metrics: Prometheus' namespace only
    assert {p.what for p in everyone if admits(nps["dpe-metrics"], p, 9100)} == {"prometheus"}
    for outsider in outsiders():
        for np, port in ((nps["dpe-kafka"], 9092), (nps["dpe-postgresql"], 5432), (nps["dpe-standin"], 8000)):
            assert not admits(np, outsider, port), (outsider, np["metadata"]["name"])


def test_optional_components_are_not_let_in_when_absent(render):
    docs = render.template(sets={"analytics.enabled": "false", "kafdrop.enabled": "false"})
    nps = policies(docs)
    everyone = rendered_pods(docs) + [STATUS, Pod("kafdrop", release_labels("kafdrop")),
                                      Pod("refresh", release_labels("refresh")),
                                      Pod("analytics", release_labels("analytics"))]
    assert admitted(nps["dpe-kafka"], everyone, 9092) == {"producer", "consumer", "status", "test"}
    assert admitted(nps["dpe-postgresql"], everyone, 5432) == {"consumer", "test"}
    assert "dpe-kafdrop" not in nps and "dpe-standin" not in nps
    assert {p.component for p in rendered_pods(docs) if p.what in selected(nps["dpe-metrics"], rendered_pods(docs))} \
        == {"consumer"}


def test_release_name_and_common_labels(render):
    """Another release name (fullnameOverride too) and commonLabels: the selectors follow the pods."""
    docs = render.template(release="etl", sets={"fullnameOverride": "pipe", "commonLabels.team": "data"})
    nps, pods = policies(docs), rendered_pods(docs)
    assert set(nps) == {"pipe-kafka", "pipe-postgresql", "pipe-kafdrop", "pipe-metrics"}
    assert {p.component for p in pods if admits(nps["pipe-postgresql"], p, 5432)} == {"consumer", "analytics", "test"}
    assert not admits(nps["pipe-kafka"], Pod("dpe's consumer", release_labels("consumer")), 9092)
    assert admits(nps["pipe-kafka"], Pod("etl's status", release_labels("status", "etl")), 9092)


def test_disabled_renders_no_policy(render):
    assert not by_kind(render.template(sets={"networkPolicy.enabled": "false"}), "NetworkPolicy")


def test_external_servers_get_no_policy_of_ours(render):
    nps = policies(render.template(values_files=[CHART / "values-external.yaml"]))
    assert "dpe-kafka" not in nps and "dpe-postgresql" not in nps and "dpe-metrics" in nps


# ----------------------------------------------------------------------------- the user's peers
EXTRA = """
networkPolicy:
  kafka:
    extraFrom:
      - namespaceSelector: {matchLabels: {team: tools}}
        podSelector: {matchLabels: {app: kcat}}
  postgresql:
    extraFrom:
      - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: bi}}
      - ipBlock: {cidr: 10.20.0.0/16, except: [10.20.1.0/24]}
  standin:
    extraFrom:
      - podSelector: {matchExpressions: [{key: app, operator: In, values: [loadtest]}]}
  kafdrop:
    from:
      - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: ops}}
  metrics:
    from:
      - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: observability}}
        podSelector: {matchLabels: {app.kubernetes.io/name: prometheus}}
"""


def test_extra_peers_are_added_not_substituted(render, tmp_path):
    f = tmp_path / "np.yaml"
    f.write_text(EXTRA)
    docs = render.template(values_files=[CHART / "values-offline.yaml", f], sets={"kafdrop.enabled": "true"})
    nps, pods = policies(docs), rendered_pods(docs)
    for np in nps.values():
        kubernetes_validate.validate(np, KUBE_VERSION, strict=True)
    kcat = Pod("kcat", {"app": "kcat"}, namespace="tools-ns", ns_labels={"team": "tools"})
    kcat_elsewhere = Pod("kcat", {"app": "kcat"}, namespace="other")
    bi = Pod("bi", {"app": "metabase"}, namespace="bi")
    loadtest = Pod("loadtest", {"app": "loadtest"})
    ops = Pod("ui-user", {}, namespace="ops")
    prom = Pod("prometheus", {"app.kubernetes.io/name": "prometheus"}, namespace="observability")
    # the release's own clients are still in, the extra peers too, and nobody else
    assert {p.component for p in pods if admits(nps["dpe-kafka"], p, 9092)} == {"producer", "consumer", "analytics",
                                                                                "test", "kafdrop"}
    assert admits(nps["dpe-kafka"], kcat, 9092) and not admits(nps["dpe-kafka"], kcat_elsewhere, 9092)
    assert not admits(nps["dpe-postgresql"], kcat, 5432)
    assert admits(nps["dpe-postgresql"], bi, 5432) and not admits(nps["dpe-kafka"], bi, 9092)
    assert {"ipBlock": {"cidr": "10.20.0.0/16", "except": ["10.20.1.0/24"]}} in nps["dpe-postgresql"]["spec"]["ingress"][0]["from"]
    assert admits(nps["dpe-standin"], loadtest, 8000) and not admits(nps["dpe-kafka"], loadtest, 9092)
    assert admits(nps["dpe-kafdrop"], ops, 9000)
    assert not [p for p in pods if admits(nps["dpe-kafdrop"], p, 9000)]  # from replaces the default
    assert admits(nps["dpe-metrics"], prom, 9100) and not admits(nps["dpe-metrics"], PROMETHEUS, 9100)


@pytest.mark.parametrize("values, path, detail", [
    ({"kafka": {"extraFrom": [{"podselector": {}}]}}, "/networkPolicy/kafka/extraFrom/0",
     "additional properties 'podselector' not allowed"),
    ({"postgresql": {"extraFrom": [{}]}}, "/networkPolicy/postgresql/extraFrom/0", "minProperties"),
    ({"kafka": {"extraFrom": [{"podSelector": {"matchExpressions": [{"key": "app", "operator": "in"}]}}]}},
     "/networkPolicy/kafka/extraFrom/0/podSelector/matchExpressions/0/operator", "'In', 'NotIn', 'Exists'"),
    ({"postgresql": {"extraFrom": [{"ipBlock": {"cidr": "10.0.0.1"}}]}},
     "/networkPolicy/postgresql/extraFrom/0/ipBlock/cidr", "10.0.0.1"),
    ({"kafka": {"extraFrom": {"podSelector": {}}}}, "/networkPolicy/kafka/extraFrom", "want array"),
    ({"kafka": {"extrafrom": []}}, "/networkPolicy/kafka", "additional properties 'extrafrom' not allowed"),
    ({"enable": True}, "/networkPolicy", "additional properties 'enable' not allowed"),
    ({"metrics": {"from": [{"namespaceSelector": {"matchLabels": {"team": 1}}}]}},
     "/networkPolicy/metrics/from/0/namespaceSelector/matchLabels/team", "want string"),
])
def test_bad_values_are_refused_naming_them(render, tmp_path, values, path, detail):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"networkPolicy": values}))
    err = render.template_error(values_files=[f])
    assert "values don't meet the specifications of the schema" in err and f"at '{path}'" in err, err
    assert detail in err, err


@pytest.mark.parametrize("key, hint", [("kafdrop", "[{podSelector: {}}] is the release's namespace"),
                                       ("metrics", "Prometheus' namespace")])
def test_an_empty_from_is_refused_with_a_sentence(render, tmp_path, key, hint):
    """In a NetworkPolicy an empty ``from`` lets everyone in: never rendered, refused saying what to write."""
    f = tmp_path / "empty.yaml"
    f.write_text(yaml.safe_dump({"networkPolicy": {key: {"from": []}}}))
    err = render.template_error(values_files=[f])
    assert f"networkPolicy.{key}.from is empty: list at least one NetworkPolicyPeer" in err and hint in err, err
