//! Presence: what each agent last reported, in Redis with a time to live, never in Postgres (but
//! for a coarse `last_seen`). One script writes a report, schedules its lapse and, when the status
//! or activity changed, records the change in the feed. A sweeper on every instance turns lapsed
//! presences into `offline` changes; the script that removes one from the schedule is the only one
//! that announces it, so it is announced once however many instances sweep.
//!
//! Repeats are folded: a report with the status and activity this instance wrote for the agent
//! less than the fold window ago (`city.presence_fold_ms`, at most a quarter of the TTL) is
//! answered without Redis. Every write sets the TTL to `presence_ttl_secs` plus the window, so a
//! folded report's lifetime is still covered: an agent lapses between the TTL and the TTL plus
//! the window after its last report. Folding holds only while this instance's change subscriber
//! is connected, and any presence change of the agent that arrives on the feed (made through any
//! instance, a lapse or a removal included) ends it, so a change made elsewhere is never hidden
//! by a fold here.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::Script;
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;

use super::feed::{self, StreamId};
use crate::{cache::Cache, redis::Redis, state::AppState};

/// What an agent says it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Online,
    Busy,
    Idle,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Busy => "busy",
            Self::Idle => "idle",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "online" => Some(Self::Online),
            "busy" => Some(Self::Busy),
            "idle" => Some(Self::Idle),
            _ => None,
        }
    }
}

/// An agent's live presence.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Presence {
    pub status: Status,
    pub activity: Option<String>,
    /// When it was last reported.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Writes a report; emits `presence` when the status or activity changed. Also says whether
/// `last_seen` is due in Postgres (at most every `last_seen_every_secs` per agent, whichever
/// instance the report reaches), so that a report is one round trip.
const REPORT: &str = r#"
local old = redis.call('HMGET', KEYS[1], 's', 'a')
redis.call('HSET', KEYS[1], 's', ARGV[6], 'a', ARGV[7], 't', ARGV[8])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
local seen = 0
if redis.call('SET', KEYS[5], '1', 'NX', 'EX', ARGV[10]) then seen = 1 end
if old[1] == ARGV[6] and old[2] == ARGV[7] then return {'', seen} end
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'k', 'presence', 'd', ARGV[9])
redis.call('PUBLISH', KEYS[4], ARGV[5] .. ' ' .. id .. ' presence ' .. ARGV[9])
return {id, seen}
"#;

/// Removes one lapsed presence from the schedule and emits its `offline`; does nothing when it was
/// renewed meanwhile (it is rescheduled by its remaining lifetime).
const LAPSE: &str = r#"
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then
  redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + ttl, ARGV[1])
  return false
end
redis.call('ZREM', KEYS[2], ARGV[1])
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'k', 'presence', 'd', ARGV[5])
redis.call('PUBLISH', KEYS[4], ARGV[4] .. ' ' .. id .. ' presence ' .. ARGV[5])
return id
"#;

/// Removes a presence at once (a suspended or deleted agent) and emits its `offline`.
const FORGET: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local id = redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[2], '*', 'k', 'presence', 'd', ARGV[4])
redis.call('PUBLISH', KEYS[4], ARGV[3] .. ' ' .. id .. ' presence ' .. ARGV[4])
return id
"#;

/// Shards of the change counters that end folds (an agent's shard is a hash of its id).
const FOLD_SHARDS: usize = 256;

/// What this instance last wrote for an agent.
struct Written {
    org_id: Uuid,
    status: Status,
    activity: Option<Box<str>>,
    /// When, on the state's clock (ms).
    at_ms: i64,
    /// The agent's shard counter before the write; a change seen since ends the fold.
    epoch: u64,
}

/// The scripts, the per-agent report limiter and the folding of repeated reports.
pub struct Presences {
    report: Script,
    lapse: Script,
    forget: Script,
    /// Reports per agent in the current one-second window (per instance).
    windows: Cache<Uuid, Arc<AtomicU32>>,
    /// The fold window (ms); 0 = every report is written.
    fold_ms: i64,
    /// The latest write of each agent by this instance, kept for the fold window.
    written: Cache<Uuid, Arc<Written>>,
    /// Presence changes seen on the feed, per shard of agents.
    epochs: Box<[AtomicU64]>,
    hasher: std::collections::hash_map::RandomState,
    /// Whether the change subscriber is connected (no fold otherwise).
    live: AtomicBool,
}

impl Presences {
    pub fn new(cfg: &crate::config::CityConfig) -> Self {
        let fold_ms = cfg.presence_fold_ms.min(cfg.presence_ttl_secs.saturating_mul(250)) as i64;
        Self {
            report: Script::new(REPORT),
            lapse: Script::new(LAPSE),
            forget: Script::new(FORGET),
            windows: Cache::new(1_000_000, Duration::from_secs(1)),
            fold_ms,
            written: Cache::new(1_000_000, Duration::from_millis(fold_ms.max(0) as u64)),
            epochs: (0..FOLD_SHARDS).map(|_| AtomicU64::new(0)).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            live: AtomicBool::new(false),
        }
    }

    /// Counts a report of `agent_id`; false when it is over `per_sec` in this second.
    pub fn admit(&self, agent_id: Uuid, per_sec: u32) -> bool {
        let n = self.windows.get_or_insert_with(agent_id, || Arc::new(AtomicU32::new(0)));
        n.fetch_add(1, Ordering::Relaxed) < per_sec
    }

    fn epoch(&self, agent_id: Uuid) -> &AtomicU64 {
        &self.epochs[self.hasher.hash_one(agent_id) as usize % FOLD_SHARDS]
    }

    /// A presence change of `agent_id` arrived on the feed: its fold, if any, ends.
    pub(super) fn changed(&self, agent_id: Uuid) {
        self.epoch(agent_id).fetch_add(1, Ordering::SeqCst);
    }

    /// The change subscriber (re)connected or lost its connection: changes may have been missed,
    /// so every fold ends, and folding holds only while it is connected.
    pub(super) fn set_live(&self, live: bool) {
        if !live {
            self.live.store(false, Ordering::SeqCst);
        }
        for e in self.epochs.iter() {
            e.fetch_add(1, Ordering::SeqCst);
        }
        if live {
            self.live.store(true, Ordering::SeqCst);
        }
    }

    /// Whether a report repeats what this instance wrote within the fold window, with no change of
    /// the agent seen since.
    fn folds(&self, org_id: Uuid, agent_id: Uuid, status: Status, activity: Option<&str>, now_ms: i64) -> bool {
        if self.fold_ms <= 0 || !self.live.load(Ordering::SeqCst) {
            return false;
        }
        let Some(w) = self.written.get(&agent_id) else { return false };
        w.org_id == org_id
            && w.status == status
            && w.activity.as_deref() == activity
            && (0..self.fold_ms).contains(&(now_ms - w.at_ms))
            && self.epoch(agent_id).load(Ordering::SeqCst) == w.epoch
    }

    fn forget_written(&self, agent_id: Uuid) {
        self.written.remove(&agent_id);
        self.changed(agent_id);
    }
}

fn presence_key(redis: &Redis, org_id: Uuid, agent_id: Uuid) -> String {
    redis.key(&format!("city:p:{org_id}:{agent_id}"))
}

fn schedule_key(redis: &Redis) -> String {
    redis.key("city:lapse")
}

fn now_ms(state: &AppState) -> i64 {
    (state.clock().now().unix_timestamp_nanos() / 1_000_000) as i64
}

/// What a report did: the id of the change it made, if it made one, and whether `last_seen` is
/// due in Postgres.
#[derive(Debug)]
pub struct Outcome {
    pub change: Option<StreamId>,
    pub last_seen_due: bool,
}

/// Records a report (or folds it: see the module's note).
pub async fn report(
    state: &AppState,
    org_id: Uuid,
    agent_id: Uuid,
    status: Status,
    activity: Option<&str>,
) -> anyhow::Result<Outcome> {
    let presences = &state.city().presences;
    let now = now_ms(state);
    if presences.folds(org_id, agent_id, status, activity, now) {
        return Ok(Outcome { change: None, last_seen_due: false });
    }
    // Read before the write: a change the feed brings from here on ends the fold this write opens.
    let epoch = presences.epoch(agent_id).load(Ordering::SeqCst);
    let redis = state.redis();
    let cfg = &state.config().city;
    let ttl_ms = cfg.presence_ttl_secs * 1000 + presences.fold_ms.max(0) as u64;
    let at = state.clock().now();
    let data = json!({
        "agent_id": agent_id,
        "status": status.as_str(),
        "activity": activity,
        "at": crate::events::rfc3339(at),
    });
    let mut conn = redis.multiplexed().await?;
    let mut inv = presences.report.key(presence_key(redis, org_id, agent_id));
    inv.key(schedule_key(redis))
        .key(feed::log_key(redis, org_id))
        .key(feed::channel(redis))
        .key(redis.key(&format!("city:seen:{agent_id}")))
        .arg(ttl_ms)
        .arg(now + ttl_ms as i64)
        .arg(format!("{org_id}:{agent_id}"))
        .arg(cfg.replay_window)
        .arg(org_id.to_string())
        .arg(status.as_str())
        .arg(activity.unwrap_or(""))
        .arg(now)
        .arg(data.to_string())
        .arg(cfg.last_seen_every_secs.max(1));
    let (id, seen): (String, i64) = match tokio::time::timeout(redis.timeout(), inv.invoke_async(&mut conn)).await {
        Ok(Ok(id)) => id,
        Ok(Err(e)) => {
            redis.drop_multiplexed();
            return Err(e.into());
        }
        Err(e) => {
            redis.drop_multiplexed();
            return Err(e.into());
        }
    };
    if presences.fold_ms > 0 {
        presences.written.insert(
            agent_id,
            Arc::new(Written { org_id, status, activity: activity.map(Box::from), at_ms: now, epoch }),
        );
    }
    Ok(Outcome { change: StreamId::parse(&id), last_seen_due: seen == 1 })
}

/// Every live presence among `agents` of `org_id`, in one round trip.
pub async fn read(state: &AppState, org_id: Uuid, agents: &[Uuid]) -> anyhow::Result<HashMap<Uuid, Presence>> {
    let mut out = HashMap::new();
    if agents.is_empty() {
        return Ok(out);
    }
    let redis = state.redis();
    let mut conn = redis.multiplexed().await?;
    let mut pipe = redis::pipe();
    for a in agents {
        pipe.cmd("HMGET").arg(presence_key(redis, org_id, *a)).arg("s").arg("a").arg("t");
    }
    let rows: Vec<(Option<String>, Option<String>, Option<i64>)> =
        match tokio::time::timeout(redis.timeout(), pipe.query_async(&mut conn)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                redis.drop_multiplexed();
                return Err(e.into());
            }
            Err(e) => {
                redis.drop_multiplexed();
                return Err(e.into());
            }
        };
    for (agent, (s, a, t)) in agents.iter().zip(rows) {
        let (Some(status), Some(t)) = (s.as_deref().and_then(Status::parse), t) else { continue };
        let at = OffsetDateTime::from_unix_timestamp_nanos(t as i128 * 1_000_000).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        out.insert(*agent, Presence { status, activity: a.filter(|a| !a.is_empty()), at });
    }
    Ok(out)
}

/// Removes an agent's presence at once and tells every viewer it is gone (`reason`: `suspended`,
/// `deleted`). Redis being away is logged: the map reads only active agents from Postgres, so a
/// suspended or deleted agent is not shown whatever Redis still holds.
pub async fn forget(state: &AppState, org_id: Uuid, agent_id: Uuid, reason: &str) {
    state.city().presences.forget_written(agent_id);
    let redis = state.redis();
    let data = json!({
        "agent_id": agent_id,
        "status": "offline",
        "reason": reason,
        "at": crate::events::rfc3339(state.clock().now()),
    });
    let run = async {
        let mut conn = redis.multiplexed().await?;
        let mut inv = state.city().presences.forget.key(presence_key(redis, org_id, agent_id));
        inv.key(schedule_key(redis))
            .key(feed::log_key(redis, org_id))
            .key(feed::channel(redis))
            .arg(format!("{org_id}:{agent_id}"))
            .arg(state.config().city.replay_window)
            .arg(org_id.to_string())
            .arg(data.to_string());
        let _: Option<String> = tokio::time::timeout(redis.timeout(), inv.invoke_async(&mut conn)).await??;
        anyhow::Ok(())
    };
    if let Err(e) = run.await {
        redis.drop_multiplexed();
        tracing::warn!(error = %e, %agent_id, "could not remove an agent's presence");
    }
}

/// Announces the presences that lapsed (at most `limit` per call); returns how many it announced.
pub async fn sweep(state: &AppState, limit: usize) -> anyhow::Result<usize> {
    let redis = state.redis();
    let now = now_ms(state);
    let mut conn = redis.multiplexed().await?;
    let due: Vec<String> = tokio::time::timeout(
        redis.timeout(),
        redis::cmd("ZRANGEBYSCORE")
            .arg(schedule_key(redis))
            .arg("-inf")
            .arg(now)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn),
    )
    .await??;
    let mut announced = 0;
    for member in due {
        let Some((org, agent)) = member.split_once(':') else { continue };
        let (Ok(org_id), Ok(agent_id)) = (org.parse::<Uuid>(), agent.parse::<Uuid>()) else {
            let _: i64 = redis::cmd("ZREM").arg(schedule_key(redis)).arg(&member).query_async(&mut conn).await?;
            continue;
        };
        let data = json!({
            "agent_id": agent_id,
            "status": "offline",
            "reason": "lapsed",
            "at": crate::events::rfc3339(state.clock().now()),
        });
        let mut inv = state.city().presences.lapse.key(presence_key(redis, org_id, agent_id));
        inv.key(schedule_key(redis))
            .key(feed::log_key(redis, org_id))
            .key(feed::channel(redis))
            .arg(&member)
            .arg(now)
            .arg(state.config().city.replay_window)
            .arg(org_id.to_string())
            .arg(data.to_string());
        let id: Option<String> = tokio::time::timeout(redis.timeout(), inv.invoke_async(&mut conn)).await??;
        announced += usize::from(id.is_some());
    }
    Ok(announced)
}
