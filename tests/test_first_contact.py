"""The commands a user types first, run as they are written, through bash, with the real helm.

- every ``helm install`` / ``helm upgrade`` of README.md and docs/chart.md (and the ones NOTES.txt
  prints) renders: it is run by bash exactly as documented, with ``install``/``upgrade`` turned
  into ``template`` (no cluster here) and the released chart (``oci://ghcr.io/<owner>/…``) replaced
  by this repository's chart; the producer Jobs are the departments the command names;
- every documented failure (``$ command`` followed by ``Error: …`` in a text block) fails, with
  exactly that error: ``--set departments=69,01,38`` stops in helm's own parser;
- NOTES.txt warns, with the commands to load them, when the images are the local names scripts/up
  builds, and only then;
- no doc sends users to a clone URL that does not exist.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dpe-ingest"
CHART_META = yaml.safe_load((CHART / "Chart.yaml").read_text())
HELM_DOCS = ["README.md", "docs/chart.md"]  # where helm install commands are documented
PARSER_ERROR = 'failed parsing --set data: key "01" has no value (cannot end with ,)'
OWNER = "example-owner"


# ---------------------------------------------------------------------------------------------
# reading the docs
# ---------------------------------------------------------------------------------------------
def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every ``` block."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def joined_lines(body: str) -> list[str]:
    """Lines with their backslash continuations joined, as the shell reads them."""
    out: list[str] = []
    current = ""
    for line in body.splitlines():
        if line.endswith("\\"):
            current += line[:-1]
            continue
        out.append((current + line).strip())
        current = ""
    return [line for line in out if line]


def documented_commands(doc: str) -> list[str]:
    """The ``helm install``/``helm upgrade`` commands of the doc's shell blocks and inline code."""
    text = (ROOT / doc).read_text()
    found = [line for lang, body in fenced_blocks(text) if lang == "sh" for line in joined_lines(body)
             if re.match(r"helm (install|upgrade) ", line)]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    found += [m.group(1) for m in re.finditer(r"`(helm (?:install|upgrade) [^`]+)`", prose.replace("\n", " "))]
    return found


def documented_failures(text: str) -> list[tuple[str, str]]:
    """(command, error) pairs of the text blocks: a ``$ command`` line followed by an ``Error:`` line."""
    out = []
    for lang, body in fenced_blocks(text):
        lines = body.splitlines()
        for cmd, nxt in zip(lines, lines[1:]):
            if lang == "text" and cmd.startswith("$ helm ") and nxt.startswith("Error: "):
                out.append((cmd[2:], nxt))
    return out


# ---------------------------------------------------------------------------------------------
# running them
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shell_env(helm_bin, tmp_path_factory) -> dict:
    """bash with the real helm first on PATH, no cluster (KUBECONFIG points nowhere), helm's own
    directories in a temp dir."""
    tmp = tmp_path_factory.mktemp("first-contact")
    (tmp / "bin").mkdir()
    (tmp / "bin" / "helm").symlink_to(helm_bin)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    env.update(PATH=f"{tmp / 'bin'}:{os.environ['PATH']}", HOME=str(tmp), KUBECONFIG=str(tmp / "no-cluster"),
               HELM_CACHE_HOME=str(tmp / "cache"), HELM_CONFIG_HOME=str(tmp / "config"),
               HELM_DATA_HOME=str(tmp / "data"))
    return env


def bash(command: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
                          stdin=subprocess.DEVNULL)


def as_template(command: str) -> str:
    """The documented command as a ``helm template`` of this repository's chart (no cluster needed)."""
    cmd = re.sub(r"^helm (install|upgrade) ", "helm template ", command)
    cmd = cmd.replace(" --reuse-values", "")
    m = re.search(r"oci://ghcr\.io/<owner>/charts/dpe-ingest --version (\S+)", cmd)
    if m:
        assert m.group(1) == CHART_META["version"], f"documented --version {m.group(1)}, Chart.yaml says " \
                                                    f"{CHART_META['version']}: {command}"
        cmd = cmd.replace(m.group(0), "charts/dpe-ingest")
    assert "oci://" not in cmd, command
    return cmd.replace("<owner>", OWNER)


def departments_named(command: str) -> list[str] | None:
    """The department codes the command's ``--set[-string] departments=…`` gives, as the user means them."""
    args = shlex.split(command, comments=True)
    for flag, value in zip(args, args[1:]):
        if flag in ("--set", "--set-string") and value.startswith("departments="):
            raw = value.split("=", 1)[1].strip("{}").replace("\\", "")
            return sorted(code for code in re.split(r"[,\s]+", raw) if code)
    return None


def render(command: str, env: dict) -> list[dict]:
    cp = bash(as_template(command), env)
    assert cp.returncode == 0, f"documented command fails:\n  {command}\n{cp.stderr}"
    return [d for d in yaml.safe_load_all(cp.stdout) if d]


def producer_departments(docs: list[dict]) -> list[str]:
    return sorted(d["metadata"]["labels"]["dpe-ingest/department"] for d in docs if d.get("kind") == "Job"
                  and d["metadata"]["labels"].get("app.kubernetes.io/component") == "producer")


def images(docs: list[dict]) -> set[str]:
    out = set()
    for d in docs:
        spec = d.get("spec", {}).get("template", {}).get("spec", {})
        out |= {c["image"] for c in spec.get("containers", []) + spec.get("initContainers", [])}
    return out


# ---------------------------------------------------------------------------------------------
# the documented commands render
# ---------------------------------------------------------------------------------------------
ALL_COMMANDS = [(doc, cmd) for doc in HELM_DOCS for cmd in documented_commands(doc)]


def test_the_docs_show_the_forms_that_work():
    readme = documented_commands("README.md")
    chart = documented_commands("docs/chart.md")
    assert 'helm install dpe charts/dpe-ingest --set departments="{69,01,38}"' in readme
    assert any(c.startswith("helm install dpe oci://ghcr.io/<owner>/charts/dpe-ingest --version ") for c in readme)
    for form in ('--set departments="{69,01,38}"', '--set departments="69 01 38"', "--set departments='69\\,01\\,38'"):
        assert any(c.endswith(form) or f"{form} " in c for c in chart), form
    assert len(ALL_COMMANDS) >= 10


@pytest.mark.parametrize("doc,command", ALL_COMMANDS, ids=[f"{d}:{c[:70]}" for d, c in ALL_COMMANDS])
def test_documented_command_renders_what_it_says(shell_env, doc, command):
    docs = render(command, shell_env)
    deps = departments_named(command)
    if deps is not None:
        assert producer_departments(docs) == deps, command
    else:
        assert producer_departments(docs), command
    if "oci://" in command:
        version = CHART_META["appVersion"]
        assert {f"ghcr.io/{OWNER}/dpe-ingest-producer:{version}",
                f"ghcr.io/{OWNER}/dpe-ingest-consumer:{version}"} <= images(docs), images(docs)
        assert not {i for i in images(docs) if i.startswith("dpe-ingest-")}, "a local image left in a release install"


# ---------------------------------------------------------------------------------------------
# the documented failures fail, with the documented error
# ---------------------------------------------------------------------------------------------
ALL_FAILURES = [(doc, cmd, err) for doc in HELM_DOCS for cmd, err in documented_failures((ROOT / doc).read_text())]


def test_the_parser_error_is_documented_where_users_look_first():
    for doc in HELM_DOCS:
        failures = dict(documented_failures((ROOT / doc).read_text()))
        assert failures.get("helm install dpe charts/dpe-ingest --set departments=69,01,38") == \
            f"Error: INSTALLATION FAILED: {PARSER_ERROR}", doc
    readme = (ROOT / "README.md").read_text()
    kubernetes_block = readme[:readme.index("## What you get")]
    assert PARSER_ERROR in kubernetes_block


@pytest.mark.parametrize("doc,command,error", ALL_FAILURES, ids=[f"{d}:{c[:70]}" for d, c, _ in ALL_FAILURES])
def test_documented_failure_fails_with_the_documented_error(shell_env, doc, command, error):
    cp = bash(command, shell_env)
    assert cp.returncode != 0, f"{command} succeeded"
    assert cp.stderr.strip() == error, f"{command}\n  documented: {error}\n  helm says:  {cp.stderr.strip()}"


def test_the_failing_form_fails_in_helm_not_in_the_chart(shell_env):
    """`--set departments=69,01,38` never reaches the templates: the same error with any chart."""
    cp = bash("helm template dpe charts/dpe-ingest --set departments=69,01,38", shell_env)
    assert cp.returncode == 1 and cp.stderr.strip() == f"Error: {PARSER_ERROR}", cp.stderr
    cp = bash("helm template dpe charts/dpe-ingest --set 'departments=69\\,01\\,38'", shell_env)
    assert cp.returncode == 0, cp.stderr


def test_the_documented_department_error_is_the_charts(shell_env):
    """docs/chart.md quotes the chart's refusal of a bad code (the forms list of its helpers)."""
    text = (ROOT / "docs/chart.md").read_text()
    (example,) = re.findall(r"^    (departments: invalid department code .*)$", text, re.M)
    code = re.match(r'departments: invalid department code "([^"]+)"', example).group(1)
    cp = bash(f"helm template dpe charts/dpe-ingest --set departments={code}", shell_env)
    assert cp.returncode == 1
    assert example.removesuffix(" (…)") in cp.stderr, f"documented: {example}\nhelm says: {cp.stderr}"


# ---------------------------------------------------------------------------------------------
# NOTES.txt
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def notes(shell_env, tmp_path_factory):
    """``notes(*helm args)``: NOTES.txt rendered through a copy of the chart where it is wrapped in a
    ConfigMap (``helm template`` does not render NOTES)."""
    copy = tmp_path_factory.mktemp("notes-chart") / "dpe-ingest"
    shutil.copytree(CHART, copy)
    (copy / "notes.tpl").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (copy / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "notes.tpl") . | quote }}\n')

    def make(*args: str) -> str:
        cmd = ["helm", "template", "dpe", str(copy), "--show-only", "templates/zz-notes.yaml", *args]
        cp = subprocess.run(cmd, capture_output=True, text=True, env=shell_env, timeout=120)
        assert cp.returncode == 0, cp.stderr
        return yaml.safe_load(cp.stdout)["data"]["notes"]

    return make


def test_notes_commands_run_and_warn_about_the_parser(notes, shell_env):
    text = notes("--set", "departments={69,01,38}")
    assert PARSER_ERROR.split(": ", 1)[1] in text, "the parser's error text, for a search to find it"
    upgrades = [line.strip() for line in text.splitlines() if line.strip().startswith("helm upgrade ")]
    add = next(c for c in upgrades if "departments=" in c)
    assert add == 'helm upgrade dpe charts/dpe-ingest --reuse-values --set departments="{69,01,38,13}"'
    spaces = re.search(r'(--set departments="[^"]*")\.', text).group(1)
    assert spaces == '--set departments="69 01 38 13"'
    for command in (add, f"helm upgrade dpe charts/dpe-ingest {spaces}"):
        assert producer_departments(render(command, shell_env)) == ["01", "13", "38", "69"], command


def test_notes_warn_about_local_images_with_the_commands_to_load_them(notes):
    version = CHART_META["appVersion"]
    text = notes()
    warning = text[text.index("WARNING:"):text.index("1. Watch")]
    assert f"dpe-ingest-producer:{version} and dpe-ingest-consumer:{version} are local image names" in warning
    assert "ErrImagePull" in warning and "scripts/up" in warning
    for comp in ("producer", "consumer"):
        assert f"kind load docker-image --name <cluster> dpe-ingest-{comp}:{version}" in warning
        assert f"minikube image load dpe-ingest-{comp}:{version}" in warning
    assert "producer.image.repository=ghcr.io/<owner>/dpe-ingest-producer" in warning


def test_notes_name_the_image_actually_used(notes):
    # scripts/up's content tags, one local image only
    text = notes("--set", "producer.image.tag=dev-0123456789ab",
                 "--set", f"consumer.image.repository=ghcr.io/{OWNER}/dpe-ingest-consumer")
    assert "WARNING: dpe-ingest-producer:dev-0123456789ab is a local image name" in text
    assert "kind load docker-image --name <cluster> dpe-ingest-producer:dev-0123456789ab" in text
    assert "kind load docker-image --name <cluster> ghcr.io" not in text and "dpe-ingest-consumer:" not in text


def test_notes_do_not_warn_with_registry_images(notes):
    text = notes("--set", f"producer.image.repository=ghcr.io/{OWNER}/dpe-ingest-producer",
                 "--set", f"consumer.image.repository=ghcr.io/{OWNER}/dpe-ingest-consumer")
    assert "WARNING" not in text and "kind load" not in text and "1. Watch the pods" in text


# ---------------------------------------------------------------------------------------------
# getting the code
# ---------------------------------------------------------------------------------------------
def test_no_doc_sends_users_to_a_clone_url_that_does_not_exist():
    docs = ["README.md"] + [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").glob("*.md"))]
    clones = []
    for doc in docs:
        text = (ROOT / doc).read_text()
        assert "github.com/dpe-ingest/dpe-ingest" not in text, f"{doc}: that repository does not exist"
        for m in re.finditer(r"git clone (<[^>\n]+>|\S+)", text):
            # no repository of this project is published under a fixed address: a placeholder it is
            assert re.fullmatch(r"<[^>]+>", m.group(1)), (doc, m.group(0))
            clones.append((doc, m.group(1)))
    assert ("docs/quickstart.md", "<URL of this repository>") in clones, clones
