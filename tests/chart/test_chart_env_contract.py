"""The chart sets only variables of the environment contract (dpe_ingest.config.CONTRACT)."""

from __future__ import annotations

import pytest

from dpe_ingest import config
from chartlib import CHART, container, env_of, named, pod_spec, producer_jobs

# libpq reads these itself (DATABASE_URL carries no password)
LIBPQ = {"PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY",
         "PGCONNECT_TIMEOUT"}

CONFIGS = {
    "defaults": {"sets": {"departments": "{69,2a}", "ademe.maxRps": "2", "ademe.dateFrom": "2024-01-01",
                          "ademe.dateTo": "2024-02-01", "ademe.extraFields": "surface_habitable_logement"}},
    "external": {"values_files": [CHART / "values-external.yaml"]},
    "offline": {"values_files": [CHART / "values-offline.yaml"]},
}


@pytest.mark.parametrize("cfg", CONFIGS)
def test_producer_and_consumer_env_names_are_in_the_contract(render, cfg):
    docs = render.template(**CONFIGS[cfg])
    programs = [container(j, "producer") for j in producer_jobs(docs).values()]
    programs += [c for j in producer_jobs(docs).values() for c in pod_spec(j).get("initContainers", [])]
    programs.append(container(named(docs, "Deployment", "dpe-consumer")))
    for c in programs:
        unknown = set(env_of(c)) - set(config.CONTRACT) - LIBPQ
        assert not unknown, f"{c['name']}: not in config.CONTRACT: {sorted(unknown)}"


def test_rendered_env_is_accepted_by_the_config_classes(render):
    docs = render.template(**CONFIGS["defaults"])
    for job in producer_jobs(docs).values():
        env = {k: v for k, v in env_of(container(job, "producer")).items() if isinstance(v, str)}
        cfg = config.ProducerConfig.from_env(env)
        assert cfg.department == env["DEPARTMENT"]
        assert cfg.date_from == "2024-01-01" and cfg.max_rps == 2.0
        assert "surface_habitable_logement" in cfg.fields
    env = {k: v for k, v in env_of(container(named(docs, "Deployment", "dpe-consumer"))).items() if isinstance(v, str)}
    cfg = config.ConsumerConfig.from_env(env)
    assert cfg.batch_size == 100 and cfg.table == "dpe_data"


def test_every_producer_setting_is_wired(render):
    # every producer-side contract variable is either set by the chart or deliberately left to its default
    docs = render.template(**CONFIGS["defaults"])
    env = env_of(container(producer_jobs(docs)["69"], "producer"))
    producer_vars = {"DEPARTMENT", "ADEME_API_URL", "ADEME_PAGE_SIZE", "ADEME_DATE_FROM", "ADEME_DATE_TO",
                     "ADEME_EXTRA_FIELDS", "ADEME_MAX_RPS", "ADEME_TIMEOUT_S", "ADEME_MAX_RETRIES",
                     "ADEME_RETRY_MAX_S", "PRODUCER_CHECKPOINT_TOPIC", "PRODUCER_RESTART",
                     "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC", "KAFKA_DLQ_TOPIC", "KAFKA_TOPIC_PARTITIONS",
                     "KAFKA_REPLICATION_FACTOR", "LOG_FORMAT", "LOG_LEVEL", "ADEME_BUDGET_FILE", "KAFKA_WAIT_S"}
    assert producer_vars <= set(config.CONTRACT)
    assert producer_vars == set(env)
    # set only when asked: the API key (from a Secret) and a rate window other than data-fair's 60 s
    keyed = render.template(sets={"ademe.apiKey.existingSecret": "ademe-key", "ademe.rateWindowSeconds": "30",
                                  "producer.maxConcurrent": "3",
                                  "metrics.pushgatewayUrl": "http://pushgateway.monitoring:9091"})
    extra = set(env_of(container(producer_jobs(keyed)["69"], "producer"))) - producer_vars
    assert extra == {"ADEME_API_KEY", "ADEME_RATE_WINDOW_S", "PRODUCER_MAX_CONCURRENT", "METRICS_PUSHGATEWAY_URL",
                     "METRICS_PUSHGATEWAY_GROUPING"}
    assert extra <= set(config.CONTRACT)
    # the Pushgateway group of a department of this release (the render's namespace and release name)
    keyed_env = env_of(container(producer_jobs(keyed)["69"], "producer"))
    assert config.pushgateway_grouping(keyed_env) == {"namespace": "dpe", "release": "dpe"}, keyed_env
    consumer_env = env_of(container(named(docs, "Deployment", "dpe-consumer")))
    consumer_vars = {"DATABASE_URL", "DB_TABLE", "CONSUMER_GROUP", "BATCH_SIZE", "BATCH_IDLE_MS",
                     "RETRY_MAX_BACKOFF_S", "KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC", "KAFKA_DLQ_TOPIC",
                     "KAFKA_TOPIC_PARTITIONS", "KAFKA_REPLICATION_FACTOR", "LOG_FORMAT", "LOG_LEVEL",
                     "METRICS_PORT", "LIVENESS_STALL_S", "BATCH_COMMIT_TIMEOUT_S"}  # the probes (issue 23)
    assert consumer_vars | {"PGPASSWORD"} == set(consumer_env)
