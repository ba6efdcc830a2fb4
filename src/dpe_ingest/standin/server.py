"""The local stand-in of the ADEME data-fair API (dataset ``dpe03existant``), stdlib HTTP server.

Routes (as on ``https://data.ademe.fr``):

- ``GET /data-fair/api/v1/datasets/dpe03existant/lines``: the rows, ``{"total", "next", "results"}``;
- ``GET /data-fair/api/v1/datasets/dpe03existant``: the dataset document (id, title, count, schema…);
- any other dataset id: ``404 Dataset not found``; any other path: 404.

Usage from tests::

    with StandinServer(Dataset({"69": 25000}), Faults(seed=3)) as api:
        requests.get(api.url + "/lines", params={"qs": "code_departement_ban:69", "size": 500})

CLI: ``dpe-ingest ademe-standin --port 8000`` or ``python -m dpe_ingest.standin``.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import hashlib
import heapq
import json
import logging
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, quote, urlsplit

from .. import departments, logs
from . import query as _query
from .data import _DAY_STR, DEPARTMENT_POSITION, FIELDS, MOD_FIELD, N_DEPARTMENTS, Dataset
from .faults import Fault, Faults
from .limits import COMPUTE_MESSAGE, RATE_MESSAGE, UNKNOWN_KEY_MESSAGE, Limits

log = logging.getLogger("dpe_ingest.standin")

DATASET_ID = "dpe03existant"
API_PREFIX = "/data-fair/api/v1/datasets/"
# data-fair answers its rate limit with req.__('errors.exceedRateLimiting') (api/i18n/messages/fr.json),
# text/plain, no Retry-After
RATE_LIMIT_MESSAGE = RATE_MESSAGE
_REASONS_HTML = {
    502: "502 Bad Gateway",
    503: "503 Service Temporarily Unavailable",
}


def _form_encode(value: str) -> str:
    """application/x-www-form-urlencoded like WHATWG URLSearchParams (space -> '+', keeps *-._)."""
    return quote(value, safe="*-._ ").replace(" ", "+")


def _encode_params(params: list[tuple[str, str]]) -> str:
    return "&".join(f"{_form_encode(k)}={_form_encode(v)}" for k, v in params)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address, handler, standin: "StandinServer"):
        self.standin = standin
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "dpe-standin"
    sys_version = ""
    timeout = 120  # idle keep-alive connections are closed after this

    def setup(self):
        super().setup()
        try:  # answers go out in one write; no Nagle delay on small pages
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass

    def version_string(self):
        return self.server_version

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass  # one DEBUG event per request is logged by _respond

    def do_HEAD(self):
        self._handle(head=True)

    def do_GET(self):
        self._handle(head=False)

    # ------------------------------------------------------------------------------------------
    def _handle(self, head: bool) -> None:
        standin: StandinServer = self.server.standin
        started = time.perf_counter()
        number = standin._next_number()
        self._number = number
        self._limited = None  # (client, tier, cost_ms, throttled) once the limits admitted the request
        faults = standin.faults
        fault = faults.decide(number, self.client_address[0]) if faults is not None else None
        self._fault = fault
        if fault is not None and fault.kind == "slow":
            delay = fault.delay_s if fault.delay_s is not None else faults.slow_s
            time.sleep(max(0.0, delay))
        if fault is not None and fault.kind not in ("slow", "cut"):
            status, headers, body = self._fault_response(fault, faults)
        else:
            try:
                status, headers, body = self._route(standin)
            except _query.QueryError as exc:
                status, headers, body = self._text(exc.status, exc.message)
            except Exception as exc:  # a bug here must still answer like data-fair in production
                log.exception("stand-in failure on %s", self.path)
                status, headers, body = self._text(500, "")
                self._error = repr(exc)
        try:
            self._respond(status, headers, body, head, cut=fault is not None and fault.kind == "cut")
        finally:
            if self._limited is not None and standin.limits is not None:
                client, tier, cost_ms, _ = self._limited
                standin.limits.bill(client, tier, cost_ms)  # on close, aborted responses included
        logs.event(log, "request", f"{self.command} {self.path} -> {status}", logging.DEBUG,
                   n=number, status=status, bytes=len(body), fault=fault.kind if fault else None,
                   ms=round((time.perf_counter() - started) * 1000, 1))

    def _fault_response(self, fault: Fault, faults: Faults):
        if fault.kind == "ratelimit":
            return self._text(429, RATE_LIMIT_MESSAGE)
        if fault.kind == "429":
            status, headers, body = self._text(429, "Too Many Requests")
            retry = fault.retry_after_s if fault.retry_after_s is not None else faults.retry_after_s
            if retry is not None:
                headers.append(("Retry-After", str(int(retry) if float(retry).is_integer() else retry)))
            return status, headers, body
        code = int(fault.kind)
        if code in _REASONS_HTML:  # what the reverse proxy in front of data-fair answers
            title = _REASONS_HTML[code]
            html = (f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n"
                    "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n").encode()
            return code, [("Content-Type", "text/html")], html
        return self._text(code, "")  # data-fair in production: 5xx with an empty body

    @staticmethod
    def _text(status: int, message: str):
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-cache"), ("Expires", "-1")]
        return status, headers, message.encode("utf-8")

    def _route(self, standin: "StandinServer"):
        parts = urlsplit(self.path)
        path = parts.path
        if not path.startswith(API_PREFIX):
            body = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Error</title>\n'
                    f"</head>\n<body>\n<pre>Cannot {self.command} {path}</pre>\n</body>\n</html>\n").encode()
            return 404, [("Content-Type", "text/html; charset=utf-8")], body
        rest = path[len(API_PREFIX):].rstrip("/")
        segments = rest.split("/") if rest else []
        if not segments:
            return self._text(404, "Not Found")
        if segments[0] != DATASET_ID:
            return 404, [("Content-Type", "text/html; charset=utf-8")], b"Dataset not found"
        host = self.headers.get("Host") or f"{standin.host}:{standin.port}"
        public_url = f"http://{host}/data-fair"
        query = parse_qsl(parts.query, keep_blank_values=True)
        refused = self._limit(standin, segments, query)
        if refused is not None:
            return refused
        if len(segments) == 1:
            with standin.dataset.lock:
                meta = standin.dataset.metadata(public_url)
            body = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))
            return 200, [("Content-Type", "application/json; charset=utf-8")], body.encode("utf-8")
        if len(segments) == 2 and segments[1] == "lines":
            params = parse_qsl(parts.query, keep_blank_values=True)
            if standin.changes is not None:
                standin.changes.on_request(standin.dataset)
            return standin._lines(params, public_url)
        if len(segments) == 2 and segments[1] == "metric_agg":
            return standin._metric_agg(parse_qsl(parts.query, keep_blank_values=True))
        return self._text(404, "Not Found")

    def _limit(self, standin: "StandinServer", segments: list[str], query: list[tuple[str, str]]):
        """The API-key middleware (401) then the rate-limiting middleware (429s), as data-fair runs
        them on every dataset route; None when the request goes on."""
        api_key = self.headers.get("x-apiKey") or self.headers.get("x-api-key") or dict(query).get("apiKey")
        limits = standin.limits
        agent = self.headers.get("User-Agent", "")
        if api_key is not None:
            standin.api_keys_seen.append(api_key)
        who = (limits or Limits(api_keys={})).client_of(self.client_address[0], api_key)
        if who is None:
            if limits is not None:
                limits.refuse_key(self.client_address[0], agent)
            return self._text(401, UNKNOWN_KEY_MESSAGE)
        if limits is None:
            return None
        client, tier = who
        verdict = limits.admit(client, tier, agent)
        if verdict == "rate":
            return self._text(429, RATE_MESSAGE)
        if verdict == "compute":
            return self._text(429, COMPUTE_MESSAGE + _advice(query))
        searches = len(segments) == 2 and segments[1] in ("lines", "metric_agg")
        size = 0
        if searches and segments[1] == "lines":
            raw = dict(query).get("size", "")
            size = int(raw) if raw.strip().isdigit() else _query.DEFAULT_SIZE
        self._limited = (client, tier, limits.cost_ms(size) if searches else 0.0, searches)
        return None

    def _respond(self, status: int, headers: list, body: bytes, head: bool, cut: bool) -> None:
        limited = getattr(self, "_limited", None)
        if limited is not None and limited[3] and not head and not cut and self.server.standin.limits is not None:
            self._respond_throttled(status, headers, body, limited)
            return
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        if cut:
            self.send_header("Connection", "close")
        if head:
            self.end_headers()
            return
        if cut:
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        # headers and body in a single write
        self._headers_buffer.append(b"\r\n")
        self._headers_buffer.append(body)
        self.flush_headers()


    def _respond_throttled(self, status: int, headers: list, body: bytes, limited) -> None:
        """res.throttleEnd(): the body through the client's bandwidth bucket, or torn down when too
        many of its responses already wait on it."""
        limits: Limits = self.server.standin.limits
        client, tier, _, _ = limited
        if not limits.acquire_send(client, tier):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        try:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for piece in limits.slices(client, tier, body):
                self.wfile.write(piece)
            self.wfile.flush()
        except OSError:
            self.close_connection = True  # the client went away: the compute is billed all the same
        finally:
            limits.release_send(client, tier)


def _advice(query: list[tuple[str, str]]) -> str:
    """query-advice.ts, the rules that apply to a /lines query of the stand-in."""
    q = dict(query)
    items = []
    if q.get("count") not in ("false", "estimate") and not q.get("after"):
        items.append("set count=estimate (exact total up to the threshold, then estimated by sampling) or "
                     "count=false to skip the exact total-row count")
    page = q.get("page", "")
    if page.isdigit() and int(page) >= 100:
        items.append("use keyset pagination via the after parameter instead of deep page/offset navigation")
    size = q.get("size", "")
    if size.isdigit() and int(size) >= 1000:
        items.append("request fewer results per page (lower size)")
    return (" Advice to optimize your queries: " + "; ".join(items) + ".") if items else ""


class StandinServer:
    """The stand-in HTTP server; ``start()`` serves in a background thread."""

    def __init__(self, dataset: Dataset | None = None, faults: Faults | None = None,
                 host: str = "127.0.0.1", port: int = 0, total_on_after_pages: bool = False,
                 limits: Limits | None = None, changes=None):
        self.dataset = dataset if dataset is not None else Dataset()
        self.faults = faults
        #: data-fair's per-client limits (request rate, compute budget, bandwidth, API keys); None = off
        self.limits = limits
        #: LiveChanges applied while clients page (updates, inserts, deactivations); None = frozen data
        self.changes = changes
        #: every x-apiKey received (tests check that a key arrived; never logged)
        self.api_keys_seen: list[str] = []
        self.host = host
        self.port = int(port)
        #: data-fair >= the track_total_hits change omits "total" on after= pages; True keeps it
        self.total_on_after_pages = total_on_after_pages
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._count_lock = threading.Lock()
        self._requests = 0

    # ---------------------------------------------------------------------------- lifecycle
    def start(self) -> "StandinServer":
        if self._httpd is not None:
            return self
        self._httpd = _Server((self.host, self.port), _Handler, self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"standin-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "StandinServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (the server root)."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The dataset URL, as ADEME_API_URL expects it (``…/data-fair/api/v1/datasets/dpe03existant``)."""
        return f"{self.base_url}{API_PREFIX}{DATASET_ID}"

    @property
    def lines_url(self) -> str:
        return self.url + "/lines"

    @property
    def requests_served(self) -> int:
        return self._requests

    def _next_number(self) -> int:
        with self._count_lock:
            self._requests += 1
            return self._requests

    # ---------------------------------------------------------------------------- /lines
    def _lines(self, params: list[tuple[str, str]], public_url: str):
        ds = self.dataset
        q = _query.parse(params, virtual=ds.virtual)
        with ds.lock:  # a page is one consistent view of a dataset that may change meanwhile
            ranges = q.index_ranges(ds)
            selected = _select(ds, ranges, q)
            fields = q.output_fields
            with_id = q.with_id
            full = q.select is None
            results = []
            last_rand = None
            for dep, i in selected:
                row = ds._row(dep, i, ds.counts[dep], with_id)
                last_rand = row["_rand"]
                if full:
                    out = row
                    rid = out.pop("_id")
                    out["_score"] = None
                    out["_id"] = rid
                else:
                    out = {k: row[k] for k in fields if k in row}
                    out["_score"] = None
                    if with_id:
                        out["_id"] = row["_id"]
                results.append(out)
            head: dict = {}
            if q.count or (self.total_on_after_pages and q.after is not None):
                head["total"] = _count(ds, ranges, q)
            last_line = ds.line_number(*selected[-1]) if selected else None
        headers = [("Content-Type", "application/json; charset=utf-8")]
        if q.size and len(selected) == q.size:
            after = str(last_line) if not ds.virtual else f"{last_line},{last_rand}"
            next_params = [(k, v) for k, v in params if k != "page"]
            if any(k == "after" for k, _ in next_params):
                next_params = [(k, after if k == "after" else v) for k, v in next_params]
            else:
                next_params.append(("after", after))
            href = f"{public_url}/api/v1/datasets/{DATASET_ID}/lines?{_encode_params(next_params)}"
            head["next"] = href
            headers.append(("Link", f'<{href}>; rel="next"'))
        prefix = json.dumps(head, ensure_ascii=False, separators=(",", ":"))
        prefix = "{" if prefix == "{}" else prefix[:-1] + ","
        body = (prefix + '"results":' + json.dumps(results, ensure_ascii=False, separators=(",", ":")) + "}").encode()
        digest = base64.b64encode(hashlib.sha1(body).digest()).decode()[:27]
        headers.append(("ETag", f'W/"{len(body):x}-{digest}"'))
        return 200, headers, body

    # ---------------------------------------------------------------------------- /metric_agg
    def _metric_agg(self, params: list[tuple[str, str]]):
        """``GET …/metric_agg?metric=max&field=F`` (es/metric-agg.ts): ``{"total", "metric"}``; date
        values formatted YYYY-MM-DD.  The stand-in computes min and max of its two date fields."""
        seen = dict(params)
        metric = seen.get("metric")
        if not metric:
            raise _query.bad('"metric" parameter is required')
        field_name = seen.get("field") or seen.get("metric_field")
        if not field_name:
            raise _query.bad('"field" parameter is required')
        if field_name not in FIELDS:
            raise _query.bad(f"Impossible de calculer une métrique sur le champ {field_name}, il n'existe pas dans le "
                             "jeu de données.")
        if field_name not in _query.DATE_FIELDS or metric not in ("min", "max"):
            raise _query.unsupported(f'la métrique "{metric}" sur le champ {field_name}')
        rest = [(k, v) for k, v in params if k not in ("metric", "field", "metric_field")]
        ds = self.dataset
        q = _query.parse(rest, virtual=ds.virtual)
        with ds.lock:
            ranges = q.index_ranges(ds)
            total = _count(ds, ranges, q)
            days = []
            for dep, rs in ranges.items():
                for lo, hi in rs:
                    idx = _first_live(ds, dep, lo, hi, reverse=(metric == "max"))
                    if idx is not None:
                        days.append(ds.day_of(dep, idx))
            for dep, i in _tail_matches(ds, q):
                days.append(ds._mod_day[(dep, i)] if field_name == MOD_FIELD else ds.day_of(dep, i))
        value = None
        if days:
            value = _DAY_STR[max(days) if metric == "max" else min(days)]
        body = json.dumps({"total": total, "metric": value}, separators=(",", ":")).encode()
        return 200, [("Content-Type", "application/json; charset=utf-8")], body


def _first_live(ds: Dataset, dep: str, lo: int, hi: int, reverse: bool) -> int | None:
    holes = ds._hole_set
    rng = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
    for i in rng:
        if (dep, i) not in holes:
            return i
    return None


def _tail_matches(ds: Dataset, q: _query.LinesQuery, start: int = 0, reverse: bool = False):
    """(dep, i) of the live tail entries matching the query, in _i order from sequence ``start``."""
    tail, loc = ds._tail, ds._loc
    seqs = range(len(tail) - 1, start - 1, -1) if reverse else range(start, len(tail))
    for seq in seqs:
        key = tail[seq]
        if loc.get(key) != seq:
            continue  # updated again later, or deactivated
        dep, i = key
        if q.matches_live(dep, ds.day_of(dep, i), ds._mod_day[key]):
            yield key


def _count(ds: Dataset, ranges: dict[str, list[tuple[int, int]]], q: _query.LinesQuery) -> int:
    total = 0
    for dep, rs in ranges.items():
        holes = ds._holes.get(dep, ())
        for lo, hi in rs:
            total += hi - lo - (bisect.bisect_left(holes, hi) - bisect.bisect_left(holes, lo))
    return total + sum(1 for _ in _tail_matches(ds, q))


def _select(ds: Dataset, ranges: dict[str, list[tuple[int, int]]], q: _query.LinesQuery) -> list[tuple[str, int]]:
    """(department, index) of the page: the base rows merged by ``_i`` (skipping the rows no longer at
    their base place), then the tail (updated and inserted rows, larger ``_i``); after/skip, then size."""
    want = q.skip + q.size
    if want == 0:
        return []
    base_i, tail_start = ds._base_i, ds.tail_start
    out: list[tuple[str, int]] = []
    skipped = 0

    def take(key) -> bool:
        nonlocal skipped
        if skipped < q.skip:
            skipped += 1
        else:
            out.append(key)
        return len(out) >= q.size

    after = q.after
    if q.descending:
        if after is None or after > tail_start:
            start_seq = None if after is None else after - tail_start - 1
            last = len(ds._tail) - 1 if start_seq is None else min(start_seq, len(ds._tail) - 1)
            for key in _tail_matches(ds, q, start=0, reverse=True):
                if ds._loc[key] > last:
                    continue
                if take(key):
                    return out
        for key in _base_rows(ds, ranges, None if after is None else after - base_i, True):
            if take(key):
                return out
        return out
    if after is None or after < tail_start:
        for key in _base_rows(ds, ranges, None if after is None else after - base_i, False):
            if take(key):
                return out
    start = 0 if after is None or after < tail_start else after - tail_start + 1
    for key in _tail_matches(ds, q, start=start):
        if take(key):
            return out
    return out


def _base_rows(ds: Dataset, ranges, after: int | None, desc: bool):
    """Base rows in ``_i`` order (``after`` relative to the dataset's first _i), holes skipped."""
    heap: list = []
    holes = ds._hole_set
    for dep, rs in ranges.items():
        pos = DEPARTMENT_POSITION[dep]
        if not desc:
            j = 0 if after is None else max(0, (after - pos) // N_DEPARTMENTS + 1)
            for r, (lo, hi) in enumerate(rs):
                if j < hi:
                    j = max(j, lo)
                    heap.append((j * N_DEPARTMENTS + pos, dep, r, j))
                    break
        else:
            j = None if after is None else (after - pos - 1) // N_DEPARTMENTS
            for r in range(len(rs) - 1, -1, -1):
                lo, hi = rs[r]
                jj = hi - 1 if j is None else min(j, hi - 1)
                if jj >= lo:
                    heap.append((-(jj * N_DEPARTMENTS + pos), dep, r, jj))
                    break
    heapq.heapify(heap)
    while heap:
        _, dep, r, j = heapq.heappop(heap)
        if (dep, j) not in holes:
            yield (dep, j)
        rs = ranges[dep]
        pos = DEPARTMENT_POSITION[dep]
        if not desc:
            j += 1
            if j >= rs[r][1]:
                r += 1
                if r >= len(rs):
                    continue
                j = rs[r][0]
            heapq.heappush(heap, (j * N_DEPARTMENTS + pos, dep, r, j))
        else:
            j -= 1
            if j < rs[r][0]:
                r -= 1
                if r < 0:
                    continue
                j = rs[r][1] - 1
            heapq.heappush(heap, (-(j * N_DEPARTMENTS + pos), dep, r, j))


# -------------------------------------------------------------------------------------------- CLI
def _rows_arg(text: str) -> tuple[str, int]:
    dep, sep, n = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--rows {text!r}: expected DEPARTMENT=COUNT, e.g. 69=200000")
    try:
        return departments.normalize(dep), int(n)
    except (departments.InvalidDepartment, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"--rows {text!r}: {exc}") from None


def _prob(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= p <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a probability between 0 and 1")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpe-ingest ademe-standin",
                                description="Serve the local stand-in of the ADEME data-fair API (dataset dpe03existant).")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (0 = any free port; default 8000)")
    p.add_argument("--rows-per-department", type=int, default=1000, help="rows in each department (default 1000)")
    p.add_argument("--rows", type=_rows_arg, action="append", default=[], metavar="DEP=COUNT",
                   help="rows of one department, repeatable (e.g. --rows 69=200000; none=N: rows without a department)")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic data (default 1)")
    p.add_argument("--malformed-rate", type=_prob, default=0.0, help="share of malformed rows (default 0)")
    p.add_argument("--fault-seed", type=int, default=0, help="seed of the fault draws (default 0)")
    p.add_argument("--fault-429", type=_prob, default=0.0, help="probability of a 429 with Retry-After")
    p.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds of injected 429s (default 1)")
    p.add_argument("--fault-5xx", type=_prob, default=0.0, help="probability of a 500/502/503")
    p.add_argument("--fault-cut", type=_prob, default=0.0, help="probability of a body cut half way")
    p.add_argument("--slow-ms", type=int, default=0, help="delay of slow responses in ms (default 0)")
    p.add_argument("--fault-slow", type=_prob, default=None,
                   help="probability of a slow response (default 1 when --slow-ms > 0)")
    p.add_argument("--rate-limit", type=int, default=0,
                   help="data-fair-like rate limit: requests per minute per client IP, 429 beyond (0 = off; the real anonymous limit is 600)")
    p.add_argument("--limits", action="store_true",
                   help="data-fair's per-client limits: requests, compute budget, bandwidth (anonymous 600/60s, "
                        "20 s compute, 500 kB/s; an API key 1200/60s, 60 s, 1 MB/s)")
    p.add_argument("--limit-requests", type=int, default=None, metavar="N",
                   help="with --limits: anonymous requests per window (default 600)")
    p.add_argument("--limit-compute-ms", type=float, default=None, metavar="MS",
                   help="with --limits: anonymous compute budget per window in ms (default 20000; 0 = off)")
    p.add_argument("--limit-bandwidth", type=float, default=None, metavar="BYTES_PER_S",
                   help="with --limits: anonymous bandwidth in bytes/s (default 500000; 0 = off)")
    p.add_argument("--limit-window-s", type=float, default=60.0, help="with --limits: the window (default 60 s)")
    p.add_argument("--cost-per-row-ms", type=float, default=0.2,
                   help="with --limits: compute a /lines request costs per row of its size (default 0.2 ms, + 20 ms)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY[=USER]",
                   help="an API key the stand-in knows (x-apiKey header: the user tier); others get 401")
    p.add_argument("--virtual", action="store_true",
                   help="a virtual dataset like the real dpe03existant: sort _i then _rand, after=<_i>,<_rand>, large _i")
    p.add_argument("--total-on-after-pages", action="store_true",
                   help='keep "total" on after= pages (current data-fair omits it)')
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logs.setup()
    if args.rows_per_department < 0 or any(n < 0 for _, n in args.rows):
        print("dpe-ingest ademe-standin: row counts must be >= 0", file=sys.stderr)
        return 2
    rows = dict(args.rows)
    dataset = Dataset(rows if rows else args.rows_per_department, seed=args.seed,
                      malformed_rate=args.malformed_rate,
                      default_rows=args.rows_per_department, virtual=args.virtual)
    p_slow = args.fault_slow if args.fault_slow is not None else (1.0 if args.slow_ms > 0 else 0.0)
    faults = Faults(seed=args.fault_seed, p_429=args.fault_429, retry_after_s=args.retry_after,
                    p_5xx=args.fault_5xx, p_cut=args.fault_cut, p_slow=p_slow, slow_s=args.slow_ms / 1000.0,
                    rate_limit=args.rate_limit)
    keys = {}
    for item in args.api_key:
        key, _, user = item.partition("=")
        keys[key] = user or f"key{len(keys) + 1}"
    limits = None
    if args.limits or keys:
        from .limits import ANONYMOUS, USER, Tier

        w = args.limit_window_s
        anon = Tier(nb=args.limit_requests if args.limit_requests is not None else ANONYMOUS.nb, duration_s=w,
                    compute_ms=args.limit_compute_ms if args.limit_compute_ms is not None else ANONYMOUS.compute_ms,
                    bandwidth=args.limit_bandwidth if args.limit_bandwidth is not None else ANONYMOUS.bandwidth)
        user = Tier(nb=USER.nb, duration_s=w, compute_ms=USER.compute_ms, bandwidth=USER.bandwidth)
        if not args.limits:  # keys only: 401 for unknown keys, no other limit
            anon = Tier(nb=10**9, duration_s=w, compute_ms=0, bandwidth=0)
            user = Tier(nb=10**9, duration_s=w, compute_ms=0, bandwidth=0)
        limits = Limits(anonymous=anon, user=user, api_keys=keys, cost_per_row_ms=args.cost_per_row_ms)
    server = StandinServer(dataset, faults, host=args.host, port=args.port,
                           total_on_after_pages=args.total_on_after_pages, limits=limits)
    try:
        server.start()
    except OSError as exc:
        print(f"dpe-ingest ademe-standin: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()

    def _on_signal(signum, _frame):
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    logs.event(log, "standin_started", f"ADEME stand-in serving {server.url}", url=server.url,
               rows=dataset.total, seed=args.seed, malformed_rate=args.malformed_rate)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
        logs.event(log, "standin_stopped", "ADEME stand-in stopped", requests=server.requests_served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
