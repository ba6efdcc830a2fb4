"""A real Kubernetes API server for the chart tests: kube-apiserver on etcd, no node.

The control plane that validates and admits what ``helm install`` sends needs no image: both binaries
are built from the Go module proxy (``testbed.gobuild``) and started as local processes.  What this
catches that an offline schema check cannot: server-side validation of every object, Pod Security
admission (``restricted``), helm's install/upgrade/uninstall against a live API, and ``dpe-ingest
status`` reading real Job objects.  There is no kubelet, scheduler or controller-manager: pods are
never created from the workloads (``testbed.cluster`` runs a whole node).
"""

from __future__ import annotations

import json
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from ._proc import LaunchError, free_port, run, spawn, tail, terminate
from .gobuild import ensure_etcd, ensure_kube_apiserver


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
