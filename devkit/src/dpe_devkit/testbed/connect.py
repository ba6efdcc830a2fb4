"""Kafka Connect in standalone mode with the Debezium JDBC sink: the peer the bench measures our consumer
against (``bench/section_connect.py``), and ``tests/test_connect_peer.py``.

- The worker is Apache Kafka's own ``org.apache.kafka:connect-runtime`` (same version as the testbed
  broker) with ``connect-json`` (JsonConverter) and the log4j2 binding of SLF4J, fetched once from Maven
  Central with ``mvn dependency:copy-dependencies`` into ``<cache>/kafka-connect-<version>/libs`` (a
  generated pom, a ``.complete`` marker, a file lock: as ``testbed.kafka`` fetches the broker).
- The connector is Debezium's JDBC sink, ``io.debezium:debezium-connector-jdbc``, installed the way
  Debezium documents it: its plug-in archive (classifier ``plugin``, ``tar.gz``, on Maven Central: the
  connector with Hibernate, Agroal and the JDBC drivers) unpacked into a ``plugin.path`` directory,
  ``<cache>/debezium-connector-jdbc-<version>/plugins``.  Why not the connector's pom: the newest
  version served here, 3.6.0.Final, depends on ``org.hibernate:hibernate-agroal:7.2.6.Final``, whose pom
  Maven Central does not have (the jar is in the archive), so its dependencies do not resolve.
- :class:`ConnectStandalone` runs ``org.apache.kafka.connect.cli.ConnectStandalone worker.properties``
  (no connector at start: they are created through the REST API, so that worker start and connector
  start can be timed apart), REST on a free 127.0.0.1 port, offsets in a file of its work dir.
- :func:`envelope` / :func:`copy_enveloped`: our rows (the JSON our producer writes) as JsonConverter
  records with a schema envelope, which a schema'd sink needs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable

from ._proc import (LaunchError, LocalServer, cache_dir, fetch_with_maven, free_port, maven_pom, port_open, spawn,
                    tail, wait_port_free)
from .kafka import KAFKA_VERSION, LOG4J_VERSION, find_java, log4j2_properties, read_topic

CONNECT_VERSION = KAFKA_VERSION
DEBEZIUM_VERSION = "3.6.0.Final"
JDBC_SINK_CLASS = "io.debezium.connector.jdbc.JdbcSinkConnector"
#: the connector's default ``batch.size`` (``io.debezium.sink.SinkConnectorConfig.BATCH_SIZE_FIELD`` of 3.6.0)
DEBEZIUM_DEFAULT_BATCH_SIZE = 500
#: the JVM heap ``bin/connect-standalone.sh`` gives the worker when KAFKA_HEAP_OPTS is unset
DEFAULT_HEAP = ("256M", "2G")

_CONNECT_DEPENDENCIES = """\
    <!-- the worker (ConnectStandalone, the REST server, connect-api, -transforms, kafka-clients ...) -->
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>connect-runtime</artifactId><version>{v}</version>
    </dependency>
    <!-- org.apache.kafka.connect.json.JsonConverter -->
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>connect-json</artifactId><version>{v}</version>
    </dependency>
    <!-- SLF4J 1.x -> log4j2 binding, as in the binary distribution's libs/ -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{l}</version>
    </dependency>
"""

_DEBEZIUM_DEPENDENCIES = """\
    <!-- the archive holds the connector and everything it needs; its pom's dependencies are not read -->
    <dependency>
      <groupId>io.debezium</groupId><artifactId>debezium-connector-jdbc</artifactId><version>{v}</version>
      <classifier>plugin</classifier><type>tar.gz</type>
      <exclusions><exclusion><groupId>*</groupId><artifactId>*</artifactId></exclusion></exclusions>
    </dependency>
"""

_LOG4J2 = log4j2_properties("the worker's lifecycle and the connector's INFO, WARN elsewhere", {
    "connect": "org.apache.kafka.connect.runtime.Connect", "herder": "org.apache.kafka.connect.runtime.standalone",
    "debezium": "io.debezium"})


# ----------------------------------------------------------------------------------------------
# Jars
# ----------------------------------------------------------------------------------------------
def connect_home() -> Path:
    return cache_dir() / f"kafka-connect-{CONNECT_VERSION}"


def debezium_home() -> Path:
    return cache_dir() / f"debezium-connector-jdbc-{DEBEZIUM_VERSION}"


def ensure_connect_jars(quiet: bool = False) -> Path:
    """The directory of the Connect worker's jars, fetched from Maven Central with ``mvn`` when missing."""
    pom = maven_pom("kafka-connect-classpath", CONNECT_VERSION,
                    f"the runtime classpath of a Kafka Connect {CONNECT_VERSION} worker",
                    _CONNECT_DEPENDENCIES.format(v=CONNECT_VERSION, l=LOG4J_VERSION))
    return fetch_with_maven(connect_home() / "libs", pom,
                            f"fetching Kafka Connect {CONNECT_VERSION} jars",
                            [f"connect-runtime-{CONNECT_VERSION}.jar", f"connect-json-{CONNECT_VERSION}.jar"],
                            quiet=quiet)


def _unpack_plugin(tmp: Path) -> None:
    """The plug-in archive Maven fetched into ``tmp`` becomes the plug-in's folder there."""
    archive = tmp / f"debezium-connector-jdbc-{DEBEZIUM_VERSION}-plugin.tar.gz"
    if not archive.is_file():
        raise LaunchError(f"mvn finished but {tmp} has no {archive.name}")
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            for member in tar.getmembers():
                if member.name.startswith(("/", "..")) or ".." in Path(member.name).parts:
                    raise LaunchError(f"{archive} has an unsafe member {member.name!r}")
            tar.extractall(tmp)
    archive.unlink()


def ensure_debezium_jdbc_plugin(quiet: bool = False) -> Path:
    """A ``plugin.path`` directory holding Debezium's JDBC sink (fetched with ``mvn`` and unpacked once)."""
    pom = maven_pom("debezium-jdbc-plugin", DEBEZIUM_VERSION,
                    f"the plug-in archive of Debezium's JDBC sink {DEBEZIUM_VERSION}",
                    _DEBEZIUM_DEPENDENCIES.format(v=DEBEZIUM_VERSION))
    return fetch_with_maven(debezium_home() / "plugins", pom,
                            f"fetching the Debezium JDBC sink {DEBEZIUM_VERSION} plug-in",
                            [f"debezium-connector-jdbc/debezium-connector-jdbc-{DEBEZIUM_VERSION}.jar"],
                            mvn_args=["-DincludeTypes=tar.gz"], unpack=_unpack_plugin, quiet=quiet)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def jdbc_from_database_url(database_url: str) -> tuple[str, str, str]:
    """(jdbc url, user, password) from a ``postgresql://user:password@host:port/db`` DATABASE_URL."""
    u = urllib.parse.urlsplit(database_url)
    if u.scheme not in ("postgresql", "postgres") or not u.hostname or not u.path.strip("/"):
        raise ValueError(f"DATABASE_URL {database_url!r} is not postgresql://user:password@host:port/database")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    port = f":{u.port}" if u.port else ""
    query = f"?{u.query}" if u.query else ""
    return (f"jdbc:postgresql://{host}{port}/{u.path.strip('/')}{query}",
            urllib.parse.unquote(u.username or ""), urllib.parse.unquote(u.password or ""))


def jdbc_sink_config(*, topic: str, table: str, database_url: str, batch_size: int | None = None,
                     max_poll_records: int | None = None, tasks: int = 1, **extra: Any) -> dict[str, str]:
    """The Debezium JDBC sink's configuration: ``topic`` upserted on numero_dpe into ``table``.

    ``batch_size`` None keeps the connector's default (500); ``max_poll_records`` sets the task
    consumer's ``max.poll.records`` (``consumer.override.``; Connect's default is the client's, 500)."""
    url, user, password = jdbc_from_database_url(database_url)
    cfg = {
        "connector.class": JDBC_SINK_CLASS,
        "tasks.max": str(tasks),
        "topics": topic,
        "connection.url": url,
        "connection.username": user,
        "connection.password": password,
        "insert.mode": "upsert",
        "primary.key.mode": "record_value",
        "primary.key.fields": "numero_dpe",
        "schema.evolution": "basic",
        "collection.name.format": table,
    }
    if batch_size is not None:
        cfg["batch.size"] = str(batch_size)
    if max_poll_records is not None:
        cfg["consumer.override.max.poll.records"] = str(max_poll_records)
    cfg.update({k: str(v) for k, v in extra.items()})
    return cfg


# ----------------------------------------------------------------------------------------------
# The worker
# ----------------------------------------------------------------------------------------------
class ConnectError(LaunchError):
    """The worker or a connector failed (the message has its state, trace and log tail)."""


class ConnectStandalone(LocalServer):
    """A Kafka Connect worker in standalone mode, on 127.0.0.1, files and log in ``workdir``.

    ``start()`` returns once the REST API answers ``GET /connectors``; ``create(name, config)`` adds a
    connector, ``status(name)`` reads its state, ``wait_running(name)`` waits for it and its tasks
    (raising with the trace when one FAILED), ``delete(name)``; ``stop()`` is a clean shutdown.
    """

    def __init__(self, workdir: Path | str, bootstrap: str, *, rest_port: int | None = None,
                 heap: tuple[str, str] = DEFAULT_HEAP, worker: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.workdir = Path(workdir).resolve()
        self.bootstrap = bootstrap
        self.rest_port = int(rest_port) if rest_port else free_port()
        self.heap = heap
        self.worker_overrides = {k: str(v) for k, v in (worker or {}).items()}
        self.log_path = self.workdir / "connect.log"
        self.t_launch: float | None = None  # perf_counter() when the JVM was started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def __repr__(self) -> str:
        return f"ConnectStandalone({self.url}, running={self.running}, workdir={self.workdir})"

    def worker_properties(self, plugins: Path) -> dict[str, str]:
        props = {
            "bootstrap.servers": self.bootstrap,
            "key.converter": "org.apache.kafka.connect.storage.StringConverter",
            "value.converter": "org.apache.kafka.connect.json.JsonConverter",
            "value.converter.schemas.enable": "true",
            "offset.storage.file.filename": str(self.workdir / "connect.offsets"),
            "offset.flush.interval.ms": "10000",
            "plugin.path": str(plugins),
            "listeners": f"http://127.0.0.1:{self.rest_port}",
            "rest.advertised.host.name": "127.0.0.1",
            "rest.advertised.port": str(self.rest_port),
            # consumer.override.* in a connector's config (batch.size=100 needs max.poll.records=100)
            "connector.client.config.override.policy": "All",
            # every plug-in here has ServiceLoader manifests (the worker says so with the default,
            # hybrid_warn): no reflective scan of the plug-in's 49 jars, ~8 s less per worker start
            "plugin.discovery": "service_load",
        }
        props.update(self.worker_overrides)
        return props

    # -- REST -------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode("utf-8", "replace")

    def create(self, name: str, config: dict[str, str]) -> dict:
        code, body = self._request("POST", "/connectors", {"name": name, "config": {"name": name, **config}})
        if code not in (200, 201):
            raise ConnectError(f"POST /connectors ({name}) answered {code}: {body}\nlog {self.log_path}:\n"
                               f"{tail(self.log_path)}")
        return body

    def status(self, name: str) -> dict | None:
        code, body = self._request("GET", f"/connectors/{urllib.parse.quote(name)}/status")
        return body if code == 200 else None

    def check(self, name: str) -> bool:
        """True when the connector and all its tasks are RUNNING; raises when one FAILED or the worker exited."""
        if not self.running:
            raise ConnectError(f"the Connect worker exited ({self.proc.returncode if self.proc else None}); "
                               f"log {self.log_path}:\n{tail(self.log_path)}")
        st = self.status(name)
        if not st:
            return False
        states = [st.get("connector", {})] + list(st.get("tasks", []))
        for s in states:
            if s.get("state") == "FAILED":
                trace = s.get("trace") or ""
                causes = [ln.strip() for ln in trace.splitlines() if ln.startswith("Caused by")]
                raise ConnectError(f"connector {name} FAILED: {(trace.splitlines() or [''])[0]}\n"
                                   + "\n".join(causes) + f"\nlog {self.log_path}; trace:\n{trace[:4000]}")
        return bool(st.get("tasks")) and all(s.get("state") == "RUNNING" for s in states)

    def wait_running(self, name: str, timeout: float = 120.0) -> float:
        """Wait until ``name`` and its tasks are RUNNING; return time.perf_counter() then."""
        deadline = time.monotonic() + timeout
        while not self.check(name):
            if time.monotonic() > deadline:
                raise ConnectError(f"connector {name} not RUNNING after {timeout:.0f}s: {self.status(name)}")
            time.sleep(0.05)
        return time.perf_counter()

    def delete(self, name: str) -> None:
        code, body = self._request("DELETE", f"/connectors/{urllib.parse.quote(name)}")
        if code not in (200, 204, 404):
            raise ConnectError(f"DELETE /connectors/{name} answered {code}: {body}")

    # -- life cycle -------------------------------------------------------------------------------
    def _launch(self) -> subprocess.Popen:
        java, _ = find_java()
        libs = ensure_connect_jars()
        plugins = ensure_debezium_jdbc_plugin()
        self.workdir.mkdir(parents=True, exist_ok=True)
        props = self.workdir / "worker.properties"
        props.write_text("# generated by dpe_devkit.testbed.connect (Kafka Connect standalone)\n"
                         + "".join(f"{k}={v}\n" for k, v in self.worker_properties(plugins).items()))
        log4j = self.workdir / "connect-log4j2.properties"
        log4j.write_text(_LOG4J2)
        wait_port_free(self.rest_port)
        xms, xmx = self.heap
        # as bin/connect-standalone.sh -> bin/kafka-run-class.sh run it (KAFKA_JVM_PERFORMANCE_OPTS)
        cmd = [java, f"-Xms{xms}", f"-Xmx{xmx}", "-server", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
               "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent",
               "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}", "-cp", f"{libs}/*",
               "org.apache.kafka.connect.cli.ConnectStandalone", props]
        self.t_launch = time.perf_counter()
        return spawn(cmd, self.log_path, cwd=self.workdir, env={**os.environ, "LOG_DIR": str(self.workdir)})

    def _fail(self, why: str) -> LaunchError:
        return ConnectError(f"Kafka Connect {CONNECT_VERSION} worker on {self.url} {why}; log {self.log_path}:\n"
                            f"{tail(self.log_path)}")

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        last: Any = None
        while True:
            if self.proc.poll() is not None:
                raise self._fail(f"exited with code {self.proc.returncode} while starting")
            if time.monotonic() > deadline:
                raise self._fail(f"did not answer GET /connectors in time (last: {last!r})")
            if port_open(self.rest_port):
                try:
                    code, body = self._request("GET", "/connectors", timeout=5)
                    if code == 200:
                        return
                    last = (code, body)
                except (OSError, ValueError) as exc:
                    last = exc
            time.sleep(0.1)

    def start(self, timeout: float = 180.0):
        return super().start(timeout)

    def peak_rss_mb(self) -> float | None:
        """The worker JVM's resident high-water mark so far (VmHWM), or None once it has exited."""
        if not self.running:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024.0
        except (OSError, ValueError):
            return None
        return None


# ----------------------------------------------------------------------------------------------
# Records with a schema: the JsonConverter envelope
# ----------------------------------------------------------------------------------------------
#: the columns our consumer has (besides ``extra``); their Connect types in the envelope
_DATE = {"type": "int32", "optional": True, "name": "org.apache.kafka.connect.data.Date", "version": 1}
KNOWN_FIELDS: dict[str, dict] = {
    "numero_dpe": {"type": "string", "optional": False},
    "date_reception_dpe": _DATE,
    "code_postal_ban": {"type": "string", "optional": True},
    "etiquette_dpe": {"type": "string", "optional": True},
    "departement": {"type": "string", "optional": True},
}
_EPOCH = dt.date(1970, 1, 1)


def envelope_schema(other_fields: Iterable[str] = ()) -> dict:
    """The Connect schema of our rows: the five columns, then every other field as an optional string."""
    fields = [{"field": k, **v} for k, v in KNOWN_FIELDS.items()]
    fields += [{"field": k, "type": "string", "optional": True} for k in sorted(set(other_fields) - set(KNOWN_FIELDS))]
    return {"type": "struct", "name": "dpe_ingest.dpe_row", "optional": False, "fields": fields}


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, ensure_ascii=False)


def _days(value: Any) -> int | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"date_reception_dpe {value!r} is not a date (YYYY-MM-DD)")
    try:
        day = dt.datetime.fromisoformat(value).date() if len(value) > 10 else dt.date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"date_reception_dpe {value!r} is not a date (YYYY-MM-DD)") from None
    return (day - _EPOCH).days


def envelope(doc: dict, schema: dict) -> bytes:
    """One row (the JSON object our producer writes) as a JsonConverter value with its schema."""
    if doc.get("_deleted") is True:
        raise ValueError(f"{doc.get('numero_dpe')!r} is a deletion marker: the envelope copy has none")
    numero = doc.get("numero_dpe")
    if not isinstance(numero, str) or not numero.strip():
        raise ValueError(f"row without a numero_dpe string: {doc!r}")
    payload: dict[str, Any] = {}
    for f in schema["fields"]:
        name = f["field"]
        payload[name] = _days(doc.get(name)) if name == "date_reception_dpe" else _as_text(doc.get(name))
    unknown = set(doc) - {f["field"] for f in schema["fields"]}
    if unknown:
        raise ValueError(f"fields {sorted(unknown)} are not in the schema")
    return json.dumps({"schema": schema, "payload": payload}, ensure_ascii=False, separators=(",", ":")).encode()


def copy_enveloped(bootstrap: str, source: str, target: str, *, partitions: int | None = None,
                   timeout_s: float = 600.0) -> int:
    """Copy every record of topic ``source`` (our JSON rows) to ``target`` as enveloped records, same key
    and partition; returns how many.  ``target`` is created with the source's partition count."""
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    read = read_topic(bootstrap, source, timeout_s)
    if not read:
        raise ValueError(f"topic {source} does not exist or is empty")
    records = [(r.partition, r.key, json.loads(r.value)) for r in read]
    n_parts = 1 + max(p for p, _, _ in records)
    schema = envelope_schema({k for _, _, d in records for k in d})
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    try:
        admin.create_topics([NewTopic(target, partitions or n_parts, 1)])
    finally:
        admin.close()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=256 * 1024)
    try:
        futures = [producer.send(target, key=key, value=envelope(d, schema), partition=p % (partitions or n_parts))
                   for p, key, d in records]
        producer.flush(timeout=timeout_s)
        for f in futures:
            f.get(timeout=timeout_s)
    finally:
        producer.close()
    return len(records)
