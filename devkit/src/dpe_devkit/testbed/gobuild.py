"""The Kubernetes parts the testbed runs, built from the Go module proxy into ``<cache>/bin``.

No binary release can be downloaded here, but every part of a single-node cluster is a Go module:

- ``kubernetes``: kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy and
  kubectl, in one ``go build`` of ``k8s.io/kubernetes`` (its go.mod points the ``k8s.io/*`` staging
  modules at ``./staging/...``, absent from the module zip: the build module maps each of them to its
  published version instead, the usual way of building Kubernetes components out of tree);
- ``etcd``; ``containerd`` (containerd, its runc shim and ctr; no btrfs/devmapper/zfs, no cgo);
- ``coredns`` with only the plugins the test cluster's Corefile uses;
- ``local-path-provisioner`` (the default StorageClass of kind, here too);
- ``kube-router``, only its network-policy firewall (iptables + ipset; ``testbed.cluster`` runs it with
  ``--run-router=false --run-service-proxy=false``): the engine that enforces NetworkPolicies on the node;
- ``prometheus-operator`` (the operator and ``prometheus-config-reloader``), ``prometheus`` (Prometheus
  and ``promtool``, only the Kubernetes service discovery), ``pushgateway``: the monitoring stack the
  observability tests run on the node (``testbed.images``' ``monitoring`` images; ``promtool test
  rules`` in the chart tests).  ``module_dir(name)`` is the module's source in the module cache (the
  operator's CRDs and RBAC examples: ``example/``).

Each group is built once (cold: ~15 min for ``kubernetes`` on 2 cores) and recorded by a stamp naming
its version and recipe; modules are kept in ``<cache>/go`` and compiled packages in Go's build cache
(``testbed.gotool``), so that a second clone only links.  ``ensure(name)`` returns the paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ._proc import LaunchError, cache_dir, file_lock, run
from .gotool import find_go, go_env

K8S_VERSION = "v1.37.2"
STAGING_VERSION = "v0.37.2"  # the k8s.io/* staging modules published with K8S_VERSION
ETCD_VERSION = "v3.6.16"
CONTAINERD_VERSION = "v2.4.2"
COREDNS_VERSION = "v1.15.0"
LOCAL_PATH_VERSION = "v0.0.30"
KUBE_ROUTER_VERSION = "v2.1.0"  # the newest the module proxy serves here (v2.1.1+ were refused)
# the operator, its config reloader, and its CRDs (example/).  v0.93.0, not v0.94.0: the operator's
# module needs its two sub-modules at its own version (pkg/apis/monitoring, pkg/client: its go.mod
# replaces them by ./pkg/…, which the module zip leaves out), and the module proxy refuses
# pkg/client@v0.94.0 (403 "This module version is not available"); all three are served at v0.93.0
PROMETHEUS_OPERATOR_VERSION = "v0.93.0"
PROMETHEUS_MODULE_VERSION = "v0.310.0"  # github.com/prometheus/prometheus v0.310.0 = Prometheus v3.10.0
PROMETHEUS_VERSION = "v3.10.0"
PUSHGATEWAY_VERSION = "v1.11.1"
# Prometheus with only the service discoveries the operator's configs use (kubernetes; file and http
# are always in, plugins/minimum.go): ``remove_all_sd`` drops the cloud SDs (AWS, Azure, GCE, …,
# plugins/plugin_*.go: ``//go:build !remove_all_sd || enable_<name>_sd``).  No ``builtinassets``: the
# web UI is not embedded (the tests use the HTTP API only).
_PROMETHEUS_TAGS = ("netgo", "remove_all_sd", "enable_kubernetes_sd")

_KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl")

_ETCD_MAIN = """package main

import (
\t"os"

\t"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
"""

# CoreDNS with the plugins of the test cluster's Corefile (testbed/cluster.py), in CoreDNS' own order
# (plugin.cfg): the order of this list is the order of the plugin chain.  No ``forward``: the cluster
# answers cluster.local and nothing else (NXDOMAIN), no query ever leaves the machine.
_COREDNS_PLUGINS = ("bind", "ready", "health", "errors", "log", "loadbalance", "cache", "template", "kubernetes")
_COREDNS_MAIN = """package main

import (
\t"github.com/coredns/coredns/core/dnsserver"
\t"github.com/coredns/coredns/coremain"
{imports}
)

func init() {{
\tdnsserver.Directives = []string{{{directives}}}
}}

func main() {{ coremain.Run() }}
"""


@dataclass(frozen=True)
class GoBuild:
    """One ``go build`` of one or more commands of a module at a version."""
    name: str
    version: str
    module: str                        # module@version required by the build module
    packages: dict[str, str]           # output binary name -> package path
    prepare: Callable[["GoBuild", str, Path, dict, Path], None] | None = None  # extra go.mod/main.go work
    tags: tuple[str, ...] = ()
    ldflags: str = "-s -w"
    extra: dict[str, str] = field(default_factory=dict)  # file name -> content written into the build dir

    def stamp(self) -> str:
        recipe = json.dumps([self.module, sorted(self.packages.items()), self.tags, self.ldflags,
                             sorted(self.extra.items())], sort_keys=True)
        return f"{self.version} {hashlib.sha256(recipe.encode()).hexdigest()[:16]}"


def _kube_ldflags() -> str:
    major, minor = K8S_VERSION[1:].split(".")[:2]
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [f"-X {pkg}.gitVersion={K8S_VERSION}", f"-X {pkg}.gitMajor={major}",
                  f"-X {pkg}.gitMinor={minor}", f"-X {pkg}.gitTreeState=clean"]
    return " ".join(flags)


def _prepare_kubernetes(build: GoBuild, go: str, work: Path, env: dict, log: Path) -> None:
    out = run([go, "mod", "download", "-json", build.module], f"downloading {build.module}", timeout=3600,
              env=env, cwd=work, log_path=log)
    gomod = json.loads(out[out.index("{"):out.rindex("}") + 1]).get("GoMod")
    if not gomod:
        raise LaunchError(f"go mod download {build.module} did not give its go.mod")
    staging = re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", Path(gomod).read_text(), re.M)
    if not staging:
        raise LaunchError(f"no staging modules found in the go.mod of {build.module}")
    with open(work / "go.mod", "a") as fh:
        fh.write("".join(f"replace {m} => {m} {STAGING_VERSION}\n" for m in staging))


def _pin_requirements(build: GoBuild, go: str, work: Path, env: dict, log: Path) -> None:
    """The build module requires every module at the version the module's own go.mod requires, as when
    it is built as the main module: without them, ``go mod tidy`` resolves the packages of a dependency
    without a go.mod (kube-router's ``github.com/docker/docker +incompatible``) at their latest
    versions (grpc, OpenTelemetry, genproto of 2026), a combination upstream never built."""
    out = run([go, "mod", "download", "-json", build.module], f"downloading {build.module}", timeout=3600,
              env=env, cwd=work, log_path=log)
    gomod = json.loads(out[out.index("{"):out.rindex("}") + 1]).get("GoMod")
    if not gomod:
        raise LaunchError(f"go mod download {build.module} did not give its go.mod")
    pins, in_block = [], False
    for line in Path(gomod).read_text().splitlines():
        line = line.split("//")[0].strip()
        if line == "require (":
            in_block = True
        elif in_block and line == ")":
            in_block = False
        elif in_block or line.startswith("require "):
            parts = line.removeprefix("require ").split()
            if len(parts) == 2:
                pins.append(parts)
    if not pins:
        raise LaunchError(f"no requirements found in the go.mod of {build.module}")
    with open(work / "go.mod", "a") as fh:
        fh.write("require (\n" + "".join(f"\t{m} {v}\n" for m, v in pins) + ")\n")


def _pin_requirements_and_replaces(build: GoBuild, go: str, work: Path, env: dict, log: Path) -> None:
    """``_pin_requirements``, plus the module's own ``replace`` lines that pin another version (Prometheus:
    ``cloud.google.com/go``, else two modules hold the same package); a replace by a local directory
    (the operator's ``./pkg/apis/monitoring`` and ``./pkg/client``, published as modules of their own
    at the same version) is left out: the pinned requirement takes the published module."""
    _pin_requirements(build, go, work, env, log)
    gomod = Path(json.loads(_download(build, go, work, env, log))["GoMod"])
    text = gomod.read_text()
    replaces = re.findall(r"^\s*(?:replace\s+)?([\w./-]+)(?:\s+v\S+)?\s+=>\s+([\w./-]+)\s+(v\S+)\s*$", text, re.M)
    if replaces:
        with open(work / "go.mod", "a") as fh:
            fh.write("".join(f"replace {old} => {new} {ver}\n" for old, new, ver in replaces))


def _download(build: GoBuild, go: str, work: Path, env: dict, log: Path) -> str:
    out = run([go, "mod", "download", "-json", build.module], f"downloading {build.module}", timeout=3600,
              env=env, cwd=work, log_path=log)
    return out[out.index("{"):out.rindex("}") + 1]


def module_dir(name: str) -> Path:
    """The source of build ``name``'s module in the module cache (downloaded when missing)."""
    build = BUILDS[name]
    env = go_env(GOFLAGS="-modcacherw -mod=mod")
    work = Path(tempfile.mkdtemp(prefix=f"{name}-mod."))
    try:
        (work / "go.mod").write_text("module dpe.local/mod\n\ngo 1.26.0\n")
        got = json.loads(_download(build, find_go(), work, env, cache_dir() / f"{name}-build.log"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not got.get("Dir") or not Path(got["Dir"]).is_dir():
        raise LaunchError(f"go mod download {build.module} gave no source directory")
    return Path(got["Dir"])


def _version_ldflags(version: str) -> str:
    return (f"-s -w -X github.com/prometheus/common/version.Version={version.lstrip('v')} "
            "-X github.com/prometheus/common/version.Branch=HEAD "
            "-X github.com/prometheus/common/version.BuildUser=dpe-testbed")


BUILDS: dict[str, GoBuild] = {b.name: b for b in (
    GoBuild("kubernetes", K8S_VERSION, f"k8s.io/kubernetes@{K8S_VERSION}",
            {c: f"k8s.io/kubernetes/cmd/{c}" for c in _KUBE_COMMANDS}, _prepare_kubernetes,
            ldflags=_kube_ldflags()),
    GoBuild("etcd", ETCD_VERSION, f"go.etcd.io/etcd/server/v3@{ETCD_VERSION}", {"etcd": "."},
            extra={"main.go": _ETCD_MAIN}),
    GoBuild("containerd", CONTAINERD_VERSION, f"github.com/containerd/containerd/v2@{CONTAINERD_VERSION}",
            {c: f"github.com/containerd/containerd/v2/cmd/{c}" for c in ("containerd", "containerd-shim-runc-v2", "ctr")},
            tags=("no_btrfs", "no_devmapper", "no_zfs"),
            ldflags=f"-s -w -X github.com/containerd/containerd/v2/version.Version={CONTAINERD_VERSION}"),
    GoBuild("coredns", COREDNS_VERSION, f"github.com/coredns/coredns@{COREDNS_VERSION}", {"coredns": "."},
            extra={"main.go": _COREDNS_MAIN.format(
                imports="\n".join(f'\t_ "github.com/coredns/coredns/plugin/{p}"' for p in _COREDNS_PLUGINS),
                directives=", ".join(f'"{p}"' for p in _COREDNS_PLUGINS))}),
    GoBuild("local-path-provisioner", LOCAL_PATH_VERSION,
            f"github.com/rancher/local-path-provisioner@{LOCAL_PATH_VERSION}",
            {"local-path-provisioner": "github.com/rancher/local-path-provisioner"},
            ldflags=f"-s -w -X main.VERSION={LOCAL_PATH_VERSION}"),
    GoBuild("kube-router", KUBE_ROUTER_VERSION, f"github.com/cloudnativelabs/kube-router/v2@{KUBE_ROUTER_VERSION}",
            {"kube-router": "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"}, _pin_requirements,
            ldflags=f"-s -w -X github.com/cloudnativelabs/kube-router/v2/pkg/version.Version={KUBE_ROUTER_VERSION}"),
    GoBuild("prometheus-operator", PROMETHEUS_OPERATOR_VERSION,
            f"github.com/prometheus-operator/prometheus-operator@{PROMETHEUS_OPERATOR_VERSION}",
            {"prometheus-operator": "github.com/prometheus-operator/prometheus-operator/cmd/operator",
             "prometheus-config-reloader":
                 "github.com/prometheus-operator/prometheus-operator/cmd/prometheus-config-reloader"},
            _pin_requirements_and_replaces, ldflags=_version_ldflags(PROMETHEUS_OPERATOR_VERSION)),
    GoBuild("prometheus", PROMETHEUS_VERSION, f"github.com/prometheus/prometheus@{PROMETHEUS_MODULE_VERSION}",
            {"prometheus": "github.com/prometheus/prometheus/cmd/prometheus",
             "promtool": "github.com/prometheus/prometheus/cmd/promtool"},
            _pin_requirements_and_replaces, tags=_PROMETHEUS_TAGS, ldflags=_version_ldflags(PROMETHEUS_VERSION)),
    GoBuild("pushgateway", PUSHGATEWAY_VERSION, f"github.com/prometheus/pushgateway@{PUSHGATEWAY_VERSION}",
            {"pushgateway": "github.com/prometheus/pushgateway"}, _pin_requirements,
            ldflags=_version_ldflags(PUSHGATEWAY_VERSION)),
)}


def _stamp_path(name: str) -> Path:
    return cache_dir() / "bin" / ".stamps" / name


def _built(build: GoBuild) -> dict[str, Path] | None:
    paths = {b: cache_dir() / "bin" / b for b in build.packages}
    try:
        if _stamp_path(build.name).read_text().strip() != build.stamp():
            return None
    except OSError:
        return None
    return paths if all(os.access(p, os.X_OK) for p in paths.values()) else None


def _build(build: GoBuild, quiet: bool) -> None:
    go = find_go()
    env = go_env(GOFLAGS="-modcacherw -mod=mod")
    bindir = cache_dir() / "bin"
    log = cache_dir() / f"{build.name}-build.log"
    if not quiet:
        print(f"testbed: building {build.name} {build.version} ({', '.join(build.packages)}) with {go} "
              f"(Go module proxy) -> {bindir}; log {log}", flush=True)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{build.name}-build.", dir=bindir))
    try:
        (work / "go.mod").write_text(f"module dpe.local/build\n\ngo 1.26.0\n\nrequire {build.module.replace('@', ' ')}\n")
        for name, text in build.extra.items():
            (work / name).write_text(text)
        if build.prepare is not None:
            build.prepare(build, go, work, env, log)
        imports = "".join(f'\t_ "{p}"\n' for p in build.packages.values() if p != ".")
        if imports:
            (work / "tools.go").write_text(f"//go:build tools\n\npackage build\n\nimport (\n{imports})\n")
        run([go, "mod", "tidy"], f"resolving the modules of {build.name} {build.version}", timeout=3600, env=env,
            cwd=work, log_path=log)
        out = work / "out"
        out.mkdir()
        cmd = [go, "build", "-trimpath", f"-ldflags={build.ldflags}"]
        if build.tags:
            cmd.append("-tags=" + ",".join(build.tags))
        if list(build.packages.values()) == ["."]:
            cmd += ["-o", str(out / next(iter(build.packages))), "."]
        else:
            cmd += ["-o", str(out) + "/", *build.packages.values()]
        run(cmd, f"building {build.name} {build.version}", timeout=3600, env=env, cwd=work, log_path=log)
        for binary, pkg in build.packages.items():
            built = out / (binary if pkg == "." else pkg.rstrip("/").rsplit("/", 1)[-1])
            if not built.is_file():
                raise LaunchError(f"building {build.name}: {built.name} missing after go build (log {log})")
            os.replace(built, bindir / binary)
        _stamp_path(build.name).parent.mkdir(parents=True, exist_ok=True)
        _stamp_path(build.name).write_text(build.stamp() + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not quiet:
        print(f"testbed: {build.name} {build.version} built in {time.monotonic() - t0:.0f}s", flush=True)


def ensure(name: str, quiet: bool = False) -> dict[str, Path]:
    """The binaries of build ``name`` (see BUILDS), built first when missing or of another recipe."""
    build = BUILDS[name]
    got = _built(build)
    if got is not None:
        return got
    (cache_dir() / "bin").mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir() / f"{name}.lock", f"building {name} {build.version}", wait_s=3600):
        if _built(build) is None:
            _build(build, quiet)
    got = _built(build)
    if got is None:
        raise LaunchError(f"{name} {build.version}: binaries missing right after the build")
    return got


def ensure_kube_apiserver(quiet: bool = False) -> Path:
    return ensure("kubernetes", quiet)["kube-apiserver"]


def ensure_etcd(quiet: bool = False) -> Path:
    return ensure("etcd", quiet)["etcd"]
