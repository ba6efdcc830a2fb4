#!/usr/bin/env bash
# docker-entrypoint.sh — entrypoint of dpe-test/postgres (the test cluster's stand-in of postgres:15),
# with the contract of the official image's entrypoint:
#
#   docker-entrypoint.sh postgres [OPTIONS]   (also: docker-entrypoint.sh -c opt=value …)
#     run as root: creates PGDATA and /var/run/postgresql, gives them to postgres (999) and runs
#       itself again as 999;
#     run as any other user (the chart: 999, read-only root): creates PGDATA (mode 0700) if it can;
#     first start (no PGDATA/PG_VERSION): initdb as POSTGRES_USER (default postgres) with
#       POSTGRES_PASSWORD (required unless POSTGRES_HOST_AUTH_METHOD=trust) and POSTGRES_INITDB_ARGS,
#       connections from anywhere authenticated by POSTGRES_HOST_AUTH_METHOD (default scram-sha-256),
#       database POSTGRES_DB (default POSTGRES_USER) created, /docker-entrypoint-initdb.d/*.sh and *.sql
#       run, all on a temporary server reachable only through the Unix socket;
#     then exec postgres (PID 1's replacement: SIGINT from `docker stop` is a fast shutdown).
#   anything else: exec'd as given (psql, bash …).
set -o nounset -o errexit -o pipefail

log() { printf '%s docker-entrypoint: %s\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')" "$*"; }
die() { printf 'docker-entrypoint: error: %s\n' "$*" >&2; exit 1; }

if [ "${1:0:1}" = '-' ]; then
    set -- postgres "$@"
fi
if [ "$1" != "postgres" ] || [ "${2:-}" = "--help" ] || [ "${2:-}" = "--version" ] \
    || [ "${2:-}" = "-V" ] || [ "${2:-}" = "--describe-config" ]; then
    exec "$@"
fi

: "${PGDATA:?PGDATA must be set}"
run_dir=/var/run/postgresql

if [ "$(id -u)" = "0" ]; then
    mkdir -p "$PGDATA" "$run_dir"
    chown postgres:postgres "$PGDATA" "$run_dir"
    chmod 0700 "$PGDATA"
    chmod 3777 "$run_dir" || :
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

mkdir -p "$PGDATA"
chmod 0700 "$PGDATA" || :
mkdir -p "$run_dir" 2>/dev/null || :
chmod 3777 "$run_dir" 2>/dev/null || :
[ -w "$run_dir" ] || die "$run_dir is not writable by $(id -u): mount a writable directory there"
[ -w "$PGDATA" ] || die "PGDATA $PGDATA is not writable by $(id -u)"

export POSTGRES_USER="${POSTGRES_USER:-postgres}"
export POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"
auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"
port="${PGPORT:-5432}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ] && [ "$auth" != "trust" ]; then
        die "database is uninitialized and POSTGRES_PASSWORD is not set: give a non-empty POSTGRES_PASSWORD
(or POSTGRES_HOST_AUTH_METHOD=trust to allow every connection without a password)"
    fi
    log "initialising $PGDATA as user $POSTGRES_USER, database $POSTGRES_DB"
    initdb_auth=(--auth-local=trust "--auth-host=$auth")
    # POSTGRES_INITDB_ARGS is a list of options: split on purpose (as upstream)
    # shellcheck disable=SC2086
    initdb --username="$POSTGRES_USER" --pwfile=<(printf '%s\n' "${POSTGRES_PASSWORD:-}") \
        "${initdb_auth[@]}" ${POSTGRES_INITDB_ARGS:-} --pgdata="$PGDATA"
    printf '\n# dpe-test/postgres: every other host authenticates with %s\nhost all all all %s\n' \
        "$auth" "$auth" >> "$PGDATA/pg_hba.conf"

    pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -p $port" -w start
    psql_base=(psql -v ON_ERROR_STOP=1 --no-password --no-psqlrc --username "$POSTGRES_USER" -p "$port")
    if [ "$POSTGRES_DB" != "postgres" ]; then
        exists="$("${psql_base[@]}" --dbname postgres -tA --set db="$POSTGRES_DB" \
            <<< "SELECT 1 FROM pg_database WHERE datname = :'db'")"
        if [ -z "$exists" ]; then
            "${psql_base[@]}" --dbname postgres --set db="$POSTGRES_DB" <<< 'CREATE DATABASE :"db";'
        fi
    fi
    shopt -s nullglob
    for f in /docker-entrypoint-initdb.d/*; do
        # shellcheck source=/dev/null
        case "$f" in
        *.sh) log "running $f"; PGPORT="$port" . "$f" ;;
        *.sql) log "running $f"; "${psql_base[@]}" --dbname "$POSTGRES_DB" -f "$f" ;;
        *.sql.gz) log "running $f"; gunzip -c "$f" | "${psql_base[@]}" --dbname "$POSTGRES_DB" ;;
        *) log "ignoring $f" ;;
        esac
    done
    shopt -u nullglob
    pg_ctl -D "$PGDATA" -m fast -w stop
    log "initialisation done"
else
    log "$PGDATA holds a database (PostgreSQL $(cat "$PGDATA/PG_VERSION")): skipping initialisation"
fi

exec "$@"
