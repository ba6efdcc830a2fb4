"""Properties of the wire format: the consumer's parse_message makes a row or a dead letter with a reason of
any bytes; the producer's row check and encoding make a message or a dead letter of any row, and the
consumer reads a message the producer wrote as the row it was."""

import datetime as dt
import json

from hypothesis import given, strategies as st

from dpe_ingest import messages
from dpe_ingest.config import ProducerConfig
from dpe_ingest.producer import Producer, to_message
from dpe_ingest.sink import DATA_COLUMNS, MAX_KEY_CHARS, Invalid, parse_message
from hypothesis_profiles import counted, json_values

FIELDS = ("numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe", "departement",
          "type_batiment", "conso", "_deleted")
PRODUCER = Producer(ProducerConfig.from_env({"DEPARTMENT": "69", "ADEME_EXTRA_FIELDS": "type_batiment,conso,nested"}))

# values a field may carry, from plausible to hostile
DATES = st.dates().map(str) | st.datetimes().map(dt.datetime.isoformat) | st.text(max_size=12)
VALUE = (json_values(max_leaves=6) | DATES | st.sampled_from(["A", "G", "H", "", " ", "69003", "00000\n", "\x00"])
         | st.text(alphabet="0123456789٠١٢\n", min_size=5, max_size=6))
OBJECTS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), VALUE, max_size=8)


def _mutated(doc: dict) -> bytes:
    return json.dumps(doc, ensure_ascii=False, default=str).encode("utf-8", "surrogatepass")


MESSAGES = (st.binary(max_size=200) | OBJECTS.map(_mutated)
            | st.tuples(OBJECTS.map(_mutated), st.integers(0, 200), st.binary(max_size=3)).map(
                lambda t: t[0][:t[1]] + t[2] + t[0][t[1]:])
            | st.integers(1, 3000).map(lambda n: b'{"numero_dpe": "x", "e": ' + b"[" * n + b"]" * n + b"}")
            | st.integers(4200, 4400).map(lambda n: b'{"numero_dpe": "x", "n": 1' + b"0" * n + b"}"))


@given(MESSAGES)
@counted
def test_consumer_parse_message_is_a_row_or_a_dead_letter(value):
    try:
        row = parse_message(value, 0, 7)
    except Invalid as exc:
        assert exc.reason
        letter, _ = messages.build(exc.reason, "consumer", letter_id=messages.consumer_id("t", 0, 7),
                                     payload=exc.payload, raw=exc.raw, department=exc.department)
        assert messages.parse_dead_letter(letter)["reason"].startswith(exc.reason)
        return
    assert isinstance(row.numero_dpe, str) and row.numero_dpe.strip() and len(row.numero_dpe) <= MAX_KEY_CHARS
    assert row.date_reception_dpe is None or isinstance(row.date_reception_dpe, dt.date)
    assert not set(row.extra) & set(DATA_COLUMNS)


ROWS = st.fixed_dictionaries({}, optional={f: VALUE for f in FIELDS + ("nested",)}) | json_values(max_leaves=4)


@given(ROWS)
@counted
def test_producer_row_is_a_message_or_a_dead_letter(row):
    numero, value = PRODUCER._encode_row(row)
    if numero is None:
        assert isinstance(value, str) and value
        letter, headers = messages.build(value, "producer", letter_id=messages.producer_id("69", None, 0),
                                           payload=row, department="69")
        assert messages.parse_dead_letter(letter)["reason"].startswith(value)
        return
    assert isinstance(value, bytes) and numero == row["numero_dpe"]
    try:
        got = parse_message(value, 0, 0)
    except Invalid as exc:  # what PostgreSQL cannot store (NUL, NaN, nesting > 200…): the consumer's dead letter
        assert exc.reason
        return
    _assert_same(got, to_message(row, PRODUCER.fields, "69"))


# rows PostgreSQL can store: text without NUL or lone surrogates, finite numbers, bounded nesting
STORABLE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)
STORABLE = json_values(max_leaves=6, text=STORABLE_TEXT, floats=st.floats(allow_nan=False, allow_infinity=False))
GOOD_ROWS = st.fixed_dictionaries(
    {"numero_dpe": STORABLE_TEXT.filter(str.strip)},
    optional={"date_reception_dpe": st.dates().map(str) | st.datetimes().map(dt.datetime.isoformat) | st.none(),
              "code_postal_ban": st.text("0123456789", min_size=5, max_size=5) | st.none(),
              "etiquette_dpe": st.sampled_from("ABCDEFG") | st.none(),
              "type_batiment": STORABLE, "conso": STORABLE, "nested": STORABLE})


@given(GOOD_ROWS)
@counted
def test_producer_encoding_then_consumer_parse_is_the_identity(row):
    numero, value = PRODUCER._encode_row(row)
    assert numero == row["numero_dpe"], value
    _assert_same(parse_message(value, 0, 0), to_message(row, PRODUCER.fields, "69"))


def _assert_same(got, msg: dict) -> None:
    date = msg.get("date_reception_dpe")
    assert got.numero_dpe == msg["numero_dpe"]
    assert got.date_reception_dpe == (dt.date.fromisoformat(date) if date else None)
    assert (got.code_postal_ban, got.etiquette_dpe, got.departement) == (
        msg.get("code_postal_ban"), msg.get("etiquette_dpe"), msg["departement"])
    assert got.extra == {k: v for k, v in msg.items() if k not in DATA_COLUMNS}
