"""PostgreSQL over TLS the way CloudNativePG serves it, and each refusal that is a setting named.

A real PostgreSQL with ``ssl=on`` and a certificate from a CA made here (naming ``localhost`` only).
"""

from __future__ import annotations

import pytest

from dpe_devkit.testbed import PostgresServer
from dpe_devkit.testbed.tls import TestCA
from dpe_ingest import pg_connection
from dpe_ingest.pg_connection import PgAccessError

pytestmark = pytest.mark.postgres

SECRET = "dpe"  # the testbed role's password: must never appear in a message


@pytest.fixture(scope="module")
def tls_pg(tmp_path_factory):
    ca = TestCA(tmp_path_factory.mktemp("pg-ca"))
    server = PostgresServer(tmp_path_factory.mktemp("pg-tls"), tls=ca.issue("postgres", hosts=("localhost",)))
    server.start(timeout=120)
    yield server, ca
    server.cleanup()


def url_of(server, host="localhost", password=SECRET, db="dpe") -> str:
    return f"postgresql://dpe:{password}@{host}:{server.port}/{db}"


def test_a_ca_alone_means_verify_full_and_the_connection_is_tls(tls_pg):
    server, ca = tls_pg
    env = {"PGSSLROOTCERT": str(ca.cert)}
    assert pg_connection.connect_options(url_of(server), env) == {"sslmode": "verify-full"}
    assert pg_connection.connect_options(url_of(server) + "?sslmode=require", env) == {}
    assert pg_connection.connect_options(url_of(server), {**env, "PGSSLMODE": "verify-ca"}) == {}
    conn = pg_connection.connect(url_of(server), env, sslrootcert=str(ca.cert), connect_timeout=5)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            assert cur.fetchone() == (True,)
    finally:
        conn.close()


@pytest.mark.parametrize("case, needle", [
    ("other CA", "PGSSLROOTCERT"),
    ("host not in the certificate", "does not name the host"),
    ("wrong password", "PGPASSWORD"),
    ("unknown database", "PGDATABASE"),
])
def test_refusals_that_are_settings_name_them_and_never_the_password(tls_pg, tmp_path, case, needle):
    server, ca = tls_pg
    root = ca.cert
    url = url_of(server)
    if case == "other CA":
        root = TestCA(tmp_path / "other", name="another CA").cert
    elif case == "host not in the certificate":
        url = url_of(server, host="127.0.0.1")
    elif case == "wrong password":
        url = url_of(server, password="not-the-password")
    elif case == "unknown database":
        url = url_of(server, db="nosuchdb")
    with pytest.raises(PgAccessError) as err:
        pg_connection.connect(url, {"PGSSLROOTCERT": str(root)}, sslrootcert=str(root), connect_timeout=5)
    msg = str(err.value)
    assert needle in msg, msg
    assert f":{SECRET}@" not in msg and "not-the-password" not in msg, msg


def test_an_outage_is_not_a_setting(tls_pg):
    import psycopg2

    server, ca = tls_pg
    with pytest.raises(psycopg2.OperationalError) as err:
        pg_connection.connect(f"postgresql://dpe:{SECRET}@127.0.0.1:1/dpe", {}, connect_timeout=2)
    assert not isinstance(err.value, PgAccessError)
