"""The ADEME data-fair stand-in, over HTTP (requests against a started StandinServer on a free port)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from dpe_ingest import departments
from dpe_ingest.standin import Dataset, Faults, StandinServer
from dpe_ingest.standin.data import SPAN_DAYS, START_DATE

BASE = ["numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe"]


@pytest.fixture
def session():
    with requests.Session() as s:
        yield s


def walk(session, url, params=None, max_pages=100000):
    """Follow ``next`` links; return (pages as JSON, number of requests)."""
    pages = []
    r = session.get(url, params=params, timeout=30)
    while True:
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body)
        if "next" not in body:
            return pages
        assert len(pages) < max_pages, "the cursor does not stop"
        r = session.get(body["next"], timeout=30)


def results(pages):
    return [row for page in pages for row in page["results"]]


def test_cursor_walk_returns_every_row_exactly_once_and_stops(session):
    ds = Dataset({"69": 2345}, default_rows=50)
    with StandinServer(ds) as api:
        pages = walk(session, api.url + "/lines",
                     {"qs": "code_departement_ban:69", "size": 500, "select": ",".join(BASE)})
    rows = results(pages)
    assert pages[0]["total"] == 2345 == ds.count("69")
    assert len(pages) == 5 and len(pages[-1]["results"]) == 345
    assert "next" not in pages[-1]
    numbers = [r["numero_dpe"] for r in rows]
    assert len(numbers) == len(set(numbers)) == 2345
    assert numbers == [ds.row("69", i)["numero_dpe"] for i in range(2345)]
    assert all(r["code_postal_ban"].startswith("69") for r in rows)


def test_full_last_page_has_next_and_the_following_page_is_empty(session):
    # data-fair sets "next" whenever the page is full (count === size), so a total that is a multiple of
    # the size ends on an empty page without "next" (lines-body.ts nextLinkHref)
    with StandinServer(Dataset({"01": 1000}, default_rows=10)) as api:
        pages = walk(session, api.url + "/lines", {"qs": "code_departement_ban:01", "size": 500})
    assert [len(p["results"]) for p in pages] == [500, 500, 0]
    assert "next" in pages[1] and "next" not in pages[2]


def test_total_only_on_the_first_page_and_next_keeps_params_drops_page(session):
    with StandinServer(Dataset(30)) as api:
        r = session.get(api.url + "/lines", params={"qs": "code_departement_ban:38", "size": 7, "page": 1,
                                                    "select": "numero_dpe,_i", "foo": "bar baz"})
        body = r.json()
        assert body["total"] == 30
        nxt = urlsplit(body["next"])
        assert nxt.netloc == f"127.0.0.1:{api.port}"
        assert nxt.path == "/data-fair/api/v1/datasets/dpe03existant/lines"
        q = parse_qs(nxt.query)
        assert "page" not in q
        assert q["qs"] == ["code_departement_ban:38"] and q["size"] == ["7"] and q["foo"] == ["bar baz"]
        assert q["after"] == [str(body["results"][-1]["_i"])]
        assert r.headers["Link"] == f'<{body["next"]}>; rel="next"'
        second = session.get(body["next"]).json()
        assert "total" not in second  # track_total_hits=false on after= pages
        assert len(second["results"]) == 7


def test_department_filters_select_exactly_that_department(session):
    ds = Dataset({"2A": 321, "2B": 123, "69": 999}, default_rows=40)
    with StandinServer(ds) as api:
        for params in ({"qs": "code_departement_ban:2A"}, {"qs": 'code_departement_ban:"2A"'},
                       {"code_departement_ban_eq": "2A"}, {"code_departement_ban_in": "2A"}):
            pages = walk(session, api.url + "/lines", {**params, "size": 100})
            rows = results(pages)
            assert pages[0]["total"] == 321 == len(rows)
            assert {r["code_departement_ban"] for r in rows} == {"2A"}
        both = walk(session, api.url + "/lines", {"qs": "code_departement_ban:(2A OR 2B)", "size": 1000})
        assert both[0]["total"] == 444
        assert sorted({r["code_departement_ban"] for r in results(both)}) == ["2A", "2B"]
        # codes are keyword values: "2a" or "1" match nothing, as on the real API
        for qs in ("code_departement_ban:2a", "code_departement_ban:1"):
            assert session.get(api.url + "/lines", params={"qs": qs}).json() == {"total": 0, "results": []}


def test_date_range_selects_exactly_those_dates_inclusive(session):
    ds = Dataset({"38": 5000}, default_rows=10)
    all_rows = [ds.row("38", i) for i in range(5000)]
    lo, hi = all_rows[1234]["date_reception_dpe"], all_rows[2345]["date_reception_dpe"]
    expected = [r["numero_dpe"] for r in all_rows if lo <= r["date_reception_dpe"] <= hi]
    assert any(r["date_reception_dpe"] == lo for r in all_rows) and len(expected) < 5000
    with StandinServer(ds) as api:
        qs = f"code_departement_ban:38 AND date_reception_dpe:[{lo} TO {hi}]"
        pages = walk(session, api.url + "/lines", {"qs": qs, "size": 333})
        got = [r["numero_dpe"] for r in results(pages)]
        assert got == expected and pages[0]["total"] == len(expected) == ds.count("38", lo, hi)
        params = {"code_departement_ban_eq": "38", "date_reception_dpe_gte": lo, "date_reception_dpe_lte": hi,
                  "size": 10000}
        assert [r["numero_dpe"] for r in session.get(api.url + "/lines", params=params).json()["results"]] == expected
        # exclusive bounds and open ends
        excl = session.get(api.url + "/lines", params={"qs": f"code_departement_ban:38 AND date_reception_dpe:{{{lo} TO {hi}}}",
                                                       "size": 0}).json()["total"]
        assert excl == sum(1 for r in all_rows if lo < r["date_reception_dpe"] < hi)
        open_end = session.get(api.url + "/lines", params={"qs": f"code_departement_ban:38 AND date_reception_dpe:[{lo} TO *]",
                                                           "size": 0}).json()["total"]
        assert open_end == sum(1 for r in all_rows if r["date_reception_dpe"] >= lo)
        none = session.get(api.url + "/lines", params={"qs": "date_reception_dpe:[2030-01-01 TO *]"}).json()
        assert none == {"total": 0, "results": []}


def test_page_window_and_size_limits_answer_400_like_data_fair(session):
    with StandinServer(Dataset(20)) as api:
        lines = api.url + "/lines"
        ok = session.get(lines, params={"size": 500, "page": 20})
        assert ok.status_code == 200
        r = session.get(lines, params={"size": 500, "page": 21})
        assert r.status_code == 400
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.text == '"size + skip" cannot be more than 10000'
        assert session.get(lines, params={"size": 10000}).status_code == 200
        r = session.get(lines, params={"size": 10001})
        assert r.status_code == 400 and "cannot be more than 10000" in r.text
        # with after there is no window: a deep cursor page is fine
        deep = session.get(lines, params={"size": 10000, "after": 1500}).json()
        # 20 rows x N departments interleaved (none has no rows here): count the _i beyond 1500
        same = Dataset(20)  # built once: a Dataset is not cheap to make
        follow = sum(1 for d in departments.ALL_DEPARTMENTS for i in range(20) if same.line_number(d, i) > 1500)
        assert follow > 0
        assert len(deep["results"]) == follow and "total" not in deep and "next" not in deep
        assert session.get(lines, params={"size": "abc"}).status_code == 400
        assert session.get(lines, params={"page": "0"}).status_code == 400
        assert session.get(lines, params={"after": "{oops"}).text == '"after" parameter is malformed'


def test_select_returns_exactly_the_selected_fields(session):
    with StandinServer(Dataset(50)) as api:
        body = session.get(api.url + "/lines", params={"select": "numero_dpe,etiquette_dpe,nom_commune_ban",
                                                       "size": 20}).json()
        assert len(body["results"]) == 20
        for row in body["results"]:
            assert set(row) == {"numero_dpe", "etiquette_dpe", "nom_commune_ban", "_score"}
            assert row["_score"] is None
        with_id = session.get(api.url + "/lines", params={"select": "numero_dpe,_id", "size": 2}).json()
        assert set(with_id["results"][0]) == {"numero_dpe", "_id", "_score"}
        default = session.get(api.url + "/lines", params={"size": 1}).json()["results"][0]
        assert {"numero_dpe", "date_reception_dpe", "code_postal_ban", "etiquette_dpe", "type_batiment",
                "surface_habitable_logement", "conso_5_usages_par_m2_ep", "_i", "_rand", "_id", "_score"} <= set(default)
        r = session.get(api.url + "/lines", params={"select": "numero_dpe,nope"})
        assert r.status_code == 400
        assert r.text == "Impossible de sélectionner le champ nope, il n'existe pas dans le jeu de données."


def test_bad_and_unsupported_queries_are_400(session):
    with StandinServer(Dataset(10)) as api:
        lines = api.url + "/lines"
        r = session.get(lines, params={"qs": "code_departement_ban:(69"})
        assert r.status_code == 400 and r.text.startswith("Impossible d'effectuer cette recherche, la syntaxe du paramètre \"qs\"")
        r = session.get(lines, params={"qs": 'code_departement_ban:"69'})
        assert r.status_code == 400
        r = session.get(lines, params={"qs": "departement:69"})
        assert r.status_code == 400
        assert r.text == "Impossible d'appliquer un filtre sur le champ departement, il n'existe pas dans le jeu de données."
        r = session.get(lines, params={"nope_eq": "1"})
        assert r.status_code == 400 and "champ nope" in r.text
        r = session.get(lines, params={"sort": "nope"})
        assert r.status_code == 400 and r.text.startswith("Impossible de trier sur le champ nope")
        for params in ({"qs": "etiquette_dpe:A"}, {"q": "Lyon"}, {"format": "csv"}, {"sort": "date_reception_dpe"},
                       {"qs": "date_reception_dpe:[2022-13-01 TO *]"}):
            r = session.get(lines, params=params)
            assert r.status_code == 400, params


def test_department_of_25000_rows_walked_fully_with_after(session):
    ds = Dataset({"13": 25000}, default_rows=5)
    with StandinServer(ds) as api:
        pages = walk(session, api.url + "/lines", {"qs": "code_departement_ban:13", "size": 1000,
                                                   "select": ",".join(BASE)})
        assert all("after=" in p["next"] for p in pages[:-1])
        rows = results(pages)
    assert len(rows) == 25000 == len({r["numero_dpe"] for r in rows})
    dates = [r["date_reception_dpe"] for r in rows]
    assert dates == sorted(dates) and dates[0] >= "2021-07-01"
    assert api.requests_served == len(pages) == 26


def test_unfiltered_walk_covers_every_department_and_sort_desc(session):
    ds = Dataset(7, default_rows=7)
    with StandinServer(ds) as api:
        pages = walk(session, api.url + "/lines", {"size": 100, "select": "numero_dpe,code_departement_ban,_i"})
        rows = results(pages)
        assert pages[0]["total"] == 7 * len(departments.ALL_DEPARTMENTS) == len(rows)
        assert [r["_i"] for r in rows] == sorted(r["_i"] for r in rows)
        assert {r["code_departement_ban"] for r in rows} == set(departments.ALL_DEPARTMENTS)
        desc = results(walk(session, api.url + "/lines", {"size": 64, "sort": "-_i", "select": "_i"}))
        assert [r["_i"] for r in desc] == sorted((r["_i"] for r in rows), reverse=True)


def test_corsica_and_overseas_have_their_postal_codes(session):
    with StandinServer(Dataset(300)) as api:
        for dep in ("2A", "2B", "971", "972", "973", "974", "975", "976", "01", "75"):
            rows = session.get(api.url + "/lines", params={"qs": f"code_departement_ban:{dep}", "size": 300,
                                                           "select": "code_postal_ban,code_departement_ban,numero_dpe"}).json()["results"]
            assert len(rows) == 300 and {r["code_departement_ban"] for r in rows} == {dep}
            for r in rows:
                cp = r["code_postal_ban"]
                assert re.fullmatch(r"\d{5}", cp), cp
                assert re.fullmatch(r"2[1-5](\d\d|2[AB])E\d{7}[A-Z]", r["numero_dpe"]), r["numero_dpe"]
                if dep == "2A":
                    assert cp[:3] in ("200", "201"), cp
                elif dep == "2B":
                    assert cp[:3] in ("202", "206"), cp
                elif len(dep) == 3:
                    assert cp.startswith(dep), cp
                else:
                    assert cp.startswith(dep), cp


def test_injected_429_has_retry_after(session):
    faults = Faults().fail_next(1, "429:7")
    with StandinServer(Dataset(5), faults) as api:
        r = session.get(api.url + "/lines")
        assert r.status_code == 429 and r.headers["Retry-After"] == "7"
        assert session.get(api.url + "/lines").status_code == 200
    faults = Faults(seed=5, p_429=1.0, retry_after_s=3)
    with StandinServer(Dataset(5), faults) as api:
        r = session.get(api.url + "/lines")
        assert r.status_code == 429 and r.headers["Retry-After"] == "3"


def test_scripted_503s_then_success(session):
    faults = Faults()
    with StandinServer(Dataset(5), faults) as api:
        assert session.get(api.url + "/lines").status_code == 200
        api.faults.fail_next(3, "503")
        assert [session.get(api.url + "/lines").status_code for _ in range(4)] == [503, 503, 503, 200]
        assert faults.injected == [(2, "503"), (3, "503"), (4, "503")]


def test_cut_body_breaks_the_client_read(session):
    faults = Faults().on_request(2, "cut")
    with StandinServer(Dataset(50), faults) as api:
        assert session.get(api.url + "/lines", params={"size": 50}).status_code == 200
        with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
            session.get(api.url + "/lines", params={"size": 50})
        # the client can go on with a new connection; the same page is served whole
        assert len(session.get(api.url + "/lines", params={"size": 50}).json()["results"]) == 50
        assert api.requests_served == 3


def test_slow_fault_and_5xx_probabilities_are_deterministic(session):
    def statuses(seed):
        with StandinServer(Dataset(3), Faults(seed=seed, p_5xx=0.5)) as api:
            with requests.Session() as s:
                return [s.get(api.url + "/lines").status_code for _ in range(30)]
    a, b = statuses(11), statuses(11)
    assert a == b and set(a) - {200} and 200 in a and set(a) <= {200, 500, 502, 503}
    with StandinServer(Dataset(3), Faults().fail_next(1, "slow:0.3")) as api:
        t = time.monotonic()
        assert session.get(api.url + "/lines").status_code == 200
        assert time.monotonic() - t >= 0.29  # the delay happened (a lower bound, not a timing target)


def test_rate_limit_answers_429_text_plain_without_retry_after(session):
    with StandinServer(Dataset(3), Faults(rate_limit=5, rate_window_s=3600)) as api:
        codes = [session.get(api.url + "/lines").status_code for _ in range(7)]
        assert codes == [200] * 5 + [429] * 2
        r = session.get(api.url + "/lines")
        assert r.status_code == 429 and "Retry-After" not in r.headers
        assert r.headers["Content-Type"].startswith("text/plain")


def test_million_rows_department_is_lazy_and_correct(session):
    ds = Dataset({"69": 1_000_000}, default_rows=1)
    with StandinServer(ds) as api:
        first = session.get(api.url + "/lines", params={"qs": "code_departement_ban:69", "size": 500}).json()
        assert first["total"] == 1_000_000
        assert [r["numero_dpe"] for r in first["results"]] == [ds.row("69", i)["numero_dpe"] for i in range(500)]
        # jump deep into the cursor: the after value of row 999 000
        after = ds.line_number("69", 998_999)
        deep = walk(session, api.url + "/lines", {"qs": "code_departement_ban:69", "size": 500, "after": after})
        rows = results(deep)
        assert len(rows) == 1000 and "next" not in deep[-1]
        assert rows[0]["numero_dpe"] == ds.row("69", 999_000)["numero_dpe"]
        assert rows[-1]["numero_dpe"] == ds.row("69", 999_999)["numero_dpe"]
        assert rows[-1]["date_reception_dpe"] == "2025-12-31"
    # only the rows served (plus the few checked above) were ever generated
    assert ds.generated_rows < 5000


def test_malformed_rows_are_deterministic_and_known(session):
    ds = Dataset({"59": 4000}, default_rows=1, malformed_rate=0.05, seed=9)
    bad = dict(ds.malformed_indices("59"))
    assert 100 < len(bad) < 320 and set(bad.values()) == {"missing_numero_dpe", "bad_date"}
    assert ds.expected_malformed("59") == len(bad)
    assert Dataset({"59": 4000}, default_rows=1, malformed_rate=0.05, seed=9).malformed_indices("59") == sorted(bad.items())
    with StandinServer(ds) as api:
        rows = results(walk(session, api.url + "/lines", {"qs": "code_departement_ban:59", "size": 1000,
                                                          "select": ",".join(BASE)}))
    assert len(rows) == 4000
    missing = [i for i, r in enumerate(rows) if "numero_dpe" not in r]
    bad_dates = [i for i, r in enumerate(rows) if r["date_reception_dpe"] == "not-a-date"]
    assert missing == sorted(i for i, k in bad.items() if k == "missing_numero_dpe")
    assert bad_dates == sorted(i for i, k in bad.items() if k == "bad_date")


def test_metadata_route_and_404s(session):
    ds = Dataset({"69": 123}, default_rows=2)
    with StandinServer(ds) as api:
        meta = session.get(api.url).json()
        assert meta["id"] == "dpe03existant" and meta["count"] == 123 + 2 * (len(departments.ALL_DEPARTMENTS) - 1)
        keys = [f["key"] for f in meta["schema"]]
        assert set(BASE) <= set(keys) and "code_departement_ban" in keys
        r = session.get(api.base_url + "/data-fair/api/v1/datasets/dpe02neuf/lines")
        assert r.status_code == 404 and r.text == "Dataset not found"
        assert session.get(api.base_url + "/nothing").status_code == 404
        assert session.get(api.url + "/lines/extra").status_code == 404


def test_dates_span_and_distribution_are_realistic():
    ds = Dataset({"33": 20000}, default_rows=1)
    rows = [ds.row("33", i) for i in range(0, 20000, 4)]
    assert rows[0]["date_reception_dpe"] == START_DATE.isoformat()
    assert rows[-1]["date_reception_dpe"] >= "2025-12-01"
    share = {k: sum(r["etiquette_dpe"] == k for r in rows) / len(rows) for k in "ABCDEFG"}
    assert 0.25 < share["D"] < 0.42 and 0.12 < share["C"] < 0.26 and share["A"] < 0.04
    assert all(r["numero_dpe"][2:4] == "33" and r["numero_dpe"][4] == "E" and len(r["numero_dpe"]) == 13 for r in rows)
    assert SPAN_DAYS > 1500


def test_cli_serves_and_stops_on_sigterm(tmp_path):
    env = dict(os.environ, LOG_FORMAT="logfmt", LOG_LEVEL="INFO")
    proc = subprocess.Popen([sys.executable, "-m", "dpe_ingest.standin", "--port", "0", "--rows-per-department", "10",
                             "--rows", "69=42", "--seed", "3"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        m = re.search(r"url=(http://127\.0\.0\.1:\d+/data-fair/api/v1/datasets/dpe03existant)", line)
        assert m, line
        body = requests.get(m.group(1) + "/lines", params={"qs": "code_departement_ban:69", "size": 0}, timeout=10).json()
        assert body == {"total": 42, "results": []}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_cli_rejects_bad_flags():
    from dpe_ingest.standin.server import main
    with pytest.raises(SystemExit) as exc:
        main(["--rows", "20=5"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["--fault-429", "2"])
