"""Chart test helpers (imported by the test modules; fixtures are in conftest.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterable

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dpe-ingest"
FALLBACK_HELM = ROOT / ".cache" / "bin" / "helm"
# Kubernetes version whose schemas validate the rendered objects: the one of current kind node images.
KUBE_VERSION = "1.34.0"


def _args(sets: dict | None, set_strings: dict | None, values_files: Iterable[Path | str] | None, extra: Iterable[str]):
    args: list[str] = []
    for f in values_files or ():
        args += ["-f", str(f)]
    for k, v in (sets or {}).items():
        args += ["--set", f"{k}={v}"]
    for k, v in (set_strings or {}).items():
        args += ["--set-string", f"{k}={v}"]
    return args + list(extra)


class Renderer:
    def __init__(self, helm: str):
        self.helm = helm

    def run(self, *args: str, chart: Path = CHART) -> subprocess.CompletedProcess:
        return subprocess.run([self.helm, *args], capture_output=True, text=True, timeout=120, cwd=chart.parent)

    def template(self, sets: dict | None = None, set_strings: dict | None = None, values_files=None,
                 extra: Iterable[str] = (), release: str = "dpe", namespace: str = "dpe",
                 chart: Path = CHART) -> list[dict]:
        proc = self.run("template", release, str(chart), "--namespace", namespace,
                        *_args(sets, set_strings, values_files, extra), chart=chart)
        assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
        return [d for d in yaml.safe_load_all(proc.stdout) if d]

    def template_error(self, sets: dict | None = None, set_strings: dict | None = None, values_files=None,
                       extra: Iterable[str] = (), chart: Path = CHART) -> str:
        proc = self.run("template", "dpe", str(chart), *_args(sets, set_strings, values_files, extra), chart=chart)
        assert proc.returncode != 0, f"helm template should have failed, rendered:\n{proc.stdout[:2000]}"
        return proc.stderr

    def lint(self, sets: dict | None = None, set_strings: dict | None = None, values_files=None) -> subprocess.CompletedProcess:
        return self.run("lint", "--strict", str(CHART), *_args(sets, set_strings, values_files, ()))


# ------------------------------------------------------------------------------- object helpers
def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d.get("kind") == kind]


def named(docs: list[dict], kind: str, name: str) -> dict:
    for d in by_kind(docs, kind):
        if d["metadata"]["name"] == name:
            return d
    raise AssertionError(f"no {kind} named {name}: {[d['metadata']['name'] for d in by_kind(docs, kind)]}")


def producer_jobs(docs: list[dict]) -> dict[str, dict]:
    """department code -> its producer Job."""
    jobs = [d for d in by_kind(docs, "Job") if d["metadata"]["labels"].get("app.kubernetes.io/component") == "producer"]
    out = {j["metadata"]["labels"]["dpe-ingest/department"]: j for j in jobs}
    assert len(out) == len(jobs), "two producer Jobs for one department"
    return out


def pod_spec(doc: dict) -> dict | None:
    kind = doc.get("kind")
    if kind == "Pod":
        return doc["spec"]
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return doc["spec"]["template"]["spec"]
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return None


def container(doc: dict, name: str | None = None) -> dict:
    spec = pod_spec(doc)
    assert spec is not None
    if name is None:
        return spec["containers"][0]
    return next(c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name)


def env_of(c: dict) -> dict[str, object]:
    """name -> value (a string) or valueFrom (a dict)."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def render_notes(render: Renderer, workdir: Path, **kw) -> str:
    """NOTES.txt as helm would print it, rendered through a copy of the chart where it is wrapped in a
    ConfigMap (``helm template`` does not render NOTES)."""
    import shutil

    copy = workdir / "dpe-ingest"
    shutil.copytree(CHART, copy)
    (copy / "notes.tpl").write_text((copy / "templates" / "NOTES.txt").read_text())
    (copy / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.tpl") . | quote }}\n'
    )
    docs = render.template(chart=copy, extra=["--show-only", "templates/zz-notes.yaml"], **kw)
    return docs[0]["data"]["notes"]
