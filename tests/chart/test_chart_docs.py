"""docs/chart.md documents the chart's values and its NOTES match what the chart renders."""

from __future__ import annotations

import re

import yaml

from chartlib import CHART, ROOT

# per-component keys, documented once as `<component>.…` in docs/chart.md
GENERIC = {"resources", "podSecurityContext", "containerSecurityContext", "nodeSelector", "tolerations", "affinity",
           "topologySpreadConstraints", "priorityClassName", "podAnnotations", "extraEnv", "extraVolumes",
           "extraVolumeMounts", "serviceAccount"}


def _documented_keys(text: str) -> set[str]:
    keys = set(re.findall(r"`([A-Za-z][\w.]*)`", text))
    for prefix, names in re.findall(r"`([\w.]+)\.\{([\w,]+)\}`", text):
        keys |= {f"{prefix}.{n}" for n in names.split(",")}
    for prefix in re.findall(r"`([\w.]+)\.\*`", text):
        keys.add(prefix + ".*")
    return keys


def test_every_value_is_documented():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = _documented_keys((ROOT / "docs" / "chart.md").read_text())
    missing = []
    for top, sub in values.items():
        if not isinstance(sub, dict) or not sub or top in ("commonLabels",):
            if top not in documented and not any(d.startswith(top + ".") for d in documented):
                missing.append(top)
            continue
        for key in sub:
            path = f"{top}.{key}"
            if key in GENERIC:
                continue
            if path in documented or f"{path}.*" in documented:
                continue
            if key == "image" and (f"{top}.image.*" in documented or f"{top}.image.repository" in documented):
                continue
            if any(d.startswith(path + ".") for d in documented):
                continue
            missing.append(path)
    assert not missing, f"values not in docs/chart.md: {missing}"


def test_docs_image_tags_match_values():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    text = (ROOT / "docs" / "chart.md").read_text()
    for comp in ("kafka", "postgresql", "kafdrop"):
        img = values[comp]["image"]
        assert f"{img['repository']}:{img['tag']}" in text, comp
