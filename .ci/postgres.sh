#!/usr/bin/env bash
# A throwaway PostgreSQL server for cohortsync's PostgreSQL tests.
#
# Usage:
#   source .ci/postgres.sh start   # start it; exports COHORTSYNC_TEST_POSTGRES_DSN
#                                  # and COHORTSYNC_TEST_POSTGRES_DIR in this shell
#   .ci/postgres.sh stop           # stop it and delete its files (reads
#                                  # COHORTSYNC_TEST_POSTGRES_DIR, or takes the dir
#                                  # as an argument: .ci/postgres.sh stop DIR)
#   eval "$(.ci/postgres.sh start)"    # the same as sourcing, for callers that
#                                      # prefer not to source
#   .ci/postgres.sh run -- CMD ARGS    # start, run CMD with the DSN exported,
#                                      # stop (also on failure), exit with CMD's status
#   .ci/postgres.sh status
#
# What "start" does: finds the PostgreSQL server binaries (installing Debian's
# `postgresql` package with apt-get when none are found), creates a cluster in
# a fresh temporary directory owned by an unprivileged system user (initdb
# refuses to run as root; CI runs as root), starts it listening on 127.0.0.1
# on a free port with its Unix socket inside that directory, and creates a
# login role with a random password owning a database. Durability is switched
# off (fsync=off): the cluster is thrown away.
#
# Environment knobs: COHORTSYNC_PG_BINDIR (server binaries), COHORTSYNC_PG_USER
# (the OS user that owns the cluster when run as root), COHORTSYNC_PG_PORT.

_cspg_log() {
    printf '[postgres.sh] %s\n' "$*" >&2
}

_cspg_bindir() {
    # The newest installed server version first; then whatever is on PATH.
    local dir candidate
    if [[ -n "${COHORTSYNC_PG_BINDIR:-}" ]]; then
        printf '%s\n' "$COHORTSYNC_PG_BINDIR"
        return 0
    fi
    # The highest installed server version (sort -V: 9 < 10 < 15).
    candidate=$(for dir in /usr/lib/postgresql/*/bin; do
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
            printf '%s\n' "$dir"
        fi
    done | sort -V | tail -n 1)
    if [[ -n "$candidate" ]]; then
        printf '%s\n' "$candidate"
        return 0
    fi
    if command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(readlink -f "$(command -v initdb)")"
        return 0
    fi
    return 1
}

_cspg_install() {
    _cspg_log "no PostgreSQL server binaries found: installing Debian's postgresql package"
    local sudo=""
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo="sudo"
        else
            _cspg_log "not root and no sudo: install PostgreSQL yourself or set COHORTSYNC_PG_BINDIR"
            return 1
        fi
    fi
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        postgresql >&2
}

_cspg_free_port() {
    if [[ -n "${COHORTSYNC_PG_PORT:-}" ]]; then
        printf '%s\n' "$COHORTSYNC_PG_PORT"
    elif command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
    else
        printf '%s\n' $((20000 + RANDOM % 40000))
    fi
}

# Run a command as the cluster's owner (a no-op wrapper when not root).
_cspg_as_owner() {
    if [[ "$(id -u)" != 0 ]]; then
        "$@"
    elif command -v runuser >/dev/null 2>&1; then
        runuser -u "$_CSPG_OWNER" -- "$@"
    else
        su -s /bin/sh "$_CSPG_OWNER" -c "$(printf '%q ' "$@")"
    fi
}

_cspg_owner() {
    if [[ "$(id -u)" != 0 ]]; then
        id -un
        return 0
    fi
    if [[ -n "${COHORTSYNC_PG_USER:-}" ]]; then
        printf '%s\n' "$COHORTSYNC_PG_USER"
    elif id postgres >/dev/null 2>&1; then
        printf 'postgres\n'
    else
        if ! id cohortsync-ci >/dev/null 2>&1; then
            _cspg_log "creating system user cohortsync-ci to own the cluster"
            useradd --system --user-group --no-create-home --shell /usr/sbin/nologin \
                cohortsync-ci >&2
        fi
        printf 'cohortsync-ci\n'
    fi
}

# Prints "DSN<TAB>DIR" on success; everything else goes to stderr.
_cspg_start() (
    set -euo pipefail
    local bindir dir port password attempt dsn
    if ! bindir=$(_cspg_bindir); then
        _cspg_install
        bindir=$(_cspg_bindir) || {
            _cspg_log "PostgreSQL installed but initdb/pg_ctl not found"
            exit 1
        }
    fi
    _cspg_log "using server binaries in $bindir ($("$bindir/postgres" --version))"
    _CSPG_OWNER=$(_cspg_owner)
    dir=$(mktemp -d "${TMPDIR:-/tmp}/cohortsync-pg.XXXXXX")
    if [[ "$(id -u)" == 0 ]]; then
        chown "$_CSPG_OWNER" "$dir"
        if ! _cspg_as_owner test -w "$dir"; then
            # TMPDIR is not reachable by the cluster's owner (e.g. under /root).
            rmdir "$dir"
            dir=$(mktemp -d /tmp/cohortsync-pg.XXXXXX)
            chown "$_CSPG_OWNER" "$dir"
        fi
    fi
    chmod 700 "$dir"
    printf '%s\n' "$bindir" >"$dir/bindir"
    printf '%s\n' "$_CSPG_OWNER" >"$dir/owner"
    # A failed start leaves nothing behind: no running server, no directory.
    trap "_cspg_stop '$dir' >/dev/null 2>&1 || rm -rf -- '$dir'" EXIT
    cd "$dir"
    password=$(head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n')
    # Local (socket) connections are trusted: only the owner and root can reach
    # the socket inside the 0700 directory. TCP needs the password.
    _cspg_as_owner "$bindir/initdb" -D "$dir/data" -U postgres --no-locale -E UTF8 \
        --auth-local=trust --auth-host=scram-sha-256 >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        exit 1
    }
    for attempt in 1 2 3 4 5; do
        port=$(_cspg_free_port)
        if _cspg_as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off \
-c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
            start >&2; then
            break
        fi
        _cspg_log "start on port $port failed (attempt $attempt)"
        tail -n 20 "$dir/server.log" >&2 || true
        if [[ $attempt == 5 || -n "${COHORTSYNC_PG_PORT:-}" ]]; then
            exit 1
        fi
    done
    _cspg_as_owner "$bindir/psql" -X -q -h "$dir" -p "$port" -U postgres -d postgres \
        -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE cohortsync LOGIN PASSWORD '$password'" \
        -c "CREATE DATABASE cohortsync_test OWNER cohortsync" >&2
    printf '%s\n' "$port" >"$dir/port"
    dsn="postgresql://cohortsync:${password}@127.0.0.1:${port}/cohortsync_test"
    trap - EXIT
    printf '%s\t%s\n' "$dsn" "$dir"
)

_cspg_stop() (
    set -euo pipefail
    local dir="${1:-${COHORTSYNC_TEST_POSTGRES_DIR:-}}"
    if [[ -z "$dir" ]]; then
        _cspg_log "stop: no server directory (set COHORTSYNC_TEST_POSTGRES_DIR or pass it)"
        exit 1
    fi
    if [[ ! -f "$dir/owner" ]]; then
        rm -rf -- "$dir"
        _cspg_log "stop: $dir holds no started cluster; removed what was there"
        exit 0
    fi
    _CSPG_OWNER=$(cat "$dir/owner")
    cd "$dir"
    _cspg_as_owner "$(cat "$dir/bindir")/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
    rm -rf -- "$dir"
    _cspg_log "stopped and removed $dir"
)

_cspg_status() (
    set -euo pipefail
    local dir="${1:-${COHORTSYNC_TEST_POSTGRES_DIR:-}}"
    if [[ -z "$dir" || ! -d "$dir/data" ]]; then
        _cspg_log "no server"
        exit 3
    fi
    _CSPG_OWNER=$(cat "$dir/owner")
    cd "$dir"
    _cspg_as_owner "$(cat "$dir/bindir")/pg_ctl" -D "$dir/data" status
)

_cspg_mask() {
    # postgresql://user:secret@host -> postgresql://user:***@host
    printf '%s\n' "$1" | sed -E 's#(://[^:/@]*:)[^@]*@#\1***@#'
}

_cspg_main() {
    local command="${1:-}" out
    case "$command" in
        start)
            out=$(_cspg_start) || return 1
            COHORTSYNC_TEST_POSTGRES_DSN="${out%%$'\t'*}"
            COHORTSYNC_TEST_POSTGRES_DIR="${out#*$'\t'}"
            export COHORTSYNC_TEST_POSTGRES_DSN COHORTSYNC_TEST_POSTGRES_DIR
            if [[ "${_CSPG_SOURCED}" == 1 ]]; then
                _cspg_log "exported COHORTSYNC_TEST_POSTGRES_DSN=$(_cspg_mask "$COHORTSYNC_TEST_POSTGRES_DSN")"
                _cspg_log "stop it with: .ci/postgres.sh stop"
            else
                printf 'export COHORTSYNC_TEST_POSTGRES_DSN=%q\n' "$COHORTSYNC_TEST_POSTGRES_DSN"
                printf 'export COHORTSYNC_TEST_POSTGRES_DIR=%q\n' "$COHORTSYNC_TEST_POSTGRES_DIR"
            fi
            ;;
        stop)
            _cspg_stop "${2:-}"
            ;;
        status)
            _cspg_status "${2:-}"
            ;;
        run)
            shift
            [[ "${1:-}" == "--" ]] && shift
            if [[ $# == 0 ]]; then
                _cspg_log "run: give a command: .ci/postgres.sh run -- CMD ARGS"
                return 2
            fi
            _cspg_main start >/dev/null || return 1
            local status=0
            trap '_cspg_stop "$COHORTSYNC_TEST_POSTGRES_DIR"' EXIT
            "$@" || status=$?
            return "$status"
            ;;
        *)
            _cspg_log "usage: source .ci/postgres.sh start | .ci/postgres.sh {start|stop [DIR]|status [DIR]|run -- CMD}"
            return 2
            ;;
    esac
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    _CSPG_SOURCED=1
    _cspg_main "$@"
else
    _CSPG_SOURCED=0
    _cspg_main "$@"
    exit $?
fi
