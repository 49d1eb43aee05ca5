#!/usr/bin/env bash
# make bench: load-tests agentidp and, in the same run, panva's oidc-provider as a peer, on loopback
# with wrk. See bench/README.md for what each scenario means and for every knob below.
#
# Steps: build the release binary; drop and recreate a Postgres database of its own; start agentidp
# on a free 127.0.0.1 port with a unique Redis key prefix; bootstrap an org, log in, make an API key,
# an agent, a credential and an access token; run the HTTP scenarios (pdp-http included); restart
# with RS256 for token-rs256; run the in-process PDP bench (cargo bench --bench pdp); then start the
# peer and run its scenarios; print one table of both.
# Everything is bounded: every wait polls a fixed number of times, every wrk run has a duration and
# an outer `timeout`, and the servers are stopped on exit, whatever the exit.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)

# --- knobs --------------------------------------------------------------------
DURATION=${BENCH_DURATION:-10s}             # each measured run
WARMUP=${BENCH_WARMUP:-2s}                  # unmeasured run before each measured one; 0 = none
CONNECTIONS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
LOGIN_DURATION=${BENCH_LOGIN_DURATION:-5s}  # login is argon2id: fewer connections, shorter run
LOGIN_CONNECTIONS=${BENCH_LOGIN_CONNECTIONS:-8}
WRK_TIMEOUT=${BENCH_WRK_TIMEOUT:-5s}        # a response slower than this counts as a timeout
DB_NAME=${BENCH_DB:-agentidp_bench}
DB_MAX_CONNECTIONS=${BENCH_DB_MAX_CONNECTIONS:-32}
PG_HOST=${BENCH_PG_HOST:-127.0.0.1}
PG_PORT=${BENCH_PG_PORT:-5432}
REDIS_HOST=${BENCH_REDIS_HOST:-127.0.0.1}
REDIS_PORT=${BENCH_REDIS_PORT:-6379}
OUT=${BENCH_OUT:-$BENCH_DIR/out}
RUN_PEER=${BENCH_PEER:-1}                   # 0 = agentidp only
KEEP_DB=${BENCH_KEEP_DB:-0}                 # 1 = leave the database for inspection
PDP_BODY=${BENCH_PDP_BODY:-}                # pdp-http request body; default: an agent executing a tool
PDP_INPROC=${BENCH_PDP_INPROC:-1}           # 0 = skip the in-process PDP bench (cargo bench --bench pdp)
# AGENTIDP_BIN=path: use this binary instead of building (CARGO_TARGET_DIR is honoured when building).

PASSWORD='bench-password-not-a-secret-0123'
EMAIL='bench@bench.test'
PEER_CLIENT_ID='bench-client'
PEER_CLIENT_SECRET='bench-secret-0123456789abcdef0123456789abcdef'
REDIS_PREFIX="agentidp_bench:$(date +%s)-$$:"

# --- helpers ------------------------------------------------------------------
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

# "10s", "2m", "10" -> seconds (wrk's own syntax, for our outer timeouts).
secs_of() {
    case $1 in
        *ms) echo 1 ;;
        *s) echo "${1%s}" ;;
        *m) echo $((${1%m} * 60)) ;;
        *h) echo $((${1%h} * 3600)) ;;
        *) echo "$1" ;;
    esac
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# json_get FIELD < json: prints one top-level string/number field, or fails.
json_get() {
    python3 -c 'import json, sys
d = json.load(sys.stdin)
v = d[sys.argv[1]]
print(v)' "$1"
}

# The `alg` in a compact JWS header.
jwt_alg() {
    python3 -c 'import base64, json, sys
h = sys.argv[1].split(".")[0]
print(json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4)))["alg"])' "$1"
}

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
hwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

# --- processes we start, stopped on any exit ------------------------------------
SERVER_PID=''
PEER_PID=''
SAMPLER_PID=''

stop_pid() { # stop_pid PID NAME: SIGTERM, up to 10 s, then SIGKILL
    local pid=$1 name=$2 i
    [[ -n $pid ]] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name (pid $pid) did not stop within 10 s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

psql_admin() {
    env -u PGPASSWORD PGCONNECT_TIMEOUT=5 psql -X -w -q -v ON_ERROR_STOP=1 \
        -h "$PG_HOST" -p "$PG_PORT" -U postgres -d postgres "$@"
}

# The original stdout and stderr: a signal's trap may run while a command's output is redirected
# to a file, and the cleanup's messages belong on the terminal.
exec 3>&1 4>&2
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    exec 1>&3 2>&4
    if [[ -n $SAMPLER_PID ]]; then
        kill "$SAMPLER_PID" 2>/dev/null || true
        wait "$SAMPLER_PID" 2>/dev/null || true
    fi
    stop_pid "$SERVER_PID" agentidp
    stop_pid "$PEER_PID" oidc-provider
    if command -v redis-cli >/dev/null; then
        timeout 20 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" --scan --pattern "${REDIS_PREFIX}*" 2>/dev/null \
            | timeout 20 xargs -r -n 200 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" del >/dev/null 2>&1 || true
    fi
    if [[ $KEEP_DB != 1 && ${DB_CREATED:-0} == 1 ]]; then
        psql_admin -c "drop database if exists $DB_NAME with (force)" >/dev/null 2>&1 || true
    fi
    if ((rc != 0)); then
        log "exit $rc; logs are in $OUT"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_ready URL PID NAME LOG: poll URL for 2xx, at most 60 s, failing early if PID died.
wait_ready() {
    local url=$1 pid=$2 name=$3 logfile=$4 i
    for ((i = 0; i < 240; i++)); do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$logfile" >&2 || true
            die "$name exited during start-up (log: $logfile)"
        fi
        curl -fsS -m 2 -o /dev/null "$url" 2>/dev/null && return 0
        sleep 0.25
    done
    tail -n 20 "$logfile" >&2 || true
    die "$name not ready at $url after 60 s (log: $logfile)"
}

# api METHOD URL [curl args...]: prints the body; fails the run on a non-2xx answer.
api() {
    local method=$1 url=$2 body code
    shift 2
    body=$(mktemp)
    code=$(curl -sS -m 30 -X "$method" -o "$body" -w '%{http_code}' "$url" "$@") || {
        rm -f "$body"
        die "$method $url: curl failed"
    }
    if [[ $code != 2?? ]]; then
        log "$method $url -> HTTP $code: $(head -c 500 "$body")"
        rm -f "$body"
        die "$method $url answered $code"
    fi
    cat "$body"
    rm -f "$body"
}

# --- the request of a scenario (read by bench/request.lua and by probe) ----------
R_METHOD=GET R_BODY='' R_CTYPE='' R_AUTH='' R_HEADER=''
set_request() { # set_request METHOD [BODY] [CONTENT-TYPE] [AUTHORIZATION] [EXTRA "Name: value"]
    R_METHOD=$1 R_BODY=${2:-} R_CTYPE=${3:-} R_AUTH=${4:-} R_HEADER=${5:-}
}

# probe URL: the HTTP status of one such request.
probe() {
    local args=(-sS -m 30 -o /dev/null -w '%{http_code}' -X "$R_METHOD")
    [[ -n $R_CTYPE ]] && args+=(-H "Content-Type: $R_CTYPE")
    [[ -n $R_AUTH ]] && args+=(-H "Authorization: $R_AUTH")
    [[ -n $R_HEADER ]] && args+=(-H "$R_HEADER")
    [[ -n $R_BODY ]] && args+=(--data-raw "$R_BODY")
    curl "${args[@]}" "$1" || echo 000
}

wrk_run() { # wrk_run CONNS DURATION URL [wrk args...]
    local conns=$1 dur=$2 url=$3
    shift 3
    env BENCH_METHOD="$R_METHOD" BENCH_BODY="$R_BODY" BENCH_CTYPE="$R_CTYPE" BENCH_AUTH="$R_AUTH" \
        BENCH_HEADER="$R_HEADER" \
        timeout -k 5 $(($(secs_of "$dur") + 60)) \
        wrk -t"$THREADS" -c"$conns" -d"$dur" --timeout "$WRK_TIMEOUT" -s "$BENCH_DIR/request.lua" "$@" "$url"
}

RESULTS="$OUT/results.tsv"
NOTES="$OUT/notes.txt"
note() {
    log "note: $*"
    printf '%s\n' "$*" >>"$NOTES"
}

# What else was busy (>= 20 % of a core, by top over half a second), apart from the server under
# test and wrk: other work sharing these cores during the run. Prints e.g. "rustc(96%)" or "none".
competition() { # competition PID
    local busy
    busy=$(timeout 10 top -b -n 2 -d 0.5 -w 200 2>/dev/null | awk -v s="$1" '
        /^top -/ { n++; next }
        n == 2 && $1 == "PID" { table = 1; next }
        table && $1 != s && $12 != "wrk" && $12 != "top" && $9 + 0 >= 20 { printf "%s%s(%d%%)", sep, $12, $9; sep = " " }')
    printf '%s' "${busy:-none}"
}

# Commands Redis has executed so far (all clients; INFO commandstats), or empty without redis-cli.
redis_calls() {
    command -v redis-cli >/dev/null || return 0
    timeout 10 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" INFO commandstats 2>/dev/null \
        | awk -F'[:=,]' '/^cmdstat_/ { s += $3 } END { print s + 0 }'
}

# Rows in the bench database's analytics_event (empty when the table is absent).
analytics_rows() {
    psql_admin -d "$DB_NAME" -Atc "select count(*) from analytics_event" 2>/dev/null || true
}

# What one agentidp scenario cost Redis and analytics_event, per request, as a note.
cost_note() { # cost_note NAME REQUESTS REDIS_BEFORE REDIS_AFTER ROWS_BEFORE ROWS_AFTER
    local name=$1 requests=$2
    ((requests > 0)) || return 0
    if [[ -n $3 && -n $4 ]]; then
        note "$name: Redis commands per request $(awk -v a="$3" -v b="$4" -v n="$requests" 'BEGIN { printf "%.4f", (b - a - 1) / n }') ($(($4 - $3 - 1)) commands, $requests requests, INFO commandstats)"
    fi
    if [[ -n $5 && -n $6 ]]; then
        note "$name: analytics_event rows per 1,000 requests $(awk -v a="$5" -v b="$6" -v n="$requests" 'BEGIN { printf "%.3f", (b - a) * 1000 / n }') ($(($6 - $5)) rows)"
    fi
}

# scenario SIDE NAME PID URL [CONNS] [DURATION]: probe, warm up, measure; one line in results.tsv.
scenario() {
    local side=$1 name=$2 pid=$3 url=$4 conns=${5:-$CONNECTIONS} dur=${6:-$DURATION}
    local code raw line peak sampled hwm_ok=0 ld busy
    code=$(probe "$url")
    [[ $code == 2?? ]] || die "$side $name: a single request to $url answered $code, expected 2xx"
    if [[ $(secs_of "$WARMUP") != 0 ]]; then
        wrk_run "$conns" "$WARMUP" "$url" >/dev/null 2>&1 || die "$side $name: warm-up wrk run failed"
    fi
    # Peak RSS during the run: VmHWM reset just before it (clear_refs 5), and a 10 Hz VmRSS poll in
    # case the kernel refuses the reset.
    echo 5 >"/proc/$pid/clear_refs" 2>/dev/null && hwm_ok=1
    local maxfile
    maxfile=$(mktemp)
    (
        max=0
        for ((i = 0; i < ($(secs_of "$dur") + 70) * 10; i++)); do
            r=$(rss_kb "$pid")
            if ((r > max)); then
                max=$r
                echo "$max" >"$maxfile"
            fi
            sleep 0.1
        done
    ) &
    SAMPLER_PID=$!
    local busyfile
    busyfile=$(mktemp)
    (
        sleep $(($(secs_of "$dur") / 2))
        competition "$pid" >"$busyfile"
    ) &
    local busy_pid=$!
    ld=$(cut -d' ' -f1 /proc/loadavg)
    local redis_before='' rows_before=''
    if [[ $side == agentidp ]]; then
        # What the warm-up counted reaches Postgres first (one analytics flush interval).
        sleep 1.2
        redis_before=$(redis_calls)
        rows_before=$(analytics_rows)
    fi
    raw="$OUT/wrk-$side-$name.txt"
    log "$side $name: wrk -t$THREADS -c$conns -d$dur $url"
    wrk_run "$conns" "$dur" "$url" --latency >"$raw" 2>&1 || {
        cat "$raw" >&2
        die "$side $name: wrk failed"
    }
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=''
    wait "$busy_pid" 2>/dev/null || true
    busy=$(cat "$busyfile" 2>/dev/null)
    rm -f "$busyfile"
    [[ -n $busy ]] || busy='?'
    sampled=$(cat "$maxfile" 2>/dev/null || echo 0)
    rm -f "$maxfile"
    peak=${sampled:-0}
    if ((hwm_ok)); then
        local hwm
        hwm=$(hwm_kb "$pid")
        if ((hwm > peak)); then peak=$hwm; fi
    fi
    kill -0 "$pid" 2>/dev/null || die "$side $name: the server died during the run (see $OUT)"
    line=$(grep '^BENCH_RESULT ' "$raw") || die "$side $name: no summary in $raw"
    if [[ $side == agentidp ]]; then
        local redis_after rows_after requests
        redis_after=$(redis_calls)
        sleep 1.2
        rows_after=$(analytics_rows)
        requests=$(sed -n 's/.* requests=\([0-9]*\).*/\1/p' <<<"$line")
        cost_note "$name" "${requests:-0}" "$redis_before" "$redis_after" "$rows_before" "$rows_after"
    fi
    # requests rps p50 p99 status_errors socket_errors peak_kb
    awk -v side="$side" -v name="$name" -v peak="$peak" -v conns="$conns" -v dur="$dur" -v ld="$ld" \
        -v busy="$busy" '{
            for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            sock = v["connect_errors"] + v["read_errors"] + v["write_errors"] + v["timeouts"]
            printf "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", side, name, v["requests"], v["rps"],
                v["p50_ms"], v["p99_ms"], v["status_errors"], sock, peak, conns, dur, v["max_ms"], ld, busy
        }' <<<"$line" >>"$RESULTS"
    log "$side $name: $(awk -F'\t' 'END { printf "%s req/s, p50 %s ms, p99 %s ms, >=400: %s, socket errors: %s, peak RSS %.1f MiB", $4, $5, $6, $7, $8, $9 / 1024 }' "$RESULTS")"
}

# --- prerequisites --------------------------------------------------------------
mkdir -p "$OUT"
: >"$RESULTS"
: >"$NOTES"
[[ $DB_NAME =~ ^[a-z_][a-z0-9_]*$ ]] || die "BENCH_DB must be a plain lower-case identifier, not '$DB_NAME'"
[[ $DB_NAME != agentidp ]] || die "BENCH_DB must not be the development database 'agentidp': it is dropped"

for tool in curl python3 psql awk sed timeout; do
    command -v "$tool" >/dev/null || die "$tool is required (make bench runs scripts/services.sh first for psql)"
done
if ! command -v wrk >/dev/null; then
    if [[ $(id -u) -eq 0 ]]; then
        log "installing wrk with apt-get"
        apt-get update -qq >/dev/null || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null || die "apt-get install wrk failed"
    else
        die "wrk is not installed: sudo apt-get install -y wrk"
    fi
fi
if [[ $RUN_PEER == 1 ]]; then
    command -v node >/dev/null || die "node is required for the peer (or run with BENCH_PEER=0)"
    if [[ ! -d $BENCH_DIR/peer/node_modules/oidc-provider || ! -d $BENCH_DIR/peer/node_modules/jose ]]; then
        log "installing the peer's packages (npm ci in bench/peer)"
        (cd "$BENCH_DIR/peer" && timeout 300 npm ci --no-audit --no-fund >/dev/null) || die "npm ci in bench/peer failed"
    fi
fi

# --- the binary -----------------------------------------------------------------
if [[ -n ${AGENTIDP_BIN:-} ]]; then
    BIN=$AGENTIDP_BIN
    log "using $BIN (AGENTIDP_BIN); not building"
else
    log "building the release binary (cargo build --release --bin agentidp)"
    (cd "$ROOT" && SQLX_OFFLINE=true cargo build --release --bin agentidp) || die "cargo build --release failed"
    target=${CARGO_TARGET_DIR:-target}
    [[ $target == /* ]] || target="$ROOT/$target"
    BIN="$target/release/agentidp"
fi
[[ -x $BIN ]] || die "no executable at $BIN"
# The commit the code was at when the run started (the work tree may move on during the run).
START_REV="work tree at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || START_REV+=' with uncommitted changes under src/'

# --- a fresh database ------------------------------------------------------------
log "recreating database $DB_NAME"
psql_admin -c "drop database if exists $DB_NAME with (force)" || die "cannot drop database $DB_NAME"
psql_admin -c "create database $DB_NAME" || die "cannot create database $DB_NAME"
DB_CREATED=1
DB_URL="postgres://postgres@$PG_HOST:$PG_PORT/$DB_NAME"

PORT=$(free_port)
BASE="http://127.0.0.1:$PORT"

# The server's environment: everything from here, nothing inherited that could change it. An array
# rather than a function, so that `"${SERVER_ENV[@]}" ... &` leaves $! as the server's own pid
# (env execs the binary).
SERVER_ENV=(
    env -u RUST_LOG -u AGENTIDP_CONFIG
    AGENTIDP_SERVER__BIND="127.0.0.1:$PORT"
    AGENTIDP_SERVER__PUBLIC_URL="$BASE"
    AGENTIDP_SERVER__SHUTDOWN_GRACE_SECS=5
    AGENTIDP_DATABASE__URL="$DB_URL"
    AGENTIDP_DATABASE__MAX_CONNECTIONS="$DB_MAX_CONNECTIONS"
    AGENTIDP_DATABASE__CONNECT_RETRY_SECS=10
    AGENTIDP_REDIS__URL="redis://$REDIS_HOST:$REDIS_PORT"
    AGENTIDP_REDIS__KEY_PREFIX="$REDIS_PREFIX"
    AGENTIDP_REDIS__POOL_SIZE=32
    AGENTIDP_LOG__LEVEL=warn
    # Limits high enough never to refuse, but finite, so that every charged request goes through the
    # tier layer's limiter (leases far from the limits) and the metering layer: their cost is in
    # every figure.
    AGENTIDP_TIERS__PLANS__FREE__MAX_AGENTS=1000000
    AGENTIDP_TIERS__PLANS__FREE__API_CALLS_PER_DAY=1000000000000
    AGENTIDP_TIERS__PLANS__FREE__TOKENS_PER_DAY=1000000000000
    AGENTIDP_TIERS__PLANS__FREE__TOKENS_PER_MONTH=1000000000000
    AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__REQUESTS_PER_MINUTE=6000000
    AGENTIDP_TIERS__PLANS__FREE__RATE_LIMIT__BURST=1000000
)

start_server() { # start_server ALG
    local alg=$1 logfile="$OUT/agentidp-$1.log"
    log "starting agentidp ($alg) on $BASE, database $DB_NAME, Redis prefix $REDIS_PREFIX"
    "${SERVER_ENV[@]}" AGENTIDP_AUTH__SIGNING_ALGORITHM="$alg" "$BIN" serve >"$logfile" 2>&1 &
    SERVER_PID=$!
    wait_ready "$BASE/health" "$SERVER_PID" agentidp "$logfile"
}

stop_server() {
    stop_pid "$SERVER_PID" agentidp
    SERVER_PID=''
}

# --- agentidp, ES256 ----------------------------------------------------------------
start_server ES256
sleep 1
IDLE_RSS_OURS=$(rss_kb "$SERVER_PID")
log "agentidp idle RSS after start-up: $((IDLE_RSS_OURS / 1024)) MiB"

log "bootstrap, login, API key, agent, credential, access token"
printf '%s\n' "$PASSWORD" | "${SERVER_ENV[@]}" "$BIN" bootstrap --org Bench --email "$EMAIL" --password-stdin \
    >"$OUT/bootstrap.log" 2>&1 || { cat "$OUT/bootstrap.log" >&2; die "agentidp bootstrap failed"; }
LOGIN_BODY="{\"email\":\"$EMAIL\",\"password\":\"$PASSWORD\"}"
SESSION=$(api POST "$BASE/auth/login" -H 'Content-Type: application/json' --data-raw "$LOGIN_BODY" \
    | json_get session_token) || die "login gave no session_token"
API_KEY=$(api POST "$BASE/auth/api-keys" -H "Authorization: Bearer $SESSION" -H 'Content-Type: application/json' \
    --data-raw '{"description":"bench","scopes":["orgs:read"]}' | json_get key) || die "no API key"
ORG_ID=$(api GET "$BASE/auth/me" -H "Authorization: Bearer $SESSION" | json_get org_id) || die "no org_id in /auth/me"
AGENT_ID=$(api POST "$BASE/api/v1/agents" -H "Authorization: Bearer $SESSION" -H 'Content-Type: application/json' \
    --data-raw '{"name":"bench","allowed_scopes":["tools:read"]}' | json_get id) || die "no agent"
CRED=$(api POST "$BASE/api/v1/agents/$AGENT_ID/credentials" -H "Authorization: Bearer $SESSION") || die "no credential"
CLIENT_ID=$(json_get client_id <<<"$CRED") || die "credential without client_id"
CLIENT_SECRET=$(json_get client_secret <<<"$CRED") || die "credential without client_secret"
BASIC="Basic $(printf '%s:%s' "$CLIENT_ID" "$CLIENT_SECRET" | base64 -w0)"
TOKEN_FORM='grant_type=client_credentials&scope=tools:read'
get_access_token() {
    api POST "$BASE/api/v1/token" -H "Authorization: $BASIC" -H 'Content-Type: application/x-www-form-urlencoded' \
        --data-raw "$TOKEN_FORM" | json_get access_token
}
ACCESS_TOKEN=$(get_access_token) || die "no access token"
[[ $(jwt_alg "$ACCESS_TOKEN") == ES256 ]] || die "the access token is not ES256"

FORM=application/x-www-form-urlencoded
set_request GET
scenario agentidp health "$SERVER_PID" "$BASE/health"
set_request POST "$TOKEN_FORM" "$FORM" "$BASIC"
scenario agentidp token-es256 "$SERVER_PID" "$BASE/api/v1/token"
set_request GET '' '' "Bearer $ACCESS_TOKEN"
scenario agentidp authn-get "$SERVER_PID" "$BASE/auth/me"
set_request GET '' '' '' "X-API-Key: $API_KEY"
scenario agentidp apikey-get "$SERVER_PID" "$BASE/auth/me"
set_request POST "token=$ACCESS_TOKEN" "$FORM" "$BASIC"
scenario agentidp introspect "$SERVER_PID" "$BASE/api/v1/token/introspect"
# The introspection must say active, or the run measured the wrong thing.
api POST "$BASE/api/v1/token/introspect" -H "Authorization: $BASIC" -H "Content-Type: $FORM" \
    --data-raw "token=$ACCESS_TOKEN" | grep -q '"active":true' || die "introspection did not report the token active"

# What the tier and metering layers did under that load: every charged request ran the limiter's
# script (none decided locally), and analytics records were written, not dropped.
sleep 2 # one analytics flush interval
curl -s "$BASE/metrics" | grep -E '^(tier_|analytics_events_)' | sed 's/^/    /' >"$OUT/tier-metrics.txt" || true
note "tier and analytics counters after the scenarios above: $(tr -s ' ' <"$OUT/tier-metrics.txt" | tr '\n' ';')"

# ---- pdp-http -------------------------------------------------------------------
# POST /internal/pdp/evaluate, the policy decision point over HTTP, asked by the system admin's
# session (the route needs `administer` on the platform): may our agent execute a tool on its
# organization's allowlist? A permit, written to the decision log like every decision. Skipped
# with a note where the route does not exist (404). BENCH_PDP_BODY replaces the request.
if [[ -z $PDP_BODY ]]; then
    PDP_BODY=$(printf '{"actor":{"actor_id":"agent:%s","actor_type":"agent","org_ids":["%s"],"roles":["agent"],"scopes":["tools:read"]},"action":"execute","resource":{"type":"tool","id":"search","attributes":{"org_id":"%s","allowed_agents":["agent:%s"]}},"context":{"required_scope":"tools:read"}}' \
        "$AGENT_ID" "$ORG_ID" "$ORG_ID" "$AGENT_ID")
fi
set_request POST "$PDP_BODY" application/json "Bearer $SESSION"
pdp_code=$(probe "$BASE/internal/pdp/evaluate")
if [[ $pdp_code == 404 ]]; then
    note "pdp-http skipped: POST /internal/pdp/evaluate answers 404 (this build has no PDP)"
elif [[ $pdp_code == 2?? ]]; then
    scenario agentidp pdp-http "$SERVER_PID" "$BASE/internal/pdp/evaluate"
    api POST "$BASE/internal/pdp/evaluate" -H "Authorization: Bearer $SESSION" -H 'Content-Type: application/json' \
        --data-raw "$PDP_BODY" >"$OUT/pdp-decision.json"
    note "pdp-http decision for the bench request: $(head -c 300 "$OUT/pdp-decision.json")"
else
    die "pdp-http: POST /internal/pdp/evaluate answers $pdp_code to the bench request (see BENCH_PDP_BODY)"
fi

set_request POST "$LOGIN_BODY" application/json
scenario agentidp login "$SERVER_PID" "$BASE/auth/login" "$LOGIN_CONNECTIONS" "$LOGIN_DURATION"

# --- agentidp, RS256: a restart rotates to an RS256 key -------------------------------
stop_server
start_server RS256
ACCESS_TOKEN=$(get_access_token) || die "no access token after the RS256 restart"
[[ $(jwt_alg "$ACCESS_TOKEN") == RS256 ]] || die "after restarting with RS256 the token is $(jwt_alg "$ACCESS_TOKEN")"
set_request POST "$TOKEN_FORM" "$FORM" "$BASIC"
scenario agentidp token-rs256 "$SERVER_PID" "$BASE/api/v1/token"
stop_server

# --- pdp-inproc: the PDP in-process, without HTTP ------------------------------------
# A Rust bench (benches/pdp.rs, `cargo bench --bench pdp`) where the project has one. Its own output
# goes into the summary as it is; a failure here is noted, not fatal. Runs while no server is up.
rm -f "$OUT/pdp-inproc.txt"
if [[ $PDP_INPROC != 1 ]]; then
    note "pdp-inproc skipped: BENCH_PDP_INPROC=$PDP_INPROC"
elif [[ ! -f $ROOT/benches/pdp.rs ]] || ! grep -q '^name = "pdp"' "$ROOT/Cargo.toml"; then
    note "pdp-inproc skipped: no benches/pdp.rs bench declared in Cargo.toml"
else
    log "pdp-inproc: cargo bench --bench pdp"
    if (cd "$ROOT" && SQLX_OFFLINE=true timeout 900 cargo bench --bench pdp) >"$OUT/pdp-inproc.txt" 2>"$OUT/pdp-inproc.log"; then
        note "pdp-inproc: the output of cargo bench --bench pdp is below the table"
    else
        note "pdp-inproc failed: cargo bench --bench pdp exited non-zero (see $OUT/pdp-inproc.log)"
        rm -f "$OUT/pdp-inproc.txt"
    fi
fi

# --- webhooks: outbox to a local receiver -------------------------------------------
# benches/webhooks.rs: deliveries per second draining a backlog, commit-to-receipt latency at a
# steady 1,000 events/s, and what events::emit adds to a transaction. In-process, on its own
# database; its output goes below the table like pdp-inproc's. A failure is noted, not fatal.
rm -f "$OUT/webhooks.txt"
if [[ ${BENCH_WEBHOOKS:-1} != 1 ]]; then
    note "webhooks skipped: BENCH_WEBHOOKS=${BENCH_WEBHOOKS}"
else
    log "webhooks: cargo bench --bench webhooks"
    if (cd "$ROOT" && SQLX_OFFLINE=true timeout 900 cargo bench --bench webhooks) >"$OUT/webhooks.txt" 2>"$OUT/webhooks.log"; then
        note "webhooks: the output of cargo bench --bench webhooks is below the table"
    else
        note "webhooks failed: cargo bench --bench webhooks exited non-zero (see $OUT/webhooks.log)"
        rm -f "$OUT/webhooks.txt"
    fi
fi

# --- delegation: the broker beside the original one --------------------------------
# benches/delegation.rs: POST /api/v1/delegations (ephemeral agents, durable Postgres), GET, the
# command check and token exchange, then the original broker (../shared/peers/seed-broker/,
# started with its own start.sh) under the same load generator: req/s, p50, p99, ratio. The peer
# is skipped with a note when its folder is missing. In-process, on its own database; its output
# goes below the table like pdp-inproc's. A failure is noted, not fatal.
rm -f "$OUT/delegation.txt"
if [[ ${BENCH_DELEGATION:-1} != 1 ]]; then
    note "delegation skipped: BENCH_DELEGATION=${BENCH_DELEGATION}"
else
    [[ -d $ROOT/../shared/peers/seed-broker ]] || note "delegation: ../shared/peers/seed-broker/ is missing; its side is skipped"
    log "delegation: cargo bench --bench delegation"
    if (cd "$ROOT" && SQLX_OFFLINE=true timeout 900 cargo bench --bench delegation) >"$OUT/delegation.txt" 2>"$OUT/delegation.log"; then
        note "delegation: the output of cargo bench --bench delegation is below the table"
    else
        note "delegation failed: cargo bench --bench delegation exited non-zero (see $OUT/delegation.log)"
        rm -f "$OUT/delegation.txt"
    fi
fi

# --- usage: NATS and HTTP ingest, summary and entitlements ------------------------------
# benches/usage.rs: a NATS backlog drained to durable rows with rollups (events/s), the lag from
# publish to queryable at a steady 10,000 events/s, HTTP batch ingest, the summary over one
# org-month of 10 million events, the entitlement check. In-process, on its own database and NATS
# stream; its output goes below the table like webhooks'. A failure is noted, not fatal.
rm -f "$OUT/usage.txt"
if [[ ${BENCH_USAGE:-1} != 1 ]]; then
    note "usage skipped: BENCH_USAGE=${BENCH_USAGE}"
else
    log "usage: cargo bench --bench usage"
    if (cd "$ROOT" && SQLX_OFFLINE=true timeout 900 cargo bench --bench usage) >"$OUT/usage.txt" 2>"$OUT/usage.log"; then
        note "usage: the output of cargo bench --bench usage is below the table"
    else
        note "usage failed: cargo bench --bench usage exited non-zero (see $OUT/usage.log)"
        rm -f "$OUT/usage.txt"
    fi
fi

# --- city: presence, the map, SSE fan-out ------------------------------------------
# benches/city.rs: presence heartbeats per second, GET /api/v1/city/map at 50 rooms x 1,000
# agents, and 1,000 SSE viewers at 100 changes/s (latency, server RSS), against the release
# binary as its own process on its own database. Its output goes below the table. A failure is
# noted, not fatal. BENCH_CITY=0 skips it; run it alone with `cargo bench --bench city`.
rm -f "$OUT/city.txt"
if [[ ${BENCH_CITY:-1} != 1 ]]; then
    note "city skipped: BENCH_CITY=${BENCH_CITY}"
else
    log "city: cargo bench --bench city"
    if (cd "$ROOT" && SQLX_OFFLINE=true timeout 1200 cargo bench --bench city) >"$OUT/city.txt" 2>"$OUT/city.log"; then
        note "city: the output of cargo bench --bench city is below the table"
    else
        note "city failed: cargo bench --bench city exited non-zero (see $OUT/city.log)"
        rm -f "$OUT/city.txt"
    fi
fi

# --- the peer: oidc-provider ------------------------------------------------------
IDLE_RSS_PEER=0
if [[ $RUN_PEER == 1 ]]; then
    PEER_PORT=$(free_port)
    PEER="http://127.0.0.1:$PEER_PORT"
    PEER_BASIC="Basic $(printf '%s:%s' "$PEER_CLIENT_ID" "$PEER_CLIENT_SECRET" | base64 -w0)"
    start_peer() { # start_peer ALG
        local logfile="$OUT/peer-$1.log"
        log "starting oidc-provider ($1) on $PEER"
        (cd "$BENCH_DIR/peer" && exec env NODE_ENV=production PEER_PORT="$PEER_PORT" PEER_ALG="$1" \
            PEER_CLIENT_ID="$PEER_CLIENT_ID" PEER_CLIENT_SECRET="$PEER_CLIENT_SECRET" node server.mjs) \
            >"$logfile" 2>&1 &
        PEER_PID=$!
        wait_ready "$PEER/health" "$PEER_PID" oidc-provider "$logfile"
    }
    peer_token() { # peer_token [FORM]
        api POST "$PEER/token" -H "Authorization: $PEER_BASIC" -H "Content-Type: $FORM" \
            --data-raw "${1:-$TOKEN_FORM}" | json_get access_token
    }

    start_peer ES256
    sleep 1
    IDLE_RSS_PEER=$(rss_kb "$PEER_PID")
    log "oidc-provider idle RSS after start-up: $((IDLE_RSS_PEER / 1024)) MiB"
    PEER_AT=$(peer_token) || die "the peer issued no token"
    [[ $(jwt_alg "$PEER_AT") == ES256 ]] || die "the peer's token is not an ES256 JWT"
    set_request POST "$TOKEN_FORM" "$FORM" "$PEER_BASIC"
    scenario peer token-es256 "$PEER_PID" "$PEER/token"
    # oidc-provider does not keep JWT access tokens, so it cannot introspect them
    # ("unsupported_token_type"): introspect one of its opaque tokens instead.
    PEER_OPAQUE=$(peer_token "$TOKEN_FORM&resource=urn:bench:opaque") || die "the peer issued no opaque token"
    set_request POST "token=$PEER_OPAQUE" "$FORM" "$PEER_BASIC"
    scenario peer introspect "$PEER_PID" "$PEER/token/introspection"
    api POST "$PEER/token/introspection" -H "Authorization: $PEER_BASIC" -H "Content-Type: $FORM" \
        --data-raw "token=$PEER_OPAQUE" | grep -q '"active":true' || die "the peer did not report its token active"
    note "peer introspect: oidc-provider cannot introspect its JWT access tokens, so it introspects an opaque token (a lookup in its in-memory store); agentidp introspects its JWT, the same token on every call, so after the first call its signature check is a hit in the verified-token cache (times, issuer, audience and revocation are checked on every call)"
    stop_pid "$PEER_PID" oidc-provider
    PEER_PID=''

    start_peer RS256
    PEER_AT=$(peer_token) || die "the peer issued no token"
    [[ $(jwt_alg "$PEER_AT") == RS256 ]] || die "the peer's token is not an RS256 JWT"
    set_request POST "$TOKEN_FORM" "$FORM" "$PEER_BASIC"
    scenario peer token-rs256 "$PEER_PID" "$PEER/token"
    stop_pid "$PEER_PID" oidc-provider
    PEER_PID=''
fi

# --- the table --------------------------------------------------------------------
OIDC_VERSION=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["version"])' \
    "$BENCH_DIR/peer/node_modules/oidc-provider/package.json" 2>/dev/null || echo '?')
export BENCH_META_DATE BENCH_META_CPU BENCH_META_NPROC BENCH_META_REV BENCH_META_WRK BENCH_META_NODE BENCH_META_OIDC
BENCH_META_DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
BENCH_META_CPU=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
BENCH_META_NPROC=$(nproc)
BENCH_META_REV=$START_REV
if [[ -n ${AGENTIDP_BIN:-} ]]; then
    BENCH_META_REV="binary $AGENTIDP_BIN (AGENTIDP_BIN, not built by this run); $BENCH_META_REV"
fi
BENCH_META_WRK="wrk -t$THREADS -c$CONNECTIONS -d$DURATION --timeout $WRK_TIMEOUT (login: -c$LOGIN_CONNECTIONS -d$LOGIN_DURATION), warm-up $WARMUP"
BENCH_META_NODE=$(node --version 2>/dev/null || echo '?')
BENCH_META_OIDC=$OIDC_VERSION
python3 "$BENCH_DIR/table.py" "$RESULTS" "$NOTES" "$IDLE_RSS_OURS" "$IDLE_RSS_PEER" "$OUT/pdp-inproc.txt" >"$OUT/summary.md" \
    || die "could not write the summary table"
if [[ -f $OUT/webhooks.txt ]]; then
    { echo; echo 'webhooks, the output of `cargo bench --bench webhooks`:'; echo; echo '```'; cat "$OUT/webhooks.txt"; echo '```'; } \
        >>"$OUT/summary.md"
fi
if [[ -f $OUT/delegation.txt ]]; then
    { echo; echo 'delegation, the output of `cargo bench --bench delegation`:'; echo; echo '```'; cat "$OUT/delegation.txt"; echo '```'; } \
        >>"$OUT/summary.md"
fi
if [[ -f $OUT/usage.txt ]]; then
    { echo; echo 'usage, the output of `cargo bench --bench usage`:'; echo; echo '```'; cat "$OUT/usage.txt"; echo '```'; } \
        >>"$OUT/summary.md"
fi
if [[ -f $OUT/city.txt ]]; then
    { echo; echo 'city, the output of `cargo bench --bench city`:'; echo; echo '```'; cat "$OUT/city.txt"; echo '```'; } \
        >>"$OUT/summary.md"
fi
echo
cat "$OUT/summary.md"
echo
log "done: raw wrk output and logs in $OUT, the table in $OUT/summary.md"
