"""The test cluster: a real single-node Kubernetes (``dpe_devkit.testbed.cluster``), started once per
session on first use and torn down at the end.  A cluster that cannot start fails the tests that
need it, never skips them."""

from __future__ import annotations

import pytest

from dpe_devkit.testbed import LaunchError

_started: list[str] = []  # for the terminal summary: when and how fast the cluster came up, what tests report


def pytest_terminal_summary(terminalreporter):
    for line in _started:
        terminalreporter.write_line(line)


#: pytest-timeout's bound for a test on the node: the first one also starts the cluster (on a fresh
#: machine that builds and imports the test images first, minutes on 2 cores), and a module installs a
#: release and waits for its Jobs; every wait inside has its own bound, this one only catches a hang
CLUSTER_TEST_TIMEOUT_S = 1800


def pytest_collection_modifyitems(items):
    # the tests on the session's cluster last: it holds the node lock from its first use to the end of
    # the run, and test_cluster_cleanup.py starts clusters of its own (which wait for that lock)
    items[:] = sorted(items, key=lambda item: "cluster" in getattr(item, "fixturenames", ()))
    for item in items:
        if item.get_closest_marker("cluster") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(CLUSTER_TEST_TIMEOUT_S))


@pytest.fixture(scope="session")
def summary_line():
    """``summary_line(text)``: a line shown at the end of the run, even when the test passes (the
    in-progress state of the pipeline when a fault test deleted its pod)."""
    return _started.append


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    from dpe_devkit.testbed.cluster import Cluster

    c = Cluster(tmp_path_factory.mktemp("cluster"), quiet=False)
    try:
        c.start()
    except LaunchError as exc:
        pytest.fail(f"the test cluster did not start: {exc}", pytrace=False)
    _started.append(f"testbed: cluster ready in {c.timings.get('total', 0):.0f}s ({c.timings}); log {c.log_path}")
    yield c
    c.stop()
