"""The producer's checkpoint store on a real broker: a checkpoint topic that the broker's metadata does
not show yet (just created, leader not yet elected) is waited for, never mistaken for "no checkpoint"
and never a crash (kafka-python 3 answers an empty partition set there, not None)."""

from __future__ import annotations

import threading
import time

import pytest
from kafka.admin import KafkaAdminClient, NewTopic

from dpe_ingest.kafka_io import CheckpointStore, KafkaUnavailable, make_producer

pytestmark = pytest.mark.kafka


def _create_later(bootstrap: str, topic: str, delay_s: float) -> threading.Thread:
    def create() -> None:
        time.sleep(delay_s)
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        try:
            admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1,
                                          topic_configs={"cleanup.policy": "compact"})])
        finally:
            admin.close()
    t = threading.Thread(target=create, daemon=True)
    t.start()
    return t


def test_load_waits_for_a_topic_the_metadata_does_not_show_yet(kafka_bootstrap, unique_name):
    topic = unique_name("ckpt")
    producer = make_producer(kafka_bootstrap)
    try:
        store = CheckpointStore(kafka_bootstrap, topic, producer)
        creator = _create_later(kafka_bootstrap, topic, 1.5)
        t0 = time.monotonic()
        assert store.load("69", timeout_s=60) is None  # empty topic: no checkpoint, and no crash
        assert time.monotonic() - t0 >= 1.0, "load returned before the topic existed"
        creator.join(30)
        store.save("69", {"cursor": "c1", "rows": 500})
        store.save("01", {"cursor": "x", "rows": 1})
        store.save("69", {"cursor": "c2", "rows": 1000})
        assert store.load("69") == {"cursor": "c2", "rows": 1000}
    finally:
        producer.close(timeout=10)


def test_load_of_a_topic_that_never_appears_is_an_error_not_a_fresh_start(kafka_bootstrap, unique_name):
    producer = make_producer(kafka_bootstrap)
    try:
        store = CheckpointStore(kafka_bootstrap, unique_name("ckpt-missing"), producer)
        with pytest.raises(KafkaUnavailable, match="has no partition"):
            store.load("69", timeout_s=2)
    finally:
        producer.close(timeout=10)
