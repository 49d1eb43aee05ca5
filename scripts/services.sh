#!/usr/bin/env bash
# Ensure a local PostgreSQL (127.0.0.1:5432, role postgres, no password),
# Redis (127.0.0.1:6379) and NATS with JetStream (127.0.0.1:4222) are installed
# and running on Debian. Idempotent.
set -euo pipefail

PG_PORT=5432
REDIS_PORT=6379
NATS_PORT=4222
DB_NAME="${AGENTIDP_DB_NAME:-agentidp}"

log() { printf 'services: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "must run as root (sudo not available)"
    # `env` as the command keeps AGENTIDP_DB_NAME whatever sudo's env policy is.
    exec sudo env AGENTIDP_DB_NAME="$DB_NAME" bash "$(readlink -f "${BASH_SOURCE[0]}")" "$@"
fi
# runuser -u postgres would otherwise start in a directory it cannot read.
cd /

# --- packages -------------------------------------------------------------
apt_updated=0
apt_install() {
    if [[ $apt_updated -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq || die "apt-get update failed"
        apt_updated=1
    fi
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null \
        || die "apt-get install $* failed"
}

if ! command -v pg_ctlcluster >/dev/null || ! command -v psql >/dev/null \
    || ! compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; then
    apt_install postgresql
fi
if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    apt_install redis-server
fi
nats_up() { timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$NATS_PORT" 2>/dev/null; }
if ! nats_up && ! command -v nats-server >/dev/null; then
    apt_install nats-server
fi

# --- postgres cluster -----------------------------------------------------
find_cluster() {
    # Prefer the cluster on our port; otherwise the first one listed.
    pg_lsclusters -h | awk -v p="$PG_PORT" '$3 == p { print; found = 1; exit }
        NR == 1 { first = $0 } END { if (!found && first != "") print first }'
}

cluster=$(find_cluster)
if [[ -z $cluster ]]; then
    ver=$(compgen -G '/usr/lib/postgresql/*/bin/postgres' | cut -d/ -f4 | sort -V | tail -n1)
    log "creating postgres cluster $ver/main on port $PG_PORT"
    pg_createcluster --port "$PG_PORT" "$ver" main >/dev/null || die "pg_createcluster $ver main failed"
    cluster=$(find_cluster)
fi
read -r ver name port status _ <<<"$cluster"
[[ $port == "$PG_PORT" ]] || die "postgres cluster $ver/$name listens on port $port, expected $PG_PORT"

if [[ $status != online* ]]; then
    log "starting postgres cluster $ver/$name"
    # The redirect to systemctl fails where systemd is not PID 1 (containers).
    pg_ctlcluster --skip-systemctl-redirect "$ver" "$name" start || die "could not start postgres $ver/$name"
fi

for ((i = 0; ; i++)); do
    pg_isready -q -h 127.0.0.1 -p "$PG_PORT" && break
    ((i < 30)) || die "postgres not ready on 127.0.0.1:$PG_PORT after 30s"
    sleep 1
done

# --- passwordless TCP access as postgres -----------------------------------
pg_tcp() {
    # No stored password may mask a missing trust rule.
    env -u PGPASSWORD PGPASSFILE=/nonexistent/agentidp-no-pgpass PGCONNECT_TIMEOUT=3 \
        psql -X -w -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1 -Atq "$@"
}
pg_local() { runuser -u postgres -- psql -X -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -Atq "$@"; }

if ! pg_tcp -d postgres -c 'select 1' >/dev/null 2>&1; then
    hba=$(pg_local -c 'show hba_file') || die "cannot query postgres via unix socket as OS user postgres"
    [[ -f $hba ]] || die "pg_hba.conf not found at '$hba'"
    if ! grep -Eq '^host[[:space:]]+all[[:space:]]+all[[:space:]]+127\.0\.0\.1/32[[:space:]]+trust' "$hba"; then
        log "note: adding 127.0.0.1/::1 trust rules to top of $hba (dev only)"
        # First match wins in pg_hba, so the rules must precede Debian's scram lines.
        tmp="$hba.agentidp.tmp"
        {
            echo '# added by agentidp scripts/services.sh: passwordless local TCP for development'
            echo 'host all all 127.0.0.1/32 trust'
            echo 'host all all ::1/128 trust'
            cat "$hba"
        } >"$tmp"
        chown --reference="$hba" "$tmp"
        chmod --reference="$hba" "$tmp"
        mv "$tmp" "$hba"
    fi
    pg_local -c 'select pg_reload_conf()' >/dev/null || die "pg_reload_conf failed"
    # The reload is asynchronous; give the postmaster a moment.
    for ((i = 0; ; i++)); do
        pg_tcp -d postgres -c 'select 1' >/dev/null 2>&1 && break
        ((i < 10)) || die "still cannot connect as postgres to 127.0.0.1:$PG_PORT without a password; check $hba"
        sleep 0.5
    done
fi

# psql -c does no variable interpolation, so feed the query on stdin.
exists=$(pg_tcp -d postgres -v db="$DB_NAME" <<<"select 1 from pg_database where datname = :'db'") \
    || die "cannot query pg_database"
if [[ $exists != 1 ]]; then
    log "creating database $DB_NAME"
    pg_tcp -d postgres -v db="$DB_NAME" <<<'create database :"db"' || die "could not create database $DB_NAME"
fi
log "postgres ok (127.0.0.1:$PG_PORT, database $DB_NAME)"

# --- redis ------------------------------------------------------------------
redis_up() { [[ $(timeout 3 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

if ! redis_up; then
    log "starting redis on 127.0.0.1:$REDIS_PORT"
    redis_log=/tmp/agentidp-redis.log
    mkdir -p /tmp "$(dirname "$redis_log")"
    # "-::1": bind IPv6 loopback only if available. No persistence: dev/test data only.
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
        --save "" --appendonly no --dir /tmp --logfile "$redis_log" \
        || die "redis-server failed to start; see $redis_log"
    for ((i = 0; ; i++)); do
        redis_up && break
        ((i < 20)) || { tail -n 5 "$redis_log" >&2 || true; die "redis not answering PONG on 127.0.0.1:$REDIS_PORT after 10s"; }
        sleep 0.5
    done
fi
log "redis ok (127.0.0.1:$REDIS_PORT)"

# --- nats (JetStream) ---------------------------------------------------------
if ! nats_up; then
    log "starting nats-server with JetStream on 127.0.0.1:$NATS_PORT"
    nats_dir=/var/lib/agentidp-nats
    nats_log=/tmp/agentidp-nats.log
    mkdir -p "$nats_dir"
    # No --daemon in nats-server: detach it ourselves. Test data only.
    setsid nohup nats-server -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$nats_dir" -l "$nats_log" \
        </dev/null >/dev/null 2>&1 &
    for ((i = 0; ; i++)); do
        nats_up && break
        ((i < 20)) || { tail -n 5 "$nats_log" >&2 || true; die "nats-server not listening on 127.0.0.1:$NATS_PORT after 10s"; }
        sleep 0.5
    done
fi
log "nats ok (127.0.0.1:$NATS_PORT)"
