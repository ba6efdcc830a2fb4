"""The test cluster leaves nothing behind: not after ``stop()``, and not after its owner was killed
(SIGKILL: no ``stop()`` at all), once the next start has swept what the dead owner left.

What its components write outside the work directory: the node's network namespace (with its
iptables rules and sysctls), mounts (volumes, the pods' network namespaces, container root
filesystems), ``/var/log/containers`` links, the pods' cgroups, the kernel settings the kubelet
changes, and running containers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpe_devkit.testbed.cluster import KUBELET_ROOTS

pytestmark = pytest.mark.cluster

SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops")

OWNER = """
import sys, time
from pathlib import Path
from dpe_devkit.testbed.cluster import Cluster
from dpe_devkit.testbed.images import CLUSTER_IMAGES
c = Cluster(Path(sys.argv[1]))
c.start()
c.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "sleeper", "namespace": "default"},
          "spec": {"containers": [{"name": "main", "image": CLUSTER_IMAGES["producer"], "imagePullPolicy": "Never",
                                   "command": ["sleep", "3600"]}]}}])
while c.kubectl("get", "pod", "sleeper", "-o", "jsonpath={.status.phase}").stdout != "Running":
    time.sleep(0.5)
print("READY", c.netns, flush=True)
time.sleep(3600)
"""


def _sysctls() -> dict[str, str]:
    return {k: Path("/proc/sys", k).read_text().strip() for k in SYSCTLS}


def leftovers(workdir: Path, netns: str) -> list[str]:
    found = []
    if netns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout:
        found.append(f"network namespace {netns}")
    prefix = str(workdir) + "/"
    kubelet_root = KUBELET_ROOTS / netns  # (outside the work directory: its sockets need a short path)
    with open("/proc/self/mountinfo") as fh:
        mounts = [line.split()[4] for line in fh
                  if line.split()[4].startswith((prefix, str(kubelet_root) + "/"))]
    found += [f"mount {m}" for m in mounts]
    if kubelet_root.exists():
        found.append(f"kubelet root {kubelet_root}")
    logs = Path("/var/log/containers")
    if logs.is_dir():
        found += [f"link {p}" for p in logs.iterdir() if p.is_symlink() and os.readlink(p).startswith(prefix)]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob("*/kubepods*")]
    found += [f"process {p}" for p in os.listdir("/proc") if p.isdigit() and _mentions(p, str(workdir))]
    if Path("/etc/netns", netns).exists():
        found.append(f"/etc/netns/{netns}")
    return found


def _mentions(pid: str, text: str) -> bool:
    try:
        return text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_a_killed_owner_is_cleaned_up_by_the_next_start(tmp_path):
    from dpe_devkit.testbed.cluster import sweep_dead_clusters

    before = _sysctls()
    workdir = tmp_path / "cluster"
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(workdir)], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        line = owner.stdout.readline()
        assert line.startswith("READY"), f"the cluster did not start: {line!r}; log {workdir / 'cluster.log'}"
        netns = line.split()[1]
        assert any("containerd-shim" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
                   for p in os.listdir("/proc") if p.isdigit() and _mentions(p, str(workdir))), \
            "no container was running"
    finally:
        os.killpg(owner.pid, signal.SIGKILL)
        owner.wait(30)
    time.sleep(1)
    assert leftovers(workdir, netns), "a SIGKILLed owner should have left something behind to sweep"
    assert netns in sweep_dead_clusters()
    deadline = time.monotonic() + 30
    while (left := leftovers(workdir, netns)) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, left
    assert _sysctls() == before


def test_stop_leaves_nothing(tmp_path):
    from dpe_devkit.testbed.cluster import Cluster
    from dpe_devkit.testbed.images import CLUSTER_IMAGES

    before = _sysctls()
    with Cluster(tmp_path / "cluster") as c:
        out = c.run_pod("default", "hello", CLUSTER_IMAGES["producer"], ["python", "-c", "print('hello')"])
        assert out.strip() == "hello"
        netns, workdir = c.netns, c.workdir
    assert not leftovers(workdir, netns), leftovers(workdir, netns)
    assert _sysctls() == before
