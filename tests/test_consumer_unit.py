"""Consumer pieces that need neither Kafka nor PostgreSQL: validation, dedupe, the in-memory batch."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from kafka import TopicPartition

import crashing
from dpe_ingest import analytics, consumer, group_consumer, messages, pg_connection
from dpe_ingest.sink import Invalid, Row, dedupe, parse_message


def msg(**doc) -> bytes:
    return json.dumps(doc).encode()


GOOD = dict(numero_dpe="2369E0000001A", date_reception_dpe="2023-05-12", code_postal_ban="69001",
            etiquette_dpe="D", departement="69")


def test_a_good_message_becomes_a_row_with_extras_kept_apart():
    row = parse_message(msg(**GOOD, surface_habitable_logement=54.2, type_batiment="appartement"), 3, 42)
    assert row == Row("2369E0000001A", dt.date(2023, 5, 12), "69001", "D", "69",
                      {"surface_habitable_logement": 54.2, "type_batiment": "appartement"}, 3, 42)


def test_null_fields_are_null_and_numbers_in_text_columns_keep_their_spelling():
    row = parse_message(msg(numero_dpe="X1", date_reception_dpe=None, code_postal_ban=69001, etiquette_dpe=None), 0, 0)
    assert (row.date_reception_dpe, row.code_postal_ban, row.etiquette_dpe, row.departement) == (None, "69001", None, None)
    assert row.extra == {}


@pytest.mark.parametrize("value, reason", [
    (None, "empty message"),
    (b"\xff\xfe not utf-8", "not valid UTF-8"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "not an object"),
    (b'"just a string"', "not an object"),
    (msg(date_reception_dpe="2023-01-01"), "missing numero_dpe"),
    (msg(numero_dpe=""), "empty numero_dpe"),
    (msg(numero_dpe="   "), "empty numero_dpe"),
    (msg(numero_dpe=12345), "not a string"),
    (msg(numero_dpe="A" * 201), "longer than"),
    (msg(numero_dpe="X", date_reception_dpe="12/05/2023"), "is not a date"),
    (msg(numero_dpe="X", date_reception_dpe="2023-02-30"), "is not a date"),
    (msg(numero_dpe="X", date_reception_dpe=20230512), "is not a date"),
    (msg(numero_dpe="X", etiquette_dpe="D\u0000"), "NUL character"),
    (b'{"numero_dpe": "X", "v": NaN}', "not JSON"),
    (b'{"numero_dpe": "X\\ud800"}', "lone surrogate"),
])
def test_bad_messages_are_refused_with_a_reason(value, reason):
    with pytest.raises(Invalid) as err:
        parse_message(value, 0, 0)
    assert reason in err.value.reason


def test_unreadable_bytes_are_kept_raw_and_json_payloads_as_json():
    with pytest.raises(Invalid) as err:
        parse_message(b"\x00\x01binary", 0, 0)
    assert err.value.raw == b"\x00\x01binary" and err.value.payload is None
    with pytest.raises(Invalid) as err:
        parse_message(msg(numero_dpe=""), 0, 0)
    assert err.value.payload == {"numero_dpe": ""} and err.value.raw is None


def test_a_refused_message_keeps_its_department_for_the_dead_letter_counts():
    with pytest.raises(Invalid) as err:  # kept raw (NUL), the department still known
        parse_message(msg(numero_dpe="X", departement="69", etiquette_dpe="D\u0000"), 0, 0)
    assert err.value.raw is not None and err.value.department == "69"
    with pytest.raises(Invalid) as err:
        parse_message(msg(numero_dpe="", departement="2A"), 0, 0)
    assert err.value.department == "2A"
    with pytest.raises(Invalid) as err:
        parse_message(msg(numero_dpe="X", departement="6\u00009", etiquette_dpe="D"), 0, 0)
    assert err.value.department is None
    with pytest.raises(Invalid) as err:
        parse_message(b"[1]", 0, 0)
    assert err.value.department is None


def test_dedupe_keeps_the_last_version_of_each_numero():
    rows = [Row("A", None, "1", None, None, {}, 0, 1), Row("B", None, "1", None, None, {}, 0, 2),
            Row("A", None, "2", None, None, {}, 0, 3)]
    out = dedupe(rows)
    assert [(r.numero_dpe, r.code_postal_ban, r.offset) for r in out.upserts] == [("B", "1", 2), ("A", "2", 3)]
    assert out.deletions == []


def test_batch_claims_from_where_reading_began_to_after_its_last_message():
    b = consumer.Batch()
    p0, p1 = TopicPartition("t", 0), TopicPartition("t", 1)
    b.add_row(p0, Row("A", None, None, None, None, {}, 0, 10), start=10)
    b.add_row(p0, Row("B", None, None, None, None, {}, 0, 11), start=11)
    # a gap (a removed record) inside the partition: the claim starts where reading began, not at 7
    b.add_dead(p1, 7, (None, b"{}", []), start=5)
    b.add_row(p1, Row("C", None, None, None, None, {}, 1, 8), start=8)
    assert b.count == 4 and b.claim("g", "t").ranges == {0: (10, 12), 1: (5, 9)}
    assert b.drop({p1}) == 2
    assert b.count == 2 and b.claim("g", "t").ranges == {0: (10, 12)} and b.all_dead() == []
    assert len(b.all_rows()) == 2


@pytest.mark.parametrize("program, module", [("consume", consumer), ("analytics", analytics)])
def test_no_environment_arms_a_crash_point(program, module, monkeypatch):
    """What a pod's environment holds never reaches the crash points: main() builds the app with the
    hook that does nothing, the old test variables set or not (tests/crashing.py alone arms one)."""
    built = []
    monkeypatch.setattr(module.logs, "setup", lambda *a, **k: None)  # keep pytest's logging intact
    monkeypatch.setattr(module.metrics, "run_service", lambda app, *a: built.append(app) or 0)
    for name, value in {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1", "DATABASE_URL": "postgresql://u@127.0.0.1:1/d",
                        "DPE_TEST_CRASH_AT": module.CRASH_POINTS[0], "DPE_TEST_CRASH_AFTER_BATCHES": "0"}.items():
        monkeypatch.setenv(name, value)
    assert module.main([]) == 0
    (app,) = built
    assert app.crash is module.no_crash
    for point in module.CRASH_POINTS:
        assert app.crash(point, 0) is None  # returns: no process killed


def test_no_module_of_the_product_reads_a_crash_setting():
    src = Path(consumer.__file__).parent
    readers = [str(f.relative_to(src)) for f in src.rglob("*.py") if "DPE_TEST_CRASH" in f.read_text()]
    assert readers == [], readers
    assert not hasattr(consumer, "CrashHook") and not hasattr(analytics, "CrashHook")


def test_the_crash_launcher_refuses_what_it_does_not_know(capsys):
    with pytest.raises(SystemExit) as exc:
        crashing.main(["--at", "sometimes", "consume"])
    assert exc.value.code == 2
    assert "--at 'sometimes': consume has the crash points after_poll, after_insert, after_dlq_send, " \
           "after_db_commit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        crashing.main(["--at", "after_poll", "--after-batches", "x", "consume"])
    assert "--after-batches: invalid int value: 'x'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        crashing.main(["--at", "after_poll", "analytics"])
    assert "analytics has the crash points before_db_commit, after_db_commit" in capsys.readouterr().err


def test_consume_refuses_bad_settings_with_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(consumer.logs, "setup", lambda *a, **k: None)  # keep pytest's logging intact
    monkeypatch.setenv("BATCH_SIZE", "zero")
    assert consumer.main([]) == 2
    assert "BATCH_SIZE" in capsys.readouterr().err
    monkeypatch.delenv("BATCH_SIZE")
    assert consumer.main(["--exit-when-idle", "0"]) == 2


def test_safe_url_hides_the_password():
    assert pg_connection.safe_url("postgresql://dpe:s3cret@db:5432/dpe") == "postgresql://dpe:***@db:5432/dpe"


def test_dead_letter_of_a_refused_message_names_the_source():
    value, headers = messages.build("missing numero_dpe", "consumer", payload={"a": 1},
                                      letter_id=messages.consumer_id("t", 2, 5),
                                      source={"topic": "t", "partition": 2, "offset": 5})
    doc = messages.parse_dead_letter(value)
    assert doc["source"] == {"topic": "t", "partition": 2, "offset": 5} and doc["stage"] == "consumer"
    assert doc["id"] == "consumer:t/2/5"
    assert dict(headers)["dlq.reason"] == b"missing numero_dpe" and dict(headers)["dlq.id"] == b"consumer:t/2/5"


def test_dead_letter_ids_name_the_row_not_the_attempt():
    assert messages.producer_id("69", None, 3) == "producer:69/-/3"
    assert messages.producer_id("69", "1700000000000,abc", 3) == "producer:69/1700000000000,abc/3"
    assert messages.consumer_id("t", 0, 7) != messages.consumer_id("t", 1, 7)


def test_one_engine_serves_both_consumer_groups():
    """Issue 21: the sink and the analytics run one engine; neither defines its loop, rebalances,
    waits, positions, lag or stop again, and there is one Stale and one backoff."""
    from dpe_ingest import sink

    engine = group_consumer.GroupConsumer
    for app in (consumer.Consumer, analytics.Analytics):
        assert issubclass(app, engine)
        again = {"run", "request_stop", "on_partitions_assigned", "on_partitions_revoked", "_keepalive", "_sync",
                 "_idle_done", "_progress", "lag_by_partition", "_commit_kafka", "_step", "_write"} & set(vars(app))
        assert not again, f"{app.__name__} defines {sorted(again)} again"
    assert sink.Stale is analytics.Stale is group_consumer.Stale
    assert sink.DatabaseUnavailable is group_consumer.DatabaseUnavailable
    assert [group_consumer.backoff(a, 30.0) for a in (0, 1, 5, 6, 60)] == [0.5, 1.0, 16.0, 30.0, 30.0]


def test_the_analytics_batch_claims_like_the_sinks():
    """A skip moves its partition's offsets as a dead letter does, and a fact carries its offset."""
    b = group_consumer.Batch()
    p0 = TopicPartition("t", 0)
    fact = analytics.classify(msg(**GOOD))
    b.add_row(p0, fact, start=3, offset=3)
    b.add_dead(p0, 4, "not_json", start=4)
    assert b.claim("g", "t").ranges == {0: (3, 5)} and b.all_rows() == [fact] and b.all_dead() == ["not_json"]
