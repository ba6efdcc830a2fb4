"""helm lint --strict over the values files shipped with the chart and common --set forms."""

from __future__ import annotations

import pytest

from chartlib import CHART

VALUES_FILES = sorted(p.relative_to(CHART).as_posix() for p in [*CHART.glob("values-*.yaml"), *CHART.glob("ci/*.yaml")])

SETS = [
    {},
    {"departments": "{69,01,38}"},
    {"departments": "{69,1,2a,971}"},
    {"standin.enabled": "true", "kafdrop.enabled": "false"},
    {"kafka.enabled": "false", "externalKafka.bootstrapServers": r"k1:9092\,k2:9092"},
    {"postgresql.enabled": "false", "externalPostgresql.url": "postgresql://dpe@db:5432/dpe"},
    {"producer.rerun.69": "2", "producer.ttlSecondsAfterFinished": "600", "ademe.maxRps": "1.5"},
]


def test_values_files_exist():
    assert "values-offline.yaml" in VALUES_FILES and "values-external.yaml" in VALUES_FILES
    assert any(v.startswith("ci/") for v in VALUES_FILES)


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_lint_values_file(render, values_file):
    proc = render.lint(values_files=[CHART / values_file])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("sets", SETS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_lint_sets(render, sets):
    proc = render.lint(sets=sets)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lint_comma_string(render):
    proc = render.lint(set_strings={"departments": r"69\,01\,38"})
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_lint_fails_on_schema_violation(render):
    proc = render.lint(sets={"consumer.batchSize": "0"})
    assert proc.returncode != 0
    assert "/consumer/batchSize" in proc.stdout + proc.stderr


def test_lint_reports_bad_department(render):
    # helm lint runs templates in lint mode, where `fail` is reported (as [INFO] Fail) but not fatal;
    # helm install/template do fail (test_chart_schema.py).
    proc = render.lint(sets={"departments": "{69,99}"})
    assert 'invalid department code "99"' in proc.stdout + proc.stderr
