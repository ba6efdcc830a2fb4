#!/bin/sh
# Runs in the build stages of images/dpe-ingest/Dockerfile (POSIX sh: the base image may be any
# Debian-like Python 3.11+ image, official or local).
#
#   build-venv.sh wheel        build the wheel of /src into /tmp/wheels (once, for both images)
#   build-venv.sh deps EXTRA   create /opt/venv, install the dependencies of pyproject.toml
#                              (base dependencies plus the optional-dependency group EXTRA, "" = none)
#   build-venv.sh extra EXTRA  add the optional-dependency group EXTRA to the venv of `deps ""`
#                              (the consumer's venv is the producer's dependencies plus its extra)
#   build-venv.sh app          install the wheel of /tmp/wheels (the first step's, copied) into
#                              /opt/venv without its dependencies (installed by the step above),
#                              check, drop pip
#
# Two steps so that a code change does not download the dependencies again (layer cache).
# pip settings come from the build arguments PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST
# (an empty argument means "pip's default") and PIP_CA_CERTS: PEM certificates added to pip's CA
# bundle (a mirror or a TLS-inspecting proxy with a private CA).
set -eu

VENV=/opt/venv
SRC=/src

for name in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_TRUSTED_HOST; do
    eval "value=\${$name:-}"
    if [ -n "$value" ]; then export "${name?}"; else unset "$name"; fi
done

use_ca_certs() {
    if [ -n "${PIP_CA_CERTS:-}" ]; then
        bundle=/tmp/pip-ca-bundle.pem
        "$VENV/bin/python" -c 'from pip._vendor import certifi; print(open(certifi.where()).read())' > "$bundle"
        printf '%s\n' "$PIP_CA_CERTS" >> "$bundle"
        export PIP_CERT="$bundle"
    fi
    unset PIP_CA_CERTS
}

case "${1:-}" in
deps|extra)
    mode="$1"
    group="${2:-}"
    if [ "$mode" = deps ]; then python3 -m venv "$VENV"; fi
    use_ca_certs
    # The dependency list of pyproject.toml: deps, [project].dependencies + the EXTRA group; extra,
    # the EXTRA group alone.
    "$VENV/bin/python" - "$SRC/pyproject.toml" "$mode" "$group" > /tmp/requirements.txt <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
mode, extra = sys.argv[2], sys.argv[3]
reqs = list(project.get("dependencies", [])) if mode == "deps" else []
if extra or mode == "extra":
    groups = project.get("optional-dependencies", {})
    if extra not in groups:
        sys.exit(f"build-venv.sh: pyproject.toml has no optional-dependencies group {extra!r}")
    reqs += groups[extra]
print("\n".join(reqs))
PY
    echo "build-venv.sh: installing into $VENV:"; sed 's/^/  /' /tmp/requirements.txt
    "$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check -r /tmp/requirements.txt
    rm -f /tmp/requirements.txt /tmp/pip-ca-bundle.pem
    ;;
wheel)
    VENV=/tmp/wheel-venv  # a venv only to run pip in, not kept
    python3 -m venv "$VENV"
    use_ca_certs
    "$VENV/bin/python" -m pip wheel --no-cache-dir --disable-pip-version-check --no-deps \
        --wheel-dir /tmp/wheels "$SRC"
    rm -rf "$VENV" /tmp/pip-ca-bundle.pem
    ;;
app)
    use_ca_certs
    "$VENV/bin/python" -m pip install --no-cache-dir --disable-pip-version-check --no-deps \
        --no-index /tmp/wheels/*.whl
    "$VENV/bin/python" -m pip check
    "$VENV/bin/dpe-ingest" --version
    # The runtime image needs neither pip nor setuptools.
    "$VENV/bin/python" -m pip uninstall --yes --disable-pip-version-check pip setuptools
    rm -rf /tmp/wheels /tmp/pip-ca-bundle.pem
    ;;
*)
    echo "usage: build-venv.sh wheel | build-venv.sh deps EXTRA | build-venv.sh extra EXTRA | build-venv.sh app" >&2
    exit 2
    ;;
esac
