"""Regression tests of issue 26: each bad input a fuzzing run found, refused with a reason, never a crash."""

import json
import re
import sys
from pathlib import Path

import pytest

from canned_http import CannedServer
from dpe_ingest import ademe, departments, messages
from dpe_ingest.config import (ANALYTICS_TABLE_SUFFIXES, DB_TABLE_SUFFIXES, AnalyticsConfig, ConfigError,
                               ConsumerConfig, ProducerConfig)
from dpe_ingest.producer import Producer, validate_row
from dpe_ingest.standin import query

ROOT = Path(__file__).resolve().parents[1]
GOOD = {"numero_dpe": "2169E0123456Z", "date_reception_dpe": "2023-04-05", "code_postal_ban": "69003",
        "etiquette_dpe": "D"}


def nested(depth: int, leaf=0):
    """``[[[…leaf…]]]``, ``depth`` lists deep, built without recursion."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name,reader,longest", [
    ("DB_TABLE", ConsumerConfig.from_env, 63 - len("_departement_idx")),
    ("ANALYTICS_TABLE_PREFIX", AnalyticsConfig.from_env, 63 - len("_keys_dep_date")),
])
def test_table_names_are_lower_case_identifiers_within_63_bytes(name, reader, longest):
    for bad in ("DpeData", "dpe_Data", "tablé", "ｄｐｅ", "dpe-data", "1dpe", "a" * (longest + 1), "dpe data"):
        with pytest.raises(ConfigError, match=name):
            reader({name: bad})
    for good in ("dpe_data", "_x9", "a" * longest):
        cfg = reader({name: good})
        assert (cfg.table if name == "DB_TABLE" else cfg.table_prefix) == good


def test_table_name_suffixes_are_what_the_code_appends():
    """config's suffix lists cover every name the sink and the analytics build from DB_TABLE/the prefix."""
    sink = (ROOT / "src/dpe_ingest/sink.py").read_text()
    analytics = (ROOT / "src/dpe_ingest/analytics.py").read_text()
    assert set(re.findall(r'f"\{(?:self\.)?table\}(_\w+)"', sink)) == set(DB_TABLE_SUFFIXES)
    from dpe_ingest.analytics import Store

    built = {ident.strings[0][len("p"):] for ident in Store("postgresql://unused", "p").t.values()}
    built |= set(re.findall(r'f"\{(?:self\.)?prefix\}(_\w+)"', analytics))
    assert built == set(ANALYTICS_TABLE_SUFFIXES)


FLOATS = {"ADEME_MAX_RPS": ProducerConfig, "ADEME_TIMEOUT_S": ProducerConfig, "ADEME_RETRY_MAX_S": ProducerConfig,
          "KAFKA_WAIT_S": ProducerConfig, "ADEME_RATE_WINDOW_S": ProducerConfig, "REFRESH_WAIT_S": ProducerConfig,
          "RETRY_MAX_BACKOFF_S": ConsumerConfig, "ANALYTICS_ALERT_SHARE": AnalyticsConfig,
          "ANALYTICS_ALERT_INTERVAL_S": AnalyticsConfig}


@pytest.mark.parametrize("name", sorted(FLOATS))
@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity", "1e999", "1_0", "٣"])
def test_decimal_settings_refuse_non_finite_values(name, value):
    with pytest.raises(ConfigError, match=f"^{name}="):
        FLOATS[name].from_env({"DEPARTMENT": "69", name: value})


def test_waits_beyond_a_week_are_refused():
    with pytest.raises(ConfigError, match="ADEME_RATE_WINDOW_S"):
        ProducerConfig.from_env({"DEPARTMENT": "69", "ADEME_RATE_WINDOW_S": "1e300"})
    with pytest.raises(ConfigError, match="ADEME_MAX_RPS"):
        ProducerConfig.from_env({"DEPARTMENT": "69", "ADEME_MAX_RPS": "1e-300"})  # 1e300 s between requests


def test_whole_numbers_of_any_length_or_script():
    for value in ("9" * 5000, "١٠", "1_0", "0x10"):
        with pytest.raises(ConfigError, match="^BATCH_SIZE="):
            ConsumerConfig.from_env({"BATCH_SIZE": value})
    assert ConsumerConfig.from_env({"BATCH_SIZE": "+0050"}).batch_size == 50


# ------------------------------------------------------------------------------------------ departments
@pytest.mark.parametrize("raw", [10**5000, -(10**5000), 10**4300 + 69, 1e300, -69, 1069],
                         ids=["5000_digits", "minus_5000_digits", "4301_digits", "1e300", "-69", "1069"])
def test_integers_of_any_size_are_invalid_departments(raw):
    with pytest.raises(departments.InvalidDepartment, match="valid forms are"):
        departments.normalize(raw)


# ------------------------------------------------------------------------------------------ producer
@pytest.mark.parametrize("postcode", ["00000\n", "69003\n", "٦٩٠٠٣", "６９００３", "69003 "])
def test_postcodes_are_five_ascii_digits_and_nothing_after(postcode):
    assert validate_row({**GOOD, "code_postal_ban": postcode}).startswith("unparsable code_postal_ban")


@pytest.mark.parametrize("extra", [10**5000, nested(3000), {"k": nested(3000)}],
                         ids=["int_5000_digits", "list_3000_deep", "dict_of_list_3000_deep"])
def test_unwritable_rows_become_dead_letters(extra):
    producer = Producer(ProducerConfig.from_env({"DEPARTMENT": "69", "ADEME_EXTRA_FIELDS": "extra"}))
    row = {**GOOD, "extra": extra}
    numero, reason = producer._encode_row(row)
    assert numero is None and reason.startswith("a value cannot be written as JSON")
    value, headers = messages.build(reason, "producer", letter_id="producer:69/-/0", payload=row,
                                      department="69")
    letter = messages.parse_dead_letter(value)
    assert letter["payload"] is None and letter["reason"].startswith(reason)
    assert "payload not kept" in letter["reason"] and dict(headers)["dlq.reason"].startswith(b"a value cannot")


# ------------------------------------------------------------------------------------------ ADEME client
@pytest.fixture(scope="module")
def canned():
    with CannedServer() as server:
        yield server


def page(results=(), **fields) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps({"results": list(results), **fields}).encode()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Mon, 01 Jan 3000000000 00:00:00 GMT",
                                   "Mon, 01 Jan 99999999999999999999 00:00:00 GMT", "Mon, 01 Jan 1 00:00:00 GMT"])
def test_retry_after_that_is_no_duration(value):
    assert ademe.retry_after_seconds(value) in (None, 0.0)


@pytest.mark.parametrize("retry_after", ["inf", "1e12", "Fri, 31 Dec 9999 23:59:59 GMT",
                                         "Mon, 01 Jan 3000000000 00:00:00 GMT"])
def test_a_429_waits_a_bounded_time(canned, retry_after):
    client, slept = canned.client(retry_max_s=30.0, rate_window_s=60.0)
    canned.serve((429, {"Retry-After": retry_after}, b""), page([{"numero_dpe": "x"}]))
    got = client.fetch(client.lines_url, {"size": 1})
    assert got.rows == [{"numero_dpe": "x"}]
    assert len(slept) == 1 and 0 <= slept[0] <= 61.0


@pytest.mark.parametrize("retry_after", ["inf", "Mon, 01 Jan 3000000000 00:00:00 GMT"])
def test_a_5xx_with_an_unusable_retry_after_is_retried(canned, retry_after):
    client, slept = canned.client()
    canned.serve((503, {"Retry-After": retry_after}, b"busy"), page())
    assert client.fetch(client.lines_url).rows == []
    assert len(slept) == 1 and slept[0] <= ademe.BACKOFF_CAP_S


@pytest.mark.parametrize("next_link", [7, [None], {"href": "http://x"}, True, "http://[::1", "http://host:port/x",
                                       "ftp://example.org/lines", "javascript:alert(1)", "/relative/lines"])
def test_a_next_link_that_is_no_http_url(canned, next_link):
    client, _ = canned.client()
    canned.serve(*[page([{"numero_dpe": "x"}], next=next_link)] * 3)
    with pytest.raises(ademe.ApiUnavailable, match="'next' that is not an http"):
        client.fetch(client.lines_url)
    assert len(canned.paths) == 3  # the first try and max_retries=2


@pytest.mark.parametrize("location", ["ftp://example.org/x", "javascript:alert(1)", "http://[::1"])
def test_a_redirect_that_is_no_http_url(canned, location):
    client, _ = canned.client(max_retries=0)
    canned.serve((302, {"Location": location}, b""))
    with pytest.raises(ademe.ApiUnavailable, match="redirected to no http"):
        client.fetch(client.lines_url)


@pytest.mark.parametrize("depth", [1100, 5000, sys.getrecursionlimit() * 2])
def test_json_nested_too_deep_takes_the_retry_path(canned, depth):
    client, slept = canned.client()
    deep = b'{"results": [], "x": ' + b"[" * depth + b"]" * depth + b"}"
    canned.serve((200, {}, deep), page([{"numero_dpe": "x"}]))
    assert client.fetch(client.lines_url).rows == [{"numero_dpe": "x"}]
    assert len(slept) == 1  # one retry
    canned.serve((500, {"Content-Type": "application/json"}, b"[" * depth + b"]" * depth))
    with pytest.raises(ademe.ApiUnavailable, match="HTTP 500"):
        canned.client(max_retries=0)[0].fetch(client.lines_url)


@pytest.mark.parametrize("total", [True, False, -1, -(10**20), 1.5, "12", [3]])
def test_a_total_that_is_not_a_count(canned, total):
    client, _ = canned.client(max_retries=0)
    canned.serve(page(total=total))
    with pytest.raises(ademe.ApiUnavailable, match="'total' that is not a count"):
        client.fetch(client.lines_url)


# ------------------------------------------------------------------------------------------ stand-in
@pytest.mark.parametrize("params", [
    [("after", "[" * 5000 + "]" * 5000)],
    [("after", "1," + "[" * 2000 + "]" * 2000)],
    [("qs", "(" * 2000 + "code_departement_ban:69" + ")" * 2000)],
    [("qs", "NOT " * 3000 + "code_departement_ban:69")],
    [("qs", "code_departement_ban:(" + "(" * 2000 + "69" + ")" * 2000 + ")")],
    [("code_departement_ban_in", '"69",' + "[" * 5000)],
    [("code_departement_ban_in", '"69",' + "[" * 5000 + "]" * 5000)],
    [("size", "1" * 5000)],
    [("page", "٣")],
], ids=lambda params: f"{params[0][0]}:{params[0][1][:12]}")
def test_standin_answers_400_for_deep_or_huge_parameters(params):
    with pytest.raises(query.QueryError) as err:
        query.parse(params)
    assert err.value.status == 400
