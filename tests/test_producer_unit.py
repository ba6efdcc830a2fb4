"""Producer pieces that need no server: row validation, messages, the API client's retry policy."""

import pytest
import requests

from dpe_ingest import ademe
from dpe_ingest.config import BASE_FIELDS
from dpe_ingest.producer import to_message, validate_row

GOOD = {"numero_dpe": "2169E0123456Z", "date_reception_dpe": "2023-04-05", "code_postal_ban": "69003",
        "etiquette_dpe": "D"}


def test_good_row_passes_and_becomes_message():
    assert validate_row(GOOD) is None
    msg = to_message({**GOOD, "_score": None, "other": 1}, BASE_FIELDS, "69")
    assert msg == {**GOOD, "departement": "69"}


@pytest.mark.parametrize("change,reason", [
    ({"numero_dpe": None}, "missing numero_dpe"),
    ({"numero_dpe": ""}, "missing numero_dpe"),
    ({"numero_dpe": 12}, "missing numero_dpe"),
    ({"date_reception_dpe": "not-a-date"}, "unparsable date_reception_dpe"),
    ({"date_reception_dpe": "2023-02-30"}, "unparsable date_reception_dpe"),
    ({"date_reception_dpe": 20230405}, "unparsable date_reception_dpe"),
    ({"etiquette_dpe": "H"}, "unparsable etiquette_dpe"),
    ({"code_postal_ban": "6900"}, "unparsable code_postal_ban"),
])
def test_bad_rows_have_a_reason(change, reason):
    got = validate_row({**GOOD, **change})
    assert got is not None and got.startswith(reason)


def test_missing_optional_fields_are_fine():
    assert validate_row({"numero_dpe": "X", "date_reception_dpe": None}) is None
    assert validate_row(["not", "a", "row"]).startswith("row is a list")


def test_qs_and_cursor():
    assert ademe.build_qs("2A") == 'code_departement_ban:"2A"'
    assert ademe.build_qs("69", "2024-01-01", None) == 'code_departement_ban:"69" AND date_reception_dpe:[2024-01-01 TO *]'
    assert ademe.cursor_of("http://h/lines?size=500&after=12%2C34&qs=x") == "12,34"
    assert ademe.cursor_of(None) is None


def test_retry_after_parsing():
    assert ademe.retry_after_seconds("7") == 7.0
    assert ademe.retry_after_seconds(None) is None
    assert ademe.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert ademe.retry_after_seconds("soon") is None


class FakeResponse:
    def __init__(self, status, body=b"", headers=None):
        self.status_code, self.content, self.headers = status, body, headers or {}
        self.url, self.reason = "http://api/lines", "x"

    @property
    def text(self):
        return self.content.decode()

    def json(self):
        import json
        return json.loads(self.content)


class FakeSession:
    def __init__(self, script):
        self.script, self.calls, self.headers = list(script), [], {}

    def get(self, url, params=None, timeout=None):
        self.calls.append((url, params))
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def client(script, **kw):
    sleeps = []
    c = ademe.AdemeClient("http://api/ds", session=FakeSession(script), sleep=sleeps.append, **kw)
    return c, sleeps


PAGE = b'{"total": 1, "results": [{"numero_dpe": "A"}], "next": "http://api/ds/lines?after=5&size=1"}'


def test_retries_429_honouring_retry_after_then_5xx_then_cut_body():
    c, sleeps = client([
        FakeResponse(429, b'{"message":"slow down"}', {"Retry-After": "7"}),
        FakeResponse(503, b"busy"),
        requests.exceptions.ChunkedEncodingError("cut"),
        FakeResponse(200, PAGE[:20]),  # a 200 whose body was cut short
        FakeResponse(200, PAGE),
    ])
    page = c.fetch(c.lines_url, {"size": 1})
    assert page.rows == [{"numero_dpe": "A"}] and page.total == 1 and page.after == "5"
    assert page.attempts == 4 and len(sleeps) == 4  # the 429 is flow control, not a failed attempt
    assert sleeps[0] >= 7.0  # Retry-After honoured
    assert all(0 < s <= ademe.BACKOFF_CAP_S for s in sleeps[1:])


def test_backoff_is_exponential_capped_and_jittered():
    c, _ = client([])
    delays = [c._backoff(n, None) for n in range(1, 12)]
    for n, d in enumerate(delays, start=1):
        exp = min(ademe.BACKOFF_CAP_S, 2 ** (n - 1))
        assert exp / 2 <= d <= exp


def test_gives_up_after_max_retries():
    c, sleeps = client([FakeResponse(500, b"boom")] * 4, max_retries=3)
    with pytest.raises(ademe.ApiUnavailable, match="gave up after 4 attempts"):
        c.fetch(c.lines_url)
    assert len(sleeps) == 3


def test_gives_up_when_total_wait_would_exceed_bound():
    c, sleeps = client([FakeResponse(503, b"", {"Retry-After": "120"})] * 3, retry_max_s=60)
    with pytest.raises(ademe.ApiUnavailable, match="ADEME_RETRY_MAX_S"):
        c.fetch(c.lines_url)
    assert sleeps == []


def test_bad_request_is_fatal_with_the_api_message():
    c, sleeps = client([FakeResponse(400, b'{"message": "Impossible to paginate beyond 10000 results"}')])
    with pytest.raises(ademe.ApiRequestError) as err:
        c.fetch(c.lines_url)
    assert err.value.status == 400 and "10000" in str(err.value) and sleeps == []


def test_pages_follow_next_until_dry():
    p1 = b'{"total": 2, "results": [{"numero_dpe": "A"}], "next": "http://api/ds/lines?after=1"}'
    p2 = b'{"total": 2, "results": [{"numero_dpe": "B"}]}'
    c, _ = client([FakeResponse(200, p1), FakeResponse(200, p2)])
    pages = list(c.pages({"size": 1}))
    assert [p.rows[0]["numero_dpe"] for p in pages] == ["A", "B"]
    assert c.session.calls[1][0] == "http://api/ds/lines?after=1"
    assert pages[-1].next_url is None


def test_rate_limiter_spaces_calls():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    lim = ademe.RateLimiter(4, clock=lambda: now[0], sleep=sleep)
    for _ in range(5):
        lim.wait()
    assert slept == pytest.approx([0.25] * 4)


RATE_429 = "Trop de traffic dans un interval restreint sur cette API.".encode()
COMPUTE_429 = ("Le temps de traitement cumulé de vos requêtes dépasse le budget alloué sur cette API. Veuillez "
               "patienter avant d'essayer de nouveau, ou réduire le coût de vos requêtes.").encode()


def test_429_is_flow_control_waited_out_for_as_long_as_it_takes():
    """data-fair's 429s carry no Retry-After; they never count as retries nor against ADEME_RETRY_MAX_S."""
    script = [FakeResponse(429, RATE_429)] * 12 + [FakeResponse(200, PAGE)]
    c, sleeps = client(script, max_retries=1, retry_max_s=1)
    page = c.fetch(c.lines_url)
    assert page.rows and page.attempts == 1 and c.throttled == 12 and c.retries_made == 0
    assert len(sleeps) == 12
    # exponential with jitter, never above one window (60 s)
    assert 0.5 <= sleeps[0] <= 2.0 and all(s <= 60.0 for s in sleeps) and max(sleeps) >= 30.0
    assert sleeps[:5] != sorted(sleeps[:5], reverse=True)


def test_compute_budget_429_waits_one_window_so_one_request_per_lock_out():
    c, sleeps = client([FakeResponse(429, COMPUTE_429)] * 3 + [FakeResponse(200, PAGE)], rate_window_s=60)
    c.fetch(c.lines_url)
    assert len(sleeps) == 3 and all(60.0 < s <= 78.0 for s in sleeps)
    assert len(set(sleeps)) == 3  # jittered: producers locked out together do not come back together
    c, sleeps = client([FakeResponse(429, COMPUTE_429), FakeResponse(200, PAGE)], rate_window_s=5)
    c.fetch(c.lines_url)
    assert 5.0 < sleeps[0] <= 6.5


def test_unknown_api_key_is_a_configuration_error_and_the_key_is_sent_not_logged(caplog):
    import logging

    c, sleeps = client([FakeResponse(401, "Cette clé d'API est inconnue.".encode())], api_key="s3cr3t-key")
    assert c.session.headers["x-apiKey"] == "s3cr3t-key"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(ademe.ApiAuthError) as err:
            c.fetch(c.lines_url)
    assert err.value.status == 401 and "inconnue" in str(err.value) and sleeps == []
    assert "s3cr3t-key" not in caplog.text and "s3cr3t-key" not in repr(c) and "s3cr3t-key" not in str(err.value)


def test_a_stop_cuts_a_429_wait_short():
    import threading

    stop = threading.Event()
    stop.set()
    c = ademe.AdemeClient("http://api/ds", session=FakeSession([FakeResponse(429, COMPUTE_429)]), stop=stop)
    with pytest.raises(ademe.ApiInterrupted):
        c.fetch(c.lines_url)


def test_shared_budget_file_sets_and_updates_the_producers_share(tmp_path):
    import json

    f = tmp_path / "budget.json"
    f.write_text(json.dumps({"maxTotalRps": 8, "departments": 4}))
    now = [0.0]
    lim = ademe.RateLimiter(0, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s),
                            budget_file=str(f), reload_s=15)
    assert lim.rps == 2.0 and lim.interval == 0.5
    f.write_text(json.dumps({"maxTotalRps": 8, "departments": 16}))  # an upgrade added departments
    lim.wait()
    assert lim.rps == 2.0  # re-read every reload_s, not at every request
    now[0] += 20
    lim.wait()
    assert lim.rps == 0.5
    own = ademe.RateLimiter(0.25, clock=lambda: now[0], budget_file=str(f))
    assert own.rps == 0.25  # the lower of its own cap and its share
    missing = ademe.RateLimiter(0, budget_file=str(tmp_path / "nope.json"))
    assert missing.rps == 0.0 and missing.interval == 0.0


# ------------------------------------------------------------------------------- the lean send path
def test_etiquette_of_another_type_is_refused_not_a_crash():
    for label in (["D"], {"x": 1}, 4):
        assert validate_row({**GOOD, "etiquette_dpe": label}).startswith("unparsable etiquette_dpe")


def test_message_bytes_are_json_dumps_less_its_spaces():
    import json

    from dpe_ingest.producer import encode_message

    for msg in ({**GOOD, "departement": "69"}, {**GOOD, "departement": None, "code_postal_ban": None},
                {**GOOD, "numero_dpe": "é\u00a0\"\\\n\u2028😀\x00", "departement": "2A"}):
        got = encode_message(msg)
        assert json.loads(got) == msg
        assert got == json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    # extra fields of other types: the standard library, as before (orjson would write NaN as null,
    # and refuses integers beyond 64 bits)
    for extra in (float("nan"), 2**70, 1.5, [1, "a"], {"k": True}):
        msg = {**GOOD, "departement": "69", "extra": extra}
        assert encode_message(msg) == json.dumps(msg, ensure_ascii=False).encode("utf-8")
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate: the producer makes it a dead letter
        encode_message({**GOOD, "numero_dpe": "X\ud800", "departement": "69"})


def test_a_row_with_a_lone_surrogate_gets_a_dead_letter(monkeypatch):
    from dpe_ingest import messages
    from dpe_ingest.config import ProducerConfig
    from dpe_ingest.producer import Producer, Progress, SendTracker

    cfg = ProducerConfig.from_env({"DEPARTMENT": "69", "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    sent = []

    class FakeKafka:
        def send(self, topic, key=None, value=None, headers=None):
            sent.append((topic, key, value, headers))
            return object()

    prod = Producer(cfg)
    page = ademe.Page(rows=[GOOD, {**GOOD, "numero_dpe": "2169E0123457Z", "code_postal_ban": "69\ud8000"},
                            {**GOOD, "numero_dpe": "Z\udc00"}], total=3, next_url=None, url="http://api/lines")
    page.prepared = prod._encode_page(page)
    prog = Progress("69", 0.0, rows_at_start=0)
    prod._send_page(FakeKafka(), SendTracker(), page, 1, None, prog)
    assert (prog.rows, prog.dead) == (1, 2)
    assert [t for t, *_ in sent] == [cfg.kafka.topic, cfg.kafka.dlq_topic, cfg.kafka.dlq_topic]
    letter = messages.parse_dead_letter(sent[1][2])
    assert letter["reason"].startswith("unparsable code_postal_ban")
    letter = messages.parse_dead_letter(sent[2][2])  # valid UTF-8, the surrogate escaped
    assert letter["reason"].startswith("a value is not valid Unicode") and letter["payload"]["numero_dpe"] == "Z\udc00"
    assert sent[2][1] == b"Z\\udc00"


def test_api_bodies_read_like_json_loads_whatever_orjson_would_do():
    import json

    bodies = [
        b'{"total": 2, "results": [{"numero_dpe": "A", "n": 1.5, "s": "\\u00e9\\u0000"}], "next": null}',
        b'{"results": [{"n": 123456789012345678901234, "m": -9223372036854775809}]}',  # orjson: floats
        b'{"results": [{"n": NaN, "i": Infinity}]}',  # orjson refuses
        b'{"results": [{"s": "\\ud800"}]}',  # a lone surrogate: orjson refuses
        b'{"results": [{"n": 1e400}]}',
    ]
    for body in bodies:
        got, want = ademe._loads(body), json.loads(body)
        assert repr(got) == repr(want)
        assert type(got["results"][0].get("n", 0)) is type(want["results"][0].get("n", 0))
    with pytest.raises(ademe._TruncatedBody):
        ademe._loads(b'{"results": [{"a": 1}')


def test_key_hash_partitioner_is_kafkas_default_partitioning():
    import os
    import random

    from kafka.partitioner.default import DefaultPartitioner
    from kafka.partitioner.default import murmur2 as kafka_murmur2

    from dpe_ingest.kafka_io import KeyHashPartitioner, murmur2

    rng = random.Random(7)
    for _ in range(20000):
        data = os.urandom(rng.randrange(0, 40))
        assert murmur2(data) == kafka_murmur2(data)

    class Cluster:
        def __init__(self, parts):
            self.parts = parts

        def topics(self):
            return {"t"}

        def partitions_for_topic(self, topic):
            return set(self.parts)

        def available_partitions_for_topic(self, topic):
            return set(self.parts)

    ours, theirs = KeyHashPartitioner(), DefaultPartitioner()
    for parts in ([0, 1, 2, 3, 4, 5], [0], [0, 1, 2], list(range(12))):
        cluster = Cluster(parts)
        for i in range(3000):
            key = f"{rng.randrange(10**6)}E{i:07d}{rng.choice('ABXZ')}".encode()
            assert ours.partition("t", None, key, None, None, cluster) == \
                theirs.partition("t", None, key, None, None, cluster)
        assert ours.partition("t", None, None, None, None, cluster) in parts


def test_the_topic_is_compressed_with_a_codec_every_client_reads_without_extras(monkeypatch):
    """Students attach their own `pip install kafka-python` consumers to the topic: lz4/zstd would need
    packages they do not have (UnsupportedCodecError); gzip needs none (docs/producer.md, Profile)."""
    from dpe_ingest import kafka_io

    seen = {}
    monkeypatch.setattr(kafka_io, "KafkaProducer", lambda **cfg: seen.update(cfg) or object())
    kafka_io.make_producer("127.0.0.1:1")
    assert seen["compression_type"] in (None, "gzip")
