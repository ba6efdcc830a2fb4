"""actionlint (the linter of GitHub Actions workflows) for the tests: $ACTIONLINT, else
``<cache>/bin/actionlint`` v1.7.12 built from source.

Like helm (:mod:`.helm`), it is built once with ``go install
github.com/rhysd/actionlint/cmd/actionlint@v1.7.12`` through the Go module proxy (no release
download is reachable here) into a temporary directory, then moved into place once it says the
version expected.  ``actionlint -version`` prints the module version recorded in the build info.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from ._proc import LaunchError, cache_dir, file_lock
from .gotool import go_install

ACTIONLINT_VERSION = "v1.7.12"  # the newest 1.7 the Go module proxy serves (go list -m -versions)
ACTIONLINT_MODULE = "github.com/rhysd/actionlint"


def actionlint_version(binary: Path | str) -> str | None:
    """The first line of ``actionlint -version`` (None when it does not run)."""
    try:
        res = subprocess.run([str(binary), "-version"], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = res.stdout.strip().splitlines()
    return lines[0].strip() if res.returncode == 0 and lines else None


def build_actionlint(target: Path, quiet: bool = False) -> None:
    # its go.mod asks for Go 1.25: an older go switches through the proxy (go_env: GOTOOLCHAIN=auto)
    go_install("actionlint", f"{ACTIONLINT_MODULE}/cmd/actionlint", ACTIONLINT_VERSION, target, "-s -w",
               actionlint_version, quiet)


def ensure_actionlint(quiet: bool = False) -> Path:
    """Path of an actionlint binary: $ACTIONLINT when set (used as is), else ``<cache>/bin/actionlint``
    at ACTIONLINT_VERSION, built when missing or of another version."""
    user = os.environ.get("ACTIONLINT", "").strip()
    if user:
        path = Path(user).expanduser()
        if not path.is_file() and shutil.which(user):
            path = Path(shutil.which(user))  # type: ignore[arg-type]
        if not path.is_file() or not os.access(path, os.X_OK):
            raise LaunchError(f"ACTIONLINT={user!r} is not an executable file")
        return path
    target = cache_dir() / "bin" / "actionlint"
    if actionlint_version(target) == ACTIONLINT_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir() / "actionlint.lock", f"building actionlint {ACTIONLINT_VERSION}", wait_s=3600):
        if actionlint_version(target) != ACTIONLINT_VERSION:
            build_actionlint(target, quiet=quiet)
    return target
