"""Property: whatever a server answers (status, Retry-After, body, next link, redirect), the ADEME client
returns a data-fair page or raises one of its own errors, and never waits without bound."""

import json
import math

from hypothesis import given, strategies as st

from canned_http import CannedServer
from dpe_ingest import ademe
from hypothesis_profiles import counted, json_values

_SERVER: list[CannedServer] = []


def server() -> CannedServer:
    """One server for the module, started on first use (bench/fuzz.py calls the properties without pytest)."""
    if not _SERVER:
        _SERVER.append(CannedServer().__enter__())
    return _SERVER[0]


def teardown_module():
    while _SERVER:
        _SERVER.pop().__exit__(None, None, None)


RETRY_AFTER = (st.none() | st.integers(-10, 10**12).map(str) | st.floats().map(repr) | st.text(max_size=12)
               | st.sampled_from(["inf", "nan", "-1", "Fri, 31 Dec 9999 23:59:59 GMT", "Wed, 21 Oct 2015 07:28:00 GMT",
                                  "Mon, 01 Jan 3000000000 00:00:00 GMT", "Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
                                  "Sun, 06 Nov 1994 08:49:37 +9999"]))
NEXT = (st.none() | json_values(max_leaves=3)
        | st.sampled_from(["http://", "https://h", "ftp://h/x", "javascript:alert(1)", "http://[::1", "/lines",
                           "http://h:99999/x", "http://h/lines?after=1"]).flatmap(
            lambda head: st.text(max_size=10).map(lambda tail: head + tail)))
PAGES = st.fixed_dictionaries({}, optional={"results": st.lists(json_values(max_leaves=3), max_size=3) | json_values(),
                                            "total": json_values(max_leaves=1) | st.integers(-5, 10**20),
                                            "next": NEXT})


def _deep(n: int) -> bytes:
    return b'{"results": [], "x": ' + b"[" * n + b"]" * n + b"}"


BODIES = (PAGES.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=50) | st.integers(900, 5000).map(_deep)
          | json_values().map(lambda v: json.dumps(v).encode()))
RESPONSES = st.tuples(
    st.sampled_from([200, 200, 200, 429, 500, 503, 408, 404, 400, 401, 302, 301]),
    RETRY_AFTER,
    st.none() | NEXT.filter(lambda v: isinstance(v, str)),
    BODIES)


def _response(status, retry_after, location, body):
    headers = {"Content-Type": "application/json"}
    if retry_after is not None and retry_after.isascii() and retry_after.isprintable() and retry_after.strip() == retry_after:
        headers["Retry-After"] = retry_after
    if status in (301, 302):
        if location is None or not location.isascii() or not location.isprintable():
            location = "ftp://example.org/lines"
        headers["Location"] = location
    return status, headers, body


@given(st.lists(RESPONSES, min_size=1, max_size=3))
@counted
def test_ademe_client_page_or_its_own_error(responses):
    srv = server()
    srv.serve(*(_response(*r) for r in responses))
    client, slept = srv.client(max_retries=1, retry_max_s=30.0, rate_window_s=5.0, timeout_s=5.0)
    try:
        page = client.fetch(client.lines_url, {"size": 1})
    except (ademe.ApiRequestError, ademe.ApiUnavailable) as exc:
        assert str(exc)
    else:
        assert isinstance(page.rows, list)
        assert page.total is None or (type(page.total) is int and page.total >= 0)
        assert page.next_url is None or (isinstance(page.next_url, str) and page.next_url.startswith("http"))
        assert page.after is None or isinstance(page.after, str)
    # a 429 is waited out at most max(retry_max_s, rate_window_s) + 1 s of jitter; retries in all 30 s
    assert all(math.isfinite(s) and 0 <= s <= 31.0 for s in slept), slept
