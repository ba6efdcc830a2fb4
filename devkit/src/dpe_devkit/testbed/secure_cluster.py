"""A secured, replicated Kafka and a TLS PostgreSQL on the test cluster, laid out the way Strimzi and
CloudNativePG lay theirs out (issue 22: ``tests/cluster/test_cluster_byo.py``).

``StrimziKafka``: a KRaft cluster of ``replicas`` nodes (broker and controller each, a StatefulSet of the
test Kafka image ``dpe-test/kafka``, started by the image's own ``/etc/kafka/docker/run`` as the chart's
Kafka is), named as Strimzi names a ``Kafka`` called ``cluster``: pods ``<cluster>-kafka-<n>``, headless
Service ``<cluster>-kafka-brokers``, bootstrap Service ``<cluster>-kafka-bootstrap``.  Listeners, as
Strimzi's: ``CONTROLLER`` 9090 and ``REPLICATION`` 9091 (TLS, client certificates required: the brokers
and the operators, the only super users), ``TLS`` 9093 (SASL_SSL, SCRAM-SHA-512: the users).  Certificates
from a ``TestCA`` made by the caller, naming every pod and the bootstrap Service.  ``StandardAuthorizer``,
nothing allowed without an ACL.  Its Secrets are Strimzi's: ``<cluster>-cluster-ca-cert`` (``ca.crt``),
and ``user_secret`` gives a KafkaUser's (``password``, ``sasl.jaas.config``).

``CnpgPostgres``: PostgreSQL 15 (``dpe-test/postgres``) with ``ssl=on``, its server certificate from a
``TestCA`` naming the ``<cluster>-rw`` Service; CloudNativePG's Secrets ``<cluster>-app`` (username, user,
password, dbname, host, port, pgpass, uri, jdbc-uri, fqdn-uri, fqdn-jdbc-uri) and ``<cluster>-ca``
(``ca.crt``, ``ca.key``), Service ``<cluster>-rw``.

``KafkaOperator``: what Strimzi's User and Topic Operators do (SCRAM users, ACLs, topics from
KafkaTopic specs), plus the reads a test needs (brokers, partitions and their leaders, topic configs,
end offsets, the keys of a topic), through the REPLICATION listener with the operators' certificate.
Each call runs this module (``python -m dpe_devkit.testbed.secure_cluster REQUEST.json``) inside the
cluster's network (``Cluster.run_in_network``), where the pods' names resolve.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

from .tls import TestCA

CLUSTER_DOMAIN = "cluster.local"
CONTROLLER_PORT, REPLICATION_PORT, TLS_PORT = 9090, 9091, 9093
KAFKA_UID, PG_UID = 1000, 999  # the test images' users (those of apache/kafka and postgres)
_SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule required"


def _restricted(uid: int) -> tuple[dict, dict]:
    """Pod and container security contexts that Pod Security ``restricted`` admits."""
    pod = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "fsGroup": uid,
           "seccompProfile": {"type": "RuntimeDefault"}}
    container = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "allowPrivilegeEscalation": False,
                 "capabilities": {"drop": ["ALL"]}}
    return pod, container


def _secret(name: str, namespace: str, data: dict[str, str], labels: dict | None = None,
            type_: str = "Opaque") -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "type": type_,
            "metadata": {"name": name, "namespace": namespace, "labels": labels or {}},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def _default_image(role: str) -> str:
    from .images import CLUSTER_IMAGES

    return CLUSTER_IMAGES[role]


# ---------------------------------------------------------------------------------------------
# Kafka, as Strimzi runs it
# ---------------------------------------------------------------------------------------------
class StrimziKafka:
    def __init__(self, workdir: Path | str, namespace: str, cluster: str = "prod", replicas: int = 3,
                 image: str | None = None, heap: str = "-Xmx256m -Xms256m") -> None:
        self.workdir = Path(workdir).resolve()
        self.namespace, self.cluster, self.replicas = namespace, cluster, replicas
        self.image = image or _default_image("kafka")
        self.heap = heap
        self.cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()  # Kafka's Uuid form
        # Strimzi's cluster CA: it signs the brokers' certificates; clients trust its ca.crt
        self.ca = TestCA(self.workdir / "cluster-ca", name=f"cluster-ca {cluster}")
        svc = f"{self.bootstrap_service}.{namespace}"
        hosts = tuple(self.fqdn(i) for i in range(replicas)) + (
            self.bootstrap_service, svc, f"{svc}.svc", f"{svc}.svc.{CLUSTER_DOMAIN}")
        self.broker_cert = self.ca.issue(self.broker_principal, server=True, hosts=hosts)
        self.operator_cert = self.ca.issue(self.operator_principal, server=False)

    # -- names ---------------------------------------------------------------------------------
    @property
    def statefulset(self) -> str:
        return f"{self.cluster}-kafka"

    @property
    def headless_service(self) -> str:
        return f"{self.cluster}-kafka-brokers"

    @property
    def bootstrap_service(self) -> str:
        return f"{self.cluster}-kafka-bootstrap"

    @property
    def broker_principal(self) -> str:
        return f"{self.cluster}-kafka"

    @property
    def operator_principal(self) -> str:
        return f"{self.cluster}-entity-operator"

    @property
    def ca_secret_name(self) -> str:
        return f"{self.cluster}-cluster-ca-cert"

    def pod(self, i: int) -> str:
        return f"{self.statefulset}-{i}"

    def fqdn(self, i: int) -> str:
        return f"{self.pod(i)}.{self.headless_service}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def bootstrap(self) -> str:
        """What a client in the cluster's network uses (the SASL_SSL listener, by the bootstrap Service)."""
        return f"{self.bootstrap_service}.{self.namespace}.svc.{CLUSTER_DOMAIN}:{TLS_PORT}"

    @property
    def replication_bootstrap(self) -> str:
        return ",".join(f"{self.fqdn(i)}:{REPLICATION_PORT}" for i in range(self.replicas))

    # -- configuration ---------------------------------------------------------------------------
    def properties(self) -> str:
        """server.properties shared by every node (node.id, listeners and advertised.listeners are the
        pod's own: given as KAFKA_* variables by its start command)."""
        voters = ",".join(f"{i}@{self.fqdn(i)}:{CONTROLLER_PORT}" for i in range(self.replicas))
        min_isr = min(2, self.replicas)
        lines = [
            "process.roles=broker,controller",
            f"controller.quorum.voters={voters}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=REPLICATION",
            "listener.security.protocol.map=CONTROLLER:SSL,REPLICATION:SSL,TLS:SASL_SSL",
            # TLS everywhere, certificates from the cluster CA; the brokers check each other's names
            "ssl.keystore.type=PEM",
            "ssl.keystore.location=/etc/kafka/tls/broker.pem",
            "ssl.truststore.type=PEM",
            "ssl.truststore.location=/etc/kafka/tls/ca.crt",
            "listener.name.controller.ssl.client.auth=required",
            "listener.name.replication.ssl.client.auth=required",
            "ssl.principal.mapping.rules=RULE:^CN=([^,]*).*$/$1/,DEFAULT",
            # the users: SCRAM-SHA-512 over TLS
            "listener.name.tls.sasl.enabled.mechanisms=SCRAM-SHA-512",
            f"listener.name.tls.scram-sha-512.sasl.jaas.config={_SCRAM};",
            "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            f"super.users=User:{self.broker_principal};User:{self.operator_principal}",
            "allow.everyone.if.no.acl.found=false",
            "auto.create.topics.enable=false",
            "log.dirs=/var/lib/kafka/data/kraft-combined-logs",
            "num.partitions=3",
            f"default.replication.factor={self.replicas}",
            f"offsets.topic.replication.factor={self.replicas}",
            f"transaction.state.log.replication.factor={self.replicas}",
            f"transaction.state.log.min.isr={min_isr}",
            f"share.coordinator.state.topic.replication.factor={self.replicas}",
            f"share.coordinator.state.topic.min.isr={min_isr}",
            "group.initial.rebalance.delay.ms=0",
        ]
        return "\n".join(lines) + "\n"

    def ca_secret(self) -> dict:
        """Strimzi's ``<cluster>-cluster-ca-cert`` (ca.crt; Strimzi adds ca.p12 and ca.password)."""
        return _secret(self.ca_secret_name, self.namespace, {"ca.crt": self.ca.cert.read_text()},
                       labels={"strimzi.io/cluster": self.cluster, "strimzi.io/kind": "Kafka"})

    def user_secret(self, user: str, password: str) -> dict:
        """A SCRAM-SHA-512 KafkaUser's Secret, as Strimzi's User Operator writes it: named as the user."""
        return _secret(user, self.namespace, {
            "password": password,
            "sasl.jaas.config": f'{_SCRAM} username="{user}" password="{password}";'},
            labels={"strimzi.io/cluster": self.cluster, "strimzi.io/kind": "KafkaUser"})

    def manifests(self) -> list[dict]:
        ns, labels = self.namespace, {"app.kubernetes.io/name": "kafka", "strimzi.io/cluster": self.cluster}
        pod_sc, container_sc = _restricted(KAFKA_UID)
        fqdn = f"${{HOSTNAME}}.{self.headless_service}.{ns}.svc.{CLUSTER_DOMAIN}"
        start = (
            # node.id from the pod's ordinal; the image's start script does the rest (KAFKA_* -> properties
            # after /mnt/shared/config/server.properties, storage formatted on the first start)
            'exec /etc/kafka/docker/run "KAFKA_NODE_ID=${HOSTNAME##*-}" '
            f'"KAFKA_LISTENERS=CONTROLLER://:{CONTROLLER_PORT},REPLICATION://:{REPLICATION_PORT},TLS://:{TLS_PORT}" '
            f'"KAFKA_ADVERTISED_LISTENERS=REPLICATION://{fqdn}:{REPLICATION_PORT},TLS://{fqdn}:{TLS_PORT}"')
        broker_tls = _secret(f"{self.cluster}-kafka-brokers", ns, {
            "broker.pem": self.broker_cert.pem.read_text(), "ca.crt": self.ca.cert.read_text()}, labels=labels)
        config = {"apiVersion": "v1", "kind": "ConfigMap",
                  "metadata": {"name": f"{self.cluster}-kafka-config", "namespace": ns, "labels": labels},
                  "data": {"server.properties": self.properties()}}
        ports = [{"name": "controller", "port": CONTROLLER_PORT}, {"name": "replication", "port": REPLICATION_PORT},
                 {"name": "tls", "port": TLS_PORT}]
        headless = {"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": self.headless_service, "namespace": ns, "labels": labels},
                    "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": labels,
                             "ports": ports}}
        bootstrap = {"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": self.bootstrap_service, "namespace": ns, "labels": labels},
                     "spec": {"selector": labels, "ports": [{"name": "tls", "port": TLS_PORT}]}}
        probe = {"tcpSocket": {"port": TLS_PORT}}
        sts = {
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": self.statefulset, "namespace": ns, "labels": labels},
            "spec": {
                "replicas": self.replicas, "serviceName": self.headless_service,
                # every node at once: a KRaft quorum needs a majority before any node is ready
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {
                    # no Service variables: a Service named kafka-… would inject KAFKA_* ones, which the
                    # image's start script turns into broker properties
                    "automountServiceAccountToken": False, "enableServiceLinks": False, "securityContext": pod_sc,
                    "terminationGracePeriodSeconds": 60,
                    "containers": [{
                        "name": "kafka", "image": self.image, "imagePullPolicy": "Never",
                        "command": ["bash", "-c", start],
                        "env": [{"name": "CLUSTER_ID", "value": self.cluster_id},
                                {"name": "KAFKA_HEAP_OPTS", "value": self.heap}],
                        "ports": [{"name": p["name"], "containerPort": p["port"]} for p in ports],
                        "startupProbe": {**probe, "periodSeconds": 3, "failureThreshold": 200},
                        "readinessProbe": {**probe, "periodSeconds": 5},
                        "resources": {"requests": {"cpu": "100m", "memory": "512Mi"},
                                      "limits": {"cpu": "1", "memory": "768Mi"}},
                        "securityContext": container_sc,
                        "volumeMounts": [
                            {"name": "data", "mountPath": "/var/lib/kafka/data"},
                            {"name": "config", "mountPath": "/mnt/shared/config", "readOnly": True},
                            {"name": "tls", "mountPath": "/etc/kafka/tls", "readOnly": True},
                            {"name": "tmp", "mountPath": "/tmp"}]}],
                    "volumes": [
                        {"name": "config", "configMap": {"name": config["metadata"]["name"]}},
                        {"name": "tls", "secret": {"secretName": broker_tls["metadata"]["name"], "defaultMode": 0o440}},
                        {"name": "tmp", "emptyDir": {}}]}},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {
                    "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]}}
        return [self.ca_secret(), broker_tls, config, headless, bootstrap, sts]

    def operator(self, cluster: Any) -> "KafkaOperator":
        return KafkaOperator(cluster, self)


# ---------------------------------------------------------------------------------------------
# PostgreSQL, as CloudNativePG runs it
# ---------------------------------------------------------------------------------------------
class CnpgPostgres:
    def __init__(self, workdir: Path | str, namespace: str, cluster: str = "pg", password: str = "",
                 database: str = "app", user: str = "app", image: str | None = None) -> None:
        self.workdir = Path(workdir).resolve()
        self.namespace, self.cluster = namespace, cluster
        self.database, self.user = database, user
        self.password = password or base64.b32encode(os.urandom(15)).decode().lower()
        self.image = image or _default_image("postgres")
        self.ca = TestCA(self.workdir / "pg-ca", name=f"{cluster} CA")
        rw = self.rw_service
        self.server_cert = self.ca.issue(rw, server=True, hosts=(
            rw, f"{rw}.{namespace}", f"{rw}.{namespace}.svc", f"{rw}.{namespace}.svc.{CLUSTER_DOMAIN}"))

    @property
    def rw_service(self) -> str:
        return f"{self.cluster}-rw"

    @property
    def host(self) -> str:
        """The read-write Service by its full name (from the cluster's network)."""
        return f"{self.rw_service}.{self.namespace}.svc.{CLUSTER_DOMAIN}"

    @property
    def pod(self) -> str:
        return f"{self.cluster}-0"

    def app_secret(self, name: str | None = None, password: str | None = None) -> dict:
        """CloudNativePG's ``<cluster>-app`` (pkg/specs/secrets.go ``CreateSecret``), type basic-auth;
        ``name``/``password`` make a copy of it with another password."""
        pw = self.password if password is None else password
        ns, rw, port = self.namespace, self.rw_service, 5432

        def uri(host: str) -> str:
            return f"postgresql://{self.user}:{urllib.parse.quote(pw, safe='')}@{host}:{port}/{self.database}"

        def jdbc(host: str) -> str:
            q = urllib.parse.urlencode({"password": pw, "user": self.user})
            return f"jdbc:postgresql://{host}:{port}/{self.database}?{q}"

        short, fq = f"{rw}.{ns}", f"{rw}.{ns}.svc.{CLUSTER_DOMAIN}"
        return _secret(name or f"{self.cluster}-app", ns, {
            "username": self.user, "user": self.user, "password": pw, "dbname": self.database, "host": rw,
            "port": str(port), "pgpass": f"{rw}:{port}:{self.database}:{self.user}:{pw}\n",
            "uri": uri(short), "jdbc-uri": jdbc(short), "fqdn-uri": uri(fq), "fqdn-jdbc-uri": jdbc(fq)},
            labels={"cnpg.io/cluster": self.cluster, "cnpg.io/userType": "app"}, type_="kubernetes.io/basic-auth")

    def ca_secret(self) -> dict:
        return _secret(f"{self.cluster}-ca", self.namespace, {"ca.crt": self.ca.cert.read_text(),
                                                              "ca.key": self.ca.key.read_text()},
                       labels={"cnpg.io/cluster": self.cluster})

    def manifests(self) -> list[dict]:
        ns, labels = self.namespace, {"app.kubernetes.io/name": "postgresql", "cnpg.io/cluster": self.cluster}
        pod_sc, container_sc = _restricted(PG_UID)
        container_sc = {**container_sc, "readOnlyRootFilesystem": True}
        server = _secret(f"{self.cluster}-server", ns, {"tls.crt": self.server_cert.cert.read_text(),
                                                        "tls.key": self.server_cert.key.read_text()},
                         labels=labels, type_="kubernetes.io/tls")
        is_ready = {"exec": {"command": ["pg_isready", "-h", "127.0.0.1", "-p", "5432", "-U", self.user,
                                         "-d", self.database]}}
        sts = {
            "apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": self.cluster, "namespace": ns, "labels": labels},
            "spec": {
                "replicas": 1, "serviceName": self.rw_service, "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {
                    "automountServiceAccountToken": False, "enableServiceLinks": False, "securityContext": pod_sc,
                    "containers": [{
                        "name": "postgres", "image": self.image, "imagePullPolicy": "Never",
                        # ssl=on with the certificate the CA signed (the key: root's, readable by group
                        # 999 (fsGroup) only: PostgreSQL accepts a key owned by root up to mode 0640)
                        "args": ["postgres", "-c", "ssl=on", "-c", "ssl_cert_file=/etc/pg-tls/tls.crt",
                                 "-c", "ssl_key_file=/etc/pg-tls/tls.key"],
                        "env": [{"name": "POSTGRES_USER", "value": self.user},
                                {"name": "POSTGRES_DB", "value": self.database},
                                {"name": "POSTGRES_PASSWORD", "valueFrom": {"secretKeyRef": {
                                    "name": f"{self.cluster}-app", "key": "password"}}},
                                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
                        "ports": [{"name": "postgresql", "containerPort": 5432}],
                        "startupProbe": {**is_ready, "periodSeconds": 2, "failureThreshold": 150},
                        "readinessProbe": {**is_ready, "periodSeconds": 5},
                        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"},
                                      "limits": {"cpu": "1", "memory": "512Mi"}},
                        "securityContext": container_sc,
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/postgresql/data"},
                                         {"name": "run", "mountPath": "/var/run/postgresql"},
                                         {"name": "tmp", "mountPath": "/tmp"},
                                         {"name": "tls", "mountPath": "/etc/pg-tls", "readOnly": True}]}],
                    "volumes": [{"name": "data", "emptyDir": {}}, {"name": "run", "emptyDir": {}},
                                {"name": "tmp", "emptyDir": {}},
                                {"name": "tls", "secret": {"secretName": server["metadata"]["name"],
                                                           "defaultMode": 0o440}}]}}}}
        rw = {"apiVersion": "v1", "kind": "Service",
              "metadata": {"name": self.rw_service, "namespace": ns, "labels": labels},
              "spec": {"selector": labels, "ports": [{"name": "postgres", "port": 5432}]}}
        return [self.app_secret(), self.ca_secret(), server, sts, rw]


# ---------------------------------------------------------------------------------------------
# the operators' work, run inside the cluster's network
# ---------------------------------------------------------------------------------------------
class KafkaOperator:
    """Users, ACLs and topics of a ``StrimziKafka``, and what a test reads back, as its super user."""

    def __init__(self, cluster: Any, kafka: StrimziKafka) -> None:
        self.cluster, self.kafka = cluster, kafka

    def run(self, *ops: dict, timeout: float = 300) -> list[Any]:
        """Run ``ops`` (dicts with "op": wait_brokers, add_user, allow, create_topics, describe_topics,
        end_offsets, keys) in one process inside the cluster's network; their results, in order."""
        k = self.kafka
        request = {"bootstrap": k.replication_bootstrap, "cafile": str(k.ca.cert),
                   "certfile": str(k.operator_cert.cert), "keyfile": str(k.operator_cert.key), "ops": list(ops)}
        fd, path = tempfile.mkstemp(prefix="kafka-operator-", suffix=".json", dir=k.workdir)
        try:
            with os.fdopen(fd, "w") as fh:  # mode 0600: it may hold passwords
                json.dump(request, fh)
            res = self.cluster.run_in_network([sys.executable, "-m", __name__, path], env=dict(os.environ),
                                              timeout=timeout)
        finally:
            os.unlink(path)
        if res.returncode != 0:
            raise RuntimeError(f"Kafka operator call {[o['op'] for o in ops]} failed (exit {res.returncode}):\n"
                               f"{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])


def _ops(request: dict) -> list[Any]:
    from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
    from kafka.admin import (ACL, ACLOperation, ACLPermissionType, ACLResourcePatternType, ConfigResource,
                             ConfigResourceType, NewTopic, ResourcePattern, ResourceType, ScramMechanism,
                             UserScramCredentialUpsertion)

    tls = {"security_protocol": "SSL", "ssl_cafile": request["cafile"], "ssl_certfile": request["certfile"],
           "ssl_keyfile": request["keyfile"]}
    boot = request["bootstrap"].split(",")
    admin = None
    out: list[Any] = []

    def connect(deadline: float) -> Any:
        last: BaseException | None = None
        while time.monotonic() < deadline:
            try:
                return KafkaAdminClient(bootstrap_servers=boot, client_id="dpe-test-operator",
                                        request_timeout_ms=20000, **tls)
            except Exception as exc:  # noqa: BLE001 - brokers still starting: try again until the deadline
                last = exc
                time.sleep(2)
        raise TimeoutError(f"no broker of {boot} answered: {last!r}")

    try:
        for op in request["ops"]:
            kind = op["op"]
            deadline = time.monotonic() + float(op.get("timeout", 120))
            if admin is None:
                admin = connect(deadline)
            if kind == "wait_brokers":
                while True:
                    try:  # registered and unfenced (caught up with the metadata): able to hold replicas
                        brokers = sorted(b["broker_id"] for b in admin.describe_cluster()["brokers"]
                                         if not b.get("is_fenced"))
                    except Exception as exc:  # noqa: BLE001
                        brokers = [repr(exc)]
                    if len(brokers) >= op["n"] and all(isinstance(b, int) for b in brokers):
                        out.append(brokers)
                        break
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"brokers registered: {brokers}, wanted {op['n']}")
                    time.sleep(2)
            elif kind == "add_user":
                errors = admin.alter_user_scram_credentials([UserScramCredentialUpsertion(
                    op["name"], ScramMechanism.SCRAM_SHA_512, op["password"])])
                if any(errors.values()):
                    raise RuntimeError(f"SCRAM credential of {op['name']} refused: {errors}")
                out.append(op["name"])
            elif kind == "allow":
                acls = [ACL(principal=f"User:{op['user']}", host="*", operation=ACLOperation[o],
                            permission_type=ACLPermissionType.ALLOW,
                            resource_pattern=ResourcePattern(ResourceType[r], n, ACLResourcePatternType[p]))
                        for o, r, n, p in op["grants"]]
                result = admin.create_acls(acls)
                failed = result.get("failed") if isinstance(result, dict) else None
                if failed:
                    raise RuntimeError(f"create_acls failed: {failed}")
                out.append(len(acls))
            elif kind == "create_topics":
                admin.create_topics([NewTopic(t["name"], t["partitions"], t["replicas"],
                                              topic_configs={k: str(v) for k, v in t.get("config", {}).items()})
                                     for t in op["topics"]])
                out.append([t["name"] for t in op["topics"]])
            elif kind == "list_topics":
                out.append(sorted(admin.list_topics()))
            elif kind == "describe_topics":
                found = {}
                for t in admin.describe_topics(op["names"]):
                    if t.get("error_code"):
                        found[t["name"]] = {"error_code": t["error_code"]}
                        continue
                    conf = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t["name"])])
                    found[t["name"]] = {
                        "partitions": {str(p["partition_index"]): {"leader": p["leader_id"],
                                                                   "replicas": sorted(p["replica_nodes"]),
                                                                   "isr": sorted(p["isr_nodes"])}
                                       for p in t["partitions"]},
                        "config": {k: v["value"] for k, v in conf["topic"][t["name"]].items()}}
                out.append(found)
            elif kind in ("end_offsets", "keys"):
                consumer = KafkaConsumer(bootstrap_servers=boot, client_id="dpe-test-operator-reader",
                                         enable_auto_commit=False, **tls)
                try:
                    topics = op["topics"] if kind == "end_offsets" else [op["topic"]]
                    known = set(admin.list_topics())
                    tps = [TopicPartition(t, p) for t in topics if t in known
                           for p in sorted(consumer.partitions_for_topic(t) or ())]
                    ends = consumer.end_offsets(tps) if tps else {}
                    if kind == "end_offsets":
                        out.append({t: (sum(v for tp, v in ends.items() if tp.topic == t) if t in known else None)
                                    for t in topics})
                        continue
                    consumer.assign(tps)
                    consumer.seek_to_beginning(*tps)
                    keys: dict[str, int] = {}
                    while any(consumer.position(tp) < ends[tp] for tp in tps):
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"reading {topics} did not reach its end offsets {ends}")
                        for records in consumer.poll(timeout_ms=1000).values():
                            for r in records:
                                if r.offset < ends[TopicPartition(r.topic, r.partition)]:
                                    key = (r.key or b"").decode("utf-8", "replace")
                                    keys[key] = keys.get(key, 0) + 1
                    out.append(keys)
                finally:
                    consumer.close()
            else:
                raise ValueError(f"unknown operation {kind}")
    finally:
        if admin is not None:
            admin.close()
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dpe_devkit.testbed.secure_cluster REQUEST.json (see KafkaOperator)", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    print(json.dumps(_ops(request)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
