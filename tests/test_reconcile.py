"""The reconciliation of the end-to-end tests (``tests/reconcile.py``) sees one wrong value.

Each counter-test takes the exact expected rows of a small seeded stand-in dataset as a table would
hold them, changes one thing behind the check's back, and expects a failure naming the row."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import reconcile
from dpe_ingest.standin.data import Dataset

HERE = Path(__file__).resolve().parent
DEPS = ["69", "2A", "none"]
EXTRA = ("surface_habitable_logement", "annee_construction")


@pytest.fixture(scope="module")
def want() -> dict[str, dict]:
    return reconcile.expected_rows(Dataset({"69": 40, "2A": 30}, default_rows=0, rows_without_department=20,
                                           seed=3), DEPS, EXTRA)


def as_table(rows: dict[str, dict]) -> dict[str, dict]:
    """What psql prints for these rows, read back (JSON text per row, as ``rows_sql`` selects it)."""
    return reconcile.parse_rows(json.dumps(r, ensure_ascii=False) for r in rows.values())


def test_the_expected_rows_are_the_datasets_rows_as_the_sink_stores_them(want):
    ds = Dataset({"69": 40, "2A": 30}, default_rows=0, rows_without_department=20, seed=3)
    assert len(want) == 90
    api = ds.row("69", 7)
    got = want[api["numero_dpe"]]
    assert got == {"numero_dpe": api["numero_dpe"], "date_reception_dpe": api["date_reception_dpe"],
                   "code_postal_ban": api["code_postal_ban"], "etiquette_dpe": api["etiquette_dpe"],
                   "departement": "69", "extra": {"surface_habitable_logement": api["surface_habitable_logement"],
                                                   "annee_construction": api.get("annee_construction")}}
    none = [r for r in want.values() if r["departement"] is None]
    assert len(none) == 20 and all(r["code_postal_ban"] is None for r in none)
    # rows without annee_construction keep it as null in extra (the producer selects it)
    assert any(r["extra"]["annee_construction"] is None for r in want.values())
    reconcile.assert_rows(want, as_table(want))


def test_malformed_rows_are_not_expected():
    ds = Dataset({"38": 300}, default_rows=0, seed=5, malformed_rate=0.1)
    bad = ds.expected_malformed("38")
    assert bad > 10
    assert len(reconcile.expected_rows(ds, ["38"])) == 300 - bad


@pytest.mark.parametrize("column, value", [
    ("etiquette_dpe", "flip"), ("date_reception_dpe", "2019-01-01"), ("code_postal_ban", "00000"),
    ("departement", "01"), ("extra", {"surface_habitable_logement": 1.0}), ("extra", {})])
def test_one_changed_value_fails_naming_the_row(want, column, value):
    got = as_table(want)
    key = sorted(got)[17]
    if value == "flip":
        value = "A" if got[key]["etiquette_dpe"] != "A" else "B"
    elif column == "extra" and value:
        value = {**got[key]["extra"], **value}
    got[key][column] = value
    with pytest.raises(AssertionError) as err:
        reconcile.assert_rows(want, got)
    text = str(err.value)
    assert f"different: {key} " in text and column in text, text
    assert "1 different" in text


def test_a_missing_row_an_unexpected_row_and_a_swapped_key_fail(want):
    got = as_table(want)
    gone = sorted(got)[3]
    del got[gone]
    with pytest.raises(AssertionError, match=f"missing: {gone} "):
        reconcile.assert_rows(want, got)
    got = as_table(want)
    got["99X0000000Z"] = dict(next(iter(got.values())), numero_dpe="99X0000000Z")
    with pytest.raises(AssertionError, match="unexpected: 99X0000000Z "):
        reconcile.assert_rows(want, got)


def test_the_analytics_counts_come_from_the_rows_and_one_changed_count_fails(want):
    counts = reconcile.expected_counts(want)
    assert sum(counts["labels"]["69"].values()) == 40 and sum(counts["months"]["none"].values()) == 20
    assert set(counts["labels"]) == {"69", "2A", "none"}
    table = [f"{kind}|{dep}|{key}|{n}" for kind, per in counts.items() for dep, d in per.items() for key, n in d.items()]
    reconcile.assert_counts(counts, reconcile.parse_counts(table))
    got = copy.deepcopy(counts)
    label = sorted(got["labels"]["2A"])[0]
    got["labels"]["2A"][label] += 1
    with pytest.raises(AssertionError, match=f"labels of department 2A, {label}: "):
        reconcile.assert_counts(counts, got)
    got = copy.deepcopy(counts)
    got["months"]["69"]["1999-01"] = 1
    with pytest.raises(AssertionError, match="months of department 69, 1999-01: 1 counted, 0 expected"):
        reconcile.assert_counts(counts, got)


def test_the_command_line_of_the_kind_workflow(tmp_path):
    """``PYTHONPATH=src python3 tests/reconcile.py --rows FILE …``: exit 0 on the exact rows, 1 naming
    the row when one label is flipped."""
    ds = Dataset(150, seed=1)
    rows = reconcile.expected_rows(ds, ["69", "01"])
    env = {**os.environ, "PYTHONPATH": str(HERE.parent / "src")}
    cmd = [sys.executable, str(HERE / "reconcile.py"), "--rows-per-department", "150", "69", "01", "--rows"]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    res = subprocess.run([*cmd, str(good)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "300 rows of 69, 01 reconcile" in res.stdout, res.stdout + res.stderr
    key = sorted(rows)[42]
    rows[key]["etiquette_dpe"] = "A" if rows[key]["etiquette_dpe"] != "A" else "B"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows.values()))
    res = subprocess.run([*cmd, str(bad)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and f"different: {key} " in res.stderr, res.stdout + res.stderr
    sql = subprocess.run([sys.executable, str(HERE / "reconcile.py"), "--sql"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert sql.stdout.strip() == reconcile.rows_sql("dpe_data")


def test_the_kind_workflows_row_check_passes_on_the_exact_rows_and_fails_on_one_flipped_label(tmp_path):
    """The step of .github/workflows/e2e-kind.yml that reconciles dpe_data, run as the runner runs it
    (bash, from a checkout) with a ``scripts/psql`` that answers what the cluster's table would hold."""
    import shutil

    import yaml

    doc = yaml.safe_load((HERE.parent / ".github" / "workflows" / "e2e-kind.yml").read_text())
    (job,) = doc["jobs"].values()
    (step,) = [s for s in job["steps"] if "tests/reconcile.py" in s.get("run", "")]
    ds = Dataset(int(doc["env"]["ROWS_PER_DEPARTMENT"]))
    rows = reconcile.expected_rows(ds, doc["env"]["DEPARTMENTS"].split())
    (tmp_path / "scripts").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "src").symlink_to(HERE.parent / "src")
    shutil.copy(HERE / "reconcile.py", tmp_path / "tests" / "reconcile.py")
    psql = tmp_path / "scripts" / "psql"
    sql = reconcile.rows_sql("dpe_data")
    psql.write_text('#!/usr/bin/env bash\n[ "$*" = "-A -t -c ' + sql.replace('"', '\\"') + '" ] || '
                    '{ echo "unexpected psql arguments: $*" >&2; exit 2; }\ncat "$TABLE_ROWS"\n')
    psql.chmod(0o755)
    table = tmp_path / "table.jsonl"
    env = {**os.environ, **doc["env"], "TABLE_ROWS": str(table)}

    def run_step() -> subprocess.CompletedProcess:
        table.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows.values()))
        return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step["run"]], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)

    res = run_step()
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(rows)} rows of 69, 01, 38 reconcile with the stand-in's dataset" in res.stdout
    key = sorted(rows)[len(rows) // 3]
    rows[key]["etiquette_dpe"] = "A" if rows[key]["etiquette_dpe"] != "A" else "B"
    res = run_step()
    assert res.returncode == 1 and f"different: {key} (department {rows[key]['departement']})" in res.stderr, \
        res.stdout + res.stderr
