//! The city's change feed: every change (presence, a move, a node's status) is appended to the
//! organization's bounded replay log in Redis (a stream, so each change has an ordered id) and
//! published on one pub/sub channel in the same script, so a change is never live without being
//! replayable. One subscriber per instance hands live changes to that instance's viewers through
//! a broadcast channel per organization; a viewer that falls behind, or an instance whose
//! subscriber reconnected, catches up from the log.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::StreamExt;
use redis::Script;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::{redis::Redis, state::AppState};

/// A replay-log id (`<ms>-<seq>`), ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StreamId(pub u64, pub u64);

impl StreamId {
    /// Parses `<ms>-<seq>` (a `Last-Event-ID`); anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        let (ms, seq) = s.trim().split_once('-')?;
        if ms.is_empty() || seq.is_empty() || ms.len() > 20 || seq.len() > 20 {
            return None;
        }
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One change, as viewers receive it.
#[derive(Debug)]
pub struct Change {
    pub id: StreamId,
    /// The SSE event name: `presence`, `moved` or `node`.
    pub kind: String,
    /// The change as JSON.
    pub data: String,
    /// Not a change: live changes may have been lost (the subscriber reconnected); read the log.
    pub catch_up: bool,
}

/// Appends a change to the log and publishes it, atomically.
pub(super) const EMIT: &str = r#"
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'k', ARGV[3], 'd', ARGV[4])
redis.call('PUBLISH', KEYS[2], ARGV[2] .. ' ' .. id .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
return id
"#;

/// The key of an organization's replay log.
pub(super) fn log_key(redis: &Redis, org_id: Uuid) -> String {
    redis.key(&format!("city:log:{org_id}"))
}

/// The channel every instance's subscriber listens on.
pub(super) fn channel(redis: &Redis) -> String {
    redis.key("city:live")
}

/// Live changes of this instance's viewers, one broadcast channel per organization with viewers.
pub struct Hub {
    orgs: Mutex<HashMap<Uuid, broadcast::Sender<Arc<Change>>>>,
    capacity: usize,
    emit: Script,
}

impl Hub {
    pub fn new(capacity: usize) -> Self {
        Self { orgs: Mutex::new(HashMap::new()), capacity: capacity.max(1), emit: Script::new(EMIT) }
    }

    /// A receiver of the organization's live changes, from now on.
    pub fn subscribe(&self, org_id: Uuid) -> broadcast::Receiver<Arc<Change>> {
        let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        orgs.entry(org_id).or_insert_with(|| broadcast::channel(self.capacity).0).subscribe()
    }

    fn deliver(&self, org_id: Uuid, change: Change) {
        let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = orgs.get(&org_id) {
            if tx.receiver_count() == 0 {
                orgs.remove(&org_id);
            } else {
                let _ = tx.send(Arc::new(change));
            }
        }
    }

    /// Tells every viewer of this instance to catch up from the log.
    fn catch_up_all(&self) {
        let mut orgs = self.orgs.lock().unwrap_or_else(|e| e.into_inner());
        orgs.retain(|_, tx| tx.receiver_count() > 0);
        for tx in orgs.values() {
            let _ = tx.send(Arc::new(Change {
                id: StreamId::default(),
                kind: String::new(),
                data: String::new(),
                catch_up: true,
            }));
        }
    }

    /// Ends every viewer's stream (at shutdown): their receivers see the channel closed once they
    /// have sent what it still holds. Viewers reconnect elsewhere with `Last-Event-ID`.
    pub fn close(&self) {
        self.orgs.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Viewers connected to this instance.
    pub fn viewers(&self) -> usize {
        self.orgs.lock().unwrap_or_else(|e| e.into_inner()).values().map(|t| t.receiver_count()).sum()
    }
}

/// Appends a change of `org_id` to its log and publishes it; returns its id. A failure is logged:
/// the change itself is committed (or lives in Redis, which is away), and viewers resynchronise
/// from a snapshot when they reconnect.
pub async fn emit(state: &AppState, org_id: Uuid, kind: &str, data: &serde_json::Value) -> Option<StreamId> {
    let redis = state.redis();
    let run = async {
        let mut conn = redis.multiplexed().await?;
        let mut inv = state.city().hub.emit.key(log_key(redis, org_id));
        inv.key(channel(redis))
            .arg(state.config().city.replay_window)
            .arg(org_id.to_string())
            .arg(kind)
            .arg(data.to_string());
        let id: String = tokio::time::timeout(redis.timeout(), inv.invoke_async(&mut conn)).await??;
        anyhow::Ok(id)
    };
    match run.await {
        Ok(id) => StreamId::parse(&id),
        Err(e) => {
            redis.drop_multiplexed();
            tracing::warn!(error = %e, kind, "could not record a city change");
            None
        }
    }
}

/// The latest id of an organization's log (`0-0` when it is empty).
pub async fn last_id(redis: &Redis, org_id: Uuid) -> anyhow::Result<StreamId> {
    let mut conn = redis.multiplexed().await?;
    let entries: Vec<(String, HashMap<String, String>)> = tokio::time::timeout(
        redis.timeout(),
        redis::cmd("XREVRANGE")
            .arg(log_key(redis, org_id))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn),
    )
    .await??;
    Ok(entries.first().and_then(|(id, _)| StreamId::parse(id)).unwrap_or_default())
}

/// What the log holds after `after`: `None` when changes after it may have been trimmed (the
/// caller sends a fresh snapshot instead), else the changes in order.
pub async fn since(redis: &Redis, org_id: Uuid, after: StreamId) -> anyhow::Result<Option<Vec<Change>>> {
    let mut conn = redis.multiplexed().await?;
    let key = log_key(redis, org_id);
    let oldest: Vec<(String, HashMap<String, String>)> = tokio::time::timeout(
        redis.timeout(),
        redis::cmd("XRANGE").arg(&key).arg("-").arg("+").arg("COUNT").arg(1).query_async(&mut conn),
    )
    .await??;
    // Trimming takes from the front: when the oldest kept change is at or before `after`, every
    // change after it is still here. An empty log after a change was seen means Redis lost it.
    match oldest.first().and_then(|(id, _)| StreamId::parse(id)) {
        Some(oldest) if oldest > after => return Ok(None),
        None if after != StreamId::default() => return Ok(None),
        _ => {}
    }
    let entries: Vec<(String, HashMap<String, String>)> = tokio::time::timeout(
        redis.timeout(),
        redis::cmd("XRANGE").arg(&key).arg(format!("({after}")).arg("+").query_async(&mut conn),
    )
    .await??;
    Ok(Some(
        entries
            .into_iter()
            .filter_map(|(id, mut fields)| {
                Some(Change {
                    id: StreamId::parse(&id)?,
                    kind: fields.remove("k")?,
                    data: fields.remove("d")?,
                    catch_up: false,
                })
            })
            .collect(),
    ))
}

/// The agent a presence change is about.
#[derive(serde::Deserialize)]
struct AgentOf {
    agent_id: Uuid,
}

/// Listens on the channel until the process ends, reconnecting; after each (re)connection every
/// viewer catches up from the log, since changes published meanwhile were not received.
pub async fn run_subscriber(state: AppState) {
    let channel = channel(state.redis());
    let url = state.config().redis.url.clone();
    loop {
        let session = async {
            let client = redis::Client::open(url.as_str())?;
            let mut pubsub = tokio::time::timeout(Duration::from_secs(3), client.get_async_pubsub()).await??;
            pubsub.subscribe(&channel).await?;
            state.city().presences.set_live(true);
            state.city().hub.catch_up_all();
            let mut stream = pubsub.on_message();
            while let Some(msg) = stream.next().await {
                let Ok(text) = msg.get_payload::<String>() else { continue };
                let mut parts = text.splitn(4, ' ');
                let (Some(org), Some(id), Some(kind), Some(data)) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    continue;
                };
                if kind == "presence" {
                    match serde_json::from_str::<AgentOf>(data) {
                        Ok(c) => state.city().presences.changed(c.agent_id),
                        Err(_) => state.city().presences.set_live(true),
                    }
                }
                let (Ok(org_id), Some(id)) = (org.parse::<Uuid>(), StreamId::parse(id)) else { continue };
                state
                    .city()
                    .hub
                    .deliver(org_id, Change { id, kind: kind.to_owned(), data: data.to_owned(), catch_up: false });
            }
            anyhow::Ok(())
        };
        let ended = session.await;
        state.city().presences.set_live(false);
        if let Err(e) = ended {
            tracing::debug!(error = %e, "city change subscriber disconnected");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_parse_and_order() {
        assert_eq!(StreamId::parse("1700000000000-3"), Some(StreamId(1_700_000_000_000, 3)));
        assert!(StreamId(5, 0) > StreamId(4, 99));
        assert!(StreamId(5, 2) > StreamId(5, 1));
        for bad in ["", "-", "1-", "-1", "x-1", "1-x", "1", "99999999999999999999999-1"] {
            assert_eq!(StreamId::parse(bad), None, "{bad}");
        }
        assert_eq!(StreamId(7, 8).to_string(), "7-8");
    }
}
