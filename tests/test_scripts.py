"""scripts/ (up, logs, kafdrop, psql, down), skaffold.yaml and the GitHub workflows.

- every script passes shellcheck (Debian package ``shellcheck``: the test fails, saying how to
  install it, when it is absent), answers ``--help`` with its usage, refuses bad usage with exit 2;
- with the prerequisites off PATH, each script exits 3 naming what is missing and how to install it;
- with fake docker/kind/kubectl/helm on PATH (they record their arguments), ``scripts/up`` builds,
  loads and installs with the expected helm values, ``scripts/logs`` follows as many pods as there
  are, ``scripts/psql`` runs the default count or the given arguments in the PostgreSQL pod;
- the workflows validate against the GitHub workflow JSON schema (tests/schemas, vendored from the
  check-jsonschema package, which takes it from SchemaStore), pass actionlint (the linter GitHub
  users run, v1.7.12 built by the testbed, with shellcheck on every ``run:``), and do what the e2e
  and the release need;
- skaffold.yaml validates against skaffold's own schema for its apiVersion (tests/schemas), builds
  both images from their Dockerfiles and deploys the chart with them: its helm values exist in the
  chart and ``helm template`` with them renders the built images.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("up", "logs", "kafdrop", "psql", "down")
SETUP_SCRIPTS = ("setup", "test", "run")  # the README's two commands and their shared set-up
SHELL_FILES = [ROOT / "scripts" / s for s in SCRIPTS + SETUP_SCRIPTS] + [
    ROOT / "scripts/lib.sh", ROOT / "images/local-base/build", ROOT / "images/build-venv.sh", ROOT / ".ci/run"]
SCHEMAS = ROOT / "tests" / "schemas"


def script(name: str, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / name), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL, cwd=ROOT)


# ---------------------------------------------------------------------------------------------
# shellcheck, --help, bad usage
# ---------------------------------------------------------------------------------------------
def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: apt-get install -y shellcheck (scripts/test should install it)")
    cp = subprocess.run([shellcheck, "--external-sources", "--severity=style", *map(str, SHELL_FILES)],
                        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr


@pytest.mark.parametrize("name", SETUP_SCRIPTS)
def test_setup_scripts_help_says_what_they_do_and_exit_codes(name):
    cp = script(name, "--help")
    assert cp.returncode == 0, cp.stderr
    assert f"scripts/{name}" in cp.stdout and "Exit code" in cp.stdout
    assert "set -e" not in cp.stdout, "the help is the header comment, not the code"


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:25])
    assert "scripts/test" in first_screen and "scripts/run" in first_screen
    assert "exec bash scripts/test" in (ROOT / ".ci/run").read_text()


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_0_with_usage(name):
    cp = script(name, "--help")
    assert cp.returncode == 0, cp.stderr
    assert f"usage: scripts/{name}" in cp.stdout
    assert "exit codes" in cp.stdout.lower() or "Exit codes" in cp.stdout
    assert script(name, "-h").stdout == cp.stdout


def test_local_base_build_help():
    cp = subprocess.run([str(ROOT / "images/local-base/build"), "--help"], capture_output=True, text=True)
    assert cp.returncode == 0 and "usage: images/local-base/build" in cp.stdout, cp.stderr


@pytest.mark.parametrize("name,args", [("up", ["20"]), ("up", ["--bogus"]), ("up", ["--rows", "10"]),
                                       ("logs", ["69", "38"]), ("logs", ["--consumer", "69"]),
                                       ("kafdrop", ["--port", "99999"]), ("down", ["--what"])])
def test_bad_usage_exits_2_with_a_reason(name, args):
    cp = script(name, *args)
    assert cp.returncode == 2, (cp.returncode, cp.stderr)
    assert f"{name}: error:" in cp.stderr and "--help" in cp.stderr


@pytest.mark.parametrize("raw,code", [("1", "01"), ("01", "01"), ("2a", "2A"), ("2B", "2B"), ("69", "69"),
                                      ("95", "95"), ("971", "971"), ("976", "976"), ("977", "977"),
                                      ("978", "978"), ("988", "988"), ("none", "none"), ("NONE", "none")])
def test_department_normalisation_matches_the_package(raw, code):
    from dpe_ingest import departments

    cp = subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/lib.sh"; normalize_department "$1"', "x", raw],
                        capture_output=True, text=True)
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.strip() == code == departments.normalize(raw)


@pytest.mark.parametrize("raw", ["0", "00", "20", "96", "970", "979", "989", "99", "2C", "6a", "690", "ab", "non", ""])
def test_invalid_departments_are_refused_like_the_package(raw):
    from dpe_ingest import departments

    cp = subprocess.run(["bash", "-c", f'source "{ROOT}/scripts/lib.sh"; normalize_department "$1"', "x", raw],
                        capture_output=True, text=True)
    assert cp.returncode == 2 and "valid forms are" in cp.stderr
    with pytest.raises(departments.InvalidDepartment):
        departments.normalize(raw)


# ---------------------------------------------------------------------------------------------
# missing prerequisites: exit 3, named, with how to install
# ---------------------------------------------------------------------------------------------
BASIC_TOOLS = ("bash", "env", "sed", "dirname", "basename", "cat", "tr", "grep", "wc", "id", "head", "cut",
               "printf", "mktemp", "rm", "mkdir", "sort", "uname", "tail")


def bare_path(tmp_path: Path, *extra: str) -> dict:
    """An environment whose PATH has only basic tools (and the fakes in ``extra``), and a repo copy whose
    .cache/bin is empty, so that nothing the machine happens to have is found."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    for tool in BASIC_TOOLS:
        found = shutil.which(tool)
        if found and not (bindir / tool).exists():
            (bindir / tool).symlink_to(found)
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "KUBECONFIG")}
    env["PATH"] = str(bindir)
    env["HOME"] = str(tmp_path)
    return env


def repo_copy(tmp_path: Path) -> Path:
    """scripts/ and the chart in a scratch repo (no .cache/bin with a helm in it)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "scripts", repo / "scripts")
    shutil.copytree(ROOT / "charts", repo / "charts")
    shutil.copytree(ROOT / "images", repo / "images")
    return repo


@pytest.mark.parametrize("name,args,missing", [
    ("up", [], ["docker", "kind", "kubectl", "helm"]),
    ("up", ["--minikube"], ["docker", "minikube", "kubectl", "helm"]),
    ("logs", [], ["kubectl"]),
    ("kafdrop", [], ["kubectl"]),
    ("psql", [], ["kubectl"]),
    ("down", [], ["kubectl", "helm"]),
    ("down", ["--cluster"], ["kind"]),
])
def test_missing_prerequisites_exit_3_naming_them_and_how_to_install(tmp_path, name, args, missing):
    repo = repo_copy(tmp_path)
    cp = subprocess.run([str(repo / "scripts" / name), *args], capture_output=True, text=True,
                        env=bare_path(tmp_path), stdin=subprocess.DEVNULL, timeout=60)
    assert cp.returncode == 3, (cp.returncode, cp.stdout, cp.stderr)
    first = cp.stderr.splitlines()[0]
    assert first.startswith(f"{name}: missing prerequisite(s): "), cp.stderr
    assert first.split(": ", 2)[2].split() == missing
    for cmd in missing:
        line = next(ln for ln in cp.stderr.splitlines() if ln.strip().startswith(f"- {cmd}:"))
        assert "install" in line and ("apt-get" in line or "go install" in line or "https://" in line), line


def test_a_docker_cli_without_daemon_is_a_missing_prerequisite(tmp_path):
    repo = repo_copy(tmp_path)
    env = bare_path(tmp_path)
    fakes(tmp_path, env, docker_info_fails=True)
    cp = subprocess.run([str(repo / "scripts/up")], capture_output=True, text=True, env=env, timeout=60)
    assert cp.returncode == 3, cp.stderr
    assert "running docker daemon" in cp.stderr and "DOCKER_HOST" in cp.stderr


# ---------------------------------------------------------------------------------------------
# with fake tools: what the scripts run
# ---------------------------------------------------------------------------------------------
FAKE = r"""#!/usr/bin/env bash
# records its command line, answers like the real tool where the scripts read the answer
printf '%s\0' "$(basename "$0")" "$@" >> "$FAKE_LOG"; printf '\n' >> "$FAKE_LOG"
case "$(basename "$0") $1 $2" in
"docker info "*) [ -z "${FAKE_DOCKER_INFO_FAILS:-}" ] || exit 1 ;;
"docker image inspect") echo "sha256:0123456789abcdef0123456789abcdef" ;;
"kind get clusters") printf '%s' "${FAKE_KIND_CLUSTERS:-}" ;;
"kubectl --namespace "*)
    shift 2
    if [ "$1 $2" = "get pods" ]; then
        for i in $(seq 1 "${FAKE_PODS:-0}"); do echo "pod/dpe-producer-$i"; done
    fi ;;
esac
exit 0
"""


def fakes(tmp_path: Path, env: dict, docker_info_fails: bool = False, **settings) -> Path:
    log = tmp_path / "calls.log"
    log.write_text("")
    bindir = Path(env["PATH"].split(":")[0])
    for tool in ("docker", "kind", "kubectl", "helm", "minikube", "git", "seq"):
        if tool == "seq":
            (bindir / "seq").unlink(missing_ok=True)
            (bindir / "seq").symlink_to(shutil.which("seq"))
            continue
        path = bindir / tool
        path.write_text(FAKE)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    env["FAKE_LOG"] = str(log)
    if docker_info_fails:
        env["FAKE_DOCKER_INFO_FAILS"] = "1"
    env.update({f"FAKE_{k.upper()}": str(v) for k, v in settings.items()})
    return log


def calls(log: Path) -> list[list[str]]:
    out = []
    for line in log.read_text().splitlines():
        if line:
            out.append(line.rstrip("\0").split("\0"))
    return out


def test_up_creates_the_cluster_builds_loads_and_installs(tmp_path):
    repo = repo_copy(tmp_path)
    env = bare_path(tmp_path)
    log = fakes(tmp_path, env)
    cp = subprocess.run([str(repo / "scripts/up"), "--offline", "--rows", "300", "1", "2a", "38", "--",
                         "--set", "ademe.pageSize=250"], capture_output=True, text=True, env=env, timeout=60)
    assert cp.returncode == 0, cp.stderr
    got = calls(log)
    assert ["kind", "create", "cluster", "--name", "dpe", "--wait", "180s"] in got
    builds = [c for c in got if c[:2] == ["docker", "build"]]
    assert [c[c.index("-f") + 1] for c in builds] == [f"{repo}/images/dpe-ingest/Dockerfile"] * 2
    assert [c[c.index("--target") + 1] for c in builds] == ["producer", "consumer"]
    assert all(c[-1] == str(repo) for c in builds), "the build context is the repository root"
    assert all("VERSION=0.1.0" in c for c in builds)
    loads = [c for c in got if c[:3] == ["kind", "load", "docker-image"]]
    assert [c[-1] for c in loads] == ["dpe-ingest-producer:dev-0123456789ab", "dpe-ingest-consumer:dev-0123456789ab"]
    helm = next(c for c in got if c[:3] == ["helm", "upgrade", "--install"])
    assert helm[3:5] == ["dpe", f"{repo}/charts/dpe-ingest"]
    sets = [helm[i + 1] for i, a in enumerate(helm) if a == "--set"]
    assert sets == ["departments={01,2A,38}", "producer.image.repository=dpe-ingest-producer",
                    "producer.image.tag=dev-0123456789ab", "consumer.image.repository=dpe-ingest-consumer",
                    "consumer.image.tag=dev-0123456789ab", "standin.enabled=true", "standin.rowsPerDepartment=300",
                    "ademe.pageSize=250"]
    assert "--namespace" in helm and helm[helm.index("--namespace") + 1] == "dpe"
    waited = [c[-3] for c in got if c[:4] == ["kubectl", "--namespace", "dpe", "rollout"]]
    assert waited == ["statefulset/dpe-kafka", "statefulset/dpe-postgresql", "deployment/dpe-consumer",
                      "deployment/dpe-standin"]
    assert "scripts/logs" in cp.stdout and "scripts/psql" in cp.stdout


def test_up_reuses_an_existing_cluster_and_defaults_to_69_01_38_without_standin(tmp_path):
    repo = repo_copy(tmp_path)
    env = bare_path(tmp_path)
    log = fakes(tmp_path, env, kind_clusters="other\ndpe\n")
    cp = subprocess.run([str(repo / "scripts/up")], capture_output=True, text=True, env=env, timeout=60)
    assert cp.returncode == 0, cp.stderr
    got = calls(log)
    assert not [c for c in got if c[:3] == ["kind", "create", "cluster"]]
    assert ["kind", "export", "kubeconfig", "--name", "dpe"] in got
    helm = next(c for c in got if c[:2] == ["helm", "upgrade"])
    assert "departments={69,01,38}" in helm and "standin.enabled=false" in helm


@pytest.mark.parametrize("args,selector", [
    ([], "app.kubernetes.io/instance=dpe,app.kubernetes.io/component=producer"),
    (["1"], "app.kubernetes.io/instance=dpe,app.kubernetes.io/component=producer,dpe-ingest/department=01"),
    (["--consumer"], "app.kubernetes.io/instance=dpe,app.kubernetes.io/component=consumer"),
])
def test_logs_follows_every_matching_pod(tmp_path, args, selector):
    repo = repo_copy(tmp_path)
    env = bare_path(tmp_path)
    log = fakes(tmp_path, env, pods=7)
    cp = subprocess.run([str(repo / "scripts/logs"), *args], capture_output=True, text=True, env=env, timeout=60)
    assert cp.returncode == 0, cp.stderr
    follow = calls(log)[-1]
    assert follow[:4] == ["kubectl", "--namespace", "dpe", "logs"]
    assert "-f" in follow and "--prefix" in follow
    assert follow[follow.index("-l") + 1] == selector
    # kubectl's default is 5 concurrent streams: raised to the number of pods
    assert follow[follow.index("--max-log-requests") + 1] == "7"


def test_logs_without_pods_says_so(tmp_path):
    repo = repo_copy(tmp_path)
    env = bare_path(tmp_path)
    fakes(tmp_path, env, pods=0)
    cp = subprocess.run([str(repo / "scripts/logs"), "69"], capture_output=True, text=True, env=env, timeout=60)
    assert cp.returncode == 1 and "no producer pods of department 69" in cp.stderr


def test_psql_default_query_and_pass_through(tmp_path):
    repo = repo_copy(tmp_path)
    env = bare_path(tmp_path)
    log = fakes(tmp_path, env)
    cp = subprocess.run([str(repo / "scripts/psql")], capture_output=True, text=True, env=env, timeout=60)
    assert cp.returncode == 0, cp.stderr
    run = calls(log)[-1]
    assert run[:6] == ["kubectl", "--namespace", "dpe", "exec", "-i", "dpe-postgresql-0"]
    inner = run[run.index("--") + 1:]
    assert inner[:2] == ["sh", "-c"] and 'PGPASSWORD="$POSTGRES_PASSWORD"' in inner[2] and "-h 127.0.0.1" in inner[2]
    assert inner[3:5] == ["psql", "-c"]
    assert re.search(r"SELECT departement, count\(\*\).* FROM dpe_data GROUP BY departement", inner[5])
    assert ["kubectl", "--namespace", "dpe", "get", "secret", "dpe-postgresql"] in calls(log)
    log.write_text("")
    cp = subprocess.run([str(repo / "scripts/psql"), "-A", "-t", "-c", "SELECT 1"], capture_output=True, text=True,
                        env=env, timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert calls(log)[-1][-4:] == ["-A", "-t", "-c", "SELECT 1"]


def test_kafdrop_port_forwards_on_loopback(tmp_path):
    repo = repo_copy(tmp_path)
    env = bare_path(tmp_path)
    log = fakes(tmp_path, env)
    cp = subprocess.run([str(repo / "scripts/kafdrop"), "--port", "9100"], capture_output=True, text=True, env=env,
                        timeout=60)
    assert cp.returncode == 0, cp.stderr
    assert "http://localhost:9100" in cp.stdout
    assert calls(log)[-1] == ["kubectl", "--namespace", "dpe", "port-forward", "--address", "127.0.0.1",
                              "svc/dpe-kafdrop", "9100:9000"]


def test_down_uninstalls_and_deletes_the_cluster_on_request(tmp_path):
    repo = repo_copy(tmp_path)
    env = bare_path(tmp_path)
    log = fakes(tmp_path, env)
    assert subprocess.run([str(repo / "scripts/down"), "--purge"], env=env, capture_output=True).returncode == 0
    got = calls(log)
    assert ["helm", "uninstall", "dpe", "--namespace", "dpe", "--wait"] in got
    assert ["kubectl", "delete", "namespace", "dpe", "--ignore-not-found", "--wait"] in got
    log.write_text("")
    assert subprocess.run([str(repo / "scripts/down"), "--cluster"], env=env, capture_output=True).returncode == 0
    assert calls(log) == [["kind", "delete", "cluster", "--name", "dpe"]]


# ---------------------------------------------------------------------------------------------
# GitHub workflows
# ---------------------------------------------------------------------------------------------
class WorkflowLoader(yaml.SafeLoader):
    """YAML 1.2 booleans as GitHub reads them: `on:` is a key, not True."""


WorkflowLoader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
WorkflowLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                     list("tTfF"))


def workflow(name: str) -> dict:
    return yaml.load((ROOT / ".github/workflows" / name).read_text(), Loader=WorkflowLoader)


WORKFLOWS = sorted(p.name for p in (ROOT / ".github/workflows").glob("*.y*ml"))


def test_the_workflows_are_those_expected():
    assert WORKFLOWS == ["ci.yml", "e2e-kind.yml", "release.yml"]


def _schema_errors(doc: dict) -> list[str]:
    import jsonschema

    schema = json.loads((SCHEMAS / "github-workflow.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=str)
    return [f"{list(e.path)}: {e.message}" for e in errors]


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_is_valid_against_the_github_workflow_schema(name):
    errors = _schema_errors(workflow(name))
    assert not errors, "\n".join(errors)
    if name != "release.yml":
        assert {"push", "pull_request"} <= set(workflow(name)["on"])


def test_the_workflow_schema_refuses_a_misspelt_key():
    doc = workflow("ci.yml")
    job = doc["jobs"]["ci"]
    job["runs_on"] = job.pop("runs-on")
    assert any("runs_on" in e or "runs-on" in e for e in _schema_errors(doc))


@pytest.fixture(scope="module")
def actionlint() -> list[str]:
    """actionlint (the testbed's build, or $ACTIONLINT) with shellcheck and pyflakes given explicitly,
    so that every ``run:`` script is checked here exactly as on a developer's machine."""
    from dpe_devkit.testbed import LaunchError
    from dpe_devkit.testbed.actionlint import ensure_actionlint

    try:
        binary = ensure_actionlint(quiet=True)
    except LaunchError as exc:
        pytest.fail(f"no actionlint: {exc} (scripts/setup --tests builds it into .cache/bin)")
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.fail("shellcheck is not installed: apt-get install -y shellcheck (actionlint runs it on run: "
                    "scripts; scripts/test should install it)")
    pyflakes = Path(sys.executable).with_name("pyflakes")
    assert pyflakes.is_file(), f"{pyflakes} missing: pip install -e '.[dev]'"
    return [str(binary), f"-shellcheck={shellcheck}", f"-pyflakes={pyflakes}", "-no-color", "-oneline"]


def test_workflows_pass_actionlint(actionlint):
    files = [f".github/workflows/{name}" for name in WORKFLOWS]
    cp = subprocess.run([*actionlint, *files], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert cp.returncode == 0, f"actionlint (exit {cp.returncode}):\n{cp.stdout}{cp.stderr}"


def test_actionlint_refuses_a_broken_workflow(actionlint, tmp_path):
    wf = tmp_path / ".github" / "workflows" / "broken.yml"
    wf.parent.mkdir(parents=True)
    wf.write_text(
        "name: broken\n"
        "on: push\n"
        "jobs:\n"
        "  build:\n"
        "    runs-on: ubuntu-24.04\n"
        "    steps:\n"
        "      - uses: actions/checkout@v4\n"
        "        with:\n"
        "          fetch-deepth: 0\n"                      # not an input of actions/checkout
        "      - run: echo ${{ github.refname }}\n"        # no such property of github
        "      - run: for f in $(ls *.txt); do cat $f; done\n"  # shellcheck: SC2045, SC2086
    )
    cp = subprocess.run([*actionlint, str(wf)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert cp.returncode == 1, (cp.returncode, cp.stdout, cp.stderr)
    out = cp.stdout
    assert '"fetch-deepth"' in out and "[action]" in out, out
    assert '"refname"' in out and "[expression]" in out, out
    assert "SC2045" in out and "[shellcheck]" in out, out


def test_ci_workflow_runs_ci_run():
    steps = [s.get("run", "") for job in workflow("ci.yml")["jobs"].values() for s in job["steps"]]
    assert any(re.search(r"\bbash \.ci/run\b", r) for r in steps), steps


def test_e2e_workflow_runs_up_offline_waits_for_jobs_and_checks_rows():
    doc = workflow("e2e-kind.yml")
    (job,) = doc["jobs"].values()
    runs = "\n".join(s.get("run", "") for s in job["steps"])
    rows = doc["env"]["ROWS_PER_DEPARTMENT"]
    assert doc["env"]["DEPARTMENTS"].split() == ["69", "01", "38"]
    assert re.search(r'scripts/up --offline --rows "\$ROWS_PER_DEPARTMENT"', runs)
    assert "kubectl -n dpe wait --for=condition=complete job" in runs
    assert "app.kubernetes.io/component=producer" in runs
    assert "scripts/psql" in runs and "$ROWS_PER_DEPARTMENT" in runs
    assert any(s.get("if") == "failure()" for s in job["steps"]), "diagnostics on failure"
    assert int(rows) > 0


def test_release_workflow_builds_both_images_for_two_platforms_and_pushes_them_to_ghcr():
    doc = workflow("release.yml")
    assert doc["on"] == {"push": {"tags": ["v[0-9]+.[0-9]+.[0-9]+*"]}}
    assert doc["permissions"] == {"contents": "read"}, "write access only where it is needed"
    images = doc["jobs"]["images"]
    assert images["permissions"]["packages"] == "write"
    components = images["strategy"]["matrix"]["component"]
    assert components == ["producer", "consumer"]
    steps = images["steps"]
    login = next(s for s in steps if s.get("uses", "").startswith("docker/login-action@"))
    assert login["with"]["registry"] == "${{ env.REGISTRY }}" and doc["env"]["REGISTRY"] == "ghcr.io"
    assert login["with"]["password"] == "${{ secrets.GITHUB_TOKEN }}"
    meta = next(s for s in steps if s.get("uses", "").startswith("docker/metadata-action@"))
    assert meta["with"]["images"] == \
        "${{ env.REGISTRY }}/${{ needs.version.outputs.owner }}/dpe-ingest-${{ matrix.component }}"
    assert "type=semver,pattern={{version}}" in meta["with"]["tags"].splitlines()
    build = next(s for s in steps if s.get("uses", "").startswith("docker/build-push-action@"))
    assert build["with"]["context"] == "."
    assert build["with"]["platforms"].split(",") == ["linux/amd64", "linux/arm64"]
    assert build["with"]["push"] is True and build["with"]["tags"] == "${{ steps.meta.outputs.tags }}"
    assert "VERSION=${{ needs.version.outputs.version }}" in build["with"]["build-args"].splitlines()
    assert any(s.get("uses", "").startswith("docker/setup-qemu-action@") for s in steps), "arm64 on amd64 runners"
    # the same Dockerfile (one target per image) the image tests and scripts/up build, and the
    # repository names of the chart
    values = chart_values()
    for comp in components:
        assert build["with"]["target"].replace("${{ matrix.component }}", comp) == comp
        assert build["with"]["file"] == "images/dpe-ingest/Dockerfile" and (ROOT / build["with"]["file"]).is_file()
        assert values[comp]["image"]["repository"] == f"dpe-ingest-{comp}"


def test_release_workflow_pushes_the_chart_as_an_oci_artifact_after_the_images():
    doc = workflow("release.yml")
    chart = doc["jobs"]["chart"]
    assert set(chart["needs"]) == {"version", "images"} and chart["permissions"]["packages"] == "write"
    runs = "\n".join(s.get("run", "") for s in chart["steps"])
    assert "helm package charts/dpe-ingest --destination dist" in runs
    assert 'helm registry login "$REGISTRY"' in runs and "--password-stdin" in runs
    assert 'helm push "dist/dpe-ingest-$VERSION.tgz" "oci://$REGISTRY/$OWNER/charts"' in runs
    setup = next(s for s in chart["steps"] if s.get("uses", "").startswith("azure/setup-helm@"))
    assert setup["with"]["version"] == "${{ env.HELM_VERSION }}" and doc["env"]["HELM_VERSION"] == "v3.22.0"


def _release_check(tmp_path: Path, tag: str, owner: str = "Some-Owner", repo: Path = ROOT):
    """Runs the release's version step as GitHub would (bash, the repository as working directory)."""
    (step,) = [s for s in workflow("release.yml")["jobs"]["version"]["steps"] if s.get("id") == "check"]
    out = tmp_path / "github_output"
    out.write_text("")
    env = dict(os.environ, GITHUB_REF_NAME=tag, GITHUB_REPOSITORY_OWNER=owner, GITHUB_OUTPUT=str(out))
    cp = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step["run"]], capture_output=True, text=True, env=env,
                        cwd=repo, timeout=60)
    return cp, dict(line.split("=", 1) for line in out.read_text().splitlines())


def test_release_version_step_accepts_the_chart_version_and_lowers_the_owner(tmp_path):
    version = yaml.safe_load((ROOT / "charts/dpe-ingest/Chart.yaml").read_text())["version"]
    cp, outputs = _release_check(tmp_path, f"v{version}")
    assert cp.returncode == 0, cp.stdout + cp.stderr
    assert outputs == {"version": version, "owner": "some-owner"}


def test_release_version_step_refuses_a_tag_that_is_not_the_chart_version(tmp_path):
    cp, outputs = _release_check(tmp_path, "v99.0.0")
    assert cp.returncode == 1 and outputs == {}
    assert "::error::tag v99.0.0 is not v + the version of Chart.yaml" in cp.stdout
    # the chart and the package must agree too: a chart bumped alone is refused
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "charts", repo / "charts")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    chart_yaml = repo / "charts/dpe-ingest/Chart.yaml"
    text = chart_yaml.read_text()
    version = yaml.safe_load(text)["version"]
    chart_yaml.write_text(text.replace(f"version: {version}", "version: 9.9.9").replace(
        f'appVersion: "{version}"', 'appVersion: "9.9.9"'))
    assert yaml.safe_load(chart_yaml.read_text())["appVersion"] == "9.9.9"
    cp, _ = _release_check(tmp_path, "v9.9.9", repo=repo)
    assert cp.returncode == 1 and f"pyproject.toml ({version})" in cp.stdout, cp.stdout


# ---------------------------------------------------------------------------------------------
# skaffold.yaml
# ---------------------------------------------------------------------------------------------
def skaffold() -> dict:
    return yaml.safe_load((ROOT / "skaffold.yaml").read_text())


def chart_values() -> dict:
    return yaml.safe_load((ROOT / "charts/dpe-ingest/values.yaml").read_text())


def sanitized(image: str) -> str:
    return re.sub(r"[-/.]", "_", image)


def skaffold_schema_errors(doc: dict) -> list[str]:
    """What skaffold's own JSON schema for the document's apiVersion (tests/schemas) refuses."""
    import jsonschema

    version = doc["apiVersion"].split("/", 1)[1]
    path = SCHEMAS / f"skaffold-{version}.json"
    assert path.is_file(), f"no schema for {doc['apiVersion']}: vendor it as {path} (see tests/schemas/README.md)"
    validator = jsonschema.Draft7Validator(json.loads(path.read_text()))
    out: list[str] = []

    def leaves(err) -> None:
        # the schema nests anyOf (the top level, each kind of build/deploy): the useful messages
        # are the innermost ones, e.g. "Additional properties are not allowed ('tagpolicy' was unexpected)"
        if not err.context:
            line = f"/{'/'.join(map(str, err.absolute_path))}: {err.message}"
            if line not in out:
                out.append(line)
        for sub in err.context:
            leaves(sub)

    for err in validator.iter_errors(doc):
        leaves(err)
    return out


def with_profile(doc: dict, name: str) -> dict:
    """The configuration with one profile's JSON patches (add/replace) applied, as skaffold does."""
    import copy

    doc = copy.deepcopy(doc)
    (profile,) = [p for p in doc["profiles"] if p["name"] == name]
    for patch in profile.get("patches", []):
        assert patch["op"] in ("add", "replace"), patch
        *parents, last = patch["path"].strip("/").split("/")
        node = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if patch["op"] == "replace":
            assert last in node, f"profile {name}: {patch['path']} does not exist"
        node[last] = patch["value"]
    del doc["profiles"]
    return doc


def test_skaffold_yaml_is_valid_against_skaffolds_own_schema():
    doc = skaffold()
    assert doc["apiVersion"] == "skaffold/v4beta14"
    errors = skaffold_schema_errors(doc)
    assert not errors, "\n".join(errors)
    for name in [p["name"] for p in doc["profiles"]]:
        errors = skaffold_schema_errors(with_profile(doc, name))
        assert not errors, f"with profile {name}:\n" + "\n".join(errors)


@pytest.mark.parametrize("where,misspelt", [
    (("deploy", "helm", "releases", 0), "chartPath"),
    (("build",), "tagPolicy"),
    (("build", "artifacts", 1, "docker"), "dockerfile"),
    ((), "deploy"),
])
def test_skaffold_schema_refuses_a_misspelt_key(where, misspelt):
    doc = skaffold()
    node = doc
    for part in where:
        node = node[part]
    wrong = misspelt.lower() if misspelt != misspelt.lower() else misspelt + "s"
    node[wrong] = node.pop(misspelt)
    errors = skaffold_schema_errors(doc)
    assert errors, f"{wrong} accepted"
    assert any(f"'{wrong}' was unexpected" in e for e in errors), errors


def test_skaffold_schema_refuses_a_profile_patch_that_makes_an_invalid_config():
    doc = skaffold()
    doc["profiles"][0]["patches"] = [{"op": "add", "path": "/deploy/kubecontext", "value": "kind-dpe"}]
    errors = skaffold_schema_errors(with_profile(doc, doc["profiles"][0]["name"]))
    assert any("'kubecontext' was unexpected" in e for e in errors), errors


def test_skaffold_builds_both_images_from_the_repo_with_their_dockerfiles():
    doc = skaffold()
    assert re.fullmatch(r"skaffold/v4beta(1[1-9]|[2-9]\d)", doc["apiVersion"]), doc["apiVersion"]
    assert doc["kind"] == "Config"
    values = chart_values()
    arts = {a["image"]: a for a in doc["build"]["artifacts"]}
    assert set(arts) == {values["producer"]["image"]["repository"], values["consumer"]["image"]["repository"]}
    for comp in ("producer", "consumer"):
        art = arts[values[comp]["image"]["repository"]]
        assert art["context"] == "."
        assert art["docker"]["dockerfile"] == "images/dpe-ingest/Dockerfile" and art["docker"]["target"] == comp
        assert (ROOT / art["docker"]["dockerfile"]).is_file()
        assert "PYTHON_IMAGE" in art["docker"]["buildArgs"]
    assert doc["build"]["local"]["push"] is False


def test_skaffold_helm_values_are_the_built_images_and_exist_in_the_chart():
    doc = skaffold()
    (release,) = doc["deploy"]["helm"]["releases"]
    assert release["chartPath"] == "charts/dpe-ingest"
    svt = release["setValueTemplates"]
    for comp in ("producer", "consumer"):
        name = sanitized(f"dpe-ingest-{comp}")
        assert svt[f"{comp}.image.repository"] == f"{{{{.IMAGE_REPO_{name}}}}}"
        assert svt[f"{comp}.image.tag"] == f"{{{{.IMAGE_TAG_{name}}}}}"
    assert ".DEPARTMENTS" in svt["departments"]
    values = chart_values()
    for key in [*svt, *release.get("setValues", {})]:
        node = values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"skaffold sets {key}: not a value of the chart"
            node = node[part]


def test_skaffold_profiles_kind_minikube_offline_patch_existing_paths():
    doc = skaffold()
    profiles = {p["name"]: p for p in doc["profiles"]}
    assert {"kind", "minikube", "offline"} <= set(profiles)
    assert profiles["kind"]["activation"] == [{"kubeContext": "kind-dpe"}]
    for prof in profiles.values():
        for patch in prof.get("patches", []):
            parts = patch["path"].strip("/").split("/")
            node = doc
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            if patch["op"] == "replace":
                assert parts[-1] in node, patch
    offline = profiles["offline"]["patches"]
    assert {"op": "replace", "path": "/deploy/helm/releases/0/setValues/standin.enabled", "value": True} in offline


def test_chart_renders_the_images_and_departments_skaffold_sets(helm_bin):
    helm = str(helm_bin)  # the testbed's helm v3.22.0 (built when missing; the test fails if it cannot be)
    # the values skaffold's templates give with DEPARTMENTS unset and tags computed by its tagger
    args = ["--set", "departments={69,01,38}", "--set", "producer.image.repository=dpe-ingest-producer",
            "--set", "producer.image.tag=abc123", "--set", "consumer.image.repository=dpe-ingest-consumer",
            "--set", "consumer.image.tag=def456", "--set", "standin.enabled=true"]
    cp = subprocess.run([helm, "template", "dpe", str(ROOT / "charts/dpe-ingest"), *args], capture_output=True,
                        text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    docs = [d for d in yaml.safe_load_all(cp.stdout) if d]
    images: dict[str, set] = {}
    for d in docs:
        spec = d.get("spec", {})
        pod = spec.get("template", {}).get("spec") or spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
        if d.get("kind") == "Pod":
            pod = spec
        for c in (pod or {}).get("containers", []) + (pod or {}).get("initContainers", []):
            images.setdefault(c["image"], set()).add(d["kind"])
    assert "dpe-ingest-producer:abc123" in images and "Job" in images["dpe-ingest-producer:abc123"]
    assert "Deployment" in images["dpe-ingest-producer:abc123"], "the stand-in runs in the producer image"
    assert images.get("dpe-ingest-consumer:def456") == {"Deployment"}
    jobs = [d for d in docs if d.get("kind") == "Job"]
    deps = sorted(d["spec"]["template"]["metadata"]["labels"]["dpe-ingest/department"] for d in jobs)
    assert deps == ["01", "38", "69"]
