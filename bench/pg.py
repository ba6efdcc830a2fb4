"""PostgreSQL reads the benchmark's sections share."""

from __future__ import annotations


def db_count(database_url: str, table: str) -> int:
    """Rows in ``table`` (0 while it does not exist yet)."""
    import psycopg2

    try:
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT count(*) FROM {table}")
            return cur.fetchone()[0]
    except psycopg2.errors.UndefinedTable:
        return 0
