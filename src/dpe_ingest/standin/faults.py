"""Deterministic fault injection for the stand-in.

Faults are decided per request, in the order the server receives them (request numbers start at 1 and
count every request the server answers, any path).  Three sources, checked in this order:

1. ``at``: faults pinned to request numbers (``faults.on_request(5, "cut")``);
2. ``queue``: faults for "the next N requests" (``faults.fail_next(3, "503")``), consumed in order;
3. probabilities (``p_429``, ``p_5xx``, ``p_cut``, ``p_slow``), drawn from a hash of
   ``(seed, request number)`` so that a run is reproducible.

Fault kinds: ``"429"`` (with ``Retry-After: retry_after_s`` unless that is None), ``"500"``,
``"502"``, ``"503"``, ``"cut"`` (headers with the full Content-Length, then half the body, then the
connection is closed), ``"slow"`` (the normal answer after ``slow_s`` seconds) and ``"ratelimit"``
(data-fair's own 429, see below).  A kind may carry a parameter: ``"slow:2.5"`` (seconds),
``"429:7"`` (Retry-After seconds).

Rate limit: ``rate_limit=N`` (requests per ``rate_window_s`` seconds, per client IP) imitates data-fair's
``limiter`` token bucket (anonymous default 600 / 60 s): requests over the budget get
``429 text/plain`` **without** Retry-After, exactly like data-fair's rate-limiting middleware.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .data import _mix

KINDS = ("429", "500", "502", "503", "cut", "slow", "ratelimit")


@dataclass(frozen=True)
class Fault:
    kind: str
    retry_after_s: float | None = None
    delay_s: float | None = None

    @classmethod
    def parse(cls, spec: "str | Fault") -> "Fault":
        if isinstance(spec, Fault):
            return spec
        kind, _, arg = str(spec).partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise ValueError(f"unknown fault kind {spec!r}: one of {', '.join(KINDS)}")
        if arg:
            value = float(arg)
            if kind == "429":
                return cls(kind, retry_after_s=value)
            if kind == "slow":
                return cls(kind, delay_s=value)
            raise ValueError(f"fault kind {kind!r} takes no parameter ({spec!r})")
        return cls(kind)


@dataclass
class Faults:
    seed: int = 0
    p_429: float = 0.0
    retry_after_s: float | None = 1.0
    p_5xx: float = 0.0
    statuses_5xx: tuple[int, ...] = (500, 502, 503)
    p_cut: float = 0.0
    p_slow: float = 0.0
    slow_s: float = 0.0
    rate_limit: int = 0
    rate_window_s: float = 60.0
    #: request number (1-based) -> fault
    at: dict[int, Fault] = field(default_factory=dict)
    queue: deque = field(default_factory=deque)
    #: what was injected: [(request number, kind)]
    injected: list[tuple[int, str]] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self.at = {int(k): Fault.parse(v) for k, v in dict(self.at).items()}
        self.queue = deque(Fault.parse(f) for f in self.queue)
        for name in ("p_429", "p_5xx", "p_cut", "p_slow"):
            p = float(getattr(self, name))
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}={p} must be between 0 and 1")

    # ------------------------------------------------------------ scripting
    def fail_next(self, n: int, kind: "str | Fault") -> "Faults":
        """The next ``n`` requests get ``kind`` (e.g. ``fail_next(3, "503")``)."""
        fault = Fault.parse(kind)
        with self._lock:
            self.queue.extend([fault] * int(n))
        return self

    def on_request(self, number: int, kind: "str | Fault") -> "Faults":
        """Request number ``number`` (1-based, counted by the server) gets ``kind``."""
        with self._lock:
            self.at[int(number)] = Fault.parse(kind)
        return self

    def clear(self) -> None:
        with self._lock:
            self.at.clear()
            self.queue.clear()

    # ------------------------------------------------------------ decision
    def _u(self, number: int, salt: int) -> float:
        return (_mix((self.seed * 0x100000001B3) ^ (number * 0x9E3779B97F4A7C15 + salt)) >> 11) / float(1 << 53)

    def decide(self, number: int, client: str = "", now: float | None = None) -> Fault | None:
        """The fault for request ``number`` from ``client`` (None: answer normally)."""
        with self._lock:
            fault = self.at.pop(number, None)
            if fault is None and self.queue:
                fault = self.queue.popleft()
            if fault is None and self.rate_limit > 0 and not self._take_token(client, now):
                fault = Fault("ratelimit")
            if fault is None:
                if self.p_429 and self._u(number, 1) < self.p_429:
                    fault = Fault("429")
                elif self.p_5xx and self._u(number, 2) < self.p_5xx:
                    statuses = self.statuses_5xx or (503,)
                    fault = Fault(str(statuses[int(self._u(number, 3) * len(statuses)) % len(statuses)]))
                elif self.p_cut and self._u(number, 4) < self.p_cut:
                    fault = Fault("cut")
                elif self.p_slow and self._u(number, 5) < self.p_slow:
                    fault = Fault("slow")
            if fault is not None:
                self.injected.append((number, fault.kind))
            return fault

    def _take_token(self, client: str, now: float | None) -> bool:
        """Token bucket of ``rate_limit`` tokens refilled continuously over ``rate_window_s``."""
        now = time.monotonic() if now is None else now
        cap = float(self.rate_limit)
        tokens, last = self._buckets.get(client, (cap, now))
        tokens = min(cap, tokens + (now - last) * cap / self.rate_window_s)
        if tokens < 1.0:
            self._buckets[client] = (tokens, now)
            return False
        self._buckets[client] = (tokens - 1.0, now)
        return True
