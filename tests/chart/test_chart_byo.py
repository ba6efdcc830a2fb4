"""Bring your own Kafka and PostgreSQL (issue 22): the chart's connection values, as docs/chart.md shows them.

* The examples of docs/chart.md's section "Bring your own Kafka and PostgreSQL" are read from the doc
  and rendered as they are: what each program gets (env, Secret volumes), the Strimzi KafkaTopics
  against Strimzi's own CRD (tests/schemas/), no password or key in any literal.
* The chart refuses, with a sentence, what the clients would refuse (schema and templates).
* The real proof without a cluster: the Strimzi + CloudNativePG example rendered, its Secrets laid out
  as those operators lay them out and materialized as the kubelet would (env from secretKeyRef, Secret
  volumes as files of mode 0440), and the rendered producers (init container first), consumer and
  analytics run as processes against a SASL_SSL (SCRAM-SHA-512) broker with an authorizer that grants
  exactly the `always` ACL rows of docs/chart.md, and a PostgreSQL with ssl=on (verify-full); ending in
  exact reconciliation of the table and of the analytics counts.
"""

from __future__ import annotations

import json
import os
import re
import secrets as pysecrets
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import yaml

import reconcile as rec
from chartlib import ROOT, by_kind, container, env_of, named, pod_spec, producer_jobs
from test_chart_analytics import _pruned

DOC = ROOT / "docs" / "chart.md"
CRD = ROOT / "tests" / "schemas" / "strimzi-1.2.0-kafkatopics.crd.yaml"
VENV_BIN = ROOT / ".venv" / "bin"
SECTION = "## Bring your own Kafka and PostgreSQL"


# ------------------------------------------------------------------------------ the doc, read
def _section() -> str:
    text = DOC.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    return text[start:end]


def doc_examples() -> dict[str, dict]:
    """file name of the example's first comment line -> its values."""
    out = {}
    for block in re.findall(r"```yaml\n(.*?)```", _section(), re.S):
        name = re.match(r"# (\S+\.yaml)", block).group(1)
        out[name] = yaml.safe_load(block)
    return out


def doc_acls() -> list[dict[str, str]]:
    """The rows of the ACL table: program, operation, resource, name, pattern, when."""
    rows, cols = [], None
    for line in _section().splitlines():
        cells = [c.strip().strip("`") for c in line.strip().strip("|").split("|")]
        if cells[:2] == ["program", "operation"]:
            cols = cells
            continue
        if cols and line.startswith("|") and not set(line) <= set("|- "):
            rows.append(dict(zip(cols, cells)))
        elif cols and not line.startswith("|"):
            break
    assert rows, "no ACL table in the section"
    return rows


#: the API budget's topic and group in the ACL table (``<producer.checkpointTopic>-budget-<n>``)
BUDGET = "<producer.checkpointTopic>-budget-<n>"
BUDGET_PARTITIONS = yaml.safe_load((ROOT / "charts" / "dpe-ingest" / "values.yaml").read_text())["producer"]["budgetPartitions"]


def with_budget(names: dict[str, str]) -> dict[str, str]:
    """``names`` (the ACL table's names) with the budget's, as the chart derives it from the checkpoint
    topic and the default ``producer.budgetPartitions``."""
    return {**names, BUDGET: f"{names['producer.checkpointTopic']}-budget-{BUDGET_PARTITIONS}"}


def pipeline_grants(names: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """What a pipeline with the chart's defaults needs on a cluster whose topics are managed elsewhere:
    the ``always`` rows of the ACL table and the API budget's (``producer.budgetPartitions`` > 0) but its
    CREATE, one grant per operation: (operation, resource, name, pattern).  ``names``: the table's names."""
    grants = []
    for row in doc_acls():
        if row["when"] == "always" or ("budgetPartitions" in row["when"] and "createTopics" not in row["when"]):
            grants += [(op, row["resource"], names[row["name"]], row["pattern"]) for op in row["operation"].split(", ")]
    return sorted(set(grants))


def _values_file(tmp_path: Path, values: dict) -> Path:
    f = tmp_path / f"values-{uuid.uuid4().hex[:6]}.yaml"
    f.write_text(yaml.safe_dump(values))
    return f


def _containers(docs):
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield d, spec, c


@pytest.fixture(scope="module")
def examples() -> dict[str, dict]:
    ex = doc_examples()
    assert set(ex) == {"values-byo.yaml", "values-byo-explicit.yaml"}, set(ex)
    return ex


# ------------------------------------------------------------------------------ rendered
def test_the_strimzi_cloudnativepg_example_gives_every_program_the_operators_secrets(render, examples, tmp_path):
    docs = render.template(values_files=[_values_file(tmp_path, examples["values-byo.yaml"])])
    kafka_env = {
        "KAFKA_BOOTSTRAP_SERVERS": "prod-kafka-bootstrap:9093", "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SASL_USERNAME": "dpe-ingest",
        "KAFKA_SASL_PASSWORD": {"secretKeyRef": {"name": "dpe-ingest", "key": "password"}},
        "KAFKA_SSL_CA_FILE": "/etc/dpe-ingest/kafka-ca/ca.crt",
    }
    pg_env = {"DATABASE_URL": "postgresql://", "PGSSLMODE": "verify-full",
              "PGSSLROOTCERT": "/etc/dpe-ingest/postgresql-ca/ca.crt"}
    for var, key in (("PGHOST", "host"), ("PGPORT", "port"), ("PGDATABASE", "dbname"), ("PGUSER", "username"),
                     ("PGPASSWORD", "password")):
        pg_env[var] = {"secretKeyRef": {"name": "pg-app", "key": key}}
    kafka_users, pg_users = set(), set()
    for d, spec, c in _containers(docs):
        env = env_of(c)
        if "KAFKA_BOOTSTRAP_SERVERS" in env:
            kafka_users.add(c["name"])
            assert {k: env.get(k) for k in kafka_env} == kafka_env, c["name"]
            assert "KAFKA_SSL_CERT_FILE" not in env and "KAFKA_SSL_CHECK_HOSTNAME" not in env
        if "DATABASE_URL" in env:
            pg_users.add(c["name"])
            assert {k: env.get(k) for k in pg_env} == pg_env, c["name"]
        if "KAFKA_TOPIC" in env:
            assert env["KAFKA_REPLICATION_FACTOR"] == "3" and env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
            assert env["KAFKA_CREATE_TOPICS"] == "false"
    assert kafka_users == {"wait-for-kafka", "producer", "consumer", "analytics", "kafka"}, kafka_users
    assert pg_users == {"consumer", "analytics", "psql"}, pg_users
    # nothing of the bundled servers, no Kafdrop, no generated Secret
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not [k for k in kinds if k[0] in ("StatefulSet", "Secret") or "kafdrop" in k[1]], kinds


def test_the_explicit_example(render, examples, tmp_path):
    docs = render.template(values_files=[_values_file(tmp_path, examples["values-byo-explicit.yaml"])])
    env = env_of(container(named(docs, "Deployment", "dpe-consumer")))
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "b-1.kafka.example.com:9096,b-2.kafka.example.com:9096"
    assert env["KAFKA_SASL_PASSWORD"] == {"secretKeyRef": {"name": "dpe-kafka", "key": "password"}}
    assert "KAFKA_SSL_CA_FILE" not in env  # the image's system CAs
    assert {k: env[k] for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSSLMODE")} == {
        "PGHOST": "dpe.db.example.com", "PGPORT": "5432", "PGDATABASE": "dpe", "PGUSER": "dpe",
        "PGSSLMODE": "verify-full"}
    assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "dpe-db", "key": "password"}}
    assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2" and "KAFKA_CREATE_TOPICS" not in env
    assert not by_kind(docs, "KafkaTopic")


MTLS = {"kafka.enabled": "false", "externalKafka.strimzi.cluster": "prod", "externalKafka.strimzi.user": "dpe",
        "externalKafka.strimzi.authentication": "tls", "postgresql.enabled": "false",
        "externalPostgresql.url": "postgresql://dpe@db:5432/dpe", "externalPostgresql.existingSecret": "db",
        "externalPostgresql.caSecret": "db-ca", "externalPostgresql.caKey": "root.pem",
        "externalPostgresql.clientSecret": "db-client", "kafdrop.enabled": "false", "refresh.schedule": "0 3 * * 0"}


def test_mutual_tls_takes_the_kafkausers_certificate_and_every_file_is_a_mounted_secret(render, examples, tmp_path):
    """Every env value naming a file is a file of a Secret volume of that pod, mounted read-only in that
    container (mode 0440, the key mapped to the file name): for each example and the mTLS variant."""
    renders = [render.template(sets=MTLS)]
    renders += [render.template(values_files=[_values_file(tmp_path, v)]) for v in examples.values()]
    env = env_of(container(named(renders[0], "Deployment", "dpe-consumer")))
    assert env["KAFKA_SECURITY_PROTOCOL"] == "SSL" and "KAFKA_SASL_USERNAME" not in env
    assert env["KAFKA_SSL_CERT_FILE"] == "/etc/dpe-ingest/kafka-client/tls.crt"
    assert env["PGSSLCERT"] == "/etc/dpe-ingest/postgresql-client/tls.crt"
    files = 0
    for docs in renders:
        for d, spec, c in _containers(docs):
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            for name, value in env_of(c).items():
                if not (isinstance(value, str) and value.startswith("/etc/dpe-ingest/")) or "BUDGET" in name:
                    continue
                directory, filename = value.rsplit("/", 1)
                mount = mounts[directory]
                assert mount["readOnly"] is True, (c["name"], name)
                secret = volumes[mount["name"]]["secret"]
                assert secret["defaultMode"] == 0o440
                assert filename in [i["path"] for i in secret["items"]], (c["name"], name)
                files += 1
    assert files > 20
    (vol,) = [v for v in pod_spec(named(renders[0], "Deployment", "dpe-consumer"))["volumes"]
              if v["name"] == "kafka-client-cert"]
    assert vol["secret"] == {"secretName": "dpe", "defaultMode": 0o440,
                             "items": [{"key": "user.crt", "path": "tls.crt"}, {"key": "user.key", "path": "tls.key"}]}
    (vol,) = [v for v in pod_spec(named(renders[0], "Deployment", "dpe-consumer"))["volumes"]
              if v["name"] == "postgresql-ca"]
    assert vol["secret"]["items"] == [{"key": "root.pem", "path": "ca.crt"}]


def test_no_secret_is_ever_a_literal(render, examples, tmp_path):
    """Passwords only as secretKeyRef; no rendered ConfigMap, Secret data of ours or env literal holds a
    password, a key or a certificate."""
    renders = [render.template(sets=MTLS)]
    renders += [render.template(values_files=[_values_file(tmp_path, v)]) for v in examples.values()]
    renders.append(render.template(sets={"postgresql.auth.existingSecret": "mine"}))
    for docs in renders:
        for d, spec, c in _containers(docs):
            for e in c.get("env", []):
                if re.search(r"PASSWORD|_KEY$|PGSSLKEY", e["name"]) and e["name"] != "ADEME_API_KEY":
                    is_file = e["name"] in ("KAFKA_SSL_KEY_FILE", "PGSSLKEY")
                    assert ("valueFrom" in e) != is_file, e
                assert "BEGIN" not in str(e.get("value", "")) and "password=" not in str(e.get("value", ""))
                assert not re.search(r"://[^/@]*:[^/@]*@", str(e.get("value", ""))), e  # user:password@
        for d in by_kind(docs, "ConfigMap") + by_kind(docs, "Secret"):
            assert not re.search(r"(?i)password|BEGIN", json.dumps(d.get("data", {}))), d["metadata"]["name"]
    # the bundled PostgreSQL with the user's Secret: no Secret generated, the server and the programs use it
    docs = renders[-1]
    assert not by_kind(docs, "Secret")
    pg = container(named(docs, "StatefulSet", "dpe-postgresql"))
    assert env_of(pg)["POSTGRES_PASSWORD"] == {"secretKeyRef": {"name": "mine", "key": "password"}}
    assert env_of(container(named(docs, "Deployment", "dpe-consumer")))["PGPASSWORD"] == \
        {"secretKeyRef": {"name": "mine", "key": "password"}}


def test_the_defaults_add_nothing(render):
    """The bundled default: no security env, no Secret volume, no topic setting beyond the old ones."""
    docs = render.template()
    for d, spec, c in _containers(docs):
        env = env_of(c)
        assert not {k for k in env if k.startswith(("KAFKA_SSL", "KAFKA_SASL", "KAFKA_SECURITY"))}, c["name"]
        assert not {"KAFKA_CREATE_TOPICS", "KAFKA_MIN_INSYNC_REPLICAS", "PGHOST", "PGSSLROOTCERT"} & set(env)
        assert not [v for v in spec.get("volumes", []) if "secret" in v], c["name"]


@pytest.mark.parametrize("rf, min_isr, want", [("3", None, "2"), ("2", None, None), ("5", None, "2"),
                                               ("3", "0", None), ("3", "3", "3"), ("1", None, None)])
def test_min_insync_replicas(render, rf, min_isr, want):
    sets = {"kafka.enabled": "false", "externalKafka.bootstrapServers": "k:9092", "kafka.topics.replicationFactor": rf}
    if min_isr is not None:
        sets["kafka.topics.minInsyncReplicas"] = min_isr
    env = env_of(container(producer_jobs(render.template(sets=sets))["69"], "producer"))
    assert env.get("KAFKA_MIN_INSYNC_REPLICAS") == want and env["KAFKA_REPLICATION_FACTOR"] == rf


def test_strimzi_kafkatopics_match_the_crd(render, examples, tmp_path):
    import jsonschema

    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = version["schema"]["openAPIV3Schema"]
    values = dict(examples["values-byo.yaml"], producer={"maxConcurrent": 2, "checkpointTopic": "Ckpt_Topic"})
    docs = render.template(values_files=[_values_file(tmp_path, values)])
    topics = {t["spec"]["topicName"]: t for t in by_kind(docs, "KafkaTopic")}
    assert set(topics) == {"dpe-lines", "dpe-lines-dlq", "Ckpt_Topic", "Ckpt_Topic-slots-2", "Ckpt_Topic-budget-120"}
    for t in topics.values():
        assert t["apiVersion"] == f"{crd['spec']['group']}/v1" and t["kind"] == crd["spec"]["names"]["kind"]
        jsonschema.validate(t, schema)
        assert _pruned(t, schema) == []
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == "prod"
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", t["metadata"]["name"]), t["metadata"]["name"]
        assert t["spec"]["replicas"] == 3 and t["spec"]["config"]["min.insync.replicas"] == 2
    assert topics["dpe-lines"]["spec"]["partitions"] == 6
    assert topics["Ckpt_Topic"]["spec"]["config"]["cleanup.policy"] == "compact"
    assert topics["Ckpt_Topic"]["metadata"]["name"] == "ckpt-topic"
    # the API budget's group topic, as many partitions as shares (producer.budgetPartitions; 0 = none)
    assert topics["Ckpt_Topic-budget-120"]["spec"]["partitions"] == 120
    values["producer"]["budgetPartitions"] = 0
    docs = render.template(values_files=[_values_file(tmp_path, values)])
    assert "Ckpt_Topic-budget-120" not in {t["spec"]["topicName"] for t in by_kind(docs, "KafkaTopic")}
    # the check can fail: a misspelt field, too many replicas
    bad = json.loads(json.dumps(topics["dpe-lines"]))
    bad["spec"]["replica"] = 3
    assert _pruned(bad, schema) == [".spec.replica"]
    bad["spec"]["replicas"] = 0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


# ------------------------------------------------------------------------------ refusals
EXT = {"kafka.enabled": "false", "externalKafka.bootstrapServers": "k:9093"}


def test_schema_refuses_replicas_the_bundled_broker_cannot_hold(render):
    err = render.template_error(sets={"kafka.topics.replicationFactor": "3"})
    assert "values don't meet the specifications of the schema" in err, err
    assert "at '/kafka/topics/replicationFactor'" in err and "runs ONE broker" in err, err
    assert "kafka.enabled=false" in err
    render.template(sets={**EXT, "kafka.topics.replicationFactor": "3"})  # fine with your own Kafka
    # the key moved: the old one is named
    err = render.template_error(sets={"kafka.replicationFactor": "3"})
    assert "additional properties 'replicationFactor' not allowed" in err, err


@pytest.mark.parametrize("sets, needle", [
    ({**EXT, "kafka.topics.replicationFactor": "2", "kafka.topics.minInsyncReplicas": "3"},
     "kafka.topics.minInsyncReplicas=3 is above kafka.topics.replicationFactor=2"),
    ({**EXT, "externalKafka.securityProtocol": "SASL_SSL"}, "needs externalKafka.sasl.username and externalKafka.sasl.existingSecret"),
    ({**EXT, "externalKafka.securityProtocol": "SASL_SSL", "externalKafka.sasl.username": "u"}, "externalKafka.sasl.existingSecret"),
    ({**EXT, "externalKafka.sasl.username": "u", "externalKafka.sasl.existingSecret": "s"}, "uses no SASL"),
    ({**EXT, "externalKafka.tls.caSecret": "ca"}, "uses no TLS"),
    ({**EXT, "externalKafka.securityProtocol": "SASL_PLAINTEXT", "externalKafka.sasl.username": "u",
      "externalKafka.sasl.existingSecret": "s", "externalKafka.tls.caSecret": "ca"}, "uses no TLS"),
    ({"kafka.enabled": "false", "externalKafka.strimzi.cluster": "prod"}, "needs externalKafka.strimzi.user"),
    ({"kafka.enabled": "false", "externalKafka.strimzi.cluster": "prod", "externalKafka.strimzi.user": "u"},
     "kafdrop.enabled=true: the chart's Kafdrop connects in PLAINTEXT only"),
    ({"kafka.topics.strimzi.enabled": "true"}, "needs kafka.topics.strimzi.cluster"),
    ({"postgresql.enabled": "false", "externalPostgresql.cloudnativepg.cluster": "pg", "externalPostgresql.url": "postgresql://u@h/d"},
     "externalPostgresql.url is given together with"),
    ({"postgresql.enabled": "false", "externalPostgresql.cloudnativepg.cluster": "pg", "externalPostgresql.sslMode": "prefer"},
     "externalPostgresql.sslMode=prefer with a CA"),
    ({"postgresql.enabled": "false", "externalPostgresql.database": "d"}, "externalPostgresql.cloudnativepg.cluster"),
])
def test_refusals_name_the_values(render, sets, needle):
    err = render.template_error(sets=sets)
    assert needle in err, err


@pytest.mark.parametrize("sets, path", [
    ({**EXT, "externalKafka.securityProtocol": "TLS"}, "/externalKafka/securityProtocol"),
    ({**EXT, "externalKafka.sasl.mechanism": "GSSAPI"}, "/externalKafka/sasl/mechanism"),
    ({**EXT, "externalKafka.strimzi.authentication": "scram-sha-256"}, "/externalKafka/strimzi/authentication"),
    ({"externalPostgresql.sslMode": "verify"}, "/externalPostgresql/sslMode"),
    ({"externalPostgresql.cloudnativepg.name": "pg"}, "/externalPostgresql/cloudnativepg"),
])
def test_schema_refusals(render, sets, path):
    err = render.template_error(sets=sets)
    assert f"at '{path}'" in err, err


# ------------------------------------------------------------------------------ wired: the real proof
ROWS = {"69": 180, "01": 90, "38": 60}


class Kubelet:
    """What the kubelet does for a container: env from secretKeyRef, Secret volumes as files (items,
    defaultMode) under a directory of the pod that stands for the container's mountPath."""

    def __init__(self, secrets: dict[str, dict[str, str]], root: Path) -> None:
        self.secrets, self.root = secrets, root

    def env(self, spec: dict, c: dict) -> dict[str, str]:
        pod_dir = self.root / uuid.uuid4().hex[:8]
        where = {}
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            secret = volumes[m["name"]].get("secret")
            if not secret:
                continue
            d = pod_dir / m["name"]
            d.mkdir(parents=True)
            for item in secret["items"]:
                f = d / item["path"]
                f.write_text(self.secrets[secret["secretName"]][item["key"]])
                f.chmod(secret["defaultMode"])
            where[m["mountPath"]] = d
        env = {}
        for name, value in env_of(c).items():
            if isinstance(value, dict):
                ref = value["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]]
            for mount, d in where.items():
                if value.startswith(mount + "/"):
                    value = str(d) + value[len(mount):]
            env[name] = value
        base = {"PATH": f"{VENV_BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(pod_dir), "LANG": "C.UTF-8",
                "PYTHONUNBUFFERED": "1"}
        pod_dir.mkdir(parents=True, exist_ok=True)
        return {**base, **env}


def _argv(c: dict) -> list[str]:
    return list(c["command"]) + list(c.get("args", []))


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    from dpe_devkit.testbed import PostgresServer
    from dpe_devkit.testbed.secure_kafka import SecureKafkaBroker
    from dpe_devkit.testbed.tls import TestCA

    kafka_ca = TestCA(tmp_path_factory.mktemp("strimzi-cluster-ca"), name="cluster-ca prod")
    broker = SecureKafkaBroker(tmp_path_factory.mktemp("secure-kafka"), ca=kafka_ca)
    pg_ca = TestCA(tmp_path_factory.mktemp("cnpg-ca"), name="pg CA")
    pg = PostgresServer(tmp_path_factory.mktemp("pg-tls"), tls=pg_ca.issue("postgres", hosts=("localhost",)))
    broker.start(timeout=180)
    try:
        pg.start(timeout=120)
    except BaseException:
        broker.stop()
        raise
    yield broker, kafka_ca, pg, pg_ca
    broker.stop()
    pg.cleanup()




@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.slow
def test_strimzi_cloudnativepg_example_runs_through_sasl_ssl_acls_and_verify_full(render, examples, secured,
                                                                                 standin_factory, tmp_path):
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic

    from dpe_ingest.standin.data import Dataset

    broker, kafka_ca, pg, pg_ca = secured
    suffix = uuid.uuid4().hex[:8]
    user, password = f"dpe-ingest-{suffix}", "scram-" + pysecrets.token_hex(12)
    names = with_budget({"kafka.topic": f"byo-{suffix}", "kafka.dlqTopic": f"byo-{suffix}-dlq",
                         "producer.checkpointTopic": f"byo-{suffix}-ckpt", "consumer.group": f"byo-sink-{suffix}",
                         "analytics.group": f"byo-analytics-{suffix}"})
    table, prefix = f"byo_{suffix}", f"byo_an_{suffix}"
    ds = Dataset(rows_per_department=ROWS, default_rows=0, seed=22)
    srv = standin_factory(dataset=ds)

    # the doc's example as it is, plus what points it at this machine (the Strimzi bootstrap Service and
    # the three brokers do not exist here: one broker, replication factor 1) and fresh names
    values = json.loads(json.dumps(examples["values-byo.yaml"]))
    values["externalKafka"]["strimzi"]["user"] = user
    values["externalKafka"]["bootstrapServers"] = broker.sasl_ssl_bootstrap
    values["kafka"]["topics"]["replicationFactor"] = 1
    values["kafka"].update(topic=names["kafka.topic"], dlqTopic=names["kafka.dlqTopic"], topicPartitions=3)
    values["producer"] = {"checkpointTopic": names["producer.checkpointTopic"]}
    values["consumer"] = {"group": names["consumer.group"], "table": table, "batchSize": 40, "batchIdleMs": 200}
    values["analytics"] = {"group": names["analytics.group"], "tablePrefix": prefix}
    values["ademe"] = {"apiUrl": srv.url, "pageSize": 50}
    docs = render.template(values_files=[_values_file(tmp_path, values)])

    # Strimzi: the Topic Operator creates the KafkaTopics the chart rendered; the User Operator the user
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)  # the harness's super-user door
    try:
        admin.create_topics([NewTopic(t["spec"]["topicName"], t["spec"]["partitions"], t["spec"]["replicas"],
                                      topic_configs={k: str(v) for k, v in (t["spec"].get("config") or {}).items()})
                             for t in by_kind(docs, "KafkaTopic")])
    finally:
        admin.close()
    broker.add_user(user, password)
    grants = pipeline_grants(names)
    assert len(grants) == 11, grants  # the 9 always, READ on the budget's topic and group
    broker.allow(user, grants)

    # the operators' Secrets, laid out as they lay them out (docs/chart.md quotes where)
    secrets = {
        "prod-cluster-ca-cert": {"ca.crt": kafka_ca.cert.read_text(), "ca.p12": "", "ca.password": ""},
        user: {"password": password, "sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule "
               f'required username="{user}" password="{password}";'},
        "pg-app": {"username": "dpe", "user": "dpe", "password": "dpe", "dbname": "dpe", "host": "localhost",
                   "port": str(pg.port), "uri": f"postgresql://dpe:dpe@localhost:{pg.port}/dpe"},
        "pg-ca": {"ca.crt": pg_ca.cert.read_text(), "ca.key": ""},
    }
    kubelet = Kubelet(secrets, tmp_path / "pods")
    logs, procs = tmp_path / "logs", []
    logs.mkdir()

    def start(name, spec, c):
        env = kubelet.env(spec, c)
        if "METRICS_PORT" in env:  # each pod has a network namespace of its own; here they share one
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                env["METRICS_PORT"] = str(s.getsockname()[1])
        out = open(logs / f"{name}.log", "wb")
        procs.append(subprocess.Popen(_argv(c), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path))
        return procs[-1]

    def log_of(name):
        return (logs / f"{name}.log").read_text()

    admin_url = f"postgresql://dpe:dpe@127.0.0.1:{pg.port}/dpe"
    try:
        consumer_doc, analytics_doc = named(docs, "Deployment", "dpe-consumer"), named(docs, "Deployment", "dpe-analytics")
        consumer = start("consumer", pod_spec(consumer_doc), container(consumer_doc))
        analytics = start("analytics", pod_spec(analytics_doc), container(analytics_doc))
        producers = {}
        jobs = producer_jobs(docs)
        assert set(jobs) == set(ROWS)
        for code, job in jobs.items():
            spec = pod_spec(job)
            for init in spec["initContainers"]:
                done = subprocess.run(_argv(init), env=kubelet.env(spec, init), capture_output=True, text=True,
                                      timeout=180, cwd=tmp_path)
                assert done.returncode == 0, f"{code} {init['name']}: {done.stdout}{done.stderr}"
            producers[code] = start(f"producer-{code}", spec, container(job, "producer"))
        for code, p in producers.items():
            rc = p.wait(timeout=300)
            assert rc == 0, f"producer {code} exited {rc}:\n{log_of(f'producer-{code}')[-3000:]}"
            # the API budget group joined through the granted ACLs and the chart's KafkaTopic
            text = log_of(f"producer-{code}")
            assert "budget_fallback" not in text and "budget_share" in text, text[-3000:]

        want = rec.expected_rows(ds, ROWS)
        got: dict = {}
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and consumer.poll() is None:
            try:
                got = rec.read_table(admin_url, table)
            except Exception:  # noqa: BLE001 - the table does not exist yet
                got = {}
            if len(got) >= len(want):
                break
            time.sleep(1)
        assert consumer.poll() is None, f"consumer exited {consumer.returncode}:\n{log_of('consumer')[-3000:]}"
        rec.assert_rows(want, rec.read_table(admin_url, table))

        counts_want = rec.expected_counts(want)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and analytics.poll() is None:
            try:
                if rec.read_counts(admin_url, prefix) == counts_want:
                    break
            except Exception:  # noqa: BLE001 - tables not created yet
                pass
            time.sleep(1)
        assert analytics.poll() is None, f"analytics exited {analytics.returncode}:\n{log_of('analytics')[-3000:]}"
        rec.assert_counts(counts_want, rec.read_counts(admin_url, prefix))

        # the sink's connections were TLS, verified against pg-ca (verify-full), as the chart's user
        import psycopg2

        with psycopg2.connect(admin_url) as conn, conn.cursor() as cur:
            cur.execute("SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                        "WHERE a.application_name <> '' AND a.pid <> pg_backend_pid() AND a.usename = 'dpe' "
                        "AND a.backend_type = 'client backend'")
            n, all_tls = cur.fetchone()
        assert n >= 1 and all_tls, (n, all_tls)

        for p in (consumer, analytics):
            p.send_signal(signal.SIGTERM)
            assert p.wait(timeout=60) in (0, 143)
        # no password, key or certificate in any log line
        for f in logs.iterdir():
            text = f.read_text()
            assert password not in text and "BEGIN" not in text and ":dpe@" not in text, f.name
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        try:
            import psycopg2

            with psycopg2.connect(admin_url) as conn, conn.cursor() as cur:
                cur.execute(f'DROP TABLE IF EXISTS "{table}"')
                for t in ("keys", "labels", "months", "skipped", "offsets"):
                    cur.execute(f'DROP TABLE IF EXISTS "{prefix}_{t}"')
        except Exception:  # noqa: BLE001 - the server may be gone already
            pass
