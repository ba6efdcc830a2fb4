"""Client of the ADEME data-fair API: ``GET {dataset}/lines`` followed by its cursor.

Pagination follows the API's own ``next`` link (which carries the ``after`` cursor), the way dlt's
``JSONLinkPaginator`` does: never page numbers, so the 10 000-results window of ``page x size`` never
applies and a department of any size is fetched whole.  The ``after`` value of every page is exposed
so a restarted producer can resume from the last acknowledged page.

Flow control: a 429 is not a failure.  data-fair limits every client (an IP, or the user of an API
key) to a request rate and a compute budget, and sends no Retry-After: the client waits and asks
again, for as long as it takes (the Job's deadline is the bound), never counting it as a retry.  A
compute-budget 429 ("Le temps de traitement cumulé…") means a lock-out of up to one window
(``rate_window_s``, 60 s in data-fair): the client waits what it costs (``RateLimiter.lockout_wait``: the
release's overdraft, one page per producer, refilled at the compute budget's rate; one window when the
budget is unknown), so it sends at most one request per lock-out.  Before any 429, ``RateLimiter``
paces the requests to this producer's share of the release's budget (``budget.BudgetShare``).  A
request-rate 429 backs off exponentially with jitter up to one window.  A
Retry-After, when a proxy sends one, wins, up to the longer of ``retry_max_s`` and one window (a
Retry-After of a day, or of an HTTP date in year 9999, is waited that long and asked again).

Retries: 5xx, 408, timeouts, connection resets and cut or truncated bodies are retried with capped
exponential backoff and jitter, bounded by a number of attempts and a total waiting time; so is a 200 that
is no data-fair page (no ``results`` list, a ``total`` that is not a count, a ``next`` that is not an http(s)
URL, JSON nested too deep to read) and a redirect to something that is not http(s).  A 401 is a
wrong API key: ``ApiAuthError``, a configuration error.  Any other 4xx is a request we built wrong or a
dataset that does not exist: retrying cannot help, so it raises ``ApiRequestError`` with the API's own
message.  The API key goes in the ``x-apiKey`` header and is never logged.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import orjson
import requests

from . import departments, logs
from .config import http_url

log = logging.getLogger("dpe_ingest.ademe")

RETRYABLE_STATUS = frozenset({408, 425, 500, 502, 503, 504})
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0


class ApiRequestError(Exception):
    """The API refused the request itself (a 4xx other than 408/425/429): fatal, do not retry."""

    def __init__(self, status: int, url: str, detail: str):
        self.status, self.url, self.detail = status, url, detail
        super().__init__(f"ADEME API refused the request with HTTP {status}: {detail} (url: {url})")


class ApiAuthError(ApiRequestError):
    """401: the API key is unknown to the API (data-fair: "Cette clé d'API est inconnue.")."""


class ApiUnavailable(Exception):
    """Retries exhausted: the API kept failing (5xx, timeouts, cut bodies)."""


class ApiInterrupted(Exception):
    """The wait before the next request was interrupted (the producer is stopping)."""


COMPUTE_BUDGET_429 = "Le temps de traitement cumulé"


@dataclass
class Page:
    rows: list[dict[str, Any]]
    total: int | None
    next_url: str | None
    url: str
    attempts: int = 1
    prepared: Any = None  # what ``pages(prepare=…)`` made of the rows, in the fetching thread

    @property
    def has_next(self) -> bool:
        """data-fair gives ``next`` only after a full page; an empty page also means the end."""
        return bool(self.next_url and self.rows)

    @property
    def after(self) -> str | None:
        """The ``after`` cursor the ``next`` link carries (what a resume starts from)."""
        return cursor_of(self.next_url)


def cursor_of(url: str | None) -> str | None:
    if not url:
        return None
    values = parse_qs(urlsplit(url).query, keep_blank_values=True).get("after")
    return values[-1] if values else None


MOD_FIELD = "date_derniere_modification_dpe"


def build_qs(department: str, date_from: str | None = None, date_to: str | None = None,
             modified_from: str | None = None) -> str:
    """data-fair ``qs`` (Elasticsearch query-string syntax) selecting one department and dates.

    The pseudo-department ``none`` is the rows without code_departement_ban: no term on that field
    ever matches them, only ``NOT _exists_:code_departement_ban`` does.
    """
    if departments.is_none(department):
        parts = ["NOT _exists_:code_departement_ban"]
    else:
        parts = [f'code_departement_ban:"{department}"']
    if date_from or date_to:
        parts.append(f"date_reception_dpe:[{date_from or '*'} TO {date_to or '*'}]")
    if modified_from:  # a refresh: what changed since the mark (bounds unquoted: data-fair's grammar)
        parts.append(f"{MOD_FIELD}:[{modified_from} TO *]")
    return " AND ".join(parts)


MAX_INTERVAL_S = 7 * 24 * 3600.0


#: requests a producer may send at once before its pace applies (its start-up: the dataset's metadata, the
#: refresh mark, the count of rows without a department, the first page); 120 producers x 4 = 480 stay under
#: data-fair's 600-request bucket, which starts full
STARTUP_BURST = 4
#: requests without rows (the dataset's metadata, the refresh mark, the count of rows without a department)
#: a producer sends at start, before its first page: they go at once (RateLimiter.start_up)
STARTUP_FREE = 3
#: the first pages of producers joining together are spread over at most this many seconds (RateLimiter.stagger)
STAGGER_MAX_S = 15.0
#: the pace aims this close to the limits themselves (data-fair's bucket absorbs the jitter; more would
#: queue responses on its throttle until its 100 pending sends tear them down)
HEADROOM = 0.97


class RateLimiter:
    """Paces one producer's requests to its share of the release's API budget, shared by threads.

    Three limits, each a token bucket refilled at ``share`` x the release's rate (data-fair's own buckets):
    requests (``rps``: the lower of ``ADEME_MAX_RPS`` and the budget file's maxTotalRps x share), bytes
    (``bandwidth`` x share, debited by :meth:`record_bytes` when a response arrived) and compute
    (``compute_ms`` per ``window_s`` x share, debited by the cost estimated for each request).  A request
    goes once every bucket is out of debt.  ``share``: a callable giving the share now (``BudgetShare``:
    0 = wait for one, None = not in the group); without it, or while it answers None, the static share
    1 / the budget file's departments applies.  The bucket of requests holds ``burst`` tokens, full at
    the start.

    ``budget_file``: a JSON file ``{"maxTotalRps": R, "departments": N}`` (the chart mounts it from a
    ConfigMap) re-read every ``reload_s``.
    """

    def __init__(self, rps: float, clock: Callable[[], float] = time.monotonic, sleep=time.sleep,
                 budget_file: str | None = None, reload_s: float = 15.0, context: dict | None = None,
                 share: Callable[[], float | None] | None = None, bandwidth: float = 0.0, compute_ms: float = 0.0,
                 window_s: float = 60.0, burst: int = 1):
        self.own_rps = rps
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep
        self.budget_file, self.reload_s, self.context = budget_file, reload_s, context or {}
        self._checked = None
        self._budget_text = None
        self.total_rps = 0.0  # the budget file's maxTotalRps
        self.departments = 1  # the budget file's departments: the static share is 1 / this
        self.share_of = share
        self.bandwidth, self.compute_ms, self.window_s = bandwidth, compute_ms, window_s
        self.burst = max(1, int(burst))
        self._tokens = float(self.burst)
        self._bytes_debt = 0.0
        self._compute_debt = 0.0
        self._last = clock()
        self.waited_for_share = False
        self._free = STARTUP_FREE
        self._held_until = 0.0
        if budget_file:
            self._reload(force=True)

    # -------------------------------------------------------------------------------- the share, the rates
    def share(self) -> float:
        got = self.share_of() if self.share_of is not None else None
        if got is None:
            return 1.0 / max(1, self.departments)
        return max(0.0, min(1.0, got))

    def rates(self, share: float | None = None) -> tuple[float, float, float]:
        """(requests/s, bytes/s, compute ms/s) this producer may use now (0 = not limited)."""
        s = self.share() if share is None else share
        shared = self.total_rps * s if self.total_rps > 0 else 0.0
        rates = [r for r in (self.own_rps, shared) if r > 0]
        rps = min(rates) if rates else 0.0
        bw = self.bandwidth * s * HEADROOM if self.bandwidth > 0 else 0.0
        cpu = self.compute_ms / self.window_s * s * HEADROOM if self.compute_ms > 0 else 0.0
        return rps, bw, cpu

    @property
    def rps(self) -> float:
        return self.rates()[0]

    @property
    def interval(self) -> float:
        rps = self.rps
        return min(1.0 / rps, MAX_INTERVAL_S) if rps > 0 else 0.0

    def _reload(self, force: bool = False) -> None:
        now = self._clock()
        if not force and self._checked is not None and now - self._checked < self.reload_s:
            return
        self._checked = now
        try:
            with open(self.budget_file, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            text = None
        if text == self._budget_text:
            return
        self._budget_text = text
        total, n = 0.0, 1
        try:
            doc = json.loads(text) if text else {}
            total, n = float(doc.get("maxTotalRps") or 0), int(doc.get("departments") or 1)
            if not math.isfinite(total):
                raise ValueError(total)
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError):
            total, n = 0.0, 1
            log.warning("ignoring unreadable API budget file %s", self.budget_file)
        self.total_rps, self.departments = max(0.0, total), max(1, n)
        logs.event(log, "api_budget", f"API request rate of this producer: {self.rps:.3f}/s "
                   f"(shared budget {text.strip() if text else 'none'})", rps=round(self.rps, 4),
                   **self.context)

    # -------------------------------------------------------------------------------- pacing
    def _drip(self, now: float, rps: float, bw: float, cpu: float) -> None:
        dt = max(0.0, now - self._last)
        self._last = now
        if rps > 0:
            self._tokens = min(float(self.burst), self._tokens + dt * rps)
        else:
            self._tokens = float(self.burst)
        self._bytes_debt = max(0.0, self._bytes_debt - dt * bw) if bw > 0 else 0.0
        # the compute bucket mirrors this producer's share of data-fair's: it holds up to share x one window's
        # budget (a negative debt), as data-fair's holds a whole window's when nobody asked for a while
        floor = -cpu * self.window_s
        self._compute_debt = max(floor, self._compute_debt - dt * cpu) if cpu > 0 else 0.0

    def delay(self) -> float:
        """Seconds until a request may go (inf: no share yet)."""
        with self._lock:
            return self._delay_locked(self._clock())

    def _delay_locked(self, now: float) -> float:
        s = self.share()
        if s <= 0:
            self._drip(now, 0.0, 0.0, 0.0)
            return math.inf
        rps, bw, cpu = self.rates(s)
        self._drip(now, rps, bw, cpu)
        need = 0.0
        if rps > 0 and self._tokens < 1.0:
            need = (1.0 - self._tokens) / rps
        if bw > 0 and self._bytes_debt > 0:
            need = max(need, self._bytes_debt / bw)
        if cpu > 0 and self._compute_debt > 0:
            need = max(need, self._compute_debt / cpu)
        need = max(need, self._held_until - now)
        return min(need, MAX_INTERVAL_S)

    def start_up(self) -> bool:
        """Whether one of the start-up requests is left: they go at once, their cost paid from what
        data-fair's buckets hold when the release starts (600 requests and 20 s of compute, full at the
        start: a release of 120 producers spends at most 360 small requests of ~20 ms there)."""
        with self._lock:
            if self._free <= 0:
                return False
            self._free -= 1
            return True

    def wait(self, cost_ms: float = 0.0, expected_bytes: float = 0.0) -> None:
        """Wait until this producer's share allows one more request costing ``cost_ms`` of compute.

        ``expected_bytes``: what the response is expected to weigh, owed from now on (settled by
        :meth:`record_bytes` when it arrived): the time the request takes counts in the pace, so a
        producer whose requests take longer than its pace still uses its whole share."""
        if self.budget_file:
            self._reload()
        logged = False
        while True:
            with self._lock:
                now = self._clock()
                need = self._delay_locked(now)
                if need <= 1e-9:
                    if self.rates()[0] > 0:
                        self._tokens -= 1.0
                    self._compute_debt += max(0.0, cost_ms)
                    if self.bandwidth > 0:
                        self._bytes_debt += max(0.0, expected_bytes)
                    return
            if need == math.inf:
                if not logged:
                    logs.event(log, "budget_wait", "waiting for a share of the API budget (every partition of "
                               "the budget group is held by other producers)", **self.context)
                    logged = self.waited_for_share = True
                need = 0.5
            # in slices: a share that grows (a department finished) shortens the wait at once
            self._sleep(min(need, 1.0) if self.share_of is not None else need)

    def refund(self, cost_ms: float) -> None:
        """A request data-fair refused (a 429) is billed no compute: what it was charged is given back."""
        with self._lock:
            self._compute_debt = max(0.0, self._compute_debt - max(0.0, cost_ms))

    def locked_out(self) -> None:
        """data-fair's compute bucket is empty: whatever this producer thought it held of it is gone."""
        with self._lock:
            self._compute_debt = max(0.0, self._compute_debt)

    def stagger(self, n_bytes: float, rng: random.Random | None = None) -> float:
        """A producer that just got its share starts owing a random part of one page (``n_bytes``): the first
        pages of producers that start together are spread over one round of their pace instead of all
        landing on data-fair's throttle at once (past 100 queued responses it tears them down).  Returns
        the debt added."""
        s = self.share()
        if self.compute_ms > 0 and s > 0:
            # data-fair's compute bucket is full when a release starts: this producer's share of it is its own
            with self._lock:
                self._compute_debt = min(self._compute_debt, -self.compute_ms * s * HEADROOM)
        if self.bandwidth <= 0 or n_bytes <= 0:
            return 0.0
        # at most STAGGER_MAX_S of this producer's pace: 120 first pages spread over that long keep data-fair's
        # queue under its 100 pending sends, and a producer does not sit on its share for long
        n_bytes = min(n_bytes, self.bandwidth * self.share() * HEADROOM * STAGGER_MAX_S)
        debt = (rng or random).uniform(0.0, n_bytes)
        with self._lock:
            self._bytes_debt += debt
        return debt

    def record_bytes(self, n: int, expected: float = 0.0) -> None:
        """A response of ``n`` bytes arrived (``expected`` of them were owed since it was sent): the
        bandwidth bucket owes the difference."""
        if self.bandwidth <= 0 or (n <= 0 and expected <= 0):
            return
        with self._lock:
            s = self.share()
            if s > 0:
                self._drip(self._clock(), *self.rates(s))
            self._bytes_debt = max(0.0, self._bytes_debt + n - expected)

    def seconds_for_bytes(self, n: float) -> float:
        """What this producer's share of the bandwidth takes to carry ``n`` bytes (0 = not paced)."""
        s = self.share()
        if self.bandwidth <= 0 or s <= 0:
            return 0.0
        return n / (self.bandwidth * s)

    def lockout_wait(self, cost_ms: float, in_a_row: int) -> float | None:
        """How long a compute lock-out lasts, seen from this producer (None: no compute budget known).

        Paced, every producer of the release has at most one request in flight, so the release's
        overdraft is at most one page per producer: ``cost_ms / share``; the budget refills at
        ``compute_ms / window_s``.  That is what the lock-out costs.  A second lock-out in a row means the
        estimate was short: twice as long, up to one window (the longest a lock-out lasts)."""
        if self.compute_ms <= 0:
            return None
        s = self.share() or 1.0 / max(1, self.departments)
        refill = self.compute_ms / self.window_s  # ms per s
        # twice the estimate: what data-fair bills a page is only estimated (ADEME_COST_*)
        base = 2.0 * max(cost_ms, 1.0) / s / refill
        return min(self.window_s, base * 2 ** max(0, in_a_row - 1))

    def wait_held(self) -> None:
        """Wait only for a lock-out this producer is waiting out (:meth:`hold`)."""
        while True:
            with self._lock:
                left = self._held_until - self._clock()
            if left <= 0:
                return
            self._sleep(min(left, 1.0))

    def hold(self, seconds: float) -> None:
        """No request of this producer (any thread) before ``seconds`` from now: a lock-out is waited out
        by all of them, so the producer sends at most one request per lock-out."""
        with self._lock:
            self._held_until = max(self._held_until, self._clock() + max(0.0, seconds))


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a Retry-After header: delta-seconds or an HTTP date; None when it is neither (``inf`` and
    ``nan`` are not delta-seconds; a date beyond what a datetime holds is not a date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def _error_detail(resp: requests.Response) -> str:
    text = resp.text.strip()
    try:
        body = resp.json()
        if isinstance(body, dict):
            for key in ("message", "error", "detail"):
                if body.get(key):
                    return str(body[key])[:500]
    except (ValueError, RecursionError):  # not JSON, nested too deep, an integer beyond 4300 digits
        return text[:500] or resp.reason
    return text[:500]


@dataclass
class AdemeClient:
    dataset_url: str
    timeout_s: float = 30.0
    max_retries: int = 8
    retry_max_s: float = 300.0
    max_rps: float = 0.0
    session: requests.Session = field(default_factory=requests.Session)
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    context: dict[str, Any] = field(default_factory=dict)  # logged with every retry (department…)
    api_key: str | None = field(default=None, repr=False)  # sent as x-apiKey, never logged
    rate_window_s: float = 60.0  # data-fair's rate-limit window: a compute lock-out lasts up to one
    stop: threading.Event | None = None  # set: a wait before the next request ends with ApiInterrupted
    budget_file: str | None = None  # the shared budget (maxTotalRps / departments), re-read
    share: Callable[[], float | None] | None = None  # this producer's share of the budget now (BudgetShare)
    bandwidth: float = 0.0  # data-fair's bytes/s per client (0 = not paced)
    compute_ms: float = 0.0  # data-fair's compute budget per window (0 = unknown)
    cost_base_ms: float = 20.0  # estimated compute of one search request
    cost_per_row_ms: float = 0.1  # ... plus this per row of the page size asked for

    def __post_init__(self) -> None:
        self.dataset_url = self.dataset_url.rstrip("/")
        self.lines_url = self.dataset_url + "/lines"
        self.limiter = RateLimiter(self.max_rps, sleep=self._pause, budget_file=self.budget_file,
                                   context=self.context, share=self.share, bandwidth=self.bandwidth,
                                   compute_ms=self.compute_ms, window_s=self.rate_window_s, burst=STARTUP_BURST)
        self.bytes_per_row = 400.0  # of a /lines page, learnt from each page read
        self.bytes_received = 0
        self.throttled_kinds: dict[str, int] = {}
        self._page_rows = 500  # the largest page asked for (what a lock-out's overdraft is made of)
        self.timeouts = 0  # requests abandoned for their read timeout (data-fair bills them all the same)
        who = self.context.get("department")
        agent = f"dpe-ingest ({who}; +https://github.com/dpe-ingest)" if who else "dpe-ingest (+https://github.com/dpe-ingest)"
        self.session.headers["User-Agent"] = agent
        self.session.headers.setdefault("Accept", "application/json")
        if self.api_key:
            self.session.headers["x-apiKey"] = self.api_key
        self.requests_made = 0
        self.retries_made = 0
        self.throttled = 0  # 429s waited out
        self.throttled_s = 0.0
        self._in_a_row_429 = 0
        self._stats_lock = threading.Lock()

    def _pause(self, seconds: float) -> None:
        if seconds <= 0:
            return
        if self.stop is not None:
            if self.stop.wait(seconds):
                raise ApiInterrupted("stopping: the wait before the next API request was cut short")
            return
        self.sleep(seconds)

    def throttle_delay(self, resp: requests.Response, cost_ms: float | None = None) -> tuple[float, str]:
        """How long to wait after a 429, and which limit it was."""
        retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
        if retry_after is not None:
            # the server's word, up to a bound: then ask again (a 429 is never a failure)
            return min(retry_after, max(self.retry_max_s, self.rate_window_s)) + self.rng.uniform(0.0, 1.0), \
                "retry_after"
        if resp.text.startswith(COMPUTE_BUDGET_429):
            # locked out until the budget is positive again: what the release's overdraft takes to refill
            # (RateLimiter.lockout_wait), at most one window from the last debit
            self.limiter.locked_out()
            # the release's overdraft is pages, whatever this request was (metadata costs nothing itself)
            page = self.cost_base_ms + self.cost_per_row_ms * self._page_rows
            cost = page if cost_ms is None else max(cost_ms, page)
            wait = self.limiter.lockout_wait(cost, self._in_a_row_429)
            if wait is None:
                return self.rate_window_s * self.rng.uniform(1.05, 1.3), "compute_budget"
            delay = wait * self.rng.uniform(1.0, 1.3)
            self.limiter.hold(delay)  # the other thread (start-up or end-of-pass requests) waits it out too
            return delay, "compute_budget"
        n = self._in_a_row_429
        cap = self.rate_window_s
        exp = min(cap, 2.0 * 2 ** max(0, n - 1))
        return self.rng.uniform(exp / 2, exp), "request_rate"

    # -- one call ----------------------------------------------------------------------------
    def fetch(self, url: str, params: dict[str, Any] | None = None, parse=None) -> Any:
        """GET one page, retrying what is worth retrying.  Raises ApiRequestError/ApiUnavailable."""
        waited = 0.0
        attempt = 0
        cost = self._cost_of(url, params)
        size = self._size_of(url, params)
        self._page_rows = max(self._page_rows, size)
        free = size == 0 and self.limiter.start_up()  # a start-up request: no wait, nothing owed
        expected = size * self.bytes_per_row
        while True:
            attempt += 1
            owed = not free
            if owed:
                self.limiter.wait(cost, expected)
            else:
                self.limiter.wait_held()  # a start-up request too waits out a lock-out this producer saw
            free = False  # a retry waits like any request
            self.requests_made += 1
            problem: str
            retry_after: float | None = None
            try:
                resp = self._get(url, params, self.read_timeout(size))
                if resp.status_code == 200 and size:
                    with self._stats_lock:
                        self.bytes_per_row = max(50.0, len(resp.content) / size)
                self._note_bytes(resp, expected if owed else None)
                if resp.status_code == 429:
                    if owed:
                        self.limiter.refund(cost)
                    with self._stats_lock:
                        self._in_a_row_429 += 1
                        self.throttled += 1
                    delay, kind = self.throttle_delay(resp, cost)
                    with self._stats_lock:
                        self.throttled_s += delay
                        self.throttled_kinds[kind] = self.throttled_kinds.get(kind, 0) + 1
                    attempt -= 1  # flow control, not a failed attempt
                    logs.event(log, "api_throttled", f"API budget exhausted ({kind}, HTTP 429): waiting "
                               f"{delay:.1f}s before asking again", logging.WARNING, limit=kind,
                               wait_s=round(delay, 2), throttled=self.throttled, **self.context)
                    self._pause(delay)
                    continue
                self._in_a_row_429 = 0
                if resp.status_code == 200:
                    if parse is not None:
                        return parse(resp)
                    page = self._parse(resp)
                    page.attempts = attempt
                    return page
                if resp.status_code == 401:
                    raise ApiAuthError(resp.status_code, _safe_url(resp.url), _error_detail(resp))
                if resp.status_code in RETRYABLE_STATUS or resp.status_code >= 500:
                    problem = f"HTTP {resp.status_code}: {_error_detail(resp)[:200]}"
                    retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                else:
                    raise ApiRequestError(resp.status_code, _safe_url(resp.url), _error_detail(resp))
            except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError, _TruncatedBody) as exc:
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
                if isinstance(exc, requests.Timeout):
                    with self._stats_lock:
                        self.timeouts += 1
            if attempt > self.max_retries:
                raise ApiUnavailable(f"gave up after {attempt} attempts ({waited:.0f}s of backoff): {problem}")
            delay = self._backoff(attempt, retry_after)
            if waited + delay > self.retry_max_s:
                raise ApiUnavailable(
                    f"gave up: retrying would exceed ADEME_RETRY_MAX_S={self.retry_max_s:g}s "
                    f"after {attempt} attempts: {problem}"
                )
            waited += delay
            self.retries_made += 1
            logs.event(log, "api_retry", f"API call failed ({problem}); retry {attempt}/{self.max_retries} "
                       f"in {delay:.1f}s", logging.WARNING, attempt=attempt, retry_in_s=round(delay, 2),
                       problem=problem, **self.context)
            self._pause(delay)

    # -- what a request costs, and how long it may take --------------------------------------------
    def _query_of(self, url: str, params: dict[str, Any] | None) -> dict[str, Any]:
        if params is not None:
            return params
        try:
            return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
        except ValueError:
            return {}

    def _size_of(self, url: str, params: dict[str, Any] | None) -> int:
        """Rows a /lines request asks for (0 for other routes)."""
        if "/lines" not in urlsplit(url).path:
            return 0
        try:
            return max(0, min(10000, int(self._query_of(url, params).get("size", 12))))
        except (TypeError, ValueError):
            return 0

    def _cost_of(self, url: str, params: dict[str, Any] | None) -> float:
        """The compute data-fair is estimated to bill for this request: the dataset's metadata is no search."""
        path = urlsplit(url).path.rstrip("/")
        if path == urlsplit(self.dataset_url).path.rstrip("/"):
            return 0.0
        return self.cost_base_ms + self.cost_per_row_ms * self._size_of(url, params)

    def read_timeout(self, size: int) -> float:
        """ADEME_TIMEOUT_S, plus twice what this producer's share of the bandwidth takes to carry the page
        (its bytes estimated from the pages read so far): a page waiting its turn in data-fair's throttle is
        not abandoned, which data-fair would bill without serving it."""
        return self.timeout_s + 2.0 * self.limiter.seconds_for_bytes(size * self.bytes_per_row)

    def _note_bytes(self, resp: requests.Response, expected: float | None) -> None:
        """Count the response's bytes; owed to the pace unless ``expected`` is None (a start-up request)."""
        n = len(resp.content or b"")
        with self._stats_lock:
            self.bytes_received += n
        if expected is not None:
            self.limiter.record_bytes(n, expected)

    def _get(self, url: str, params: dict[str, Any] | None, read_timeout: float | None = None) -> requests.Response:
        try:
            return self.session.get(url, params=params, timeout=(self.timeout_s, read_timeout or self.timeout_s))
        except (requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema, requests.exceptions.InvalidURL,
                requests.exceptions.TooManyRedirects, ValueError) as exc:
            # url is an http(s) URL (config and _parse see to it): a redirect went to ftp:, javascript:, a URL
            # urllib cannot split (ValueError) or in circles -- not data-fair's own answer
            raise _TruncatedBody(f"redirected to no http(s) URL ({type(exc).__name__}: {str(exc)[:200]})") from None

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        exp = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
        jittered = self.rng.uniform(exp / 2, exp)  # "equal jitter": never hammers, never 0
        if retry_after is not None:
            return max(retry_after, min(jittered, 1.0))  # the server's word wins, plus a hair
        return jittered

    @staticmethod
    def _parse(resp: requests.Response) -> Page:
        body = _loads(resp.content)
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            raise _TruncatedBody("response JSON has no 'results' list")
        total = body.get("total")
        if total is not None and (type(total) is not int or total < 0):
            raise _TruncatedBody(f"response JSON has a 'total' that is not a count: {_short(total)}")
        next_url = body.get("next") or None
        if next_url is not None and not (type(next_url) is str and http_url(next_url)):
            raise _TruncatedBody(f"response JSON has a 'next' that is not an http(s) URL: {_short(next_url)}")
        return Page(rows=body["results"], total=total, next_url=next_url, url=resp.url)

    # -- the dataset itself -----------------------------------------------------------------------
    def get_json(self, url: str, params: dict[str, Any] | None = None) -> dict:
        """GET a JSON document of the API (dataset metadata, metric_agg) with the same retries."""
        return self.fetch(url, params, parse=_json_object)

    def dataset_info(self) -> dict:
        """The dataset's metadata (``GET <dataset URL>``): id, createdAt, updatedAt, finalizedAt, count…"""
        return self.get_json(self.dataset_url)

    def max_line(self) -> int | None:
        """The largest ``_i`` of the dataset now (one row, sorted by -_i): a re-created dataset restarts
        its ``_i`` from small values, which makes a stored cursor point past its end."""
        page = self.fetch(self.lines_url, {"size": 1, "sort": "-_i", "select": "_i", "count": "false"})
        if page.rows and isinstance(page.rows[0], dict) and isinstance(page.rows[0].get("_i"), int):
            return page.rows[0]["_i"]
        return None

    # -- a whole query -------------------------------------------------------------------------
    def first_params(self, *, department: str, fields: tuple[str, ...] | list[str], size: int,
                     date_from: str | None = None, date_to: str | None = None,
                     after: str | None = None, modified_from: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "size": size,
            "select": ",".join(fields),
            "qs": build_qs(department, date_from, date_to, modified_from),
        }
        if after is not None:
            params["after"] = after
        return params

    def pages(self, params: dict[str, Any], prepare: Callable[[Page], Any] | None = None) -> Iterator[Page]:
        """Every page of a query, following ``next`` until the API runs dry.

        The next page is fetched in a background thread while the caller handles the current one;
        closing the iterator early waits for that one fetch to end.  ``prepare(page)``, when given, runs
        in that thread too, right after the fetch, and its result is ``page.prepared``: work on the rows
        done while the caller waits for Kafka.
        """
        def fetch(url: str, query: dict[str, Any] | None) -> Page:
            page = self.fetch(url, query)
            if prepare is not None:
                page.prepared = prepare(page)
            return page

        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
            pending = pool.submit(fetch, self.lines_url, params)
            while True:
                page = pending.result()
                if page.has_next:
                    pending = pool.submit(fetch, page.next_url, None)
                yield page
                if not page.has_next:
                    return


def _short(value: Any) -> str:
    """A value of a response in a message: its repr, cut short (none for an integer of 4300 digits)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"
    return text if len(text) <= 100 else text[:100] + "…"


def _safe_url(url: str) -> str:
    """The URL without an apiKey query parameter (the key never goes to a log)."""
    parts = urlsplit(url)
    if "apikey" not in parts.query.lower():
        return url
    kept = [p for p in parts.query.split("&") if not p.lower().startswith("apikey=")]
    return parts._replace(query="&".join(kept)).geturl()


def cursor_line(after: str | None) -> int | None:
    """The ``_i`` an ``after`` cursor starts after (its first value: ``_i`` is always data-fair's
    first sort key for /lines without ``sort``; a virtual dataset adds ``_rand``)."""
    if not after:
        return None
    head = after.split(",", 1)[0].strip()
    try:
        return int(head)
    except ValueError:
        return None


# every digit made "0", every other byte " ": 19 zeros in a row are a number of 19 digits or more, perhaps an
# integer beyond 64 bits (a regular expression takes 8x longer than orjson's whole decode of a page)
_DIGITS = bytes(0x30 if 0x30 <= i <= 0x39 else 0x20 for i in range(256))
_LONG_NUMBER = b"0" * 19


def _loads(content: bytes) -> Any:
    """The JSON document of a response body, exactly what ``json.loads`` reads, mostly by orjson (a page
    of 500 rows: 0.2 ms and 0.2 ms for the digits check, against 0.6 ms).  The standard library reads what orjson refuses (NaN, infinities, lone
    surrogates: a row with one gets its dead letter, as before) or would read differently (integers
    beyond 64 bits, which orjson makes floats).  Raises _TruncatedBody when it is not JSON at all."""
    if _LONG_NUMBER not in content.translate(_DIGITS):
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            pass  # the standard library decides, below
    try:
        return json.loads(content)
    except ValueError as exc:  # a body cut short with a 200 and no Content-Length
        raise _TruncatedBody(f"response body is not complete JSON ({len(content)} bytes)") from exc
    except RecursionError:  # nested deeper than the standard library reads (orjson stops at 1024)
        raise _TruncatedBody(f"response JSON is nested too deeply ({len(content)} bytes)") from None


def _json_object(resp: requests.Response) -> dict:
    body = _loads(resp.content)
    if not isinstance(body, dict):
        raise _TruncatedBody("response JSON is not an object")
    return body


class _TruncatedBody(Exception):
    """A 200 whose body is not a complete data-fair page, or a redirect to no http(s) URL: treated like a cut
    connection."""
