# shellcheck shell=bash
# shellcheck disable=SC2034  # the variables are used by the scripts that source this file
# Common bits of scripts/up, logs, kafdrop, psql, down (sourced, not run).
#
# Exit codes of every script: 0 done, 1 failed, 2 bad usage, 3 a prerequisite is missing.
# Settings (environment):
#   DPE_RELEASE    helm release name            (default dpe)
#   DPE_NAMESPACE  Kubernetes namespace         (default dpe)
#   DPE_CLUSTER    kind cluster / minikube profile name (default dpe)
#   DPE_TABLE      PostgreSQL table of the sink (default dpe_data)

DPE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DPE_RELEASE="${DPE_RELEASE:-dpe}"
DPE_NAMESPACE="${DPE_NAMESPACE:-dpe}"
DPE_CLUSTER="${DPE_CLUSTER:-dpe}"
DPE_TABLE="${DPE_TABLE:-dpe_data}"
DPE_CHART="$DPE_ROOT/charts/dpe-ingest"
# Tools the project builds itself (e.g. helm, see docs/quickstart.md) are found there too, after the
# ones on PATH.
case ":$PATH:" in
*":$DPE_ROOT/.cache/bin:"*) ;;
*) PATH="$PATH:$DPE_ROOT/.cache/bin" ;;
esac
export PATH

EX_FAILED=1
EX_USAGE=2
EX_MISSING=3

dpe_prog="$(basename "${0:-dpe}")"

info() { printf '%s: %s\n' "$dpe_prog" "$*" >&2; }
step() { printf '\n==> %s\n' "$*" >&2; }
die() {
    local code="${2:-$EX_FAILED}"
    printf '%s: error: %s\n' "$dpe_prog" "$1" >&2
    exit "$code"
}
usage_error() { die "$1 (see $dpe_prog --help)" "$EX_USAGE"; }

# How to install each prerequisite (printed when it is missing).
install_hint() {
    case "$1" in
    docker) echo "install Docker Engine (Debian/Ubuntu: sudo apt-get install docker.io; others: https://docs.docker.com/engine/install/) and start it" ;;
    kind) echo "install kind: go install sigs.k8s.io/kind@v0.30.0 (puts it in \$(go env GOPATH)/bin), or a release binary: https://kind.sigs.k8s.io/docs/user/quick-start/#installation" ;;
    minikube) echo "install minikube: https://minikube.sigs.k8s.io/docs/start/" ;;
    kubectl) echo "install kubectl: sudo apt-get install kubectl (Kubernetes apt repository) or https://kubernetes.io/docs/tasks/tools/ ; with minikube: alias kubectl='minikube kubectl --'" ;;
    helm) echo "install helm v3: GOBIN=$DPE_ROOT/.cache/bin go install helm.sh/helm/v3/cmd/helm@v3.22.0 (found there by these scripts), or https://helm.sh/docs/intro/install/" ;;
    debootstrap) echo "install debootstrap: sudo apt-get install debootstrap" ;;
    git) echo "install git: sudo apt-get install git" ;;
    *) echo "install $1 with your package manager" ;;
    esac
}

# need CMD... : exit 3 naming every missing command and how to install it.
need() {
    local missing=() cmd
    for cmd in "$@"; do
        command -v "$cmd" > /dev/null 2>&1 || missing+=("$cmd")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        printf '%s: missing prerequisite(s): %s\n' "$dpe_prog" "${missing[*]}" >&2
        for cmd in "${missing[@]}"; do
            printf '  - %s: %s\n' "$cmd" "$(install_hint "$cmd")" >&2
        done
        exit "$EX_MISSING"
    fi
}

# The docker daemon must answer (not only the CLI be installed).
need_docker_daemon() {
    need docker
    if ! docker info > /dev/null 2>&1; then
        printf '%s: missing prerequisite: a running docker daemon (docker info fails)\n' "$dpe_prog" >&2
        printf '  - start it (sudo systemctl start docker), add yourself to the docker group, or set DOCKER_HOST\n' >&2
        exit "$EX_MISSING"
    fi
}

# The current kubectl context must reach a cluster.
need_cluster() {
    need kubectl
    if ! kubectl version --request-timeout=10s > /dev/null 2>&1; then
        local ctx
        ctx="$(kubectl config current-context 2>/dev/null || echo none)"
        die "no Kubernetes cluster answers (kubectl context: $ctx): run scripts/up first" "$EX_MISSING"
    fi
}

kc() { kubectl --namespace "$DPE_NAMESPACE" "$@"; }

# Department code as the chart writes it in the dpe-ingest/department label: 1 -> 01, 2a -> 2A,
# NONE -> none (the rows without a department).
# Exit 2 on an invalid code.
normalize_department() {
    local raw="$1" code
    code="$(printf '%s' "$raw" | tr '[:lower:]' '[:upper:]')"
    [[ "$code" =~ ^[1-9]$ ]] && code="0$code"
    [ "$code" = NONE ] && code=none
    if [[ "$code" =~ ^(0[1-9]|1[0-9]|2[AB]|2[1-9]|[3-8][0-9]|9[0-5]|97[1-8]|988|none)$ ]]; then
        printf '%s\n' "$code"
    else
        usage_error "invalid department code '$raw': valid forms are 01..19, 2A, 2B, 21..95, 971..978, 988, none (rows without a department)"
    fi
}

# print_help: the comment block at the top of the calling script (after the shebang), uncommented.
print_help() {
    sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p}' "$0"
}
