"""The chart says each thing once (issue 21).

* Every env block is one helper of templates/_env.tpl: no template names one of its variables
  outside that helper, and every rendered container that carries a block carries it whole, the same
  in every container (producer Jobs, refresh CronJobs, consumer, analytics, stand-in, the wait-for-kafka
  init container, the helm test pods).
* One wait for Kafka: the init container runs the product's module (python -m dpe_ingest.kafka_wait, on
  kafka_io.wait_for_kafka); no template carries inline Python (python -c, import …), which a
  counter-test shows the check would catch.
* Templates are grouped by component: templates/<component>/…, shared helpers at the top.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from chartlib import CHART, pod_spec

ROOT = CHART.parents[1]
TEMPLATES = CHART / "templates"

#: helper of templates/_env.tpl -> the variables it alone names
ENV_BLOCKS = {
    "dpe-ingest.env.log": ["LOG_FORMAT", "LOG_LEVEL"],
    "dpe-ingest.env.kafkaConnection": ["KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
                                       "KAFKA_SSL_CA_FILE", "KAFKA_SSL_CERT_FILE", "KAFKA_SSL_KEY_FILE", "KAFKA_SSL_CHECK_HOSTNAME"],
    "dpe-ingest.env.kafka": ["KAFKA_TOPIC", "KAFKA_DLQ_TOPIC", "KAFKA_TOPIC_PARTITIONS", "KAFKA_REPLICATION_FACTOR",
                             "KAFKA_MIN_INSYNC_REPLICAS", "KAFKA_CREATE_TOPICS"],
    "dpe-ingest.env.kafkaWait": ["KAFKA_WAIT_S"],
    "dpe-ingest.env.postgresql": ["DATABASE_URL", "PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"],
}

#: value sets rendered for the checks on the rendered objects
VALUE_SETS = {
    "defaults": {},
    "test-cluster": {"values_files": [CHART / "values-offline.yaml", ROOT / "tests" / "cluster" / "values-test-cluster.yaml"]},
    "external": {"values_files": [CHART / "values-external.yaml"]},
    "external-no-secret-sslmode": {"sets": {"postgresql.enabled": "false", "externalPostgresql.url": "postgresql://u@db:5432/d",
                                            "externalPostgresql.sslMode": "require", "kafka.enabled": "false",
                                            "externalKafka.bootstrapServers": "k:9092"}},
    "everything": {"sets": {"departments": "{69,none}", "refresh.schedule": "0 3 * * 0", "standin.enabled": "true",
                            "metrics.enabled": "true", "log.format": "json", "log.level": "DEBUG",
                            "producer.kafkaWaitSeconds": "42"}},
    # issue 22: the operators' presets (SASL_SSL with a CA; libpq's variables from a Secret, a CA)
    "presets": {"sets": {"kafka.enabled": "false", "externalKafka.strimzi.cluster": "prod", "externalKafka.strimzi.user": "dpe",
                         "postgresql.enabled": "false", "externalPostgresql.cloudnativepg.cluster": "pg",
                         "refresh.schedule": "0 3 * * 0", "kafka.topics.replicationFactor": "3", "kafka.createTopics": "false",
                         "kafdrop.enabled": "false"}},
    "mtls-client-certs": {"sets": {"kafka.enabled": "false", "externalKafka.strimzi.cluster": "prod",
                                   "externalKafka.strimzi.user": "dpe", "externalKafka.strimzi.authentication": "tls",
                                   "externalKafka.tls.checkHostname": "false",
                                   "postgresql.enabled": "false", "externalPostgresql.host": "db.example",
                                   "externalPostgresql.existingSecret": "db", "externalPostgresql.caSecret": "db-ca",
                                   "externalPostgresql.clientSecret": "db-client", "kafdrop.enabled": "false"}},
}


def _templates() -> dict[str, str]:
    return {str(p.relative_to(TEMPLATES)): p.read_text() for p in sorted(TEMPLATES.rglob("*")) if p.is_file()}


def _defines(text: str) -> dict[str, str]:
    """name -> body of each {{- define "name" -}} … {{- end -}} (a define ends at the first `{{- end -}}`
    at the start of a line; inner ends are written `{{- end }}`)."""
    return {m.group(1): m.group(2) for m in re.finditer(r'\{\{-? define "([^"]+)" -?\}\}(.*?)\n\{\{- end -\}\}', text, re.S)}


def _env_name_lines(text: str, var: str) -> list[int]:
    return [i for i, line in enumerate(text.splitlines(), 1)
            if re.fullmatch(rf'\s*(- )?name: "?{var}"?\s*', line)]


# ------------------------------------------------------------------------------ env blocks, in the source
def test_each_env_variable_is_named_once_in_its_helper():
    templates = _templates()
    env_defines = _defines(templates["_env.tpl"])
    assert set(ENV_BLOCKS) <= set(env_defines), f"helpers missing from _env.tpl: {set(ENV_BLOCKS) - set(env_defines)}"
    for helper, names in ENV_BLOCKS.items():
        for var in names:
            where = [(path, line) for path, text in templates.items() for line in _env_name_lines(text, var)]
            assert len(where) == 1, f"{var} is written {len(where)} times ({where}): include {helper} instead"
            assert _env_name_lines(env_defines[helper], var), f"{var} is not written in {helper}"


def test_every_env_helper_is_used_and_no_other_template_defines_one():
    templates = _templates()
    for helper in ENV_BLOCKS:
        users = [path for path, text in templates.items() if f'include "{helper}"' in text]
        assert users, f"{helper} is used nowhere"
    defined_elsewhere = [(path, name) for path, text in templates.items() if path != "_env.tpl"
                         for name in _defines(text) if name.startswith("dpe-ingest.env.")]
    assert defined_elsewhere == []


# ------------------------------------------------------------------------------ env blocks, rendered
@pytest.fixture(scope="module")
def rendered(render) -> dict[str, list[dict]]:
    return {name: render.template(**kw) for name, kw in VALUE_SETS.items()}


def _containers(docs: list[dict]):
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec["containers"]:
            yield f"{doc['kind']}/{doc['metadata']['name']}/{c['name']}", c


def _block(env: list[dict], first: str, names: list[str]) -> list[dict]:
    """The run of entries starting at ``first`` whose names are among ``names``."""
    at = [e["name"] for e in env].index(first)
    out = []
    for entry in env[at:]:
        if entry["name"] not in names:
            break
        out.append(entry)
    return out


@pytest.mark.parametrize("values", list(VALUE_SETS))
@pytest.mark.parametrize("first, names, expected_users", [
    ("DATABASE_URL", ["DATABASE_URL", "PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGPASSWORD", "PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"], {"consumer", "analytics", "refresh", "psql"}),
    ("LOG_FORMAT", ["LOG_FORMAT", "LOG_LEVEL"], {"producer", "wait-for-kafka", "consumer", "analytics", "refresh", "standin", "kafka"}),
    ("KAFKA_BOOTSTRAP_SERVERS", ["KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD",
                                       "KAFKA_SSL_CA_FILE", "KAFKA_SSL_CERT_FILE", "KAFKA_SSL_KEY_FILE", "KAFKA_SSL_CHECK_HOSTNAME"], {"producer", "wait-for-kafka", "consumer", "analytics", "refresh", "kafka"}),
])
def test_every_container_carries_the_whole_block_the_same(rendered, values, first, names, expected_users):
    blocks = {}
    for where, c in _containers(rendered[values]):
        env = c.get("env", [])
        if any(e["name"] in names for e in env):
            assert first in [e["name"] for e in env], f"{where} has part of the {first} block but not {first}"
            block = _block(env, first, names)
            assert {e["name"] for e in env} & set(names) == {e["name"] for e in block}, \
                f"{where}: the {first} block is split: {env}"
            blocks[where] = block
    users = {where.rsplit("/", 1)[1] for where in blocks}
    assert users <= expected_users and users >= expected_users & {"consumer", "producer", "wait-for-kafka"}, users
    distinct = {repr(b) for b in blocks.values()}
    assert len(distinct) == 1, f"the {first} block differs between containers: {blocks}"
    (block,) = {repr(b): b for b in blocks.values()}.values()
    if first == "DATABASE_URL":
        has_secret = values != "external-no-secret-sslmode"
        assert ("PGPASSWORD" in [e["name"] for e in block]) == has_secret, block
        with_sslmode = {"external-no-secret-sslmode", "presets", "mtls-client-certs"}
        assert ("PGSSLMODE" in [e["name"] for e in block]) == (values in with_sslmode), block


# ------------------------------------------------------------------------------ one wait for Kafka
_PYTHON_MODULE_RUN = re.compile(r'python3?(?:"\s*,\s*"|\s+)-m(?:"\s*,\s*"|\s+)dpe_ingest\.([a-z_]+)')


def inline_python(text: str) -> list[str]:
    """Each place of ``text`` (a template) that runs Python code written in the chart: any `python` that is
    not `python -m dpe_ingest.<module>`, and Python statements (import …, socket.…)."""
    found = []
    for m in re.finditer(r"python[0-9.]*", text, re.I):
        if not _PYTHON_MODULE_RUN.match(text, m.start()) and not text[max(0, m.start() - 1)] in "_/":
            found.append(text[max(0, m.start() - 40):m.end() + 40])
    found += [m.group(0) for m in re.finditer(r"^\s*(import [a-z_]+.*|from [a-z_.]+ import .*|.*\bsocket\.\w+.*)$", text, re.M)]
    return found


def test_no_template_carries_inline_python():
    offenders = {path: hits for path, text in _templates().items() if (hits := inline_python(text))}
    assert offenders == {}, f"inline Python in templates (run a module of dpe_ingest instead): {offenders}"
    # the modules the templates run exist in the product
    modules = {m.group(1) for text in _templates().values() for m in _PYTHON_MODULE_RUN.finditer(text)}
    assert modules == {"kafka_wait"}, modules
    for module in modules:
        assert importlib.util.find_spec(f"dpe_ingest.{module}") is not None, module


def test_the_inline_python_check_catches_the_old_wait():
    """Counter-test: the chart's wait for Kafka before it ran the product's module (a python -c socket loop,
    in the block style and in the flow style) is flagged."""
    block_style = ('  command:\n    - python\n    - -c\n    - |\n      import os, socket, sys, time\n'
                   '      socket.create_connection((host, int(port)), timeout=3).close()\n')
    flow_style = '  command: ["python3", "-c", "import socket; socket.create_connection((h, p))"]\n'
    assert len(inline_python(block_style)) == 3
    assert inline_python(flow_style)
    assert inline_python('  command: ["python", "-m", "dpe_ingest.kafka_wait"]\n') == []


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_the_one_wait_for_kafka_is_the_products_module(rendered, values):
    python_runs, scripts = [], []
    for where, c in _containers(rendered[values]):
        argv = list(c.get("command", [])) + list(c.get("args", []))
        if any("python" in str(a) for a in argv):
            python_runs.append((where, argv))
        if "-c" in argv:
            scripts.append((where, " ".join(str(a) for a in argv)))
    assert python_runs, "no wait-for-kafka init container rendered"
    for where, argv in python_runs:  # the init containers, and the helm test's check that Kafka answers
        assert where.endswith("/wait-for-kafka") or where == "Pod/dpe-test-kafka/kafka", where
        assert argv == ["python", "-m", "dpe_ingest.kafka_wait"], (where, argv)
    for where, script in scripts:  # shell scripts (the helm test's psql) run no Python either
        assert "python" not in script and "import " not in script, (where, script)
    # the module is the producer's own wait, not a copy of it
    source = Path(importlib.util.find_spec("dpe_ingest.kafka_wait").origin).read_text()
    assert "wait_for_kafka" in source and "socket" not in source


# ------------------------------------------------------------------------------ layout
def test_templates_are_grouped_by_component():
    """templates/<component>/… for what belongs to one component; at the top only shared helpers, NOTES
    and what spans every component (one ServiceAccount per component)."""
    top = sorted(p.name for p in TEMPLATES.iterdir() if p.is_file())
    assert top == ["NOTES.txt", "_env.tpl", "_helpers.tpl", "_networkpolicy.tpl", "serviceaccounts.yaml"], top
    dirs = sorted(p.name for p in TEMPLATES.iterdir() if p.is_dir())
    assert dirs == ["analytics", "consumer", "kafdrop", "kafka", "metrics", "postgresql", "producer", "refresh",
                    "standin", "tests"], dirs
    # each directory's objects carry its component label (metrics: consumer/analytics; tests: test)
    for path, text in _templates().items():
        if "/" not in path or path.endswith(".tpl"):
            continue
        component = {"tests": "test", "metrics": None}.get(path.split("/")[0], path.split("/")[0])
        if component:
            assert f'"component" "{component}"' in text, f"{path} labels no {component} component"


# ------------------------------------------------------------------------------ producer Job and refresh CronJob
def test_producer_job_and_refresh_cronjob_share_failure_policy_and_budget(rendered):
    """Both run `dpe-ingest produce`: one podFailurePolicy (but the container's name) and one budget volume."""
    docs = rendered["everything"]
    job = next(d for d in docs if d["kind"] == "Job" and d["metadata"]["name"].startswith("dpe-producer-69-"))
    cron = next(d for d in docs if d["kind"] == "CronJob" and d["metadata"]["name"] == "dpe-refresh-69")
    job_spec, cron_spec = job["spec"], cron["spec"]["jobTemplate"]["spec"]
    policy = job_spec["podFailurePolicy"]
    assert policy["rules"][0]["onExitCodes"] == {"containerName": "producer", "operator": "In", "values": [2, 3]}
    # the Job's second rule is its wait-for-kafka init container's (the CronJob has none)
    assert policy["rules"].pop(1)["onExitCodes"]["containerName"] == "wait-for-kafka"
    policy["rules"][0]["onExitCodes"]["containerName"] = "refresh"
    assert cron_spec["podFailurePolicy"] == policy
    volume = {"name": "api-budget", "configMap": {"name": "dpe-api-budget", "optional": True}}
    mount = {"name": "api-budget", "mountPath": "/etc/dpe-ingest/budget", "readOnly": True}
    for spec in (job_spec, cron_spec):
        assert volume in spec["template"]["spec"]["volumes"]
        assert mount in spec["template"]["spec"]["containers"][0]["volumeMounts"]
        budget_file = {e["name"]: e.get("value") for e in spec["template"]["spec"]["containers"][0]["env"]}["ADEME_BUDGET_FILE"]
        assert budget_file.startswith(mount["mountPath"] + "/")
