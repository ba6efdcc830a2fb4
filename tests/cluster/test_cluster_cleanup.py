"""The test cluster leaves nothing behind: not after ``stop()``, and not after its owner was killed
(SIGKILL: no ``stop()`` at all), once the next start has swept what the dead owner left.

What its components write outside the work directory: the node's network namespace (with its
iptables rules and sysctls), mounts (volumes, the pods' network namespaces, container root
filesystems), ``/var/log/containers`` links, the pods' cgroups, the kernel settings the kubelet
changes, and running containers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dpe_devkit.testbed.cluster import KUBELET_ROOTS
from dpe_devkit.testbed.images import CLUSTER_IMAGES

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


def _sysctls_before_a_start() -> dict[str, str]:
    """The kernel settings a start begins from: what a dead cluster of an earlier run left (a machine
    reused after a killed run keeps /run/dpe-testbed and its kubelet's settings) is swept first, as
    the start itself would."""
    from dpe_devkit.testbed.cluster import sweep_dead_clusters

    sweep_dead_clusters()
    return _sysctls()


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

    before = _sysctls_before_a_start()
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


def test_cluster_up_by_hand_serves_kubectl_loads_images_and_ctrl_c_leaves_nothing(tmp_path):
    """``dpe-ingest testbed cluster up`` as a contributor runs it: the lines it prints, pasted into a
    shell, reach the cluster (kubectl runs a pod of our image); ``cluster load`` finds the running
    cluster and loads the images; Ctrl-C (SIGINT to its process group, as a terminal sends it) stops
    it, exit 0, and ``stop()`` has left nothing behind.  (This is the suite's one start of a cluster
    through ``Cluster``'s context-free path: start, then stop from a signal.)"""
    before = _sysctls_before_a_start()
    workdir = tmp_path / "cluster"
    up = subprocess.Popen([sys.executable, "-m", "dpe_ingest", "testbed", "cluster", "up", "--workdir", str(workdir)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out: list[str] = []
    try:
        for line in up.stdout:  # until the last line of the how-to (or the end: a failed start)
            out.append(line)
            if line.startswith("# kubectl logs"):
                break
        text = "".join(out)
        assert up.poll() is None, f"cluster up exited {up.returncode}:\n{text[-3000:]}"
        exports = [line for line in out if line.startswith("export ")]
        assert exports == [f"export KUBECONFIG={workdir / 'kubeconfig'}\n", exports[1]], text[-3000:]
        netns = re.search(r"network namespace (dpe-\S+) ", text).group(1)
        assert "helm install dpe charts/dpe-ingest -f charts/dpe-ingest/values-offline.yaml" in text, text[-3000:]
        # the printed lines, pasted in a shell as they are, reach the cluster and run our image
        shell = "".join(exports) + (
            "set -e\n"
            "kubectl get nodes -o name\n"
            f"kubectl run hello --image={CLUSTER_IMAGES['producer']} --image-pull-policy=Never --restart=Never "
            "--command -- python -c 'print(\"hello\")' >/dev/null\n"
            "kubectl wait --for=jsonpath='{.status.phase}'=Succeeded pod/hello --timeout=180s >/dev/null\n"
            "kubectl logs hello\n")
        cp = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"})
        assert cp.returncode == 0, cp.stderr
        assert cp.stdout.split() == ["node/dpe-node", "hello"], cp.stdout
        # cluster load: finds the one cluster running here and imports every image into its node
        load = subprocess.run([sys.executable, "-m", "dpe_ingest", "testbed", "cluster", "load"],
                              capture_output=True, text=True, timeout=900)
        assert load.returncode == 0 and f"into {workdir}" in load.stderr, load.stderr[-3000:]
        assert all(tag in load.stderr for tag in CLUSTER_IMAGES.values()), load.stderr[-3000:]
        assert leftovers(workdir, netns), "the cluster is running: its namespace, mounts, processes"
        os.killpg(up.pid, signal.SIGINT)
        rest = up.communicate(timeout=180)[0]
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait(30)
    assert up.returncode == 0, rest[-3000:]
    assert rest.rstrip().endswith("testbed cluster: stopped, nothing left behind"), rest[-3000:]
    assert not leftovers(workdir, netns), leftovers(workdir, netns)
    assert _sysctls() == before
