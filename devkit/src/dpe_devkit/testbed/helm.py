"""The helm binary of the project (v3.22.0): $HELM, else ``<cache>/bin/helm`` built from source.

No release download is reachable here, so helm is built with ``go install
helm.sh/helm/v3/cmd/helm@v3.22.0`` through the Go module proxy, with the link flags of helm's own
Makefile (version v3.22.0, and the Kubernetes version of its client-go as the default
``.Capabilities.KubeVersion`` — a plain ``go install`` says "v3.22" and v1.20.0).  The build goes to
a temporary directory and is renamed into place, so a helm in use is never half-written.
"""

from __future__ import annotations

import os

import shutil
import subprocess
import sys
import time
from pathlib import Path

from ._proc import LaunchError, cache_dir, file_lock, run
from .gotool import go_install

HELM_VERSION = "v3.22.0"
HELM_MODULE = "helm.sh/helm/v3"
# client-go v0.37.x -> Kubernetes 1.37, as computed by helm's Makefile (K8S_MODULES_VER)
K8S_MAJOR, K8S_MINOR = "1", "37"

def helm_version(helm: Path | str) -> str | None:
    """What ``helm version --template {{.Version}}`` prints (None when it does not run)."""
    try:
        res = subprocess.run([str(helm), "version", "--template", "{{.Version}}"], capture_output=True,
                             text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None

def _other_build_running() -> bool:
    """A ``go install helm.sh/helm…`` started by someone else (e.g. a colleague's shell) is running."""
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(cmd) > 2 and cmd[0].endswith(b"go") and cmd[1] == b"install" and \
                any(c.startswith(b"helm.sh/helm/v3/cmd/helm@") for c in cmd):
            return True
    return False

def _ldflags() -> str:
    pkg = HELM_MODULE
    return " ".join([
        "-w", "-s",
        f"-X {pkg}/internal/version.version={HELM_VERSION}",
        f"-X {pkg}/internal/version.gitTreeState=clean",
        f"-X {pkg}/pkg/lint/rules.k8sVersionMajor={K8S_MAJOR}",
        f"-X {pkg}/pkg/lint/rules.k8sVersionMinor={K8S_MINOR}",
        f"-X {pkg}/pkg/chartutil.k8sVersionMajor={K8S_MAJOR}",
        f"-X {pkg}/pkg/chartutil.k8sVersionMinor={K8S_MINOR}",
    ])

def build_helm(target: Path, quiet: bool = False) -> None:
    go_install("helm", f"{HELM_MODULE}/cmd/helm", HELM_VERSION, target, _ldflags(), helm_version, quiet)


def ensure_helm(quiet: bool = False) -> Path:
    """Path of a helm binary: $HELM when set (used as is), else ``<cache>/bin/helm`` v3.22.0."""
    user = os.environ.get("HELM", "").strip()
    if user:
        path = Path(user).expanduser()
        if not path.is_file() and shutil.which(user):
            path = Path(shutil.which(user))  # type: ignore[arg-type]
        if not path.is_file() or not os.access(path, os.X_OK):
            raise LaunchError(f"HELM={user!r} is not an executable file")
        return path
    target = cache_dir() / "bin" / "helm"
    if helm_version(target) == HELM_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # a build started by hand (not through this lock) is waited for rather than duplicated
    deadline = time.monotonic() + 3600
    told = False
    while _other_build_running():
        if not told:
            print("testbed: waiting for a running `go install helm.sh/helm/...` to finish", file=sys.stderr, flush=True)
            told = True
        if time.monotonic() > deadline:
            raise LaunchError("a `go install helm.sh/helm/...` has been running for an hour; giving up")
        time.sleep(2)
    with file_lock(cache_dir() / "helm.lock", f"building helm {HELM_VERSION}", wait_s=3600):
        have = helm_version(target)
        if have == HELM_VERSION:
            return target
        if have is not None and not quiet:
            print(f"testbed: {target} says {have!r}, not {HELM_VERSION}: rebuilding it with helm's release "
                  "link flags", flush=True)
        build_helm(target, quiet=quiet)
    return target

def helm_version_line(helm: Path) -> str:
    return run([helm, "version"], "helm version", timeout=60).strip()
