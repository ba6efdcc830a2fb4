"""The chart's department codes are src/dpe_ingest/departments.py's (issue 21).

The product's module is the one source (ALL_CODES, VALID_FORMS, normalize).  The chart cannot import
it, so _helpers.tpl holds its only transcription: "dpe-ingest.departmentPattern" and
"dpe-ingest.department.canonical" (values.schema.json checks types only).  These tests render that
helper for every code of up to three characters over the characters codes are made of, for numbers
(as a values file and as --set types them) and for edge cases, and compare each answer with
departments.normalize: any difference fails, naming the codes.  A counter-test shows that a chart
pattern one overseas code short is caught.  Then a table of codes goes through the real chart
(`helm template --set-string departments=…`) with its error message against VALID_FORMS.
"""

from __future__ import annotations

import itertools
import json
import shutil

import pytest

from chartlib import CHART, producer_jobs
from dpe_ingest import departments

#: the characters department codes are made of, near misses (C, E) and a blank
ALPHABET = "0123456789ABCEab "
EDGE_TEXTS = ["", "none", "NONE", "None", " nOnE ", "non", "nonee", "none1", "0none", "2a ", " 69", "6 9",
              "0069", "069", "0975", "9750", "1000", "-1", "+1", "1.0", "69.0", "2A2", "A2", "\t01\n",
              "\u0663", "\uff11", "2\uff21", "nOne\u00a0"]
NUMBERS = list(range(-2, 1002)) + [1.0, 69.0, 975.0, 1.5, 1e3, 1e20, -1.0]
SET_INTEGERS = [0, 1, 9, 10, 19, 20, 21, 69, 95, 96, 100, 970, 971, 975, 977, 978, 979, 987, 988, 989, 1000]


def _python(raw) -> str:
    try:
        return departments.normalize(raw)
    except departments.InvalidDepartment:
        return ""


def _probe_chart(tmp_path, helpers: str | None = None):
    """A throw-away chart holding the real _helpers.tpl (or ``helpers``) and one ConfigMap listing, for
    each value of .Values.probe, what "dpe-ingest.department.canonical" makes of it ("" = refused), and
    what "dpe-ingest.departments" makes of .Values.departments."""
    chart = tmp_path / "probe"
    (chart / "templates").mkdir(parents=True, exist_ok=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: probe\nversion: 0.0.1\n")
    if helpers is None:
        shutil.copy(CHART / "templates" / "_helpers.tpl", chart / "templates" / "_helpers.tpl")
    else:
        (chart / "templates" / "_helpers.tpl").write_text(helpers)
    (chart / "templates" / "probe.yaml").write_text(
        "{{- $out := list -}}\n"
        "{{- range .Values.probe }}{{ $out = append $out (include \"dpe-ingest.department.canonical\" .) }}{{ end -}}\n"
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: probe}\ndata:\n"
        "  codes: {{ toJson $out | quote }}\n"
        "  {{- if .Values.departments }}\n"
        "  departments: {{ include \"dpe-ingest.departments\" . | quote }}\n"
        "  {{- end }}\n")
    return chart


def _chart_answers(render, chart, tmp_path, probe: list, how: str = "file") -> list[str]:
    if how == "file":
        values = tmp_path / "probe-values.json"
        values.write_text(json.dumps({"probe": probe}))  # JSON is YAML; numbers reach the chart as float64
        (doc,) = render.template(chart=chart, values_files=[values])
    else:  # --set types integers as int64
        (doc,) = render.template(chart=chart, sets={"probe": "{" + ",".join(str(p) for p in probe) + "}"})
    answers = json.loads(doc["data"]["codes"])
    assert len(answers) == len(probe)
    return answers


def _divergences(render, tmp_path, helpers: str | None = None) -> list[tuple]:
    """Every probe value on which the chart and departments.normalize disagree:
    (value, how it reached the chart, the chart's answer, departments.py's answer)."""
    chart = _probe_chart(tmp_path, helpers)
    texts = ["".join(p) for n in (1, 2, 3) for p in itertools.product(ALPHABET, repeat=n)] + EDGE_TEXTS
    out = []
    for how, probe in (("file", texts + NUMBERS), ("set", SET_INTEGERS)):
        for raw, got in zip(probe, _chart_answers(render, chart, tmp_path, probe, how)):
            if got != _python(raw):
                out.append((raw, how, got, _python(raw)))
    return out


def test_chart_accepts_exactly_the_codes_of_departments_py(render, tmp_path):
    assert len(ALPHABET) ** 3 > 4000  # every code of up to three characters is among the texts
    assert _divergences(render, tmp_path) == []
    # and the probe does reach every code: each canonical code answered for its own text
    chart = _probe_chart(tmp_path)
    assert _chart_answers(render, chart, tmp_path, list(departments.ALL_CODES)) == list(departments.ALL_CODES)


def test_a_pattern_one_code_short_is_caught(render, tmp_path):
    """Counter-test: a chart that forgot Saint-Barthélemy and Saint-Martin (97[1-6]) diverges on them."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    assert helpers.count("97[1-8]") == 1
    found = _divergences(render, tmp_path, helpers.replace("97[1-8]", "97[1-6]"))
    assert {python for _, _, _, python in found} == {"977", "978"}, found
    assert ("977", "file", "", "977") in found and (978, "set", "", "978") in found, found


@pytest.mark.parametrize("raw", ["69,01,38", "69 01 38", "69;01", " 69 , 1 ,2a ", "69,69,1,01,2A,2a", "none,NONE,975",
                                 "971 972 973 974 975 976 977 978 988"])
def test_department_lists_parse_like_parse_list(render, tmp_path, raw):
    chart = _probe_chart(tmp_path)
    (doc,) = render.template(chart=chart, set_strings={"departments": raw.replace(",", "\\,")},
                             sets={"probe": "{}"})
    assert json.loads(doc["data"]["departments"]) == departments.parse_list(raw)


VALID = ["01", "1", "2", "09", "19", "2A", "2a", "2B", "2b", "21", "69", "95", "971", "972", "973", "974", "975", "976",
         "977", "978", "988", "none", "NONE"]
INVALID = ["00", "0", "20", "96", "99", "100", "970", "979", "987", "989", "2C", "3A", "6a", "A", "nan", "1.5"]


@pytest.mark.parametrize("code", VALID + INVALID)
def test_the_chart_on_a_table_of_codes(render, code):
    if _python(code):
        jobs = producer_jobs(render.template(set_strings={"departments": code}))
        assert list(jobs) == [departments.normalize(code)]
    else:
        err = render.template_error(set_strings={"departments": code})
        assert f'invalid department code "{code}"' in err, err
        assert f"valid forms are {departments.VALID_FORMS}" in err, err


def test_the_schema_and_docs_name_the_same_forms():
    """The schema's descriptions and docs/chart.md repeat the valid forms for readers: the same as VALID_FORMS."""
    forms = departments.VALID_FORMS.split(", none")[0]  # 01..19, 2A, 2B, 21..95, 971..978, 988
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["departments"]
    assert forms in schema["description"] and forms in schema["items"]["description"]
    assert "pattern" not in schema and "pattern" not in schema["items"]  # no third copy of the codes
    docs = (CHART.parents[1] / "docs" / "chart.md").read_text()
    assert f"valid forms are {forms}, none" in docs
