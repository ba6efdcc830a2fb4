"""Every rendered object validates (strict) against the Kubernetes schemas of the kind release."""

from __future__ import annotations

import kubernetes_validate
import pytest

from chartlib import CHART, KUBE_VERSION

CONFIGS = {
    "defaults": {"sets": {"departments": "{69,01,2a,971}"}},
    "offline": {"values_files": [CHART / "values-offline.yaml"]},
    "external": {"values_files": [CHART / "values-external.yaml"]},
    "options": {"sets": {"producer.ttlSecondsAfterFinished": "600", "producer.activeDeadlineSeconds": "7200",
                         "producer.rerun.69": "1", "kafka.persistence.storageClass": "standard",
                         "ademe.maxRps": "2", "ademe.dateFrom": "2024-01-01",
                         "commonLabels.team": "data", "imagePullSecrets[0].name": "regcred"}},
    "refresh_and_api_key": {"sets": {"departments": "{69,977,none}", "refresh.schedule": "0 3 * * 0",
                                     "refresh.timeZone": "Europe/Paris", "refresh.activeDeadlineSeconds": "7200",
                                     "ademe.apiKey.existingSecret": "ademe-key", "ademe.maxTotalRps": "5"}},
}


@pytest.mark.parametrize("config", CONFIGS)
def test_objects_validate(render, config):
    docs = render.template(**CONFIGS[config])
    assert docs
    for d in docs:
        try:
            kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{d['kind']}/{d['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_validator_is_strict(render):
    # the check above can fail: a misspelt field is refused
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"}, "spec": {"prots": []}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)
