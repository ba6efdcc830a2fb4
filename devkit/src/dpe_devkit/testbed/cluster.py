"""A real single-node Kubernetes for the tests: every component a local process, the node's network
in a network namespace of its own with no way out of the machine.

The same idea as Kubernetes' ``hack/local-up-cluster.sh``, in the test harness:

- etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy (iptables mode),
  containerd 2 (runc, the CNI bridge/host-local plugins), CoreDNS (host process behind a selectorless
  ``kube-dns`` Service at 10.96.0.10) and local-path-provisioner (the default StorageClass
  ``standard``, as on kind), all built from the Go module proxy (``testbed.gobuild``);
- NetworkPolicies are enforced, by kube-router's firewall alone (``--run-router=false
  --run-service-proxy=false``; the bridge CNI routes, kube-proxy serves the Services): a process of the
  node like kube-proxy, in its network namespace, filtering the pods' traffic with iptables and ipsets
  in the FORWARD/INPUT/OUTPUT chains (the bridge's frames go through them: ``bridge-nf-call-iptables``);
- images cannot be pulled: ours and the test images are built with docker and imported into
  containerd (``testbed.images``); the pause image is a tiny static binary;
- **no packet can leave the machine**: containerd, the kubelet, kube-proxy, CoreDNS, the CNI bridge
  and every pod live in the network namespace ``dpe-<id>``, which has a loopback
  (which also holds the node address 10.250.0.2) and the pods' bridge, and no link to the machine's network nor
  any route out (a connection to any other address fails at once: network unreachable).  CoreDNS
  answers ``cluster.local`` and nothing else (NXDOMAIN, no forwarding).  The tests reach the API
  server through two relays joined by a Unix socket (``testbed.relay``): ``https://127.0.0.1:PORT``;
- everything the components write outside the work directory is undone at ``stop()``: containers,
  mounts, the namespace (its iptables rules and sysctls go with it), ``/var/log/containers`` links,
  CNI cache files, the kernel settings the kubelet changes, the cgroups of the pods.

    with Cluster(workdir) as cluster:
        cluster.kubectl("get", "nodes")     # or KUBECONFIG=cluster.kubeconfig helm install ...

Needs root, Linux with cgroups (v1 or v2), ``ip``/``nsenter``, iptables, ipset, runc and the CNI plugins
(Debian: iproute2, util-linux, iptables, ipset, runc, containernetworking-plugins), openssl, a docker
engine for the images.  ``Cluster.log`` tells what happened, with timings.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from ._proc import LaunchError, free_port, port_open, run, spawn, tail, terminate
from . import gobuild

NODE_NAME = "dpe-node"
NODE_IP = "10.250.0.2"          # exists only inside the node's network namespace
POD_SUBNET = "10.244.0.0/24"
CLUSTER_CIDR = "10.244.0.0/16"
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
DNS_SERVICE_IP = "10.96.0.10"
CLUSTER_DOMAIN = "cluster.local"
API_PORT = 6443
KUBE_ROUTER_HEALTH_PORT = 20244  # kube-router's own default, inside the node's namespace
STORAGE_CLASS = "standard"

CNI_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
# kernel settings the kubelet sets at start (kubelet/cm: setupKernelTunables); restored at stop()
KUBELET_SYSCTLS = ("vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
                   "kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes")
CONTAINER_LOGS = Path("/var/log/containers")
# one record per running cluster (its namespace, work directory, owner pid and the kernel settings to
# restore): a cluster whose owner died without stop() (SIGKILL, a crash) is cleaned up by the next start
REGISTRY = Path("/run/dpe-testbed")
#: the kubelets' --root-dir, one per cluster (named after its namespace): outside the work directory
#: because the kubelet makes Unix sockets in it (pod-resources/<10 digits>), whose paths must fit in
#: 107 bytes, which a pytest work directory such as /tmp/pytest-of-root/pytest-122/test_…0/cluster
#: does not leave room for
KUBELET_ROOTS = Path("/var/lib/dpe-testbed")


def _which(name: str, *extra: str) -> str | None:
    return shutil.which(name) or next((p for p in extra if os.access(p, os.X_OK)), None)


def host_problems() -> list[str]:
    """What this machine lacks to run the cluster (empty when nothing)."""
    problems = []
    if os.geteuid() != 0:
        problems.append("root is needed (network namespace, mounts, cgroups, containers)")
    for tool, pkg in (("ip", "iproute2"), ("nsenter", "util-linux"), ("iptables", "iptables"),
                      ("ipset", "ipset"), ("runc", "runc"), ("openssl", "openssl"), ("conntrack", "conntrack")):
        if not _which(tool, f"/usr/sbin/{tool}", f"/sbin/{tool}"):
            problems.append(f"{tool} not found (Debian package {pkg})")
    if not cni_dir():
        problems.append(f"CNI plugins {', '.join(CNI_PLUGINS)} not found in {' or '.join(CNI_DIRS)} "
                        "(Debian package containernetworking-plugins)")
    if not Path("/proc/sys/net/bridge").is_dir():
        problems.append("br_netfilter is not loaded (/proc/sys/net/bridge missing): modprobe br_netfilter")
    return problems


def cni_dir() -> str | None:
    return next((d for d in CNI_DIRS if all(os.access(f"{d}/{p}", os.X_OK) for p in CNI_PLUGINS)), None)


class Cluster:
    """One node, started by ``start()`` and entirely undone by ``stop()``."""

    def __init__(self, workdir: Path | str, quiet: bool = True):
        self.workdir = Path(workdir).resolve()
        self.quiet = quiet
        self.netns = f"dpe-{os.getpid() % 100000}-{secrets.token_hex(2)}"
        self.token = secrets.token_hex(16)
        self.procs: dict[str, subprocess.Popen] = {}
        self.kubeconfig = self.workdir / "kubeconfig"            # for the tests (through the relay)
        self.node_kubeconfig = self.workdir / "node-kubeconfig"  # for the components (inside the namespace)
        self.log_path = self.workdir / "cluster.log"
        self.api_port = 0
        self.bin: dict[str, Path] = {}
        self.timings: dict[str, float] = {}
        self._netns_made = False
        self._sysctls: dict[str, str] = {}
        self._lock_fd: int | None = None
        self._t0 = 0.0

    # -- paths -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def ca(self) -> Path:
        return self.workdir / "pki" / "ca.crt"

    @property
    def containerd_sock(self) -> Path:
        return self.workdir / "containerd" / "containerd.sock"

    # -- log -----------------------------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} +{time.monotonic() - self._t0:6.1f}s {msg}"
        with open(self.log_path, "a") as fh:
            fh.write(line + "\n")
        if not self.quiet:
            print(f"cluster: {line}", file=sys.stderr, flush=True)

    def _step(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.monotonic() - t0, 2)
        self.say(f"{name}: {self.timings[name]:.1f}s")

    # -- running things ----------------------------------------------------------------------------------
    def in_node(self, cmd: Sequence[str | Path]) -> list[str]:
        """``cmd`` inside the node's network namespace (only the network: same mounts, same files)."""
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *[str(c) for c in cmd]]

    def run_in_network(self, cmd: Sequence[str | Path], env: dict[str, str] | None = None, timeout: float = 120
                       ) -> subprocess.CompletedProcess:
        """``cmd`` as a machine on the cluster's network: inside the node's namespace, resolving names
        with the cluster's DNS (``ip netns exec`` puts /etc/netns/<ns>/resolv.conf in place), e.g. a
        ``dpe-ingest status`` that reaches Kafka and PostgreSQL by their Service names."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *[str(c) for c in cmd]], capture_output=True,
                              text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)

    @property
    def _etc_netns(self) -> Path:
        return Path("/etc/netns") / self.netns

    def _spawn(self, name: str, cmd: Sequence[str | Path], env: dict[str, str] | None = None) -> None:
        self.procs[name] = spawn(self.in_node(cmd), self.workdir / "logs" / f"{name}.log", env=env)

    def kubectl(self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None
                ) -> subprocess.CompletedProcess:
        res = subprocess.run([str(self.bin["kubectl"]), f"--kubeconfig={self.kubeconfig}", *args],
                             capture_output=True, text=True, timeout=timeout, input=input,
                             stdin=None if input is not None else subprocess.DEVNULL)
        if check and res.returncode != 0:
            raise LaunchError(f"kubectl {' '.join(args)} failed (exit {res.returncode}): "
                              f"{(res.stderr or res.stdout).strip()[-2000:]}")
        return res

    def apply(self, objects: list[dict]) -> None:
        self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))

    def _api(self, path: str) -> tuple[int, str]:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {self.token}",
                                                               "Accept": "application/json"})
        with urllib.request.urlopen(req, context=ctx, timeout=10) as resp:
            return resp.status, resp.read().decode()

    def api_get(self, path: str) -> dict:
        """GET ``path`` of the API as the admin; the JSON answer decoded (HTTP errors raise)."""
        return json.loads(self._api(path)[1])

    def run_pod(self, namespace: str, name: str, image: str, command: list[str], timeout: float = 180) -> str:
        """Run ``command`` once in a pod, wait for it to end, return its output; LaunchError if it failed."""
        self.apply([{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
                     "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                              "containers": [{"name": "main", "image": image, "imagePullPolicy": "Never",
                                              "command": command}]}}])
        deadline = time.monotonic() + timeout
        phase = None
        while phase not in ("Succeeded", "Failed"):
            if time.monotonic() > deadline:
                raise LaunchError(f"pod {namespace}/{name} still {phase} after {timeout:.0f}s")
            time.sleep(0.5)
            phase = json.loads(self.kubectl("get", "pod", "-n", namespace, name, "-o", "json").stdout
                               )["status"].get("phase")
        out = self.kubectl("logs", "-n", namespace, name).stdout
        self.kubectl("delete", "pod", "-n", namespace, name, "--wait=false")
        if phase == "Failed":
            raise LaunchError(f"pod {namespace}/{name} failed:\n{out[-3000:]}")
        return out

    def api_ok(self, path: str) -> bool:
        return self._api(path)[0] == 200

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise LaunchError(f"{name} exited {proc.returncode} while the cluster was starting:\n"
                                  f"{tail(self.workdir / 'logs' / f'{name}.log', 40)}")

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            self._check_alive()
            try:
                if ready():
                    return
            except (OSError, LaunchError, urllib.error.URLError, ssl.SSLError, ValueError, KeyError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise LaunchError(f"cluster: {what} not ready after {timeout:.0f}s (last: {last}); log {self.log_path}")
            time.sleep(0.25)

    # -- start -------------------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> "Cluster":
        problems = host_problems()
        if problems:
            raise LaunchError("cannot run the test cluster here: " + "; ".join(problems))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.monotonic()
        self._take_the_node_lock()
        swept = sweep_dead_clusters()
        if swept:
            self.say(f"cleaned up after clusters whose owner died: {', '.join(swept)}")
        self.say(f"starting a single-node cluster in {self.workdir} (network namespace {self.netns})")
        try:
            t = time.monotonic()
            for name in ("kubernetes", "etcd", "containerd", "coredns", "local-path-provisioner", "kube-router",
                         "prometheus", "prometheus-operator", "pushgateway"):  # the last three: images.MONITORING_BINARIES
                self.bin.update(gobuild.ensure(name, self.quiet))
            self._step("binaries", t)
            t = time.monotonic()
            from .images import ensure_cluster_images
            images_tar = ensure_cluster_images(quiet=self.quiet)
            self._step("images built", t)
            self._start(images_tar, timeout)
        except BaseException:
            self.say("start failed: stopping what was started")
            self.stop()
            raise
        self.timings["total"] = round(time.monotonic() - self._t0, 2)
        self.say(f"cluster ready in {self.timings['total']:.1f}s: {self.timings}")
        return self

    def _start(self, images_tar: Path, timeout: float) -> None:
        t = time.monotonic()
        self._network()
        self._pki()
        self._configs()
        self._step("namespace, certificates, configuration", t)

        t = time.monotonic()
        sock = self.workdir / "api.sock"
        self._spawn("relay-node", [sys.executable, "-m", "dpe_devkit.testbed.relay", f"unix:{sock}",
                                   f"tcp:{NODE_IP}:{API_PORT}"])
        self.api_port = free_port()
        self.procs["relay-host"] = spawn([sys.executable, "-m", "dpe_devkit.testbed.relay",
                                          f"tcp:127.0.0.1:{self.api_port}", f"unix:{sock}"],
                                         self.workdir / "logs" / "relay-host.log")
        self._spawn("etcd", [self.bin["etcd"], "--data-dir", self.workdir / "etcd", "--name", NODE_NAME,
                             "--listen-client-urls", "http://127.0.0.1:2379",
                             "--advertise-client-urls", "http://127.0.0.1:2379",
                             "--listen-peer-urls", "http://127.0.0.1:2380",
                             "--initial-advertise-peer-urls", "http://127.0.0.1:2380",
                             "--initial-cluster", f"{NODE_NAME}=http://127.0.0.1:2380",
                             "--unsafe-no-fsync", "--log-level", "warn"])
        pki = self.workdir / "pki"
        self._spawn("kube-apiserver", [
            self.bin["kube-apiserver"], "--etcd-servers=http://127.0.0.1:2379", "--bind-address=0.0.0.0",
            f"--secure-port={API_PORT}", f"--advertise-address={NODE_IP}",
            f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--token-auth-file={self.workdir / 'tokens.csv'}", "--authorization-mode=RBAC",
            f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
            f"--service-account-key-file={pki / 'sa.key'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}", "--allow-privileged=true",
            "--kubelet-preferred-address-types=InternalIP", "--profiling=false"])
        self.kubeconfig.write_text(self._kubeconfig(self.url))
        self.kubeconfig.chmod(0o600)
        self._wait("kube-apiserver", lambda: port_open(self.api_port) and self.api_ok("/readyz"), timeout)
        self._step("kube-apiserver ready", t)

        t = time.monotonic()
        kc = self.node_kubeconfig
        self._spawn("kube-controller-manager", [
            self.bin["kube-controller-manager"], f"--kubeconfig={kc}", "--leader-elect=false",
            "--bind-address=127.0.0.1", f"--service-account-private-key-file={pki / 'sa.key'}",
            f"--root-ca-file={self.ca}", "--use-service-account-credentials=false", "--profiling=false",
            f"--cluster-cidr={CLUSTER_CIDR}", f"--service-cluster-ip-range={SERVICE_CIDR}"])
        self._spawn("kube-scheduler", [self.bin["kube-scheduler"], f"--kubeconfig={kc}", "--leader-elect=false",
                                       "--bind-address=127.0.0.1", "--profiling=false"])
        shim_path = f"{self.bin['containerd-shim-runc-v2'].parent}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        self._spawn("containerd", [self.bin["containerd"], "--config", self.workdir / "containerd" / "config.toml"],
                    env=dict(os.environ, PATH=shim_path))
        self._wait("containerd", lambda: self.containerd_sock.exists() and self._ctr("version") is not None, 60)
        self._step("containerd ready", t)

        t = time.monotonic()
        self._ctr("images", "import", "--no-unpack=false", str(images_tar), timeout=600)
        self._step("images imported", t)

        t = time.monotonic()
        self._remember_sysctls()
        self._spawn("kubelet", [self.bin["kubelet"], f"--config={self.workdir / 'kubelet' / 'config.yaml'}",
                                f"--kubeconfig={kc}", f"--root-dir={self.kubelet_root}",
                                f"--hostname-override={NODE_NAME}", f"--node-ip={NODE_IP}", "--v=1"],
                    env=dict(os.environ, PATH=shim_path))
        self._spawn("kube-proxy", [self.bin["kube-proxy"], f"--config={self.workdir / 'kube-proxy.yaml'}"])
        self._spawn("coredns", [self.bin["coredns"], "-conf", self.workdir / "Corefile"])
        self.apply(self._bootstrap_objects())
        self._spawn("local-path-provisioner", [
            self.bin["local-path-provisioner"], "start", f"--kubeconfig={kc}", "--namespace=local-path-storage",
            f"--config={self.workdir / 'local-path' / 'config.json'}",
            f"--helper-pod-file={self.workdir / 'local-path' / 'helperPod.yaml'}",
            "--configmap-name=local-path-config"])
        self._wait("the node", self._node_ready, timeout)
        self._step("node Ready", t)

        t = time.monotonic()
        # the policy engine reads its node (name, InternalIP = the pods' HostIP) at start: after the node
        self._spawn("kube-router", [
            self.bin["kube-router"], f"--kubeconfig={kc}", f"--hostname-override={NODE_NAME}",
            "--run-firewall=true", "--run-router=false", "--run-service-proxy=false", "--enable-cni=false",
            "--enable-ipv4=true", "--enable-ipv6=false", f"--service-cluster-ip-range={SERVICE_CIDR}",
            f"--health-port={KUBE_ROUTER_HEALTH_PORT}", "--metrics-port=0", "--v=1"])
        self._wait("kube-router's network policy firewall", self._policy_engine_ready, 120)
        self._step("network policy engine ready", t)

        t = time.monotonic()
        self._wait("the default ServiceAccount", lambda: self.kubectl(
            "get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0, 60)
        self._wait("CoreDNS", lambda: self._node_http("http://127.0.0.1:8181/ready"), 60)
        self._step("ServiceAccounts and DNS ready", t)

    # -- pieces --------------------------------------------------------------------------------------------
    def _take_the_node_lock(self, wait_s: float = 1800) -> None:
        """One test cluster at a time on a machine (the pods' cgroups and the kernel settings are the
        machine's): a second one waits for the first to stop."""
        REGISTRY.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(REGISTRY / "node.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LaunchError(f"another test cluster held {REGISTRY / 'node.lock'} for {wait_s:.0f}s")
                time.sleep(1)

    def _record(self) -> None:
        REGISTRY.mkdir(parents=True, exist_ok=True)
        (REGISTRY / f"{self.netns}.json").write_text(json.dumps({
            "netns": self.netns, "workdir": str(self.workdir), "pid": os.getpid(), "sysctls": self._sysctls,
            "ctr": str(self.bin.get("ctr", ""))}))

    def _network(self) -> None:
        run(["ip", "netns", "add", self.netns], "creating the node's network namespace")
        self._netns_made = True
        self._record()
        # the node address on the loopback (no dummy driver in every kernel): local to the node, reached
        # by the pods through their bridge's gateway
        for cmd in (["ip", "link", "set", "lo", "up"],
                    ["ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo"],
                    ["sysctl", "-qw", "net.ipv4.ip_forward=1"],
                    ["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"],
                    # "network unreachable" answered at once to every pod, not rate-limited (a
                    # connection whose answer was dropped would wait for TCP's retries instead)
                    ["sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"]):
            run(self.in_node(cmd), f"setting up the node's network: {' '.join(cmd)}")
        # a route for the Service range, so that the node's own processes (CoreDNS clients, a status run
        # with run_in_network) get as far as kube-proxy's DNAT; on the loopback: nothing can leave
        run(self.in_node(["ip", "route", "add", SERVICE_CIDR, "dev", "lo"]), "routing the Service range")
        self._etc_netns.mkdir(parents=True, exist_ok=True)
        (self._etc_netns / "resolv.conf").write_text(
            f"nameserver {DNS_SERVICE_IP}\nsearch svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}\noptions ndots:5\n")
        routes = run(self.in_node(["ip", "-4", "route", "show", "table", "all"]), "reading routes")
        if "default" in routes:
            raise LaunchError(f"the node's network namespace has a default route:\n{routes}")
        self.say(f"network namespace {self.netns}: lo with {NODE_IP}/32, no route out")

    def _pki(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(parents=True, exist_ok=True)
        ossl = "openssl"
        run([ossl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "7", "-subj", "/CN=dpe-test-ca",
             "-keyout", pki / "ca.key", "-out", self.ca], "making the cluster CA")
        sans = ",".join([f"IP:{ip}" for ip in ("127.0.0.1", NODE_IP, API_SERVICE_IP)] +
                        [f"DNS:{n}" for n in ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                              f"kubernetes.default.svc.{CLUSTER_DOMAIN}")])
        ext = pki / "apiserver.ext"
        ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n")
        run([ossl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kube-apiserver",
             "-keyout", pki / "apiserver.key", "-out", pki / "apiserver.csr"], "making the API server's key")
        run([ossl, "x509", "-req", "-in", pki / "apiserver.csr", "-CA", self.ca, "-CAkey", pki / "ca.key",
             "-CAcreateserial", "-days", "7", "-extfile", ext, "-out", pki / "apiserver.crt"],
            "signing the API server's certificate")
        run([ossl, "genrsa", "-out", pki / "sa.key", "2048"], "making the service-account key")
        for f in pki.iterdir():
            f.chmod(0o600)

    def _kubeconfig(self, server: str) -> str:
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "dpe-test",
            "clusters": [{"name": "dpe-test", "cluster": {"server": server, "certificate-authority": str(self.ca)}}],
            "users": [{"name": "dpe-admin", "user": {"token": self.token}}],
            "contexts": [{"name": "dpe-test", "context": {"cluster": "dpe-test", "user": "dpe-admin"}}],
        }, indent=2)

    def _configs(self) -> None:
        w = self.workdir
        tokens = w / "tokens.csv"
        tokens.write_text(f"{self.token},dpe-admin,dpe-admin,system:masters\n")
        tokens.chmod(0o600)
        # the relay port is known only once it is chosen: the tests' kubeconfig is written again then
        self.node_kubeconfig.write_text(self._kubeconfig(f"https://{NODE_IP}:{API_PORT}"))
        self.node_kubeconfig.chmod(0o600)
        cni = w / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-dpe.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0", "name": self.cni_network,
            "plugins": [{"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
                         "hairpinMode": True,
                         "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_SUBNET}]],
                                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(cni / "ipam")}}]}, indent=2))
        cd = w / "containerd"
        cd.mkdir(parents=True, exist_ok=True)
        from .images import CLUSTER_IMAGES
        pause = _image_ref(CLUSTER_IMAGES["pause"])
        (cd / "config.toml").write_text(f"""version = 3
imports = []
root = "{cd / 'root'}"
state = "{cd / 'state'}"

[grpc]
  address = "{self.containerd_sock}"

[ttrpc]
  address = "{cd / 'containerd.sock.ttrpc'}"

[plugins]
  [plugins.'io.containerd.internal.v1.opt']
    path = "{cd / 'opt'}"
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = "overlayfs"
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = "{pause}"
  [plugins.'io.containerd.cri.v1.runtime']
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ["{cni_dir()}"]
      conf_dir = "{cni / 'net.d'}"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "{_which('runc', '/usr/sbin/runc')}"
      Root = "{cd / 'runc'}"
""")
        kubelet = w / "kubelet"
        kubelet.mkdir(parents=True, exist_ok=True)
        self.kubelet_root.mkdir(parents=True, exist_ok=True)
        (kubelet / "resolv.conf").write_text("")
        (kubelet / "config.yaml").write_text(json.dumps({
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "address": NODE_IP, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": 10248,
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "clusterDNS": [DNS_SERVICE_IP], "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(kubelet / "resolv.conf"),
            "podLogsDir": str(w / "pod-logs"),
            "evictionHard": {"memory.available": "100Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "maxPods": 60,
            "syncFrequency": "10s", "nodeStatusUpdateFrequency": "5s",
        }, indent=2))
        (w / "kube-proxy.yaml").write_text(json.dumps({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.node_kubeconfig)},
            "mode": "iptables", "clusterCIDR": CLUSTER_CIDR, "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP, "metricsBindAddress": "127.0.0.1:10249", "healthzBindAddress": "127.0.0.1:10256",
            "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
        }, indent=2))
        (w / "Corefile").write_text(f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {NODE_IP}
    errors
    ready 127.0.0.1:8181
    health 127.0.0.1:8080
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {self.node_kubeconfig} dpe-test
        pods insecure
        ttl 5
    }}
    cache 5
    loadbalance
}}
.:53 {{
    bind {NODE_IP}
    errors
    template ANY ANY {{
        rcode NXDOMAIN
    }}
}}
""")
        lp = w / "local-path"
        (lp / "volumes").mkdir(parents=True, exist_ok=True)
        (lp / "config.json").write_text(json.dumps({"nodePathMap": [
            {"node": "DEFAULT_PATH_FOR_NON_LISTED_NODES", "paths": [str(lp / "volumes")]}]}))
        (lp / "helperPod.yaml").write_text(json.dumps({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "helper-pod"},
            "spec": {"containers": [{"name": "helper-pod", "image": CLUSTER_IMAGES["base"],
                                     "imagePullPolicy": "Never"}]}}))

    @property
    def cni_network(self) -> str:
        return f"dpe-pods-{self.netns}"

    def _bootstrap_objects(self) -> list[dict]:
        dns_ports = [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]
        privileged = {f"pod-security.kubernetes.io/{m}": "privileged" for m in ("enforce", "audit", "warn")}
        return [
            {"apiVersion": "v1", "kind": "Service",
             "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": {"k8s-app": "kube-dns"}},
             "spec": {"clusterIP": DNS_SERVICE_IP, "ports": [dict(p, targetPort=53) for p in dns_ports]}},
            {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
             "metadata": {"name": "kube-dns-host", "namespace": "kube-system",
                          "labels": {"kubernetes.io/service-name": "kube-dns",
                                     "endpointslice.kubernetes.io/managed-by": "dpe-testbed"}},
             "addressType": "IPv4", "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
             "ports": dns_ports},
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "local-path-storage", "labels": privileged}},
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": "local-path-provisioner-service-account", "namespace": "local-path-storage"}},
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "local-path-config", "namespace": "local-path-storage"},
             "data": {"config.json": (self.workdir / "local-path" / "config.json").read_text(),
                      "helperPod.yaml": (self.workdir / "local-path" / "helperPod.yaml").read_text(),
                      "setup": '#!/bin/sh\nset -eu\nmkdir -m 0777 -p "$VOL_DIR"\n',
                      "teardown": '#!/bin/sh\nset -eu\nrm -rf "$VOL_DIR"\n'}},
            {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
             "metadata": {"name": STORAGE_CLASS,
                          "annotations": {"storageclass.kubernetes.io/is-default-class": "true"}},
             "provisioner": "rancher.io/local-path", "volumeBindingMode": "WaitForFirstConsumer",
             "reclaimPolicy": "Delete"},
        ]

    def _ctr(self, *args: str, timeout: float = 60) -> str:
        return run([self.bin["ctr"], "--address", self.containerd_sock, "--namespace", "k8s.io", *args],
                   f"ctr {' '.join(args[:2])}", timeout=timeout)

    def _node_http(self, url: str) -> bool:
        code = ("import sys, urllib.request\n"
                f"sys.exit(0 if urllib.request.urlopen({url!r}, timeout=2).status == 200 else 1)")
        res = subprocess.run(self.in_node([sys.executable, "-c", code]), capture_output=True, timeout=20,
                             stdin=subprocess.DEVNULL)
        return res.returncode == 0

    def _policy_engine_ready(self) -> bool:
        """kube-router answers its health check and has hooked its chains into the filter table."""
        if not self._node_http(f"http://127.0.0.1:{KUBE_ROUTER_HEALTH_PORT}/healthz"):
            return False
        res = subprocess.run(self.in_node(["iptables", "-t", "filter", "-S", "FORWARD"]), capture_output=True,
                             text=True, timeout=20, stdin=subprocess.DEVNULL)
        return res.returncode == 0 and "-j KUBE-ROUTER-FORWARD" in res.stdout

    def _node_ready(self) -> bool:
        node = self.api_get(f"/api/v1/nodes/{NODE_NAME}")
        return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions", []))

    def _remember_sysctls(self) -> None:
        for key in KUBELET_SYSCTLS:
            try:
                self._sysctls[key] = Path("/proc/sys", key).read_text().strip()
            except OSError:
                pass
        self._record()

    # -- stop ----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop everything and undo what the components did outside the work directory.  Idempotent."""
        t = time.monotonic()
        for name in ("kube-router", "local-path-provisioner", "kubelet", "kube-proxy", "coredns", "kube-scheduler",
                     "kube-controller-manager"):
            terminate(self.procs.pop(name, None), timeout=15)
        self._kill_containers()
        terminate(self.procs.pop("containerd", None), timeout=15)
        self._kill_leftovers()
        for name in ("kube-apiserver", "etcd", "relay-host", "relay-node"):  # the API server before etcd
            terminate(self.procs.pop(name, None), timeout=20)
        for name in list(self.procs):
            terminate(self.procs.pop(name), timeout=10)
        self._unmount_all()
        if self._netns_made:
            subprocess.run(["ip", "netns", "delete", self.netns], capture_output=True, stdin=subprocess.DEVNULL)
            self._netns_made = False
        self._remove_host_files()
        for key, value in self._sysctls.items():
            try:
                Path("/proc/sys", key).write_text(value)
            except OSError as exc:
                self.say(f"could not restore {key}={value}: {exc}")
        self._sysctls.clear()
        (REGISTRY / f"{self.netns}.json").unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the node lock
            self._lock_fd = None
        if self._t0:
            self.say(f"stopped and cleaned up in {time.monotonic() - t:.1f}s")

    def _kill_containers(self) -> None:
        if "ctr" not in self.bin or not self.containerd_sock.exists():
            return
        try:
            tasks = [line.split()[0] for line in self._ctr("tasks", "ls", timeout=20).splitlines()[1:] if line.strip()]
            for task in tasks:
                subprocess.run([str(self.bin["ctr"]), "--address", str(self.containerd_sock), "--namespace", "k8s.io",
                                "tasks", "kill", "--signal", "SIGKILL", task], capture_output=True, timeout=20,
                               stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + 15
            while tasks and time.monotonic() < deadline:
                out = self._ctr("tasks", "ls", timeout=20)
                if all(" RUNNING" not in line for line in out.splitlines()[1:]):
                    break
                time.sleep(0.3)
        except (LaunchError, subprocess.TimeoutExpired, OSError) as exc:
            self.say(f"listing/killing containers through containerd failed: {exc}")

    def _kill_leftovers(self) -> None:
        """Shims of our containerd and whatever still runs in the pods' cgroups."""
        mine = str(self.containerd_sock).encode()
        for pid in _pids():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"containerd-shim" in cmdline and mine in cmdline:
                _kill(pid)
        for root in _kubepods_cgroups():
            for procs in sorted(root.rglob("cgroup.procs"), key=lambda p: -len(p.parts)):
                try:
                    for pid in procs.read_text().split():
                        _kill(int(pid))
                except OSError:
                    pass
        time.sleep(0.3)
        for root in _kubepods_cgroups():
            for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [root]:
                try:
                    d.rmdir()
                except OSError:
                    pass

    @property
    def kubelet_root(self) -> Path:
        return KUBELET_ROOTS / self.netns

    def _unmount_all(self) -> None:
        roots = [str(self.workdir), str(self.kubelet_root)]

        def ours(m: str) -> bool:
            return any(m == r or m.startswith(r + "/") for r in roots)

        for _ in range(3):
            mounts = [m for m in _mountpoints() if ours(m)]
            if not mounts:
                break
            for m in sorted(mounts, key=lambda p: -p.count("/")):
                subprocess.run(["umount", "-l", m], capture_output=True, stdin=subprocess.DEVNULL)
        left = [m for m in _mountpoints() if ours(m)]
        if left:
            self.say(f"mounts left under the work directory or the kubelet's: {left[:5]}")
        else:
            shutil.rmtree(self.kubelet_root, ignore_errors=True)

    def _remove_host_files(self) -> None:
        prefix = str(self.workdir) + "/"
        shutil.rmtree(self._etc_netns, ignore_errors=True)
        if CONTAINER_LOGS.is_dir():
            for link in CONTAINER_LOGS.iterdir():
                try:
                    if link.is_symlink() and os.readlink(link).startswith(prefix):
                        link.unlink()
                except OSError:
                    pass
        results = Path("/var/lib/cni/results")
        if results.is_dir():
            for f in results.glob(f"{self.cni_network}-*"):
                f.unlink(missing_ok=True)

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def sweep_dead_clusters() -> list[str]:
    """Undo what clusters whose owner process is gone left behind (see REGISTRY); their names."""
    swept = []
    for record in sorted(REGISTRY.glob("dpe-*.json")):
        try:
            info = json.loads(record.read_text())
            pid, netns, workdir = int(info["pid"]), info["netns"], info["workdir"]
        except (OSError, ValueError, KeyError, TypeError):
            record.unlink(missing_ok=True)
            continue
        if _alive(pid):
            continue
        dead = Cluster(workdir)
        dead.netns, dead._netns_made, dead._sysctls = netns, True, dict(info.get("sysctls") or {})
        if info.get("ctr"):
            dead.bin["ctr"] = Path(info["ctr"])
        dead.stop()
        record.unlink(missing_ok=True)
        swept.append(netns)
    return swept


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _image_ref(tag: str) -> str:
    """containerd's full name of a docker-style tag (``name:tag`` -> ``docker.io/library/name:tag``)."""
    first = tag.split("/", 1)[0]
    if "/" in tag and ("." in first or ":" in first or first == "localhost"):
        return tag
    return f"docker.io/{tag}" if "/" in tag else f"docker.io/library/{tag}"


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _kubepods_cgroups() -> list[Path]:
    base = Path("/sys/fs/cgroup")
    found = [p for p in base.glob("*/kubepods*") if p.is_dir()] + [p for p in base.glob("kubepods*") if p.is_dir()]
    return sorted(set(found))


def _mountpoints() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) > 4:
                out.append(parts[4].replace("\\040", " "))
    return out
