# Sourced by the scripts that test the served binary (fuzz-api.sh, oidc-client.sh): the debug
# `agentidp serve` with config/default.toml and environment overrides, on a throwaway database and
# Redis prefix and a port of its own. Everything it starts is stopped by its pid at exit, and the
# database is dropped.
#
#   served_prepare NAME   builds the binary; sets venv, bin, db, work, port, base; exports the
#                         server's environment; installs the cleanup trap
#   served_bootstrap ORG EMAIL
#                         migrates and bootstraps a system admin; sets password
#   served_start          starts the server and waits for /health; sets server_pid
#   served_check_log      returns 1 when the server died or logged an error or a panic

pg_admin=${AGENTIDP_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
redis_url=${AGENTIDP_TEST_REDIS_URL:-redis://127.0.0.1:6379}
target=${CARGO_TARGET_DIR:-target}
server_pid=""

served_cleanup() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    psql -q "$pg_admin" -c "drop database if exists $db with (force)" >/dev/null 2>&1 || true
    rm -rf "$work"
}

served_prepare() {
    venv=$(bash scripts/venv.sh)
    cargo build --quiet --bin agentidp
    bin="$target/debug/agentidp"
    db="agentidp_$1_$(date +%s)_$$"
    work=$(mktemp -d)
    port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    base="http://127.0.0.1:$port"
    trap served_cleanup EXIT
    psql -q "$pg_admin" -c "create database $db" >/dev/null
    export AGENTIDP_DATABASE__URL="${pg_admin%/*}/$db"
    export AGENTIDP_REDIS__URL="$redis_url"
    export AGENTIDP_REDIS__KEY_PREFIX="$1:$db:"
    export AGENTIDP_SERVER__BIND="127.0.0.1:$port"
    # The issuer clients check (discovery, the ID token's iss, RFC 9207's iss) is this URL.
    export AGENTIDP_SERVER__PUBLIC_URL="$base"
    export AGENTIDP_LOG__FORMAT=json
}

served_bootstrap() {
    "$bin" migrate >/dev/null 2>"$work/migrate.log" || { cat "$work/migrate.log" >&2; exit 1; }
    password="pw-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
    "$bin" bootstrap --org "$1" --email "$2" --password-stdin <<<"$password" >/dev/null 2>"$work/bootstrap.log" \
        || { cat "$work/bootstrap.log" >&2; exit 1; }
}

served_start() {
    "$bin" serve >"$work/server.log" 2>&1 &
    server_pid=$!
    for ((i = 0; ; i++)); do
        curl -fs "$base/health" >/dev/null 2>&1 && break
        kill -0 "$server_pid" 2>/dev/null || { tail -50 "$work/server.log" >&2; exit 1; }
        ((i < 300)) || { log "the server did not come up"; exit 1; }
        sleep 0.1
    done
}

served_check_log() {
    kill -0 "$server_pid" 2>/dev/null || { log "the server died"; tail -50 "$work/server.log" >&2; return 1; }
    if grep -q '"level":"ERROR"\|panicked' "$work/server.log"; then
        log "the server logged errors or panics:"
        grep '"level":"ERROR"\|panicked' "$work/server.log" | head -20 >&2
        return 1
    fi
}
