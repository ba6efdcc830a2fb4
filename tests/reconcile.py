"""Row-level reconciliation: the one check of every end-to-end test.

The expected table is written here from what a row IS, never read from the code under test: the
producer sends the base fields (and ADEME_EXTRA_FIELDS) of each API row plus ``departement``, with
``date_reception_dpe`` cut to its date; the sink stores ``numero_dpe``, the date, the postal code, the
label and the department in their columns and every other field of the message in ``extra``.  The
stand-in's dataset is deterministic (seeded), so the exact rows of each department are known without
asking the pipeline anything: :func:`expected_rows` builds them, :func:`assert_rows` compares them with
the table on every stored column and names the first rows that differ.

The analytics consumer's tables are checked against counts taken from the same expected rows
(:func:`expected_counts`, :func:`assert_counts`), not against the sink's table.

Where the table is read: :func:`read_table` (psycopg2) or, for a database inside a cluster, the
output of :func:`rows_sql` / :func:`counts_sql` run by ``psql -At`` and parsed by :func:`parse_rows` /
:func:`parse_counts`.  ``python tests/reconcile.py`` (``PYTHONPATH=src``) checks such a psql output
against the stand-in's dataset: the kind workflow uses it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Iterable

#: the columns filled from a message (written out here: the expectation, not the sink's constant)
BASE_FIELDS = ("numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe")
COLUMNS = BASE_FIELDS + ("departement", "extra")
LABELS = tuple("ABCDEFG")
SHOWN = 5  # differing rows printed on failure


# ---------------------------------------------------------------------------------------------
# what the table must hold
# ---------------------------------------------------------------------------------------------
def stored_row(msg: dict) -> dict:
    """The row the sink keeps for the message ``msg`` (a dict as sent on the topic)."""
    date = msg.get("date_reception_dpe")
    return {"numero_dpe": msg["numero_dpe"], "date_reception_dpe": date[:10] if date else None,
            "code_postal_ban": msg.get("code_postal_ban"), "etiquette_dpe": msg.get("etiquette_dpe"),
            "departement": msg.get("departement"),
            "extra": {k: v for k, v in msg.items() if k not in BASE_FIELDS and k != "departement"}}


def message_of(row: dict, department: str, extra_fields: Iterable[str] = ()) -> dict:
    """The message a producer of ``department`` sends for the API row ``row``."""
    fields = BASE_FIELDS + tuple(f for f in extra_fields if f not in BASE_FIELDS)
    msg = {f: row.get(f) for f in fields}
    if isinstance(msg["date_reception_dpe"], str):
        msg["date_reception_dpe"] = msg["date_reception_dpe"][:10]
    msg["departement"] = None if department == "none" else department
    return msg


def expected_rows(ds, departments: Iterable[str], extra_fields: Iterable[str] = ()) -> dict[str, dict]:
    """numero_dpe -> stored row, for every row the stand-in's dataset ``ds`` serves now in
    ``departments`` (malformed rows excluded: they become dead letters)."""
    extra_fields = tuple(extra_fields)
    out: dict[str, dict] = {}
    for dep in departments:
        for i in ds.live_indices(dep):
            if ds.is_malformed(dep, i):
                continue
            row = stored_row(message_of(ds.row(dep, i), dep, extra_fields))
            assert row["numero_dpe"] not in out, f"the dataset serves {row['numero_dpe']} twice"
            out[row["numero_dpe"]] = row
    return out


def expected_counts(rows: dict[str, dict]) -> dict[str, dict[str, dict[str, int]]]:
    """{"labels": {dep: {label: n}}, "months": {dep: {YYYY-MM: n}}} of ``rows`` in the analytics'
    vocabulary (department ``none`` for NULL, label ``unknown`` outside A..G, month ``unknown``)."""
    labels: dict[str, dict[str, int]] = {}
    months: dict[str, dict[str, int]] = {}
    for r in rows.values():
        dep = r["departement"] or "none"
        label = r["etiquette_dpe"] if r["etiquette_dpe"] in LABELS else "unknown"
        month = r["date_reception_dpe"][:7] if r["date_reception_dpe"] else "unknown"
        labels.setdefault(dep, {})[label] = labels.get(dep, {}).get(label, 0) + 1
        months.setdefault(dep, {})[month] = months.get(dep, {}).get(month, 0) + 1
    return {"labels": labels, "months": months}


# ---------------------------------------------------------------------------------------------
# what the table holds
# ---------------------------------------------------------------------------------------------
def rows_sql(table: str, columns: Iterable[str] = COLUMNS) -> str:
    """One JSON object per row (``psql -At`` prints one per line)."""
    cols = ", ".join(f'"{c}"' for c in columns)
    return f'SELECT row_to_json(t)::text FROM (SELECT {cols} FROM "{table}") t'


def parse_rows(lines: Iterable[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for line in lines:
        if line.strip():
            row = json.loads(line)
            assert row["numero_dpe"] not in out, f"numero_dpe {row['numero_dpe']} twice in the table"
            out[row["numero_dpe"]] = row
    return out


def read_table(database_url: str, table: str, columns: Iterable[str] = COLUMNS) -> dict[str, dict]:
    import psycopg2

    conn = psycopg2.connect(database_url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(rows_sql(table, columns))
            return parse_rows(r[0] for r in cur.fetchall())
    finally:
        conn.close()


def counts_sql(prefix: str) -> str:
    """The analytics tables ``<prefix>_labels`` and ``<prefix>_months``, one ``kind|dep|key|n`` per line."""
    return (f"SELECT 'labels', departement, label, n FROM \"{prefix}_labels\" WHERE n <> 0 UNION ALL "
            f"SELECT 'months', departement, month, n FROM \"{prefix}_months\" WHERE n <> 0")


def parse_counts(lines: Iterable[str]) -> dict[str, dict[str, dict[str, int]]]:
    out: dict[str, dict[str, dict[str, int]]] = {"labels": {}, "months": {}}
    for line in lines:
        if line.strip():
            kind, dep, key, n = line.strip().split("|")
            out[kind].setdefault(dep, {})[key] = int(n)
    return out


def read_counts(database_url: str, prefix: str) -> dict[str, dict[str, dict[str, int]]]:
    import psycopg2

    conn = psycopg2.connect(database_url, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute(counts_sql(prefix))
            return parse_counts("|".join(str(v) for v in r) for r in cur.fetchall())
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------
def differences(want: dict[str, dict], got: dict[str, dict], shown: int = SHOWN) -> list[str]:
    """Sentences naming what differs (empty when the table is exactly ``want``): per department the
    rows missing, unexpected and different, then the first ``shown`` of each with their columns."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    changed = sorted(k for k in set(want) & set(got) if want[k] != {c: got[k].get(c) for c in want[k]})
    if not (missing or extra or changed):
        return []
    per_dep: dict[str, list[int]] = {}
    for keys, slot, rows in ((missing, 0, want), (extra, 1, got), (changed, 2, want)):
        for k in keys:
            per_dep.setdefault(str(rows[k].get("departement")), [0, 0, 0])[slot] += 1
    out = [f"department {d}: {m} missing, {x} unexpected, {c} different"
           for d, (m, x, c) in sorted(per_dep.items())]
    out += [f"missing: {k} {want[k]}" for k in missing[:shown]]
    out += [f"unexpected: {k} {got[k]}" for k in extra[:shown]]
    for k in changed[:shown]:
        cols = [f"{c} {got[k].get(c)!r} in the table, {want[k][c]!r} expected" for c in want[k]
                if got[k].get(c) != want[k][c]]
        out.append(f"different: {k} (department {want[k].get('departement')}): " + "; ".join(cols))
    return out


def assert_rows(want: dict[str, dict], got: dict[str, dict], what: str = "the table") -> None:
    diff = differences(want, got)
    assert not diff, f"{what} does not reconcile with the expected rows ({len(got)} rows, {len(want)} " \
                     "expected):\n  " + "\n  ".join(diff)


def assert_counts(want: dict, got: dict, what: str = "the analytics tables") -> None:
    bad = []
    for kind in ("labels", "months"):
        for dep in sorted(set(want[kind]) | set(got.get(kind, {}))):
            w, g = want[kind].get(dep, {}), got.get(kind, {}).get(dep, {})
            for key in sorted(set(w) | set(g)):
                if w.get(key, 0) != g.get(key, 0):
                    bad.append(f"{kind} of department {dep}, {key}: {g.get(key, 0)} counted, {w.get(key, 0)} expected")
    assert not bad, f"{what} differ from the counts of the expected rows:\n  " + "\n  ".join(bad[:20])


# ---------------------------------------------------------------------------------------------
# the kind workflow: psql output against the stand-in's dataset
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tests/reconcile.py", description="Reconcile the rows printed by psql -At "
                                f"with the query of rows_sql() against the stand-in's dataset. {__doc__.splitlines()[0]}")
    p.add_argument("departments", nargs="*")
    p.add_argument("--rows", default="-", help="file of psql -At output, one JSON row per line (default stdin)")
    p.add_argument("--rows-per-department", type=int, default=1000, help="the stand-in's (default 1000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--extra-fields", default="", help="ADEME_EXTRA_FIELDS, comma-separated")
    p.add_argument("--sql", action="store_true", help="print the query for table dpe_data and exit")
    args = p.parse_args(argv)
    if args.sql:
        print(rows_sql("dpe_data"))
        return 0
    if not args.departments:
        p.error("no department given")
    from dpe_ingest.standin.data import Dataset

    ds = Dataset(rows_per_department=args.rows_per_department, seed=args.seed)
    want = expected_rows(ds, args.departments, [f for f in args.extra_fields.split(",") if f])
    fh = sys.stdin if args.rows == "-" else open(args.rows, encoding="utf-8")
    with fh:
        got = parse_rows(fh)
    diff = differences(want, got)
    if diff:
        print(f"the table does not reconcile ({len(got)} rows, {len(want)} expected):", *diff, sep="\n  ",
              file=sys.stderr)
        return 1
    print(f"{len(got)} rows of {', '.join(args.departments)} reconcile with the stand-in's dataset, every column")
    return 0


if __name__ == "__main__":
    sys.exit(main())
