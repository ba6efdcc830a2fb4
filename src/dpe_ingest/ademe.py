"""Client of the ADEME data-fair API: ``GET {dataset}/lines`` followed by its cursor.

Pagination follows the API's own ``next`` link (which carries the ``after`` cursor), the way dlt's
``JSONLinkPaginator`` does: never page numbers, so the 10 000-results window of ``page x size`` never
applies and a department of any size is fetched whole.  The ``after`` value of every page is exposed
so a restarted producer can resume from the last acknowledged page.

Retries: 429 (honouring ``Retry-After``), 5xx, timeouts, connection resets and cut or truncated bodies
are retried with capped exponential backoff and full jitter, bounded by a number of attempts and a
total waiting time.  Any other 4xx is a request we built wrong or a dataset that does not exist:
retrying cannot help, so it raises ``ApiRequestError`` with the API's own message.
"""

from __future__ import annotations

import email.utils
import json
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import requests

from . import departments, logs

log = logging.getLogger("dpe_ingest.ademe")

RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0


class ApiRequestError(Exception):
    """The API refused the request itself (a 4xx other than 408/425/429): fatal, do not retry."""

    def __init__(self, status: int, url: str, detail: str):
        self.status, self.url, self.detail = status, url, detail
        super().__init__(f"ADEME API refused the request with HTTP {status}: {detail} (url: {url})")


class ApiUnavailable(Exception):
    """Retries exhausted: the API kept failing (5xx, 429, timeouts, cut bodies)."""


@dataclass
class Page:
    rows: list[dict[str, Any]]
    total: int | None
    next_url: str | None
    url: str
    attempts: int = 1

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


def build_qs(department: str, date_from: str | None = None, date_to: str | None = None) -> str:
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
    return " AND ".join(parts)


class RateLimiter:
    """At most ``rps`` calls per second (0 = unlimited), shared by threads."""

    def __init__(self, rps: float, clock: Callable[[], float] = time.monotonic, sleep=time.sleep):
        self.interval = 1.0 / rps if rps > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()
        self._clock, self._sleep = clock, sleep

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = self._clock()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            self._sleep(start - now)


def retry_after_seconds(value: str | None) -> float | None:
    """Parse a Retry-After header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_detail(resp: requests.Response) -> str:
    text = resp.text.strip()
    try:
        body = resp.json()
    except ValueError:
        return text[:500] or resp.reason
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if body.get(key):
                return str(body[key])[:500]
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

    def __post_init__(self) -> None:
        self.dataset_url = self.dataset_url.rstrip("/")
        self.lines_url = self.dataset_url + "/lines"
        self.limiter = RateLimiter(self.max_rps, sleep=self.sleep)
        self.session.headers.setdefault("User-Agent", "dpe-ingest (+https://github.com/dpe-ingest)")
        self.session.headers.setdefault("Accept", "application/json")
        self.requests_made = 0
        self.retries_made = 0

    # -- one call ----------------------------------------------------------------------------
    def fetch(self, url: str, params: dict[str, Any] | None = None, parse=None) -> Any:
        """GET one page, retrying what is worth retrying.  Raises ApiRequestError/ApiUnavailable."""
        waited = 0.0
        attempt = 0
        while True:
            attempt += 1
            self.limiter.wait()
            self.requests_made += 1
            problem: str
            retry_after: float | None = None
            try:
                resp = self.session.get(url, params=params, timeout=self.timeout_s)
                if resp.status_code == 200:
                    if parse is not None:
                        return parse(resp)
                    page = self._parse(resp)
                    page.attempts = attempt
                    return page
                if resp.status_code in RETRYABLE_STATUS or resp.status_code >= 500:
                    problem = f"HTTP {resp.status_code}: {_error_detail(resp)[:200]}"
                    retry_after = retry_after_seconds(resp.headers.get("Retry-After"))
                else:
                    raise ApiRequestError(resp.status_code, resp.url, _error_detail(resp))
            except (requests.Timeout, requests.ConnectionError, requests.exceptions.ChunkedEncodingError,
                    requests.exceptions.ContentDecodingError, _TruncatedBody) as exc:
                problem = f"{type(exc).__name__}: {str(exc)[:200]}"
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
            self.sleep(delay)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        exp = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
        jittered = self.rng.uniform(exp / 2, exp)  # "equal jitter": never hammers, never 0
        if retry_after is not None:
            return max(retry_after, min(jittered, 1.0))  # the server's word wins, plus a hair
        return jittered

    @staticmethod
    def _parse(resp: requests.Response) -> Page:
        try:
            body = json.loads(resp.content)
        except ValueError as exc:  # a body cut short with a 200 and no Content-Length
            raise _TruncatedBody(f"response body is not complete JSON ({len(resp.content)} bytes)") from exc
        if not isinstance(body, dict) or not isinstance(body.get("results"), list):
            raise _TruncatedBody("response JSON has no 'results' list")
        total = body.get("total")
        return Page(rows=body["results"], total=total if isinstance(total, int) else None,
                    next_url=body.get("next") or None, url=resp.url)

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
                     after: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "size": size,
            "select": ",".join(fields),
            "qs": build_qs(department, date_from, date_to),
        }
        if after is not None:
            params["after"] = after
        return params

    def pages(self, params: dict[str, Any]) -> Iterator[Page]:
        """Every page of a query, following ``next`` until the API runs dry.

        The next page is fetched in a background thread while the caller handles the current one;
        closing the iterator early waits for that one fetch to end.
        """
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as pool:
            pending = pool.submit(self.fetch, self.lines_url, params)
            while True:
                page = pending.result()
                if page.has_next:
                    pending = pool.submit(self.fetch, page.next_url)
                yield page
                if not page.has_next:
                    return


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


def _json_object(resp: requests.Response) -> dict:
    try:
        body = json.loads(resp.content)
    except ValueError as exc:
        raise _TruncatedBody(f"response body is not complete JSON ({len(resp.content)} bytes)") from exc
    if not isinstance(body, dict):
        raise _TruncatedBody("response JSON is not an object")
    return body


class _TruncatedBody(Exception):
    """A 200 whose body is not a complete data-fair page: treated like a cut connection."""
