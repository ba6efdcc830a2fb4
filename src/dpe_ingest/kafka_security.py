"""How every Kafka client of the pipeline connects, and what a refused connection means.

``client_options(security)`` turns the environment contract's KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_* and
KAFKA_SSL_* settings (``config.KafkaSecurity``) into kafka-python's own options; every client the
package creates (producer, consumer, analytics, refresh, status, slots, admin) passes them, and a test
reads the source to check that none is built without.

kafka-python retries a refused connection until its timeout and says why only in its log: a wrong
password, a CA that did not sign the broker's certificate or a certificate that does not name the host
all end as "Unable to bootstrap".  Those are configuration errors, not outages: ``diagnose`` finds the
cause (a TLS handshake of its own with the same settings; the SASL failure kafka-python reported) and
``KafkaAccessError`` (a ``ConfigError``: exit 2) names the setting.  An authorization error (a missing
ACL) is the same kind of error: ``access_error`` names the operation and the resource to grant.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
from typing import Any, Callable, Iterator

from kafka import errors as Errors

from .config import ConfigError, KafkaSecurity

PLAINTEXT = KafkaSecurity()


class KafkaAccessError(ConfigError):
    """The brokers refused who we are or what we asked (credentials, certificates, ACLs): retrying
    cannot help; the message names the setting or the ACL."""


def client_options(security: KafkaSecurity | None) -> dict[str, Any]:
    """kafka-python options for ``security`` (PLAINTEXT when None); secrets only in the returned dict."""
    sec = security or PLAINTEXT
    opts: dict[str, Any] = {"security_protocol": sec.protocol}
    if sec.sasl:
        opts.update(sasl_mechanism=sec.sasl_mechanism, sasl_plain_username=sec.username,
                    sasl_plain_password=sec.password)
    if sec.tls:
        opts.update(ssl_check_hostname=sec.check_hostname, ssl_cafile=sec.ca_file,
                    ssl_certfile=sec.cert_file, ssl_keyfile=sec.key_file)
    return opts


# ---------------------------------------------------------------------------------------------
# why a connection was refused
# ---------------------------------------------------------------------------------------------
_AUTH_ERRORS = (Errors.SaslAuthenticationFailedError, Errors.UnsupportedSaslMechanismError,
                Errors.IllegalSaslStateError)


class _Recorder(logging.Handler):
    """Keeps the SASL errors kafka-python logs (it retries them and raises only a timeout)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        for arg in record.args if isinstance(record.args, tuple) else ():
            if isinstance(arg, _AUTH_ERRORS):
                self.seen.append(arg)
        if record.exc_info and isinstance(record.exc_info[1], _AUTH_ERRORS):
            self.seen.append(record.exc_info[1])


_level_lock = threading.Lock()
_recording = 0  # recorders installed now (the level of the "kafka" logger is restored by the last one)
_level_before = logging.NOTSET


@contextlib.contextmanager
def recording_auth_failures() -> Iterator[_Recorder]:
    """While inside, the SASL failures kafka-python logs are kept, in a recorder of this call's own
    (whatever KAFKA_CLIENT_LOG_LEVEL says: its loggers let ERROR through while any recorder listens)."""
    global _recording, _level_before
    logger = logging.getLogger("kafka")
    recorder = _Recorder()
    with _level_lock:
        if _recording == 0:
            _level_before = logger.level
            if _level_before == logging.NOTSET or _level_before > logging.ERROR:
                logger.setLevel(logging.ERROR)
        _recording += 1
        logger.addHandler(recorder)
    try:
        yield recorder
    finally:
        with _level_lock:
            logger.removeHandler(recorder)
            _recording -= 1
            if _recording == 0:
                logger.setLevel(_level_before)


def _hosts(bootstrap: str) -> list[tuple[str, int]]:
    out = []
    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        out.append((host.strip("[]"), int(port)))
    return out


def _tls_context(sec: KafkaSecurity) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=sec.ca_file)
    ctx.check_hostname = sec.check_hostname
    if sec.cert_file:
        ctx.load_cert_chain(sec.cert_file, sec.key_file)
    return ctx


def tls_problem(sec: KafkaSecurity, bootstrap: str, timeout_s: float = 5.0) -> str | None:
    """What is wrong with the TLS settings against the first bootstrap server that accepts a TCP
    connection; None when the handshake (and the broker's verdict on our certificate) went fine or
    when no server could be reached (an outage, not a setting)."""
    try:
        ctx = _tls_context(sec)
    except (ssl.SSLError, OSError) as exc:
        return (f"KAFKA_SSL_CA_FILE/KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE cannot be loaded as PEM "
                f"({exc.__class__.__name__}: {exc})")
    for host, port in _hosts(bootstrap):
        try:
            raw = socket.create_connection((host, port), timeout=timeout_s)
        except OSError:
            continue
        where = f"{host}:{port}"
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                tls.settimeout(1.0)
                try:  # TLS 1.3: the broker's verdict on our certificate comes after the handshake
                    tls.recv(1)
                except (socket.timeout, TimeoutError):
                    pass
                except ssl.SSLError as exc:
                    return (f"the broker at {where} refused our client certificate (KAFKA_SSL_CERT_FILE="
                            f"{sec.cert_file or 'unset'}): {exc.reason or exc}")
            return None
        except ssl.SSLCertVerificationError as exc:
            if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
                return (f"the certificate of the broker at {where} does not name {host!r} "
                        f"(KAFKA_SSL_CHECK_HOSTNAME=true): {exc.verify_message}; connect by a name the "
                        "certificate lists")
            ca = f"KAFKA_SSL_CA_FILE={sec.ca_file}" if sec.ca_file else "the system's CAs (KAFKA_SSL_CA_FILE unset)"
            return (f"the certificate of the broker at {where} is not signed by {ca}: {exc.verify_message}")
        except ssl.SSLError as exc:
            if sec.cert_file or "certificate" in str(exc).lower():
                return (f"the broker at {where} refused the TLS handshake ({exc.reason or exc}): check "
                        f"KAFKA_SSL_CERT_FILE/KAFKA_SSL_KEY_FILE and KAFKA_SECURITY_PROTOCOL={sec.protocol}")
            return (f"no TLS at {where} ({exc.reason or exc}): is KAFKA_SECURITY_PROTOCOL={sec.protocol} the "
                    "protocol of that listener?")
        except OSError:
            continue
    return None


def sasl_problem(sec: KafkaSecurity, seen: list[BaseException]) -> str | None:
    for exc in seen:
        if isinstance(exc, Errors.UnsupportedSaslMechanismError):
            return f"the brokers do not offer KAFKA_SASL_MECHANISM={sec.sasl_mechanism}: {exc}"
        return (f"the brokers refused the SASL credentials of KAFKA_SASL_USERNAME={sec.username} "
                f"({sec.sasl_mechanism}; check KAFKA_SASL_PASSWORD): {exc}")
    return None


def diagnose(sec: KafkaSecurity | None, bootstrap: str, seen: list[BaseException] = ()) -> KafkaAccessError | None:
    """The configuration error behind a failed bootstrap, or None (then it is an outage: wait)."""
    sec = sec or PLAINTEXT
    why = (tls_problem(sec, bootstrap) if sec.tls else None) or (sasl_problem(sec, list(seen)) if sec.sasl else None)
    return KafkaAccessError(f"Kafka at {bootstrap} ({sec.protocol}): {why}") if why else None


def _principal(sec: KafkaSecurity | None) -> str:
    """Who the brokers see, as ACLs name it (a SASL user; else the certificate's or the anonymous one)."""
    return f"User:{sec.username}" if sec is not None and sec.username else "our principal"


#: what each ACL-refusal error of kafka-python means, for the message
_RESOURCE = ((Errors.TopicAuthorizationFailedError, "TOPIC"), (Errors.GroupAuthorizationFailedError, "GROUP"),
             (Errors.ClusterAuthorizationFailedError, "CLUSTER"),
             (Errors.TransactionalIdAuthorizationFailedError, "TRANSACTIONAL_ID"))


def access_error(exc: BaseException, sec: KafkaSecurity | None, operation: str, resource: str) -> KafkaAccessError | None:
    """A ``KafkaAccessError`` naming the ACL to grant when ``exc`` is an authorization refusal, else None.

    ``operation`` and ``resource`` say what we were doing (``WRITE``, ``topic dpe-lines-dlq``)."""
    if not isinstance(exc, Errors.AuthorizationError):
        return None
    kind = next((name for cls, name in _RESOURCE if isinstance(exc, cls)), "resource")
    return KafkaAccessError(f"Kafka refused {operation} on {resource} to {_principal(sec)} ({exc.__class__.__name__}, "
                            f"{kind}): grant that ACL (docs/chart.md lists every ACL the pipeline needs)")


def check_topic_access(admin: Any, sec: KafkaSecurity | None, needs: dict[str, tuple[str, ...]]) -> None:
    """Before anything is written: every topic of ``needs`` grants us its operations (``WRITE``,
    ``READ`` …), as the brokers report them (DescribeTopics' authorized operations); raises
    ``KafkaAccessError`` listing every missing ACL.  A broker without an authorizer reports nothing to
    check: nothing is refused then."""
    missing: list[str] = []
    for doc in admin.describe_topics(list(needs)):
        name = doc.get("topic") or doc.get("name")
        if name not in needs:
            continue
        if doc.get("error_code") == Errors.TopicAuthorizationFailedError.errno:
            missing += [f"{op} on topic {name}" for op in ("DESCRIBE", *needs[name])]
            continue
        allowed = doc.get("authorized_operations")
        if not allowed:
            continue
        if "ALL" in allowed:
            continue
        missing += [f"{op} on topic {name}" for op in needs[name] if op not in allowed]
    if missing:
        raise KafkaAccessError(f"Kafka does not grant {_principal(sec)}: {'; '.join(missing)} (add those ACLs; docs/chart.md "
                               "lists every ACL the pipeline needs)")


def connecting(sec: KafkaSecurity | None, bootstrap: str, connect: Callable[[], Any]) -> Any:
    """``connect()`` (a kafka-python client's constructor, which bootstraps); when it fails and the cause
    is a setting (``diagnose``), ``KafkaAccessError`` instead of kafka-python's timeout."""
    with recording_auth_failures() as recorder:
        try:
            return connect()
        except (Errors.KafkaError, OSError) as exc:
            seen = list(recorder.seen)
            failure = exc
    refused = diagnose(sec, bootstrap, seen) if sec is not None and sec.protocol != "PLAINTEXT" else None
    if refused is not None:
        raise refused from failure
    raise failure
