"""Secure defaults on every pod the chart renders, in every configuration of the chart."""

from __future__ import annotations

import pytest

from chartlib import CHART, pod_spec

CONFIGS = {
    "defaults": {"sets": {"departments": "{69,2a}"}},
    "offline": {"values_files": [CHART / "values-offline.yaml"]},
    "external": {"values_files": [CHART / "values-external.yaml"]},
}

# uid each image runs as: our Python images (10001), postgres (999), apache/kafka's appuser (1000),
# kafdrop (no USER in its image: we pick nobody, 65534)
EXPECTED_UID = {"producer": 10001, "consumer": 10001, "standin": 10001, "postgresql": 999, "kafka": 1000,
                "kafdrop": 65534}
# the apache/kafka start script writes its configuration under /opt/kafka/config
WRITABLE_ROOT = {("kafka", "kafka")}


def _pods(render, config):
    for d in render.template(**CONFIGS[config]):
        spec = pod_spec(d)
        if spec is not None:
            yield d, spec


@pytest.mark.parametrize("config", CONFIGS)
def test_pod_and_container_security(render, config):
    seen = 0
    for d, spec in _pods(render, config):
        seen += 1
        name = d["metadata"]["name"]
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True, name
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for c in spec["containers"] + spec.get("initContainers", []):
            where = f"{name}/{c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert sc.get("privileged", False) is False, where
            assert sc["runAsNonRoot"] is True, where
            uid = sc.get("runAsUser", psc.get("runAsUser"))
            assert uid and uid > 0, where
            if component in EXPECTED_UID:
                assert uid == EXPECTED_UID[component], where
            if (component, c["name"]) not in WRITABLE_ROOT:
                assert sc["readOnlyRootFilesystem"] is True, where
                # a read-only root needs a writable /tmp
                assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, where
            res = c["resources"]
            for kind in ("requests", "limits"):
                assert res[kind]["cpu"] and res[kind]["memory"], f"{where} {kind}"
    assert seen >= 4


def test_test_pods_match_their_images(render):
    checked = []
    for d, spec in _pods(render, "defaults"):
        if d["kind"] != "Pod":
            continue
        uid = spec["containers"][0]["securityContext"]["runAsUser"]
        image = spec["containers"][0]["image"]
        # psql in the postgres image (uid 999); the Kafka check in our producer image (uid 10001)
        assert uid == (999 if image.startswith("postgres:") else 10001), d["metadata"]["name"]
        assert image.startswith(("postgres:", "dpe-ingest-producer:")), image
        checked.append(d["metadata"]["name"])
    assert sorted(checked) == ["dpe-test-kafka", "dpe-test-postgresql"]  # helm test's two pods
