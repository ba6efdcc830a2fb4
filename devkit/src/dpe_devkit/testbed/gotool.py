"""The Go toolchain the testbed builds its tools with (helm, actionlint, the Kubernetes parts).

``find_go()`` finds a go command (Go >= 1.21 switches itself to the toolchain a module asks for,
through the module proxy; an older one first downloads the ``golang.org/toolchain`` module).
``go_env()`` is the environment of every build: modules in ``<cache>/go`` (per clone), the build
cache where Go keeps it by default (``$GOCACHE``, else ``~/.cache/go-build``: shared by every clone on
the machine, so a fresh clone links the Kubernetes binaries instead of compiling them again), no cgo.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from ._proc import LaunchError, cache_dir, place_built, run

GO_TOOLCHAIN = "go1.26.8"  # helm v3.22.0's go.mod says go 1.26.0


def go_version(go: str) -> tuple[int, int]:
    try:
        out = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, GOTOOLCHAIN="local")).stdout
    except (OSError, subprocess.TimeoutExpired):
        return (0, 0)
    m = re.match(r"go(\d+)\.(\d+)", out.strip())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def find_go() -> str:
    """A go command able to build our tools: Go >= 1.21 switches itself to the toolchain helm needs
    (GOTOOLCHAIN=auto, through the module proxy); an older one (Debian 12's 1.19) first downloads
    the ``golang.org/toolchain`` module of GO_TOOLCHAIN (a Go module like any other) and uses it."""
    go = shutil.which("go") or next((p for p in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go")
                                     if os.access(p, os.X_OK)), None)
    if not go:
        raise LaunchError("no Go toolchain was found to build the testbed's tools (helm, actionlint, the "
                          "test cluster): apt-get install -y golang-go (scripts/test does it)")
    if go_version(go) >= (1, 21):
        return go
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)
    mod = f"golang.org/toolchain@v0.0.1-{GO_TOOLCHAIN}.linux-{arch}"
    tmp = Path(tempfile.mkdtemp(prefix="go-bootstrap."))
    try:
        out = run([go, "mod", "download", "-json", mod], f"downloading the Go toolchain module {mod}",
                  timeout=1800, cwd=tmp, env=dict(os.environ, GOPATH=str(cache_dir() / "go"), GO111MODULE="on",
                                                  GOFLAGS="-modcacherw"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    m = re.search(r'"Dir":\s*"([^"]+)"', out)
    new_go = Path(m.group(1)) / "bin" / "go" if m else None
    if new_go is None or not new_go.is_file():
        raise LaunchError(f"go mod download {mod} gave no toolchain (output: {out[-500:]})")
    new_go.chmod(0o755)
    return str(new_go)


def go_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, GOPATH=str(cache_dir() / "go"), GOFLAGS="-modcacherw", CGO_ENABLED="0")
    env.update(extra)
    env.setdefault("GOTOOLCHAIN", "auto")  # Debian's go.env says local: allow the switch a module asks for
    return env


def go_install(name: str, package: str, version: str, target: Path, ldflags: str,
               version_of: Callable[[Path], str | None], quiet: bool = False) -> None:
    """``go install package@version`` into a temporary GOBIN, then moved to ``target`` once the binary
    says ``version`` (a binary in use is never half-written)."""
    go = find_go()
    log = cache_dir() / f"{name}-build.log"
    tmp_bin = Path(tempfile.mkdtemp(prefix=f"{name}-bin.", dir=target.parent))
    if not quiet:
        print(f"testbed: building {name} {version} with {go} (go install, Go module proxy) -> {target}; log {log}",
              flush=True)
    t0 = time.monotonic()
    try:
        run([go, "install", "-trimpath", f"-ldflags={ldflags}", f"{package}@{version}"],
            f"building {name} {version}", timeout=3600, env=go_env(GOBIN=str(tmp_bin)), log_path=log)
        built = tmp_bin / name
        place_built(built, target, name, version_of(built), version)
    finally:
        shutil.rmtree(tmp_bin, ignore_errors=True)
    if not quiet:
        print(f"testbed: {name} {version} built in {time.monotonic() - t0:.0f}s", flush=True)
