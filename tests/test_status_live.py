"""``dpe-ingest status`` and the live dataset (issue #16): the rows without a department (from the API,
as a producer read them), department ``none`` (stored with departement NULL), the refresh counts, and a
progress that never passes 100 % when rows were served twice."""

from __future__ import annotations

from dpe_ingest.status import Checkpoint, Lag, Source, Status, render_text, to_json

from test_status import SETTINGS, ok_sources


def live_status() -> Status:
    return Status(
        generated_at="2026-11-29T04:00:00Z", settings=dict(SETTINGS), sources=ok_sources(),
        checkpoints={
            # 69 sent 2 050 rows for an API total of 2 000: 50 were updated during the pass and served again
            "69": Checkpoint(rows=2050, dead=0, total=2000, done=True, page=5, at="2026-11-29T03:00:00Z",
                             api_without_department={"count": 512, "at": "2026-11-29T02:00:00Z"},
                             refresh={"at": "2026-11-29T03:50:00Z", "updated": 20, "inserted": 7, "deleted": 3}),
            "none": Checkpoint(rows=515, dead=0, total=515, done=True, page=2, at="2026-11-29T03:10:00Z",
                               api_without_department={"count": 515, "at": "2026-11-29T03:05:00Z"}),
        },
        dead_letters={}, stored={"69": 2004, "none": 515}, labels={},
        lag=Lag("dpe-lines", "dpe-sink", 0, {0: 0}), only=None,
    )


def test_status_shows_rows_without_a_department_refresh_counts_and_caps_progress():
    status = live_status()
    text = render_text(status)
    assert "rows without a department in the API: 515 (as of 2026-11-29T03:05:00Z; department none fetches them)" in text
    assert "refresh of 69 at 2026-11-29T03:50:00Z: 20 updated, 7 new, 3 deleted (deactivated in the API)" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line[:3] in ("69 ", "non")}
    assert "100.0%" in lines["69"] and "102" not in lines["69"].split("]")[1].split("%")[0]
    assert "none" in lines and "100.0%" in lines["none"]
    doc = to_json(status)
    assert doc["api_without_department"] == {"count": 515, "at": "2026-11-29T03:05:00Z"}
    deps = {d["department"]: d for d in doc["departments"]}
    assert deps["69"]["progress"] == 1.0 and deps["69"]["refresh"]["deleted"] == 3
    assert deps["none"]["stored"] == 515 and deps["none"]["refresh"] is None


def test_nothing_shown_when_no_producer_read_the_count():
    status = live_status()
    for ck in status.checkpoints.values():
        ck.api_without_department = None
    assert "rows without a department" not in render_text(status)
    status.sources["checkpoints"] = Source(ok=False, error="down")
    assert to_json(status)["api_without_department"] is None
