"""The series behind the Grafana dashboard's panels exist before any traffic: a panel of a gauge or
counter by label (skipped messages by reason, alert summaries by level) shows 0 on a quiet pipeline
instead of "no data" (tests/cluster/test_cluster_observability.py queries every panel on the node; a
pipeline that skipped nothing left that panel empty)."""

from __future__ import annotations

from dpe_ingest import analytics, metrics


def _samples(registry, name: str) -> dict[str, float]:
    return {s.labels.get("reason") or s.labels.get("level"): s.value
            for fam in registry.collect() for s in fam.samples if s.name == name}


def test_the_skip_reasons_are_the_analytics_consumers():
    assert metrics.SKIP_REASONS == analytics.SKIP_REASONS


def test_skipped_and_alert_series_exist_from_the_start():
    m = metrics.AnalyticsMetrics()
    assert _samples(m.registry, "dpe_analytics_skipped") == {r: 0.0 for r in analytics.SKIP_REASONS}
    assert _samples(m.registry, "dpe_analytics_alerts_total") == {"warning": 0.0, "info": 0.0}
    # the counts read back from the tables replace them
    m.set_counts({"69": {"A": 1}}, {"invalid": 3})
    assert _samples(m.registry, "dpe_analytics_skipped")["invalid"] == 3.0


def test_the_alert_levels_are_those_the_summaries_count():
    m = metrics.AnalyticsMetrics()
    alerts = analytics.Alerts(0.3, 0.0, m.alerts)
    alerts.add({"69": 1})
    alerts.emit({"69": {"F": 2, "A": 1}}, force=True)
    alerts.add({"01": 1})
    alerts.emit({"01": {"A": 5}}, force=True)
    got = _samples(m.registry, "dpe_analytics_alerts_total")
    assert set(got) == set(metrics.ALERT_LEVELS), got
    assert sum(got.values()) >= 1, got
