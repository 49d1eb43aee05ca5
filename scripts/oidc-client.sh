#!/usr/bin/env bash
# A real OpenID Connect relying party (authlib, tests/oidc_client.py) against the served binary:
# `agentidp serve` with config/default.toml and environment overrides, as `make run` starts it,
# on a throwaway database and Redis prefix and a port of its own. The client signs a person in
# with the authorization code flow and PKCE through the server's own sign-in and consent pages,
# validates the ID token against the JWKS, refreshes and calls userinfo; then this script checks
# that presenting the spent refresh token again is refused and revokes what it had become.
#
# Part of `make test` (after `cargo test`). Everything it starts is stopped by its pid; the
# database is dropped. Exit status: 0 when every step passed.
set -euo pipefail
cd "$(dirname "$0")/.."

pg_admin=${AGENTIDP_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
redis_url=${AGENTIDP_TEST_REDIS_URL:-redis://127.0.0.1:6379}
target=${CARGO_TARGET_DIR:-target}
callback=https://app.example/callback
email=admin@oidc-client.test

log() { printf 'oidc-client: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

venv=$(bash scripts/venv.sh)
cargo build --quiet --bin agentidp
bin="$target/debug/agentidp"

db="agentidp_oidc_client_$(date +%s)_$$"
work=$(mktemp -d)
port=$("$venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
server_pid=""

cleanup() {
    if [[ -n $server_pid ]]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    psql -q "$pg_admin" -c "drop database if exists $db with (force)" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

psql -q "$pg_admin" -c "create database $db" >/dev/null
export AGENTIDP_DATABASE__URL="${pg_admin%/*}/$db"
export AGENTIDP_REDIS__URL="$redis_url"
export AGENTIDP_REDIS__KEY_PREFIX="oidc-client:$db:"
export AGENTIDP_SERVER__BIND="127.0.0.1:$port"
# The issuer the client checks (discovery, the ID token's iss, RFC 9207's iss) is this URL.
export AGENTIDP_SERVER__PUBLIC_URL="$base"
export AGENTIDP_LOG__FORMAT=json

"$bin" migrate >/dev/null 2>"$work/migrate.log" || { cat "$work/migrate.log" >&2; exit 1; }
password="oidc-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
"$bin" bootstrap --org "OIDC Client Org" --email "$email" --password-stdin <<<"$password" >/dev/null \
    2>"$work/bootstrap.log" || { cat "$work/bootstrap.log" >&2; exit 1; }

"$bin" serve >"$work/server.log" 2>&1 &
server_pid=$!
for ((i = 0; ; i++)); do
    curl -fs "$base/health" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || { tail -50 "$work/server.log" >&2; exit 1; }
    ((i < 300)) || fail "the server did not come up"
    sleep 0.1
done

# An organization admin registers a confidential web application.
session=$(curl -fsS -X POST "$base/auth/login" -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"$password\"}")
token=$(jq -r .session_token <<<"$session")
org=$(jq -r .actor.org_id <<<"$session")
actor=$(jq -r .actor.actor_id <<<"$session")
app=$(curl -fsS -X POST "$base/api/v1/clients" -H "authorization: Bearer $token" -H "x-org-id: $org" \
    -H 'content-type: application/json' -d "{\"name\":\"Example App\",\"redirect_uris\":[\"$callback\"]}")
client_id=$(jq -r .client_id <<<"$app")
secret=$(jq -r .client_secret <<<"$app")

log "authlib: code + PKCE, ID token against the JWKS, refresh, userinfo at $base"
seen=$("$venv/bin/python" tests/oidc_client.py "$base" "$client_id" "$secret" "$callback" "$email" "$password") \
    || fail "the authlib client (see above)"

[[ $(jq -r .sub <<<"$seen") == "$actor" ]] || fail "sub is $(jq -r .sub <<<"$seen"), not $actor"
[[ $(jq -r .email <<<"$seen") == "$email" ]] || fail "userinfo's email"
[[ $(jq -r .id_token_alg <<<"$seen") == ES256 ]] || fail "the ID token's alg"
actor_type=$("$venv/bin/python" -c '
import base64, json, sys
p = sys.argv[1].split(".")[1]
print(json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))["actor_type"])' "$(jq -r .access_token <<<"$seen")")
[[ $actor_type == human ]] || fail "the refreshed access token is not a person's ($actor_type)"

# The refresh spent the first refresh token: presenting it again is reuse, and revokes the family.
reuse=$(curl -sS -o "$work/reuse.json" -w '%{http_code}' -X POST "$base/api/v1/token" -u "$client_id:$secret" \
    -d grant_type=refresh_token --data-urlencode "refresh_token=$(jq -r .first_refresh_token <<<"$seen")")
[[ $reuse == 400 && $(jq -r .error "$work/reuse.json") == invalid_grant ]] || fail "refresh token reuse answered $reuse"
info=$(curl -sS -o /dev/null -w '%{http_code}' "$base/oauth2/userinfo" \
    -H "authorization: Bearer $(jq -r .access_token <<<"$seen")")
[[ $info == 401 ]] || fail "after reuse, the refreshed access token still reads userinfo ($info)"

kill -0 "$server_pid" 2>/dev/null || { tail -50 "$work/server.log" >&2; fail "the server died"; }
if grep -q '"level":"ERROR"\|panicked' "$work/server.log"; then
    grep '"level":"ERROR"\|panicked' "$work/server.log" | head -20 >&2
    fail "the server logged errors or panics"
fi
log "passed"
