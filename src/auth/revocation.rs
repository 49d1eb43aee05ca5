//! Revocation that really revokes.
//!
//! Postgres is the durable record: single tokens by `jti` (`token_revocation`), and bulk "not
//! before" watermarks per agent, credential and organization (`revocation_watermark`). Every
//! instance keeps all unexpired revocations in memory, loaded from Postgres at start, on every
//! (re)connection of the pub/sub subscriber and every 30 s (merged in, never replacing what arrived
//! meanwhile), and updated within milliseconds through Redis pub/sub. A request checks the in-memory set only. While the subscriber is disconnected
//! (Redis away or restarting) the set may miss news, so requests also ask Postgres. Redis also holds
//! a mirror (keys with TTL = remaining lifetime) for other consumers; it is rebuilt from Postgres
//! after a restart or flush, and is never the only record.

use std::{
    collections::HashMap,
    sync::{
        RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use super::tokens::Claims;
use crate::redis::Redis;

/// A bulk-revocation subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Subject {
    Agent(Uuid),
    Credential(Uuid),
    Org(Uuid),
    /// Every token issued under a delegation (its watermark is set past the delegation's expiry
    /// when it ends: a delegation never resumes).
    Delegation(Uuid),
}

impl Subject {
    /// Parses what [`Subject::key`] wrote (`agent:<uuid>`, `credential:<uuid>`, `org:<uuid>`).
    pub fn parse(key: &str) -> Option<Self> {
        let (kind, id) = key.split_once(':')?;
        let id = id.parse().ok()?;
        match kind {
            "agent" => Some(Self::Agent(id)),
            "credential" => Some(Self::Credential(id)),
            "org" => Some(Self::Org(id)),
            "delegation" => Some(Self::Delegation(id)),
            _ => None,
        }
    }

    pub fn key(&self) -> String {
        match self {
            Self::Agent(id) => format!("agent:{id}"),
            Self::Credential(id) => format!("credential:{id}"),
            Self::Org(id) => format!("org:{id}"),
            Self::Delegation(id) => format!("delegation:{id}"),
        }
    }
}

/// The in-memory view of every unexpired revocation.
#[derive(Default)]
pub struct Revocations {
    jtis: RwLock<HashMap<Uuid, i64>>,
    /// Keyed by subject itself, so that a check builds no strings.
    watermarks: RwLock<HashMap<Subject, i64>>,
    /// Whether pub/sub is connected, so that this view is current.
    live: AtomicBool,
}

impl Revocations {
    pub fn set_live(&self, live: bool) {
        self.live.store(live, Ordering::SeqCst);
    }

    pub fn is_live(&self) -> bool {
        self.live.load(Ordering::SeqCst)
    }

    fn note_jti(&self, jti: Uuid, exp: i64) {
        self.jtis.write().unwrap_or_else(|e| e.into_inner()).insert(jti, exp);
    }

    fn note_watermark(&self, subject: Subject, not_before: i64) {
        let mut w = self.watermarks.write().unwrap_or_else(|e| e.into_inner());
        let entry = w.entry(subject).or_insert(not_before);
        *entry = (*entry).max(not_before);
    }

    /// The in-memory verdict.
    pub fn revoked_locally(&self, c: &Claims) -> bool {
        if self.jtis.read().unwrap_or_else(|e| e.into_inner()).contains_key(&c.jti) {
            return true;
        }
        let w = self.watermarks.read().unwrap_or_else(|e| e.into_inner());
        let dead = |s: Subject| w.get(&s).is_some_and(|nb| c.iat <= *nb);
        c.agent_id().is_some_and(|a| dead(Subject::Agent(a)))
            || dead(Subject::Credential(c.cid))
            || dead(Subject::Org(c.org_id))
            || c.delegation_id.is_some_and(|d| dead(Subject::Delegation(d)))
    }

    /// The verdict for a request: memory, and Postgres too while memory may be behind.
    pub async fn is_revoked(&self, db: &PgPool, c: &Claims) -> Result<bool, sqlx::Error> {
        if self.revoked_locally(c) {
            return Ok(true);
        }
        if self.is_live() {
            return Ok(false);
        }
        let subjects: Vec<String> = [Subject::Credential(c.cid), Subject::Org(c.org_id)]
            .into_iter()
            .chain(c.agent_id().map(Subject::Agent))
            .chain(c.delegation_id.map(Subject::Delegation))
            .map(|s| s.key())
            .collect();
        let iat = OffsetDateTime::from_unix_timestamp(c.iat).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        sqlx::query_scalar!(
            r#"select exists(select 1 from token_revocation where jti = $1)
                   or exists(select 1 from revocation_watermark where subject = any($2)
                             and date_trunc('second', not_before) >= $3) as "revoked!""#,
            c.jti,
            &subjects,
            iat
        )
        .fetch_one(db)
        .await
    }

    /// Catches up with Postgres: reads every unexpired revocation, rebuilds the Redis mirror and
    /// merges what it read into memory. Merging, never replacing: a revocation that arrives while
    /// the read is under way (by pub/sub or from this instance) must not be forgotten.
    pub async fn sync(&self, db: &PgPool, redis: &Redis, max_token_ttl: i64, now: i64) -> anyhow::Result<()> {
        let snapshot = Snapshot::load(db, max_token_ttl).await?;
        mirror(redis, &snapshot.jtis, &snapshot.watermarks, max_token_ttl).await;
        self.install(snapshot, now, max_token_ttl);
        Ok(())
    }

    /// Merges a snapshot into memory, and prunes only what can no longer matter: single tokens past
    /// their expiry, watermarks older than any token that could still be alive.
    pub fn install(&self, snapshot: Snapshot, now: i64, max_token_ttl: i64) {
        {
            let mut jtis = self.jtis.write().unwrap_or_else(|e| e.into_inner());
            jtis.retain(|_, exp| *exp > now);
            jtis.extend(snapshot.jtis);
        }
        let mut watermarks = self.watermarks.write().unwrap_or_else(|e| e.into_inner());
        watermarks.retain(|_, nb| *nb > now - max_token_ttl - 60);
        for (subject, nb) in snapshot.watermarks {
            let entry = watermarks.entry(subject).or_insert(nb);
            *entry = (*entry).max(nb);
        }
    }

    /// The newest watermark of any of `subjects`, to tell whether something loaded at a given
    /// time may have been revoked since.
    pub fn newest_watermark(&self, subjects: &[Subject]) -> Option<i64> {
        let w = self.watermarks.read().unwrap_or_else(|e| e.into_inner());
        subjects.iter().filter_map(|s| w.get(s).copied()).max()
    }

    /// Applies a message from another instance: topic `jti` (`<jti>:<exp>`) or `wm`
    /// (`<subject>:<not_before>`).
    pub fn apply(&self, topic: &str, payload: &str) {
        match topic {
            "jti" => {
                if let Some((jti, exp)) = payload.split_once(':')
                    && let (Ok(jti), Ok(exp)) = (jti.parse(), exp.parse())
                {
                    self.note_jti(jti, exp);
                }
            }
            "wm" => {
                if let Some((subject, nb)) = payload.rsplit_once(':')
                    && let Ok(nb) = nb.parse()
                    && let Some(subject) = Subject::parse(subject)
                {
                    self.note_watermark(subject, nb);
                }
            }
            _ => {}
        }
    }
}

/// Every unexpired revocation, as read from Postgres at one moment.
pub struct Snapshot {
    jtis: HashMap<Uuid, i64>,
    watermarks: HashMap<Subject, i64>,
}

impl Snapshot {
    pub async fn load(db: &PgPool, max_token_ttl: i64) -> Result<Self, sqlx::Error> {
        let jtis = sqlx::query!("select jti, expires_at from token_revocation where expires_at > now()")
            .fetch_all(db)
            .await?
            .into_iter()
            .map(|r| (r.jti, r.expires_at.unix_timestamp()))
            .collect();
        let watermarks = sqlx::query!(
            "select subject, not_before from revocation_watermark
             where not_before > now() - make_interval(secs => $1)",
            max_token_ttl as f64 + 60.0
        )
        .fetch_all(db)
        .await?
        .into_iter()
        .filter_map(|r| Some((Subject::parse(&r.subject)?, r.not_before.unix_timestamp())))
        .collect();
        Ok(Self { jtis, watermarks })
    }
}

/// Writes the Redis mirror; failures only mean the mirror is behind Postgres.
async fn mirror(redis: &Redis, jtis: &HashMap<Uuid, i64>, watermarks: &HashMap<Subject, i64>, max_ttl: i64) {
    if jtis.is_empty() && watermarks.is_empty() {
        return;
    }
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let write = async {
        let mut conn = redis.conn().await?;
        let mut pipe = deadpool_redis::redis::pipe();
        for (jti, exp) in jtis {
            let ttl = (exp - now).max(1);
            pipe.cmd("SET").arg(redis.key(&format!("revoked:jti:{jti}"))).arg(1).arg("EX").arg(ttl).ignore();
        }
        for (subject, nb) in watermarks {
            let ttl = (nb + max_ttl + 60 - now).max(1);
            pipe.cmd("SET")
                .arg(redis.key(&format!("revoked:wm:{}", subject.key())))
                .arg(nb)
                .arg("EX")
                .arg(ttl)
                .ignore();
        }
        let () = tokio::time::timeout(redis.timeout() * 4, pipe.query_async(&mut *conn)).await??;
        anyhow::Ok(())
    };
    if let Err(e) = write.await {
        tracing::debug!(error = %e, "revocation mirror not written to Redis");
    }
}

/// Records a single token's revocation in the caller's transaction.
pub async fn revoke_jti(conn: &mut PgConnection, jti: Uuid, org_id: Uuid, exp: i64) -> Result<(), sqlx::Error> {
    let expires_at = OffsetDateTime::from_unix_timestamp(exp).unwrap_or_else(|_| OffsetDateTime::now_utc());
    sqlx::query!(
        "insert into token_revocation (jti, organization_id, expires_at) values ($1, $2, $3) on conflict (jti) do nothing",
        jti,
        org_id,
        expires_at
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Records a bulk revocation in the caller's transaction; returns the watermark (unix seconds).
/// `now` is the application's clock, the one that stamps `iat`: a cutoff read from another clock
/// (Postgres's) would let tokens through, or cut off new ones, by the skew between the two.
pub async fn revoke_subject(
    conn: &mut PgConnection,
    subject: &Subject,
    now: OffsetDateTime,
) -> Result<i64, sqlx::Error> {
    let nb = sqlx::query_scalar!(
        "insert into revocation_watermark (subject, not_before) values ($1, $2)
         on conflict (subject) do update set not_before = greatest(revocation_watermark.not_before, $2), updated_at = now()
         returning not_before",
        subject.key(),
        now
    )
    .fetch_one(conn)
    .await?;
    Ok(nb.unix_timestamp())
}

/// After commit: applies the revocation here and tells every other instance.
pub async fn announce(state: &crate::state::AppState, what: Announced) {
    let rev = &state.auth().revocations;
    let (topic, payload, mirror_jtis, mirror_wms) = match what {
        Announced::Jti { jti, exp } => {
            rev.note_jti(jti, exp);
            ("jti", format!("{jti}:{exp}"), HashMap::from([(jti, exp)]), HashMap::new())
        }
        Announced::Subject { subject, not_before } => {
            rev.note_watermark(subject.clone(), not_before);
            ("wm", format!("{}:{not_before}", subject.key()), HashMap::new(), HashMap::from([(subject, not_before)]))
        }
    };
    let max_ttl = state.config().auth.access_token_ttl_secs as i64;
    mirror(state.redis(), &mirror_jtis, &mirror_wms, max_ttl).await;
    crate::cache::invalidation::publish(state.redis(), topic, &payload).await;
}

/// What was revoked, for [`announce`].
pub enum Announced {
    Jti { jti: Uuid, exp: i64 },
    Subject { subject: Subject, not_before: i64 },
}

/// Catches this instance up with Postgres: at start, on every reconnection and every 30 s.
pub async fn catch_up(state: &crate::state::AppState) -> anyhow::Result<()> {
    let ttl = state.config().auth.access_token_ttl_secs as i64;
    state.auth().revocations.sync(state.db(), state.redis(), ttl, state.clock().now().unix_timestamp()).await
}
