"""Secured Kafka: every client through KAFKA_SECURITY_PROTOCOL/KAFKA_SASL_*/KAFKA_SSL_*, and each way a
secured broker can refuse us ending the Job at once with the setting named (exit 2), nothing written.

A real broker with SASL_SSL (SCRAM), mTLS and an authorizer (``dpe_devkit.testbed.secure_kafka``),
certificates from a CA made here; the producer runs as a real process, as the Job does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dpe_devkit.testbed.secure_kafka import SecureKafkaBroker
from dpe_devkit.testbed.tls import TestCA
from dpe_ingest.config import ConfigError, KafkaSecurity, KafkaSettings
from dpe_ingest.kafka_security import client_options
from dpe_ingest.standin.data import Dataset

from kafka_util import command, events, read_topic, run

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "pw-9f2c1e7d-never-logged"


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = SecureKafkaBroker(tmp_path_factory.mktemp("secure-kafka"))
    b.start(timeout=120)
    yield b
    b.stop()


@pytest.fixture
def names(unique_name):
    base = unique_name("sec")
    # the DLQ outside the topic's prefix, so that a test can withhold its WRITE alone
    return {"KAFKA_TOPIC": base, "KAFKA_DLQ_TOPIC": "dlq-" + base, "PRODUCER_CHECKPOINT_TOPIC": base + "-ckpt",
            "KAFKA_TOPIC_PARTITIONS": "2"}


def grant_producer(broker, user: str, names: dict, dlq_ops=("ALL",)) -> None:
    broker.add_user(user, PASSWORD)
    grants = [("ALL", "TOPIC", names["KAFKA_TOPIC"], "PREFIXED")]
    grants += [(op, "TOPIC", names["KAFKA_DLQ_TOPIC"], "LITERAL") for op in dlq_ops]
    broker.allow(user, grants)


def producer_env(broker, srv, names, **extra) -> dict:
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.sasl_ssl_bootstrap, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "dpe-producer",
           "KAFKA_SASL_PASSWORD": PASSWORD, "KAFKA_SSL_CA_FILE": str(broker.ca.cert), "ADEME_API_URL": srv.url,
           "DEPARTMENT": "69", "ADEME_PAGE_SIZE": "500", "KAFKA_WAIT_S": "60", **names}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def assert_nothing_written(broker, names) -> None:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)  # the harness's own (super user) door
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    for topic in (names["KAFKA_TOPIC"], names["KAFKA_DLQ_TOPIC"]):
        assert topic not in existing or not read_topic(broker.bootstrap, topic, timeout_s=5), f"{topic} got messages"


def test_producer_over_sasl_ssl_scram_writes_every_row_and_never_logs_the_password(broker, names, standin_factory,
                                                                                    unique_name):
    user = unique_name("dpe-producer")
    grant_producer(broker, user, names)
    srv = standin_factory(Dataset({"69": 1200}, seed=5))
    cp = run(command("produce"), producer_env(broker, srv, names, KAFKA_SASL_USERNAME=user), timeout=180)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-3000:]
    assert len({r.key for r in read_topic(broker.bootstrap, names["KAFKA_TOPIC"])}) == 1200
    assert PASSWORD not in out


def test_mutual_tls_client_certificate_is_the_user(broker, names, standin_factory, tmp_path):
    client = broker.ca.issue("dpe-mtls", server=False)
    broker.allow("dpe-mtls", [("ALL", "TOPIC", names["KAFKA_TOPIC"], "PREFIXED"),
                              ("ALL", "TOPIC", names["KAFKA_DLQ_TOPIC"], "LITERAL")])
    srv = standin_factory(Dataset({"69": 700}, seed=6))
    env = producer_env(broker, srv, names, KAFKA_BOOTSTRAP_SERVERS=broker.ssl_bootstrap, KAFKA_SECURITY_PROTOCOL="SSL",
                       KAFKA_SSL_CERT_FILE=client.cert, KAFKA_SSL_KEY_FILE=client.key)
    for name in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"):
        env.pop(name)
    cp = run(command("produce"), env, timeout=180)
    assert cp.returncode == 0, (cp.stdout + cp.stderr)[-3000:]
    assert len({r.key for r in read_topic(broker.bootstrap, names["KAFKA_TOPIC"])}) == 700


def _refused(broker, names, srv, needle_setting: str, **extra) -> str:
    cp = run(command("produce"), producer_env(broker, srv, names, **extra), timeout=120)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 2, f"exit {cp.returncode}, expected 2 (a setting):\n{out[-3000:]}"
    errors = events(out, "config_error")
    assert len(errors) == 1, out[-3000:]
    assert needle_setting in errors[0]["msg"], errors[0]
    assert PASSWORD not in out and "BEGIN" not in out
    assert_nothing_written(broker, names)
    return errors[0]["msg"]


def test_wrong_scram_password_is_exit_2_naming_the_password_setting(broker, names, standin_factory, unique_name):
    user = unique_name("dpe-producer")
    grant_producer(broker, user, names)
    srv = standin_factory(Dataset({"69": 100}, seed=7))
    msg = _refused(broker, names, srv, "KAFKA_SASL_PASSWORD", KAFKA_SASL_USERNAME=user,
                   KAFKA_SASL_PASSWORD="not-" + PASSWORD[4:])
    assert user in msg


def test_a_ca_that_did_not_sign_the_broker_is_exit_2_naming_the_ca_setting(broker, names, standin_factory, tmp_path,
                                                                          unique_name):
    user = unique_name("dpe-producer")
    grant_producer(broker, user, names)
    other = TestCA(tmp_path / "other-ca", name="another CA")
    srv = standin_factory(Dataset({"69": 100}, seed=8))
    msg = _refused(broker, names, srv, "KAFKA_SSL_CA_FILE", KAFKA_SASL_USERNAME=user, KAFKA_SSL_CA_FILE=other.cert)
    assert "not signed" in msg


def test_a_user_without_write_on_the_dlq_is_exit_2_before_any_row(broker, names, standin_factory, unique_name):
    user = unique_name("dpe-producer")
    grant_producer(broker, user, names, dlq_ops=("DESCRIBE", "CREATE"))
    srv = standin_factory(Dataset({"69": 300}, seed=10))
    msg = _refused(broker, names, srv, f"WRITE on topic {names['KAFKA_DLQ_TOPIC']}", KAFKA_SASL_USERNAME=user)
    assert f"User:{user}" in msg


def _topics_made_elsewhere(broker, names, which=("KAFKA_TOPIC", "KAFKA_DLQ_TOPIC", "PRODUCER_CHECKPOINT_TOPIC")):
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)  # the platform team's (super user) door
    try:
        admin.create_topics([NewTopic(names[k], 2 if k == "KAFKA_TOPIC" else 1, 1) for k in which])
    finally:
        admin.close()


def test_topics_managed_elsewhere_a_topic_we_may_not_see_is_the_acl_to_grant(broker, names, standin_factory,
                                                                              unique_name):
    """KAFKA_CREATE_TOPICS=false and docs/chart.md's ACLs but WRITE on the DLQ: the DLQ exists, yet our
    principal cannot even DESCRIBE it (WRITE gives that).  The line names the missing WRITE, not a topic
    to create."""
    user = unique_name("dpe-producer")
    broker.add_user(user, PASSWORD)
    broker.allow(user, [("WRITE", "TOPIC", names["KAFKA_TOPIC"], "LITERAL"),
                        ("READ", "TOPIC", names["PRODUCER_CHECKPOINT_TOPIC"], "LITERAL"),
                        ("WRITE", "TOPIC", names["PRODUCER_CHECKPOINT_TOPIC"], "LITERAL")])
    _topics_made_elsewhere(broker, names)
    srv = standin_factory(Dataset({"69": 100}, seed=14))
    msg = _refused(broker, names, srv, f"WRITE on topic {names['KAFKA_DLQ_TOPIC']}", KAFKA_SASL_USERNAME=user,
                   KAFKA_CREATE_TOPICS="false")
    assert f"User:{user}" in msg and "do not exist" not in msg


def test_topics_managed_elsewhere_a_missing_one_is_named_with_an_authorizer(broker, names, standin_factory,
                                                                            unique_name):
    """The counterpart: every ACL granted, the checkpoint topic never created: named as missing."""
    user = unique_name("dpe-producer")
    grant_producer(broker, user, names)
    _topics_made_elsewhere(broker, names, ("KAFKA_TOPIC", "KAFKA_DLQ_TOPIC"))
    srv = standin_factory(Dataset({"69": 100}, seed=15))
    msg = _refused(broker, names, srv, "KAFKA_CREATE_TOPICS=false", KAFKA_SASL_USERNAME=user,
                   KAFKA_CREATE_TOPICS="false")
    assert names["PRODUCER_CHECKPOINT_TOPIC"] in msg and names["KAFKA_DLQ_TOPIC"] not in msg, msg


# ---------------------------------------------------------------------------------------------
# the settings themselves
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("env, needle", [
    ({"KAFKA_SECURITY_PROTOCOL": "TLS"}, "KAFKA_SECURITY_PROTOCOL='TLS' is not one of"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "u"}, "needs KAFKA_SASL_PASSWORD"),
    ({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p",
      "KAFKA_SASL_MECHANISM": "GSSAPI"}, "KAFKA_SASL_MECHANISM='GSSAPI'"),
    ({"KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"}, "does not use SASL"),
    ({"KAFKA_SSL_CA_FILE": "/etc/hostname"}, "does not use TLS"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CA_FILE": "/nonexistent/ca.crt"}, "KAFKA_SSL_CA_FILE='/nonexistent"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERT_FILE": "/etc/hostname"}, "go together"),
    ({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CHECK_HOSTNAME": "perhaps"}, "KAFKA_SSL_CHECK_HOSTNAME"),
])
def test_security_settings_errors_name_the_variable(env, needle):
    with pytest.raises(ConfigError) as err:
        KafkaSettings.from_env(env)
    assert needle in str(err.value)


def test_secrets_stay_out_of_reprs_and_options_say_what_kafka_python_expects():
    sec = KafkaSecurity.from_env({"KAFKA_SECURITY_PROTOCOL": "sasl_ssl", "KAFKA_SASL_USERNAME": "u",
                                  "KAFKA_SASL_PASSWORD": PASSWORD, "KAFKA_SSL_CA_FILE": "/etc/hostname"})
    assert PASSWORD not in repr(sec) and PASSWORD not in repr(KafkaSettings.from_env({}))
    assert client_options(sec) == {
        "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512", "sasl_plain_username": "u",
        "sasl_plain_password": PASSWORD, "ssl_check_hostname": True, "ssl_cafile": "/etc/hostname",
        "ssl_certfile": None, "ssl_keyfile": None}
    assert client_options(None) == {"security_protocol": "PLAINTEXT"}


CLIENTS = {"KafkaConsumer", "KafkaProducer", "KafkaAdminClient"}


def unsecured_clients(source: str, filename: str) -> list[str]:
    """``file:line`` of every Kafka client built in a function that never calls ``client_options``."""
    tree = ast.parse(source, filename=filename)
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
        names = {c.func.id if isinstance(c.func, ast.Name) else getattr(c.func, "attr", None) for c in calls}
        if "client_options" in names:
            continue
        out += [f"{filename}:{c.lineno}" for c in calls
                if (c.func.id if isinstance(c.func, ast.Name) else getattr(c.func, "attr", None)) in CLIENTS]
    return out


def test_every_kafka_client_of_the_package_gets_the_security_settings():
    found = []
    for path in sorted((ROOT / "src" / "dpe_ingest").rglob("*.py")):
        found += unsecured_clients(path.read_text(), str(path.relative_to(ROOT)))
    assert not found, f"Kafka clients built without kafka_security.client_options: {found}"


def test_the_client_check_sees_a_client_without_the_settings():
    planted = "def f(b):\n    from kafka import KafkaConsumer\n    return KafkaConsumer(bootstrap_servers=b)\n"
    assert unsecured_clients(planted, "planted.py") == ["planted.py:3"]
    fixed = planted.replace("bootstrap_servers=b)", "bootstrap_servers=b, **client_options(None))")
    assert unsecured_clients(fixed, "planted.py") == []


# ---------------------------------------------------------------------------------------------
# durable topics, and topics managed elsewhere (plain broker: no security involved)
# ---------------------------------------------------------------------------------------------
def plain_env(kafka_bootstrap, srv, names, **extra) -> dict:
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "ADEME_API_URL": srv.url, "DEPARTMENT": "69",
           "KAFKA_WAIT_S": "30", **names}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_topics_managed_elsewhere_a_missing_one_is_named_and_nothing_is_created(kafka_bootstrap, names,
                                                                               standin_factory):
    from kafka import KafkaAdminClient

    srv = standin_factory(Dataset({"69": 50}, seed=11))
    cp = run(command("produce"), plain_env(kafka_bootstrap, srv, names, KAFKA_CREATE_TOPICS="false"), timeout=120)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 2, out[-3000:]
    (err,) = events(out, "config_error")
    for topic in (names["KAFKA_TOPIC"], names["KAFKA_DLQ_TOPIC"], names["PRODUCER_CHECKPOINT_TOPIC"]):
        assert topic in err["msg"], err
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        assert not {names["KAFKA_TOPIC"], names["KAFKA_DLQ_TOPIC"]} & set(admin.list_topics())
    finally:
        admin.close()


def test_a_replication_factor_the_cluster_cannot_hold_is_exit_2_naming_it(kafka_bootstrap, names, standin_factory):
    srv = standin_factory(Dataset({"69": 50}, seed=12))
    cp = run(command("produce"), plain_env(kafka_bootstrap, srv, names, KAFKA_REPLICATION_FACTOR="3"), timeout=120)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 2, out[-3000:]
    (err,) = events(out, "config_error")
    assert "KAFKA_REPLICATION_FACTOR=3" in err["msg"], err


def test_min_insync_replicas_is_set_on_the_topics_created(kafka_bootstrap, names, standin_factory):
    from kafka import KafkaAdminClient
    from kafka.admin import ConfigResource, ConfigResourceType

    srv = standin_factory(Dataset({"69": 50}, seed=13))
    cp = run(command("produce"), plain_env(kafka_bootstrap, srv, names, KAFKA_MIN_INSYNC_REPLICAS="1"), timeout=120)
    assert cp.returncode == 0, (cp.stdout + cp.stderr)[-3000:]
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        for topic in (names["KAFKA_TOPIC"], names["KAFKA_DLQ_TOPIC"], names["PRODUCER_CHECKPOINT_TOPIC"]):
            conf = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])["topic"][topic]
            # a topic override of ours, not the broker's default
            assert conf["min.insync.replicas"]["value"] == "1", (topic, conf)
            assert conf["min.insync.replicas"]["config_source"] == "DYNAMIC_TOPIC_CONFIG", (topic, conf)
    finally:
        admin.close()


def test_min_insync_replicas_above_the_replication_factor_is_refused():
    with pytest.raises(ConfigError, match="KAFKA_MIN_INSYNC_REPLICAS=2 is above KAFKA_REPLICATION_FACTOR=1"):
        KafkaSettings.from_env({"KAFKA_MIN_INSYNC_REPLICAS": "2"})


# ---------------------------------------------------------------------------------------------
# the consumer: secured Kafka in, PostgreSQL over verified TLS out
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_pg(broker, tmp_path_factory):
    from dpe_devkit.testbed import PostgresServer

    server = PostgresServer(tmp_path_factory.mktemp("pg-tls"), tls=broker.ca.issue("postgres", hosts=("localhost",)))
    server.start(timeout=120)
    yield server
    server.cleanup()


def consumer_env(broker, pg, names, user: str, password: str = "dpe", **extra) -> dict:
    env = {"KAFKA_BOOTSTRAP_SERVERS": broker.sasl_ssl_bootstrap, "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "KAFKA_SASL_USERNAME": user, "KAFKA_SASL_PASSWORD": PASSWORD, "KAFKA_SSL_CA_FILE": str(broker.ca.cert),
           # CloudNativePG's way: the URL without TLS settings, the CA beside it (verify-full follows)
           "DATABASE_URL": f"postgresql://dpe:{password}@localhost:{pg.port}/dpe", "PGSSLROOTCERT": str(broker.ca.cert),
           "DB_TABLE": names["KAFKA_TOPIC"].replace("-", "_"), "CONSUMER_GROUP": "grp-" + names["KAFKA_TOPIC"],
           "BATCH_IDLE_MS": "500", "RETRY_MAX_BACKOFF_S": "1", **names}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def grant_consumer(broker, user: str, names: dict, group_ops=("READ",)) -> None:
    broker.add_user(user, PASSWORD)
    grants = [("READ", "TOPIC", names["KAFKA_TOPIC"], "LITERAL"), ("DESCRIBE", "TOPIC", names["KAFKA_TOPIC"], "LITERAL"),
              ("ALL", "TOPIC", names["KAFKA_DLQ_TOPIC"], "LITERAL")]
    grants += [(op, "GROUP", "grp-" + names["KAFKA_TOPIC"], "LITERAL") for op in group_ops]
    broker.allow(user, grants)


def stored_count(pg, table: str) -> int:
    import psycopg2

    with psycopg2.connect(pg.url, connect_timeout=5) as conn, conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s)", (table,))
        if cur.fetchone()[0] is None:
            return 0
        cur.execute(f'SELECT count(*) FROM "{table}"')
        n = cur.fetchone()[0]
    conn.close()
    return n


def test_consumer_reads_sasl_ssl_and_writes_postgresql_over_verified_tls(broker, tls_pg, names, standin_factory,
                                                                        unique_name):
    producer_user, consumer_user = unique_name("dpe-producer"), unique_name("dpe-consumer")
    grant_producer(broker, producer_user, names)
    grant_consumer(broker, consumer_user, names)
    srv = standin_factory(Dataset({"69": 800}, seed=14))
    cp = run(command("produce"), producer_env(broker, srv, names, KAFKA_SASL_USERNAME=producer_user), timeout=180)
    assert cp.returncode == 0, (cp.stdout + cp.stderr)[-3000:]
    env = consumer_env(broker, tls_pg, names, consumer_user)
    cp = run(command("consume", "--exit-when-idle", "3"), env, timeout=240)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 0, out[-3000:]
    assert stored_count(tls_pg, env["DB_TABLE"]) == 800
    assert PASSWORD not in out and ":dpe@" not in out


@pytest.mark.parametrize("case, needle", [
    ("wrong database password", "PGPASSWORD"),
    ("no READ on the group", "READ"),
])
def test_consumer_refusals_are_exit_2_naming_the_setting_and_write_nothing(broker, tls_pg, names, standin_factory,
                                                                           unique_name, case, needle):
    producer_user, consumer_user = unique_name("dpe-producer"), unique_name("dpe-consumer")
    grant_producer(broker, producer_user, names)
    grant_consumer(broker, consumer_user, names, group_ops=() if case == "no READ on the group" else ("READ",))
    srv = standin_factory(Dataset({"69": 200}, seed=15))
    assert run(command("produce"), producer_env(broker, srv, names, KAFKA_SASL_USERNAME=producer_user),
               timeout=180).returncode == 0
    env = consumer_env(broker, tls_pg, names, consumer_user,
                       password="wrong" if case == "wrong database password" else "dpe")
    cp = run(command("consume", "--exit-when-idle", "3"), env, timeout=240)
    out = cp.stdout + cp.stderr
    assert cp.returncode == 2, f"exit {cp.returncode}:\n{out[-3000:]}"
    errors = events(out, "config_error")
    assert len(errors) == 1 and needle in errors[0]["msg"], out[-3000:]
    assert stored_count(tls_pg, env["DB_TABLE"]) == 0
    assert PASSWORD not in out and ":wrong@" not in out
