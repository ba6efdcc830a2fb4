"""data-fair's per-client limits, as ``api/src/misc/utils/rate-limiting.ts`` applies them.

Every dataset route runs ``readDataset`` (404), then the API-key middleware (an unknown key: **401**
``Cette clé d'API est inconnue.``, ``api-key.ts``), then the rate-limiting middleware, which keeps three
buckets per client — the client being the user of a valid API key, else the client IP (behind a NAT,
every Job of a cluster is one client):

1. **requests** (``TokenBucket``, starts full, refilled continuously): ``nb`` per ``duration`` seconds;
   over it **429** text/plain ``Trop de traffic dans un interval restreint sur cette API.``, no
   Retry-After;
2. **compute** (``ComputeBucket``): ``computeMs`` of Elasticsearch time per window, checked on entry
   (``content > 0``) and debited when the response closes — also when the client aborted it — by the
   time the search took; the balance may go down to ``-computeMs``, so one heavy stretch locks the
   client out for up to one window; refused: **429** ``Le temps de traitement cumulé de vos requêtes
   dépasse le budget alloué…`` (+ query advice), no Retry-After;
3. **bandwidth** (``/lines`` and ``metric_agg`` only, ``res.throttleEnd``): a token bucket of
   ``bandwidth × 4`` bytes refilled at ``bandwidth`` bytes/s; the body goes out in slices of the
   bucket size, each waiting for its tokens (a delay, never an error); past ``maxPendingSends`` (100)
   responses queued on one client's bucket, the response is torn down (``res.destroy()``: the client
   sees a reset connection).

Tiers (``config/default.cjs`` ``defaultLimits.apiRate``): anonymous 600 requests / 60 s, 20 s of
compute / 60 s, 500 kB/s; a valid API key (the ``user`` tier) 1 200 / 60 s, 60 s, 1 MB/s.

The stand-in has no Elasticsearch: the compute a request costs is modelled as ``cost_base_ms +
cost_per_row_ms × size`` (the page size asked for; the metadata route does no search and costs
nothing).  Everything is recorded (``log``) so tests can check what a client did during a lock-out.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

RATE_MESSAGE = "Trop de traffic dans un interval restreint sur cette API."
COMPUTE_MESSAGE = ("Le temps de traitement cumulé de vos requêtes dépasse le budget alloué sur cette API. Veuillez "
                   "patienter avant d'essayer de nouveau, ou réduire le coût de vos requêtes.")
UNKNOWN_KEY_MESSAGE = "Cette clé d'API est inconnue."
MAX_PENDING_SENDS = 100  # throttle-wait.ts maxPendingSends
BURST_FACTOR = 4  # rate-limiting.ts burstFactor
MIN_RETRY_WAIT_S = 0.05  # throttle-wait.ts minRetryWaitMs


@dataclass(frozen=True)
class Tier:
    nb: int = 600  # requests per duration
    duration_s: float = 60.0
    compute_ms: float = 20000.0  # 0 = no compute budget
    bandwidth: float = 500000.0  # bytes/s of the dynamic routes; 0 = no throttle


ANONYMOUS = Tier()
USER = Tier(nb=1200, duration_s=60.0, compute_ms=60000.0, bandwidth=1000000.0)


class TokenBucket:
    """token-bucket.ts: starts full, continuous drip."""

    def __init__(self, capacity: float, refill_per_s: float, now: float):
        self.capacity, self.refill, self.content, self.last = float(capacity), float(refill_per_s), float(capacity), now

    def _drip(self, now: float) -> None:
        if now > self.last:
            self.content = min(self.capacity, self.content + (now - self.last) * self.refill)
            self.last = now

    def try_take(self, count: float, now: float) -> bool:
        self._drip(now)
        if count > self.content:
            return False
        self.content -= count
        return True

    def seconds_until(self, count: float, now: float) -> float:
        if count > self.capacity:
            return float("inf")
        self._drip(now)
        return 0.0 if count <= self.content else (count - self.content) / self.refill


class ComputeBucket:
    """compute-budget.ts: ``budget`` ms per ``window``, floor at ``-budget``."""

    def __init__(self, budget_ms: float, window_s: float, now: float):
        self.budget, self.window, self.content, self.last = budget_ms, window_s, budget_ms, now

    def _drip(self, now: float) -> None:
        if now > self.last:
            self.content = min(self.budget, self.content + (now - self.last) * self.budget / self.window)
            self.last = now

    def has_budget(self, now: float) -> bool:
        self._drip(now)
        return self.content > 0

    def debit(self, ms: float, now: float) -> None:
        self._drip(now)
        self.content = max(-self.budget, self.content - max(0.0, ms))

    def seconds_until_positive(self, now: float) -> float:
        self._drip(now)
        return 0.0 if self.content > 0 else (-self.content) * self.window / self.budget


@dataclass
class Request:
    """One request as the limits saw it."""
    t: float
    client: str
    agent: str
    outcome: str  # "ok", "rate", "compute", "unknown_key", "reset"
    cost_ms: float = 0.0
    bytes: int = 0


@dataclass
class Limits:
    """data-fair's limits for the stand-in.  ``api_keys``: key -> user id (the ``user`` tier)."""

    anonymous: Tier = ANONYMOUS
    user: Tier = USER
    api_keys: dict[str, str] = field(default_factory=dict)
    cost_base_ms: float = 20.0
    cost_per_row_ms: float = 0.2
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    def __post_init__(self):
        self._lock = threading.Lock()
        self._requests: dict[str, TokenBucket] = {}
        self._compute: dict[str, ComputeBucket] = {}
        self._bandwidth: dict[str, TokenBucket] = {}
        self._pending: dict[str, int] = {}
        self.log: list[Request] = []
        #: [start, end] monotonic intervals during which a client was locked out by its compute budget
        self.lockouts: dict[str, list[list[float]]] = {}

    # ------------------------------------------------------------------ who
    def client_of(self, ip: str, api_key: str | None) -> tuple[str, Tier] | None:
        """(client key, tier), or None for an unknown API key (the 401)."""
        if api_key is None:
            return ip, self.anonymous
        user = self.api_keys.get(api_key)
        if user is None:
            return None
        return f"user:{user}", self.user

    def cost_ms(self, size: int) -> float:
        return self.cost_base_ms + self.cost_per_row_ms * max(0, int(size))

    # ------------------------------------------------------------------ entry
    def admit(self, client: str, tier: Tier, agent: str = "") -> str:
        """"ok", or why the request is refused: "rate" / "compute" (both 429)."""
        now = self.clock()
        with self._lock:
            bucket = self._requests.get(client)
            if bucket is None:
                bucket = self._requests[client] = TokenBucket(tier.nb, tier.nb / tier.duration_s, now)
            if not bucket.try_take(1, now):
                self.log.append(Request(now, client, agent, "rate"))
                return "rate"
            if tier.compute_ms > 0:
                cb = self._compute_bucket(client, tier, now)
                if not cb.has_budget(now):
                    self._note_lockout(client, now, now + cb.seconds_until_positive(now))
                    self.log.append(Request(now, client, agent, "compute"))
                    return "compute"
            self.log.append(Request(now, client, agent, "ok"))
            return "ok"

    def refuse_key(self, ip: str, agent: str = "") -> None:
        with self._lock:
            self.log.append(Request(self.clock(), ip, agent, "unknown_key"))

    def _compute_bucket(self, client: str, tier: Tier, now: float) -> ComputeBucket:
        cb = self._compute.get(client)
        if cb is None:
            cb = self._compute[client] = ComputeBucket(tier.compute_ms, tier.duration_s, now)
        return cb

    def _note_lockout(self, client: str, start: float, end: float) -> None:
        spans = self.lockouts.setdefault(client, [])
        if spans and start <= spans[-1][1] + 1e-6:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])

    # ------------------------------------------------------------------ exit
    def bill(self, client: str, tier: Tier, cost_ms: float) -> None:
        """Debit the compute a request used, when its response closed (aborted ones too)."""
        if tier.compute_ms <= 0 or cost_ms <= 0:
            return
        now = self.clock()
        with self._lock:
            cb = self._compute_bucket(client, tier, now)
            cb.debit(cost_ms, now)
            if self.log:
                for rec in reversed(self.log):
                    if rec.client == client and rec.outcome == "ok" and rec.cost_ms == 0.0:
                        rec.cost_ms = cost_ms
                        break

    # ------------------------------------------------------------------ bandwidth
    def acquire_send(self, client: str, tier: Tier) -> bool:
        """A send slot on the client's bandwidth bucket (False: tear the response down)."""
        if tier.bandwidth <= 0:
            return True
        with self._lock:
            if self._pending.get(client, 0) >= MAX_PENDING_SENDS:
                self.log.append(Request(self.clock(), client, "", "reset"))
                return False
            self._pending[client] = self._pending.get(client, 0) + 1
            return True

    def release_send(self, client: str, tier: Tier) -> None:
        if tier.bandwidth <= 0:
            return
        with self._lock:
            self._pending[client] = max(0, self._pending.get(client, 0) - 1)

    def slices(self, client: str, tier: Tier, body: bytes):
        """The body in slices of the bucket size, each one yielded once its tokens are there."""
        if tier.bandwidth <= 0:
            yield body
            return
        size = int(tier.bandwidth * BURST_FACTOR)
        with self._lock:
            bucket = self._bandwidth.get(client)
            if bucket is None:  # keyed without the tier, as in data-fair (first tier wins)
                bucket = self._bandwidth[client] = TokenBucket(size, tier.bandwidth, self.clock())
        pos = 0
        while pos < len(body):
            piece = body[pos:pos + size]
            while True:
                with self._lock:
                    now = self.clock()
                    if bucket.try_take(len(piece), now):
                        break
                    wait = bucket.seconds_until(len(piece), now)
                self.sleep(max(wait, MIN_RETRY_WAIT_S))
            yield piece
            pos += len(piece)

    # ------------------------------------------------------------------ for tests
    def outcomes(self, client: str | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for rec in list(self.log):
            if client is None or rec.client == client:
                out[rec.outcome] = out.get(rec.outcome, 0) + 1
        return out
