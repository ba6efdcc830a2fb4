"""The chart's PrometheusRule (``metrics.prometheusRule.enabled``) read by Prometheus' own tools:
``promtool check rules`` on the rendered rule (with and without the analytics consumer), and
``promtool test rules`` with tests/chart/prometheusrule-tests.yaml (input series -> expected alerts).

promtool is Prometheus v3.10.0's, built from the Go module proxy by ``testbed.gobuild`` (build
``prometheus``; ``scripts/setup --tests`` builds it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from chartlib import by_kind

HERE = Path(__file__).resolve().parent
UNIT_TESTS = HERE / "prometheusrule-tests.yaml"
RULE_SETS = {"metrics.enabled": "true", "metrics.prometheusRule.enabled": "true"}


@pytest.fixture(scope="module")
def promtool() -> str:
    from dpe_devkit.testbed import gobuild

    return str(gobuild.ensure("prometheus", quiet=True)["promtool"])


def rule_groups(render, release: str = "dpe", sets: dict | None = None) -> dict:
    rules = by_kind(render.template(sets={**RULE_SETS, **(sets or {})}, release=release, namespace="dpe"),
                    "PrometheusRule")
    assert len(rules) == 1, f"expected one PrometheusRule, got {len(rules)}"
    return {"groups": rules[0]["spec"]["groups"]}


def promtool_run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def test_no_rule_unless_asked(render):
    assert not by_kind(render.template(sets={"metrics.enabled": "true"}), "PrometheusRule")
    assert not by_kind(render.template(sets={"metrics.prometheusRule.enabled": "true"}), "PrometheusRule")


@pytest.mark.parametrize("analytics", ["true", "false"])
def test_promtool_check_rules_accepts_the_rendered_rule(render, promtool, tmp_path, analytics):
    groups = rule_groups(render, sets={"analytics.enabled": analytics,
                                       "metrics.prometheusRule.labels.release": "kube-prometheus-stack"})
    names = [r["alert"] for g in groups["groups"] for r in g["rules"]]
    want = {"DpeIngestConsumerDown", "DpeIngestConsumerLagNotDecreasing", "DpeIngestDeadLettersRising",
            "DpeIngestProducerFailed"}
    if analytics == "true":
        want |= {"DpeIngestAnalyticsDown", "DpeIngestFGShareHigh"}
    assert sorted(names) == sorted(want)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups, sort_keys=False))
    res = promtool_run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert res.returncode == 0, f"promtool check rules refused the rendered rule:\n{res.stdout}\n{res.stderr}"
    assert f"SUCCESS: {len(want)} rules found" in res.stdout, res.stdout


def test_promtool_check_rules_refuses_a_broken_expression(render, promtool, tmp_path):
    """The check above can fail: one expression broken (a parenthesis short) is refused, named."""
    groups = rule_groups(render)
    rule = next(r for g in groups["groups"] for r in g["rules"] if r["alert"] == "DpeIngestDeadLettersRising")
    rule["expr"] = rule["expr"].replace(")", "", 1)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups, sort_keys=False))
    res = promtool_run(promtool, "check", "rules", "rules.yaml", cwd=tmp_path)
    assert res.returncode != 0 and "parse error" in res.stdout + res.stderr, res.stdout + res.stderr


def _unit_test(render, promtool, tmp_path: Path, release: str) -> subprocess.CompletedProcess:
    groups = rule_groups(render, release=release)
    for g in groups["groups"]:
        for r in g["rules"]:
            r.pop("annotations", None)  # expanded per alert by promtool; `check rules` parses them
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    return promtool_run(promtool, "test", "rules", UNIT_TESTS.name, cwd=tmp_path)


def test_promtool_test_rules(render, promtool, tmp_path):
    res = _unit_test(render, promtool, tmp_path, "dpe")
    assert res.returncode == 0, f"promtool test rules failed:\n{res.stdout}\n{res.stderr}"
    assert "SUCCESS" in res.stdout + res.stderr


def test_promtool_test_rules_fails_for_another_release(render, promtool, tmp_path):
    """The unit tests can fail: the rule of release ``other`` selects other Services, so its
    consumer-down alert fires where the cases expect none (and the lag alerts never fire), and the failed
    producer of release ``dpe`` is not its business."""
    res = _unit_test(render, promtool, tmp_path, "other")
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "DpeIngestConsumerDown" in out and "DpeIngestConsumerLagNotDecreasing" in out, out
    assert "DpeIngestProducerFailed" in out, out
