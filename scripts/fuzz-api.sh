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

log() { printf 'fuzz-api: %s\n' "$*" >&2; }

source scripts/served.sh
served_prepare fuzz
# The fuzzer is not about limits: the plans' quotas would answer it 429 before it reached anything.
export AGENTIDP_TIERS__PLANS__FREE__API_CALLS_PER_DAY=unlimited
export AGENTIDP_TIERS__PLANS__FREE__MAX_AGENTS=unlimited
export AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__REQUESTS_PER_MINUTE=6000000
export AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__BURST=1000000

served_bootstrap "Fuzz Org" admin@fuzz.test
served_start

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
served_check_log || status=1
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
