"""Kafka I/O shared by the producer, the consumer and status: connecting, topics, a pipelined producer,
checkpoints, and the committed offsets of a consumer group.

Checkpoints live in Kafka itself (a compacted topic, key = department): a producer needs nothing
but Kafka and the API, and the checkpoint of a page is written only after every row of that page
was acknowledged by the broker (``acks=all``), so a restart resends at most the one page that was
in flight.
"""

from __future__ import annotations

import json
import logging
import random
import struct
import time
from dataclasses import dataclass
from typing import Any, Iterable

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import InvalidReplicationFactorError, KafkaError, KafkaTimeoutError, TopicAlreadyExistsError
from kafka.partitioner.abc import Partitioner

from . import logs
from .config import ConfigError, KafkaSecurity, KafkaSettings
from .kafka_security import access_error, client_options, connecting

log = logging.getLogger("dpe_ingest.kafka")


class KafkaUnavailable(Exception):
    """The broker could not be reached, or refused our writes, within the allowed time."""


def wait_for_kafka(bootstrap: str, timeout_s: float = 180.0, context: dict | None = None,
                   security: KafkaSecurity | None = None) -> KafkaAdminClient:
    """Connect an admin client, waiting (with logs) while the broker is not up yet: a ``kafka_wait``
    warning naming the address and the time waited after each attempt, at most ~10 s apart (each attempt
    waits at most 4 s for the broker, then at most 5 s before the next).

    A refusal that is a setting (credentials, certificates: ``kafka_security.diagnose``) raises
    ``KafkaAccessError`` at once, naming it: waiting would not change the answer."""
    started = time.monotonic()
    deadline = started + timeout_s
    delay = 1.0
    while True:
        try:
            return connecting(security, bootstrap, lambda: KafkaAdminClient(
                bootstrap_servers=bootstrap, client_id="dpe-ingest-admin", request_timeout_ms=15000,
                bootstrap_timeout_ms=int(max(1.0, min(4.0, deadline - time.monotonic())) * 1000),
                **client_options(security)))
        except (KafkaError, OSError) as exc:
            left = deadline - time.monotonic()
            waited = time.monotonic() - started
            if left <= 0:
                raise KafkaUnavailable(f"Kafka at {bootstrap} unreachable for {waited:.0f}s: {exc}") from exc
            logs.event(log, "kafka_wait", f"Kafka at {bootstrap} not reachable for {waited:.0f}s "
                       f"({type(exc).__name__}); retrying in {min(delay, left):.0f}s (gives up after {timeout_s:g}s)",
                       logging.WARNING, bootstrap=bootstrap, waited_s=round(waited, 1), retry_in_s=delay,
                       **(context or {}))
            time.sleep(min(delay, max(left, 0.1)))
            delay = min(delay * 2, 5.0)


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int = 1
    configs: tuple[tuple[str, str], ...] = ()


def ensure_topics(admin: KafkaAdminClient, specs: Iterable[TopicSpec], security: KafkaSecurity | None = None,
                  create: bool = True) -> list[str]:
    """Create the topics that do not exist yet; return the names created.  A refusal (no CREATE ACL)
    is ``KafkaAccessError`` naming the topic; so is a replication factor the cluster cannot hold.
    ``create=False`` (KAFKA_CREATE_TOPICS=false: topics managed elsewhere): a missing topic is a
    ``ConfigError`` naming every one missing, nothing is created."""
    specs = list(specs)
    existing = set(admin.list_topics())
    missing = [s for s in specs if s.name not in existing]
    if missing and not create:
        raise ConfigError(f"KAFKA_CREATE_TOPICS=false and these topics do not exist (or our principal may not "
                          f"DESCRIBE them): {', '.join(s.name for s in missing)}; create them as docs/chart.md lists "
                          "(partitions, cleanup.policy) or let the pipeline create them")
    created = []
    for spec in missing:
        try:
            admin.create_topics([NewTopic(spec.name, spec.partitions, spec.replication_factor,
                                          topic_configs=dict(spec.configs))])
            created.append(spec.name)
        except TopicAlreadyExistsError:
            pass  # another department's producer won the race: fine
        except InvalidReplicationFactorError as exc:
            raise ConfigError(f"KAFKA_REPLICATION_FACTOR={spec.replication_factor}: the cluster cannot hold topic "
                              f"{spec.name} with that many replicas ({exc}); the bundled Kafka has one broker") from exc
        except KafkaError as exc:
            refused = access_error(exc, security, "CREATE", f"topic {spec.name} (or create it beforehand)")
            if refused is not None:
                raise refused from exc
            raise
    return created


def _durability(settings: KafkaSettings) -> tuple[tuple[str, str], ...]:
    """min.insync.replicas when set: with acks=all, a write is acknowledged once that many replicas have it."""
    n = settings.min_insync_replicas
    return (("min.insync.replicas", str(n)),) if n > 0 else ()


def data_topics(settings: KafkaSettings) -> list[TopicSpec]:
    """The rows topic (KAFKA_TOPIC_PARTITIONS partitions) and the dead-letter topic (1 partition)."""
    rf, durable = settings.replication_factor, _durability(settings)
    return [TopicSpec(settings.topic, settings.partitions, rf, durable), TopicSpec(settings.dlq_topic, 1, rf, durable)]


def pipeline_topics(settings: KafkaSettings, checkpoint_topic: str) -> list[TopicSpec]:
    """What the producer needs: the data topics and its compacted checkpoint topic."""
    return data_topics(settings) + [
        TopicSpec(checkpoint_topic, 1, settings.replication_factor,
                  (("cleanup.policy", "compact"),) + _durability(settings)),
    ]


def slots_topic(settings: KafkaSettings, checkpoint_topic: str, n: int) -> TopicSpec:
    """The producers' slots (PRODUCER_MAX_CONCURRENT=n): n partitions, as durable as the other topics
    (KAFKA_REPLICATION_FACTOR replicas, KAFKA_MIN_INSYNC_REPLICAS)."""
    return TopicSpec(f"{checkpoint_topic}-slots-{n}", n, settings.replication_factor, _durability(settings))


_M32 = 0xFFFFFFFF
_WORDS: dict[int, struct.Struct] = {}  # number of 4-byte words -> its little-endian Struct


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (Java ``Utils.murmur2``), the same value as kafka-python's, about 3x faster:
    the 4-byte words are unpacked at once instead of byte by byte."""
    length = len(data)
    m = 0x5BD1E995
    h = 0x9747B28C ^ length
    n4 = length >> 2
    words = _WORDS.get(n4)
    if words is None:
        words = _WORDS[n4] = struct.Struct(f"<{n4}I")
    for k in words.unpack_from(data):
        k = (k * m) & _M32
        k ^= k >> 24
        h = (((h * m) & _M32) ^ ((k * m) & _M32))
    extra = length & 3
    if extra:
        tail = length & ~3
        if extra >= 3:
            h ^= data[tail + 2] << 16
        if extra >= 2:
            h ^= data[tail + 1] << 8
        h = ((h ^ data[tail]) * m) & _M32
    h ^= h >> 13
    h = (h * m) & _M32
    return h ^ (h >> 15)


class KeyHashPartitioner(Partitioner):
    """kafka-python's DefaultPartitioner, same partition for every key (murmur2 of the key, positive,
    modulo the number of partitions: Java's default too), without its per-record costs: the sorted
    partition list is kept while the topic's partitions stay the same, and murmur2 is :func:`murmur2`.
    A record without a key goes to a random available partition, as with DefaultPartitioner."""

    def __init__(self) -> None:
        self._sorted: dict[str, tuple[set, list[int]]] = {}

    def partition(self, topic, key, serialized_key, value, serialized_value, cluster):
        parts = cluster.partitions_for_topic(topic)
        if not parts:
            raise ValueError(f"Topic {topic} not found in ClusterMetadata")
        if serialized_key is None:
            available = cluster.available_partitions_for_topic(topic)
            return random.choice(sorted(available or parts))
        cached = self._sorted.get(topic)
        if cached is None or cached[0] != parts:
            cached = self._sorted[topic] = (parts, sorted(parts))
        ordered = cached[1]
        return ordered[(murmur2(serialized_key) & 0x7FFFFFFF) % len(ordered)]


def make_producer(bootstrap: str, security: KafkaSecurity | None = None, **overrides: Any) -> KafkaProducer:
    """An idempotent, acks=all producer that pipelines: ``send`` never waits for the broker."""
    config: dict[str, Any] = dict(
        client_options(security),
        bootstrap_servers=bootstrap,
        client_id="dpe-ingest-producer",
        acks="all",
        enable_idempotence=True,
        max_in_flight_requests_per_connection=5,
        linger_ms=20,
        batch_size=256 * 1024,
        # a page's batches are 8x smaller for about the same throughput (measured: docs/producer.md,
        # Profile); gzip, because every client reads it with no extra library: the course's own
        # kafka-python consumers attached to the topic, Kafdrop, Kafka Connect
        compression_type="gzip",
        retries=2**31 - 1,
        delivery_timeout_ms=180000,
        request_timeout_ms=30000,
        max_block_ms=180000,
        partitioner=KeyHashPartitioner(),
    )
    config.update(overrides)
    return KafkaProducer(**config)


#: while the broker does not acknowledge, a line at least this often (and one when it does again)
WAIT_LOG_S = 10.0
#: flush() waits in slices this long; a line once WAIT_LOG_S - one slice passed since the last (or the
#: start): the lines come every ~7.5 s, never more than WAIT_LOG_S apart even when a slice overruns
_FLUSH_SLICE_S = 2.5


def flush_logging(producer: KafkaProducer, timeout_s: float, what: str, bootstrap: str | None = None,
                  context: dict | None = None) -> None:
    """``producer.flush`` for at most ``timeout_s``, saying so while Kafka keeps us waiting: a warning
    ``kafka_waiting`` naming the broker and the time waited at least every :data:`WAIT_LOG_S`, and one
    ``kafka_recovered`` line once the sends are acknowledged.  Raises KafkaUnavailable past the timeout."""
    started = time.monotonic()
    deadline = started + timeout_s
    last_line = started
    waited_lines = 0
    where = bootstrap or "the broker"
    while True:
        try:
            producer.flush(timeout=max(0.001, min(_FLUSH_SLICE_S, deadline - time.monotonic())))
            break
        except KafkaTimeoutError as exc:
            now = time.monotonic()
            if now >= deadline:
                raise KafkaUnavailable(f"Kafka at {where} did not acknowledge {what} in {timeout_s:.0f}s") from exc
            if now - last_line >= WAIT_LOG_S - _FLUSH_SLICE_S:
                logs.event(log, "kafka_waiting", f"waiting {now - started:.0f}s for Kafka at {where} to acknowledge "
                           f"{what} (gives up after {timeout_s:.0f}s)", logging.WARNING, bootstrap=bootstrap,
                           waited_s=round(now - started, 1), timeout_s=timeout_s, **(context or {}))
                last_line, waited_lines = now, waited_lines + 1
        except KafkaError as exc:
            raise KafkaUnavailable(f"flush failed: {exc}") from exc
    if waited_lines:
        logs.event(log, "kafka_recovered", f"Kafka at {where} acknowledged {what} after "
                   f"{time.monotonic() - started:.0f}s", bootstrap=bootstrap,
                   waited_s=round(time.monotonic() - started, 1), **(context or {}))


class SendTracker:
    """Futures of the sends since the last flush, to check that each one really succeeded."""

    def __init__(self, bootstrap: str | None = None, context: dict | None = None) -> None:
        self.futures: list = []
        self.bootstrap, self.context = bootstrap, context

    def add(self, future) -> None:
        self.futures.append(future)

    def flush(self, producer: KafkaProducer, timeout_s: float) -> None:
        """Wait until every tracked send is acknowledged; raise KafkaUnavailable if any failed."""
        flush_logging(producer, timeout_s, f"{len(self.futures)} sends", self.bootstrap, self.context)
        failed = [f for f in self.futures if not f.is_done or f.failed()]
        self.futures = []
        if failed:
            first = failed[0]
            reason = first.exception if first.is_done else "not acknowledged in time"
            raise KafkaUnavailable(f"{len(failed)} sends not acknowledged: {reason}")


class CheckpointStore:
    """Resume points of departments: the last value of key ``department`` in a compacted topic."""

    def __init__(self, bootstrap: str, topic: str, producer: KafkaProducer, context: dict | None = None,
                 security: KafkaSecurity | None = None):
        self.bootstrap, self.topic, self.producer, self.context = bootstrap, topic, producer, context
        self.security = security

    def load(self, key: str, timeout_s: float = 60.0) -> dict | None:
        """Read the topic from the beginning to its current end; the last value of ``key`` wins."""
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                 group_id=None, client_id="dpe-ingest-checkpoints",
                                 request_timeout_ms=30000, **client_options(self.security))
        try:
            deadline = time.monotonic() + timeout_s
            # The topic was just created (ensure_topics): until its leader is elected, the metadata leaves
            # it out and kafka-python answers an empty set (3.x; None in 2.x).  Wait for it; an unreadable
            # checkpoint topic is an error, never "no checkpoint" (that would fetch the department again).
            parts = consumer.partitions_for_topic(self.topic)
            while not parts:
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(f"checkpoint topic {self.topic} has no partition in the broker's "
                                           f"metadata after {timeout_s:.0f}s (does it exist?)")
                time.sleep(0.2)
                parts = consumer.partitions_for_topic(self.topic)
            tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            end = consumer.end_offsets(tps)
            found: dict | None = None
            while any(consumer.position(tp) < end[tp] for tp in tps):
                if time.monotonic() > deadline:
                    raise KafkaUnavailable(f"could not read checkpoints from {self.topic} in {timeout_s:.0f}s")
                for records in consumer.poll(timeout_ms=1000).values():
                    for rec in records:
                        if rec.key is not None and rec.key.decode("utf-8") == key:
                            found = json.loads(rec.value) if rec.value is not None else None
            return found
        finally:
            consumer.close()

    def save(self, key: str, doc: dict, timeout_s: float = 60.0) -> None:
        """Write and wait for the broker's acknowledgement."""
        fut = self.producer.send(self.topic, key=key.encode("utf-8"),
                                 value=json.dumps(doc, sort_keys=True).encode("utf-8"))
        flush_logging(self.producer, timeout_s, f"the checkpoint of {key}", self.bootstrap, self.context)
        try:
            fut.get(timeout=0.1)
        except KafkaError as exc:
            raise KafkaUnavailable(f"checkpoint write failed: {exc}") from exc


def group_offsets(bootstrap: str, group: str, timeout_ms: int = 15000,
                  security: KafkaSecurity | None = None) -> dict[TopicPartition, int]:
    """Committed offsets of a consumer group (status, the consumer, the refresh, tests).

    A retriable answer (no coordinator yet: on a fresh cluster the first lookup is what creates
    ``__consumer_offsets``; a coordinator loading or moving) is asked again until ``timeout_ms``."""
    deadline = time.monotonic() + timeout_ms / 1000.0
    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="dpe-ingest-offsets",
                             request_timeout_ms=max(timeout_ms, 5000), bootstrap_timeout_ms=timeout_ms,
                             **client_options(security))
    try:
        while True:
            try:
                res = admin.list_group_offsets({group: None}).get(group, {})
                break
            except KafkaError as exc:
                if not getattr(exc, "retriable", False) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
    finally:
        admin.close()
    return {tp: om.offset for tp, om in res.items() if om.offset is not None and om.offset >= 0}


def wait_until_stored(bootstrap: str, topic: str, group: str, timeout_s: float = 900.0,
                      stop=None, context: dict | None = None, security: KafkaSecurity | None = None) -> None:
    """Wait until consumer group ``group`` has committed, on every partition of ``topic``, the end
    offset the topic has now: the consumer commits after the database did, so from then on every
    message already in the topic is in the table.  Raises KafkaUnavailable after ``timeout_s``."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             client_id="dpe-ingest-refresh", **client_options(security))
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        end = consumer.end_offsets(tps) if tps else {}
    finally:
        consumer.close()
    deadline = time.monotonic() + timeout_s
    logged = False
    while True:
        committed = group_offsets(bootstrap, group, security=security)
        behind = sum(max(0, off - committed.get(tp, 0)) for tp, off in end.items())
        if behind == 0:
            return
        if time.monotonic() > deadline:
            raise KafkaUnavailable(f"consumer group {group} still {behind} messages behind on {topic} after "
                                   f"{timeout_s:.0f}s (REFRESH_WAIT_S): is the consumer running?")
        if not logged:
            logs.event(log, "refresh_wait", f"waiting for consumer group {group} to store the {behind} messages "
                       f"still ahead of it on {topic}", behind=behind, group=group, **(context or {}))
            logged = True
        if stop is not None and stop.wait(1.0):
            raise KafkaUnavailable("stopped while waiting for the consumer")
        if stop is None:
            time.sleep(1.0)


class Slot:
    """One of ``n`` slots shared by every producer: at most ``n`` departments page the API at once.

    A Kafka consumer group is the semaphore: the slots are the ``n`` partitions of a topic, the group's
    members are the producers wanting one, and the sticky assignor hands each partition to one member
    and leaves it there while other members come and go.  A producer holds a slot while a partition is
    assigned to it; when it exits (or dies: the group's session timeout) the partition moves to a
    waiting producer.  A soft limit: a holder that misses a rebalance loses its slot but finishes its
    page run.
    """

    def __init__(self, bootstrap: str, spec: TopicSpec, context: dict | None = None,
                 security: KafkaSecurity | None = None):
        """``spec``: the slots topic (:func:`slots_topic`), created when missing."""
        self.bootstrap, self.spec, self.context = bootstrap, spec, context or {}
        self.topic, self.n = spec.name, spec.partitions
        self.security = security
        self.consumer = None
        self._stop = None
        self._thread = None

    def acquire(self, stop=None, timeout_s: float | None = None) -> None:
        import threading

        from kafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor

        admin = wait_for_kafka(self.bootstrap, context=self.context, security=self.security)
        try:
            ensure_topics(admin, [self.spec], self.security)
        finally:
            admin.close()
        self.consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=self.topic,
                                      client_id="dpe-ingest-slot", enable_auto_commit=False,
                                      partition_assignment_strategy=[StickyPartitionAssignor],
                                      session_timeout_ms=30000, heartbeat_interval_ms=3000,
                                      max_poll_interval_ms=24 * 3600 * 1000, **client_options(self.security))
        self.consumer.subscribe([self.topic])
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        logged = False
        while not self.consumer.assignment():
            self.consumer.poll(timeout_ms=500)
            if self.consumer.assignment():
                break
            if not logged:
                logs.event(log, "slot_wait", f"waiting for one of the {self.n} producer slots "
                           f"(producer.maxConcurrent)", slots=self.n, **self.context)
                logged = True
            if stop is not None and stop.is_set():
                raise KafkaUnavailable("stopped while waiting for a producer slot")
            if deadline is not None and time.monotonic() > deadline:
                raise KafkaUnavailable(f"no producer slot in {timeout_s:.0f}s")
        logs.event(log, "slot_acquired", f"producer slot {sorted(tp.partition for tp in self.consumer.assignment())} "
                   f"of {self.n} acquired", slots=self.n, **self.context)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, name="slot", daemon=True)
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.consumer.poll(timeout_ms=0)  # take part in rebalances, keep the partition
            except Exception:  # noqa: BLE001 - the slot is best effort; the pass goes on
                pass

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        if self.consumer is not None:
            try:
                self.consumer.close()  # leaves the group at once: the next producer gets the slot
            finally:
                self.consumer = None
                logs.event(log, "slot_released", "producer slot released", **self.context)
