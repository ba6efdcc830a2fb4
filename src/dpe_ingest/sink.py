"""The PostgreSQL side of the consumer: message validation, migration, batch upsert.

- :func:`parse_message` turns one Kafka message (raw bytes) into a :class:`Row` or raises
  :class:`Invalid` with a reason (the consumer sends those to the dead-letter topic, never to the DB).
- :class:`Sink` owns one database connection: :meth:`Sink.migrate` creates the table idempotently
  (serialised with an advisory lock, so two consumers starting together are safe) and
  :meth:`Sink.write` upserts one batch in one transaction: ``COPY`` into a session temporary staging
  table, then ``INSERT … SELECT … ON CONFLICT (numero_dpe) DO UPDATE … WHERE <row differs> RETURNING
  (xmax = 0)`` (``method="copy"``, measured the faster), or a single ``execute_values`` statement
  (``method="values"``).

The upsert is idempotent: writing the same message twice leaves the table as after writing it once
(the second time the row is counted ``unchanged`` and not even touched).  This is what makes the
consumer's "offset commit after DB commit" protocol exactly-once in effect.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .config import BASE_FIELDS

#: Columns filled from the message (``extra`` holds every other field of the JSON object).
DATA_COLUMNS: tuple[str, ...] = BASE_FIELDS + ("departement",)
#: a message with this flag set deletes its numero_dpe (rows deactivated in the API; the producer's refresh)
DELETED_FLAG = "_deleted"
#: numero_dpe longer than this is refused (a btree index entry must stay well under 2.7 kB).
MAX_KEY_CHARS = 200


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


@dataclass(frozen=True)
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


def parse_message(value: bytes | None, partition: int, offset: int) -> Row:
    """Validate one message value; return its row or raise :class:`Invalid`."""
    if value is None:
        raise Invalid("empty message (null value / tombstone)")
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
    if not isinstance(doc, dict):
        raise Invalid(f"value is a JSON {type(doc).__name__}, not an object", payload=doc)
    try:
        _check_value(doc, "value")
    except Invalid as exc:
        # the payload itself cannot be re-encoded faithfully: keep the raw bytes (and the department,
        # when it is a clean string, so that the dead letter is counted where it belongs)
        dep = doc.get("departement")
        if not isinstance(dep, str) or "\x00" in dep or len(dep) > 10:
            dep = None
        raise Invalid(exc.reason, raw=value, department=dep) from None
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
    extra = {k: v for k, v in doc.items() if k not in DATA_COLUMNS}
    return Row(
        numero_dpe=numero,
        date_reception_dpe=date,
        code_postal_ban=_text(doc.get("code_postal_ban")),
        etiquette_dpe=_text(doc.get("etiquette_dpe")),
        departement=_text(doc.get("departement")),
        extra=extra,
        partition=partition,
        offset=offset,
    )


def dedupe(rows: Iterable[Row]) -> list[Row]:
    """One row per numero_dpe, the last one winning (ON CONFLICT cannot touch a row twice)."""
    last: dict[str, Row] = {}
    for row in rows:
        last.pop(row.numero_dpe, None)  # keep the order of the last occurrences
        last[row.numero_dpe] = row
    return list(last.values())


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


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or the connection broke: retry later with the same batch."""


def _psycopg2():
    try:
        import psycopg2  # noqa: F401
        import psycopg2.extras  # noqa: F401
        import psycopg2.sql  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the consumer image installs [consumer]
        raise RuntimeError("psycopg2 is missing: pip install 'dpe-ingest[consumer]'") from exc
    return psycopg2


class Sink:
    """One connection to PostgreSQL, the table migration and the batch upsert."""

    def __init__(self, database_url: str, table: str = "dpe_data", *, connect_timeout_s: int = 10,
                 statement_timeout_ms: int = 60000, method: str = "copy"):
        if method not in ("values", "copy"):
            raise ValueError("method must be 'values' or 'copy'")
        self.database_url = database_url
        self.table = table
        self.connect_timeout_s = connect_timeout_s
        self.statement_timeout_ms = statement_timeout_ms
        self.method = method
        self.conn = None
        self._pg = _psycopg2()
        sql = self._pg.sql
        self._t = sql.Identifier(table)
        self._upsert_values = self._upsert_sql(sql.SQL("VALUES %s"))
        self._upsert_copy = self._upsert_sql(
            sql.SQL("SELECT numero_dpe, date_reception_dpe, code_postal_ban, etiquette_dpe, departement, extra,"
                    " kafka_partition, kafka_offset FROM {}").format(sql.Identifier(f"_dpe_stage_{table}"))
        )

    # -- connection ------------------------------------------------------------------------
    def connect(self) -> None:
        """(Re)connect; raises :class:`DatabaseUnavailable` when the server cannot be reached."""
        self.close()
        pg = self._pg
        try:
            conn = pg.connect(
                self.database_url,
                connect_timeout=self.connect_timeout_s,
                application_name="dpe-ingest-consumer",
                keepalives=1,
                keepalives_idle=30,
                keepalives_interval=10,
                keepalives_count=3,
            )
            with conn.cursor() as cur:
                cur.execute("SET statement_timeout = %s", (self.statement_timeout_ms,))
                if self.method == "copy":
                    cur.execute(pg.sql.SQL(
                        "CREATE TEMP TABLE IF NOT EXISTS {} (numero_dpe text, date_reception_dpe date,"
                        " code_postal_ban text, etiquette_dpe text, departement text, extra jsonb,"
                        " kafka_partition integer, kafka_offset bigint) ON COMMIT DELETE ROWS"
                    ).format(pg.sql.Identifier(f"_dpe_stage_{self.table}")))
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
        return stmts

    def migrate(self) -> None:
        """Create the table if needed.  Safe when several consumers start at the same moment:
        the DDL runs under a transaction-scoped advisory lock keyed on the table name."""
        pg = self._pg
        conn = self._ensure()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_advisory_xact_lock(hashtext('dpe_ingest.migrate'), hashtext(%s))",
                            (self.table,))
                for stmt in self.migration_sql():
                    cur.execute(stmt)
            conn.commit()
        except (pg.OperationalError, pg.InterfaceError) as exc:
            self.close()
            raise DatabaseUnavailable(_one_line(exc)) from exc
        except Exception:
            conn.rollback()
            raise

    # -- batch upsert ----------------------------------------------------------------------
    def _upsert_sql(self, source):
        sql = self._pg.sql
        cols = ("numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe", "departement", "extra",
                "kafka_partition", "kafka_offset")
        data = ("date_reception_dpe", "code_postal_ban", "etiquette_dpe", "departement", "extra")
        return sql.SQL(
            "INSERT INTO {t} AS d ({cols}) {source} "
            "ON CONFLICT (numero_dpe) DO UPDATE SET {sets}, kafka_partition = EXCLUDED.kafka_partition,"
            " kafka_offset = EXCLUDED.kafka_offset, updated_at = now() "
            "WHERE ({old}) IS DISTINCT FROM ({new}) "
            "RETURNING (xmax = 0) AS inserted"
        ).format(
            t=self._t,
            cols=sql.SQL(", ").join(map(sql.Identifier, cols)),
            source=source,
            sets=sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(c)) for c in data),
            old=sql.SQL(", ").join(sql.SQL("d.{}").format(sql.Identifier(c)) for c in data),
            new=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in data),
        )

    @staticmethod
    def _values(row: Row) -> tuple:
        return (row.numero_dpe, row.date_reception_dpe, row.code_postal_ban, row.etiquette_dpe, row.departement,
                json.dumps(row.extra, ensure_ascii=False), row.partition, row.offset)

    _TEMPLATE = "(%s, %s::date, %s, %s, %s, %s::jsonb, %s::integer, %s::bigint)"

    def _execute_batch(self, cur, rows: Sequence[Row]) -> list[bool]:
        if self.method == "values":
            res = self._pg.extras.execute_values(
                cur, self._upsert_values, [self._values(r) for r in rows], template=self._TEMPLATE,
                page_size=max(1, len(rows)), fetch=True,
            )
            return [bool(r[0]) for r in res]
        # COPY into the session's temporary staging table (created at connect, emptied at each
        # commit), then one INSERT … SELECT … ON CONFLICT
        sql = self._pg.sql
        stage = sql.Identifier(f"_dpe_stage_{self.table}")
        import io

        buf = io.StringIO()
        for r in rows:
            buf.write("\t".join(_copy_field(v) for v in self._values(r)) + "\n")
        buf.seek(0)
        cur.copy_expert(sql.SQL("COPY {} FROM STDIN").format(stage), buf)
        cur.execute(self._upsert_copy)
        return [bool(r[0]) for r in cur.fetchall()]

    def write(self, rows: Sequence[Row], before_commit: Callable[[], None] | None = None) -> WriteResult:
        """Upsert a batch in one transaction.  ``rows`` may repeat a numero_dpe (the last one wins).

        Raises :class:`DatabaseUnavailable` on connection problems (nothing was committed, or the
        commit outcome is unknown: either way writing the same batch again is correct).  Rows the
        database refuses as data errors are isolated one by one and returned in ``refused``.
        """
        pg = self._pg
        started = time.monotonic()
        unique = dedupe(rows)  # the last message of a key wins: an upsert after a deletion, or the reverse
        result = WriteResult()
        if not unique:
            return result
        gone = [r.numero_dpe for r in unique if r.deleted]
        unique = [r for r in unique if not r.deleted]
        conn = self._ensure()
        try:
            with conn.cursor() as cur:
                flags: list[bool] = []
                if unique:
                    try:
                        flags = self._execute_batch(cur, unique)
                    except (pg.DataError, pg.IntegrityError) as exc:
                        # one bad row must not block the partition: find it, keep the others
                        conn.rollback()
                        flags = self._write_one_by_one(cur, unique, result, exc)
                if gone:
                    cur.execute(pg.sql.SQL("DELETE FROM {} WHERE numero_dpe = ANY(%s)").format(self._t), (gone,))
                    result.deleted = cur.rowcount
                if before_commit is not None:
                    before_commit()
            conn.commit()
        except (pg.OperationalError, pg.InterfaceError) as exc:
            self.close()
            raise DatabaseUnavailable(_one_line(exc)) from exc
        except BaseException:
            try:
                conn.rollback()
            except Exception:
                self.close()
            raise
        result.inserted = sum(1 for f in flags if f)
        result.updated = len(flags) - result.inserted
        result.unchanged = len(unique) - len(result.refused) - len(flags)
        result.seconds = time.monotonic() - started
        return result

    def _write_one_by_one(self, cur, rows: Sequence[Row], result: WriteResult, first_error) -> list[bool]:
        pg = self._pg
        flags: list[bool] = []
        for row in rows:
            cur.execute("SAVEPOINT dpe_row")
            try:
                flags.extend(self._execute_batch(cur, [row]))
                cur.execute("RELEASE SAVEPOINT dpe_row")
            except (pg.DataError, pg.IntegrityError) as exc:
                cur.execute("ROLLBACK TO SAVEPOINT dpe_row")
                result.refused.append((row, f"database refused the row: {_one_line(exc)}"))
        if not result.refused:
            # the batch failed but no single row does: not a data problem after all
            raise first_error
        return flags

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
    conn = pg.connect(database_url, connect_timeout=10)
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


def _copy_field(v: Any) -> str:
    if v is None:
        return "\\N"
    s = v.isoformat() if isinstance(v, dt.date) else str(v)
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
