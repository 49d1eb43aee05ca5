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

callback=https://app.example/callback
email=admin@oidc-client.test

log() { printf 'oidc-client: %s\n' "$*" >&2; }
fail() { log "FAILED: $*"; exit 1; }

source scripts/served.sh
served_prepare oidc_client

served_bootstrap "OIDC Client Org" "$email"
served_start

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

served_check_log || fail "the server died or logged errors"
log "passed"
