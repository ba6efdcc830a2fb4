"""The environment contract, department codes and the documented table."""

from pathlib import Path

import pytest

from dpe_ingest import config, departments
from dpe_ingest.config import ConfigError, ConsumerConfig, ProducerConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("raw,code", [
    (69, "69"), ("69", "69"), (1, "01"), ("1", "01"), ("01", "01"), ("2a", "2A"), ("2B", "2B"),
    (971, "971"), ("976", "976"), (" 38 ", "38"), (95, "95"), (69.0, "69"),
    (975, "975"), ("977", "977"), (978, "978"), ("988", "988"), ("none", "none"), (" NONE ", "none"),
])
def test_department_normalisation(raw, code):
    assert departments.normalize(raw) == code


@pytest.mark.parametrize("raw", ["99", 20, "20", "00", "0", "96", "970", "979", "987", "989", "2C", "6a", "abc", "",
                                 "nothing", None, True, 6.5])
def test_invalid_department_names_valid_forms(raw):
    with pytest.raises(departments.InvalidDepartment) as err:
        departments.normalize(raw)
    assert "01..19, 2A, 2B, 21..95, 971..978, 988, none" in str(err.value)


def test_department_list_forms():
    assert departments.parse_list("69,01,38") == ["69", "01", "38"]
    assert departments.parse_list("69 1 2a 69") == ["69", "01", "2A"]
    assert departments.parse_list([69, "01", 38]) == ["69", "01", "38"]
    assert departments.parse_list("none,69,NONE") == ["none", "69"]
    assert len(departments.ALL_DEPARTMENTS) == 19 + 2 + 75 + 8 + 1
    assert departments.ALL_CODES == departments.ALL_DEPARTMENTS + ("none",)
    assert departments.stored_department("none") is None and departments.stored_department("2A") == "2A"
    assert departments.dns_label("none") == "none"
    with pytest.raises(departments.InvalidDepartment):
        departments.parse_list("")


def test_producer_config_defaults_and_overrides():
    cfg = ProducerConfig.from_env({"DEPARTMENT": "2a", "ADEME_API_URL": "http://x:1/data-fair/api/v1/datasets/dpe03existant/lines/",
                                   "ADEME_EXTRA_FIELDS": "type_batiment, numero_dpe", "ADEME_DATE_FROM": "2024-01-01"})
    assert cfg.department == "2A"
    assert cfg.api_url == "http://x:1/data-fair/api/v1/datasets/dpe03existant"
    assert cfg.page_size == 500
    assert cfg.fields == ("numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe", "type_batiment")
    assert cfg.date_from == "2024-01-01" and cfg.date_to is None
    assert cfg.kafka.topic == "dpe-lines" and cfg.kafka.bootstrap_servers == "localhost:9092"


@pytest.mark.parametrize("env,needle", [
    ({}, "DEPARTMENT is not set"),
    ({"DEPARTMENT": "99"}, "valid forms are 01..19, 2A, 2B, 21..95, 971..978, 988, none"),
    ({"DEPARTMENT": "69", "ADEME_PAGE_SIZE": "0"}, "ADEME_PAGE_SIZE=0 is out of range"),
    ({"DEPARTMENT": "69", "ADEME_PAGE_SIZE": "20000"}, "ADEME_PAGE_SIZE=20000 is out of range"),
    ({"DEPARTMENT": "69", "ADEME_PAGE_SIZE": "lots"}, "not a whole number"),
    ({"DEPARTMENT": "69", "ADEME_DATE_FROM": "2024-13-01"}, "ADEME_DATE_FROM"),
    ({"DEPARTMENT": "69", "ADEME_DATE_FROM": "2024-02-01", "ADEME_DATE_TO": "2024-01-01"}, "after ADEME_DATE_TO"),
    ({"DEPARTMENT": "69", "ADEME_API_URL": "ftp://x"}, "not an http(s) URL"),
    ({"DEPARTMENT": "69", "KAFKA_BOOTSTRAP_SERVERS": "kafka"}, "host:port"),
    ({"DEPARTMENT": "69", "PRODUCER_RESTART": "maybe"}, "not a boolean"),
])
def test_producer_config_errors_name_the_variable(env, needle):
    with pytest.raises(ConfigError) as err:
        ProducerConfig.from_env(env)
    assert needle in str(err.value)


def test_consumer_config():
    cfg = ConsumerConfig.from_env({})
    assert (cfg.batch_size, cfg.table, cfg.group) == (100, "dpe_data", "dpe-sink")
    with pytest.raises(ConfigError, match="BATCH_SIZE=0"):
        ConsumerConfig.from_env({"BATCH_SIZE": "0"})
    with pytest.raises(ConfigError, match="DB_TABLE"):
        ConsumerConfig.from_env({"DB_TABLE": "dpe; drop table x"})


def test_documented_contract_matches_code():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert config.markdown_table() in doc, "docs/configuration.md is stale: run python -m dpe_ingest.config"


def test_log_and_pushgateway_settings_are_read_through_the_contract():
    """logs.py and the producer read LOG_*, KAFKA_CLIENT_LOG_LEVEL and METRICS_PUSHGATEWAY_URL here."""
    got = config.LogSettings.from_env({})
    assert (got.format, got.level, got.kafka_client_level) == ("logfmt", "INFO", None)
    got = config.LogSettings.from_env({"LOG_FORMAT": "JSON", "LOG_LEVEL": "debug", "KAFKA_CLIENT_LOG_LEVEL": "error"})
    assert (got.format, got.level, got.kafka_client_level) == ("json", "DEBUG", "ERROR")
    assert config.LogSettings.from_env({"LOG_FORMAT": "yaml", "LOG_LEVEL": " "}).format == "logfmt"
    assert config.LogSettings.from_env({"LOG_LEVEL": " "}).level == "INFO"
    assert config.pushgateway_url({}) is None
    assert config.pushgateway_url({"METRICS_PUSHGATEWAY_URL": " http://pg:9091 "}) == "http://pg:9091"
    assert config.setting("CONSUMER_GROUP", {}) == "dpe-sink" and config.setting("ANALYTICS_GROUP", {"ANALYTICS_GROUP": "x"}) == "x"
    src = (ROOT / "src" / "dpe_ingest").glob("*.py")
    readers = [f.name for f in src if f.name != "config.py" and any(
        f'"{name}"' in f.read_text() for name in ("LOG_FORMAT", "LOG_LEVEL", "KAFKA_CLIENT_LOG_LEVEL", "METRICS_PUSHGATEWAY_URL"))]
    assert readers in ([], ["status.py"]), readers  # status.py: its own default level (WARNING), see logs.setup(level=)


def test_both_consumer_groups_read_the_shared_settings_once():
    env = {"BATCH_SIZE": "7", "BATCH_IDLE_MS": "9", "RETRY_MAX_BACKOFF_S": "2", "DATABASE_URL": "postgresql://x/y"}
    sink, an = ConsumerConfig.from_env(env), config.AnalyticsConfig.from_env(env)
    assert isinstance(sink, config.GroupConfig) and isinstance(an, config.GroupConfig)
    shared = ("database_url", "batch_size", "batch_idle_ms", "retry_max_backoff_s", "kafka")
    assert [getattr(sink, f) for f in shared] == [getattr(an, f) for f in shared]
    assert (sink.group, an.group, sink.table, an.table_prefix) == ("dpe-sink", "dpe-analytics", "dpe_data", "dpe_analytics")



def test_pushgateway_grouping_reads_label_pairs_and_refuses_what_prometheus_would():
    assert config.pushgateway_grouping({}) == {}
    assert config.pushgateway_grouping({"METRICS_PUSHGATEWAY_GROUPING": " namespace = dpe , release=r-1 ,"}) == \
        {"namespace": "dpe", "release": "r-1"}
    for bad in ("job=x", "department=69", "ns", "a-b=1", "__name__=x", "x="):
        with pytest.raises(config.ConfigError, match="METRICS_PUSHGATEWAY_GROUPING"):
            config.pushgateway_grouping({"METRICS_PUSHGATEWAY_GROUPING": bad})
    cfg = config.ProducerConfig.from_env({"DEPARTMENT": "69", "METRICS_PUSHGATEWAY_GROUPING": "release=dpe"})
    assert cfg.push_grouping == (("release", "dpe"),)
