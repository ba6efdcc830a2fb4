"""The producers' slots topic (PRODUCER_MAX_CONCURRENT, ``<checkpoint topic>-slots-<n>``) is as durable as
the pipeline's other topics (issue 22): created with KAFKA_REPLICATION_FACTOR replicas and
KAFKA_MIN_INSYNC_REPLICAS, not with one replica whatever they say.  A real broker, the producer run as
the Job runs it."""

from __future__ import annotations

import pytest

from dpe_ingest.standin.data import Dataset

from kafka_util import command, events, run

pytestmark = pytest.mark.kafka


@pytest.fixture
def names(unique_name):
    base = unique_name("slots")
    return {"KAFKA_TOPIC": base, "KAFKA_DLQ_TOPIC": base + "-dlq", "PRODUCER_CHECKPOINT_TOPIC": base + "-ckpt",
            "KAFKA_TOPIC_PARTITIONS": "2", "PRODUCER_MAX_CONCURRENT": "2"}


def producer_env(kafka_bootstrap, srv, names, **extra) -> dict:
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "ADEME_API_URL": srv.url, "DEPARTMENT": "69",
           "KAFKA_WAIT_S": "30", **names}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _admin(kafka_bootstrap):
    from kafka import KafkaAdminClient

    return KafkaAdminClient(bootstrap_servers=kafka_bootstrap)


def test_the_slots_topic_gets_min_insync_replicas_like_the_other_topics(kafka_bootstrap, names, standin_factory):
    from kafka.admin import ConfigResource, ConfigResourceType

    srv = standin_factory(Dataset({"69": 40}, default_rows=0, seed=31))
    cp = run(command("produce"), producer_env(kafka_bootstrap, srv, names, KAFKA_MIN_INSYNC_REPLICAS="1"), timeout=120)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-3000:]
    assert events(out, "slot_acquired"), out[-3000:]
    slots = names["PRODUCER_CHECKPOINT_TOPIC"] + "-slots-2"
    admin = _admin(kafka_bootstrap)
    try:
        (desc,) = admin.describe_topics([slots])
        assert len(desc["partitions"]) == 2, desc
        for topic in (names["PRODUCER_CHECKPOINT_TOPIC"], slots):
            conf = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])["topic"][topic]
            # our topic override, as on the checkpoint topic: not the broker's default
            assert conf["min.insync.replicas"]["config_source"] == "DYNAMIC_TOPIC_CONFIG", (topic, conf)
            assert conf["min.insync.replicas"]["value"] == "1", (topic, conf)
    finally:
        admin.close()


def test_a_replication_factor_the_cluster_cannot_hold_is_refused_for_the_slots_topic_too(kafka_bootstrap, names,
                                                                                         standin_factory):
    """The pipeline's topics exist already (created by a platform team with one replica, say): the
    producer then creates only the slots topic, with KAFKA_REPLICATION_FACTOR=3 on a one-broker
    cluster: exit 2 naming the setting and the slots topic, nothing sent, no slots topic."""
    from kafka.admin import NewTopic

    admin = _admin(kafka_bootstrap)
    try:
        admin.create_topics([NewTopic(names["KAFKA_TOPIC"], 2, 1), NewTopic(names["KAFKA_DLQ_TOPIC"], 1, 1),
                             NewTopic(names["PRODUCER_CHECKPOINT_TOPIC"], 1, 1,
                                      topic_configs={"cleanup.policy": "compact"})])
    finally:
        admin.close()
    srv = standin_factory(Dataset({"69": 40}, default_rows=0, seed=32))
    cp = run(command("produce"), producer_env(kafka_bootstrap, srv, names, KAFKA_REPLICATION_FACTOR="3",
                                              KAFKA_MIN_INSYNC_REPLICAS="2"), timeout=120)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 2, f"exit {cp.returncode}:\n{out[-3000:]}"
    (err,) = events(out, "config_error")
    slots = names["PRODUCER_CHECKPOINT_TOPIC"] + "-slots-2"
    assert "KAFKA_REPLICATION_FACTOR=3" in err["msg"] and slots in err["msg"], err
    admin = _admin(kafka_bootstrap)
    try:
        assert slots not in set(admin.list_topics())
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)
        try:
            tps = [TopicPartition(names["KAFKA_TOPIC"], p) for p in (0, 1)]
            assert set(consumer.end_offsets(tps).values()) == {0}, "rows were sent"
        finally:
            consumer.close()
    finally:
        admin.close()
