"""The environment contract: every setting of the producer, the consumer and the tools.

This module is the single source of truth.  The Helm chart, the scripts, the bench and the tests set
exactly these variables; ``docs/configuration.md`` documents them (and a test checks that the two
agree).  Each entry: variable name, default, meaning.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Mapping

from . import departments


class ConfigError(ValueError):
    """A setting with a bad value; the message names the variable and what it accepts."""


# ---------------------------------------------------------------------------------------------
# The contract.  name -> (default, description).  Defaults of None mean "required" or "unset".
# ---------------------------------------------------------------------------------------------
DEFAULT_API_URL = "https://data.ademe.fr/data-fair/api/v1/datasets/dpe03existant"

CONTRACT: dict[str, tuple[str | None, str]] = {
    # shared
    "KAFKA_BOOTSTRAP_SERVERS": ("localhost:9092", "Kafka bootstrap servers, comma-separated host:port"),
    "KAFKA_TOPIC": ("dpe-lines", "Topic the producers write DPE rows to and the consumer reads"),
    "KAFKA_DLQ_TOPIC": ("dpe-lines-dlq", "Dead-letter topic: rows/messages refused, with the reason"),
    "KAFKA_TOPIC_PARTITIONS": ("6", "Partitions of the topic when the producer creates it"),
    "KAFKA_REPLICATION_FACTOR": ("1", "Replication factor of the topics the producer creates"),
    "KAFKA_MIN_INSYNC_REPLICAS": ("0", "min.insync.replicas of the topics it creates (0 = the broker's default; 2 with a replication factor of 3)"),
    "KAFKA_CREATE_TOPICS": ("true", "true: create missing topics; false: topics are managed elsewhere (Strimzi KafkaTopic, Terraform) and a missing one is an error naming it"),
    # how every Kafka client connects (producer, consumer, analytics, refresh, status, slots, admin)
    "KAFKA_SECURITY_PROTOCOL": ("PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL (the listener of the brokers we connect to)"),
    "KAFKA_SASL_MECHANISM": ("SCRAM-SHA-512", "SASL mechanism with SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512"),
    "KAFKA_SASL_USERNAME": (None, "SASL user (with SASL_PLAINTEXT / SASL_SSL)"),
    "KAFKA_SASL_PASSWORD": (None, "SASL password (with SASL_*; from a Secret); never logged"),
    "KAFKA_SSL_CA_FILE": (None, "PEM file of the CA(s) that signed the brokers' certificates (SSL / SASL_SSL); unset = the system's CAs"),
    "KAFKA_SSL_CERT_FILE": (None, "PEM client certificate for mutual TLS (with KAFKA_SSL_KEY_FILE)"),
    "KAFKA_SSL_KEY_FILE": (None, "PEM private key of the client certificate; never logged"),
    "KAFKA_SSL_CHECK_HOSTNAME": ("true", "Check that the broker's certificate names the host we connect to (false only for tests)"),
    "LOG_FORMAT": ("logfmt", "logfmt (one key=value line per event) or json"),
    "LOG_LEVEL": ("INFO", "DEBUG, INFO, WARNING, ERROR"),
    "KAFKA_CLIENT_LOG_LEVEL": ("WARNING", "Log level of the kafka-python library itself (its connection errors: "
                               "one line per kind of message every 30 s, event=kafka_client)"),
    # producer
    "DEPARTMENT": (None, "Department code of this producer: 01..19, 2A, 2B, 21..95, 971..978, 988, or none (the rows without a department)"),
    "ADEME_API_URL": (DEFAULT_API_URL, "Dataset URL of the ADEME data-fair API (…/datasets/dpe03existant)"),
    "ADEME_PAGE_SIZE": ("500", "Rows per API call (1..10000)"),
    "ADEME_DATE_FROM": (None, "Optional first date_reception_dpe (YYYY-MM-DD), inclusive"),
    "ADEME_DATE_TO": (None, "Optional last date_reception_dpe (YYYY-MM-DD), inclusive"),
    "ADEME_EXTRA_FIELDS": ("", "Extra dataset fields to select, comma-separated"),
    "ADEME_MAX_RPS": ("0", "Cap on API requests per second (0 = no cap)"),
    "ADEME_BUDGET_FILE": (None, "JSON file {maxTotalRps, departments} (the chart's ConfigMap), re-read: this producer's share of the shared request budget"),
    "ADEME_API_KEY": (None, "Optional data-fair API key, sent as the x-apiKey header (higher rate tier); never logged"),
    "ADEME_RATE_WINDOW_S": ("60", "data-fair's rate-limit window (requests and compute are budgeted per window)"),
    "ADEME_BANDWIDTH_BYTES_S": ("500000", "data-fair's bandwidth per client (anonymous 500000, an API key 1000000): the producers of a release pace their page bytes to their share of it; it scales each page's read timeout (0 = not paced)"),
    "ADEME_COMPUTE_MS": ("20000", "data-fair's compute budget per window per client, in ms (anonymous 20000, an API key 60000): paced by share with the cost estimate below; a compute lock-out is waited out for what it costs (0 = unknown: a lock-out waits one window)"),
    "ADEME_COST_BASE_MS": ("20", "Estimated compute data-fair bills per search request, in ms (plus ADEME_COST_PER_ROW_MS per row asked for)"),
    "ADEME_COST_PER_ROW_MS": ("0.1", "Estimated compute data-fair bills per row of the page size asked for, in ms"),
    "ADEME_TIMEOUT_S": ("30", "Per-request timeout in seconds (connect and read)"),
    "ADEME_MAX_RETRIES": ("8", "Retries of one API call (5xx, timeouts, cut bodies) before giving up; a 429 is waited out, never counted"),
    "ADEME_RETRY_MAX_S": ("300", "Upper bound of the total time spent waiting in retries of one call"),
    "KAFKA_WAIT_S": ("180", "How long the producer waits for Kafka to answer at start before giving up (exit 1)"),
    "PRODUCER_CHECKPOINT_TOPIC": ("dpe-producer-checkpoints", "Compacted topic holding each department's resume point"),
    "PRODUCER_RESTART": ("false", "true: ignore the checkpoint and fetch the department again from the start"),
    "PRODUCER_MAX_CONCURRENT": ("0", "At most this many producers page the API at once, slots in Kafka (0 = no limit)"),
    "PRODUCER_BUDGET_PARTITIONS": ("120", "The API budget is shared through a Kafka consumer group on the topic <PRODUCER_CHECKPOINT_TOPIC>-budget-<n> of this many partitions: a producer's share is its partitions / n, handed over when producers finish or start (0 = static share from ADEME_BUDGET_FILE)"),
    "REFRESH_WAIT_S": ("900", "produce --refresh: how long to wait for the consumer to store what is in the topic before comparing keys"),
    # consumer
    "DATABASE_URL": ("postgresql://dpe@localhost:5432/dpe", "libpq URL of PostgreSQL; PGPASSWORD etc. also apply"),
    "DB_TABLE": ("dpe_data", "Table the consumer writes: a lower-case identifier (a-z, 0-9, _), at most 47 characters"),
    "CONSUMER_GROUP": ("dpe-sink", "Kafka consumer group of the PostgreSQL sink"),
    "BATCH_SIZE": ("100", "Rows per database transaction"),
    "BATCH_IDLE_MS": ("1000", "A partial batch is written after this long without new messages"),
    "RETRY_MAX_BACKOFF_S": ("30", "Cap of the backoff while the database or the broker is down"),
    "LIVENESS_STALL_S": ("60", "consume/analytics: /livez (on METRICS_PORT) answers 503 once the poll loop has not turned for this many seconds"),
    "BATCH_COMMIT_TIMEOUT_S": ("300", "consume/analytics: /livez answers 503 once the batch being written has not committed for this many seconds (a wedged connection, or a database outage that long)"),
    # analytics consumer (dpe-ingest analytics) and metrics
    "ANALYTICS_GROUP": ("dpe-analytics", "Kafka consumer group of the analytics consumer (independent of the sink's)"),
    "ANALYTICS_TABLE_PREFIX": ("dpe_analytics", "Prefix of the analytics tables (per-key state, counts and offsets, written in one transaction): a lower-case identifier, at most 49 characters"),
    "ANALYTICS_ALERT_SHARE": ("0.3", "Alert summaries warn when a department's F+G share exceeds this (0..1)"),
    "ANALYTICS_ALERT_INTERVAL_S": ("60", "At most one alert summary line per department per this many seconds"),
    "METRICS_PORT": ("0", "Port of the Prometheus /metrics endpoint of consume and analytics, and of their probes /livez and /readyz (0 = none)"),
    "METRICS_PUSHGATEWAY_URL": (None, "Optional Prometheus Pushgateway URL: the producer pushes its summary there when it exits"),
    "METRICS_PUSHGATEWAY_GROUPING": (None, "Labels of the producer's Pushgateway group besides job and department, name=value,... (the chart sets namespace and release: releases sharing a Pushgateway keep a group each)"),
}


def _get(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return CONTRACT[name][0]
    return value.strip()


#: a whole number as people write it: ASCII digits, an optional sign (int() also reads "1_000" and other
#: scripts' digits, and raises a ValueError of its own beyond 4300 digits)
_WHOLE = re.compile(r"[+-]?[0-9]+", re.ASCII)
#: a decimal number in ASCII (float() also reads other scripts' digits, "1_0", "nan" and "infinity")
_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)
#: the longest wait any setting may ask for (a week): time.sleep and Event.wait overflow far beyond
MAX_WAIT_S = 7 * 24 * 3600.0


def _shown(raw: str | None) -> str:
    """The value in an error message, cut short when it is long."""
    return repr(raw) if raw is None or len(raw) <= 80 else repr(raw[:80]) + f"… ({len(raw)} characters)"


def _int(env: Mapping[str, str], name: str, lo: int, hi: int | None = None) -> int:
    raw = _get(env, name)
    if raw is None or not _WHOLE.fullmatch(raw):
        raise ConfigError(f"{name}={_shown(raw)} is not a whole number")
    bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
    if len(raw.lstrip("+-").lstrip("0")) > 18:
        raise ConfigError(f"{name}={_shown(raw)} is out of range ({bound})")
    value = int(raw)
    if value < lo or (hi is not None and value > hi):
        raise ConfigError(f"{name}={value} is out of range ({bound})")
    return value


def _float(env: Mapping[str, str], name: str, lo: float, hi: float = MAX_WAIT_S) -> float:
    """A finite decimal within lo..hi (``nan`` passed every range check, ``inf`` waited forever)."""
    raw = _get(env, name)
    if raw is None or not _DECIMAL.fullmatch(raw):
        raise ConfigError(f"{name}={_shown(raw)} is not a finite number")
    value = float(raw)
    if not lo <= value <= hi:
        raise ConfigError(f"{name}={_shown(raw)} is out of range ({lo:g}..{hi:g})")
    return value


def _rate(env: Mapping[str, str], name: str) -> float:
    """Requests per second, 0 = no cap; a positive rate waits 1/rate between requests, at most a week."""
    value = _float(env, name, 0.0, 10000.0)
    if 0.0 < value < 1.0 / MAX_WAIT_S:
        raise ConfigError(f"{name}={value:g} is out of range (0, or {1.0 / MAX_WAIT_S:.3g}..10000: one request a "
                          "week at the least)")
    return value


#: PostgreSQL's longest identifier (NAMEDATALEN - 1 bytes): a longer name is silently truncated
PG_IDENTIFIER_MAX = 63
#: what the sink appends to DB_TABLE (its index), and analytics to ANALYTICS_TABLE_PREFIX (tables, index)
DB_TABLE_SUFFIXES = ("_departement_idx",)
ANALYTICS_TABLE_SUFFIXES = ("_keys", "_labels", "_months", "_skipped", "_offsets", "_keys_dep_date")
_PG_NAME = re.compile(r"[a-z_][a-z0-9_]*", re.ASCII)


def _pg_name(env: Mapping[str, str], name: str, suffixes: tuple[str, ...]) -> str:
    """A lower-case SQL identifier that stays whole with every suffix the code appends.

    Only those: the code quotes the names it creates (``"DpeData"``) but looks them up with
    ``to_regclass(text)``, which folds to lower case; a mixed-case name would be created and never
    found again (a refresh would then delete nothing)."""
    raw = str(_get(env, name))
    longest = PG_IDENTIFIER_MAX - max(len(s) for s in suffixes)
    if not _PG_NAME.fullmatch(raw) or len(raw) > longest:
        raise ConfigError(f"{name}={_shown(raw)}: a lower-case identifier is expected (a-z, 0-9 and _, not "
                          f"starting with a digit), at most {longest} characters (PostgreSQL's {PG_IDENTIFIER_MAX} "
                          f"with {max(suffixes, key=len)})")
    return raw


_TOPIC = re.compile(r"[A-Za-z0-9._-]{1,249}", re.ASCII)


def _topic(env: Mapping[str, str], name: str) -> str:
    """A Kafka topic name: ASCII letters, digits, '.', '_' and '-', at most 249 (Kafka's own rule)."""
    raw = str(_get(env, name))
    if not _TOPIC.fullmatch(raw) or raw in (".", ".."):
        raise ConfigError(f"{name}={_shown(raw)} is not a Kafka topic name (ASCII letters, digits, '.', '_' "
                          "and '-', at most 249)")
    return raw


def _bool(env: Mapping[str, str], name: str) -> bool:
    raw = str(_get(env, name)).lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean (true/false)")


def _date(env: Mapping[str, str], name: str) -> str | None:
    import datetime as _dt

    raw = _get(env, name)
    if raw is None:
        return None
    try:
        return _dt.date.fromisoformat(raw).isoformat()
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a date (YYYY-MM-DD)") from None


def _list(env: Mapping[str, str], name: str) -> list[str]:
    raw = _get(env, name) or ""
    return [p.strip() for p in raw.split(",") if p.strip()]


def http_url(url: str) -> bool:
    """An http(s) URL with a host, that urllib (and so requests) can split."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number or beyond 65535
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and bool(parts.hostname) and url.isprintable()
            and not any(c.isspace() for c in url))


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class KafkaSecurity:
    """How the Kafka clients authenticate and check the brokers (KAFKA_SECURITY_PROTOCOL …).

    The password and the key never appear in a repr (logs, tracebacks, ``status``)."""

    protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = field(default=None, repr=False)
    check_hostname: bool = True

    @property
    def tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.protocol.startswith("SASL_")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "KafkaSecurity":
        env = os.environ if env is None else env
        protocol = str(_get(env, "KAFKA_SECURITY_PROTOCOL")).upper()
        if protocol not in SECURITY_PROTOCOLS:
            raise ConfigError(f"KAFKA_SECURITY_PROTOCOL={_shown(protocol)} is not one of {', '.join(SECURITY_PROTOCOLS)}")
        mechanism = str(_get(env, "KAFKA_SASL_MECHANISM")).upper()
        if mechanism not in SASL_MECHANISMS:
            raise ConfigError(f"KAFKA_SASL_MECHANISM={_shown(mechanism)} is not one of {', '.join(SASL_MECHANISMS)}")
        username, password = _get(env, "KAFKA_SASL_USERNAME"), env.get("KAFKA_SASL_PASSWORD") or None
        files = {name: _get(env, name) for name in ("KAFKA_SSL_CA_FILE", "KAFKA_SSL_CERT_FILE", "KAFKA_SSL_KEY_FILE")}
        sec = cls(protocol=protocol, sasl_mechanism=mechanism, username=username, password=password,
                  ca_file=files["KAFKA_SSL_CA_FILE"], cert_file=files["KAFKA_SSL_CERT_FILE"],
                  key_file=files["KAFKA_SSL_KEY_FILE"], check_hostname=_bool(env, "KAFKA_SSL_CHECK_HOSTNAME"))
        if sec.sasl and not (username and password):
            missing = " and ".join(n for n, v in (("KAFKA_SASL_USERNAME", username), ("KAFKA_SASL_PASSWORD", password))
                                   if not v)
            raise ConfigError(f"KAFKA_SECURITY_PROTOCOL={protocol} needs {missing}")
        if not sec.sasl and (username or password):
            raise ConfigError(f"KAFKA_SASL_USERNAME/KAFKA_SASL_PASSWORD are set but KAFKA_SECURITY_PROTOCOL={protocol} "
                              "does not use SASL (SASL_PLAINTEXT or SASL_SSL)")
        given = [n for n, v in files.items() if v]
        if given and not sec.tls:
            raise ConfigError(f"{', '.join(given)} set but KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS "
                              "(SSL or SASL_SSL)")
        if bool(sec.cert_file) != bool(sec.key_file):
            raise ConfigError("KAFKA_SSL_CERT_FILE and KAFKA_SSL_KEY_FILE go together (mutual TLS): one is missing")
        for name, path in files.items():
            if path and not os.access(path, os.R_OK):
                raise ConfigError(f"{name}={_shown(path)}: no such readable file")
        return sec


@dataclass(frozen=True)
class KafkaSettings:
    bootstrap_servers: str
    topic: str
    dlq_topic: str
    partitions: int
    replication_factor: int
    security: KafkaSecurity = KafkaSecurity()
    min_insync_replicas: int = 0
    create_topics: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "KafkaSettings":
        env = os.environ if env is None else env
        servers = _get(env, "KAFKA_BOOTSTRAP_SERVERS") or ""
        for server in servers.split(","):
            host, _, port = server.strip().rpartition(":")
            if not host or not host.isascii() or not _WHOLE.fullmatch(port) or not 0 < int(port[:6]) < 65536:
                raise ConfigError(f"KAFKA_BOOTSTRAP_SERVERS={_shown(servers)}: expected host:port[,host:port…] "
                                  "(port 1..65535)")
        rf, min_isr = _int(env, "KAFKA_REPLICATION_FACTOR", 1, 100), _int(env, "KAFKA_MIN_INSYNC_REPLICAS", 0, 100)
        if min_isr > rf:
            raise ConfigError(f"KAFKA_MIN_INSYNC_REPLICAS={min_isr} is above KAFKA_REPLICATION_FACTOR={rf}: no write "
                              "could ever be acknowledged")
        return cls(
            bootstrap_servers=servers,
            topic=_topic(env, "KAFKA_TOPIC"),
            dlq_topic=_topic(env, "KAFKA_DLQ_TOPIC"),
            partitions=_int(env, "KAFKA_TOPIC_PARTITIONS", 1, 10000),
            replication_factor=_int(env, "KAFKA_REPLICATION_FACTOR", 1, 100),
            security=KafkaSecurity.from_env(env),
            min_insync_replicas=_int(env, "KAFKA_MIN_INSYNC_REPLICAS", 0, 100),
            create_topics=_bool(env, "KAFKA_CREATE_TOPICS"),
        )


# Fields the producer always selects; the consumer table has a column for each.
BASE_FIELDS: tuple[str, ...] = ("numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe")


@dataclass(frozen=True)
class ProducerConfig:
    department: str
    api_url: str
    page_size: int
    date_from: str | None
    date_to: str | None
    extra_fields: tuple[str, ...]
    max_rps: float
    timeout_s: float
    max_retries: int
    retry_max_s: float
    checkpoint_topic: str
    restart: bool
    kafka: KafkaSettings
    kafka_wait_s: float = 180.0
    api_key: str | None = field(default=None, repr=False)
    rate_window_s: float = 60.0
    budget_file: str | None = None
    refresh_wait_s: float = 900.0
    max_concurrent: int = 0
    bandwidth: float = 500000.0
    compute_ms: float = 20000.0
    cost_base_ms: float = 20.0
    cost_per_row_ms: float = 0.1
    budget_partitions: int = 120
    #: where the summary is pushed when the run ends (METRICS_PUSHGATEWAY_URL, None = nowhere) and its
    #: group's labels (METRICS_PUSHGATEWAY_GROUPING): read, and refused, at start rather than at the push
    pushgateway_url: str | None = field(default=None, repr=False)  # may hold a password
    push_grouping: tuple[tuple[str, str], ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        return BASE_FIELDS + tuple(f for f in self.extra_fields if f not in BASE_FIELDS)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "ProducerConfig":
        env = dict(os.environ if env is None else env)
        dep_raw = overrides.pop("department", None) or _get(env, "DEPARTMENT")
        if dep_raw is None:
            raise ConfigError(f"DEPARTMENT is not set: give one department code ({departments.VALID_FORMS})")
        try:
            dep = departments.normalize(dep_raw)
        except departments.InvalidDepartment as exc:
            raise ConfigError(f"DEPARTMENT: {exc}") from None
        url = str(_get(env, "ADEME_API_URL")).rstrip("/")
        if url.endswith("/lines"):
            url = url[: -len("/lines")]
        if not http_url(url):
            raise ConfigError(f"ADEME_API_URL={_shown(url)} is not an http(s) URL")
        cfg = cls(
            department=dep,
            api_url=url,
            page_size=_int(env, "ADEME_PAGE_SIZE", 1, 10000),
            date_from=_date(env, "ADEME_DATE_FROM"),
            date_to=_date(env, "ADEME_DATE_TO"),
            extra_fields=tuple(_list(env, "ADEME_EXTRA_FIELDS")),
            max_rps=_rate(env, "ADEME_MAX_RPS"),
            timeout_s=_float(env, "ADEME_TIMEOUT_S", 0.1),
            max_retries=_int(env, "ADEME_MAX_RETRIES", 0, 1000),
            retry_max_s=_float(env, "ADEME_RETRY_MAX_S", 0.0),
            checkpoint_topic=_topic(env, "PRODUCER_CHECKPOINT_TOPIC"),
            restart=_bool(env, "PRODUCER_RESTART"),
            kafka=KafkaSettings.from_env(env),
            kafka_wait_s=kafka_wait_seconds(env),
            api_key=_get(env, "ADEME_API_KEY"),
            rate_window_s=_float(env, "ADEME_RATE_WINDOW_S", 0.1),
            budget_file=_get(env, "ADEME_BUDGET_FILE"),
            refresh_wait_s=_float(env, "REFRESH_WAIT_S", 0.0),
            max_concurrent=_int(env, "PRODUCER_MAX_CONCURRENT", 0, 10000),
            bandwidth=_float(env, "ADEME_BANDWIDTH_BYTES_S", 0.0, 1e12),
            compute_ms=_float(env, "ADEME_COMPUTE_MS", 0.0, 1e9),
            cost_base_ms=_float(env, "ADEME_COST_BASE_MS", 0.0, 1e6),
            cost_per_row_ms=_float(env, "ADEME_COST_PER_ROW_MS", 0.0, 1e3),
            budget_partitions=_int(env, "PRODUCER_BUDGET_PARTITIONS", 0, 10000),
            pushgateway_url=pushgateway_url(env),
            push_grouping=tuple(pushgateway_grouping(env).items()),
        )
        if cfg.date_from and cfg.date_to and cfg.date_from > cfg.date_to:
            raise ConfigError(f"ADEME_DATE_FROM={cfg.date_from} is after ADEME_DATE_TO={cfg.date_to}")
        return cfg


@dataclass(frozen=True)
class GroupConfig:
    """What both consumer groups read (the sink's ``dpe-ingest consume`` and ``dpe-ingest analytics``):
    the database, their group, the batches, the backoff and Kafka."""

    database_url: str
    group: str
    batch_size: int
    batch_idle_ms: int
    retry_max_backoff_s: float
    kafka: KafkaSettings
    #: /livez: the poll loop turned within this many seconds, and the batch in flight is younger than the other
    liveness_stall_s: float = 60.0
    batch_commit_timeout_s: float = 300.0

    @staticmethod
    def _common(env: Mapping[str, str], group_var: str) -> dict:
        return dict(
            database_url=str(_get(env, "DATABASE_URL")),
            group=str(_get(env, group_var)),
            batch_size=_int(env, "BATCH_SIZE", 1, 100000),
            batch_idle_ms=_int(env, "BATCH_IDLE_MS", 1, 3600000),
            retry_max_backoff_s=_float(env, "RETRY_MAX_BACKOFF_S", 0.1),
            kafka=KafkaSettings.from_env(env),
            liveness_stall_s=_float(env, "LIVENESS_STALL_S", 1.0),
            batch_commit_timeout_s=_float(env, "BATCH_COMMIT_TIMEOUT_S", 1.0),
        )


@dataclass(frozen=True)
class ConsumerConfig(GroupConfig):
    table: str = "dpe_data"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ConsumerConfig":
        env = dict(os.environ if env is None else env)
        table = _pg_name(env, "DB_TABLE", DB_TABLE_SUFFIXES)
        return cls(table=table, **cls._common(env, "CONSUMER_GROUP"))


@dataclass(frozen=True)
class AnalyticsConfig(GroupConfig):
    table_prefix: str = "dpe_analytics"
    alert_share: float = 0.3
    alert_interval_s: float = 60.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "AnalyticsConfig":
        env = dict(os.environ if env is None else env)
        prefix = _pg_name(env, "ANALYTICS_TABLE_PREFIX", ANALYTICS_TABLE_SUFFIXES)
        share = _float(env, "ANALYTICS_ALERT_SHARE", 0.0, 1.0)
        return cls(table_prefix=prefix, alert_share=share,
                   alert_interval_s=_float(env, "ANALYTICS_ALERT_INTERVAL_S", 0.0),
                   **cls._common(env, "ANALYTICS_GROUP"))


def kafka_wait_seconds(env: Mapping[str, str] | None = None) -> float:
    """KAFKA_WAIT_S: how long the producer (and its init container) waits for Kafka to answer."""
    return _float(os.environ if env is None else env, "KAFKA_WAIT_S", 0.0)


def metrics_port(env: Mapping[str, str] | None = None) -> int:
    """METRICS_PORT (0 = no /metrics endpoint)."""
    return _int(os.environ if env is None else env, "METRICS_PORT", 0, 65535)


def pushgateway_url(env: Mapping[str, str] | None = None) -> str | None:
    """METRICS_PUSHGATEWAY_URL (None: the producer pushes nothing)."""
    return _get(os.environ if env is None else env, "METRICS_PUSHGATEWAY_URL")


_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def pushgateway_grouping(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """METRICS_PUSHGATEWAY_GROUPING, ``name=value,...``: the labels of the producer's group besides job
    and department ({} when unset).  A name Prometheus would refuse, or job/department, is a ConfigError."""
    raw = _get(os.environ if env is None else env, "METRICS_PUSHGATEWAY_GROUPING") or ""
    out: dict[str, str] = {}
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        name, sep, value = (x.strip() for x in part.partition("="))
        if not sep or not value or not _LABEL.fullmatch(name) or name.startswith("__") or name in ("job", "department"):
            raise ConfigError(f"METRICS_PUSHGATEWAY_GROUPING={raw!r}: expected name=value pairs separated by commas, "
                              f"each name a Prometheus label name other than job and department (got {part!r})")
        out[name] = value
    return out


@dataclass(frozen=True)
class LogSettings:
    format: str  # logfmt or json (anything else: logfmt)
    level: str
    #: KAFKA_CLIENT_LOG_LEVEL, None when unset (kafka-python's event-loop timing lines are then dropped)
    kafka_client_level: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "LogSettings":
        env = os.environ if env is None else env
        fmt = str(_get(env, "LOG_FORMAT")).lower()
        client = env.get("KAFKA_CLIENT_LOG_LEVEL")
        return cls(fmt if fmt in ("logfmt", "json") else "logfmt", str(_get(env, "LOG_LEVEL")).upper(),
                   client.strip().upper() if client and client.strip() else None)


def setting(name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The raw value of one variable of :data:`CONTRACT` (its default when unset or blank), for readers
    that take it as it is (``dpe-ingest status``)."""
    return _get(os.environ if env is None else env, name)


def markdown_table() -> str:
    """The contract as the Markdown table of docs/configuration.md (kept in sync by a test)."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, (default, meaning) in CONTRACT.items():
        shown = f"`{default}`" if default not in (None, "") else "(unset)"
        lines.append(f"| `{name}` | {shown} | {meaning} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
