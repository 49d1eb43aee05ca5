#!/usr/bin/env bash
# Schema-driven API fuzzing: schemathesis (pinned in scripts/requirements.txt) over the whole
# OpenAPI document, against the real binary on a throwaway database and Redis prefix, once as a
# system admin, once as an organization member and once as an agent. Checks: no 5xx, responses
# conform to their documented schema, status codes and content types.
#
#   FUZZ_API_SECONDS   time budget of each of the three runs (default 40; `make fuzz-api` sets more)
#   FUZZ_API_EXAMPLES  examples per operation and phase (default 20)
#
# Everything it starts is stopped by its pid; the database is dropped. Exit status: schemathesis's.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${FUZZ_API_SECONDS:-40}
examples=${FUZZ_API_EXAMPLES:-20}
pg_admin=${AGENTIDP_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
redis_url=${AGENTIDP_TEST_REDIS_URL:-redis://127.0.0.1:6379}
target=${CARGO_TARGET_DIR:-target}

log() { printf 'fuzz-api: %s\n' "$*" >&2; }

venv=$(bash scripts/venv.sh)
cargo build --quiet --bin agentidp
bin="$target/debug/agentidp"

db="agentidp_fuzz_$(date +%s)_$$"
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
export AGENTIDP_REDIS__KEY_PREFIX="fuzz:$db:"
export AGENTIDP_SERVER__BIND="127.0.0.1:$port"
export AGENTIDP_SERVER__PUBLIC_URL="$base"
export AGENTIDP_LOG__FORMAT=json
# The fuzzer is not about limits: the plans' quotas would answer it 429 before it reached anything.
export AGENTIDP_TIERS__PLANS__FREE__API_CALLS_PER_DAY=unlimited
export AGENTIDP_TIERS__PLANS__FREE__MAX_AGENTS=unlimited
export AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__REQUESTS_PER_MINUTE=6000000
export AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__BURST=1000000

"$bin" migrate >/dev/null 2>"$work/migrate.log" || { cat "$work/migrate.log" >&2; exit 1; }
password="fuzz-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')"
"$bin" bootstrap --org "Fuzz Org" --email admin@fuzz.test --password-stdin <<<"$password" >/dev/null 2>"$work/bootstrap.log" \
    || { cat "$work/bootstrap.log" >&2; exit 1; }

"$bin" serve >"$work/server.log" 2>&1 &
server_pid=$!
for ((i = 0; ; i++)); do
    curl -fs "$base/health" >/dev/null 2>&1 && break
    kill -0 "$server_pid" 2>/dev/null || { tail -50 "$work/server.log" >&2; exit 1; }
    ((i < 300)) || { log "server did not come up"; exit 1; }
    sleep 0.1
done

post() { curl -fsS -X POST "$base$1" -H 'content-type: application/json' "${@:3}" -d "$2"; }
login() { post /auth/login "{\"email\":\"$1\",\"password\":\"$2\"}"; }

admin=$(login admin@fuzz.test "$password")
admin_token=$(jq -r .session_token <<<"$admin")
org=$(jq -r .actor.org_id <<<"$admin")
auth=(-H "authorization: Bearer $admin_token" -H "x-org-id: $org")

invite=$(post "/api/v1/organizations/$org/members" '{"email":"member@fuzz.test","role":"member"}' "${auth[@]}")
post /auth/set-password "{\"token\":\"$(jq -r .invitation_token <<<"$invite")\",\"password\":\"$password\"}" >/dev/null
member_token=$(login member@fuzz.test "$password" | jq -r .session_token)

agent=$(post /api/v1/agents '{"name":"fuzzer","allowed_scopes":["agents:read","usage:read","usage:write","presence:write","city:read","delegations:read","nodes:read"]}' "${auth[@]}")
cred=$(post "/api/v1/agents/$(jq -r .id <<<"$agent")/credentials" '{}' "${auth[@]}")
agent_token=$(curl -fsS -X POST "$base/api/v1/token" -u "$(jq -r .client_id <<<"$cred"):$(jq -r .client_secret <<<"$cred")" \
    -d grant_type=client_credentials | jq -r .access_token)

# Not fuzzed: logging out would end the session the rest of the run uses, and the presence stream
# never ends by design (it is covered by the city tests).
excludes=(--exclude-path /auth/logout --exclude-path /api/v1/city/presence/stream)
status=0
for who in admin member agent; do
    case $who in
        admin) token=$admin_token ;;
        member) token=$member_token ;;
        agent) token=$agent_token ;;
    esac
    log "as $who: up to ${seconds}s, $examples examples per operation"
    "$venv/bin/schemathesis" run openapi/openapi.json --url "$base" \
        -H "Authorization: Bearer $token" -H "X-Org-Id: $org" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
        "${excludes[@]}" --max-examples "$examples" --max-time "$seconds" --workers 2 \
        --request-timeout 10 --seed 20 --suppress-health-check all --no-color \
        --generation-with-security-parameters false --generation-database none \
        --report junit --report-junit-path "$target/fuzz-api-$who.xml" >"$target/fuzz-api-$who.log" 2>&1 || true
    grep -E "^ +(✅|❌|🚫)|passed|failed" "$target/fuzz-api-$who.log" | tail -6 >&2 || true
done
kill -0 "$server_pid" 2>/dev/null || { log "the server died"; tail -50 "$work/server.log" >&2; exit 1; }
if grep -q '"level":"ERROR"\|panicked' "$work/server.log"; then
    log "the server logged errors or panics:"
    grep '"level":"ERROR"\|panicked' "$work/server.log" | head -20 >&2
    status=1
fi
# The verdict from the JUnit reports: a failed check fails the run, and so does an error that
# reached the network (a dropped connection, a timeout). Errors inside the fuzzer itself (its
# Python tracebacks, "Runtime Error") are listed, not counted against the server.
"$venv/bin/python" - "$target" <<'PY' || status=1
import sys, xml.etree.ElementTree as ET
target = sys.argv[1]
failed = 0
for who in ("admin", "member", "agent"):
    root = ET.parse(f"{target}/fuzz-api-{who}.xml").getroot()
    cases = list(root.iter("testcase"))
    for tc in cases:
        for f in tc.findall("failure"):
            failed += 1
            print(f"fuzz-api: {who}: FAILED {tc.get('name')}: {(f.get('message') or '')[:200]}")
        for e in tc.findall("error"):
            text = e.text or ""
            if text.lstrip().startswith("Runtime Error") and "site-packages" in text:
                print(f"fuzz-api: {who}: fuzzer error (not counted) on {tc.get('name')}: {text.strip().splitlines()[2][:120]}")
            else:
                failed += 1
                print(f"fuzz-api: {who}: ERROR {tc.get('name')}: {text.strip()[:300]}")
    print(f"fuzz-api: {who}: {len(cases)} operations")
sys.exit(1 if failed else 0)
PY
exit $status
