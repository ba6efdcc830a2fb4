"""Property: every reader of the environment contract gives a config or a ConfigError naming the variable."""

import pytest
from hypothesis import given, strategies as st

from dpe_ingest import config
from dpe_ingest.config import CONTRACT, AnalyticsConfig, ConfigError, ConsumerConfig, KafkaSettings, ProducerConfig
from hypothesis_profiles import counted

READERS = {"producer": lambda env: ProducerConfig.from_env({"DEPARTMENT": "69", **env}),
           "consumer": ConsumerConfig.from_env, "analytics": AnalyticsConfig.from_env,
           "kafka": KafkaSettings.from_env, "metrics_port": config.metrics_port}

# what values of each kind look like, well-formed or nearly: the readers' edges
NUMBERS = st.one_of(
    st.integers().map(str), st.floats().map(repr), st.text("0123456789", min_size=19, max_size=5000),
    st.sampled_from(["nan", "inf", "-inf", "Infinity", "1e999", "1e-999", "1_0", "٣", "３", "0x10", "+5", "-0", ".5",
                     "5.", "1e3", " 7 ", "", "\t"]))
NAMES = st.text(alphabet="abcxyzABC_-.09é€ \n", max_size=70) | st.sampled_from(["dpe_data", "DpeData", "a" * 63])
URLS = (st.sampled_from(["http://", "https://", "ftp://", "javascript:", "http://[::1", "http://h:99999", "x"])
        | st.just("http://")).flatmap(lambda scheme: st.text(max_size=30).map(lambda rest: scheme + rest))
VALUES = NUMBERS | NAMES | URLS | st.text(max_size=40) | st.sampled_from(["true", "false", "2024-02-30", "2024-01-01",
                                                                         "h:1,h2:2", "h:", ":1", "none", "2a"])


@pytest.mark.parametrize("name", sorted(CONTRACT))
@given(value=VALUES)
@counted
def test_contract_readers(name, value):
    for reader in READERS.values():
        try:
            reader({name: value})
        except ConfigError as exc:
            assert name in str(exc), f"{name}={value!r}: {exc}"
