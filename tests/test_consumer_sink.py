"""The database sink against a real PostgreSQL: migration, upsert counts, isolation of bad rows."""

from __future__ import annotations

import datetime as dt
import threading

import psycopg2
import pytest

from dpe_ingest.sink import OffsetClaim, Row, Sink, Stale

pytestmark = pytest.mark.postgres


def rows_of(database_url, table):
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT numero_dpe, date_reception_dpe, code_postal_ban, etiquette_dpe, departement, extra,'
                    f' kafka_partition, kafka_offset FROM "{table}" ORDER BY numero_dpe')
        return cur.fetchall()


def R(n, etiquette="C", offset=0, extra=None):
    return Row(f"DPE{n:05d}", dt.date(2023, 1, 1 + n % 28), f"{69000 + n}", etiquette, "69", extra or {"n": n}, 0,
               offset)


def test_migration_is_idempotent_and_safe_when_consumers_start_together(database_url, table):
    errors = []

    def migrate():
        try:
            s = Sink(database_url, table)
            s.migrate()
            s.migrate()
            s.close()
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s"
                    " ORDER BY ordinal_position", (table,))
        cols = cur.fetchall()
        cur.execute("SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid"
                    " AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s::regclass AND i.indisprimary", (table,))
        pk = cur.fetchall()
    assert cols == [("numero_dpe", "text"), ("date_reception_dpe", "date"), ("code_postal_ban", "text"),
                    ("etiquette_dpe", "text"), ("departement", "text"), ("extra", "jsonb"),
                    ("kafka_partition", "integer"), ("kafka_offset", "bigint"),
                    ("ingested_at", "timestamp with time zone"), ("updated_at", "timestamp with time zone")]
    assert pk == [("numero_dpe",)]


def test_upsert_counts_inserted_updated_unchanged_and_last_version_wins(database_url, table):
    s = Sink(database_url, table)
    s.migrate()
    res = s.write([R(i, offset=i) for i in range(100)])
    assert (res.inserted, res.updated, res.unchanged) == (100, 0, 0)
    # the same batch again (a replay): nothing touched
    res = s.write([R(i, offset=i) for i in range(100)])
    assert (res.inserted, res.updated, res.unchanged) == (0, 0, 100)
    # 10 changed, 5 new, the rest the same; DPE00000 appears twice in the batch: the last one wins
    batch = [R(0, "A", 1000)] + [R(i, "G" if i < 10 else "C", 1000 + i) for i in range(105)]
    res = s.write(batch)
    assert (res.inserted, res.updated, res.unchanged) == (5, 10, 90)
    got = {r[0]: r for r in rows_of(database_url, table)}
    assert len(got) == 105
    assert got["DPE00000"][3] == "G" and got["DPE00000"][7] == 1000
    assert got["DPE00003"][3] == "G" and got["DPE00003"][7] == 1003
    assert got["DPE00050"][3] == "C" and got["DPE00050"][7] == 50  # unchanged row keeps its first offset
    assert got["DPE00104"][5] == {"n": 104}
    s.close()


def test_write_after_the_connection_broke_reconnects(database_url, table):
    from dpe_ingest.sink import DatabaseUnavailable

    s = Sink(database_url, table)
    s.migrate()
    s.write([R(1)])
    pid = s.conn.get_backend_pid()
    with psycopg2.connect(database_url) as admin, admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(DatabaseUnavailable):
        s.write([R(2)])
    res = s.write([R(2)])  # a fresh connection, same batch
    assert res.inserted == 1
    assert [r[0] for r in rows_of(database_url, table)] == ["DPE00001", "DPE00002"]
    s.close()


def test_a_row_the_database_refuses_is_isolated_and_the_rest_is_written(database_url, table):
    s = Sink(database_url, table)
    s.migrate()
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT no_x CHECK (etiquette_dpe <> \'X\')')
    res = s.write([R(1), R(2, "X"), R(3)])
    assert (res.inserted, res.updated, res.unchanged) == (2, 0, 0)
    assert [r.numero_dpe for r, _ in res.refused] == ["DPE00002"]
    assert "no_x" in res.refused[0][1]
    assert [r[0] for r in rows_of(database_url, table)] == ["DPE00001", "DPE00003"]
    s.close()


def test_awkward_values_are_stored_exactly(database_url, table):
    odd = {"n": 1, "s": "tab\tnewline\ncr\rbackslash\\ \\N quote' \" é 😀", "nested": [1, {"a": None}],
           "big": 123456789012345678901234567890, "f": 1e20}
    rows = [R(i, offset=i, extra=odd if i % 2 else {"n": i}) for i in range(50)]
    rows.append(Row("\\N", None, None, None, None, {}, 1, 99))  # a key spelled like COPY's NULL
    s = Sink(database_url, table)
    s.migrate()
    s.write(rows)
    s.close()
    got = {r[0]: r for r in rows_of(database_url, table)}
    assert len(got) == 51 and got["DPE00001"][5] == odd and got["\\N"][1:6] == (None, None, None, None, {})
    assert got["DPE00002"] == ("DPE00002", dt.date(2023, 1, 3), "69002", "C", "69", {"n": 2}, 0, 2)


def test_batch_write_speed_is_reported(database_url, table, capsys):
    """Not a timing assertion: prints rows/s of 100-row batches with their offsets (docs/consumer.md)."""
    import time

    s = Sink(database_url, table)
    s.migrate()
    rows = [R(i, offset=i, extra={"n": i, "s": "tab\tnewline\nbackslash\\ é"}) for i in range(3000)]
    t = time.perf_counter()
    for i in range(0, len(rows), 100):
        s.write(rows[i:i + 100], OffsetClaim(f"g-{table}", "speed", {0: (i, i + 100)}))
    took = time.perf_counter() - t
    got = rows_of(database_url, table)
    assert len(got) == 3000 and got[1][5] == {"n": 1, "s": "tab\tnewline\nbackslash\\ é"}
    with capsys.disabled():
        print(f"\n[bench] sink: {len(rows) / took:.0f} rows/s in 100-row batches with their offsets "
              f"({took / 30 * 1000:.1f} ms per batch)")
    s.close()


# ---------------------------------------------------------------------------------------------
# offsets in step with the rows
# ---------------------------------------------------------------------------------------------
def test_a_batch_moves_its_offsets_with_its_rows_and_a_replay_writes_nothing(database_url, table):
    s = Sink(database_url, table)
    s.migrate()
    group, topic = f"g-{table}", f"t-{table}"
    first = OffsetClaim(group, topic, {0: (0, 3), 1: (5, 6)})
    res = s.write([R(1, offset=0), R(2, offset=2), Row("DPE00009", None, None, None, "69", {}, 1, 5)], first)
    assert res.inserted == 3 and s.stored_offsets(group, topic) == {0: 3, 1: 6}
    # the same batch again (a replay after a crash between the commit and anything else): refused
    with pytest.raises(Stale) as err:
        s.write([R(1, "Z", offset=0)], first)
    assert err.value.stored == {0: 3, 1: 6}
    assert [r[3] for r in rows_of(database_url, table)] == ["C", "C", None]
    # the next batch of partition 0 goes on; partition 1 is untouched
    res = s.write([R(1, "Z", offset=3)], OffsetClaim(group, topic, {0: (3, 4)}))
    assert res.updated == 1 and s.stored_offsets(group, topic) == {0: 4, 1: 6}
    # one stale partition refuses the whole batch, rows of the other partition included
    with pytest.raises(Stale) as err:
        s.write([R(7, offset=4), Row("DPE00008", None, None, None, "69", {}, 1, 5)],
                OffsetClaim(group, topic, {0: (4, 5), 1: (5, 6)}))
    assert err.value.stored == {1: 6}
    assert "DPE00007" not in {r[0] for r in rows_of(database_url, table)}
    assert s.stored_offsets(group, topic) == {0: 4, 1: 6}
    # another group, another topic: positions of their own
    s.write([], OffsetClaim("other", topic, {0: (0, 10)}))
    assert s.stored_offsets("other", topic) == {0: 10} and s.stored_offsets(group, topic) == {0: 4, 1: 6}
    s.close()


def test_a_batch_of_dead_letters_only_moves_the_offsets(database_url, table):
    s = Sink(database_url, table)
    s.migrate()
    res = s.write([], OffsetClaim("g", table, {2: (40, 50)}))
    assert res.rows == 0 and s.stored_offsets("g", table) == {2: 50}
    with pytest.raises(Stale):
        s.write([], OffsetClaim("g", table, {2: (40, 50)}))
    s.close()


def test_two_members_writing_the_same_batch_at_once_store_it_once(database_url, table):
    """A rebalance can leave two members with the same messages: the offset row lock lets one win."""
    Sink(database_url, table).migrate()
    group = f"g-{table}"
    rows = [R(i, offset=i) for i in range(100)]
    outcome = []
    barrier = threading.Barrier(4)

    def member():
        s = Sink(database_url, table)
        s._ensure()
        barrier.wait()
        try:
            outcome.append(s.write(rows, OffsetClaim(group, "t", {0: (0, 100)})).inserted)
        except Stale as exc:
            outcome.append(exc.stored)
        finally:
            s.close()

    threads = [threading.Thread(target=member) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcome, key=str) == sorted([100] + [{0: 100}] * 3, key=str)
    assert len(rows_of(database_url, table)) == 100


def test_a_refused_row_is_isolated_and_the_offsets_still_move(database_url, table):
    s = Sink(database_url, table)
    s.migrate()
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT no_x CHECK (etiquette_dpe <> \'X\')')
    res = s.write([R(1, offset=0), R(2, "X", offset=1)], OffsetClaim("g", table, {0: (0, 2)}))
    assert [r.numero_dpe for r, _ in res.refused] == ["DPE00002"] and res.inserted == 1
    assert s.stored_offsets("g", table) == {0: 2}
    with pytest.raises(Stale):  # the refused row is not retried by a replay either
        s.write([R(1, offset=0), R(2, "X", offset=1)], OffsetClaim("g", table, {0: (0, 2)}))
    s.close()


def test_deletion_messages_delete_the_row_and_the_last_message_of_a_key_wins(database_url, table):
    """A refresh sends {"numero_dpe", "departement", "_deleted": true} for a row deactivated in the API."""
    import json

    from dpe_ingest.sink import parse_message

    sink = Sink(database_url, table)
    sink.migrate()
    sink.write([R(1), R(2), R(3)])
    gone = parse_message(json.dumps({"numero_dpe": "DPE00002", "departement": "69", "_deleted": True}).encode(), 0, 9)
    assert gone.deleted and gone.numero_dpe == "DPE00002"
    res = sink.write([gone])
    assert (res.deleted, res.inserted, res.updated) == (1, 0, 0)
    assert [r[0] for r in rows_of(database_url, table)] == ["DPE00001", "DPE00003"]
    # deleting an absent row is harmless (a replay); in one batch the last message of a key wins
    again = sink.write([gone, R(3, etiquette="G", offset=11), parse_message(
        json.dumps({"numero_dpe": "DPE00003", "departement": "69", "_deleted": True}).encode(), 0, 12), R(4)])
    assert again.deleted == 1 and again.inserted == 1
    assert [r[0] for r in rows_of(database_url, table)] == ["DPE00001", "DPE00004"]
    back = sink.write([gone, R(2, offset=20)])  # re-activated after a deletion: stored again
    assert back.inserted == 1 and back.deleted == 0
    assert [r[0] for r in rows_of(database_url, table)] == ["DPE00001", "DPE00002", "DPE00004"]
    sink.close()


def test_rows_without_a_department_are_stored_with_departement_null(database_url, table):
    import json

    from dpe_ingest.sink import department_keys, parse_message

    sink = Sink(database_url, table)
    sink.migrate()
    msg = {"numero_dpe": "2400E0000001A", "date_reception_dpe": "2024-01-02", "code_postal_ban": None,
           "etiquette_dpe": "D", "departement": None}
    sink.write([parse_message(json.dumps(msg).encode(), 0, 1), R(5)])
    assert department_keys(database_url, table, None) == {"2400E0000001A"}
    assert department_keys(database_url, table, "69") == {"DPE00005"}
    assert department_keys(database_url, table + "_absent", "69") == set()
    sink.close()
