"""values-production.yaml (issue 23): it renders and passes the schema (``helm template`` validates
values.schema.json), alone and with a refresh schedule; what it sets reaches the objects (no Kafdrop,
the NetworkPolicies, two consumer pods and their PodDisruptionBudget, every container of every pod
with the requests and limits the file gives its component); and docs/chart.md's "Production" section,
the one place that says what production needs, names every setting of the file.  On the node:
tests/cluster/test_cluster_production.py."""

from __future__ import annotations

import re

import yaml

from chartlib import CHART, ROOT, by_kind, named, pod_spec

PRODUCTION = CHART / "values-production.yaml"
VALUES = yaml.safe_load(PRODUCTION.read_text())
# label app.kubernetes.io/component of a pod -> the values key of its resources
COMPONENT_KEY = {"kafka": "kafka", "postgresql": "postgresql", "producer": "producer", "refresh": "refresh",
                 "consumer": "consumer", "analytics": "analytics", "test": "tests"}


def _render(render, **sets):
    return render.template(values_files=[PRODUCTION], sets={"departments": "{69,01,38}", **sets})


def _pods(docs):
    for doc in docs:
        spec = pod_spec(doc)
        if spec is not None:
            labels = (doc["spec"]["template"]["metadata"]["labels"] if doc["kind"] in ("Deployment", "StatefulSet", "Job")
                      else doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
                      if doc["kind"] == "CronJob" else doc["metadata"]["labels"])
            yield doc, labels["app.kubernetes.io/component"], spec


def test_production_values_render_what_they_say(render):
    docs = _render(render, **{"refresh.schedule": "0 3 * * 0"})
    assert not [d for d in docs if "kafdrop" in d["metadata"]["name"]]
    assert {p["metadata"]["name"] for p in by_kind(docs, "NetworkPolicy")} >= {"dpe-kafka", "dpe-postgresql"}
    assert named(docs, "Deployment", "dpe-consumer")["spec"]["replicas"] == VALUES["consumer"]["replicas"] == 2
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "consumer", pdb
    seen = set()
    for doc, component, spec in _pods(docs):
        want = VALUES[COMPONENT_KEY[component]]["resources"]
        seen.add(COMPONENT_KEY[component])
        for c in spec.get("initContainers", []) + spec["containers"]:
            res = c["resources"]
            assert set(res["requests"]) == set(res["limits"]) == {"cpu", "memory"}, (doc["metadata"]["name"], c["name"])
        assert spec["containers"][0]["resources"] == want, (doc["metadata"]["name"], spec["containers"][0]["resources"])
    # every component that runs in production has its resources in the file
    assert seen == {k for k in COMPONENT_KEY.values()} == {k for k, v in VALUES.items() if "resources" in v}, seen


def test_production_values_without_networkpolicies_and_with_kafdrop_differ(render):
    """Counter-test of the one above: the defaults render Kafdrop and one consumer pod without a PDB."""
    docs = render.template(sets={"departments": "{69}", "networkPolicy.enabled": "false"})
    assert [d["metadata"]["name"] for d in by_kind(docs, "Deployment") if "kafdrop" in d["metadata"]["name"]]
    assert not by_kind(docs, "NetworkPolicy") and not by_kind(docs, "PodDisruptionBudget")
    assert named(docs, "Deployment", "dpe-consumer")["spec"]["replicas"] == 1


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and key != "resources" and value and not set(value) <= {"requests", "limits"}:
            yield from _leaves(value, path + ".")
        else:
            yield path


def test_docs_production_section_names_every_setting():
    text = (ROOT / "docs" / "chart.md").read_text()
    m = re.search(r"^## Production\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert m, "docs/chart.md has no '## Production' section"
    section = m.group(1)
    assert "values-production.yaml" in section
    missing = [p for p in _leaves(VALUES) if f"`{p}" not in section]
    assert not missing, f"docs/chart.md 'Production' does not name {missing}"
