"""The container images, built and run with a real docker engine.

- images/dpe-ingest (targets producer, consumer): the project's images (chart defaults
  dpe-ingest-producer/consumer), which carry the product and not its harness (dpe_devkit);
- images/test-kafka, test-postgres, test-pause: stand-ins of apache/kafka:4.4.0, postgres:15 and the
  Kubernetes pause image for the test cluster (testbed/cluster.py), run here as the chart runs them
  (same env, uid, read-only root where the chart has one; host network on free 127.0.0.1 ports);
- testbed.images.ensure_cluster_images(): one `docker save` tarball of every CLUSTER_IMAGES tag.

No container registry is reachable here, so the base image is made from Debian packages by
``images/local-base/build`` (debootstrap, cached as a tarball under .cache/images) and passed through
the Dockerfiles' ``PYTHON_IMAGE`` / ``BASE_IMAGE`` build argument, exactly as an air-gapped user would.
pip and apt inside the builds reach the package registries the host uses (``--network host``).

The docker engine is ``dpe_devkit.testbed.images.docker_engine()``: the one DOCKER_HOST (or
/var/run/docker.sock) points at if it answers, else a private ``dockerd`` (root; no bridge, no
iptables: host network only) with its image store in .cache/docker, stopped at the end.  These tests
are skipped only on a machine without docker; an engine that cannot start fails them.

The static checks of the Dockerfiles run everywhere.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

import reconcile as rec
from dpe_ingest.standin.data import Dataset
from dpe_devkit.testbed import images as imgs

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
BASE_TAG = imgs.BASE_TAG
COMPONENTS = ("producer", "consumer")
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SLOW = 300  # generous bound of any wait, only reached on failure


# ---------------------------------------------------------------------------------------------
# static checks of the Dockerfile (no engine needed)
# ---------------------------------------------------------------------------------------------
DOCKERFILE = ROOT / imgs.APP_DOCKERFILE


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> dict[str, tuple[str, list[tuple[str, str]]]]:
    """stage name -> (what it is FROM, its instructions), in the file's order."""
    out: dict[str, tuple[str, list[tuple[str, str]]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in instructions():
        if word == "FROM":
            base, _, name = rest.partition(" AS ")
            current = []
            out[name.strip()] = (base.strip(), current)
        elif out:
            current.append((word, rest))
    return out


def target(name: str) -> list[tuple[str, str]]:
    """The instructions a build of ``--target name`` runs in that stage and the stages it is FROM."""
    all_stages = stages()
    chain: list[tuple[str, str]] = []
    while name in all_stages:
        base, ins = all_stages[name]
        chain = ins + chain
        name = base
    return chain


def test_dockerfile_base_is_a_build_argument_used_by_every_stage():
    ins = instructions()
    assert ins[0][0] == "ARG" and ins[0][1].startswith("PYTHON_IMAGE="), ins[0]
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.1[1-9]-slim-\w+", ins[0][1]), ins[0]
    seen: list[str] = []
    for name, (base, _) in stages().items():
        assert base == "${PYTHON_IMAGE}" or base in seen, f"stage {name} is FROM {base}: not the base nor a stage"
        seen.append(name)
    assert {"builder", "wheel", "runtime", "producer", "consumer"} <= set(seen), seen


def test_the_two_images_share_every_stage_but_their_venv_and_command():
    """One builder, one wheel, one runtime: each image's own stage is its title, its venv and its CMD."""
    all_stages = stages()
    for component in COMPONENTS:
        base, ins = all_stages[component]
        assert base == "runtime", (component, base)
        assert [w for w, _ in ins] == ["LABEL", "COPY", "CMD"], (component, ins)
        assert ins[1][1] == f"--from={component}-venv /opt/venv /opt/venv", ins[1]
        venv_base, venv = all_stages[f"{component}-venv"]
        assert ("COPY", "--from=wheel /tmp/wheels /tmp/wheels") in venv, venv
    # the base dependencies are installed once: the consumer's venv adds its extra to them
    assert all_stages["deps"] == ("builder", [("RUN", 'sh /usr/local/bin/build-venv.sh deps ""')])
    assert all_stages["producer-venv"][0] == "deps" and all_stages["consumer-venv"][0] == "consumer-deps"
    assert all_stages["consumer-deps"] == ("deps", [("RUN", 'sh /usr/local/bin/build-venv.sh extra "consumer"')])
    # a build without --target gets the last stage: it stops and names the targets
    last_base, last = list(all_stages.values())[-1]
    assert last[-1][0] == "RUN" and "--target producer or --target consumer" in last[-1][1] and "exit 2" in last[-1][1]


@pytest.mark.parametrize("component,command", [("producer", "produce"), ("consumer", "consume")])
def test_dockerfile_runtime_settings(component, command):
    runtime = stages()["runtime"][1] + stages()[component][1]
    assert target(component)[-len(runtime):] == runtime
    assert ("ENTRYPOINT", '["dpe-ingest"]') in runtime
    assert ("CMD", f'["{command}"]') in runtime
    assert ("USER", "10001:10001") in runtime
    env = " ".join(rest for word, rest in runtime if word == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    args = [rest for word, rest in runtime if word == "ARG"]
    assert f"VERSION={VERSION}" in args, f"default VERSION label must be pyproject's {VERSION}: {args}"
    venv = target(f"{component}-venv")
    assert venv.count(("RUN", 'sh /usr/local/bin/build-venv.sh deps ""')) == 1, venv
    assert (("RUN", 'sh /usr/local/bin/build-venv.sh extra "consumer"') in venv) == (component == "consumer"), venv


# ---------------------------------------------------------------------------------------------
# the docker engine and the builds (dpe_devkit.testbed.images)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    """The engine of testbed.images.docker_engine(): DOCKER_HOST's, else a private dockerd (root).
    Skipped only on a machine with no docker at all; an engine that cannot start fails the tests."""
    if shutil.which("docker") is None and shutil.which("dockerd") is None:
        pytest.skip("no docker here (Debian: apt-get install docker.io; scripts/setup --tests does it)")
    with imgs.docker_engine() as eng:
        yield eng


@pytest.fixture(scope="module")
def base_image(engine):
    """PYTHON_IMAGE of the builds: DPE_TEST_PYTHON_IMAGE if given (e.g. python:3.11-slim-bookworm on a
    machine with a registry), else the Debian-made image of images/local-base/build."""
    given = os.environ.get("DPE_TEST_PYTHON_IMAGE")
    if given:
        engine.docker("image", "inspect", given)
        return given
    imgs.ensure_base_image(engine)
    return BASE_TAG


@pytest.fixture(scope="module")
def images(engine, base_image):
    tag = f"test-{uuid.uuid4().hex[:8]}"
    built = {}
    try:
        for component in COMPONENTS:
            name = f"dpe-ingest-{component}:{tag}"
            engine.docker("build", "--network", "host", "--target", component,
                          "--build-arg", f"PYTHON_IMAGE={base_image}", "--build-arg", "REVISION=test",
                          *imgs.pip_build_args(), "-f", str(DOCKERFILE), "-t", name, str(ROOT), timeout=900)
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


HARNESS_PROBE = """
import importlib, json, os
out = {}
for name in ("dpe_ingest", "dpe_ingest.cli", "dpe_ingest.standin", "dpe_devkit", "dpe_devkit.testbed",
             "dpe_ingest.testbed", "dpe_ingest.local_run"):
    try:
        importlib.import_module(name)
        out[name] = "imported"
    except ModuleNotFoundError as exc:
        out[name] = "missing " + exc.name
out["files"] = sorted(os.path.join(d, f) for d, dirs, files in os.walk("/opt/venv") for f in dirs + files
                      if "testbed" in f or "devkit" in f or "local_run" in f)
print(json.dumps(out))
"""


@pytest.mark.parametrize("component", COMPONENTS)
def test_the_images_carry_the_product_not_its_harness(engine, images, component):
    """dpe_ingest imports; the harness (dpe_devkit: testbed, local run, cluster) is nowhere in the image,
    not under its old name (dpe_ingest.testbed) either; its two commands say so and exit 2."""
    got = json.loads(run(engine, images[component], "-c", HARNESS_PROBE, entrypoint="python").stdout)
    assert got == {"dpe_ingest": "imported", "dpe_ingest.cli": "imported", "dpe_ingest.standin": "imported",
                   "dpe_devkit": "missing dpe_devkit", "dpe_devkit.testbed": "missing dpe_devkit",
                   "dpe_ingest.testbed": "missing dpe_ingest.testbed",
                   "dpe_ingest.local_run": "missing dpe_ingest.local_run", "files": []}, got
    for command in (["testbed", "up"], ["run", "69"]):
        cp = run(engine, images[component], *command, check=False)
        assert cp.returncode == 2, (command, cp.returncode, cp.stdout, cp.stderr)
        assert "not installed here" in cp.stderr and "pip install -e devkit" in cp.stderr, cp.stderr


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
        # exactly the stand-in's rows (its default seed), every column; then one flipped label is seen
        want = rec.expected_rows(Dataset(rows), deps)
        rec.assert_rows(want, rec.read_table(database_url, table))
        key = sorted(want)[rows]
        flipped = "A" if want[key]["etiquette_dpe"] != "A" else "B"
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(f"UPDATE {table} SET etiquette_dpe = %s WHERE numero_dpe = %s", (flipped, key))
        conn.close()
        with pytest.raises(AssertionError, match=f"different: {key} .*etiquette_dpe '{flipped}' in the table"):
            rec.assert_rows(want, rec.read_table(database_url, table))
    finally:
        for name in names:
            engine.docker("rm", "-f", name, check=False)
        with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE IF EXISTS {table}")
        conn.close()


# ---------------------------------------------------------------------------------------------
# the test cluster's images: static checks
# ---------------------------------------------------------------------------------------------
CHART = ROOT / "charts" / "dpe-ingest"
TEST_ROLES = ("kafka", "postgres", "pause")
STANDS_FOR = {"kafka": "apache/kafka:4.4.0", "postgres": "postgres:15", "pause": "registry.k8s.io/pause:3.10"}


def _head_comment(path: Path) -> str:
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# "))
    return " ".join(lines)


@pytest.mark.parametrize("role", TEST_ROLES)
def test_test_image_dockerfile_says_what_it_stands_for_and_builds_on_the_debian_base(role):
    dockerfile = ROOT / "images" / f"test-{role}" / "Dockerfile"
    head = _head_comment(dockerfile)
    assert f"stands for {STANDS_FOR[role]}" in head, head[:300]
    assert "only for the project's single-node test cluster" in head and "no container registry" in head, head
    assert head.startswith(imgs.CLUSTER_IMAGES[role]), (head[:80], imgs.CLUSTER_IMAGES[role])
    text = dockerfile.read_text()
    assert re.search(rf"^ARG BASE_IMAGE={re.escape(BASE_TAG)}$", text, flags=re.M), "the Debian-made base by default"


def test_cluster_images_are_the_chart_defaults_and_the_test_stand_ins():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    cluster = imgs.CLUSTER_IMAGES
    assert set(cluster) == {"producer", "consumer", "kafka", "postgres", "pause", "monitoring", "base"}
    for role in ("producer", "consumer"):
        assert cluster[role] == f"{values[role]['image']['repository']}:{values[role]['image']['tag'] or app_version}"
    # the stand-ins carry the chart's Kafka version and PostgreSQL major version
    assert cluster["kafka"].rsplit(":", 1)[1] == values["kafka"]["image"]["tag"]
    assert cluster["postgres"].rsplit(":", 1)[1] == values["postgresql"]["image"]["tag"].split(".")[0]
    assert cluster["base"] == BASE_TAG


def test_test_image_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: apt-get install -y shellcheck (scripts/test should install it)")
    files = [ROOT / "images/test-kafka/docker/run", *sorted((ROOT / "images/test-kafka/bin").glob("*.sh")),
             ROOT / "images/test-postgres/docker-entrypoint.sh"]
    cp = subprocess.run([shellcheck, "--severity=style", *map(str, files)], capture_output=True, text=True)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    for f in files:
        assert os.access(f, os.X_OK), f"{f} is not executable"


def _chart_env(template: str) -> dict[str, str | None]:
    """name -> literal value (None when templated) of every env entry of a chart template."""
    text = (CHART / "templates" / template).read_text()
    env: dict[str, str | None] = {}
    for name, value in re.findall(r"- name: (\w+)\n(?:\s*#.*\n)*\s+(value: .*|valueFrom:)", text):
        literal = value[len("value: "):].strip() if value.startswith("value: ") else None
        if literal is not None and "{{" in literal:
            literal = None
        env[name] = literal.strip('"') if literal is not None else None
    return env


# ---------------------------------------------------------------------------------------------
# the test cluster's images, run as the chart runs them
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def test_images(engine):
    return imgs.ensure_images(engine, list(TEST_ROLES))


def _fs_group_dir(tmp_path: Path, name: str, gid: int) -> Path:
    """A volume as Kubernetes gives it with fsGroup: owned by root, group gid, group-writable, setgid."""
    path = tmp_path / name
    path.mkdir()
    os.chown(path, 0, gid)
    path.chmod(0o2775)
    return path


def _wait(engine, name: str, ready, what: str, timeout: float = SLOW) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        state = engine.docker("inspect", "--format", "{{.State.Running}} {{.State.ExitCode}}", name, check=False)
        logs = engine.docker("logs", name, check=False)
        assert state.stdout.startswith("true"), f"{name} stopped ({state.stdout.strip()}) before {what}:\n" \
                                                f"{logs.stdout[-4000:]}\n{logs.stderr[-4000:]}"
        assert time.monotonic() < deadline, f"{name}: no {what} after {timeout}s:\n{logs.stdout[-4000:]}" \
                                            f"\n{logs.stderr[-4000:]}"
        time.sleep(1)


def _kafka_answers(bootstrap: str) -> bool:
    from kafka import KafkaAdminClient

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000, bootstrap_timeout_ms=5000)
    except Exception:  # noqa: BLE001 - not up yet
        return False
    try:
        admin.list_topics()
        return True
    except Exception:  # noqa: BLE001
        return False
    finally:
        admin.close()


def _kafka_run_args(tmp_path: Path) -> tuple[list[str], str, Path]:
    """docker run options of the chart's Kafka container (templates/kafka/statefulset.yaml): its env,
    uid/gid 1000 with the data volume and /tmp, no capabilities; host network on free loopback ports."""
    port, controller = _free_port(), _free_port()
    while controller == port:
        controller = _free_port()
    env = _chart_env("kafka/statefulset.yaml")
    templated = {  # the chart's templated values, for one node on 127.0.0.1
        "CLUSTER_ID": _cluster_id(),
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://127.0.0.1:{port}",
        "KAFKA_NUM_PARTITIONS": "3",
        "KAFKA_HEAP_OPTS": "-Xmx384m -Xms128m",
    }
    assert {k for k, v in env.items() if v is None} == set(templated), env
    env.update(templated)
    # the chart listens on every interface of the pod; on the host network: loopback only
    assert env["KAFKA_LISTENERS"] == "PLAINTEXT://:9092,CONTROLLER://:9093"
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@localhost:9093"
    env["KAFKA_LISTENERS"] = f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller}"
    env["KAFKA_CONTROLLER_QUORUM_VOTERS"] = f"1@127.0.0.1:{controller}"
    data = _fs_group_dir(tmp_path, "kafka-data", 1000)
    opts = ["--network", "host", "--user", "1000:1000", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            "-v", f"{data}:/var/lib/kafka/data", "--tmpfs", "/tmp"]
    for name, value in env.items():
        opts += ["-e", f"{name}={value}"]
    return opts, f"127.0.0.1:{port}", data


def _cluster_id() -> str:
    """A KRaft cluster id (22 characters of base64url), as `kafka-storage.sh random-uuid`."""
    import base64

    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")


def test_kafka_image_config(engine, test_images):
    cfg = inspect(engine, test_images["kafka"])["Config"]
    assert cfg["User"] == "1000:1000"
    assert cfg["Cmd"] == ["/etc/kafka/docker/run"] and not cfg["Entrypoint"]
    assert set(cfg["Volumes"]) == {"/etc/kafka/secrets", "/var/lib/kafka/data", "/mnt/shared/config"}
    java = engine.docker("run", "--rm", "--network", "none", "--entrypoint", "java", test_images["kafka"], "-version")
    assert 'version "17' in java.stderr, java.stderr


def test_kafka_image_refuses_a_config_directory_it_cannot_write(engine, test_images):
    cp = engine.docker("run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", "--user", "1000:1000",
                       "-e", "KAFKA_PROCESS_ROLES=broker,controller", test_images["kafka"], check=False, timeout=60)
    assert cp.returncode == 1, (cp.returncode, cp.stdout, cp.stderr)
    assert "/opt/kafka/config is not writable" in cp.stderr, cp.stderr


def test_kafka_image_serves_messages_and_keeps_them_across_a_restart(engine, test_images, tmp_path):
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import KafkaAdminClient, NewTopic

    opts, bootstrap, data = _kafka_run_args(tmp_path)
    tag = uuid.uuid4().hex[:8]
    topic = f"img-kafka-{tag}"
    names = [f"dpe-img-kafka-{tag}-1", f"dpe-img-kafka-{tag}-2"]

    def read_all() -> list[bytes]:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                 enable_auto_commit=False, consumer_timeout_ms=10000)
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            return [m.value for m in consumer]
        finally:
            consumer.close()

    try:
        engine.docker("run", "-d", "--name", names[0], *opts, test_images["kafka"])
        _wait(engine, names[0], lambda: _kafka_answers(bootstrap), "Kafka answering on " + bootstrap)
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        admin.close()
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
        producer.send(topic, key=b"k", value=b"hello from the test image").get(timeout=60)
        producer.close()
        assert read_all() == [b"hello from the test image"]

        # KafkaDockerWrapper turned the chart's KAFKA_* variables into the broker's configuration
        props = engine.docker("exec", names[0], "cat", "/opt/kafka/config/server.properties").stdout.splitlines()
        for line in ("log.dirs=/var/lib/kafka/data/kraft-combined-logs", "num.partitions=3", "node.id=1",
                     "process.roles=broker,controller", "group.initial.rebalance.delay.ms=0"):
            assert line in props, props
        assert not any(p.startswith("heap.opts") for p in props), props
        assert (data / "kraft-combined-logs" / "meta.properties").is_file()

        # the chart's helm test pod: kafka-topics.sh on a read-only root, LOG_DIR in /tmp
        listed = engine.docker("run", "--rm", "--network", "host", "--user", "1000:1000", "--read-only",
                               "--tmpfs", "/tmp", "--cap-drop", "ALL", "-e", "KAFKA_HEAP_OPTS=-Xmx128m -Xms64m",
                               "-e", "LOG_DIR=/tmp/logs", test_images["kafka"], "/opt/kafka/bin/kafka-topics.sh",
                               "--bootstrap-server", bootstrap, "--list")
        assert topic in listed.stdout.split(), listed.stdout + listed.stderr

        # a clean stop (SIGTERM, as the kubelet), then a new container on the same volume
        engine.docker("stop", "-t", "60", names[0], timeout=120)
        code = int(engine.docker("inspect", "--format", "{{.State.ExitCode}}", names[0]).stdout)
        assert code in (0, 143), engine.docker("logs", names[0]).stdout[-3000:]
        engine.docker("run", "-d", "--name", names[1], *opts, test_images["kafka"])
        _wait(engine, names[1], lambda: _kafka_answers(bootstrap), "Kafka answering again on " + bootstrap)
        assert read_all() == [b"hello from the test image"]
    finally:
        for name in names:
            engine.docker("rm", "-f", name, check=False)


def test_postgres_image_config(engine, test_images):
    cfg = inspect(engine, test_images["postgres"])["Config"]
    assert cfg["Entrypoint"] == ["docker-entrypoint.sh"] and cfg["Cmd"] == ["postgres"]
    assert cfg["StopSignal"] == "SIGINT"
    assert "PGDATA=/var/lib/postgresql/data" in cfg["Env"]
    ident = engine.docker("run", "--rm", "--network", "none", "--entrypoint", "id", test_images["postgres"],
                          "postgres").stdout.strip()
    assert ident.startswith("uid=999(postgres) gid=999(postgres)"), ident
    versions = engine.docker("run", "--rm", "--network", "none", "--user", "999:999", "--read-only",
                             test_images["postgres"], "sh", "-c", "postgres --version; pg_isready --version; psql --version")
    assert re.findall(r"^(\S+) \(PostgreSQL\) 15\.\d+ ", versions.stdout, flags=re.M) == \
        ["postgres", "pg_isready", "psql"], versions.stdout


def test_postgres_image_initialises_authenticates_and_keeps_its_data(engine, test_images, tmp_path):
    import psycopg2

    env = _chart_env("postgresql/statefulset.yaml")
    assert set(env) == {"POSTGRES_USER", "POSTGRES_DB", "POSTGRES_PASSWORD", "PGDATA"}, env
    values = yaml.safe_load((CHART / "values.yaml").read_text())["postgresql"]
    user, db = values["auth"]["username"], values["auth"]["database"]
    password = secrets.token_urlsafe(18)
    port = _free_port()
    data = _fs_group_dir(tmp_path, "pg-data", 999)
    tag = uuid.uuid4().hex[:8]
    names = [f"dpe-img-pg-{tag}-1", f"dpe-img-pg-{tag}-2"]
    # templates/postgresql/statefulset.yaml: uid/gid 999, read-only root, emptyDirs on the socket
    # directory and /tmp, the volume on /var/lib/postgresql/data; the image's command (postgres), here
    # on a free port of the host's loopback only
    opts = ["--network", "host", "--user", "999:999", "--read-only", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges", "-v", f"{data}:/var/lib/postgresql/data",
            "--tmpfs", "/var/run/postgresql:mode=1777", "--tmpfs", "/tmp",
            "-e", f"POSTGRES_USER={user}", "-e", f"POSTGRES_DB={db}", "-e", f"POSTGRES_PASSWORD={password}",
            "-e", f"PGDATA={env['PGDATA']}", "-e", f"PGPORT={port}"]
    command = ["postgres", "-c", "listen_addresses=127.0.0.1"]
    probe = ["pg_isready", "-h", "127.0.0.1", "-p", str(port), "-U", user, "-d", db]  # the chart's probes

    def ready(name: str):
        return lambda: engine.docker("exec", name, *probe, check=False).returncode == 0

    def connect(pw: str):
        return psycopg2.connect(host="127.0.0.1", port=port, user=user, password=pw, dbname=db, connect_timeout=10)

    try:
        engine.docker("run", "-d", "--name", names[0], *opts, test_images["postgres"], *command)
        _wait(engine, names[0], ready(names[0]), "pg_isready")
        with connect(password) as conn, conn.cursor() as cur:
            cur.execute("SELECT current_user, current_database(), current_setting('server_version_num')::int / 10000")
            assert cur.fetchone() == (user, db, 15)
            cur.execute("CREATE TABLE kept (v text); INSERT INTO kept VALUES ('across restarts')")
        conn.close()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            connect(password + "-wrong")
        pgdata = data / Path(env["PGDATA"]).relative_to("/var/lib/postgresql/data")
        st = pgdata.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (999, 0o700), (st.st_uid, oct(st.st_mode))

        engine.docker("stop", "-t", "60", names[0], timeout=120)  # STOPSIGNAL SIGINT: fast shutdown
        assert engine.docker("inspect", "--format", "{{.State.ExitCode}}", names[0]).stdout.strip() == "0"
        engine.docker("run", "-d", "--name", names[1], *opts, test_images["postgres"], *command)
        _wait(engine, names[1], ready(names[1]), "pg_isready after the restart")
        assert "skipping initialisation" in engine.docker("logs", names[1]).stdout
        with connect(password) as conn, conn.cursor() as cur:
            cur.execute("SELECT v FROM kept")
            assert cur.fetchall() == [("across restarts",)]
        conn.close()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            connect("not-" + password)

        # the chart's helm test pod: psql with DATABASE_URL and PGPASSWORD, uid 999, read-only root
        url = f"postgresql://{user}@127.0.0.1:{port}/{db}"
        out = engine.docker("run", "--rm", "--network", "host", "--user", "999:999", "--read-only", "--tmpfs", "/tmp",
                            "--cap-drop", "ALL", "-e", f"DATABASE_URL={url}", "-e", f"PGPASSWORD={password}",
                            test_images["postgres"], "sh", "-c",
                            "psql \"$DATABASE_URL\" -v ON_ERROR_STOP=1 -tAc 'SELECT count(*) FROM kept'")
        assert out.stdout.strip() == "1", out.stdout + out.stderr
    finally:
        for name in names:
            engine.docker("rm", "-f", name, check=False)


def test_postgres_image_refuses_to_initialise_without_a_password(engine, test_images, tmp_path):
    data = _fs_group_dir(tmp_path, "pg-nopw", 999)
    cp = engine.docker("run", "--rm", "--network", "none", "--user", "999:999", "--read-only",
                       "--tmpfs", "/var/run/postgresql", "--tmpfs", "/tmp", "-v", f"{data}:/var/lib/postgresql/data",
                       "-e", "PGDATA=/var/lib/postgresql/data/pgdata", test_images["postgres"], check=False, timeout=60)
    assert cp.returncode == 1 and "POSTGRES_PASSWORD is not set" in cp.stderr, (cp.returncode, cp.stderr)
    assert not (data / "pgdata" / "PG_VERSION").exists()


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of the processes whose parent is ``pid`` (host view)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append((int(stat.parent.name), fields[0]))
    return out


def test_pause_image_holds_the_sandbox_reaps_orphans_and_exits_on_sigterm(engine, test_images, base_image):
    cfg = inspect(engine, test_images["pause"])["Config"]
    assert cfg["Entrypoint"] == ["/pause"] and cfg["User"] == "65535:65535"
    name = f"dpe-img-pause-{uuid.uuid4().hex[:8]}"
    try:
        engine.docker("run", "-d", "--name", name, "--network", "none", "--read-only", "--cap-drop", "ALL",
                      "--security-opt", "no-new-privileges", test_images["pause"])
        time.sleep(2)
        state = json.loads(engine.docker("inspect", "--format", "{{json .State}}", name).stdout)
        assert state["Running"], state
        host_pid = state["Pid"]
        # a pod's container sharing the sandbox's PID namespace leaves an orphan behind: it becomes a
        # child of pause (PID 1 there), which must reap it once it ends
        script = ("import os, sys, time\n"
                  "if os.fork() == 0:\n"
                  "    if os.fork() == 0:\n"
                  "        time.sleep(1.5); os._exit(0)\n"
                  "    os._exit(0)\n"
                  "os.wait(); time.sleep(0.5)\n"
                  "ppids = [open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1]\n"
                  "         for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid())]\n"
                  "print('orphan parents:', ' '.join(ppids))\n")
        out = engine.docker("run", "--rm", "--network", "none", "--pid", f"container:{name}", base_image,
                            "python3", "-c", script).stdout
        assert out.strip() == "orphan parents: 1", out
        deadline = time.monotonic() + 30
        while _children(host_pid):
            assert time.monotonic() < deadline, f"pause left children behind: {_children(host_pid)}"
            time.sleep(0.2)
        assert engine.docker("inspect", "--format", "{{.State.Running}}", name).stdout.strip() == "true"

        engine.docker("kill", "--signal", "TERM", name)
        assert engine.docker("wait", name, timeout=30).stdout.strip() == "0"
        assert "shutting down, got signal 15" in engine.docker("logs", name).stderr
    finally:
        engine.docker("rm", "-f", name, check=False)


def test_ensure_cluster_images_saves_every_cluster_image_in_one_cached_tarball(engine):
    tarball = imgs.ensure_cluster_images()
    assert tarball.parent == imgs.cache_dir() / "images" and tarball.is_file()
    assert set(imgs.tarball_tags(tarball)) >= set(imgs.CLUSTER_IMAGES.values()), imgs.tarball_tags(tarball)
    key, mtime = imgs.cluster_inputs_key(), tarball.stat().st_mtime_ns

    def ids() -> dict[str, str]:
        return {role: engine.docker("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
                for role, tag in imgs.CLUSTER_IMAGES.items()}

    before = ids()
    again = imgs.ensure_cluster_images()
    after = ids()
    # images whose inputs did not change are not rebuilt (the stand-ins do not depend on src/)
    for role in ("kafka", "postgres", "pause", "base"):
        assert after[role] == before[role], role
    if tarball.name == f"cluster-{key}.tar" == f"cluster-{imgs.cluster_inputs_key()}.tar":
        # nothing changed meanwhile: the same tarball, untouched, and the same images
        assert again == tarball and tarball.stat().st_mtime_ns == mtime
        assert after == before
    else:  # src/ was edited during the test (several people at work): a new tarball for the new inputs
        assert again != tarball and set(imgs.tarball_tags(again)) >= set(imgs.CLUSTER_IMAGES.values())
