"""What survives an upgrade: producer Jobs (immutable pod templates), the cluster id, the password."""

from __future__ import annotations

import base64
import re
import shutil

import yaml

from chartlib import CHART, container, env_of, named, producer_jobs


def _jobs(render, **kw):
    return producer_jobs(render.template(**kw))


def test_adding_a_department_leaves_the_other_jobs_unchanged(render):
    before = _jobs(render, sets={"departments": "{69,01}"})
    after = _jobs(render, sets={"departments": "{69,01,38}"})
    assert set(after) == {"69", "01", "38"}
    for code in ("69", "01"):
        # same name and same spec: helm finds nothing to change, the Job is not touched
        assert after[code] == before[code]
    assert after["38"]["metadata"]["name"] not in {j["metadata"]["name"] for j in before.values()}


def test_order_and_spelling_do_not_change_jobs(render):
    a = _jobs(render, sets={"departments": "{69,1,2a}"})
    b = _jobs(render, set_strings={"departments": r"2A\,01\,69"})
    assert a == b


def test_chart_version_bump_keeps_jobs(render, tmp_path):
    copy = tmp_path / "dpe-ingest"
    shutil.copytree(CHART, copy)
    chart_yaml = copy / "Chart.yaml"
    meta = yaml.safe_load(chart_yaml.read_text())
    meta["version"] = "9.9.9"
    chart_yaml.write_text(yaml.safe_dump(meta))
    before = _jobs(render)
    after = _jobs(render, chart=copy)
    assert after["69"]["metadata"]["name"] == before["69"]["metadata"]["name"]
    assert after["69"]["spec"] == before["69"]["spec"]
    assert after["69"]["metadata"]["labels"]["helm.sh/chart"] == "dpe-ingest-9.9.9"


def test_rerun_one_department(render):
    base = _jobs(render, sets={"departments": "{69,38}"})
    rerun = _jobs(render, sets={"departments": "{69,38}", "producer.rerun.69": "1"})
    assert rerun["38"] == base["38"]
    assert rerun["69"]["metadata"]["name"] != base["69"]["metadata"]["name"]
    assert rerun["69"]["metadata"]["name"].startswith("dpe-producer-69-")
    assert env_of(container(rerun["69"], "producer"))["PRODUCER_RESTART"] == "true"
    assert env_of(container(base["69"], "producer"))["PRODUCER_RESTART"] == "false"
    assert rerun["69"]["spec"]["template"]["metadata"]["labels"]["dpe-ingest/run"] == "1"
    # the same re-run value on the next upgrade does not start yet another run
    again = _jobs(render, sets={"departments": "{69,38,01}", "producer.rerun.69": "1"})
    assert again["69"] == rerun["69"]
    # the next re-run is another number
    second = _jobs(render, sets={"departments": "{69,38}", "producer.rerun.69": "2"})
    assert second["69"]["metadata"]["name"] not in {rerun["69"]["metadata"]["name"], base["69"]["metadata"]["name"]}


def test_rerun_keys_are_normalised(render):
    a = _jobs(render, sets={"departments": "{1,2a}", "producer.rerun.1": "1", "producer.rerun.2a": "1"})
    b = _jobs(render, sets={"departments": "{01,2A}", "producer.rerun.01": "1", "producer.rerun.2A": "1"})
    assert a == b
    assert all(env_of(container(j, "producer"))["PRODUCER_RESTART"] == "true" for j in a.values())


def test_rerun_all(render):
    base = _jobs(render, sets={"departments": "{69,38}"})
    every = _jobs(render, sets={"departments": "{69,38}", "producer.rerunAll": "1"})
    for code in ("69", "38"):
        assert every[code]["metadata"]["name"] != base[code]["metadata"]["name"]
        assert env_of(container(every[code], "producer"))["PRODUCER_RESTART"] == "true"
    # a per-department entry wins over rerunAll; run 0 means the normal (checkpointed) Job
    mixed = _jobs(render, sets={"departments": "{69,38}", "producer.rerunAll": "1", "producer.rerun.38": "0"})
    assert mixed["38"] == base["38"]
    assert mixed["69"] == every["69"]


def test_changed_settings_give_new_job_names_instead_of_immutable_errors(render):
    base = _jobs(render)
    changed = _jobs(render, sets={"ademe.pageSize": "100"})
    assert changed["69"]["metadata"]["name"] != base["69"]["metadata"]["name"]
    # but not a restart: the new Job resumes from the department's checkpoint
    assert env_of(container(changed["69"], "producer"))["PRODUCER_RESTART"] == "false"


def _decode_kafka_uuid(text: str) -> bytes:
    # Kafka's Uuid.fromString: base64url without padding, must give exactly 16 bytes
    return base64.urlsafe_b64decode(text + "==")


def test_cluster_id_is_stable_and_valid(render):
    def cluster_id(**kw):
        sts = named(render.template(**kw), "StatefulSet", kw.get("release", "dpe") + "-kafka")
        return env_of(container(sts))["CLUSTER_ID"]

    first = cluster_id()
    assert cluster_id(sets={"departments": "{69,01,38}", "kafka.topicPartitions": "3"}) == first  # an upgrade
    assert cluster_id(release="other") != first
    assert len(first) == 22 and re.fullmatch(r"[A-Za-z0-9_-]{22}", first) and first[0] != "-"
    raw = _decode_kafka_uuid(first)
    assert len(raw) == 16
    # re-encoding gives the same text: no bits lost in the last character
    assert base64.urlsafe_b64encode(raw).decode().rstrip("=") == first
    given = "4L6g3nShT-eMCtK--X86sw"
    assert cluster_id(sets={"kafka.clusterId": given}) == given


def _helper_chart(tmp_path, body: str):
    """A throw-away chart holding the real _helpers.tpl and one template calling it."""
    chart = tmp_path / "helpers"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: helpers\nversion: 0.0.1\n")
    shutil.copy(CHART / "templates" / "_helpers.tpl", chart / "templates" / "_helpers.tpl")
    (chart / "templates" / "out.yaml").write_text(body)
    return chart


def test_password_kept_across_upgrades_logic(render, tmp_path):
    # `helm template` has no cluster, so lookup returns nothing; feed the helper the Secret an
    # upgrade would find and check that it keeps that password, unless one is given.
    existing = base64.b64encode(b"from-the-cluster").decode()
    chart = _helper_chart(tmp_path, (
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: out}\ndata:\n"
        "  kept: {{ include \"dpe-ingest.postgresql.resolvePassword\" (dict \"given\" \"\" \"existing\" "
        "(dict \"data\" (dict \"password\" \"" + existing + "\"))) | quote }}\n"
        "  given: {{ include \"dpe-ingest.postgresql.resolvePassword\" (dict \"given\" \"chosen\" \"existing\" "
        "(dict \"data\" (dict \"password\" \"" + existing + "\"))) | quote }}\n"
        "  fresh: {{ include \"dpe-ingest.postgresql.resolvePassword\" (dict \"given\" \"\" \"existing\" dict) | quote }}\n"
    ))
    (out,) = render.template(chart=chart)
    assert out["data"]["kept"] == "from-the-cluster"
    assert out["data"]["given"] == "chosen"
    assert len(out["data"]["fresh"]) == 24
    # and the Secret template goes through that helper with the looked-up Secret
    secret_tpl = (CHART / "templates" / "postgresql" / "secret.yaml").read_text()
    assert 'include "dpe-ingest.postgresql.password"' in secret_tpl
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert 'lookup "v1" "Secret" .Release.Namespace (include "dpe-ingest.postgresql.secretName" .)' in helpers
    assert 'name: {{ include "dpe-ingest.postgresql.secretName" . }}' in secret_tpl  # the Secret it looks up
