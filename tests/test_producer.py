"""The department producer against a real Kafka broker and the ADEME stand-in (issue: producer Job).

Each test runs ``dpe-ingest produce`` as a real process, as the Kubernetes Job does, then reads the
topics back and reconciles them with the stand-in's dataset row by row.
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import reconcile as rec
from dpe_ingest.standin.data import Dataset
from dpe_ingest.standin.faults import Faults
from dpe_ingest.status_sources import Collector

from kafka_util import command, duplicates, events, read_topic, run, start

pytestmark = pytest.mark.kafka


@pytest.fixture
def standin(standin_factory):
    return standin_factory


@pytest.fixture
def topics(unique_name):
    base = unique_name("prod")
    return {"KAFKA_TOPIC": base, "KAFKA_DLQ_TOPIC": base + "-dlq",
            "PRODUCER_CHECKPOINT_TOPIC": base + "-ckpt", "KAFKA_TOPIC_PARTITIONS": "3"}


def env_for(kafka_bootstrap, srv, topics, department, **extra):
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "ADEME_API_URL": srv.url, "DEPARTMENT": department,
           "ADEME_PAGE_SIZE": "500", **topics}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def expected(dataset: Dataset, dep: str) -> dict[str, dict]:
    """numero_dpe -> message the producer must send for every healthy row of ``dep``."""
    out = {}
    for i, row in enumerate(dataset.iter_rows(dep)):
        if dataset.is_malformed(dep, i):
            continue
        msg = rec.message_of(row, dep)  # the base fields written out in the test, not config's constant
        out[msg["numero_dpe"]] = msg
    return out


def messages_by_department(records) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for r in records:
        msg = r.json()
        assert r.key.decode() == msg["numero_dpe"], "messages are keyed by numero_dpe"
        out.setdefault(msg["departement"], {})[msg["numero_dpe"]] = msg
    return out


def test_three_departments_in_parallel_produce_exactly_the_api_rows(kafka_bootstrap, standin, topics):
    # 69 is above the API's 10 000-result page window: only the cursor can fetch it whole.
    ds = Dataset({"69": 12_345, "01": 2_000, "38": 3_456}, seed=7)
    srv = standin(ds)
    deps = ["69", "01", "38"]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda d: run(command("produce"), env_for(kafka_bootstrap, srv, topics, d)), deps))
    for dep, res in zip(deps, results):
        assert res.returncode == 0, f"producer {dep} failed:\n{res.stderr[-3000:]}"
        done = events(res.stderr, "done")
        assert len(done) == 1 and done[0]["rows"] == str(ds.count(dep)), done
        pages = events(res.stderr, "page")
        assert pages and pages[-1]["department"] == dep and pages[-1]["total"] == str(ds.count(dep))
        assert {"rate", "eta_s", "rows", "page"} <= set(pages[0])
        # the API budget group shared among the three: each page line says this producer's share
        assert all(0 < float(p["share"]) <= 1 for p in pages), pages[-1]
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    assert duplicates(records) == 0
    got = messages_by_department(records)
    for dep in deps:
        assert got[dep] == expected(ds, dep), f"department {dep} differs from the API"
    assert len(records) == 12_345 + 2_000 + 3_456
    assert {r.partition for r in records} == {0, 1, 2}, "keys spread over the topic's partitions"


def test_finished_department_is_not_fetched_again_unless_asked(kafka_bootstrap, standin, topics):
    ds = Dataset({"2A": 1_200}, seed=3, malformed_rate=0.02)
    bad = ds.malformed_indices("2A")
    assert bad
    srv = standin(ds)
    env = env_for(kafka_bootstrap, srv, topics, "2a")
    assert run(command("produce"), env).returncode == 0
    served = srv.requests_served
    again = run(command("produce"), env)
    assert again.returncode == 0 and events(again.stderr, "already_done"), again.stderr[-2000:]
    # a finished department fetches no page again: two small requests check that the dataset is the
    # one the checkpoint was written for (metadata, and the largest _i: a re-created dataset restarts it)
    assert srv.requests_served == served + 2, "a finished department must not page the API again"
    forced = run(command("produce", "--restart"), env)
    assert forced.returncode == 0 and events(forced.stderr, "restart")
    assert srv.requests_served > served
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    assert len(records) == 2 * (1_200 - len(bad))  # the forced re-run re-sent every row on purpose
    assert set(messages_by_department(records)["2A"]) == set(expected(ds, "2A"))
    # ... and every dead letter, with the same id: `dpe-ingest status` counts each refused row once
    letters = read_topic(kafka_bootstrap, topics["KAFKA_DLQ_TOPIC"])
    ids = [json.loads(r.value)["id"] for r in letters]
    assert len(ids) == 2 * len(bad) and len(set(ids)) == len(bad)
    assert all(i.startswith("producer:2A/") for i in ids)
    collector = Collector(settings=None)
    for r in letters:
        collector._on_dead_letter(r)
    assert collector.dead == {"2A": {"producer": len(bad)}}


def _wait_for_page(log_path, page: int, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        pages = events(text, "page")
        if pages and int(pages[-1]["page"]) >= page:
            return pages
        assert proc.poll() is None, f"producer exited early:\n{text[-3000:]}"
        time.sleep(0.05)
    raise AssertionError(f"page {page} not reached:\n{log_path.read_text()[-3000:]}")


@pytest.mark.parametrize("kill_at_page", [2, 7])
def test_killed_producer_resumes_and_resends_at_most_one_page(kafka_bootstrap, standin, topics, tmp_path,
                                                               kill_at_page):
    ds = Dataset({"38": 6_000}, seed=11)
    srv = standin(ds, Faults(p_slow=1.0, slow_s=0.15))  # slow pages: the kill lands mid-department
    env = env_for(kafka_bootstrap, srv, topics, "38")
    log1 = tmp_path / "first.log"
    proc = start(command("produce"), env, log1)
    try:
        _wait_for_page(log1, kill_at_page, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    srv.faults = Faults()
    second = run(command("produce"), env)
    assert second.returncode == 0, second.stderr[-3000:]
    resume = events(second.stderr, "resume")
    assert resume and int(resume[0]["page"]) >= kill_at_page, "restart must resume, not start over"
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    got = messages_by_department(records)["38"]
    assert got == expected(ds, "38"), "every row is in Kafka"
    assert duplicates(records) <= 500, f"{duplicates(records)} rows re-sent: more than one page"


def test_sigterm_checkpoints_and_exits_143_then_resumes_without_duplicates(kafka_bootstrap, standin, topics,
                                                                           tmp_path):
    ds = Dataset({"01": 5_000}, seed=5)
    srv = standin(ds, Faults(p_slow=1.0, slow_s=0.1))
    env = env_for(kafka_bootstrap, srv, topics, "01")
    log1 = tmp_path / "first.log"
    proc = start(command("produce"), env, log1)
    _wait_for_page(log1, 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 143, log1.read_text()[-2000:]
    assert events(log1.read_text(), "stopped")
    srv.faults = Faults()
    assert run(command("produce"), env).returncode == 0
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    assert duplicates(records) == 0
    assert messages_by_department(records)["01"] == expected(ds, "01")


def test_injected_429_5xx_and_cut_bodies_are_survived(kafka_bootstrap, standin, topics):
    ds = Dataset({"69": 4_000}, seed=9)
    faults = Faults(seed=4, p_429=0.15, retry_after_s=0.2, p_5xx=0.15, p_cut=0.15)
    faults.fail_next(2, "503")
    srv = standin(ds, faults)
    res = run(command("produce"), env_for(kafka_bootstrap, srv, topics, "69", ADEME_MAX_RETRIES=20))
    assert res.returncode == 0, res.stderr[-3000:]
    kinds = {kind for _, kind in faults.injected}
    assert {"429", "cut"} <= kinds and kinds & {"500", "502", "503"}, faults.injected
    # a 429 is waited out (api_throttled), the others are retried (api_retry): one event per fault
    assert len(events(res.stderr, "api_retry")) + len(events(res.stderr, "api_throttled")) == len(faults.injected)
    assert len(events(res.stderr, "api_throttled")) == sum(1 for _, k in faults.injected if k == "429")
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    assert duplicates(records) == 0
    assert messages_by_department(records)["69"] == expected(ds, "69")


def test_malformed_rows_go_to_the_dead_letter_topic_and_are_counted(kafka_bootstrap, standin, topics):
    ds = Dataset({"971": 3_000}, seed=2, malformed_rate=0.02)
    bad = ds.malformed_indices("971")
    assert len(bad) > 10
    srv = standin(ds)
    res = run(command("produce"), env_for(kafka_bootstrap, srv, topics, "971"))
    assert res.returncode == 0, res.stderr[-3000:]
    done = events(res.stderr, "done")[0]
    assert done["dead"] == str(len(bad)) and done["rows"] == str(3_000 - len(bad))
    dlq = [json.loads(r.value) for r in read_topic(kafka_bootstrap, topics["KAFKA_DLQ_TOPIC"])]
    assert len(dlq) == len(bad)
    assert {d["stage"] for d in dlq} == {"producer"} and {d["department"] for d in dlq} == {"971"}
    reasons = {d["reason"].split(" ")[0] for d in dlq}
    assert reasons <= {"missing", "unparsable"} and len(reasons) == 2, reasons
    good = messages_by_department(read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"]))["971"]
    assert good == expected(ds, "971")


@pytest.mark.parametrize("code", ["99", "2C", "6a", "979"])
def test_bad_department_code_exits_non_zero_with_the_valid_forms(kafka_bootstrap, standin, topics, code):
    srv = standin(Dataset(10))
    res = run(command("produce", code), env_for(kafka_bootstrap, srv, topics, code))
    assert res.returncode == 2
    assert f"invalid department code '{code}'" in res.stderr
    assert "01..19, 2A, 2B, 21..95, 971..978, 988, none" in res.stderr
    assert srv.requests_served == 0
    _assert_nothing_written(kafka_bootstrap, topics)


def test_empty_department_exits_2_and_writes_nothing(kafka_bootstrap, standin, topics):
    srv = standin(Dataset(10))
    res = run(command("produce"), env_for(kafka_bootstrap, srv, topics, ""))
    assert res.returncode == 2 and "DEPARTMENT is not set" in res.stderr
    assert srv.requests_served == 0
    _assert_nothing_written(kafka_bootstrap, topics)


def _assert_nothing_written(kafka_bootstrap, topics):
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        existing = set(admin.list_topics())
    finally:
        admin.close()
    assert not existing & {topics["KAFKA_TOPIC"], topics["KAFKA_DLQ_TOPIC"], topics["PRODUCER_CHECKPOINT_TOPIC"]}


def test_rows_without_a_department_and_the_new_codes(kafka_bootstrap, standin, topics):
    """`none` fetches exactly the rows without code_departement_ban (departement null in Kafka, NULL in
    dpe_data); 977/978/988 are departments like the others.  Every department plus none is the whole
    dataset."""
    ds = Dataset({"977": 700, "978": 0, "988": 1_100}, default_rows=0, rows_without_department=1_234, seed=4)
    srv = standin(ds)
    deps = ["none", "977", "978", "988"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda d: run(command("produce"), env_for(kafka_bootstrap, srv, topics, d)), deps))
    for dep, res in zip(deps, results):
        assert res.returncode == 0, f"producer {dep} failed:\n{res.stderr[-3000:]}"
        assert events(res.stderr, "done")[0]["rows"] == str(ds.count(dep))
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    assert duplicates(records) == 0 and len(records) == ds.total == 1_234 + 700 + 1_100
    got = messages_by_department(records)
    assert set(got) == {None, "977", "988"}
    assert len(got[None]) == 1_234 and all(m["code_postal_ban"] is None for m in got[None].values())
    assert set(got[None]) == {r["numero_dpe"] for r in ds.iter_rows("none")}
    assert got["988"] == expected(ds, "988")


def test_fatal_400_exits_non_zero_with_the_api_message(kafka_bootstrap, standin, topics):
    srv = standin(Dataset(100))
    res = run(command("produce"), env_for(kafka_bootstrap, srv, topics, "69", ADEME_EXTRA_FIELDS="no_such_field"))
    assert res.returncode == 3, res.stderr[-2000:]
    refused = events(res.stderr, "api_refused")
    assert refused and refused[0]["status"] == "400" and "no_such_field" in refused[0]["msg"]
    # not retried: the metadata, the refresh mark (metric_agg), the count of rows without a department,
    # then the refused page, once
    assert srv.requests_served == 4, "a bad request is not retried"


def test_unreachable_kafka_gives_up_with_a_clear_message(standin, topics):
    srv = standin(Dataset(100))
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    res = run(command("produce"), {**env_for(f"127.0.0.1:{port}", srv, topics, "69"), "KAFKA_WAIT_S": "3"}, timeout=120)
    assert res.returncode == 1
    assert events(res.stderr, "gave_up") and f"127.0.0.1:{port}" in res.stderr


def test_virtual_dataset_two_value_cursors_end_to_end(kafka_bootstrap, standin, topics):
    """dpe03existant is a virtual dataset: `after=<_i>,<_rand>`; 25 000 rows, past the 10 000 window."""
    ds = Dataset({"13": 25_000}, default_rows=0, virtual=True, seed=11)
    srv = standin(ds)
    res = run(command("produce"), env_for(kafka_bootstrap, srv, topics, "13", ADEME_PAGE_SIZE="1000"))
    assert res.returncode == 0, res.stderr[-3000:]
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    assert duplicates(records) == 0 and messages_by_department(records)["13"] == expected(ds, "13")
    pages = events(res.stderr, "page")
    assert len(pages) == 26 and pages[-1]["rows"] == "25000"


def test_recreated_dataset_after_a_checkpoint_is_fetched_again_and_says_so(kafka_bootstrap, standin, topics):
    ds = Dataset({"38": 1_500}, default_rows=0, virtual=True, seed=12)
    srv = standin(ds)
    env = env_for(kafka_bootstrap, srv, topics, "38")
    assert run(command("produce"), env).returncode == 0
    ds.recreate()  # same rows, _i restarting from small values: a stored cursor would skip them all
    again = run(command("produce"), env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert events(again.stderr, "dataset_recreated") and not events(again.stderr, "already_done")
    assert events(again.stderr, "done")[0]["rows"] == "1500"
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    assert len(records) == 3_000 and set(messages_by_department(records)["38"]) == set(expected(ds, "38"))
    # and the new checkpoint is for the new dataset: the next run has nothing to do
    third = run(command("produce"), env)
    assert third.returncode == 0 and events(third.stderr, "already_done") and not events(third.stderr, "dataset_recreated")


def test_recreated_dataset_detected_by_its_restarted_line_numbers(kafka_bootstrap, standin, topics):
    """Even when the metadata looks the same, _i restarting below the checkpoint's reveals it."""
    ds = Dataset({"38": 1_200}, default_rows=0, seed=13, virtual=True)
    srv = standin(ds)
    env = env_for(kafka_bootstrap, srv, topics, "38")
    assert run(command("produce"), env).returncode == 0
    created = ds.created_at
    ds.recreate()
    ds.created_at = created  # a re-creation that kept its createdAt
    again = run(command("produce"), env)
    assert again.returncode == 0 and events(again.stderr, "dataset_recreated"), again.stderr[-3000:]
    assert "largest _i" in events(again.stderr, "dataset_recreated")[0]["msg"]


class _RecreateAt:
    """Live changes that re-create the dataset once, at the n-th request to /lines."""

    def __init__(self, n: int):
        self.n, self.seen, self.done = n, 0, False

    def on_request(self, ds: Dataset) -> None:
        self.seen += 1
        if self.seen == self.n:
            ds.recreate()
            self.done = True


@pytest.mark.parametrize("kept_created_at", [False, True], ids=["new-createdAt", "same-createdAt"])
def test_a_dataset_recreated_during_a_pass_restarts_it_instead_of_ending_short(kafka_bootstrap, standin, topics,
                                                                               kept_created_at):
    """Issue 20: the old cursor finds nothing in the re-created dataset; the pass must not end `done` short."""
    ds = Dataset({"38": 3_000}, default_rows=0, virtual=True, seed=14)
    created = ds.created_at
    change = _RecreateAt(5)  # a few pages into the 6-page pass (start-up requests count too)

    class Keep(_RecreateAt):
        def on_request(self, d):
            super().on_request(d)
            if self.done:
                d.created_at = created  # a re-creation that kept its createdAt: the line numbers tell

    srv = standin(ds, changes=Keep(5) if kept_created_at else change)
    env = env_for(kafka_bootstrap, srv, topics, "38")
    res = run(command("produce"), env)
    assert res.returncode == 0, res.stderr[-3000:]
    recreated = events(res.stderr, "dataset_recreated")
    assert len(recreated) == 1 and "during the pass" in recreated[0]["msg"], res.stderr[-3000:]
    done = events(res.stderr, "done")
    assert len(done) == 1 and done[0]["rows"] == "3000", done
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    assert messages_by_department(records)["38"] == expected(ds, "38")
    # the checkpoint is the new dataset's: the next run has nothing to do
    again = run(command("produce"), env)
    assert again.returncode == 0 and events(again.stderr, "already_done"), again.stderr[-3000:]


def test_a_pass_short_of_deactivated_rows_ends_normally_and_says_so(kafka_bootstrap, standin, topics):
    """Rows deactivated while the pass runs make it read fewer than the announced total: not a re-creation."""
    from dpe_ingest.standin.data import LiveChanges

    ds = Dataset({"38": 3_000}, default_rows=0, seed=15)
    srv = standin(ds, changes=LiveChanges(["38"], every=2, deactivations=20, seed=3, stop_after=2))
    res = run(command("produce"), env_for(kafka_bootstrap, srv, topics, "38"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert not events(res.stderr, "dataset_recreated") and events(res.stderr, "short_pass"), res.stderr[-3000:]
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    assert set(messages_by_department(records)["38"]) >= set(ds.current_rows("38"))
