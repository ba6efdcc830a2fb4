"""A real Kubernetes API server for the chart tests: kube-apiserver v1.37.2 on etcd v3.6.16.

No cluster can pull images here, but the control plane that validates and admits what ``helm
install`` sends needs none: both binaries are built from the Go module proxy (as helm is) into
``<cache>/bin`` and started as local processes.  What this catches that an offline schema check
cannot: server-side validation of every object, Pod Security admission (``restricted``), helm's
install/upgrade/uninstall against a live API, and ``dpe-ingest status`` reading real Job objects.
There is no kubelet, scheduler or controller-manager: pods are never created from the workloads.

kube-apiserver lives in ``k8s.io/kubernetes``, whose go.mod points its ``k8s.io/*`` staging modules
at ``./staging/...`` (absent from the module zip); the build module maps each of them to its
published ``v0.37.2`` instead, the usual way of building Kubernetes components out of tree.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from ._proc import LaunchError, cache_dir, file_lock, free_port, place_built, run, spawn, tail, terminate
from .helm import _find_go

K8S_VERSION = "v1.37.2"
STAGING_VERSION = "v0.37.2"  # the k8s.io/* staging modules published with K8S_VERSION
ETCD_VERSION = "v3.6.16"

_KUBE_TOOLS = """//go:build tools

package build

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
"""

_ETCD_MAIN = """package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""


def _version_of(binary: Path) -> str | None:
    try:
        res = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"(?:Kubernetes v|etcd Version: )(\d+\.\d+\.\d+)", res.stdout + res.stderr)
    return "v" + m.group(1) if m else None


def _go_env() -> dict[str, str]:
    env = dict(os.environ, GOPATH=str(cache_dir() / "go"), GOFLAGS="-modcacherw -mod=mod", CGO_ENABLED="0")
    env.setdefault("GOTOOLCHAIN", "auto")
    return env


def _build(name: str, version: str, target: Path, prepare, package: str, ldflags: str, quiet: bool) -> None:
    go = _find_go()
    env = _go_env()
    log = cache_dir() / f"{name}-build.log"
    if not quiet:
        print(f"testbed: building {name} {version} with {go} (Go module proxy) -> {target}; log {log}", flush=True)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{name}-build.", dir=target.parent))
    try:
        prepare(go, work, env, log)
        run([go, "mod", "tidy"], f"resolving the modules of {name} {version}", timeout=3600, env=env, cwd=work,
            log_path=log)
        built = work / name
        run([go, "build", "-trimpath", f"-ldflags={ldflags}", "-o", str(built), package],
            f"building {name} {version}", timeout=3600, env=env, cwd=work, log_path=log)
        place_built(built, target, name, _version_of(built), version)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"testbed: {name} {version} built in {time.monotonic() - t0:.0f}s", flush=True)


def _prepare_kube_apiserver(go: str, work: Path, env: dict, log: Path) -> None:
    mod = f"k8s.io/kubernetes@{K8S_VERSION}"
    (work / "go.mod").write_text("module dpe.local/build\n\ngo 1.26.0\n")
    out = run([go, "mod", "download", "-json", mod], f"downloading {mod}", timeout=3600, env=env, cwd=work,
              log_path=log)
    gomod = json.loads(out[out.index("{"):out.rindex("}") + 1]).get("GoMod")
    if not gomod:
        raise LaunchError(f"go mod download {mod} did not give its go.mod")
    staging = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", Path(gomod).read_text(), re.M)
    if not staging:
        raise LaunchError(f"no staging modules found in the go.mod of {mod}")
    lines = [f"module dpe.local/build\n\ngo 1.26.0\n\nrequire k8s.io/kubernetes {K8S_VERSION}\n"]
    lines += [f"replace {m} => {m} {STAGING_VERSION}" for m in staging]
    (work / "go.mod").write_text("\n".join(lines) + "\n")
    (work / "tools.go").write_text(_KUBE_TOOLS)


def _prepare_etcd(go: str, work: Path, env: dict, log: Path) -> None:
    (work / "go.mod").write_text(f"module dpe.local/build\n\ngo 1.26.0\n\n"
                                 f"require go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n")
    (work / "main.go").write_text(_ETCD_MAIN)


def _ensure(name: str, version: str, prepare, package: str, ldflags: str, quiet: bool) -> Path:
    target = cache_dir() / "bin" / name
    if _version_of(target) == version:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir() / f"{name}.lock", f"building {name} {version}", wait_s=3600):
        if _version_of(target) != version:
            _build(name, version, target, prepare, package, ldflags, quiet)
    return target


def ensure_kube_apiserver(quiet: bool = False) -> Path:
    major, minor = K8S_VERSION[1:].split(".")[:2]
    pkg = "k8s.io/component-base/version"
    ldflags = (f"-s -w -X {pkg}.gitVersion={K8S_VERSION} -X {pkg}.gitMajor={major} -X {pkg}.gitMinor={minor} "
               f"-X {pkg}.gitTreeState=clean")
    return _ensure("kube-apiserver", K8S_VERSION, _prepare_kube_apiserver, "k8s.io/kubernetes/cmd/kube-apiserver",
                   ldflags, quiet)


def ensure_etcd(quiet: bool = False) -> Path:
    return _ensure("etcd", ETCD_VERSION, _prepare_etcd, ".", "-s -w", quiet)


class KubeAPIServer:
    """etcd + kube-apiserver on free local ports; ``kubeconfig`` is an admin kubeconfig (bearer
    token, TLS checked against the server's self-signed certificate)."""

    def __init__(self, workdir: Path, quiet: bool = True):
        self.workdir = Path(workdir)
        self.quiet = quiet
        self.etcd_proc: subprocess.Popen | None = None
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.token = secrets.token_hex(16)
        self.kubeconfig = self.workdir / "kubeconfig"
        self.log = self.workdir / "kube-apiserver.log"
        self.started_in = 0.0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "KubeAPIServer":
        etcd, apiserver = ensure_etcd(self.quiet), ensure_kube_apiserver(self.quiet)
        openssl = shutil.which("openssl")
        if not openssl:
            raise LaunchError("openssl is needed to make the API server's service-account key: "
                             "apt-get install -y openssl")
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        key = self.workdir / "sa.key"
        run([openssl, "genrsa", "-out", str(key), "2048"], "making a service-account key", timeout=60)
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f"{self.token},dpe-admin,dpe-admin,system:masters\n")
        tokens.chmod(0o600)
        client, peer = free_port(), free_port()
        self.etcd_proc = spawn([etcd, "--data-dir", self.workdir / "etcd", "--name", "bench",
                                "--listen-client-urls", f"http://127.0.0.1:{client}",
                                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                                "--initial-cluster", f"bench=http://127.0.0.1:{peer}",
                                "--unsafe-no-fsync", "--log-level", "warn"],
                               self.workdir / "etcd.log")
        self.port = free_port()
        certs = self.workdir / "certs"
        self.proc = spawn([apiserver, f"--etcd-servers=http://127.0.0.1:{client}", "--bind-address=127.0.0.1",
                           f"--secure-port={self.port}", f"--cert-dir={certs}", "--advertise-address=127.0.0.1",
                           "--endpoint-reconciler-type=none",  # no lease on 127.0.0.1 for the kubernetes Service
                           f"--token-auth-file={tokens}", "--authorization-mode=RBAC",
                           "--service-account-issuer=https://kubernetes.default.svc",
                           f"--service-account-key-file={key}", f"--service-account-signing-key-file={key}",
                           "--service-cluster-ip-range=10.96.0.0/16"],
                          self.log)
        self._wait_ready(certs / "apiserver.crt", timeout)
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "bench",
            "clusters": [{"name": "bench", "cluster": {"server": self.url,
                                                       "certificate-authority": str(certs / "apiserver.crt")}}],
            "users": [{"name": "dpe-admin", "user": {"token": self.token}}],
            "contexts": [{"name": "bench", "context": {"cluster": "bench", "user": "dpe-admin"}}],
        }, indent=2))
        self.kubeconfig.chmod(0o600)
        self.started_in = time.monotonic() - t0
        return self

    def _wait_ready(self, ca: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "not started"
        while time.monotonic() < deadline:
            for what, proc, log in (("etcd", self.etcd_proc, self.workdir / "etcd.log"),
                                    ("kube-apiserver", self.proc, self.log)):
                if proc is not None and proc.poll() is not None:
                    self.stop()
                    raise LaunchError(f"{what} exited {proc.returncode} at start:\n{tail(log)}")
            if ca.is_file():
                try:
                    self.request("GET", "/readyz", ca=ca)
                    return
                except (OSError, urllib.error.URLError, ssl.SSLError) as exc:
                    last = str(exc)
            time.sleep(0.3)
        self.stop()
        raise LaunchError(f"kube-apiserver not ready after {timeout:.0f}s ({last}):\n{tail(self.log)}")

    def request(self, method: str, path: str, body: dict | None = None, ca: Path | None = None) -> dict | str:
        """One call to the API (admin); JSON answers decoded.  HTTP errors raise urllib's HTTPError."""
        ctx = ssl.create_default_context(cafile=str(ca or self.workdir / "certs" / "apiserver.crt"))
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json", "Accept": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=30) as resp:
            text = resp.read().decode()
        try:
            return json.loads(text)
        except ValueError:
            return text

    def stop(self) -> None:
        terminate(self.proc, timeout=20)
        terminate(self.etcd_proc, timeout=20)
        self.proc = self.etcd_proc = None
