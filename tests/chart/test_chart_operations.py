"""Operations gaps of issue 23, at the chart level: the bounded wait for Kafka, NOTES' log command for any
number of departments, the refresh CronJob's env against the producer Job's, per-component placement,
annotations, extras and ServiceAccounts, KAFKA_WAIT_S and PGSSLMODE, and Kafdrop without topic writes."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time

import pytest
import yaml

from dpe_ingest import config
from chartlib import ROOT, by_kind, container, env_of, named, pod_spec, producer_jobs, render_notes

VENV_BIN = ROOT / ".venv" / "bin"
# every component with pods of its own, and the values that render it
COMPONENTS = ("kafka", "postgresql", "producer", "refresh", "consumer", "analytics", "standin", "kafdrop")
ALL_ON = {"standin": {"enabled": True}, "refresh": {"schedule": "0 3 * * 0"}, "kafdrop": {"enabled": True},
          "analytics": {"enabled": True}, "departments": ["69", "2A"]}
MAIN_CONTAINER = {"kafka": "kafka", "postgresql": "postgresql", "producer": "producer", "refresh": "refresh",
                  "consumer": "consumer", "analytics": "analytics", "standin": "standin", "kafdrop": "kafdrop"}
# what only the refresh CronJob has (the database it reads the department's keys from), and what only
# the Job has (a refresh always resumes from the checkpoint): docs/chart.md
CRONJOB_ONLY = {"REFRESH_WAIT_S", "DATABASE_URL", "PGPASSWORD", "PGSSLMODE", "DB_TABLE", "CONSUMER_GROUP"}
JOB_ONLY = {"PRODUCER_RESTART"}


def _values_file(tmp_path, values: dict, name: str = "values.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(values))
    return path


def _pods_of(docs: list[dict], component: str) -> list[dict]:
    """Every object of that component that has a pod template."""
    out = [d for d in docs if pod_spec(d) is not None
           and d["metadata"]["labels"].get("app.kubernetes.io/component") == component]
    assert out, f"no pods of component {component} rendered"
    return out


def _pod_metadata(doc: dict) -> dict:
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
    return doc["spec"]["template"]["metadata"]


def _run_init(init: dict, cwd, timeout: float) -> subprocess.CompletedProcess:
    """An init container's command run here as a process, as the kubelet would, with exactly its env."""
    env = {k: v for k, v in env_of(init).items() if isinstance(v, str)}
    return subprocess.run(list(init["command"]) + list(init.get("args", [])), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd,
                          env={"PATH": f"{VENV_BIN}{os.pathsep}/usr/bin:/bin", "HOME": str(cwd), **env})


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------ 1. the bounded wait for Kafka
def test_wait_for_kafka_gives_up_naming_the_address(render, tmp_path):
    address = f"127.0.0.1:{_closed_port()}"
    docs = render.template(sets={"kafka.enabled": "false", "externalKafka.bootstrapServers": address,
                                 "producer.kafkaWaitSeconds": "3"})
    job = producer_jobs(docs)["69"]
    init = pod_spec(job)["initContainers"][0]
    assert init["name"] == "wait-for-kafka"
    env = {k: v for k, v in env_of(init).items() if isinstance(v, str)}
    assert env["KAFKA_WAIT_S"] == "3" and env["KAFKA_BOOTSTRAP_SERVERS"] == address
    assert set(env) <= set(config.CONTRACT)
    started = time.monotonic()
    proc = _run_init(init, tmp_path, timeout=90)
    took = time.monotonic() - started
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"exit {proc.returncode} after {took:.0f}s:\n{out}"
    first = out.splitlines()[0]
    assert "event=kafka_wait_start" in first and address in first, out  # says what it waits for, first
    last = out.strip().splitlines()[-1]
    assert "event=kafka_gave_up" in last and address in last and "KAFKA_WAIT_S=3" in last, out
    print(f"wait-for-kafka gave up on {address} after {took:.1f}s (KAFKA_WAIT_S=3): {last}")


def test_wait_for_kafka_succeeds_on_an_answering_broker(render, kafka_bootstrap, tmp_path):
    docs = render.template(sets={"kafka.enabled": "false",
                                 "externalKafka.bootstrapServers": kafka_bootstrap.replace(",", r"\,")})
    proc = _run_init(pod_spec(producer_jobs(docs)["69"])["initContainers"][0], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "event=kafka_ready" in proc.stdout + proc.stderr


def test_kafka_wait_seconds_reaches_init_container_producer_and_refresh(render):
    default = render.template(sets={"refresh.schedule": "0 3 * * 0"})
    job = producer_jobs(default)["69"]
    for c in [container(job, "producer"), pod_spec(job)["initContainers"][0],
              container(by_kind(default, "CronJob")[0], "refresh")]:
        assert env_of(c)["KAFKA_WAIT_S"] == "300", c["name"]
    docs = render.template(sets={"producer.kafkaWaitSeconds": "42", "refresh.schedule": "0 3 * * 0"})
    job = producer_jobs(docs)["69"]
    refresh = container(by_kind(docs, "CronJob")[0], "refresh")
    for c in [container(job, "producer"), pod_spec(job)["initContainers"][0], refresh]:
        assert env_of(c)["KAFKA_WAIT_S"] == "42", c["name"]
    plain = {k: v for k, v in env_of(container(job, "producer")).items() if isinstance(v, str)}
    assert config.ProducerConfig.from_env(plain).kafka_wait_s == 42.0
    err = render.template_error(sets={"producer.kafkaWaitSeconds": "0"})
    assert "at '/producer/kafkaWaitSeconds'" in err and "minimum: got 0, want 1" in err, err


# ------------------------------------------------------------------------ 2. NOTES for any number of departments
def test_notes_log_command_follows_every_producer_pod(render, tmp_path):
    codes = [f"{n:02d}" for n in range(1, 20)] + [str(n) for n in range(21, 60)]  # 58 departments
    notes = render_notes(render, tmp_path, values_files=[_values_file(tmp_path, {"departments": codes})])
    found = re.search(r"logs -f -l app\.kubernetes\.io/component=producer --max-log-requests (\d+)", notes)
    assert found, notes
    # a Job has up to backoffLimit + 1 pods, and kubectl follows every pod the selector matches
    assert int(found.group(1)) >= len(codes) * (4 + 1), found.group(0)
    few = render_notes(render, tmp_path / "few", sets={"departments": "{69,01}", "producer.backoffLimit": "30"})
    assert "--max-log-requests 62 " in few


# ------------------------------------------------------------------------ 3. the refresh CronJob's env is the Job's
def test_refresh_cronjob_env_is_the_producer_job_env(render, tmp_path):
    values = {"departments": ["69", "2A"], "refresh": {"schedule": "0 3 * * 0"},
              "ademe": {"rateWindowSeconds": 30, "maxRps": 2, "dateFrom": "2024-01-01", "dateTo": "2024-06-30",
                        "extraFields": "surface_habitable_logement", "apiKey": {"existingSecret": "ademe-key"}},
              "metrics": {"pushgatewayUrl": "http://pushgateway.monitoring:9091"},
              "producer": {"maxConcurrent": 2, "kafkaWaitSeconds": 60},
              "postgresql": {"enabled": False},
              "externalPostgresql": {"url": "postgresql://dpe@db:5432/dpe", "existingSecret": "db",
                                     "sslMode": "require"}}
    docs = render.template(values_files=[_values_file(tmp_path, values)])
    jobs = producer_jobs(docs)
    crons = {c["metadata"]["labels"]["dpe-ingest/department"]: c for c in by_kind(docs, "CronJob")}
    assert set(crons) == set(jobs) == {"69", "2A"}
    for code, job in jobs.items():
        job_env = env_of(container(job, "producer"))
        cron_env = env_of(container(crons[code], "refresh"))
        missing = set(job_env) - set(cron_env) - JOB_ONLY
        assert not missing, f"{code}: in the producer Job, not in the refresh CronJob: {sorted(missing)}"
        assert set(cron_env) - set(job_env) == CRONJOB_ONLY, sorted(set(cron_env) - set(job_env))
        differ = {k for k in set(job_env) & set(cron_env) if job_env[k] != cron_env[k]}
        assert not differ, f"{code}: {sorted(differ)} differ"
        assert cron_env["ADEME_RATE_WINDOW_S"] == "30"
        assert cron_env["METRICS_PUSHGATEWAY_URL"] == "http://pushgateway.monitoring:9091"


# ------------------------------------------------------------------------ 4/5. per component pod settings
def _everything(component: str) -> dict:
    return {
        "nodeSelector": {"pool": f"{component}-pool"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": component, "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "zone", "operator": "In", "values": [f"{component}-zone"]}]}]}}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                                       "whenUnsatisfiable": "ScheduleAnyway",
                                       "labelSelector": {"matchLabels": {"app.kubernetes.io/component": component}}}],
        "priorityClassName": f"{component}-priority",
        "podAnnotations": {"example.com/owner": component},
        "extraEnv": [{"name": "EXTRA_" + component.upper(), "value": component}],
        "extraVolumes": [{"name": "extra", "configMap": {"name": f"{component}-extra"}}],
        "extraVolumeMounts": [{"name": "extra", "mountPath": "/etc/extra", "readOnly": True}],
        "serviceAccount": {"create": True, "annotations": {"iam.example.com/role": f"{component}-role"}},
    }


def test_node_selector_and_tolerations_on_every_component(render, tmp_path):
    values = {**ALL_ON, **{c: {**ALL_ON.get(c, {}), "nodeSelector": {"pool": c},
                               "tolerations": [{"key": "dedicated", "operator": "Exists"}]} for c in COMPONENTS}}
    docs = render.template(values_files=[_values_file(tmp_path, values)])
    for component in COMPONENTS:
        for doc in _pods_of(docs, component):
            spec = pod_spec(doc)
            assert spec.get("nodeSelector") == {"pool": component}, f"{doc['kind']} {doc['metadata']['name']}"
            assert spec.get("tolerations") == [{"key": "dedicated", "operator": "Exists"}], doc["metadata"]["name"]


def test_every_component_takes_placement_annotations_extras_and_a_service_account(render, tmp_path):
    values = {**ALL_ON, **{c: {**ALL_ON.get(c, {}), **_everything(c)} for c in COMPONENTS}}
    values["kafka"]["extraEnv"] = [{"name": "KAFKA_LOG_RETENTION_HOURS", "value": "24"}]  # the broker's own
    docs = render.template(values_files=[_values_file(tmp_path, values)])
    accounts = {sa["metadata"]["name"]: sa for sa in by_kind(docs, "ServiceAccount")}
    assert set(accounts) == {f"dpe-{c}" for c in COMPONENTS}
    for component in COMPONENTS:
        want = _everything(component)
        sa = accounts[f"dpe-{component}"]
        assert sa["metadata"]["annotations"] == want["serviceAccount"]["annotations"]
        assert sa["metadata"]["labels"]["app.kubernetes.io/component"] == component
        assert sa["automountServiceAccountToken"] is False
        for doc in _pods_of(docs, component):
            where = f"{doc['kind']} {doc['metadata']['name']}"
            spec = pod_spec(doc)
            for key in ("nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "priorityClassName"):
                assert spec.get(key) == want[key], f"{where}: {key}"
            assert spec["serviceAccountName"] == f"dpe-{component}", where
            assert spec["automountServiceAccountToken"] is False, where
            assert _pod_metadata(doc)["annotations"] == want["podAnnotations"], where
            assert {"name": "extra", "configMap": {"name": f"{component}-extra"}} in spec["volumes"], where
            assert {"name": "tmp", "emptyDir": {}} in spec["volumes"], where  # the chart's own stay
            main = container(doc, MAIN_CONTAINER[component])
            assert {"name": "extra", "mountPath": "/etc/extra", "readOnly": True} in main["volumeMounts"], where
            env = env_of(main)
            if component == "kafka":
                assert env["KAFKA_LOG_RETENTION_HOURS"] == "24"
            else:
                assert env["EXTRA_" + component.upper()] == component, where


def test_existing_service_account_by_name(render):
    docs = render.template(sets={"consumer.serviceAccount.name": "sink"})
    assert pod_spec(named(docs, "Deployment", "dpe-consumer"))["serviceAccountName"] == "sink"
    assert not by_kind(docs, "ServiceAccount")  # not created: it exists
    err = render.template_error(sets={"consumer.serviceAccount.annotations.a": "b"})
    assert "consumer.serviceAccount.annotations" in err and "consumer.serviceAccount.create=true" in err, err


def test_defaults_render_none_of_the_new_pod_settings(render, tmp_path):
    docs = render.template(values_files=[_values_file(tmp_path, ALL_ON)])
    assert not by_kind(docs, "ServiceAccount")
    for component in COMPONENTS:
        for doc in _pods_of(docs, component):
            spec = pod_spec(doc)
            for key in ("serviceAccountName", "nodeSelector", "tolerations", "affinity", "topologySpreadConstraints",
                        "priorityClassName"):
                assert key not in spec, f"{doc['metadata']['name']}: {key}"
            assert "annotations" not in _pod_metadata(doc), doc["metadata"]["name"]
            assert [v["name"] for v in spec["volumes"]] in (["tmp"], ["tmp", "api-budget"], ["run", "tmp"])


@pytest.mark.parametrize(
    "values, path, detail",
    [
        ({"consumer": {"podAnnotations": {"prometheus.io/scrape": True}}}, "/consumer/podAnnotations/prometheus.io~1scrape",
         "got boolean, want string"),
        ({"kafdrop": {"extraEnv": [{"value": "x"}]}}, "/kafdrop/extraEnv/0", "missing property 'name'"),
        ({"refresh": {"extraVolumeMounts": [{"name": "x", "mountPath": "etc"}]}}, "/refresh/extraVolumeMounts/0/mountPath",
         "etc"),
        ({"standin": {"priorityClassName": 5}}, "/standin/priorityClassName", "got number, want string"),
        ({"producer": {"tolerations": {"key": "x"}}}, "/producer/tolerations", "got object, want array"),
        ({"analytics": {"affinity": {"nodeAfinity": {}}}}, "/analytics/affinity", "nodeAfinity"),
        ({"postgresql": {"topologySpreadConstraints": [{"maxSkew": 1}]}}, "/postgresql/topologySpreadConstraints/0",
         "missing properties 'topologyKey', 'whenUnsatisfiable'"),
        ({"kafka": {"serviceAccount": {"annotation": {}}}}, "/kafka/serviceAccount", "annotation"),
        ({"externalPostgresql": {"sslMode": "on"}}, "/externalPostgresql/sslMode", "verify-full"),
        ({"kafdrop": {"allowTopicChanges": "yes"}}, "/kafdrop/allowTopicChanges", "got string, want boolean"),
    ],
)
def test_schema_names_the_bad_pod_setting(render, tmp_path, values, path, detail):
    err = render.template_error(values_files=[_values_file(tmp_path, values)])
    assert "values don't meet the specifications of the schema" in err, err
    assert f"at '{path}'" in err, err
    assert detail in err, err


# ------------------------------------------------------------------------ 6. PGSSLMODE
def test_pgsslmode_reaches_every_database_client(render, tmp_path):
    sets = {"postgresql.enabled": "false", "externalPostgresql.url": "postgresql://dpe@db:5432/dpe",
            "refresh.schedule": "0 3 * * 0"}

    def clients(docs):
        return [container(named(docs, "Deployment", "dpe-consumer")), container(named(docs, "Deployment", "dpe-analytics")),
                container(by_kind(docs, "CronJob")[0], "refresh"), container(named(docs, "Pod", "dpe-test-postgresql"))]

    assert all("PGSSLMODE" not in env_of(c) for c in clients(render.template(sets=sets)))
    docs = render.template(sets={**sets, "externalPostgresql.sslMode": "verify-full"})
    for c in clients(docs):
        assert env_of(c)["PGSSLMODE"] == "verify-full", c["name"]
    for job in producer_jobs(docs).values():  # the producers never talk to PostgreSQL
        assert "PGSSLMODE" not in env_of(container(job, "producer"))


# ------------------------------------------------------------------------ 7. Kafdrop without topic writes
def _kafdrop_args(docs: list[dict]) -> set[str]:
    return set(env_of(container(named(docs, "Deployment", "dpe-kafdrop")))["CMD_ARGS"].split())


def test_kafdrop_cannot_create_or_delete_topics_by_default(render):
    # Kafdrop 4.1.0's README, "Topic Configuration"; its start script passes CMD_ARGS to the jar
    assert _kafdrop_args(render.template()) == {"--topic.createEnabled=false", "--topic.deleteEnabled=false"}
    on = render.template(sets={"kafdrop.allowTopicChanges": "true"})
    assert _kafdrop_args(on) == {"--topic.createEnabled=true", "--topic.deleteEnabled=true"}
