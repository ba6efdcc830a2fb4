"""The stand-in's model of the live dpe03existant (issue #16): rows without a department, the codes
beyond 01..95/971..976, two-value cursors, rows moving while a client pages, the shared API budget
(request rate, compute budget, bandwidth), the API key tier, the metadata and metric_agg routes, and a
re-created dataset.  Everything over HTTP against a started StandinServer."""

from __future__ import annotations

import time

import pytest
import requests

from dpe_ingest.standin import Dataset, StandinServer

BASE = ["numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe"]


@pytest.fixture
def session():
    with requests.Session() as s:
        yield s


def walk(session, url, params=None, max_pages=100000, headers=None):
    """Follow ``next`` links; return the pages as JSON."""
    pages = []
    r = session.get(url, params=params, timeout=30, headers=headers)
    while True:
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body)
        if "next" not in body:
            return pages
        assert len(pages) < max_pages, "the cursor does not stop"
        r = session.get(body["next"], timeout=30, headers=headers)


def results(pages):
    return [row for page in pages for row in page["results"]]


# ------------------------------------------------------------------------------------------------
# 1-2. rows without a department, and every code the dataset holds
# ------------------------------------------------------------------------------------------------
def test_rows_without_a_department_only_with_not_exists(session):
    ds = Dataset({"69": 700, "977": 120, "978": 80, "988": 90}, default_rows=5, rows_without_department=333)
    with StandinServer(ds) as api:
        lines = api.url + "/lines"
        none = results(walk(session, lines, {"qs": "NOT _exists_:code_departement_ban", "size": 100, "select": "*"}))
        assert len(none) == 333 == ds.count("none")
        assert all("code_departement_ban" not in r and "code_postal_ban" not in r for r in none)
        assert len({r["numero_dpe"] for r in none}) == 333
        # no term on the field ever returns them
        everything = ds.total
        having = session.get(lines, params={"qs": "_exists_:code_departement_ban", "size": 0}).json()["total"]
        assert having == everything - 333
        for qs in ('code_departement_ban:"none"', "code_departement_ban:none", 'code_departement_ban:""'):
            r = session.get(lines, params={"qs": qs, "size": 0})
            assert r.status_code in (200, 400), r.text
            if r.status_code == 200:
                assert r.json()["total"] == 0, qs
        # a must_not keeps the rows without the field (Elasticsearch semantics)
        nin = session.get(lines, params={"code_departement_ban_nin": "69", "size": 0}).json()["total"]
        assert nin == everything - 700
        eq = session.get(lines, params={"code_departement_ban_eq": "none", "size": 0}).json()["total"]
        assert eq == 0
        # date filters combine with the negation
        dated = session.get(lines, params={"qs": "NOT _exists_:code_departement_ban AND "
                                                 "date_reception_dpe:[2024-01-01 TO *]", "size": 0}).json()["total"]
        assert dated == ds.count("none", date_from="2024-01-01") and 0 < dated < 333
        # the extra codes are real departments with their own rows
        for dep, n in (("977", 120), ("978", 80), ("988", 90)):
            rows = results(walk(session, lines, {"qs": f'code_departement_ban:"{dep}"', "size": 50,
                                                 "select": ",".join(BASE + ["code_departement_ban"])}))
            assert len(rows) == n and {r["code_departement_ban"] for r in rows} == {dep}
            assert all(len(r["code_postal_ban"]) == 5 for r in rows)
        # _exists_ on an unknown column: data-fair's checkQuery names the pseudo-field
        bad = session.get(lines, params={"qs": "_exists_:nope"})
        assert bad.status_code == 400
        assert bad.text == "Impossible d'appliquer un filtre sur le champ _exists_, il n'existe pas dans le jeu de données."


# ------------------------------------------------------------------------------------------------
# 3. two-value cursors (a virtual dataset sorts by _i then _rand), metadata, metric_agg, re-creation
# ------------------------------------------------------------------------------------------------
def test_virtual_dataset_pages_25000_rows_with_two_value_cursors(session):
    ds = Dataset({"69": 25_000}, default_rows=3, virtual=True, seed=5)
    with StandinServer(ds) as api:
        lines = api.url + "/lines"
        pages = walk(session, lines, {"qs": 'code_departement_ban:"69"', "size": 2000, "select": "numero_dpe,_i,_rand"})
        rows = results(pages)
        assert len(rows) == 25_000 == len({r["numero_dpe"] for r in rows}) and len(pages) == 13
        assert pages[0]["total"] == 25_000 and all("total" not in p for p in pages[1:])
        first_next = pages[0]["next"]
        after = first_next.split("after=")[1]
        last = rows[1999]
        assert after == f"{last['_i']}%2C{last['_rand']}", after  # URLSearchParams encodes the comma
        assert rows[0]["_i"] > 33_554_432_000_000  # derived from a timestamp, as on data.ademe.fr
        assert [r["_i"] for r in rows] == sorted(r["_i"] for r in rows)
        # one value where the sort has two: Elasticsearch's error, as data-fair relays it
        r = session.get(lines, params={"qs": "code_departement_ban:69", "after": str(last["_i"])})
        assert r.status_code == 400 and r.text == "search_after has 1 value(s) but sort has 2."
        # past the page window only the cursor goes
        assert session.get(lines, params={"size": 2000, "page": 6}).status_code == 400
    plain = Dataset({"69": 10}, default_rows=0)
    with StandinServer(plain) as api:
        r = session.get(api.url + "/lines", params={"after": "5,7"})
        assert r.status_code == 400 and r.text == "search_after has 2 value(s) but sort has 1."


def test_quoted_range_bounds_are_a_syntax_error_like_data_fair(session):
    with StandinServer(Dataset({"69": 50}, default_rows=0)) as api:
        lines = api.url + "/lines"
        ok = session.get(lines, params={"qs": "date_reception_dpe:[2022-01-01 TO *]", "size": 0})
        assert ok.status_code == 200
        for qs in ('date_reception_dpe:["2022-01-01" TO *]', 'date_derniere_modification_dpe:[* TO "2023-01-01"}'):
            r = session.get(lines, params={"qs": qs})
            assert r.status_code == 400, qs
            assert r.text.startswith("Impossible d'effectuer cette recherche, la syntaxe du paramètre \"qs\" "
                                     "n'est pas respectée"), r.text


def test_metadata_metric_agg_and_recreation(session):
    ds = Dataset({"69": 3000, "01": 500}, default_rows=0, virtual=True)
    with StandinServer(ds) as api:
        meta = session.get(api.url).json()
        assert meta["id"] == "dpe03existant" and meta["count"] == 3500 and meta["isVirtual"] is True
        assert {"createdAt", "updatedAt", "finalizedAt"} <= set(meta)
        agg = session.get(api.url + "/metric_agg", params={"metric": "max", "field": "date_derniere_modification_dpe",
                                                           "qs": 'code_departement_ban:"69"'}).json()
        assert agg == {"total": 3000, "metric": "2025-12-31"}
        low = session.get(api.url + "/metric_agg", params={"metric": "min", "field": "date_reception_dpe"}).json()
        assert low == {"total": 3500, "metric": "2021-07-01"}
        assert session.get(api.url + "/metric_agg", params={"field": "x"}).text == '"metric" parameter is required'
        r = session.get(api.url + "/metric_agg", params={"metric": "max", "field": "nope"})
        assert r.status_code == 400 and "Impossible de calculer une métrique sur le champ nope" in r.text
        top = session.get(api.url + "/lines", params={"sort": "-_i", "size": 1, "select": "_i"}).json()["results"][0]["_i"]
        ds.recreate()
        again = session.get(api.url).json()
        assert again["createdAt"] != meta["createdAt"] or again["finalizedAt"] != meta["finalizedAt"]
        rows = results(walk(session, api.url + "/lines", {"qs": "code_departement_ban:69", "size": 1000, "select": "_i"}))
        assert len(rows) == 3000 and max(r["_i"] for r in rows) < top and rows[0]["_i"] < 1000


# ------------------------------------------------------------------------------------------------
# 5. data-fair's per-client limits: request rate, compute budget, bandwidth, API keys
# ------------------------------------------------------------------------------------------------
def test_request_rate_and_compute_budget_answer_data_fairs_429s(session):
    from dpe_ingest.standin import Limits, Tier
    from dpe_ingest.standin.limits import COMPUTE_MESSAGE, RATE_MESSAGE

    limits = Limits(anonymous=Tier(nb=5, duration_s=60, compute_ms=0, bandwidth=0))
    with StandinServer(Dataset({"69": 100}, default_rows=0), limits=limits) as api:
        codes = [session.get(api.url + "/lines", params={"size": 1}).status_code for _ in range(7)]
        assert codes == [200] * 5 + [429] * 2
        r = session.get(api.url)  # the metadata route is limited too
        assert r.status_code == 429 and r.text == RATE_MESSAGE == "Trop de traffic dans un interval restreint sur cette API."
        assert "Retry-After" not in r.headers and r.headers["Content-Type"].startswith("text/plain")
    # compute: 20 ms + 0.2 ms per row of the size asked for; the balance goes negative down to -budget
    limits = Limits(anonymous=Tier(nb=1000, duration_s=60, compute_ms=500, bandwidth=0))
    with StandinServer(Dataset({"69": 5000}, default_rows=0), limits=limits) as api:
        ok = session.get(api.url + "/lines", params={"size": 5000, "select": "numero_dpe"})  # costs 1020 ms
        assert ok.status_code == 200
        r = session.get(api.url + "/lines", params={"size": 10})
        assert r.status_code == 429 and r.text.startswith(COMPUTE_MESSAGE)
        assert "count=estimate" in r.text and "Retry-After" not in r.headers
        bucket = limits._compute["127.0.0.1"]
        assert bucket.content == pytest.approx(-500, abs=1.0)  # floored at minus one budget
        assert limits.lockouts["127.0.0.1"][0][1] - limits.lockouts["127.0.0.1"][0][0] == pytest.approx(60, abs=0.5)
        assert limits.outcomes() == {"ok": 1, "compute": 1}


def test_compute_of_an_aborted_request_is_billed_all_the_same(session):
    from dpe_ingest.standin import Limits, Tier

    # 1 kB/s: a 10 000-row page takes minutes to send; the client gives up after 0.5 s
    limits = Limits(anonymous=Tier(nb=1000, duration_s=60, compute_ms=60_000, bandwidth=1_000))
    with StandinServer(Dataset({"69": 10_000}, default_rows=0), limits=limits) as api:
        with pytest.raises(requests.exceptions.RequestException):
            session.get(api.url + "/lines", params={"size": 10_000, "select": "numero_dpe"}, timeout=0.5)
        session.close()
        deadline = time.monotonic() + 30
        while limits.log[0].cost_ms == 0.0 and time.monotonic() < deadline:
            time.sleep(0.1)
    assert limits.log[0].cost_ms == pytest.approx(20 + 0.2 * 10_000)
    assert limits._compute["127.0.0.1"].content < 60_000 - 1_900


def test_bandwidth_throttle_counts_bytes_and_tears_down_past_100_queued_sends():
    from dpe_ingest.standin import Limits, Tier

    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        now[0] += s

    tier = Tier(nb=10, duration_s=60, compute_ms=0, bandwidth=1000.0)
    limits = Limits(anonymous=tier, clock=lambda: now[0], sleep=sleep)
    body = bytes(10_000)
    pieces = list(limits.slices("ip", tier, body))
    assert b"".join(pieces) == body and {len(p) for p in pieces[:-1]} == {4000}  # slices of the 4 s burst
    # the first 4 000 bytes go at once (the bucket starts full), the other 6 000 at 1 000 bytes/s
    assert sum(slept) == pytest.approx(6.0, abs=0.2)
    for _ in range(100):
        assert limits.acquire_send("ip", tier)
    assert not limits.acquire_send("ip", tier)  # the 101st queued response is torn down
    limits.release_send("ip", tier)
    assert limits.acquire_send("ip", tier)


def test_api_keys_move_to_the_user_tier_and_unknown_keys_are_401(session):
    from dpe_ingest.standin import Limits, Tier

    limits = Limits(anonymous=Tier(nb=2, duration_s=60, compute_ms=0, bandwidth=0),
                    user=Tier(nb=4, duration_s=60, compute_ms=0, bandwidth=0), api_keys={"good": "alice"})
    with StandinServer(Dataset({"69": 10}, default_rows=0), limits=limits) as api:
        lines = api.url + "/lines"
        assert [session.get(lines).status_code for _ in range(3)] == [200, 200, 429]
        keyed = [session.get(lines, headers={"x-apiKey": "good"}).status_code for _ in range(5)]
        assert keyed == [200] * 4 + [429]  # its own, larger bucket
        r = session.get(lines, headers={"x-apiKey": "bad"})
        assert r.status_code == 401 and r.text == "Cette clé d'API est inconnue."
        assert session.get(lines, params={"apiKey": "bad"}).status_code == 401
        assert session.get(api.url.replace("dpe03existant", "other"), headers={"x-apiKey": "bad"}).status_code == 404
    with StandinServer(Dataset({"69": 10}, default_rows=0)) as api:  # no limits: every key is unknown
        assert session.get(api.url + "/lines", headers={"x-apiKey": "x"}).status_code == 401
