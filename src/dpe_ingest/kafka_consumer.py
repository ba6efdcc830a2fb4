"""Kafka helpers of the consumer side: clients, topics, dead-letter sending."""

from __future__ import annotations

import logging
from typing import Iterable

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer
from kafka.admin import KafkaAdminClient
from kafka.errors import KafkaError

from . import kafka_io
from .config import KafkaSettings
from .kafka_security import client_options, connecting

log = logging.getLogger("dpe_ingest.consumer")

class RebalanceListener(ConsumerRebalanceListener):
    """Hands kafka-python's rebalance callbacks to ``owner``'s methods of the same names (a member
    evicted from the group, "partitions lost", is told its partitions were revoked unless ``owner``
    has its own ``on_partitions_lost``)."""

    def __init__(self, owner):
        self.owner = owner

    def on_partitions_revoked(self, revoked):
        self.owner.on_partitions_revoked(revoked)

    def on_partitions_assigned(self, assigned):
        self.owner.on_partitions_assigned(assigned)

    def on_partitions_lost(self, lost):
        getattr(self.owner, "on_partitions_lost", self.owner.on_partitions_revoked)(lost)


def partitions_text(tps: Iterable) -> str:
    """``topic:0,topic:1`` for logs, in order."""
    return ",".join(f"{tp.topic}:{tp.partition}" for tp in sorted(tps, key=lambda t: (t.topic, t.partition)))


def make_consumer(settings: KafkaSettings, group: str, batch_size: int, **overrides) -> KafkaConsumer:
    """A group consumer that never commits by itself and hands us raw bytes."""
    cfg = dict(
        client_options(settings.security),
        bootstrap_servers=settings.bootstrap_servers.split(","),
        group_id=group,
        client_id=f"dpe-ingest-consumer-{group}",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        allow_auto_create_topics=False,
        max_poll_records=max(1, batch_size),
        # what kafka-python buffers ahead: one fetch per partition, decompressed whole (gzip batches grow
        # ~8x); 256 KiB keeps the memory flat from 100 000 to 1 000 000 rows (bench: scale), the 1 MiB
        # default lets it grow with the topic up to ~50 MB
        max_partition_fetch_bytes=256 * 1024,
        fetch_max_bytes=4 * 1024 * 1024,
        # a new topic / new partitions are seen within 30 s (default would be 5 min)
        metadata_max_age_ms=30000,
        # a consumer that died (OOM, SIGKILL, node lost) is replaced after 10 s, not 45 s
        session_timeout_ms=10000,
        heartbeat_interval_ms=2000,
        request_timeout_ms=30000,
        reconnect_backoff_max_ms=5000,
    )
    cfg.update(overrides)
    return KafkaConsumer(**cfg)


def make_dlq_producer(settings: KafkaSettings, **overrides) -> KafkaProducer:
    cfg = dict(
        client_options(settings.security),
        bootstrap_servers=settings.bootstrap_servers.split(","),
        client_id="dpe-ingest-consumer-dlq",
        acks="all",
        linger_ms=5,
        max_block_ms=30000,
        request_timeout_ms=30000,
        delivery_timeout_ms=60000,
        reconnect_backoff_max_ms=5000,
    )
    cfg.update(overrides)
    return KafkaProducer(**cfg)


def send_dead_letters(producer: KafkaProducer, topic: str,
                      letters: Iterable[tuple[bytes | None, bytes, list]], timeout_s: float = 60.0) -> int:
    """Send (key, value, headers) dead letters and wait until every one is acknowledged (acks=all).

    Raises on any failure; the caller sends the whole set again (a dead letter may then be
    duplicated in the DLQ topic -- at-least-once -- but never lost)."""
    futures = [producer.send(topic, key=k, value=v, headers=h) for k, v, h in letters]
    producer.flush(timeout=timeout_s)
    for f in futures:
        f.get(timeout=0.1)  # raises the delivery error, if any
    return len(futures)


def ensure_topics(settings: KafkaSettings, timeout_ms: int = 15000) -> list[str]:
    """Create the main topic (KAFKA_TOPIC_PARTITIONS partitions) and the DLQ topic (1 partition) if
    they are missing, exactly like the producer would: whichever starts first creates them."""
    admin = connecting(settings.security, settings.bootstrap_servers, lambda: KafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers.split(","), client_id="dpe-ingest-consumer-admin",
        request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms, **client_options(settings.security)))
    try:
        return kafka_io.ensure_topics(admin, kafka_io.data_topics(settings), settings.security,
                                      create=settings.create_topics)
    finally:
        admin.close()


__all__ = ["KafkaError", "RebalanceListener", "partitions_text", "make_consumer", "make_dlq_producer",
           "send_dead_letters", "ensure_topics"]
