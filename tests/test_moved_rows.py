"""A certificate that changes department (geocoded later, corrected) survives the old department's
deletion, in the sink and in the analytics, in either order and inside one batch (issue 20).

The producer's refresh of the old department sends ``{"numero_dpe", "departement": <old>,
"_deleted": true}`` for a key it no longer lists, while the new department's refresh upserts the same key
with its new department.  Both refreshes run at once (the chart gives every CronJob the same schedule),
so the two messages reach the topic in either order.
"""

from __future__ import annotations

import datetime as dt
import json

import psycopg2
import pytest

from dpe_ingest import analytics, messages
from dpe_ingest.messages import Deletion, settle
from dpe_ingest.sink import Row, Sink, parse_message


# ---------------------------------------------------------------------------------------------
# the fold, without a database
# ---------------------------------------------------------------------------------------------
def _fold(items):
    """items: ("up", key, dep) or ("del", key, dep) -> {key: ("up", dep) | ("del", deps or None)}"""
    out = settle(items, key=lambda m: m[1], department=lambda m: m[2], is_deletion=lambda m: m[0] == "del")
    got = {m[1]: ("up", m[2]) for m in out.upserts}
    got.update({d.key: ("del", d.departments) for d in out.deletions})
    return got


def test_settle_applies_the_messages_of_a_key_in_order():
    assert _fold([("up", "A", "35"), ("del", "A", "44")]) == {"A": ("up", "35")}  # moved: survives
    assert _fold([("del", "A", "44"), ("up", "A", "35")]) == {"A": ("up", "35")}
    assert _fold([("up", "A", "44"), ("del", "A", "44")]) == {"A": ("del", None)}  # whatever was stored
    assert _fold([("del", "A", "44")]) == {"A": ("del", frozenset({"44"}))}  # only if stored in 44
    assert _fold([("del", "A", None), ("del", "A", "44")]) == {"A": ("del", frozenset({None, "44"}))}
    assert _fold([("up", "A", "1"), ("up", "B", "1"), ("up", "A", "2")]) == {"A": ("up", "2"), "B": ("up", "1")}
    out = settle([("up", "A", "1"), ("up", "B", "1"), ("up", "A", "2")], key=lambda m: m[1],
                 department=lambda m: m[2], is_deletion=lambda m: False)
    assert [m[1] for m in out.upserts] == ["B", "A"]  # the order of the last messages
    assert Deletion("A", None).applies_to("69") and not Deletion("A", frozenset({"44"})).applies_to("35")


# ---------------------------------------------------------------------------------------------
# the sink, on PostgreSQL
# ---------------------------------------------------------------------------------------------
def _row(key: str, dep: str | None, offset: int, label: str = "C") -> Row:
    return Row(key, dt.date(2024, 1, 2), "35000", label, dep, {}, 0, offset)


def _deletion(key: str, dep: str | None, offset: int) -> Row:
    return parse_message(json.dumps(messages.deletion(key, dep)).encode(), 0, offset)


def _stored(database_url, table):
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT numero_dpe, departement, etiquette_dpe FROM "{table}" ORDER BY numero_dpe')
        return cur.fetchall()


@pytest.mark.postgres
@pytest.mark.parametrize("together", [False, True], ids=["separate-batches", "one-batch"])
def test_a_moved_row_survives_the_old_departments_deletion_in_the_sink(database_url, table, together):
    sink = Sink(database_url, table)
    sink.migrate()
    sink.write([_row("M44", "44", 0), _row("MNONE", None, 1), _row("GONE", "44", 2), _row("KEEP", "35", 3)])
    # 35's refresh upserts the rows that moved in; 44's and none's refreshes delete what they lost
    moved_in = [_row("M44", "35", 10, "D"), _row("MNONE", "35", 11, "E")]
    deletions = [_deletion("M44", "44", 12), _deletion("MNONE", None, 13), _deletion("GONE", "44", 14)]
    if together:
        res = sink.write(moved_in + deletions)
    else:
        sink.write(moved_in)
        res = sink.write(deletions)
    assert res.deleted == 1  # GONE only
    assert _stored(database_url, table) == [("KEEP", "35", "C"), ("M44", "35", "D"), ("MNONE", "35", "E")]
    # the deletions first, then the upserts (the other order on the topic): the same table
    sink.write([_deletion("KEEP", "35", 20)])
    sink.write([_row("KEEP", "38", 21)])
    assert ("KEEP", "38", "C") in _stored(database_url, table)
    # a deletion after an upsert of the same department in one batch removes it whatever was stored
    res = sink.write([_row("M44", "35", 30, "A"), _deletion("M44", "35", 31)])
    assert res.deleted == 1 and "M44" not in [r[0] for r in _stored(database_url, table)]
    sink.close()


# ---------------------------------------------------------------------------------------------
# the analytics store, on PostgreSQL
# ---------------------------------------------------------------------------------------------
def _fact(key: str, dep: str | None, label: str = "C", deleted: bool = False):
    doc = messages.deletion(key, dep) if deleted else {
        "numero_dpe": key, "date_reception_dpe": "2024-01-02", "etiquette_dpe": label, "departement": dep}
    fact = analytics.classify(json.dumps(doc).encode())
    assert isinstance(fact, analytics.Fact)
    return fact


def _counts(database_url, prefix):
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT numero_dpe, departement, label FROM "{prefix}_keys" ORDER BY numero_dpe')
        keys = cur.fetchall()
        cur.execute(f'SELECT departement, label, n FROM "{prefix}_labels" WHERE n <> 0 ORDER BY 1, 2')
        return keys, cur.fetchall()


@pytest.mark.postgres
@pytest.mark.parametrize("together", [False, True], ids=["separate-batches", "one-batch"])
def test_a_moved_row_survives_the_old_departments_deletion_in_the_analytics(database_url, table, together):
    store = analytics.Store(database_url, table)
    store.migrate()
    offset = 0

    def apply(facts):
        nonlocal offset
        store.apply("t", {0: offset}, {0: offset + len(facts)}, facts, {})
        offset += len(facts)

    apply([_fact("M44", "44"), _fact("MNONE", None), _fact("GONE", "44"), _fact("KEEP", "35")])
    moved_in = [_fact("M44", "35", "D"), _fact("MNONE", "35", "E")]
    deletions = [_fact("M44", "44", deleted=True), _fact("MNONE", None, deleted=True), _fact("GONE", "44", deleted=True)]
    if together:
        apply(moved_in + deletions)
    else:
        apply(moved_in)
        apply(deletions)
    keys, labels = _counts(database_url, table)
    assert keys == [("KEEP", "35", "C"), ("M44", "35", "D"), ("MNONE", "35", "E")]
    assert labels == [("35", "C", 1), ("35", "D", 1), ("35", "E", 1)]  # 44 and none: nothing left
    store.close()
