"""Process and file helpers shared by the testbed servers (Kafka, PostgreSQL, helm).

Every server the testbed starts is a direct child of the Python process, in its own session (so a
Ctrl-C in the terminal reaches pytest, which then stops the servers in order) and, when started
from the main thread, with a Linux parent-death signal (so a server never outlives a Python process
that was killed outright).  The signal is tied to the *thread* that started the child, hence main
thread only: a server started from a worker thread would die with that thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

_PR_SET_PDEATHSIG = 1


class LaunchError(RuntimeError):
    """A testbed server or tool could not be fetched, built, started or stopped; the message says why."""


def repo_root() -> Path | None:
    """The source checkout this harness runs from (devkit/src/dpe_devkit/testbed/ in it), or None."""
    root = Path(__file__).resolve().parents[4]
    return root if (root / "pyproject.toml").is_file() and (root / "src" / "dpe_ingest").is_dir() else None


def cache_dir() -> Path:
    """Where downloads and builds live: $DPE_CACHE_DIR, else <repo>/.cache, else ~/.cache/dpe-ingest."""
    env = os.environ.get("DPE_CACHE_DIR", "").strip()
    if env:
        path = Path(env).expanduser()
    else:
        root = repo_root()
        path = root / ".cache" if root else Path.home() / ".cache" / "dpe-ingest"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()


@contextlib.contextmanager
def file_lock(path: Path, what: str = "", wait_s: float = 1800.0) -> Iterator[None]:
    """An exclusive flock on ``path`` (a fetch/build done by one process at a time)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        deadline = time.monotonic() + wait_s
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not told and what:
                    print(f"testbed: waiting for another process to finish {what} ({path})", file=sys.stderr)
                    told = True
                if time.monotonic() > deadline:
                    raise LaunchError(f"timed out after {wait_s:.0f}s waiting for the lock {path}") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now on ``host`` (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_bindable(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def wait_port_free(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while not port_bindable(port, host):
        if time.monotonic() > deadline:
            raise LaunchError(f"port {host}:{port} is still in use after {timeout:.0f}s")
        time.sleep(0.1)


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except Exception:  # noqa: BLE001 - not Linux: no safety net, the fixtures still stop servers
        pass


def use_pdeathsig() -> bool:
    """Whether children started now get a parent-death signal (only from the main thread)."""
    return threading.current_thread() is threading.main_thread() and sys.platform.startswith("linux")


def spawn(cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> subprocess.Popen:
    """Start ``cmd`` in its own session, stdout+stderr appended to ``log_path``, killed with us."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} start: {' '.join(map(str, cmd))}\n".encode())
        log.flush()
        return subprocess.Popen(
            [str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=env, cwd=cwd, start_new_session=True, close_fds=True,
            preexec_fn=_set_pdeathsig if use_pdeathsig() else None,
        )


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` to the process group of ``proc`` (its session: the server and its children)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def terminate(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """``sig`` to the group, wait up to ``timeout``, then SIGKILL the group; always reaps."""
    if proc is None:
        return
    if proc.poll() is None:
        signal_group(proc, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    kill(proc)


def kill(proc: subprocess.Popen | None) -> None:
    """SIGKILL the whole group of ``proc`` (a crash: no shutdown code runs) and reap it."""
    if proc is None:
        return
    signal_group(proc, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # children left by an already-dead leader
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def tail(path: Path, lines: int = 40) -> str:
    try:
        data = path.read_bytes()[-64 * 1024:]
    except OSError:
        return f"(no log at {path})"
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def run(cmd: Sequence[str], what: str, timeout: float = 600, env: dict[str, str] | None = None,
        cwd: Path | None = None, log_path: Path | None = None) -> str:
    """Run a short command; on failure raise LaunchError with its output."""
    try:
        res = subprocess.run([str(c) for c in cmd], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=timeout, env=env, cwd=cwd,
                             preexec_fn=_set_pdeathsig if use_pdeathsig() else None)
    except FileNotFoundError:
        raise LaunchError(f"{what}: command not found: {cmd[0]}") from None
    except subprocess.TimeoutExpired:
        raise LaunchError(f"{what}: {' '.join(map(str, cmd))} did not finish in {timeout:.0f}s") from None
    out = (res.stdout or "") + (res.stderr or "")
    if log_path is not None:
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(f"\n===== {' '.join(map(str, cmd))} -> {res.returncode}\n{out}")
    if res.returncode != 0:
        tail_ = "\n".join(out.strip().splitlines()[-30:])
        raise LaunchError(f"{what} failed (exit {res.returncode}): {' '.join(map(str, cmd))}\n{tail_}")
    return out


def place_built(built: Path, target: Path, what: str, got: str | None, want: str) -> None:
    """Move a binary just built into place (atomically), once it says the version expected."""
    if got != want:
        raise LaunchError(f"the {what} just built says {got!r}, expected {want}")
    os.replace(built, target)


class LocalServer:
    """The life cycle shared by the testbed's servers: ``start()`` (a no-op when running) launches the
    process and waits until it serves, killing it if it does not; ``stop()`` a clean shutdown
    (``stop_signal``, then SIGKILL), ``kill()`` a crash (SIGKILL), ``restart()`` both in turn,
    ``cleanup()`` what a test fixture calls at the end.  Subclasses give ``_launch`` and ``_wait_ready``."""

    stop_signal = signal.SIGTERM

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.start_seconds: float | None = None  # how long the last start() took
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.running else None

    def start(self, timeout: float = 60.0):
        with self._lock:
            if self.running:
                return self
            t0 = time.monotonic()
            self.proc = self._launch()
            try:
                self._wait_ready(t0 + timeout)
            except BaseException:
                kill(self.proc)
                raise
            self.start_seconds = time.monotonic() - t0
            return self

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            terminate(self.proc, self.stop_signal, timeout)
            self._exited()

    def kill(self) -> None:
        with self._lock:
            kill(self.proc)
            self._exited()

    def restart(self, timeout: float = 60.0):
        self.stop()
        return self.start(timeout)

    def cleanup(self) -> None:
        self.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()

    def _launch(self) -> subprocess.Popen:
        raise NotImplementedError

    def _wait_ready(self, deadline: float) -> None:
        raise NotImplementedError

    def _exited(self) -> None:
        """Called once the process has ended (stop or kill)."""


def maven_pom(artifact: str, version: str, about: str, dependencies: str) -> str:
    """A pom.xml (packaging ``pom``) whose only purpose is ``dependencies`` (their XML), for
    :func:`fetch_with_maven`; ``about`` says what its resolution is, in a comment."""
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<!-- generated by dpe_devkit.testbed: {about} -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dpe-ingest.bench</groupId>
  <artifactId>{artifact}</artifactId>
  <version>{version}</version>
  <packaging>pom</packaging>
  <dependencies>
{dependencies.strip(chr(10))}
  </dependencies>
</project>
"""


def fetch_with_maven(dest: Path, pom: str, what: str, required: Iterable[str], *,
                     mvn_args: Sequence[str] = ("-DincludeScope=runtime",),
                     unpack: Callable[[Path], None] | None = None, quiet: bool = False) -> Path:
    """``dest``, filled once from Maven Central: ``mvn dependency:copy-dependencies`` of ``pom`` (written
    beside ``dest``) into a temporary sibling, ``unpack(tmp)`` to rework it in place if given, then
    renamed to ``dest`` with a ``.complete`` marker once every path of ``required`` is there.  One
    process at a time (a lock beside ``dest``'s folder); the others wait and find it done."""
    required = tuple(required)

    def complete(d: Path) -> bool:
        return (d / ".complete").is_file() and all((d / r).exists() for r in required)

    if complete(dest):
        return dest
    home = dest.parent
    with file_lock(home.with_name(home.name + ".lock"), what):
        if complete(dest):
            return dest
        mvn = shutil.which("mvn")
        if not mvn:
            raise LaunchError(f"mvn (Apache Maven) is needed once for {what} from Maven Central: "
                              "apt-get install -y maven (scripts/test does it)")
        home.mkdir(parents=True, exist_ok=True)
        (home / "pom.xml").write_text(pom)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        if not quiet:
            print(f"testbed: {what} from Maven Central into {dest}", flush=True)
        run([mvn, "-q", "-B", "-f", home / "pom.xml", "dependency:copy-dependencies", f"-DoutputDirectory={tmp}",
             *mvn_args], f"{what} with Maven", timeout=1800, log_path=home / "mvn.log")
        if unpack is not None:
            unpack(tmp)
        missing = [r for r in required if not (tmp / r).exists()]
        if missing:
            raise LaunchError(f"mvn finished but {tmp} has no {', '.join(missing)} (log: {home / 'mvn.log'})")
        (tmp / ".complete").write_text(what + "\n")
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest
