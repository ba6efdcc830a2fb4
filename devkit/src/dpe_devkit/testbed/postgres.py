"""A real PostgreSQL server for the bench (the machine's own binaries, e.g. Debian's PostgreSQL 15).

``initdb`` runs once per PostgreSQL version into a cached template (``<cache>/pg-template-<major>``,
with role ``dpe`` / password ``dpe`` and database ``dpe``); each server copies it.  The server listens
on 127.0.0.1 only (password auth, scram-sha-256) with its unix socket next to its data.  fsync stays
on: the consumer tests kill PostgreSQL and expect committed rows to survive.

PostgreSQL refuses to run as root: as root the server runs as an unprivileged user (``postgres`` if
the Debian package created it, else a ``dpebench`` system user, else ``nobody``) via ``setpriv``,
with its data in a private directory under /tmp (pytest's tmp dirs are not reachable for other users).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ._proc import (LaunchError, LocalServer, cache_dir, file_lock, free_port, run, spawn, tail,
                    use_pdeathsig, wait_port_free)

USER = "dpe"
PASSWORD = "dpe"
DATABASE = "dpe"


# ----------------------------------------------------------------------------------------------
# Binaries and the user to run as
# ----------------------------------------------------------------------------------------------
def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", path)) or (0,)


def find_bindir() -> Path:
    """Directory of initdb/postgres: $PG_BINDIR, newest /usr/lib/postgresql/*/bin, ``pg_config --bindir``, PATH."""
    cands: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        cands.append(Path(os.environ["PG_BINDIR"]))
    cands += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)]
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=30).stdout
            cands.append(Path(out.strip()))
        except (OSError, subprocess.TimeoutExpired):
            pass
    if shutil.which("initdb"):
        cands.append(Path(shutil.which("initdb")).parent)  # type: ignore[arg-type]
    for c in cands:
        if (c / "initdb").is_file() and (c / "postgres").is_file():
            return c
    raise LaunchError("PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin, "
                     "pg_config --bindir or PATH: apt-get install -y postgresql (scripts/test does it), "
                     "or set PG_BINDIR")


def server_major(bindir: Path) -> str:
    out = run([bindir / "postgres", "--version"], "postgres --version", timeout=30)
    m = re.search(r"(\d+)(?:\.\d+)?", out)
    return m.group(1) if m else "unknown"


_run_as_cache: pwd.struct_passwd | None = None


def run_as_user() -> pwd.struct_passwd | None:
    """The unprivileged account PostgreSQL runs as when we are root (None when not root)."""
    global _run_as_cache
    if os.geteuid() != 0:
        return None
    if _run_as_cache:
        return _run_as_cache
    forced = os.environ.get("DPE_BENCH_PG_USER")
    names = [forced] if forced else ["postgres", "dpebench"]
    for name in names:
        try:
            _run_as_cache = pwd.getpwnam(name)
            return _run_as_cache
        except KeyError:
            continue
    if not forced and shutil.which("useradd"):
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "dpebench"],
                       capture_output=True, timeout=60)
        try:
            _run_as_cache = pwd.getpwnam("dpebench")
            return _run_as_cache
        except KeyError:
            pass
    try:
        _run_as_cache = pwd.getpwnam("nobody")
        return _run_as_cache
    except KeyError:
        raise LaunchError("running as root and no unprivileged user to run PostgreSQL as "
                         "(no postgres, dpebench or nobody account)") from None


def _as_user(cmd: list) -> list:
    user = run_as_user()
    if user is None:
        return [str(c) for c in cmd]
    if not shutil.which("setpriv"):
        raise LaunchError("running as root: setpriv (util-linux) is needed to run PostgreSQL as "
                         f"{user.pw_name}")
    death = ["--pdeathsig=KILL"] if use_pdeathsig() else []  # setuid clears the one set before
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", *death,
            "--"] + [str(c) for c in cmd]


def _chown_tree(path: Path) -> None:
    user = run_as_user()
    if user is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, user.pw_uid, user.pw_gid)
        for name in dirs + files:
            os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C", TZ="UTC")
    return env


# ----------------------------------------------------------------------------------------------
# Template cluster (initdb once)
# ----------------------------------------------------------------------------------------------
def ensure_template(bindir: Path | None = None) -> Path:
    """A cached, stopped cluster with role/database ``dpe``: initdb once, then copied by every server."""
    bindir = bindir or find_bindir()
    major = server_major(bindir)
    tpl = cache_dir() / f"pg-template-{major}"
    if (tpl / "PG_VERSION").is_file() and (tpl / ".complete").is_file():
        return tpl
    with file_lock(cache_dir() / f"pg-template-{major}.lock", "creating the PostgreSQL template"):
        if (tpl / ".complete").is_file():
            return tpl
        work = Path(tempfile.mkdtemp(prefix="dpe-pg-initdb-"))
        try:
            os.chmod(work, 0o755)
            data = work / "data"
            pwfile = work / "pw"
            pwfile.write_text(PASSWORD + "\n")
            os.chmod(pwfile, 0o644)
            _chown_tree(work)
            log = cache_dir() / f"pg-template-{major}.log"
            run(_as_user([bindir / "initdb", "-D", data, "-U", USER, f"--pwfile={pwfile}", "-E", "UTF8",
                          "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync"]),
                "initdb", timeout=300, env=_child_env(), cwd=work, log_path=log)
            # the database dpe, created in single-user mode (no server, no port needed)
            res = subprocess.run(_as_user([bindir / "postgres", "--single", "-D", data, "-j", "template1"]),
                                 input=f"CREATE DATABASE {DATABASE} OWNER {USER};\n", capture_output=True,
                                 text=True, timeout=300, env=_child_env(), cwd=work)
            with open(log, "a") as fh:
                fh.write(res.stdout + res.stderr)
            if res.returncode != 0 or "ERROR" in res.stdout + res.stderr:
                raise LaunchError(f"creating database {DATABASE} in single-user mode failed:\n{res.stdout}{res.stderr}")
            (data / ".complete").write_text(major + "\n")
            shutil.rmtree(tpl, ignore_errors=True)
            shutil.copytree(data, tpl, symlinks=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return tpl


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _sweep_orphan_homes() -> None:
    """Delete the /tmp/dpe-pg-* dirs of Python processes that died without cleaning up (SIGKILL)."""
    for home in Path(tempfile.gettempdir()).glob("dpe-pg-*"):
        try:
            owner = int((home / "owner.pid").read_text().split()[0])
            if _alive(owner):
                continue
            pm = home / "data" / "postmaster.pid"
            if pm.is_file() and _alive(int(pm.read_text().split()[0])):
                continue
        except (OSError, ValueError, IndexError):
            continue
        shutil.rmtree(home, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The server
# ----------------------------------------------------------------------------------------------
class PostgresServer(LocalServer):
    """A PostgreSQL server on 127.0.0.1:``port``; ``url`` = postgresql://dpe:dpe@127.0.0.1:PORT/dpe.

    ``stop()`` is a fast shutdown (SIGINT: clients are disconnected, then a checkpoint), ``kill()``
    a crash (SIGKILL to the postmaster and all its backends), ``restart()`` keeps port and data.
    ``cleanup()`` stops the server and deletes its data (a private dir under /tmp when root).
    """

    stop_signal = signal.SIGINT  # fast shutdown

    def __init__(self, workdir: Path | str, port: int | None = None, tls=None) -> None:
        """``tls``: a ``tls.Issued`` server certificate: the server then runs with ``ssl=on`` (what
        CloudNativePG does) and clients may verify it (sslmode=verify-full)."""
        super().__init__()
        self.tls = tls
        self.workdir = Path(workdir).resolve()
        self.port = int(port) if port else free_port()
        self.log_path = self.workdir / "postgres.log"
        self._home: Path | None = None  # data + socket dir
        self._private_home = False

    @property
    def url(self) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def dsn(self) -> dict:
        return dict(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname=DATABASE)

    @property
    def data_dir(self) -> Path | None:
        return self._home / "data" if self._home else None

    # -- lifecycle --------------------------------------------------------------------------------
    def _prepare(self, bindir: Path) -> Path:
        if self._home is None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            if run_as_user() is not None:
                # other users cannot reach pytest's 0700 tmp dirs: a private dir under /tmp instead
                _sweep_orphan_homes()
                self._home = Path(tempfile.mkdtemp(prefix="dpe-pg-"))
                (self._home / "owner.pid").write_text(f"{os.getpid()}\n")
                self._private_home = True
                link = self.workdir / "pgdata"
                if not link.exists():
                    link.symlink_to(self._home)
            else:
                self._home = self.workdir / "pg"
                self._home.mkdir(exist_ok=True)
        data = self._home / "data"
        if not (data / "PG_VERSION").is_file():
            shutil.copytree(ensure_template(bindir), data, symlinks=True)
            os.chmod(data, 0o700)
            _chown_tree(self._home)
        return data

    def _launch(self) -> subprocess.Popen:
        bindir = find_bindir()
        data = self._prepare(bindir)
        wait_port_free(self.port)
        # a postmaster.pid left by a crash is handled by postgres itself (stale pid check)
        cmd = [bindir / "postgres", "-D", data, "-p", str(self.port), "-k", self._home,
               "-c", "listen_addresses=127.0.0.1", "-c", "shared_buffers=32MB",
               "-c", "max_connections=100", "-c", "fsync=on", "-c", "synchronous_commit=on",
               "-c", "full_page_writes=on", "-c", "max_wal_size=256MB", "-c", "logging_collector=off",
               "-c", "log_min_messages=warning", "-c", "log_line_prefix=%m [%p] ",
               "-c", "unix_socket_permissions=0777", "-c", "timezone=UTC"]
        if self.tls is not None:
            # PostgreSQL wants its key owned by the server's user, mode 0600: copies in its home
            assert self._home is not None
            cert, key = self._home / "server.crt", self._home / "server.key"
            shutil.copyfile(self.tls.cert, cert)
            shutil.copyfile(self.tls.key, key)
            os.chmod(key, 0o600)
            _chown_tree(self._home)
            cmd += ["-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]
        return spawn(_as_user(cmd), self.log_path, env=_child_env(), cwd=self._home)

    def cleanup(self) -> None:
        self.stop()
        if self._private_home and self._home is not None:
            shutil.rmtree(self._home, ignore_errors=True)
            self._home = None

    def __repr__(self) -> str:
        return f"PostgresServer({self.url}, running={self.running}, workdir={self.workdir})"

    # -- internals --------------------------------------------------------------------------------
    def _fail(self, why: str) -> LaunchError:
        return LaunchError(f"PostgreSQL on 127.0.0.1:{self.port} {why}; log {self.log_path}:\n{tail(self.log_path)}")

    def _wait_ready(self, deadline: float) -> None:
        assert self.proc is not None
        try:
            import psycopg2
        except ImportError:  # pragma: no cover - the testbed's users have it ([dev], [consumer])
            psycopg2 = None
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise self._fail(f"exited with code {self.proc.returncode} while starting")
            if psycopg2 is None:
                if "ready to accept connections" in tail(self.log_path, 20):
                    return
            else:
                try:
                    conn = psycopg2.connect(self.url, connect_timeout=3)
                    try:
                        with conn.cursor() as cur:
                            cur.execute("SELECT 1")
                    finally:
                        conn.close()
                    return
                except psycopg2.OperationalError as exc:
                    last = exc
            time.sleep(0.1)
        raise self._fail(f"did not accept connections in time (last error: {str(last).strip()!r})")
