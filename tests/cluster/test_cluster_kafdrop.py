"""Kafdrop on the test node, from the chart: the image built from Kafdrop 4.1.0's source
(``images/test-kafdrop``, ``testbed.images.ensure_kafdrop_image``) imported into the node, the chart
installed with ``kafdrop.enabled=true`` and its own settings (PLAINTEXT to the bundled Kafka, uid 65534,
read-only root, topic creation and deletion off by default) in a namespace enforcing Pod Security
``restricted``, one department of few rows.  Its probes pass; through ``kubectl port-forward`` its UI
lists our topics and shows messages of ``dpe-lines`` that are rows of ``dpe_data``; its delete-topic
and create-topic endpoints answer Kafdrop's refusal and the broker still has exactly its topics.  Then
``kafdrop.allowTopicChanges=true`` (the counter-test): the same endpoint deletes a scratch topic, so
the refusal above was the flag's doing."""

from __future__ import annotations

import html
import json
import re
import time

import pytest

from noderelease import CHART, TEST_VALUES, NodeRelease, PortForward

pytestmark = pytest.mark.cluster

NS = "dpe-kafdrop"
RELEASE = "kd"
DEPARTMENT = "69"
ROWS = 300
TOPICS = {"dpe-lines", "dpe-lines-dlq", "dpe-producer-checkpoints"}


def _values(allow_changes: bool) -> list[str]:
    return ["-f", str(CHART / "values-offline.yaml"), "-f", str(TEST_VALUES),
            "--set", f"departments={{{DEPARTMENT}}}", "--set", f"standin.rowsPerDepartment={ROWS}",
            "--set", "analytics.enabled=false", "--set", "kafdrop.enabled=true",
            "--set", f"kafdrop.allowTopicChanges={str(allow_changes).lower()}"]


@pytest.fixture(scope="module")
def release(cluster, helm_bin):
    from dpe_devkit.testbed.images import KAFDROP_TAG, ensure_kafdrop_image, tarball_tags

    tar = ensure_kafdrop_image(quiet=False)
    assert tarball_tags(tar) == [KAFDROP_TAG]
    cluster._ctr("images", "import", "--no-unpack=false", str(tar), timeout=600)
    rel = NodeRelease(cluster, helm_bin, NS, RELEASE, ROWS, analytics_prefix=None)
    rel.create_namespace()
    rel.helm("install", RELEASE, str(CHART), *_values(False), "--wait", "--wait-for-jobs", "--timeout", "10m")
    yield rel
    rel.uninstall()


def _broker_topics(rel: NodeRelease) -> set[str]:
    out = rel.kubectl("exec", f"{RELEASE}-kafka-0", "--", "/opt/kafka/bin/kafka-topics.sh",
                      "--bootstrap-server", "localhost:9092", "--list").stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def test_kafdrop_runs_from_the_chart_and_its_probes_pass(release):
    (pod,) = release.ready_pods("kafdrop")
    (c,) = pod["spec"]["containers"]
    assert c["image"] == "dpe-test/kafdrop:4.1.0", c["image"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/actuator/health", c["readinessProbe"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True and c["securityContext"]["runAsUser"] == 65534
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and status["restartCount"] == 0, status
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["CMD_ARGS"] == "--topic.createEnabled=false --topic.deleteEnabled=false", env
    logs = release.kubectl("logs", pod["metadata"]["name"]).stdout
    assert "Started Kafdrop" in logs, logs[-3000:]


def test_kafdrop_lists_our_topics_and_shows_a_message_of_dpe_lines(release):
    release.wait_reconciled([DEPARTMENT])
    keys = set(release.psql(f"SELECT numero_dpe FROM dpe_data WHERE departement = '{DEPARTMENT}'").split())
    assert len(keys) == ROWS, len(keys)
    with PortForward(release, f"{RELEASE}-kafdrop", 9000) as ui:
        status, body = ui.get("/actuator/health", accept="application/json")
        assert status == 200 and json.loads(body)["status"] == "UP", (status, body)
        status, page = ui.get("/")
        assert status == 200, page[-2000:]
        listed = set(re.findall(r'href="/topic/([^"/]+)"', page))
        assert TOPICS <= listed, listed
        assert 'href="/topic/create"' not in page, "the overview offers topic creation"
        status, page = ui.get("/topic/dpe-lines/messages?partition=0&offset=0&count=5")
        assert status == 200, page[-2000:]
        shown = re.findall(r'Key:</span>\s*([^\s&<]+)', page)
        bodies = [html.unescape(b) for b in re.findall(r'<pre class="message-body">(.*?)</pre>', page, flags=re.S)]
        print(f"\nKafdrop shows {len(shown)} messages of dpe-lines partition 0: keys {shown}")
        assert 1 <= len(shown) <= 5 and len(bodies) == len(shown), (shown, page[-3000:])
        assert set(shown) <= keys, f"keys shown that are not rows of dpe_data: {set(shown) - keys}"
        for key, body in zip(shown, bodies):
            value = json.loads(body)
            assert value["departement"] == DEPARTMENT and value["numero_dpe"] == key, value


def test_kafdrop_refuses_to_delete_or_create_topics(release):
    before = _broker_topics(release)
    assert TOPICS <= before, before
    with PortForward(release, f"{RELEASE}-kafdrop", 9000) as ui:
        status, page = ui.post("/topic/dpe-lines/delete", {})
        assert "Error deleting topic dpe-lines: Not configured to be deleted." in page, (status, page[-3000:])
        status, page = ui.post("/topic", {"name": "made-by-kafdrop", "partitionsNumber": "1",
                                          "replicationFactor": "1"})
        assert "Error creating topic made-by-kafdrop: Not configured to be created." in page, (status, page[-3000:])
        status, body = ui.get("/topic", accept="application/json")
        assert status == 200 and TOPICS <= {t["name"] for t in json.loads(body)}, body[-2000:]
    time.sleep(2)  # a deletion is asynchronous in the broker: give a wrong one the time to show
    assert _broker_topics(release) == before
    assert release.stored() == {DEPARTMENT: ROWS}


def test_counter_allowed_changes_delete_a_topic(release):
    """With kafdrop.allowTopicChanges=true the same request deletes a topic: the refusal above is the
    flag's, not a request Kafdrop did not understand."""
    release.kubectl("exec", f"{RELEASE}-kafka-0", "--", "/opt/kafka/bin/kafka-topics.sh", "--bootstrap-server",
                    "localhost:9092", "--create", "--topic", "scratch", "--partitions", "1")
    assert "scratch" in _broker_topics(release)
    release.helm("upgrade", RELEASE, str(CHART), *_values(True), "--wait", "--timeout", "10m")
    (pod,) = release.ready_pods("kafdrop")
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env["CMD_ARGS"] == "--topic.createEnabled=true --topic.deleteEnabled=true", env
    with PortForward(release, f"{RELEASE}-kafdrop", 9000) as ui:
        status, page = ui.post("/topic/scratch/delete", {})
        assert "Error deleting topic" not in page, page[-3000:]
    deadline = time.monotonic() + 60
    while "scratch" in _broker_topics(release):
        assert time.monotonic() < deadline, "Kafdrop did not delete topic scratch"
        time.sleep(1)
    assert TOPICS <= _broker_topics(release)
