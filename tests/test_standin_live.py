"""The stand-in's model of the live dpe03existant (issue #16): rows without a department, the codes
beyond 01..95/971..976, two-value cursors, rows moving while a client pages, the shared API budget
(request rate, compute budget, bandwidth), the API key tier, the metadata and metric_agg routes, and a
re-created dataset.  Everything over HTTP against a started StandinServer."""

from __future__ import annotations

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
