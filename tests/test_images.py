"""The container images (images/producer, images/consumer), built and run with a real docker engine.

No container registry is reachable here, so the base image is made from Debian packages by
``images/local-base/build`` (debootstrap, cached as a tarball under .cache/images) and passed through
the Dockerfiles' ``PYTHON_IMAGE`` build argument, exactly as an air-gapped user would.  pip inside
the build reaches the package index the host uses (``--network host``; the host's extra CA
certificates and PIP_INDEX_URL & co. are passed as build arguments).

The docker engine: the one DOCKER_HOST (or /var/run/docker.sock) points at if it answers, else a
private ``dockerd`` started here (root needed; no bridge, no iptables: host network only) with its
image store in .cache/docker so that later runs reuse the layers, stopped at the end.  Without an
engine every test of this module that needs one is skipped with the concrete reason.

The static checks of the Dockerfiles run everywhere.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
BASE_TAG = "dpe-local/python:3.11-bookworm"
COMPONENTS = ("producer", "consumer")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SLOW = 300  # generous bound of any wait, only reached on failure


# ---------------------------------------------------------------------------------------------
# static checks of the Dockerfiles (no engine needed)
# ---------------------------------------------------------------------------------------------
def instructions(component: str) -> list[tuple[str, str]]:
    text = (ROOT / "images" / component / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("component", COMPONENTS)
def test_dockerfile_base_is_a_build_argument_used_by_every_stage(component):
    ins = instructions(component)
    assert ins[0][0] == "ARG" and ins[0][1].startswith("PYTHON_IMAGE="), ins[0]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-9]-slim-\w+", ins[0][1]), ins[0]
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 2, f"a builder and a runtime stage: {froms}"
    assert all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms), froms
    assert "--from=builder" in " ".join(rest for word, rest in ins if word == "COPY")


@pytest.mark.parametrize("component,command", [("producer", "produce"), ("consumer", "consume")])
def test_dockerfile_runtime_settings(component, command):
    ins = instructions(component)
    runtime = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    assert ("ENTRYPOINT", '["dpe-ingest"]') in runtime
    assert ("CMD", f'["{command}"]') in runtime
    assert ("USER", "10001:10001") in runtime
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    args = [rest for word, rest in runtime if word == "ARG"]
    assert f"VERSION={VERSION}" in args, f"default VERSION label must be pyproject's {VERSION}: {args}"
    extra = "consumer" if component == "consumer" else ""
    assert ("RUN", f'sh /usr/local/bin/build-venv.sh deps "{extra}"') in ins


# ---------------------------------------------------------------------------------------------
# the docker engine
# ---------------------------------------------------------------------------------------------
def _answers(env: dict) -> bool:
    try:
        return subprocess.run(["docker", "info"], env=env, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class Engine:
    def __init__(self, env: dict, proc: subprocess.Popen | None, workdir: Path | None, lock=None):
        self.env, self.proc, self.workdir, self.lock = env, proc, workdir, lock

    def docker(self, *args: str, check: bool = True, timeout: float = SLOW, **kw) -> subprocess.CompletedProcess:
        cp = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and cp.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)[:300]} exited {cp.returncode}:\n"
                                 f"{cp.stdout[-3000:]}\n{cp.stderr[-3000:]}")
        return cp

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        if self.lock is not None:
            self.lock.close()
        if self.workdir is not None:
            # dockerd leaves its network namespace bind-mounted under exec-root: unmount, then remove
            mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                      if line.split()[1].startswith(str(self.workdir) + "/")]
            for mount in sorted(mounts, reverse=True):
                subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)
            shutil.rmtree(self.workdir, ignore_errors=True)


def _start_dockerd() -> Engine:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI (Debian: apt-get install docker.io)")
    env = dict(os.environ)
    if _answers(env):
        return Engine(env, None, None)
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        pytest.skip("no docker engine answers and there is no dockerd to start (Debian: apt-get install docker.io)")
    if os.geteuid() != 0:
        pytest.skip("no docker engine answers and starting dockerd needs root")
    workdir = Path(tempfile.mkdtemp(prefix="dpe-dockerd-"))
    # The image store lives in .cache/docker (layers reused by later runs) unless another run holds it.
    store = CACHE / "docker"
    store.mkdir(parents=True, exist_ok=True)
    lock = open(store / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        data_root = store / "data"
    except OSError:
        lock.close()
        lock = None
        data_root = workdir / "data"
    sock = workdir / "docker.sock"
    log = open(workdir / "dockerd.log", "w")
    last_error = ""
    for driver in ("overlay2", "vfs"):
        cmd = [dockerd, "--host", f"unix://{sock}", "--data-root", str(data_root), "--exec-root", str(workdir / "exec"),
               "--pidfile", str(workdir / "dockerd.pid"), "--bridge=none", "--iptables=false", "--ip6tables=false",
               "--storage-driver", driver]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        env["DOCKER_HOST"] = f"unix://{sock}"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            if sock.exists() and _answers(env):
                return Engine(env, proc, workdir, lock)
            time.sleep(1)
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=30)
        last_error = (workdir / "dockerd.log").read_text()[-1500:]
    Engine(env, None, workdir, lock).stop()
    pytest.skip(f"dockerd could not start here (overlay2, then vfs): {last_error}")


@pytest.fixture(scope="module")
def engine():
    eng = _start_dockerd()
    try:
        yield eng
    finally:
        eng.stop()


def _pip_build_args() -> list[str]:
    """The host's pip index settings and extra CA certificates, as build arguments."""
    args = []
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        if os.environ.get(name):
            args += ["--build-arg", f"{name}={os.environ[name]}"]
    certs = sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))
    if certs:
        args += ["--build-arg", "PIP_CA_CERTS=" + "\n".join(c.read_text().strip() for c in certs)]
    return args


@pytest.fixture(scope="module")
def base_image(engine):
    """PYTHON_IMAGE of the builds: DPE_TEST_PYTHON_IMAGE if given (e.g. python:3.11-slim-bookworm on a
    machine with a registry), else the Debian-made image of images/local-base/build."""
    given = os.environ.get("DPE_TEST_PYTHON_IMAGE")
    if given:
        engine.docker("image", "inspect", given)
        return given
    tar = subprocess.run([str(ROOT / "images/local-base/build"), "--tar-only"], capture_output=True, text=True,
                         timeout=900, env=engine.env)
    if tar.returncode == 3:
        pytest.skip(f"cannot make the local base image: {tar.stderr.strip()}")
    assert tar.returncode == 0, tar.stderr
    tarball = Path(tar.stdout.strip().splitlines()[-1])
    have = engine.docker("image", "inspect", "--format", "{{.Created}}", BASE_TAG, check=False)
    fresh = False
    if have.returncode == 0:
        created = have.stdout.strip()[:19]
        fresh = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(tarball.stat().st_mtime)) < created
    if not fresh:
        cp = subprocess.run([str(ROOT / "images/local-base/build"), "--tag", BASE_TAG], capture_output=True,
                            text=True, timeout=900, env=engine.env)
        assert cp.returncode == 0, cp.stderr
    return BASE_TAG


@pytest.fixture(scope="module")
def images(engine, base_image):
    tag = f"test-{uuid.uuid4().hex[:8]}"
    built = {}
    try:
        for component in COMPONENTS:
            name = f"dpe-ingest-{component}:{tag}"
            engine.docker("build", "--network", "host", "--build-arg", f"PYTHON_IMAGE={base_image}",
                          "--build-arg", "REVISION=test", *_pip_build_args(),
                          "-f", str(ROOT / "images" / component / "Dockerfile"), "-t", name, str(ROOT), timeout=900)
            built[component] = name
        yield built
    finally:
        for name in built.values():
            engine.docker("image", "rm", name, check=False)


def inspect(engine, image: str) -> dict:
    return json.loads(engine.docker("image", "inspect", image).stdout)[0]


def run(engine, image: str, *args: str, entrypoint: str | None = None, check: bool = True):
    """docker run as the chart runs the pods: uid 10001, read-only root, no capabilities, /tmp tmpfs."""
    opts = ["--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", "--user", "10001:10001",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    if entrypoint:
        opts += ["--entrypoint", entrypoint]
    return engine.docker("run", *opts, image, *args, check=check)


# ---------------------------------------------------------------------------------------------
# built images
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("component,command", [("producer", "produce"), ("consumer", "consume")])
def test_image_config_non_root_entrypoint_labels(engine, images, component, command):
    cfg = inspect(engine, images[component])["Config"]
    assert cfg["User"] == "10001:10001"
    assert cfg["Entrypoint"] == ["dpe-ingest"]
    assert cfg["Cmd"] == [command]
    assert "PYTHONDONTWRITEBYTECODE=1" in cfg["Env"] and "PYTHONUNBUFFERED=1" in cfg["Env"]
    labels = cfg["Labels"]
    assert labels["org.opencontainers.image.title"] == f"dpe-ingest-{component}"
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.revision"] == "test"
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.base.name"]
    assert labels["org.opencontainers.image.source"].startswith("https://")


@pytest.mark.parametrize("component", COMPONENTS)
def test_image_runs_as_10001_read_only_with_the_cli(engine, images, component):
    assert run(engine, images[component], "--version").stdout.strip() == VERSION
    assert "produce" in run(engine, images[component], "--help").stdout
    ident = run(engine, images[component], "-c", "import os; print(os.getuid(), os.getgid())",
                entrypoint="python").stdout.split()
    assert ident == ["10001", "10001"]
    # the chart's wait-for-kafka init container runs `python -c …` in the producer image
    assert run(engine, images[component], "-c", "import socket, sys; print(sys.version_info[:2] >= (3, 11))",
               entrypoint="python").stdout.strip() == "True"


def test_each_image_has_only_the_dependencies_it_needs(engine, images):
    probe = ("import importlib.util as u; "
             "print(*[m for m in ('kafka', 'requests', 'psycopg2', 'pip', 'dpe_ingest') if u.find_spec(m)])")
    prod = run(engine, images["producer"], "-c", probe, entrypoint="/opt/venv/bin/python").stdout.split()
    cons = run(engine, images["consumer"], "-c", probe, entrypoint="/opt/venv/bin/python").stdout.split()
    assert {"kafka", "requests", "dpe_ingest"} <= set(prod) and "psycopg2" not in prod, prod
    assert {"kafka", "requests", "dpe_ingest", "psycopg2"} <= set(cons), cons
    # no pip in the venv (the base image's own pip is outside the venv's sys.path)
    assert "pip" not in prod and "pip" not in cons, (prod, cons)
    assert run(engine, images["consumer"], "-c", "import psycopg2; print(psycopg2.__version__)",
               entrypoint="python").stdout.strip()
    venv_pip = run(engine, images["producer"], "-c", "import os; print(os.path.exists('/opt/venv/bin/pip'))",
                   entrypoint="python").stdout.strip()
    assert venv_pip == "False"


def test_build_context_holds_only_what_the_images_need(engine, base_image):
    """.dockerignore: the context sent to the engine has no .git, .venv, .cache, tests, charts."""
    dockerfile = f"FROM {base_image}\nCOPY . /ctx\nRUN cd /ctx && find . -maxdepth 2 | sort\n"
    tag = f"dpe-context-probe:{uuid.uuid4().hex[:8]}"
    cp = engine.docker("build", "--no-cache", "--network", "none", "-t", tag, "-f", "-", str(ROOT), input=dockerfile)
    engine.docker("image", "rm", tag, check=False)
    listing = set(re.findall(r"^\./[^\s]+$", cp.stdout, flags=re.M))
    assert {"./pyproject.toml", "./src", "./src/dpe_ingest", "./images"} <= listing, listing
    for unwanted in ("./.git", "./.venv", "./.cache", "./tests", "./charts", "./scripts", "./src/dpe_ingest.egg-info"):
        assert unwanted not in listing, f"{unwanted} is in the build context: {sorted(listing)}"


# ---------------------------------------------------------------------------------------------
# the pipeline through the images: stand-in -> producers -> bench Kafka -> consumer -> PostgreSQL
# ---------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.kafka
@pytest.mark.postgres
def test_producer_and_consumer_images_carry_the_standin_rows_into_postgresql(engine, images, kafka_bootstrap,
                                                                               database_url):
    import psycopg2

    rows, deps = 240, ("69", "2A")
    tag = uuid.uuid4().hex[:10]
    topic, table, group = f"img-{tag}", f"dpe_img_{tag}", f"img-{tag}-sink"
    port = _free_port()
    api = f"http://127.0.0.1:{port}/data-fair/api/v1/datasets/dpe03existant"
    common = ["--network", "host", "--read-only", "--tmpfs", "/tmp", "--user", "10001:10001", "--cap-drop", "ALL",
              "--security-opt", "no-new-privileges", "-e", f"KAFKA_BOOTSTRAP_SERVERS={kafka_bootstrap}",
              "-e", f"KAFKA_TOPIC={topic}", "-e", f"KAFKA_DLQ_TOPIC={topic}-dlq"]
    names = []
    try:
        standin = f"dpe-img-standin-{tag}"
        names.append(standin)
        engine.docker("run", "-d", "--name", standin, *common, images["producer"], "ademe-standin",
                      "--host", "127.0.0.1", "--port", str(port), "--rows-per-department", str(rows))
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, engine.docker("logs", standin, check=False).stderr[-2000:]
                time.sleep(0.5)
        producers = []
        for dep in deps:
            name = f"dpe-img-producer-{dep}-{tag}"
            names.append(name)
            producers.append(name)
            engine.docker("run", "-d", "--name", name, *common, "-e", f"DEPARTMENT={dep}", "-e", f"ADEME_API_URL={api}",
                          "-e", "ADEME_PAGE_SIZE=100", "-e", f"PRODUCER_CHECKPOINT_TOPIC=img-{tag}-checkpoints",
                          "-e", "KAFKA_TOPIC_PARTITIONS=3", images["producer"])
        for name in producers:
            code = engine.docker("wait", name, timeout=SLOW).stdout.strip()
            logs = engine.docker("logs", name, check=False)
            assert code == "0", f"{name} exited {code}:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
        consumer = f"dpe-img-consumer-{tag}"
        names.append(consumer)
        engine.docker("run", "-d", "--name", consumer, *common, "-e", f"DATABASE_URL={database_url}",
                      "-e", f"DB_TABLE={table}", "-e", f"CONSUMER_GROUP={group}", images["consumer"],
                      "consume", "--exit-when-idle", "5")
        code = engine.docker("wait", consumer, timeout=SLOW).stdout.strip()
        logs = engine.docker("logs", consumer, check=False)
        assert code == "0", f"consumer exited {code}:\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(f"SELECT departement, count(*), count(DISTINCT numero_dpe) FROM {table} GROUP BY 1 ORDER BY 1")
            counts = {dep: (n, distinct) for dep, n, distinct in cur.fetchall()}
            cur.execute(f"DROP TABLE {table}")
        assert counts == {dep: (rows, rows) for dep in deps}, counts
    finally:
        for name in names:
            engine.docker("rm", "-f", name, check=False)
