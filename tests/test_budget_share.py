"""One API budget used whole (issue 20): each producer's share of data-fair's limits comes from a Kafka
consumer group (budget.BudgetShare) and paces its requests (ademe.RateLimiter); start-up requests go
at once; read timeouts scale with what the share allows for the page; a compute lock-out is waited out
for what it costs."""

from __future__ import annotations

import json
import threading
import time

import pytest

from dpe_ingest import ademe
from dpe_ingest.budget import BudgetShare, budget_topic
from dpe_ingest.config import KafkaSettings

from test_producer_unit import COMPUTE_429, PAGE, FakeResponse


class Clock:
    def __init__(self):
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


# ----------------------------------------------------------------------------------------- the pace
def test_a_producers_byte_pace_follows_its_share_as_it_changes():
    clock = Clock()
    share = [0.1]
    lim = ademe.RateLimiter(0, clock=clock, sleep=clock.sleep, share=lambda: share[0], bandwidth=500_000)
    lim.wait()
    lim.record_bytes(100_000)  # a page of 100 kB at 10 % of 500 kB/s: ~2 s before the next request
    assert lim.delay() == pytest.approx(100_000 / (500_000 * 0.1 * ademe.HEADROOM))
    share[0] = 0.5  # a department finished: its share came to this one
    assert lim.delay() == pytest.approx(100_000 / (500_000 * 0.5 * ademe.HEADROOM))
    lim.wait()
    assert sum(clock.slept) == pytest.approx(100_000 / (500_000 * 0.5 * ademe.HEADROOM), rel=1e-6)


def test_the_release_shares_add_up_to_the_limits_never_more():
    # ten producers, ten shares summing to 1: together they pace at HEADROOM x the bandwidth
    clock = Clock()
    shares = [0.25, 0.25, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025, 0.025]
    assert sum(shares) == pytest.approx(1.0)
    rates = [ademe.RateLimiter(0, clock=clock, sleep=clock.sleep, share=lambda s=s: s, bandwidth=500_000,
                               compute_ms=20_000, window_s=60).rates() for s in shares]
    assert sum(r[1] for r in rates) == pytest.approx(500_000 * ademe.HEADROOM)
    assert sum(r[2] for r in rates) == pytest.approx(20_000 / 60 * ademe.HEADROOM)


def test_no_share_yet_waits_until_the_group_gives_one():
    clock = Clock()
    share = [0.0]

    def sleep(s):
        clock.sleep(s)
        if clock.now >= 3.0:
            share[0] = 0.5  # the group's rebalance gave this producer partitions

    lim = ademe.RateLimiter(0, clock=clock, sleep=sleep, share=lambda: share[0], bandwidth=500_000)
    lim.wait()
    assert 3.0 <= clock.now <= 3.5 and lim.waited_for_share


def test_start_up_requests_go_at_once_within_the_burst():
    """Today's limiter spaced the three start-up requests (metadata, mark, none count) by 1 / (8/106) s."""
    clock = Clock()
    with open_budget({"maxTotalRps": 8, "departments": 106}) as path:
        c = ademe.AdemeClient("http://api/ds", session=Script([FakeResponse(200, b"{}")] * 2 + [FakeResponse(200, PAGE)] * 2),
                              sleep=clock.sleep, budget_file=path, bandwidth=500_000, compute_ms=20_000)
        c.limiter._clock = clock
        c.dataset_info()
        c.get_json(c.dataset_url + "/metric_agg")
        c.fetch(c.lines_url, {"size": 0})
        c.fetch(c.lines_url, {"size": 500})
    assert clock.slept == []


# ----------------------------------------------------------------------------------------- timeouts
class Script:
    def __init__(self, responses):
        self.responses, self.timeouts, self.headers = list(responses), [], {}

    def get(self, url, params=None, timeout=None):
        self.timeouts.append(timeout)
        return self.responses.pop(0)


def test_read_timeout_scales_with_the_page_bytes_over_the_share_of_the_bandwidth():
    share = [0.01]
    s = Script([FakeResponse(200, PAGE)] * 2)
    c = ademe.AdemeClient("http://api/ds", session=s, sleep=lambda _: None, timeout_s=30, share=lambda: share[0],
                          bandwidth=500_000)
    c.bytes_per_row = 287.0
    c.limiter._bytes_debt = 0.0
    c.fetch(c.lines_url, {"size": 2000})
    connect, read = s.timeouts[0]
    # 2000 rows x 287 B at 1 % of 500 kB/s: 115 s of throttle; the read timeout allows twice that
    assert connect == 30 and read == pytest.approx(30 + 2 * 2000 * 287 / 5000)
    share[0] = 1.0
    c.bytes_per_row = 287.0
    c.limiter._bytes_debt = 0.0
    c.fetch(c.lines_url, {"size": 2000})
    assert s.timeouts[1][1] == pytest.approx(30 + 2 * 2000 * 287 / 500_000)
    # no bandwidth known: the plain timeout
    c2 = ademe.AdemeClient("http://api/ds", session=Script([FakeResponse(200, PAGE)]), sleep=lambda _: None)
    c2.fetch(c2.lines_url, {"size": 2000})
    assert c2.session.timeouts[0] == (30.0, 30.0)


# ----------------------------------------------------------------------------------------- lock-outs
def test_a_compute_lock_out_is_waited_for_what_it_costs_not_a_window():
    """Today's client waited a whole window x 1.05-1.3 (63-78 s) whatever the lock-out cost."""
    def client_at(share, script):
        clock = Clock()
        c = ademe.AdemeClient("http://api/ds", session=Script(script), sleep=clock.sleep, share=lambda: share,
                              compute_ms=20_000, rate_window_s=60, cost_base_ms=20, cost_per_row_ms=0.1)
        c.limiter._clock, c.limiter._last = clock, 0.0
        return c, clock.slept

    c, sleeps = client_at(1.0, [FakeResponse(429, COMPUTE_429), FakeResponse(200, PAGE)])
    c.fetch(c.lines_url, {"size": 500})
    # one page (70 ms, twice for the estimate's error) refilled at 20 s / 60 s: 0.42 s (x 1..1.3 jitter);
    # the refused request owes nothing
    assert len(sleeps) == 1 and 0.42 <= sleeps[0] <= 0.42 * 1.3 + 1e-9, sleeps
    # a producer with a tenth of the budget: the release's overdraft is one page per producer
    c, sleeps = client_at(0.1, [FakeResponse(429, COMPUTE_429)] * 2 + [FakeResponse(200, PAGE)])
    c.fetch(c.lines_url, {"size": 500})
    assert len(sleeps) == 2 and 4.2 <= sleeps[0] <= 4.2 * 1.3 + 1e-9, sleeps
    assert 8.4 <= sleeps[1] <= 8.4 * 1.3 + 1e-9  # a second lock-out in a row: the estimate was short, twice
    # the other thread of the producer (start-up or end-of-pass requests) waits the lock-out out too
    c, sleeps = client_at(1.0, [FakeResponse(429, COMPUTE_429)])
    try:
        c.fetch(c.lines_url, {"size": 500})
    except IndexError:  # the script has no second answer: the lock-out was waited, the retry asked
        pass
    assert c.limiter.delay() == 0.0  # the fake clock advanced by the wait itself
    # never more than one window: the longest a lock-out lasts
    lim = ademe.RateLimiter(0, share=lambda: 0.001, compute_ms=20_000, window_s=60)
    assert lim.lockout_wait(1020.0, 5) == 60.0


# ----------------------------------------------------------------------------------------- the group
class open_budget:
    def __init__(self, doc):
        import tempfile

        self.dir = tempfile.TemporaryDirectory()
        self.path = f"{self.dir.name}/budget.json"
        with open(self.path, "w") as f:
            json.dump(doc, f)

    def __enter__(self):
        return self.path

    def __exit__(self, *exc):
        self.dir.cleanup()


def _until(cond, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.kafka
def test_shares_are_handed_over_when_producers_leave_and_join(kafka_bootstrap, unique_name):
    settings = KafkaSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap})
    spec = budget_topic(settings, unique_name("ckpt"), 4)
    members = []
    try:
        a = BudgetShare(kafka_bootstrap, spec, context={"department": "a"})
        members.append(a)
        a.join()
        assert a.share() == 1.0
        b = BudgetShare(kafka_bootstrap, spec, context={"department": "b"})
        members.append(b)
        b.join()
        _until(lambda: a.share() == 0.5 and b.share() == 0.5, f"two halves: {a.share()} {b.share()}")
        c = BudgetShare(kafka_bootstrap, spec, context={"department": "c"})
        members.append(c)
        c.join()
        _until(lambda: sorted([a.share(), b.share(), c.share()]) == [0.25, 0.25, 0.5],
               f"three members: {a.share()} {b.share()} {c.share()}")
        for _ in range(2):  # more members than partitions: the last ones wait for one
            m = BudgetShare(kafka_bootstrap, spec)
            members.append(m)
            m.join()
        _until(lambda: sorted(x.share() for x in members) == [0.0, 0.25, 0.25, 0.25, 0.25],
               f"five members, four partitions: {[x.share() for x in members]}")
        # at no time more than the whole
        assert sum(x.share() for x in members) == 1.0
        # three finish: their partitions go to the two still running
        for m in members[:3]:
            m.close()
        rest = members[3:]
        _until(lambda: [x.share() for x in rest] == [0.5, 0.5], f"handed over: {[x.share() for x in rest]}")
        assert all(m.share() is None for m in members[:3])  # a member that left has no share any more
    finally:
        for m in members:
            m.close()


def test_an_unreachable_kafka_leaves_the_static_share(unused_port=None):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = KafkaSettings.from_env({"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"})
    share = BudgetShare(f"127.0.0.1:{port}", budget_topic(settings, "ckpt", 120), fallback=1 / 106,
                        join_timeout_s=2)
    stop = threading.Event()
    share.join(stop=stop)
    try:
        assert share.share() is None  # the limiter then uses 1 / the budget file's departments
        lim = ademe.RateLimiter(0, share=share.share, bandwidth=500_000)
        lim.departments = 106
        assert lim.share() == pytest.approx(1 / 106)
    finally:
        share.close()


def test_the_time_a_request_takes_counts_in_the_pace():
    """A page owed from the moment it is asked for: a producer whose responses take longer than its pace
    (the tail: a few producers with large shares) asks again as soon as the page arrived."""
    clock = Clock()
    lim = ademe.RateLimiter(0, clock=clock, sleep=clock.sleep, share=lambda: 0.1, bandwidth=500_000)
    rate = 500_000 * 0.1 * ademe.HEADROOM
    lim.wait(expected_bytes=100_000)
    clock.now += 1.5  # the response takes 1.5 s to come
    lim.record_bytes(100_000, expected=100_000)
    assert lim.delay() == pytest.approx(100_000 / rate - 1.5)
    lim.wait(expected_bytes=100_000)
    clock.now += 5.0  # slower than the pace: nothing more to wait once it arrived
    lim.record_bytes(90_000, expected=100_000)
    assert lim.delay() == 0.0


def test_a_producer_starts_with_its_share_of_the_full_compute_bucket_and_loses_it_in_a_lock_out():
    clock = Clock()
    lim = ademe.RateLimiter(0, clock=clock, sleep=clock.sleep, share=lambda: 0.1, compute_ms=20_000, window_s=60)
    lim.stagger(0.0)  # joined: data-fair's bucket is full when a release starts
    for _ in range(17):  # 17 pages of 120 ms: the first 16 within its 1.94 s (0.1 x 20 s x 0.97), no wait
        lim.wait(120.0)
    assert clock.slept == []
    lim.wait(120.0)  # then paced at its share of the refill: the 17th left a debt of 100 ms
    assert sum(clock.slept) == pytest.approx((17 * 120 - 1940) / (20_000 / 60 * 0.1 * ademe.HEADROOM))
    lim.stagger(0.0)
    lim.locked_out()  # a compute 429: the bucket is empty, whatever this producer thought
    assert lim._compute_debt == 0.0
