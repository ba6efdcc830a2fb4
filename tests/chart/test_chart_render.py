"""helm template assertions: producer Jobs per department, env, volumes, secrets, switches."""

from __future__ import annotations

import base64

import pytest

from chartlib import CHART, by_kind, container, env_of, named, pod_spec, producer_jobs, render_notes

STANDIN_URL = "http://dpe-standin:8000/data-fair/api/v1/datasets/dpe03existant"


def test_one_job_per_department_canonical_codes(render):
    docs = render.template(sets={"departments": "{69,1,2a}"})
    jobs = producer_jobs(docs)
    assert list(jobs) == ["69", "01", "2A"]
    for code, job in jobs.items():
        name = job["metadata"]["name"]
        assert name.startswith(f"dpe-producer-{code.lower()}-"), name
        assert len(name) <= 63
        tpl_labels = job["spec"]["template"]["metadata"]["labels"]
        assert tpl_labels["app.kubernetes.io/component"] == "producer"
        assert tpl_labels["dpe-ingest/department"] == code
        assert job["metadata"]["labels"]["dpe-ingest/department"] == code
        c = container(job, "producer")
        assert c["command"] == ["dpe-ingest", "produce"]
        env = env_of(c)
        assert env["DEPARTMENT"] == code
        assert env["ADEME_API_URL"] == "https://data.ademe.fr/data-fair/api/v1/datasets/dpe03existant"
        assert env["ADEME_PAGE_SIZE"] == "1000"
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == "dpe-kafka:9092"
        assert env["KAFKA_TOPIC"] == "dpe-lines"
        assert env["KAFKA_DLQ_TOPIC"] == "dpe-lines-dlq"
        assert env["KAFKA_TOPIC_PARTITIONS"] == "6"
        assert env["PRODUCER_RESTART"] == "false"
        assert env["LOG_FORMAT"] == "logfmt"
        assert "ADEME_MAX_RPS" not in env and "ADEME_DATE_FROM" not in env
        assert job["spec"]["backoffLimit"] == 4
        assert "ttlSecondsAfterFinished" not in job["spec"]
        assert pod_spec(job)["restartPolicy"] == "Never"


@pytest.mark.parametrize(
    "how, value, expected",
    [
        ("set", "{69,01,38}", ["69", "01", "38"]),
        ("set", "{2A,2b,971,976}", ["2A", "2B", "971", "976"]),
        ("set", "{975,977,978,988,none}", ["975", "977", "978", "988", "none"]),
        ("set_string", "69 NONE 988", ["69", "none", "988"]),
        ("set", "69", ["69"]),
        ("set", "{69,69,069}", None),  # 069 is not a code
        ("set_string", r"69\,01\,38", ["69", "01", "38"]),
        ("set_string", "69 1 2a", ["69", "01", "2A"]),
        ("set_string", r"69\,\,01", ["69", "01"]),
        ("set", "{69,1,01}", ["69", "01"]),  # duplicates collapse
    ],
)
def test_department_forms(render, how, value, expected):
    kw = {"sets" if how == "set" else "set_strings": {"departments": value}}
    if expected is None:
        err = render.template_error(**kw)
        assert 'invalid department code "069"' in err
        return
    assert list(producer_jobs(render.template(**kw))) == expected


def test_departments_from_values_file_with_yaml_numbers(render, tmp_path):
    f = tmp_path / "v.yaml"
    f.write_text("departments: [69, 1, '2a', 971, '01']\n")
    assert list(producer_jobs(render.template(values_files=[f]))) == ["69", "01", "2A", "971"]


def test_job_options(render):
    docs = render.template(sets={"departments": "{38}", "producer.ttlSecondsAfterFinished": "600",
                                 "producer.backoffLimit": "2", "ademe.maxRps": "2.5",
                                 "ademe.dateFrom": "2024-01-01", "ademe.dateTo": "2024-06-30",
                                 "kafka.topicPartitions": "12"})
    job = producer_jobs(docs)["38"]
    assert job["spec"]["ttlSecondsAfterFinished"] == 600
    assert job["spec"]["backoffLimit"] == 2
    env = env_of(container(job, "producer"))
    assert env["ADEME_MAX_RPS"] == "2.5"
    assert (env["ADEME_DATE_FROM"], env["ADEME_DATE_TO"]) == ("2024-01-01", "2024-06-30")
    assert env["KAFKA_TOPIC_PARTITIONS"] == "12"
    # the broker's default partitions follow too
    kafka = named(docs, "StatefulSet", "dpe-kafka")
    assert env_of(container(kafka))["KAFKA_NUM_PARTITIONS"] == "12"


def test_jobs_fail_at_once_on_exit_codes_that_a_retry_cannot_fix(render):
    from dpe_ingest import kafka_wait, producer

    job = producer_jobs(render.template())["69"]
    rules = job["spec"]["podFailurePolicy"]["rules"]
    fail = [r["onExitCodes"] for r in rules if r["action"] == "FailJob"]
    # the init container's too: wait-for-kafka exits 2 on a refused password or CA (issue 22; without its
    # rule the Job retried that pod backoffLimit times)
    assert fail == [{"containerName": name, "operator": "In", "values": [producer.EXIT_CONFIG, producer.EXIT_REFUSED]}
                    for name in ("producer", "wait-for-kafka")]
    assert kafka_wait.EXIT_CONFIG == producer.EXIT_CONFIG
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]} in rules
    assert pod_spec(job)["restartPolicy"] == "Never"  # podFailurePolicy requires it
    # no init container, no rule naming it (the API refuses a containerName the pod does not have)
    job = producer_jobs(render.template(sets={"producer.waitForKafka": "false"}))["69"]
    assert [r["onExitCodes"]["containerName"] for r in job["spec"]["podFailurePolicy"]["rules"]
            if r["action"] == "FailJob"] == ["producer"]


def test_wait_for_kafka_init_container(render):
    job = producer_jobs(render.template())["69"]
    init = pod_spec(job)["initContainers"]
    assert [c["name"] for c in init] == ["wait-for-kafka"]
    assert init[0]["image"] == container(job, "producer")["image"]
    assert env_of(init[0])["KAFKA_BOOTSTRAP_SERVERS"] == "dpe-kafka:9092"
    assert init[0]["command"] == ["python", "-m", "dpe_ingest.kafka_wait"]  # the product's own bounded wait
    assert env_of(init[0])["KAFKA_WAIT_S"] == "300"
    job = producer_jobs(render.template(sets={"producer.waitForKafka": "false"}))["69"]
    assert "initContainers" not in pod_spec(job)


def test_images_default_to_app_version(render):
    docs = render.template()
    job = producer_jobs(docs)["69"]
    assert container(job, "producer")["image"] == "dpe-ingest-producer:0.1.0"
    assert container(job, "producer")["imagePullPolicy"] == "IfNotPresent"
    consumer = named(docs, "Deployment", "dpe-consumer")
    assert container(consumer)["image"] == "dpe-ingest-consumer:0.1.0"
    assert container(named(docs, "StatefulSet", "dpe-kafka"))["image"] == "apache/kafka:4.4.0"
    pg_image = container(named(docs, "StatefulSet", "dpe-postgresql"))["image"]
    assert pg_image.startswith("postgres:15.") and pg_image != "postgres:15"
    assert container(named(docs, "Deployment", "dpe-kafdrop"))["image"].startswith("obsidiandynamics/kafdrop:4.")
    docs = render.template(sets={"producer.image.tag": "dev", "consumer.image.repository": "reg/c"})
    assert container(producer_jobs(docs)["69"], "producer")["image"] == "dpe-ingest-producer:dev"
    assert container(named(docs, "Deployment", "dpe-consumer"))["image"] == "reg/c:0.1.0"


def test_consumer_deployment(render):
    docs = render.template(sets={"consumer.replicas": "2", "consumer.batchSize": "250"})
    dep = named(docs, "Deployment", "dpe-consumer")
    assert dep["spec"]["replicas"] == 2
    assert pod_spec(dep)["terminationGracePeriodSeconds"] >= 60
    c = container(dep)
    assert c["command"] == ["dpe-ingest", "consume"]
    env = env_of(c)
    assert env["DATABASE_URL"] == "postgresql://dpe@dpe-postgresql:5432/dpe"
    assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "dpe-postgresql", "key": "password"}}
    assert env["BATCH_SIZE"] == "250"
    assert env["BATCH_IDLE_MS"] == "1000"
    assert env["CONSUMER_GROUP"] == "dpe-sink"
    assert env["DB_TABLE"] == "dpe_data"
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == "dpe-kafka:9092"
    assert env["KAFKA_TOPIC"] == "dpe-lines"


def test_kafka_statefulset(render):
    docs = render.template()
    sts = named(docs, "StatefulSet", "dpe-kafka")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["serviceName"] == "dpe-kafka-headless"
    (vct,) = sts["spec"]["volumeClaimTemplates"]
    assert vct["spec"]["resources"]["requests"]["storage"] == "2Gi"
    c = container(sts)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/var/lib/kafka/data"] == vct["metadata"]["name"]
    env = env_of(c)
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_NODE_ID"] == "1"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@localhost:9093"
    assert env["KAFKA_LOG_DIRS"].startswith("/var/lib/kafka/data/")
    assert env["KAFKA_ADVERTISED_LISTENERS"] == "PLAINTEXT://dpe-kafka-0.dpe-kafka-headless.dpe.svc.cluster.local:9092"
    assert "-Xmx512m" in env["KAFKA_HEAP_OPTS"]
    assert c["readinessProbe"] and c["livenessProbe"]
    headless = named(docs, "Service", "dpe-kafka-headless")
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    client = named(docs, "Service", "dpe-kafka")
    assert client["spec"]["ports"][0]["port"] == 9092
    assert client["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    # no pod gets the docker-link variables (a Service named kafka would inject KAFKA_PORT=tcp://…,
    # which the apache/kafka image would read as a broker setting)
    for d in docs:
        spec = pod_spec(d)
        if spec is not None:
            assert spec["enableServiceLinks"] is False, d["metadata"]["name"]


def test_postgresql_statefulset_and_secret(render):
    docs = render.template(sets={"postgresql.auth.password": "s3cret"})
    sts = named(docs, "StatefulSet", "dpe-postgresql")
    (vct,) = sts["spec"]["volumeClaimTemplates"]
    c = container(sts)
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert mounts["/var/lib/postgresql/data"] == vct["metadata"]["name"]
    env = env_of(c)
    assert env["PGDATA"].startswith("/var/lib/postgresql/data/") and env["PGDATA"] != "/var/lib/postgresql/data/"
    assert env["POSTGRES_USER"] == "dpe" and env["POSTGRES_DB"] == "dpe"
    assert env["POSTGRES_PASSWORD"] == {"secretKeyRef": {"name": "dpe-postgresql", "key": "password"}}
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"][0] == "pg_isready"
    secret = named(docs, "Secret", "dpe-postgresql")
    assert base64.b64decode(secret["data"]["password"]).decode() == "s3cret"
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert named(docs, "Service", "dpe-postgresql")["spec"]["ports"][0]["port"] == 5432


def test_no_password_in_plain_env(render):
    docs = render.template(sets={"postgresql.auth.password": "s3cret-value"})
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        for c in spec["containers"] + spec.get("initContainers", []):
            for e in c.get("env", []):
                assert "s3cret-value" not in str(e.get("value", "")), (d["metadata"]["name"], e)
                if "PASSWORD" in e["name"]:
                    assert "valueFrom" in e, (d["metadata"]["name"], e["name"])
    rendered_plain = [d for d in docs if d["kind"] != "Secret"]
    assert "s3cret-value" not in str(rendered_plain)


def test_generated_password(render):
    a = named(render.template(), "Secret", "dpe-postgresql")["data"]["password"]
    b = named(render.template(), "Secret", "dpe-postgresql")["data"]["password"]
    pa, pb = base64.b64decode(a).decode(), base64.b64decode(b).decode()
    assert len(pa) == 24 and pa.isalnum()
    assert pa != pb  # without a cluster (no lookup result) each render draws a new one


def test_external_kafka_and_postgresql(render):
    docs = render.template(
        values_files=[CHART / "values-external.yaml"],
    )
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not [k for k in kinds if "kafka" in k[1] and k[0] in ("StatefulSet", "Service")]
    assert not [k for k in kinds if "postgresql" in k[1] and k[0] in ("StatefulSet", "Service", "Secret")]
    assert not by_kind(docs, "StatefulSet") and not by_kind(docs, "PersistentVolumeClaim")
    bootstrap = "kafka-0.kafka.data.svc.cluster.local:9092,kafka-1.kafka.data.svc.cluster.local:9092"
    for job in producer_jobs(docs).values():
        env = env_of(container(job, "producer"))
        assert env["KAFKA_BOOTSTRAP_SERVERS"] == bootstrap
        assert env["KAFKA_REPLICATION_FACTOR"] == "3"
        assert env["ADEME_MAX_RPS"] == "2"
    env = env_of(container(named(docs, "Deployment", "dpe-consumer")))
    assert env["DATABASE_URL"] == "postgresql://dpe@postgres.data.svc.cluster.local:5432/dpe"
    assert env["PGPASSWORD"] == {"secretKeyRef": {"name": "dpe-db", "key": "password"}}
    assert env["KAFKA_BOOTSTRAP_SERVERS"] == bootstrap
    kafdrop = named(docs, "Deployment", "dpe-kafdrop")
    assert env_of(container(kafdrop))["KAFKA_BROKERCONNECT"] == bootstrap


def test_external_postgresql_without_secret(render):
    docs = render.template(sets={"postgresql.enabled": "false",
                                 "externalPostgresql.url": "postgresql://dpe@db:5432/dpe"})
    env = env_of(container(named(docs, "Deployment", "dpe-consumer")))
    assert env["DATABASE_URL"] == "postgresql://dpe@db:5432/dpe"
    assert "PGPASSWORD" not in env


def test_standin_switch(render):
    docs = render.template()
    assert not [d for d in docs if d["metadata"]["name"] == "dpe-standin"]
    docs = render.template(sets={"standin.enabled": "true", "standin.rowsPerDepartment": "250"})
    dep = named(docs, "Deployment", "dpe-standin")
    c = container(dep)
    assert c["command"] == ["dpe-ingest", "ademe-standin", "--host", "0.0.0.0", "--port", "8000",
                            "--rows-per-department", "250"]
    assert c["image"] == "dpe-ingest-producer:0.1.0"
    svc = named(docs, "Service", "dpe-standin")
    assert svc["spec"]["ports"][0]["port"] == 8000
    for job in producer_jobs(docs).values():
        assert env_of(container(job, "producer"))["ADEME_API_URL"] == STANDIN_URL


def test_offline_values(render):
    docs = render.template(values_files=[CHART / "values-offline.yaml"])
    assert list(producer_jobs(docs)) == ["69", "01", "38"]
    assert named(docs, "Deployment", "dpe-standin")
    assert not [d for d in docs if d["metadata"]["name"] == "dpe-kafdrop"]


def test_kafdrop(render):
    docs = render.template()
    dep = named(docs, "Deployment", "dpe-kafdrop")
    env = env_of(container(dep))
    assert env["KAFKA_BROKERCONNECT"] == "dpe-kafka:9092"
    assert "JVM_OPTS" in env
    assert named(docs, "Service", "dpe-kafdrop")["spec"]["ports"][0]["port"] == 9000
    assert named(docs, "Service", "dpe-kafdrop")["spec"]["type"] == "ClusterIP"
    docs = render.template(sets={"kafdrop.enabled": "false"})
    assert not [d for d in docs if "kafdrop" in d["metadata"]["name"]]


def test_helm_test_pods(render):
    docs = render.template()
    pods = {p["metadata"]["name"]: p for p in by_kind(docs, "Pod")}
    assert set(pods) == {"dpe-test-postgresql", "dpe-test-kafka"}
    for p in pods.values():
        assert p["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert p["spec"]["restartPolicy"] == "Never"
    pg = pods["dpe-test-postgresql"]["spec"]["containers"][0]
    assert "dpe_data" in str(pg["env"]) and "psql" in pg["command"][2]
    assert env_of(pg)["PGPASSWORD"] == {"secretKeyRef": {"name": "dpe-postgresql", "key": "password"}}
    # Kafka answers with the pipeline's own connection settings (the product's wait, which knows SASL/TLS)
    kafka = pods["dpe-test-kafka"]["spec"]["containers"][0]
    assert kafka["command"] == ["python", "-m", "dpe_ingest.kafka_wait"]
    assert kafka["image"].startswith("dpe-ingest-producer:")
    assert env_of(kafka)["KAFKA_BOOTSTRAP_SERVERS"] == "dpe-kafka:9092"


def test_names_follow_release_and_override(render):
    docs = render.template(release="ingest")
    assert named(docs, "StatefulSet", "ingest-kafka")
    assert all(j["metadata"]["name"].startswith("ingest-producer-69-") for j in producer_jobs(docs).values())
    docs = render.template(sets={"fullnameOverride": "x"}, release="long-" + "a" * 40)
    assert named(docs, "Deployment", "x-consumer")
    docs = render.template(release="r" * 53, sets={"departments": "{976,none}"})
    for d in docs:
        assert len(d["metadata"]["name"]) <= 63, d["metadata"]["name"]


def test_rows_without_a_department_get_a_dns_safe_job(render):
    import re

    jobs = producer_jobs(render.template(sets={"departments": "{69,none}"}))
    assert list(jobs) == ["69", "none"]
    name = jobs["none"]["metadata"]["name"]
    assert re.fullmatch(r"dpe-producer-none-[0-9a-f]{8}", name), name
    assert env_of(container(jobs["none"], "producer"))["DEPARTMENT"] == "none"


def test_labels_select_by_component_and_department(render):
    docs = render.template(sets={"departments": "{69,38}"})
    for d in docs:
        labels = d["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "dpe"
        assert labels["app.kubernetes.io/name"] == "dpe-ingest"
        assert labels["app.kubernetes.io/component"]
    jobs = producer_jobs(docs)
    assert {j["spec"]["template"]["metadata"]["labels"]["dpe-ingest/department"] for j in jobs.values()} == {"69", "38"}


def test_notes(render, tmp_path):
    notes = render_notes(render, tmp_path, sets={"departments": "{69,01,38}"})
    assert "kubectl -n dpe logs -f -l app.kubernetes.io/component=producer --max-log-requests 20" in notes
    assert "-l dpe-ingest/department=69" in notes
    assert "port-forward svc/dpe-kafdrop 9000:9000" in notes
    assert "SELECT departement, count(*) FROM dpe_data GROUP BY 1" in notes
    assert "producer.rerun.69=1" in notes
    # the department it suggests adding is one not installed yet
    assert '--reuse-values --set departments="{69,01,38,13}"' in notes
    notes = render_notes(render, tmp_path / "c", sets={"departments": "{38,13,33,75,59,31,44,67}"})
    assert "Add a department" not in notes and "producer.rerun.38=1" in notes
    notes = render_notes(render, tmp_path / "b", values_files=[CHART / "values-external.yaml"])
    assert "port-forward svc/dpe-kafdrop" in notes
    assert 'psql "postgresql://dpe@postgres.data.svc.cluster.local:5432/dpe"' in notes


def test_one_api_budget_shared_by_every_producer(render):
    import json

    docs = render.template(sets={"departments": "{69,01,38,13}"})
    budget = named(docs, "ConfigMap", "dpe-api-budget")
    shared = json.loads(budget["data"]["budget.json"])
    assert shared == {"maxTotalRps": 8, "departments": 4}
    # the rendered default stays comfortably under data-fair's anonymous 600 requests/min
    assert shared["maxTotalRps"] * 60 < 600
    for job in producer_jobs(docs).values():
        spec = pod_spec(job)
        env = env_of(container(job, "producer"))
        assert env["ADEME_BUDGET_FILE"] == "/etc/dpe-ingest/budget/budget.json" and "ADEME_MAX_RPS" not in env
        mount = next(m for m in container(job, "producer")["volumeMounts"] if m["name"] == "api-budget")
        assert mount["mountPath"] == "/etc/dpe-ingest/budget" and mount["readOnly"] is True
        vol = next(v for v in spec["volumes"] if v["name"] == "api-budget")
        assert vol["configMap"]["name"] == "dpe-api-budget"
    # the share lives in the ConfigMap, not in the Jobs: adding a department replaces no Job
    more = render.template(sets={"departments": "{69,01,38,13,33}"})
    before = {c: j["metadata"]["name"] for c, j in producer_jobs(docs).items()}
    after = {c: j["metadata"]["name"] for c, j in producer_jobs(more).items()}
    assert all(after[c] == name for c, name in before.items())
    assert json.loads(named(more, "ConfigMap", "dpe-api-budget")["data"]["budget.json"])["departments"] == 5
    few = render.template(sets={"departments": "{69,01,38,13,33}", "producer.maxConcurrent": "2"})
    assert json.loads(named(few, "ConfigMap", "dpe-api-budget")["data"]["budget.json"])["departments"] == 2
    assert {env_of(container(j, "producer"))["PRODUCER_MAX_CONCURRENT"] for j in producer_jobs(few).values()} == {"2"}
    assert "PRODUCER_MAX_CONCURRENT" not in env_of(container(producer_jobs(docs)["69"], "producer"))
    own = render.template(sets={"ademe.maxRps": "0.5"})
    assert env_of(container(producer_jobs(own)["69"], "producer"))["ADEME_MAX_RPS"] == "0.5"


def test_api_key_comes_from_a_secret_and_never_into_a_configmap(render):
    docs = render.template(sets={"departments": "{69,none}", "ademe.apiKey.existingSecret": "ademe-key",
                                 "ademe.apiKey.secretKey": "token"})
    for job in producer_jobs(docs).values():
        ref = env_of(container(job, "producer"))["ADEME_API_KEY"]
        assert ref == {"secretKeyRef": {"name": "ademe-key", "key": "token"}}
    for cm in by_kind(docs, "ConfigMap"):
        assert "ademe-key" not in str(cm) and "token" not in str(cm.get("data", {}))
    assert "ADEME_API_KEY" not in env_of(container(producer_jobs(render.template())["69"], "producer"))
    err = render.template_error(sets={"ademe.apiKey.existingSecret": "Bad_Name"})
    assert "existingSecret" in err


def test_refresh_schedule_gives_one_cronjob_per_department(render):
    from dpe_ingest import config

    assert not by_kind(render.template(), "CronJob")  # off by default
    docs = render.template(release="r" * 53, sets={"departments": "{69,2a,none}", "refresh.schedule": "0 3 * * 0",
                                                   "ademe.apiKey.existingSecret": "ademe-key"})
    jobs = {j["metadata"]["labels"]["dpe-ingest/department"]: j for j in by_kind(docs, "CronJob")}
    assert set(jobs) == {"69", "2A", "none"}
    for code, cj in jobs.items():
        name = cj["metadata"]["name"]
        assert len(name) <= 52 and name.endswith(f"-refresh-{code.lower()}"), name
        assert cj["spec"]["schedule"] == "0 3 * * 0" and cj["spec"]["concurrencyPolicy"] == "Forbid"
        c = container(cj, "refresh")
        assert c["command"] == ["dpe-ingest", "produce", "--refresh"]
        assert c["image"].startswith("dpe-ingest-consumer:")  # psycopg2: it reads the department's keys
        env = env_of(c)
        assert env["DEPARTMENT"] == code and env["DB_TABLE"] == "dpe_data" and env["CONSUMER_GROUP"] == "dpe-sink"
        assert env["PGPASSWORD"]["secretKeyRef"]["key"] == "password"
        assert env["ADEME_API_KEY"] == {"secretKeyRef": {"name": "ademe-key", "key": "apiKey"}}
        assert set(env) - set(config.CONTRACT) == {"PGPASSWORD"}
        plain = {k: v for k, v in env.items() if isinstance(v, str)}
        cfg = config.ProducerConfig.from_env(plain)
        assert cfg.department == code and cfg.budget_file == "/etc/dpe-ingest/budget/budget.json"
        assert config.ConsumerConfig.from_env(plain).table == "dpe_data"
        spec = pod_spec(cj)
        assert spec["restartPolicy"] == "Never" and spec["securityContext"]["runAsNonRoot"] is True
