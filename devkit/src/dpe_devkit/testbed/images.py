"""Container images built with a docker engine, for the image tests and the test cluster.

No container registry can be reached here, so nothing is pulled: the base image is made from Debian
packages by ``images/local-base/build`` (debootstrap, cached as a tarball under ``.cache/images``)
and every other image is built on it (``--network host``: pip and apt inside the builds reach the
package registries the host uses).

The docker engine (``docker_engine()``): the one DOCKER_HOST (or /var/run/docker.sock) points at if
it answers, else a private ``dockerd`` started here (root needed; no bridge, no iptables: host
network only) with its image store in ``.cache/docker`` so that later runs reuse the layers, stopped
when the last user is done.  One process at a time uses that store (a lock; another process waits).

The test cluster (``testbed/cluster.py``) runs the images of ``CLUSTER_IMAGES``;
``ensure_cluster_images()`` builds them (each one only when its inputs changed: a digest of its
Dockerfile, build context and base, kept as an image label) and returns one ``docker save`` tarball
of them all, cached under ``.cache/images`` by the digest of every input: once built, a later call
returns it without starting any engine.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from . import gobuild
from ._proc import LaunchError, cache_dir, file_lock, kill, repo_root, run, spawn, tail

BASE_TAG = "dpe-local/python:3.11-bookworm"
LABEL = "dpe-ingest.test.inputs"  # image label: digest of what the image was built from
BUILD_TIMEOUT = 1800.0  # a cold build (pip, apt) on a slow mirror; only reached on failure
STORE_WAIT = 2700.0  # how long to wait for another process using .cache/docker
KAFKA_TOOLS = "org.apache.kafka:kafka-tools"
#: the builds of testbed.gobuild -> their binaries in the "monitoring" image (bin/ of its context; the
#: operator is bin/operator, as in its upstream image)
MONITORING_BINARIES = {"prometheus": {"prometheus": "prometheus"},
                       "prometheus-operator": {"prometheus-operator": "operator",
                                               "prometheus-config-reloader": "prometheus-config-reloader"},
                       "pushgateway": {"pushgateway": "pushgateway"}}


def _root() -> Path:
    root = repo_root()
    if root is None:
        raise LaunchError("the images are built from a source checkout of dpe-ingest (images/, charts/): "
                          "this package is not installed from one")
    return root


def _app_version() -> str:
    """appVersion of the chart: the tag the chart gives the producer and consumer images by default."""
    text = (_root() / "charts/dpe-ingest/Chart.yaml").read_text()
    m = re.search(r'^appVersion:\s*"?([^"\s]+)"?\s*$', text, flags=re.M)
    if not m:
        raise LaunchError("charts/dpe-ingest/Chart.yaml has no appVersion")
    return m.group(1)


def _cluster_images() -> dict[str, str]:
    try:
        version = _app_version()
    except (LaunchError, OSError):
        version = "0.1.0"
    return {
        "producer": f"dpe-ingest-producer:{version}",
        "consumer": f"dpe-ingest-consumer:{version}",
        "kafka": "dpe-test/kafka:4.4.0",
        "postgres": "dpe-test/postgres:15",
        "pause": "dpe-test/pause:3.10",
        "monitoring": f"dpe-test/monitoring:{gobuild.PROMETHEUS_VERSION}",
        "base": BASE_TAG,
    }


#: role -> tag of every image the test cluster runs.  "producer"/"consumer": the chart's default
#: repositories with its appVersion as tag; "kafka", "postgres": the test stand-ins of apache/kafka
#: and postgres; "pause": the pod sandbox image; "base": the Debian-made Python image (helper pods);
#: "monitoring": Prometheus, its operator and config reloader, and the Pushgateway (MONITORING_BINARIES).
CLUSTER_IMAGES: dict[str, str] = _cluster_images()


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"images: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# the docker engine
# ---------------------------------------------------------------------------------------------
def _answers(env: dict[str, str]) -> bool:
    try:
        return subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class DockerEngine:
    """A docker engine to talk to: ``env`` (DOCKER_HOST) for the ``docker`` CLI, ``docker(...)`` to run it.
    ``proc`` is the dockerd started here (None when the engine was already running)."""

    def __init__(self, env: dict[str, str], proc: subprocess.Popen | None = None, workdir: Path | None = None,
                 store_lock: contextlib.ExitStack | None = None) -> None:
        self.env, self.proc, self.workdir, self._store_lock = env, proc, workdir, store_lock

    @property
    def private(self) -> bool:
        return self.proc is not None

    def docker(self, *args: str, check: bool = True, timeout: float = 300.0,
               input: str | None = None) -> subprocess.CompletedProcess:
        """``docker ARGS``; raises LaunchError with its output when it fails and ``check``."""
        try:
            cp = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout, input=input)
        except subprocess.TimeoutExpired:
            raise LaunchError(f"docker {' '.join(args)[:300]} did not finish in {timeout:.0f}s") from None
        if check and cp.returncode != 0:
            raise LaunchError(f"docker {' '.join(args)[:300]} exited {cp.returncode}:\n"
                              f"{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}")
        return cp

    def stop(self) -> None:
        """Stop the dockerd started here (SIGTERM: it stops its containers), free its store."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        kill(self.proc)  # what is left of its process group (its containerd), and reap it
        if self.workdir is not None:
            _remove_tree(self.workdir)  # dockerd leaves its network namespace bind-mounted under exec-root
        if self._store_lock is not None:
            self._store_lock.close()
            self._store_lock = None


def _remove_tree(path: Path) -> None:
    """Unmount (lazily) whatever is mounted below ``path``, then remove it."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith(str(path) + "/")]
    for mount in sorted(mounts, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
    shutil.rmtree(path, ignore_errors=True)


def start_engine(quiet: bool = True) -> DockerEngine:
    """The engine DOCKER_HOST points at if it answers, else a private dockerd (see the module doc).
    Raises LaunchError saying why when there is none and none can be started."""
    if shutil.which("docker") is None:
        raise LaunchError("no docker CLI: apt-get install -y docker.io (scripts/setup --tests does it)")
    env = dict(os.environ)
    if _answers(env):
        return DockerEngine(env)
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise LaunchError("no docker engine answers and there is no dockerd to start: apt-get install -y docker.io")
    if os.geteuid() != 0:
        raise LaunchError("no docker engine answers (DOCKER_HOST) and starting a private dockerd needs root")
    store = cache_dir() / "docker"
    lock = contextlib.ExitStack()
    lock.enter_context(file_lock(store / "lock", "using the docker image store", wait_s=STORE_WAIT))
    workdir = Path(tempfile.mkdtemp(prefix="dpe-dockerd-"))
    sock = workdir / "docker.sock"
    env["DOCKER_HOST"] = f"unix://{sock}"
    log = workdir / "dockerd.log"
    _say(quiet, f"starting a private dockerd (store {store / 'data'})")
    for driver in ("overlay2", "vfs"):
        cmd = [dockerd, "--host", f"unix://{sock}", "--data-root", str(store / "data"),
               "--exec-root", str(workdir / "exec"), "--pidfile", str(workdir / "dockerd.pid"),
               "--bridge=none", "--iptables=false", "--ip6tables=false", "--storage-driver", driver]
        proc = spawn(cmd, log)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if sock.exists() and _answers(env):
                return DockerEngine(env, proc, workdir, lock)
            time.sleep(0.5)
        DockerEngine(env, proc).stop()
    why = tail(log, 30)
    DockerEngine(env, None, workdir, lock).stop()
    raise LaunchError(f"dockerd could not start here (overlay2, then vfs); its log:\n{why}")


_active: DockerEngine | None = None
_active_users = 0
_active_lock = threading.Lock()


@contextlib.contextmanager
def docker_engine(quiet: bool = True) -> Iterator[DockerEngine]:
    """A docker engine for the time of the ``with`` block.  Nested uses in one process (a test module
    holding an engine while a test calls ``ensure_cluster_images``) share it; the dockerd started
    here is stopped when the outermost block ends."""
    global _active, _active_users
    with _active_lock:
        if _active is None:
            _active = start_engine(quiet)
        _active_users += 1
        engine = _active
    try:
        yield engine
    finally:
        with _active_lock:
            _active_users -= 1
            if _active_users == 0:
                _active = None
                engine.stop()


# ---------------------------------------------------------------------------------------------
# inputs and their digests
# ---------------------------------------------------------------------------------------------
def _skip(rel: Path) -> bool:
    return any(p == "__pycache__" or p.endswith(".egg-info") for p in rel.parts) or rel.suffix in (".pyc", ".pyo")


def _digest_files(h, root: Path, paths: list[str]) -> None:
    """Feed ``h`` the relative path, mode and content of every file under ``paths`` (relative to root)."""
    for rel in paths:
        top = root / rel
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            r = path.relative_to(root)
            if _skip(r):
                continue
            h.update(f"{r}\0{path.stat().st_mode & 0o111:o}\0".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())


def _base_tarball() -> Path:
    return cache_dir() / "images" / "python-bookworm-minbase.tar"


def _base_script() -> Path:
    return _root() / "images/local-base/build"


def _base_digest() -> str | None:
    """Digest of the base image's tarball and script, None when the tarball must be (re)made (the
    script's own rule: the tarball is reused while it is newer than the script)."""
    tar, script = _base_tarball(), _base_script()
    if not tar.is_file() or tar.stat().st_size == 0 or tar.stat().st_mtime <= script.stat().st_mtime:
        return None
    st = tar.stat()
    return hashlib.sha256(script.read_bytes() + f"\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()


def _kafka_libs(quiet: bool) -> list[Path]:
    """The jars of the Kafka image: the testbed broker's (Maven Central) plus kafka-tools for
    bin/kafka-topics.sh (the helm test pod), fetched once with mvn."""
    from .kafka import KAFKA_VERSION, ensure_kafka_jars

    libs = ensure_kafka_jars(quiet=quiet)
    tools_dir = cache_dir() / "images" / f"kafka-tools-{KAFKA_VERSION}"
    jar = tools_dir / f"kafka-tools-{KAFKA_VERSION}.jar"
    if not jar.is_file():
        with file_lock(tools_dir.with_name(tools_dir.name + ".lock"), "fetching kafka-tools"):
            if not jar.is_file():
                mvn = shutil.which("mvn")
                if not mvn:
                    raise LaunchError("mvn (Apache Maven) is needed once to fetch kafka-tools from Maven Central: "
                                      "apt-get install -y maven")
                tmp = tools_dir.with_name(tools_dir.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                _say(quiet, f"fetching {KAFKA_TOOLS}:{KAFKA_VERSION} from Maven Central")
                run([mvn, "-q", "-B", "dependency:copy",
                     f"-Dartifact={KAFKA_TOOLS}:{KAFKA_VERSION}:jar", f"-DoutputDirectory={tmp}"],
                    f"fetching {KAFKA_TOOLS}:{KAFKA_VERSION} with Maven", timeout=900, cwd=cache_dir())
                if not (tmp / jar.name).is_file():
                    raise LaunchError(f"mvn finished but {tmp} has no {jar.name}")
                shutil.rmtree(tools_dir, ignore_errors=True)
                tmp.rename(tools_dir)
    return sorted(p for p in libs.glob("*.jar")) + [jar]


def pip_build_args() -> list[str]:
    """The host's pip index settings and extra CA certificates, as build arguments."""
    args = []
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        if os.environ.get(name):
            args += ["--build-arg", f"{name}={os.environ[name]}"]
    certs = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    if certs:
        args += ["--build-arg", "PIP_CA_CERTS=" + "\n".join(c.read_text().strip() for c in certs)]
    return args


# the Dockerfile of the producer and consumer images (one target each, the stages they share written
# once) and what it copies from the repository (see .dockerignore)
APP_DOCKERFILE = "images/dpe-ingest/Dockerfile"
_APP_INPUTS = ["pyproject.toml", "README.md", "LICENSE", "src", "images/build-venv.sh", ".dockerignore",
               APP_DOCKERFILE]


class _Recipe:
    """How to build one role: Dockerfile, context (a directory, or files to assemble), build args."""

    def __init__(self, role: str, dockerfile: Path, context: Path, build_args: list[str],
                 digest: str, extra_files: dict[str, Path] | None = None) -> None:
        self.role, self.dockerfile, self.context, self.build_args = role, dockerfile, context, build_args
        self.digest, self.extra_files = digest, extra_files or {}


def _recipes(base_digest: str, quiet: bool) -> dict[str, _Recipe]:
    root = _root()
    out: dict[str, _Recipe] = {}
    for role in ("producer", "consumer"):
        h = hashlib.sha256(f"{role}\0{base_digest}\0".encode())
        _digest_files(h, root, [p for p in _APP_INPUTS if (root / p).exists()])
        args = ["--target", role, "--build-arg", f"PYTHON_IMAGE={BASE_TAG}", "--build-arg", f"VERSION={_app_version()}"]
        out[role] = _Recipe(role, root / APP_DOCKERFILE, root, args, h.hexdigest())
    for role in ("kafka", "postgres", "pause"):
        src = root / "images" / f"test-{role}"
        h = hashlib.sha256(f"{role}\0{base_digest}\0".encode())
        _digest_files(h, src, ["."])
        extra: dict[str, Path] = {}
        if role == "kafka":
            for jar in _kafka_libs(quiet):
                extra[f"libs/{jar.name}"] = jar
                h.update(f"{jar.name}\0{jar.stat().st_size}\0".encode())
        out[role] = _Recipe(role, src / "Dockerfile", src, ["--build-arg", f"BASE_IMAGE={BASE_TAG}"],
                            h.hexdigest(), extra)
    # the monitoring image: static binaries on scratch; its digest names each build's version and
    # recipe (gobuild's stamp), the binaries themselves are built (or found) when the image is built
    src = root / "images" / "test-monitoring"
    h = hashlib.sha256(b"monitoring\0")
    _digest_files(h, src, ["."])
    extra = {}
    for build, binaries in MONITORING_BINARIES.items():
        h.update(f"{build}\0{gobuild.BUILDS[build].stamp()}\0".encode())
        for binary, name in binaries.items():
            extra[f"bin/{name}"] = cache_dir() / "bin" / binary
    out["monitoring"] = _Recipe("monitoring", src / "Dockerfile", src, [], h.hexdigest(), extra)
    return out


def _cluster_key(base_digest: str, recipes: dict[str, _Recipe]) -> str:
    h = hashlib.sha256(f"base\0{base_digest}\0".encode())
    for role in sorted(recipes):
        h.update(f"{role}\0{CLUSTER_IMAGES[role]}\0{recipes[role].digest}\0".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# builds
# ---------------------------------------------------------------------------------------------
def _image_id(engine: DockerEngine, tag: str) -> str | None:
    cp = engine.docker("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return cp.stdout.strip() if cp.returncode == 0 else None


def _make_base_tarball(quiet: bool) -> None:
    """images/local-base/build --tar-only, its debootstrap done outside the repository (a root
    filesystem with /proc mounted in the tree invites every `grep -r .` into /proc, which then keeps
    debootstrap from unmounting it), the tarball then moved into the cache."""
    target = _base_tarball()
    with file_lock(target.with_name(target.name + ".lock"), "making the Debian base image tarball"):
        if _base_digest() is not None:
            return
        _say(quiet, "making the Debian base image tarball (debootstrap, a few minutes)")
        work = Path(tempfile.mkdtemp(prefix="dpe-local-base-"))
        try:
            run([_base_script(), "--tar-only", "--cache", work], "images/local-base/build --tar-only",
                timeout=BUILD_TIMEOUT)
            made = work / target.name
            if not made.is_file():
                raise LaunchError(f"images/local-base/build --tar-only made no {made}")
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f".{target.name}.{os.getpid()}.part")
            shutil.move(str(made), part)
            os.utime(part)  # newer than the script: the script's own rule for reusing it
            os.replace(part, target)
        finally:
            _remove_tree(work)


def ensure_base_image(engine: DockerEngine, quiet: bool = True) -> str:
    """BASE_TAG in ``engine``, imported from images/local-base/build's tarball (made first when missing
    or older than the script: debootstrap, root).  Returns the digest of that tarball.  The engine
    also tags the import ``dpe-local/python:from-<digest>``, which tells later calls it is current."""
    script, cache = _base_script(), _base_tarball().parent
    if _base_digest() is None:
        _make_base_tarball(quiet)
    digest = _base_digest()
    if digest is None:
        raise LaunchError(f"images/local-base/build made no tarball at {_base_tarball()}")
    marker = f"{BASE_TAG.split(':')[0]}:from-{digest[:16]}"
    have = _image_id(engine, BASE_TAG)
    if have is None or have != _image_id(engine, marker):
        _say(quiet, f"importing {BASE_TAG}")
        run([script, "--tag", BASE_TAG, "--cache", cache], "images/local-base/build --tag",
            timeout=BUILD_TIMEOUT, env=engine.env)
        engine.docker("tag", BASE_TAG, marker)
    return digest


def _built_from(engine: DockerEngine, tag: str) -> str | None:
    cp = engine.docker("image", "inspect", "--format", "{{json .Config.Labels}}", tag, check=False)
    if cp.returncode != 0:
        return None
    return (json.loads(cp.stdout or "null") or {}).get(LABEL)


def _build(engine: DockerEngine, recipe: _Recipe, tag: str, quiet: bool) -> None:
    _say(quiet, f"building {tag}")
    t0 = time.monotonic()
    staged: Path | None = None
    context, dockerfile = recipe.context, recipe.dockerfile
    try:
        if recipe.role == "monitoring":
            for build in MONITORING_BINARIES:
                gobuild.ensure(build, quiet)
        if recipe.extra_files:  # a context assembled from the image's directory plus files from the cache
            (cache_dir() / "images").mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(prefix=f"context-{recipe.role}-", dir=cache_dir() / "images"))
            shutil.copytree(recipe.context, staged, dirs_exist_ok=True)
            for rel, src in recipe.extra_files.items():
                dest = staged / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copy2(src, dest)
            context, dockerfile = staged, staged / recipe.dockerfile.relative_to(recipe.context)
        pip = pip_build_args() if recipe.role in ("producer", "consumer") else []
        engine.docker("build", "--network", "host", *recipe.build_args, *pip, "--label", f"{LABEL}={recipe.digest}",
                      "-f", str(dockerfile), "-t", tag, str(context), timeout=BUILD_TIMEOUT)
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    _say(quiet, f"built {tag} in {time.monotonic() - t0:.0f}s")


def _ensure(engine: DockerEngine, recipes: dict[str, _Recipe], roles: list[str], quiet: bool) -> None:
    built = False
    for role in roles:
        if role == "base":
            continue
        tag = CLUSTER_IMAGES[role]
        if _built_from(engine, tag) != recipes[role].digest:
            _build(engine, recipes[role], tag, quiet)
            built = True
    if built:  # the images these builds replaced, now untagged (the layers still in use stay)
        engine.docker("image", "prune", "--force", "--filter", f"label={LABEL}", check=False)


def ensure_images(engine: DockerEngine, roles: list[str] | None = None, quiet: bool = True) -> dict[str, str]:
    """The images of ``roles`` (default: all of CLUSTER_IMAGES) in ``engine``, each built only when it
    is missing or its inputs changed.  Returns role -> tag."""
    roles = list(CLUSTER_IMAGES) if roles is None else list(roles)
    unknown = [r for r in roles if r not in CLUSTER_IMAGES]
    if unknown:
        raise LaunchError(f"unknown image roles {unknown}: accepted {sorted(CLUSTER_IMAGES)}")
    base = ensure_base_image(engine, quiet)
    _ensure(engine, _recipes(base, quiet), roles, quiet)
    return {role: CLUSTER_IMAGES[role] for role in roles}


def cluster_inputs_key() -> str | None:
    """The key of the current inputs of every cluster image (the tarball is ``cluster-<key>.tar``),
    None while the base image's tarball has not been made."""
    base = _base_digest()
    return None if base is None else _cluster_key(base, _recipes(base, True))


def _cluster_tarball(key: str) -> Path:
    return cache_dir() / "images" / f"cluster-{key}.tar"


def ensure_cluster_images(quiet: bool = True) -> Path:
    """Build (cached: nothing rebuilt when inputs did not change) every image of CLUSTER_IMAGES and
    return the path of one `docker save` tarball holding all of them (kept under .cache/images/),
    ready for `ctr -n k8s.io images import`.

    Warm (the tarball of these inputs exists): no engine is started.  Otherwise the engine of
    ``docker_engine()``; a dockerd started for this call is stopped before it returns."""
    base = _base_digest()
    if base is not None:
        tar = _cluster_tarball(_cluster_key(base, _recipes(base, quiet)))
        if tar.is_file():
            return tar
    t0 = time.monotonic()
    with docker_engine(quiet) as engine:
        base = ensure_base_image(engine, quiet)
        recipes = _recipes(base, quiet)
        tar = _cluster_tarball(_cluster_key(base, recipes))
        if tar.is_file():  # made by another process meanwhile
            return tar
        _ensure(engine, recipes, list(CLUSTER_IMAGES), quiet)
        _say(quiet, f"saving {len(CLUSTER_IMAGES)} images into {tar}")
        part = tar.with_name(f".{tar.name}.{os.getpid()}.part")
        try:
            engine.docker("save", "-o", str(part), *CLUSTER_IMAGES.values(), timeout=BUILD_TIMEOUT)
            part.chmod(0o644)
            os.replace(part, tar)
        finally:
            part.unlink(missing_ok=True)
    # keep the previous tarball too (a process may be about to import it), drop older ones
    olds = sorted((p for p in tar.parent.glob("cluster-*.tar") if p != tar), key=lambda p: p.stat().st_mtime)
    for old in olds[:-1]:
        old.unlink(missing_ok=True)
    _say(quiet, f"cluster images ready in {time.monotonic() - t0:.0f}s: {tar}")
    return tar


def tarball_tags(tarball: Path) -> list[str]:
    """The tags a `docker save` tarball holds (its manifest.json's RepoTags)."""
    import tarfile

    with tarfile.open(tarball) as tf:
        member = tf.extractfile("manifest.json")
        if member is None:
            raise LaunchError(f"{tarball} has no manifest.json: not a docker save tarball")
        manifest = json.load(member)
    return sorted(tag for entry in manifest for tag in (entry.get("RepoTags") or []))

