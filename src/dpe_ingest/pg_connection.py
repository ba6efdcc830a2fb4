"""How the pipeline connects to PostgreSQL, and which refusals are settings rather than outages.

The connection is libpq's: ``DATABASE_URL`` plus libpq's own environment (``PGHOST``, ``PGPORT``,
``PGUSER``, ``PGDATABASE``, ``PGPASSWORD``, ``PGSSLMODE``, ``PGSSLROOTCERT``, ``PGSSLCERT``,
``PGSSLKEY``), which is how the chart passes an operator's Secret keys (CloudNativePG's
``<cluster>-app``: username, password, host, port, dbname) and CA (``<cluster>-ca``: ``ca.crt``)
without rewriting them.  One rule of ours on top: a CA given (``PGSSLROOTCERT``) with no sslmode
anywhere means ``verify-full`` — libpq's own default (``prefer``) would encrypt and never check
who answers.

A wrong password, a CA that did not sign the server's certificate, a server certificate for another
host, an unknown role or database: waiting does not change them.  ``access_error`` turns them into
``PgAccessError`` (a ``ConfigError``: exit 2) naming the setting; anything else (a refused or
reset connection, a server starting up) stays an outage the caller waits out.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

from .config import ConfigError


class PgAccessError(ConfigError):
    """PostgreSQL refused who we are or how we connect; the message names the setting."""


def _url_has(url: str, key: str) -> bool:
    return re.search(rf"(^|[?&\s]){key}=", url) is not None


def connect_options(url: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keyword arguments for ``psycopg2.connect(url, **…)`` on top of what libpq reads itself."""
    env = os.environ if env is None else env
    opts: dict[str, Any] = {}
    if env.get("PGSSLROOTCERT") and not env.get("PGSSLMODE") and not _url_has(url, "sslmode"):
        opts["sslmode"] = "verify-full"
    return opts


def safe_url(url: str) -> str:
    """The URL (or keyword DSN) without its password: the one place logs, messages and ``status`` get it."""
    return re.sub(r"(//[^:/@]+:)[^@]*@", r"\1***@", re.sub(r"(password=)\S+", r"\1***", url))


#: libpq's wording of each refusal that is a setting -> what to say (the server's text follows)
_REFUSALS: tuple[tuple[str, str], ...] = (
    ("password authentication failed", "PostgreSQL refused the password (PGPASSWORD, or the password in "
                                       "DATABASE_URL; chart: the Secret's password key)"),
    ("certificate verify failed", "the server's certificate is not signed by the CA we trust (PGSSLROOTCERT)"),
    ("does not match host name", "the server's certificate does not name the host we connect to "
                                 "(DATABASE_URL/PGHOST; sslmode verify-full checks it)"),
    ("server does not support SSL", "the server has no TLS but PGSSLMODE/sslmode requires it"),
    ("root certificate file", "the CA file cannot be read (PGSSLROOTCERT)"),
    ("no pg_hba.conf entry", "the server's pg_hba.conf has no entry for this user, database and TLS mode "
                             "(PGSSLMODE/sslmode, the user)"),
    ("role \"", "PostgreSQL has no such role (PGUSER, or the user in DATABASE_URL)"),
    ("database \"", "PostgreSQL has no such database (PGDATABASE, or the database in DATABASE_URL)"),
    ("could not load private key", "the client key cannot be used (PGSSLKEY)"),
    ("certificate present, but not private key", "the client certificate has no key (PGSSLKEY)"),
)


def access_error(exc: BaseException, url: str = "") -> PgAccessError | None:
    """A ``PgAccessError`` when ``exc`` (psycopg2's ``OperationalError`` at connect) is a setting."""
    text = str(exc).strip()
    low = text.lower()
    for needle, meaning in _REFUSALS:
        if needle.lower() in low and (needle not in ("role \"", "database \"") or "does not exist" in low):
            where = f" at {safe_url(url)}" if url else ""
            return PgAccessError(f"{meaning}{where}: {text.splitlines()[0] if text else type(exc).__name__}")
    return None


def connect(url: str, env: Mapping[str, str] | None = None, **kwargs: Any):
    """``psycopg2.connect`` with our TLS rule; a refusal that is a setting raises ``PgAccessError``."""
    import psycopg2

    try:
        return psycopg2.connect(url, **connect_options(url, env), **kwargs)
    except psycopg2.OperationalError as exc:
        refused = access_error(exc, url)
        if refused is not None:
            raise refused from exc
        raise
