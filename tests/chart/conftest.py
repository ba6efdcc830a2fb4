"""Fixtures of the chart tests: the helm binary and a renderer of charts/dpe-ingest."""

from __future__ import annotations

import shutil

import pytest

from chartlib import FALLBACK_HELM, Renderer


@pytest.fixture(scope="session")
def helm(request) -> str:
    """The helm binary: the testbed's ``helm_bin`` fixture when there is one, else .cache/bin/helm."""
    try:
        return str(request.getfixturevalue("helm_bin"))
    except pytest.FixtureLookupError:
        pass
    if FALLBACK_HELM.exists():
        return str(FALLBACK_HELM)
    found = shutil.which("helm")
    if found:
        return found
    pytest.fail(f"no helm binary: build it to {FALLBACK_HELM} (go install helm.sh/helm/v3/cmd/helm@v3.22.0)")


@pytest.fixture(scope="session")
def render(helm) -> Renderer:
    return Renderer(helm)
