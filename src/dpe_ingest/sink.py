"""The PostgreSQL side of the consumer: message validation, migration, batch upsert with its offsets.

- :func:`parse_message` turns one Kafka message (raw bytes) into a :class:`Row` or raises
  :class:`Invalid` with a reason (the consumer sends those to the dead-letter topic, never to the DB).
- :class:`Sink` owns one database connection: :meth:`Sink.migrate` creates the table and the
  ``dpe_ingest_offsets`` table idempotently (serialised with an advisory lock, so two consumers
  starting together are safe) and :meth:`Sink.write` upserts one batch in one transaction together
  with the batch's Kafka offsets (:class:`OffsetClaim`): one statement ships the whole batch as a
  JSON array (``json_to_recordset``), moves each partition's stored offset from where the batch
  started to where it ends -- only if the database still says the batch's start -- and upserts the
  rows (``ON CONFLICT (numero_dpe) DO UPDATE … WHERE <row differs>``).

The offsets in the table are the truth the consumer seeks to; a batch whose start is not the stored
offset (already written, by us before a crash or by another member of the group) raises
:class:`Stale` and writes nothing.  The upsert stays a second line of defence: writing the same
message twice leaves the table as after writing it once.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Callable, Iterable, Sequence

import orjson

from . import pg_connection
from .config import BASE_FIELDS
from .group_consumer import DatabaseUnavailable, OffsetClaim, Stale
from .messages import DELETED_FLAG, settle

#: Columns filled from the message (``extra`` holds every other field of the JSON object).
DATA_COLUMNS: tuple[str, ...] = BASE_FIELDS + ("departement",)
_DATA_KEYS = frozenset(DATA_COLUMNS)
#: numero_dpe longer than this is refused (a btree index entry must stay well under 2.7 kB).
MAX_KEY_CHARS = 200
#: where each consumer group's next offset per partition is kept, in step with the rows
OFFSETS_TABLE = "dpe_ingest_offsets"
#: beyond this, orjson may have read an integer of more than 64 bits as a float: the slow path decides
_BIG = 9.2e18


class Invalid(ValueError):
    """A message that cannot go to the database; ``reason`` is the human-readable cause."""

    def __init__(self, reason: str, payload: Any = None, raw: bytes | None = None, department: str | None = None):
        super().__init__(reason)
        self.reason = reason
        self.payload = payload
        self.raw = raw
        if department is None and isinstance(payload, dict) and isinstance(payload.get("departement"), str):
            department = payload["departement"]
        self.department = department  # for the dead letter: which department's count it belongs to


@dataclass(slots=True)
class Row:
    numero_dpe: str
    date_reception_dpe: dt.date | None
    code_postal_ban: str | None
    etiquette_dpe: str | None
    departement: str | None
    extra: dict
    partition: int
    offset: int
    #: a deactivated certificate: the producer's refresh found it gone from the API; the row is deleted
    deleted: bool = False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON for PostgreSQL")


def _check_value(value: Any, path: str, depth: int = 0) -> None:
    """Refuse what PostgreSQL text/jsonb cannot store: NUL characters, lone surrogates, NaN."""
    if depth > 200:
        raise Invalid(f"JSON nested too deeply at {path}")
    if isinstance(value, str):
        if "\x00" in value:
            raise Invalid(f"NUL character in {path}")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise Invalid(f"invalid unicode (lone surrogate) in {path}") from None
    elif isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise Invalid(f"non-finite number in {path}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_value(k, f"{path} key", depth + 1)
            _check_value(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_value(v, f"{path}[{i}]", depth + 1)


def _text(value: Any) -> str | None:
    """A text column from a JSON scalar (numbers become their JSON spelling: 69001 -> '69001')."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)


def _decode(value: bytes) -> Any:
    """The JSON document of a message, or :class:`Invalid` saying why not.

    orjson reads the common message, a flat object.  What it refuses, and what it may read differently
    from the standard library (an escaped NUL, integers beyond 64 bits, which it makes floats) or what
    needs a deep check (nesting), goes through the standard library and :func:`_check_value`, whose
    reasons the dead letters carry."""
    if b"\\u0000" not in value:
        try:
            doc = orjson.loads(value)
        except orjson.JSONDecodeError:
            pass  # the standard library says why, below
        else:
            if type(doc) is dict:
                # orjson already refused lone surrogates, NaN and infinities
                for v in doc.values():
                    t = type(v)
                    if (t is float and not -_BIG < v < _BIG) or t is dict or t is list:
                        break
                else:
                    return doc
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        raise Invalid("value is not valid UTF-8", raw=value) from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise Invalid("JSON nested too deeply", raw=value) from None
    except ValueError as exc:
        raise Invalid(f"value is not JSON: {exc}", raw=value) from None
    if isinstance(doc, dict):
        try:
            _check_value(doc, "value")
        except Invalid as exc:
            # the payload itself cannot be re-encoded faithfully: keep the raw bytes (and the department,
            # when it is a clean string, so that the dead letter is counted where it belongs)
            dep = doc.get("departement")
            if not isinstance(dep, str) or "\x00" in dep or len(dep) > 10:
                dep = None
            raise Invalid(exc.reason, raw=value, department=dep) from None
    return doc


def parse_message(value: bytes | None, partition: int, offset: int) -> Row:
    """Validate one message value; return its row or raise :class:`Invalid`."""
    if value is None:
        raise Invalid("empty message (null value / tombstone)")
    doc = _decode(value)
    if not isinstance(doc, dict):
        raise Invalid(f"value is a JSON {type(doc).__name__}, not an object", payload=doc)
    numero = doc.get("numero_dpe")
    if numero is None:
        raise Invalid("missing numero_dpe", payload=doc)
    if not isinstance(numero, str):
        raise Invalid(f"numero_dpe is a {type(numero).__name__}, not a string", payload=doc)
    if numero.strip() == "":
        raise Invalid("empty numero_dpe", payload=doc)
    if len(numero) > MAX_KEY_CHARS:
        raise Invalid(f"numero_dpe longer than {MAX_KEY_CHARS} characters", payload=doc)
    if doc.get(DELETED_FLAG) is True:  # {"numero_dpe", "departement", "_deleted": true}
        return Row(numero_dpe=numero, date_reception_dpe=None, code_postal_ban=None, etiquette_dpe=None,
                   departement=_text(doc.get("departement")), extra={}, partition=partition, offset=offset,
                   deleted=True)
    raw_date = doc.get("date_reception_dpe")
    date: dt.date | None
    if raw_date is None or raw_date == "":
        date = None
    elif not isinstance(raw_date, str):
        raise Invalid(f"date_reception_dpe {raw_date!r} is not a date (YYYY-MM-DD)", payload=doc)
    else:
        try:
            # YYYY-MM-DD; a full ISO timestamp keeps its date part
            if len(raw_date) > 10:
                date = dt.datetime.fromisoformat(raw_date).date()
            else:
                date = dt.date.fromisoformat(raw_date)
        except ValueError:
            raise Invalid(f"date_reception_dpe {raw_date!r} is not a date (YYYY-MM-DD)", payload=doc) from None
    cp, label, dep = doc.get("code_postal_ban"), doc.get("etiquette_dpe"), doc.get("departement")
    return Row(
        numero,
        date,
        cp if cp is None or type(cp) is str else _text(cp),
        label if label is None or type(label) is str else _text(label),
        dep if dep is None or type(dep) is str else _text(dep),
        {k: v for k, v in doc.items() if k not in _DATA_KEYS},
        partition,
        offset,
    )


def dedupe(rows: Iterable[Row]):
    """One action per numero_dpe (ON CONFLICT cannot touch a row twice): the rows to upsert and the
    deletions (:class:`dpe_ingest.messages.Deletion`), as applying ``rows`` one by one would leave the
    table (:func:`dpe_ingest.messages.settle`: a deletion removes a row only if it is of its department)."""
    return settle(rows, attrgetter("numero_dpe"), attrgetter("departement"), attrgetter("deleted"))


@dataclass
class WriteResult:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0  # rows removed by deletion messages (deactivated in the API)
    #: rows the database refused one by one (bad data we did not foresee): (row, error)
    refused: list[tuple[Row, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return self.inserted + self.updated + self.unchanged


def _psycopg2():
    try:
        import psycopg2  # noqa: F401
        import psycopg2.extras  # noqa: F401
        import psycopg2.sql  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the consumer image installs [consumer]
        raise RuntimeError("psycopg2 is missing: pip install 'dpe-ingest[consumer]'") from exc
    return psycopg2


_COLUMNS = ("numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe", "departement", "extra",
            "kafka_partition", "kafka_offset")
_TYPES = ("text", "date", "text", "text", "text", "jsonb", "integer", "bigint")
#: compared to decide whether a row changed (the Kafka position alone is not a change)
_DATA = ("date_reception_dpe", "code_postal_ban", "etiquette_dpe", "departement", "extra")


class Database:
    """One connection to PostgreSQL (the sink's, the analytics'): connection problems raise
    :class:`DatabaseUnavailable` (retry later), a transaction that fails is rolled back."""

    APPLICATION = "dpe-ingest-consumer"

    def __init__(self, database_url: str, *, connect_timeout_s: int = 10, statement_timeout_ms: int = 60000):
        self.database_url = database_url
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_ms = statement_timeout_ms
        self.conn = None
        self._pg = _psycopg2()

    def connect(self) -> None:
        """(Re)connect; raises :class:`DatabaseUnavailable` when the server cannot be reached."""
        self.close()
        pg = self._pg
        try:
            conn = pg_connection.connect(  # a refusal that is a setting: PgAccessError (exit 2), not an outage
                self.database_url,
                connect_timeout=self.connect_timeout_s,
                application_name=self.APPLICATION,
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
            )
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = %s", (self.statement_timeout_ms,))
            conn.commit()
        except (pg.OperationalError, pg.InterfaceError) as exc:
            raise DatabaseUnavailable(_one_line(exc)) from exc
        self.conn = conn

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None

    def _ensure(self):
        if self.conn is None or self.conn.closed:
            self.connect()
        return self.conn

    @contextmanager
    def transaction(self, commit: bool = True):
        """The connection, for one transaction: committed at the end (``commit`` False: rolled back, a
        read), rolled back on any error."""
        pg = self._pg
        conn = self._ensure()
        try:
            yield conn
            if commit:
                conn.commit()
            else:
                conn.rollback()
        except (pg.OperationalError, pg.InterfaceError) as exc:
            self.close()
            raise DatabaseUnavailable(_one_line(exc)) from exc
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                self.close()
            raise


class Sink(Database):
    """The table of the rows: its migrations and the batch upsert with its offsets."""

    def __init__(self, database_url: str, table: str = "dpe_data", **kw):
        super().__init__(database_url, **kw)
        self.table = table
        self._t = self._pg.sql.Identifier(table)
        self._o = self._pg.sql.Identifier(OFFSETS_TABLE)
        self._sql = self._statements()

    # -- migration -------------------------------------------------------------------------
    def migration_sql(self) -> list:
        sql = self._pg.sql
        t = self._t
        idx = sql.Identifier(f"{self.table}_departement_idx")
        stmts = [
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " numero_dpe text PRIMARY KEY,"
                " date_reception_dpe date,"
                " code_postal_ban text,"
                " etiquette_dpe text,"
                " departement text,"
                " extra jsonb NOT NULL DEFAULT '{{}}'::jsonb,"
                " kafka_partition integer,"
                " kafka_offset bigint,"
                " ingested_at timestamptz NOT NULL DEFAULT now(),"
                " updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(t),
        ]
        # additive: a table created by an earlier version gets the columns it lacks
        for col, typ in (
            ("date_reception_dpe", "date"), ("code_postal_ban", "text"), ("etiquette_dpe", "text"),
            ("departement", "text"), ("extra", "jsonb NOT NULL DEFAULT '{}'::jsonb"),
            ("kafka_partition", "integer"), ("kafka_offset", "bigint"),
            ("ingested_at", "timestamptz NOT NULL DEFAULT now()"),
            ("updated_at", "timestamptz NOT NULL DEFAULT now()"),
        ):
            stmts.append(sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} " + typ.replace("{}", "{{}}"))
                         .format(t, sql.Identifier(col)))
        stmts.append(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (departement)").format(idx, t))
        # every consumer group's position in every topic, written in the same transaction as the rows
        stmts.append(sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} ("
            " consumer_group text NOT NULL,"
            " topic text NOT NULL,"
            " partition integer NOT NULL,"
            " next_offset bigint NOT NULL,"
            " updated_at timestamptz NOT NULL DEFAULT now(),"
            " PRIMARY KEY (consumer_group, topic, partition))"
        ).format(self._o))
        return stmts

    def migrate(self) -> None:
        """Create the tables if needed.  Safe when several consumers start at the same moment:
        the DDL runs under a transaction-scoped advisory lock keyed on the table name."""
        with self.transaction() as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext('dpe_ingest.migrate'), hashtext(%s))", (self.table,))
            for stmt in self.migration_sql():
                cur.execute(stmt)

    # -- offsets ---------------------------------------------------------------------------
    def stored_offsets(self, group: str, topic: str) -> dict[int, int]:
        """{partition: next offset} the database holds for ``group`` in ``topic``."""
        with self.transaction(commit=False) as conn, conn.cursor() as cur:
            cur.execute(self._pg.sql.SQL("SELECT partition, next_offset FROM {} WHERE consumer_group = %s"
                                         " AND topic = %s").format(self._o), (group, topic))
            return {int(p): int(o) for p, o in cur.fetchall()}

    # -- batch upsert ----------------------------------------------------------------------
    def _statements(self) -> dict:
        sql = self._pg.sql
        t, o = self._t, self._o
        recordset = sql.SQL("json_to_recordset(%(rows)s::json) AS x({})").format(
            sql.SQL(", ").join(sql.SQL("{} " + typ).format(sql.Identifier(c)) for c, typ in zip(_COLUMNS, _TYPES)))
        upsert = sql.SQL(
            "INSERT INTO {t} AS d ({cols}) SELECT {cols} FROM {recordset} {cond}"
            "ON CONFLICT (numero_dpe) DO UPDATE SET {sets}, kafka_partition = EXCLUDED.kafka_partition,"
            " kafka_offset = EXCLUDED.kafka_offset, updated_at = now() "
            "WHERE ({old}) IS DISTINCT FROM ({new}) "
            "RETURNING (xmax = 0) AS inserted"
        )
        parts = dict(
            t=t, recordset=recordset,
            cols=sql.SQL(", ").join(map(sql.Identifier, _COLUMNS)),
            sets=sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in _DATA),
            old=sql.SQL(", ").join(sql.SQL("d.{}").format(sql.Identifier(c)) for c in _DATA),
            new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in _DATA),
        )
        # lock the group's offset rows in partition order (two members never deadlock), creating the
        # missing ones at the batch's start, then move each one only if it still says the batch's start
        lock = sql.SQL(
            "INSERT INTO {o} (consumer_group, topic, partition, next_offset)"
            " SELECT %(g)s, %(t)s, p, s FROM unnest(%(p)s::integer[], %(s)s::bigint[]) AS x(p, s) ORDER BY p"
            " ON CONFLICT DO NOTHING; "
            "SELECT partition FROM {o} WHERE consumer_group = %(g)s AND topic = %(t)s AND partition = ANY(%(p)s)"
            " ORDER BY partition FOR UPDATE; "
        ).format(o=o)
        fence = sql.SQL(
            "UPDATE {o} AS o SET next_offset = x.n, updated_at = now()"
            " FROM unnest(%(p)s::integer[], %(s)s::bigint[], %(n)s::bigint[]) AS x(p, s, n)"
            " WHERE o.consumer_group = %(g)s AND o.topic = %(t)s AND o.partition = x.p AND o.next_offset = x.s"
            " RETURNING o.partition"
        ).format(o=o)
        return {
            # rows and offsets in one statement: the rows go in only if every partition's offset moved
            "claim_upsert": lock + sql.SQL(
                "WITH fence AS ({fence}), up AS ({upsert}) "
                "SELECT (SELECT count(*) FROM fence), count(*) FILTER (WHERE inserted), count(*) FROM up"
            ).format(fence=fence, upsert=upsert.format(cond=sql.SQL(
                "WHERE (SELECT count(*) FROM fence) = %(np)s "), **parts)),
            "claim": lock + sql.SQL("WITH fence AS ({fence}) SELECT count(*) FROM fence").format(fence=fence),
            "upsert": sql.SQL("WITH up AS ({upsert}) SELECT NULL, count(*) FILTER (WHERE inserted), count(*) FROM up")
            .format(upsert=upsert.format(cond=sql.SQL(""), **parts)),
            # a deletion removes the row only while it is of the deleting department (it may have moved)
            "delete": sql.SQL("DELETE FROM {} AS d USING unnest(%(k)s::text[], %(d)s::text[], %(any)s::boolean[])"
                              " AS x(k, dep, any_dep) WHERE d.numero_dpe = x.k"
                              " AND (x.any_dep OR d.departement IS NOT DISTINCT FROM x.dep)").format(t),
            "stored": sql.SQL("SELECT partition, next_offset FROM {} WHERE consumer_group = %(g)s AND topic = %(t)s"
                              " AND partition = ANY(%(p)s)").format(o),
        }

    @staticmethod
    def _claim_params(claim: OffsetClaim) -> dict:
        parts = sorted(claim.ranges)
        return {"g": claim.group, "t": claim.topic, "p": parts, "s": [claim.ranges[p][0] for p in parts],
                "n": [claim.ranges[p][1] for p in parts], "np": len(parts)}

    @staticmethod
    def _deletion_params(gone) -> dict:
        """One (key, department, any department) triple per department a deletion applies to."""
        k, d, any_dep = [], [], []
        for g in gone:
            for dep in (None,) if g.departments is None else g.departments:
                k.append(g.key)
                d.append(dep)
                any_dep.append(g.departments is None)
        return {"k": k, "d": d, "any": any_dep}

    @staticmethod
    def _rows_json(rows: Sequence[Row]) -> str:
        docs = [{"numero_dpe": r.numero_dpe, "date_reception_dpe": r.date_reception_dpe,
                 "code_postal_ban": r.code_postal_ban, "etiquette_dpe": r.etiquette_dpe,
                 "departement": r.departement, "extra": r.extra, "kafka_partition": r.partition,
                 "kafka_offset": r.offset} for r in rows]
        try:
            return orjson.dumps(docs).decode("utf-8")
        except orjson.JSONEncodeError:  # an integer beyond 64 bits (read by the standard library)
            return json.dumps(docs, ensure_ascii=False, default=dt.date.isoformat)

    def _upsert(self, cur, rows: Sequence[Row], claim: OffsetClaim | None) -> tuple[int, int]:
        """(inserted, updated) of one statement; raises :class:`Stale` when the claim does not hold."""
        params = {"rows": self._rows_json(rows)}
        if claim is not None:
            params.update(self._claim_params(claim))
            cur.execute(self._sql["claim_upsert"], params)
        else:
            cur.execute(self._sql["upsert"], params)
        moved, inserted, touched = cur.fetchone()
        if claim is not None and moved != len(claim.ranges):
            self._raise_stale(cur, claim)
        return int(inserted), int(touched) - int(inserted)

    def _claim(self, cur, claim: OffsetClaim) -> None:
        cur.execute(self._sql["claim"], self._claim_params(claim))
        if cur.fetchone()[0] != len(claim.ranges):
            self._raise_stale(cur, claim)

    def _raise_stale(self, cur, claim: OffsetClaim) -> None:
        cur.connection.rollback()  # nothing of this batch stays; what the others committed is visible
        cur.execute(self._sql["stored"], self._claim_params(claim))
        stored = {int(p): int(o) for p, o in cur.fetchall()}
        raise Stale({p: stored.get(p) for p, (start, _next) in claim.ranges.items() if stored.get(p) != start})

    def write(self, rows: Sequence[Row], claim: OffsetClaim | None = None,
              before_commit: Callable[["WriteResult"], None] | None = None) -> WriteResult:
        """Upsert a batch, and move its offsets (``claim``), in one transaction.  ``rows`` may repeat a
        numero_dpe (the last one wins).

        Raises :class:`Stale` (nothing written) when the database's offsets are not where the batch
        starts, :class:`DatabaseUnavailable` on connection problems (nothing was committed, or the
        commit outcome is unknown: either way writing the same batch again is correct, the claim
        makes it a no-op if it was).  Rows the database refuses as data errors are isolated one by one
        and returned in ``refused``; ``before_commit`` sees the result before the commit.
        """
        pg = self._pg
        started = time.monotonic()
        settled = dedupe(rows)  # one action per key, as the messages applied in order would leave it
        unique, gone = settled.upserts, settled.deletions
        result = WriteResult()
        if not unique and not gone and claim is None:
            return result
        with self.transaction() as conn, conn.cursor() as cur:
            counts = (0, 0)
            if unique:
                try:
                    counts = self._upsert(cur, unique, claim)
                except (pg.DataError, pg.IntegrityError) as exc:
                    # one bad row must not block the partition: find it, keep the others
                    conn.rollback()
                    if claim is not None:
                        self._claim(cur, claim)
                    counts = self._write_one_by_one(cur, unique, result, exc)
            elif claim is not None:
                self._claim(cur, claim)
            if gone:
                cur.execute(self._sql["delete"], self._deletion_params(gone))
                result.deleted = cur.rowcount
            result.inserted, result.updated = counts
            result.unchanged = len(unique) - len(result.refused) - sum(counts)
            if before_commit is not None:
                before_commit(result)
        result.seconds = time.monotonic() - started
        return result

    def _write_one_by_one(self, cur, rows: Sequence[Row], result: WriteResult, first_error) -> tuple[int, int]:
        pg = self._pg
        inserted = updated = 0
        for row in rows:
            cur.execute("SAVEPOINT dpe_row")
            try:
                i, u = self._upsert(cur, [row], None)
                inserted, updated = inserted + i, updated + u
                cur.execute("RELEASE SAVEPOINT dpe_row")
            except (pg.DataError, pg.IntegrityError) as exc:
                cur.execute("ROLLBACK TO SAVEPOINT dpe_row")
                result.refused.append((row, f"database refused the row: {_one_line(exc)}"))
        if not result.refused:
            # the batch failed but no single row does: not a data problem after all
            raise first_error
        return inserted, updated

    # -- reading (status, tests) -----------------------------------------------------------
    def count(self) -> int:
        conn = self._ensure()
        with conn.cursor() as cur:
            cur.execute(self._pg.sql.SQL("SELECT count(*) FROM {}").format(self._t))
            n = cur.fetchone()[0]
        conn.rollback()
        return int(n)


def department_keys(database_url: str, table: str, departement: str | None) -> set[str]:
    """Every numero_dpe of one department in the table (``None``: the rows without a department).

    What a refresh compares with the API's keys to find the rows deactivated there."""
    pg = _psycopg2()
    conn = pg_connection.connect(database_url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(pg.sql.SQL("SELECT to_regclass(%s)"), (table,))
            if cur.fetchone()[0] is None:
                return set()  # no consumer has created the table yet: nothing of ours to compare
            t = pg.sql.Identifier(table)
            if departement is None:
                cur.execute(pg.sql.SQL("SELECT numero_dpe FROM {} WHERE departement IS NULL").format(t))
            else:
                cur.execute(pg.sql.SQL("SELECT numero_dpe FROM {} WHERE departement = %s").format(t), (departement,))
            return {r[0] for r in cur}
    finally:
        conn.close()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
