"""Day 2 on the test node (issue 23): pods that heal, logs that speak during outages, a bounded wait.

One release of the chart in a namespace of its own (``dpe-day2``: small departments, the in-cluster
stand-in), its tests in order:

1. the consumer's process is stopped (SIGSTOP, from the node: a process in a container cannot stop its
   own PID 1) while it writes: the kubelet's liveness probe restarts the container within the probe's
   period, failure threshold and grace, and the run reconciles exactly (tests/reconcile.py);
2. the Kafka broker is gone for at least 20 s (its StatefulSet scaled to 0, then back) while new producers
   run: each producer's log has a warning naming Kafka at most 10 s apart through the outage and a
   recovery line; the consumer is not restarted for it (its loop keeps turning: an outage is not a hang);
   the run reconciles exactly;
3. a release with ``kafka.enabled=false`` and a wrong ``externalKafka.bootstrapServers``: the producer's
   pod fails within its bounded wait (``producer.kafkaWaitSeconds``), its last line naming the address.

Bounded waits fail on timeout; the module prints its own wall time."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import time
from pathlib import Path

import pytest

from noderelease import CHART, SLOW, TEST_VALUES, NodeRelease

pytestmark = pytest.mark.cluster

NS = "dpe-day2"
RELEASE = "day2"
ROWS = 1500  # per department: 15 pages of 100 at 1 page/s (ademe.maxRps=1): a producer runs ~15 s
FIRST = ["69"]
STOPPED = "01"  # added while the consumer is stopped
LATER = ["38", "2A"]  # added for the broker outage
LINE_GAP_S = 10.0  # "a warning naming Kafka at most 10 s apart"
WRONG_KAFKA = "kafka.nowhere.invalid:9092"
KAFKA_WAIT_S = 15
_started = time.monotonic()


def _values(departments: list[str]) -> list[str]:
    return ["-f", str(CHART / "values-offline.yaml"), "-f", str(TEST_VALUES),
            "--set", "departments={" + ",".join(departments) + "}",
            "--set", f"standin.rowsPerDepartment={ROWS}", "--set", "ademe.maxRps=1"]


def _ts(line: str) -> float:
    m = re.search(r"\bts=(\S+)", line)
    assert m, line
    return dt.datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def day2(cluster, helm_bin, summary_line):
    rel = NodeRelease(cluster, helm_bin, NS, RELEASE, ROWS)
    rel.create_namespace()
    rel.helm("install", RELEASE, str(CHART), *_values(FIRST), "--wait", "--wait-for-jobs", "--timeout", "10m")
    rel.departments = list(FIRST)
    yield rel
    rel.uninstall()
    summary_line(f"cluster: test_cluster_day2 wall time {time.monotonic() - _started:.0f}s")
    print(f"\ntest_cluster_day2: wall time {time.monotonic() - _started:.0f}s")


def _pod(rel: NodeRelease, component: str) -> dict:
    pods = [p for p in rel.get("pods", "-l", f"app.kubernetes.io/component={component}")["items"]
            if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    return pods[0]


def _container_status(pod: dict, name: str) -> dict:
    (st,) = [c for c in (pod.get("status") or {}).get("containerStatuses", []) if c["name"] == name]
    return st


def _host_pids_of(container_id: str) -> list[int]:
    """The processes of a container as the node (this machine) sees them: its cgroup names its id."""
    cid = container_id.split("://", 1)[-1]
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if cid in (proc / "cgroup").read_text():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_a_stopped_consumer_is_restarted_by_its_liveness_probe_and_the_run_reconciles(day2, summary_line):
    rel = day2
    deployment = rel.get("deployment", f"{RELEASE}-consumer")
    (spec,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "consumer"]
    live = spec["livenessProbe"]
    assert live["httpGet"]["path"] == "/livez"
    # the bound: the failures it takes, each at most a period plus its timeout, then the grace
    bound = live["failureThreshold"] * (live["periodSeconds"] + live["timeoutSeconds"]) + \
        live["terminationGracePeriodSeconds"] + 15
    rel.wait_reconciled(rel.departments)
    # mid-run: a new department's producer running, some of its rows stored, most still to come
    rel.departments = FIRST + [STOPPED]
    rel.helm("upgrade", RELEASE, str(CHART), *_values(rel.departments))
    deadline = time.monotonic() + SLOW
    while rel.stored().get(STOPPED, 0) == 0:
        assert time.monotonic() < deadline, f"no row of {STOPPED}\n{rel.describe()}"
        time.sleep(0.3)
    pod = _pod(rel, "consumer")
    before = _container_status(pod, "consumer")
    pids = _host_pids_of(before["containerID"])
    assert pids, f"no process of {before['containerID']} on the node"
    stored_then = rel.stored()
    assert stored_then[STOPPED] < ROWS - 300, f"the fault would not land mid-run: {stored_then}"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        while True:
            st = _container_status(_pod(rel, "consumer"), "consumer")
            if st["restartCount"] > before["restartCount"] and st.get("state", {}).get("running"):
                break
            assert time.monotonic() - stopped_at < bound, \
                f"the stopped consumer was not restarted within {bound}s (liveness {live})\n{rel.describe()}"
            time.sleep(1)
    finally:
        for pid in pids:  # already gone once restarted; harmless otherwise
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    took = time.monotonic() - stopped_at
    events = rel.kubectl("get", "events", "--field-selector", f"involvedObject.name={pod['metadata']['name']}",
                         "-o", "custom-columns=R:.reason,M:.message", check=False).stdout
    assert "Liveness probe failed" in events or "Unhealthy" in events, events
    line = (f"cluster: consumer SIGSTOPped with {stored_then} rows stored; restarted by its liveness probe "
            f"after {took:.0f}s (bound {bound}s)")
    print(line)
    summary_line(line)
    rel.wait_reconciled(rel.departments)


def _kafka_ready(rel: NodeRelease) -> bool:
    pods = [p for p in rel.get("pods", "-l", "app.kubernetes.io/component=kafka")["items"]
            if not p["metadata"].get("deletionTimestamp")]
    return any(c["type"] == "Ready" and c["status"] == "True"
               for p in pods for c in (p.get("status") or {}).get("conditions", []))


def _producer_pods(rel: NodeRelease, department: str) -> list[dict]:
    return rel.get("pods", "-l", f"app.kubernetes.io/component=producer,dpe-ingest/department={department}")["items"]


def _log(rel: NodeRelease, pod: str, container: str) -> str:
    return rel.kubectl("logs", pod, "-c", container, check=False, timeout=60).stdout


def test_kafka_gone_20s_under_running_producers_each_says_so_every_10s_and_recovers(day2, summary_line):
    rel = day2
    consumer_restarts = _container_status(_pod(rel, "consumer"), "consumer")["restartCount"]
    rel.departments = rel.departments + LATER
    rel.helm("upgrade", RELEASE, str(CHART), *_values(rel.departments))
    # both new producers paging: their first page acknowledged, their department far from done
    deadline = time.monotonic() + SLOW
    while True:
        pods = {d: _producer_pods(rel, d) for d in LATER}
        paging = {d: [p for p in ps if "event=page " in _log(rel, p["metadata"]["name"], "producer")]
                  for d, ps in pods.items()}
        if all(paging.values()):
            break
        assert time.monotonic() < deadline, f"the new producers never paged\n{rel.describe()}"
        time.sleep(0.5)
    stored = rel.stored()
    assert all(stored.get(d, 0) < ROWS for d in LATER), f"the outage would not land mid-run: {stored}"
    rel.kubectl("scale", "statefulset", f"{RELEASE}-kafka", "--replicas=0")
    scaled_at = time.time()
    deadline = time.monotonic() + 180
    while rel.get("pods", "-l", "app.kubernetes.io/component=kafka")["items"]:
        assert time.monotonic() < deadline, f"the broker pod is still there\n{rel.describe()}"
        time.sleep(0.5)
    gone_at = time.time()
    time.sleep(max(0.0, 20 - (time.time() - gone_at)))
    rel.kubectl("scale", "statefulset", f"{RELEASE}-kafka", "--replicas=1")
    deadline = time.monotonic() + SLOW
    while not _kafka_ready(rel):
        assert time.monotonic() < deadline, f"the broker did not come back\n{rel.describe()}"
        time.sleep(0.5)
    back_at = time.time()
    line = f"cluster: broker pod gone {back_at - gone_at:.0f}s ({gone_at - scaled_at:.0f}s to stop) under producers of {LATER}"
    print(line)
    summary_line(line)
    rel.wait_jobs_complete(rel.departments)
    for dep in LATER:
        (pod,) = [p for p in _producer_pods(rel, dep) if (p.get("status") or {}).get("phase") == "Succeeded"]
        text = _log(rel, pod["metadata"]["name"], "producer")
        warnings = [ln for ln in text.splitlines() if "level=warning" in ln and "Kafka at " in ln
                    and re.search(r"event=(kafka_waiting|kafka_wait) ", ln) and scaled_at <= _ts(ln)]
        stamps = [_ts(ln) for ln in warnings if _ts(ln) <= back_at + LINE_GAP_S]
        assert stamps, f"{dep}: no warning naming Kafka during the outage:\n{text[-4000:]}"
        assert stamps[0] - gone_at <= LINE_GAP_S, (dep, gone_at, stamps[:3])
        gaps = [round(b - a, 2) for a, b in zip(stamps, stamps[1:])]
        assert all(g <= LINE_GAP_S for g in gaps), (dep, gaps)
        recovered = [ln for ln in text.splitlines() if "event=kafka_recovered " in ln and _ts(ln) >= gone_at]
        assert recovered, f"{dep}: no recovery line:\n{text[-4000:]}"
        assert back_at - stamps[-1] <= LINE_GAP_S or _ts(recovered[0]) - stamps[-1] <= LINE_GAP_S, \
            (dep, stamps[-1], back_at, recovered[0])
        line = f"cluster: producer {dep}: {len(stamps)} warnings naming Kafka, gaps {gaps}, then {recovered[0][:160]}"
        print(line)
        summary_line(line)
    # an outage is not a hang: the consumer's loop kept turning, its liveness probe left it alone
    assert _container_status(_pod(rel, "consumer"), "consumer")["restartCount"] == consumer_restarts
    rel.wait_reconciled(rel.departments)


def test_a_wrong_kafka_address_fails_the_producer_pod_within_its_bounded_wait(cluster, helm_bin, day2):
    rel = NodeRelease(cluster, helm_bin, NS + "-wrong", RELEASE, ROWS, analytics_prefix=None)
    rel.create_namespace()
    try:
        rel.helm("install", RELEASE, str(CHART), *_values(["69"]), "--set", "kafka.enabled=false",
                 "--set", f"externalKafka.bootstrapServers={WRONG_KAFKA}",
                 "--set", f"producer.kafkaWaitSeconds={KAFKA_WAIT_S}", "--set", "producer.backoffLimit=0",
                 "--set", "consumer.replicas=0", "--set", "analytics.enabled=false")
        installed = time.monotonic()
        deadline = installed + KAFKA_WAIT_S + 120  # the wait, plus scheduling and the image's start
        while True:
            pods = _producer_pods(rel, "69")
            failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
            if failed:
                break
            for p in pods:  # never an eternal Init:0/1
                assert time.monotonic() < deadline, \
                    f"producer pod still {p['status'].get('phase')} after {KAFKA_WAIT_S}s + 120s\n{rel.describe()}"
            assert time.monotonic() < deadline, f"no producer pod failed\n{rel.describe()}"
            time.sleep(1)
        pod = failed[0]
        (init,) = [c for c in pod["status"]["initContainerStatuses"] if c["name"] == "wait-for-kafka"]
        assert init["state"]["terminated"]["exitCode"] == 1, init
        text = _log(rel, pod["metadata"]["name"], "wait-for-kafka")
        lines = text.strip().splitlines()
        assert lines and "event=kafka_wait_start" in lines[0] and WRONG_KAFKA in lines[0], text
        assert "event=kafka_gave_up" in lines[-1] and WRONG_KAFKA in lines[-1] and \
            f"KAFKA_WAIT_S={KAFKA_WAIT_S}" in lines[-1], text
        warnings = [ln for ln in lines if "event=kafka_wait " in ln]
        assert warnings and all(WRONG_KAFKA in ln for ln in warnings), text
        print(f"cluster: wrong Kafka address: the producer pod failed {time.monotonic() - installed:.0f}s after "
              f"install; {lines[-1][:200]}")
    finally:
        rel.uninstall()
