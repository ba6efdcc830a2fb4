"""One API budget for every producer (issue #16): data-fair limits a client — an IP, and behind a NAT
every Job of a cluster is one IP — to a request rate and a compute budget, with 429s and no
Retry-After.  Producers treat a 429 as flow control: they wait, they never give up for it, and they do
not storm the API after a lock-out.  Real processes, a real Kafka, the stand-in enforcing the limits."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dpe_ingest.standin import Dataset, Limits, Tier

from kafka_util import command, duplicates, events, read_topic, run
from kafka_util import start as launch
from test_producer import _assert_nothing_written, env_for, expected, messages_by_department

pytestmark = pytest.mark.kafka


@pytest.fixture
def topics(unique_name):
    base = unique_name("budget")
    return {"KAFKA_TOPIC": base, "KAFKA_DLQ_TOPIC": base + "-dlq",
            "PRODUCER_CHECKPOINT_TOPIC": base + "-ckpt", "KAFKA_TOPIC_PARTITIONS": "3"}


def test_seven_producers_share_one_budget_and_lose_nothing(kafka_bootstrap, standin_factory, topics):
    # 120 requests per minute, on a 10 s window (20 requests, refilled at 2/s), and a compute budget
    # of 1 s per 10 s while a 500-row page costs 120 ms: the compute budget binds.  The producers know
    # the tier (ADEME_COMPUTE_MS) but think a page costs less than it does (0.1 ms per row where the
    # stand-in bills 0.2): they overdraw it, are locked out, and wait each lock-out out
    window = 10.0
    deps = ["69", "01", "38", "13", "2A", "977", "none"]
    ds = Dataset({d: 1_500 for d in deps if d != "none"}, default_rows=0, rows_without_department=900,
                 virtual=True, seed=21)
    limits = Limits(anonymous=Tier(nb=20, duration_s=window, compute_ms=1000.0, bandwidth=500_000.0))
    srv = standin_factory(ds, limits=limits)
    share = 2.0 / len(deps)  # the chart's rule: ademe.maxTotalRps divided among the departments running
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(deps)) as pool:
        results = list(pool.map(lambda d: run(command("produce"), env_for(
            kafka_bootstrap, srv, topics, d, ADEME_MAX_RPS=f"{share:.4f}", ADEME_RATE_WINDOW_S=str(window),
            ADEME_MAX_RETRIES="2", ADEME_COMPUTE_MS="1000", ADEME_COST_PER_ROW_MS="0.1"), timeout=600), deps))
    elapsed = time.monotonic() - t0
    for dep, res in zip(deps, results):
        assert res.returncode == 0, f"producer {dep} failed:\n{res.stderr[-3000:]}"
        done = events(res.stderr, "done")[0]
        assert done["rows"] == str(ds.count(dep)) and "api_rps" in done and "api_throttled" in done
    # nothing lost, nothing duplicated
    records = read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])
    assert duplicates(records) == 0 and len(records) == ds.total
    got = messages_by_department(records)
    for dep in deps:
        assert got[None if dep == "none" else dep] == expected(ds, dep)
    # the budget was really binding: lock-outs happened and were waited out
    outcomes = limits.outcomes()
    throttled = sum(int(events(r.stderr, "done")[0]["api_throttled"]) for r in results)
    assert outcomes.get("compute", 0) >= 1 and throttled == outcomes.get("compute", 0) + outcomes.get("rate", 0)
    # requests admitted within the budget: a full bucket at the start, then 20 per 10 s
    assert outcomes["ok"] <= 20 + 20 * elapsed / window + 1, (outcomes, elapsed)
    # no storm after a lock-out: at most one request per producer while its client is locked out
    spans = limits.lockouts.get("127.0.0.1", [])
    assert spans
    # no request abandoned for its read timeout (data-fair would bill it)
    assert all(int(events(r.stderr, "done")[0]["api_timeouts"]) == 0 for r in results)
    for start, end in spans:
        per_agent: dict[str, int] = {}
        for rec in limits.log:
            if start - 1e-6 <= rec.t < end:
                per_agent[rec.agent] = per_agent.get(rec.agent, 0) + 1
        assert per_agent and max(per_agent.values()) <= 1, (start, end, per_agent)


def test_api_key_reaches_the_api_as_x_apikey_and_is_never_logged(kafka_bootstrap, standin_factory, topics):
    key = "k3y-Zq8v-very-secret"
    ds = Dataset({"38": 1_200}, default_rows=0, seed=22)
    limits = Limits(api_keys={key: "ingest"})
    srv = standin_factory(ds, limits=limits)
    res = run(command("produce"), env_for(kafka_bootstrap, srv, topics, "38", ADEME_API_KEY=key, LOG_LEVEL="DEBUG"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert srv.api_keys_seen and set(srv.api_keys_seen) == {key}
    assert limits.outcomes("user:ingest")["ok"] == srv.requests_served  # every request in the key's tier
    assert key not in res.stderr + res.stdout
    assert len(read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])) == 1_200


def test_unknown_api_key_fails_at_once_naming_the_setting_and_writes_nothing(kafka_bootstrap, standin_factory,
                                                                              topics):
    srv = standin_factory(Dataset({"38": 100}, default_rows=0), limits=Limits(api_keys={"good": "u"}))
    res = run(command("produce"), env_for(kafka_bootstrap, srv, topics, "38", ADEME_API_KEY="wrong-key-123"))
    assert res.returncode == 2, res.stderr[-3000:]
    err = events(res.stderr, "config_error")
    assert err and "ADEME_API_KEY" in err[0]["msg"] and "ademe.apiKey.existingSecret" in err[0]["msg"]
    assert "inconnue" in err[0]["msg"] and "wrong-key-123" not in res.stderr
    assert srv.requests_served == 1  # not retried
    _assert_nothing_written(kafka_bootstrap, topics)


class Gate:
    """The stand-in's hook on every ``/lines`` request (where LiveChanges plugs in): each waits until
    the gate is opened.  A producer reads /lines only once it holds a slot, so while the gate is closed
    the slot holders cannot finish, whatever the time the other producers take to start."""

    def __init__(self) -> None:
        self.opened = threading.Event()

    def on_request(self, _dataset) -> None:
        self.opened.wait(600)


def test_at_most_max_concurrent_producers_page_at_once(kafka_bootstrap, standin_factory, topics, tmp_path):
    """PRODUCER_MAX_CONCURRENT (chart producer.maxConcurrent): slots held through a Kafka consumer group."""
    import datetime as dt

    deps = ["69", "01", "38", "13", "33"]
    ds = Dataset({d: 1_000 for d in deps}, default_rows=0, seed=23)
    gate = Gate()
    srv = standin_factory(ds, changes=gate)
    logs = {d: tmp_path / f"producer-{d}.log" for d in deps}
    procs = {d: launch(command("produce"), env_for(kafka_bootstrap, srv, topics, d, ADEME_PAGE_SIZE="100",
                                                   PRODUCER_MAX_CONCURRENT="2"), logs[d]) for d in deps}

    def holding_and_waiting() -> tuple[list[str], list[str]]:
        text = {d: p.read_text(errors="replace") for d, p in logs.items()}
        holding = [d for d in deps if events(text[d], "slot_acquired")]
        return holding, [d for d in deps if d not in holding and events(text[d], "slot_wait")]

    try:
        deadline = time.monotonic() + 300
        # until the slots group settled: two holding and three waiting (a third holder never lets the
        # loop end: the deadline fails it, printing the logs)
        while len(holding_and_waiting()[0]) < 2 or len(holding_and_waiting()[1]) < 3:
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), \
                "\n".join(f"{d}: {p.read_text(errors='replace')[-1500:]}" for d, p in logs.items())
            time.sleep(0.2)
        holding, waiting = holding_and_waiting()
        # every producer is running: two hold the slots (their first page held at the gate), three wait
        assert len(holding) == 2 and len(waiting) == 3, (holding, waiting)
    finally:
        gate.opened.set()
        for p in procs.values():
            try:
                p.wait(600)
            finally:
                if p.poll() is None:
                    p.kill()
    spans = []
    for dep in deps:
        text = logs[dep].read_text(errors="replace")
        assert procs[dep].returncode == 0, f"producer {dep} failed:\n{text[-3000:]}"
        got, gone = events(text, "slot_acquired"), events(text, "slot_released")
        assert len(got) == 1 and len(gone) == 1, text[-2000:]
        t = [dt.datetime.fromisoformat(e["ts"].replace("Z", "+00:00")) for e in (got[0], gone[0])]
        spans.append((t[0], t[1], dep))
    assert len(read_topic(kafka_bootstrap, topics["KAFKA_TOPIC"])) == 5_000
    most = max(sum(1 for a, b, _ in spans if a <= t0 < b) for t0, _, _ in spans)
    assert most <= 2, spans
