#!/usr/bin/env bash
# A private PostgreSQL server for tests and single-machine setups: its own data folder, loopback only.
#
#   scripts/pg_server.sh start DIR PORT [DB ...]   initdb DIR if new, start on 127.0.0.1:PORT, create the DBs
#   scripts/pg_server.sh stop DIR                  fast shutdown (no-op when it is not running)
#   scripts/pg_server.sh url DIR DB                print postgresql+psycopg2://rfp@127.0.0.1:PORT/DB, the
#                                                  SQLAlchemy URL RFP_POSTGRES_URL / RFP_MLFLOW_BACKEND_URI take
#
# The superuser is `rfp`, loopback connections are trusted (no password): the server listens on
# 127.0.0.1 and a socket inside DIR only. PostgreSQL refuses to run as root, so as root the server
# runs as the `postgres` system user (created by the Debian package) or else `nobody`.
# Binaries: $PG_BIN, else the newest /usr/lib/postgresql/<ver>/bin, else `pg_config --bindir` or PATH;
# when none is found and we are root on Debian/Ubuntu, `apt-get install postgresql` first.
set -euo pipefail

die() { echo "pg_server.sh: $*" >&2; exit 1; }

find_bin() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$d" && -x "$d/initdb" ]]; then echo "$d"; return; fi
    if command -v pg_config >/dev/null 2>&1 && [[ -x "$(pg_config --bindir)/initdb" ]]; then
        pg_config --bindir; return
    fi
    if command -v initdb >/dev/null 2>&1; then dirname "$(readlink -f "$(command -v initdb)")"; return; fi
}

pg_bin() {
    local bin
    if [[ -n "${PG_BIN:-}" ]]; then
        [[ -x "$PG_BIN/initdb" && -x "$PG_BIN/pg_ctl" ]] || die "PG_BIN=$PG_BIN holds no initdb/pg_ctl: point it at PostgreSQL's bin folder"
        echo "$PG_BIN"; return
    fi
    bin=$(find_bin)
    if [[ -z "$bin" ]]; then
        if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
            echo "pg_server.sh: PostgreSQL not found, installing it with apt-get" >&2
            DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
            bin=$(find_bin)
        fi
        [[ -n "$bin" ]] || die "no PostgreSQL server binaries (initdb, pg_ctl) found: install PostgreSQL (Debian/Ubuntu: apt-get install postgresql) or set PG_BIN to its bin folder"
    fi
    echo "$bin"
}

# the user the server runs as: ourselves, unless we are root
server_user() {
    if [[ $(id -u) -ne 0 ]]; then id -un
    elif id postgres >/dev/null 2>&1; then echo postgres
    else echo nobody
    fi
}

as_server_user() {
    local user=$1; shift
    if [[ $(id -un) == "$user" ]]; then "$@"; else runuser -u "$user" -- "$@"; fi
}

start() {
    local dir=$1 port=$2; shift 2
    local bin user data
    bin=$(pg_bin)
    user=$(server_user)
    data="$dir/data"
    mkdir -p "$dir"
    chown "$user" "$dir"
    chmod 700 "$dir"
    if [[ ! -f "$data/PG_VERSION" ]]; then
        as_server_user "$user" "$bin/initdb" -D "$data" -U rfp --auth=trust -E UTF8 --locale=C >"$dir/initdb.log" 2>&1 \
            || die "initdb failed, see $dir/initdb.log: $(tail -n 5 "$dir/initdb.log")"
    fi
    as_server_user "$user" "$bin/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null \
        || die "the server did not start on 127.0.0.1:$port, see $dir/server.log: $(tail -n 5 "$dir/server.log" 2>/dev/null)"
    echo "$port" >"$dir/port"
    local db
    for db in "$@"; do
        if [[ -z $("$bin/psql" -h 127.0.0.1 -p "$port" -U rfp -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'") ]]; then
            "$bin/createdb" -h 127.0.0.1 -p "$port" -U rfp "$db"
        fi
    done
    echo "postgresql://rfp@127.0.0.1:$port"
}

stop() {
    local dir=$1 bin user
    [[ -f "$dir/data/postmaster.pid" ]] || return 0
    bin=$(pg_bin)
    user=$(server_user)
    as_server_user "$user" "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >/dev/null
}

cmd=${1:-}
case "$cmd" in
    start) [[ $# -ge 3 ]] || die "usage: $0 start DIR PORT [DB ...]"; start "${@:2}" ;;
    stop) [[ $# -eq 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
    url) [[ $# -eq 3 ]] || die "usage: $0 url DIR DB"; echo "postgresql+psycopg2://rfp@127.0.0.1:$(cat "$2/port")/$3" ;;
    *) die "usage: $0 start DIR PORT [DB ...] | stop DIR | url DIR DB" ;;
esac
