//! Presented credentials: finding them on a request, resolving them to a principal through a short
//! in-process cache, and invalidating that cache on every instance.
//!
//! Priority, as in the original auth service: `X-API-Key`, then `Authorization: Bearer`, then the
//! session cookie. Sessions and API keys are looked up by the SHA-256 of the presented secret.
//! Logout, key deletion and membership changes remove entries here at once and, through Redis
//! pub/sub, on every other instance; a subscriber that (re)connects clears its whole cache, since it
//! may have missed messages.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use axum::http::{HeaderMap, header};
use futures_util::StreamExt;
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    actor::{ActorType, Role, Scope},
    tokens::Claims,
};
use crate::redis::Redis;

pub const SESSION_PREFIX: &str = "aidp_ses_";
pub const API_KEY_PREFIX: &str = "aidp_key_";

/// How the principal authenticated.
#[derive(Debug, Clone)]
pub enum Credential {
    Session {
        session_id: Uuid,
        expires_at: OffsetDateTime,
    },
    ApiKey {
        key_id: Uuid,
        org_id: Uuid,
        scopes: Vec<Scope>,
        expires_at: Option<OffsetDateTime>,
    },
    /// An RFC 9068 access token issued to an agent's credential.
    AccessToken {
        claims: Arc<Claims>,
        scopes: Vec<Scope>,
    },
}

impl Credential {
    /// The organization a credential is bound to, if it is bound to one.
    pub fn bound_org(&self) -> Option<Uuid> {
        match self {
            Self::Session { .. } => None,
            Self::ApiKey { org_id, .. } => Some(*org_id),
            Self::AccessToken { claims, .. } => Some(claims.org_id),
        }
    }
}

/// A resolved credential: the human behind it and their memberships.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The user's or agent's id.
    pub user_id: Uuid,
    pub actor_type: ActorType,
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub system_admin: bool,
    /// (organization, role), oldest membership first.
    pub memberships: Vec<(Uuid, Role)>,
    pub credential: Credential,
    /// SHA-256 of the presented secret.
    pub secret_hash: [u8; 32],
}

impl Principal {
    pub fn expired(&self, now: OffsetDateTime) -> bool {
        match &self.credential {
            Credential::Session { expires_at, .. } => *expires_at <= now,
            Credential::ApiKey { expires_at, .. } => expires_at.is_some_and(|e| e <= now),
            Credential::AccessToken { claims, .. } => claims.exp <= now.unix_timestamp(),
        }
    }
}

/// The secret presented on a request, by priority.
pub fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(v) = headers.get("x-api-key") {
        return Some(v.to_str().unwrap_or("").trim().to_owned());
    }
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().unwrap_or("");
        return Some(match v.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim().to_owned(),
            _ => String::new(),
        });
    }
    cookie(headers, crate::SESSION_COOKIE)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

/// Why a presented credential did not resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Unknown, malformed, expired, ended or revoked.
    Invalid,
    /// Postgres could not be asked.
    Unavailable,
}

/// A cached principal and when it was loaded.
type Entry = (Instant, Arc<Principal>);

/// Resolved principals by secret hash, for `ttl`.
pub struct CredentialCache {
    entries: RwLock<HashMap<[u8; 32], Entry>>,
    ttl: Duration,
}

const CACHE_MAX: usize = 100_000;

impl CredentialCache {
    pub fn new(ttl: Duration) -> Self {
        Self { entries: RwLock::new(HashMap::new()), ttl }
    }

    fn get(&self, hash: &[u8; 32]) -> Option<Arc<Principal>> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.get(hash).filter(|(at, _)| at.elapsed() < self.ttl).map(|(_, p)| p.clone())
    }

    fn put(&self, principal: Arc<Principal>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= CACHE_MAX {
            let ttl = self.ttl;
            entries.retain(|_, (at, _)| at.elapsed() < ttl);
            if entries.len() >= CACHE_MAX {
                entries.clear();
            }
        }
        entries.insert(principal.secret_hash, (Instant::now(), principal));
    }

    pub fn remove(&self, hash: &[u8; 32]) {
        self.entries.write().unwrap_or_else(|e| e.into_inner()).remove(hash);
    }

    pub fn remove_user(&self, user_id: Uuid) {
        self.entries.write().unwrap_or_else(|e| e.into_inner()).retain(|_, (_, p)| p.user_id != user_id);
    }

    pub fn clear(&self) {
        self.entries.write().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Resolves a presented secret, from the cache or from Postgres.
pub async fn resolve(db: &PgPool, cache: &CredentialCache, secret: &str) -> Result<Arc<Principal>, Failure> {
    if secret.len() > 256 || !(secret.starts_with(SESSION_PREFIX) || secret.starts_with(API_KEY_PREFIX)) {
        return Err(Failure::Invalid);
    }
    let hash = crate::crypto::sha256(secret);
    let now = OffsetDateTime::now_utc();
    if let Some(p) = cache.get(&hash) {
        return if p.expired(now) { Err(Failure::Invalid) } else { Ok(p) };
    }
    let principal = load(db, secret, hash).await.map_err(|e| {
        tracing::warn!(error = %e, "credential lookup failed");
        Failure::Unavailable
    })?;
    let principal = Arc::new(principal.ok_or(Failure::Invalid)?);
    if principal.expired(now) {
        return Err(Failure::Invalid);
    }
    cache.put(principal.clone());
    Ok(principal)
}

async fn load(db: &PgPool, secret: &str, hash: [u8; 32]) -> Result<Option<Principal>, sqlx::Error> {
    struct Row {
        user_id: Uuid,
        email: String,
        display_name: Option<String>,
        system_admin: bool,
        stored_hash: Vec<u8>,
    }
    let (row, credential) = if secret.starts_with(SESSION_PREFIX) {
        let Some(r) = sqlx::query!(
            "select s.session_id, s.expires_at, s.token_hash, u.user_id, u.email, u.display_name, u.system_admin
             from session s join app_user u using (user_id)
             where s.token_hash = $1 and s.ended_at is null and s.expires_at > now() and u.status = 'active'",
            &hash[..]
        )
        .fetch_optional(db)
        .await?
        else {
            return Ok(None);
        };
        (
            Row {
                user_id: r.user_id,
                email: r.email,
                display_name: r.display_name,
                system_admin: r.system_admin,
                stored_hash: r.token_hash,
            },
            Credential::Session { session_id: r.session_id, expires_at: r.expires_at },
        )
    } else {
        let Some(r) = sqlx::query!(
            "select k.api_key_id, k.organization_id, k.scopes, k.expires_at, k.key_hash, k.service, k.description,
                    u.user_id, u.email, u.display_name, u.system_admin
             from api_key k join app_user u on u.user_id = k.created_by
             where k.key_hash = $1 and k.revoked_at is null and (k.expires_at is null or k.expires_at > now())
               and u.status = 'active'",
            &hash[..]
        )
        .fetch_optional(db)
        .await?
        else {
            return Ok(None);
        };
        if r.service {
            // A service actor: its own identity, no memberships, never a system admin.
            if !crate::crypto::ct_eq(&r.key_hash, &hash) {
                return Ok(None);
            }
            return Ok(Some(Principal {
                user_id: r.api_key_id,
                actor_type: ActorType::Service,
                email: None,
                display_name: Some(r.description),
                system_admin: false,
                memberships: Vec::new(),
                credential: Credential::ApiKey {
                    key_id: r.api_key_id,
                    org_id: r.organization_id,
                    scopes: r.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
                    expires_at: r.expires_at,
                },
                secret_hash: hash,
            }));
        }
        (
            Row {
                user_id: r.user_id,
                email: r.email,
                display_name: r.display_name,
                system_admin: r.system_admin,
                stored_hash: r.key_hash,
            },
            Credential::ApiKey {
                key_id: r.api_key_id,
                org_id: r.organization_id,
                scopes: r.scopes.iter().filter_map(|s| Scope::parse(s)).collect(),
                expires_at: r.expires_at,
            },
        )
    };
    // The index found it by hash; compare again in constant time rather than trust that alone.
    if !crate::crypto::ct_eq(&row.stored_hash, &hash) {
        return Ok(None);
    }
    let memberships = sqlx::query!(
        "select organization_id, role from membership where user_id = $1 order by created_at, organization_id",
        row.user_id
    )
    .fetch_all(db)
    .await?
    .into_iter()
    .filter_map(|m| Role::parse(&m.role).map(|r| (m.organization_id, r)))
    .collect();
    Ok(Some(Principal {
        user_id: row.user_id,
        actor_type: ActorType::Human,
        email: Some(row.email),
        display_name: row.display_name,
        system_admin: row.system_admin,
        memberships,
        credential,
        secret_hash: hash,
    }))
}

/// What to drop from every instance's cache.
pub enum Invalidation {
    Credential([u8; 32]),
    User(Uuid),
}

fn channel(redis: &Redis) -> String {
    redis.key("auth:invalidate")
}

/// Drops the entry here and tells the other instances. A Redis failure is logged, not returned: the
/// change is committed, and other instances' entries expire within the cache TTL anyway.
pub async fn invalidate(cache: &CredentialCache, redis: &Redis, what: Invalidation) {
    let message = match what {
        Invalidation::Credential(hash) => {
            cache.remove(&hash);
            format!("cred:{}", hex::encode(hash))
        }
        Invalidation::User(id) => {
            cache.remove_user(id);
            format!("user:{id}")
        }
    };
    publish(redis, &message).await;
}

/// Tells every instance (this one included) about a change. A failure is logged, not returned:
/// the change is committed in Postgres, and instances catch up from there (see the subscriber).
pub async fn publish(redis: &Redis, message: &str) {
    let send = async {
        let mut conn = redis.conn().await?;
        let _: i64 = tokio::time::timeout(
            redis.timeout(),
            deadpool_redis::redis::cmd("PUBLISH").arg(channel(redis)).arg(message).query_async(&mut *conn),
        )
        .await??;
        anyhow::Ok(())
    };
    if let Err(e) = send.await {
        tracing::warn!(error = %e, "could not publish a change to other instances; they catch up from Postgres");
    }
}

fn apply(cache: &CredentialCache, message: &str) {
    if let Some(h) = message.strip_prefix("cred:") {
        if let Ok(bytes) = hex::decode(h)
            && let Ok(hash) = <[u8; 32]>::try_from(bytes.as_slice())
        {
            cache.remove(&hash);
        }
    } else if let Some(id) = message.strip_prefix("user:").and_then(|s| s.parse().ok()) {
        cache.remove_user(id);
    }
}

/// Listens for changes made by other instances until the process ends, reconnecting as needed.
/// Each (re)connection starts from Postgres, since messages sent while away are lost.
pub async fn run_subscriber(state: crate::state::AppState) {
    let channel = channel(state.redis());
    let url = state.config().redis.url.clone();
    let auth = state.auth();
    let max_ttl = state.config().auth.access_token_ttl_secs as i64;
    loop {
        let session = async {
            let client = deadpool_redis::redis::Client::open(url.as_str())?;
            let mut pubsub = tokio::time::timeout(Duration::from_secs(3), client.get_async_pubsub()).await??;
            pubsub.subscribe(&channel).await?;
            auth.cache.clear();
            auth.clients.clear();
            state.tiers().clear();
            auth.revocations.sync(state.db(), state.redis(), max_ttl).await?;
            state.keys().load(state.db()).await?;
            crate::policy::sync_all(&state).await?;
            auth.revocations.set_live(true);
            let mut stream = pubsub.on_message();
            while let Some(msg) = stream.next().await {
                let Ok(text) = msg.get_payload::<String>() else { continue };
                if text == "keys" {
                    if let Err(e) = state.keys().load(state.db()).await {
                        tracing::warn!(error = %e, "reloading signing keys failed");
                    }
                } else if let Some(org) = text.strip_prefix("policy:").and_then(|o| o.parse().ok()) {
                    if let Err(e) = crate::policy::reload_org(&state, org).await {
                        tracing::warn!(error = %e, "reloading an organization's policies failed");
                    }
                } else if let Some(org) = text.strip_prefix("tier:").and_then(|o| o.parse().ok()) {
                    state.tiers().forget(org);
                } else if let Some(client_id) = text.strip_prefix("client:") {
                    auth.clients.remove(client_id);
                } else if text.starts_with("jti:") || text.starts_with("wm:") {
                    auth.revocations.apply(&text);
                } else {
                    apply(&auth.cache, &text);
                }
            }
            anyhow::Ok(())
        };
        if let Err(e) = session.await {
            tracing::debug!(error = %e, "change subscriber disconnected");
        }
        // From here until the next connection, requests also ask Postgres about revocation.
        auth.revocations.set_live(false);
        auth.cache.clear();
        auth.clients.clear();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `last_used_at` of API keys, batched: a request notes the time here, a task writes them out.
#[derive(Default)]
pub struct LastUsed {
    pending: Mutex<HashMap<Uuid, OffsetDateTime>>,
}

impl LastUsed {
    pub fn touch(&self, key_id: Uuid) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.insert(key_id, OffsetDateTime::now_utc());
    }

    /// Writes every pending time in one statement.
    pub async fn flush(&self, db: &PgPool) {
        let batch: Vec<(Uuid, OffsetDateTime)> = {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            pending.drain().collect()
        };
        if batch.is_empty() {
            return;
        }
        let (ids, times): (Vec<Uuid>, Vec<OffsetDateTime>) = batch.iter().cloned().unzip();
        let result = sqlx::query!(
            "update api_key k set last_used_at = greatest(k.last_used_at, v.t)
             from unnest($1::uuid[], $2::timestamptz[]) as v(id, t) where k.api_key_id = v.id",
            &ids,
            &times
        )
        .execute(db)
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, keys = batch.len(), "could not record API key use; will retry");
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (id, t) in batch {
                pending.entry(id).or_insert(t);
            }
        }
    }
}
