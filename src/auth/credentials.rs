//! Presented credentials: finding them on a request, resolving them to a principal through a short
//! in-process cache, and invalidating that cache on every instance.
//!
//! Priority, as in the original auth service: `X-API-Key`, then `Authorization: Bearer`, then the
//! session cookie. Sessions and API keys are looked up by the SHA-256 of the presented secret.
//! Logout, key deletion and membership changes remove entries here at once and, through the change
//! feed ([`crate::cache::invalidation`]), on every other instance; a subscriber that (re)connects
//! clears its whole cache, since it may have missed messages. Unknown secrets are remembered
//! briefly, and lookups in Postgres are charged to the client's IP.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::http::{HeaderMap, header};
use sqlx::PgPool;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    actor::{ActorType, Role, Scope},
    tokens::Claims,
};
use crate::{
    cache::{
        Cache,
        invalidation::{self, Listener},
    },
    redis::Redis,
    state::AppState,
};

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
    /// The policy layer's queries for this principal, kept with it: a principal is replaced (and
    /// these with it) whenever its credential or memberships change.
    pub queries: crate::policy::QueryMemo,
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
            // A DPoP-bound token (RFC 9449 §7.1) is checked for its proof by the org-context layer.
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("dpop") => {
                token.trim().to_owned()
            }
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
    /// Too many credential lookups from the client's IP this minute.
    Throttled,
    /// A DPoP-bound token without a valid proof of its key (RFC 9449 §7).
    DpopProof,
    /// A DPoP proof without the server's current nonce, where nonces are required (RFC 9449 §9).
    DpopNonce,
}

/// Resolved principals by secret hash, and secrets known not to resolve.
pub struct CredentialCache {
    principals: Cache<[u8; 32], Arc<Principal>>,
    /// Secrets that resolved to nothing, briefly: a bogus credential costs one lookup, not one a request.
    unknown: Cache<[u8; 32], ()>,
}

const CACHE_MAX: u64 = 100_000;

impl CredentialCache {
    pub fn new(ttl: Duration, negative_ttl: Duration) -> Self {
        Self { principals: Cache::new(CACHE_MAX, ttl), unknown: Cache::new(CACHE_MAX, negative_ttl) }
    }

    pub fn remove(&self, hash: &[u8; 32]) {
        self.principals.remove(hash);
    }

    pub fn remove_user(&self, user_id: Uuid) {
        self.principals.remove_if(move |_, p| p.user_id == user_id);
    }

    pub fn clear(&self) {
        self.principals.clear();
        self.unknown.clear();
    }
}

/// Resolves a presented secret, from the cache or from Postgres. A lookup in Postgres is charged
/// to the client's IP first ([`LookupLimit`]); an unknown secret is remembered as unknown briefly.
pub async fn resolve(
    db: &PgPool,
    cache: &CredentialCache,
    limit: &LookupLimit,
    secret: &str,
) -> Result<Arc<Principal>, Failure> {
    if secret.len() > 256 || !(secret.starts_with(SESSION_PREFIX) || secret.starts_with(API_KEY_PREFIX)) {
        return Err(Failure::Invalid);
    }
    let hash = crate::crypto::sha256(secret);
    let now = OffsetDateTime::now_utc();
    if let Some(p) = cache.principals.get(&hash) {
        return if p.expired(now) { Err(Failure::Invalid) } else { Ok(p) };
    }
    if cache.unknown.get(&hash).is_some() {
        return Err(Failure::Invalid);
    }
    limit.charge()?;
    let principal = load(db, secret, hash).await.map_err(|e| {
        tracing::warn!(error = %e, "credential lookup failed");
        Failure::Unavailable
    })?;
    let Some(principal) = principal.filter(|p| !p.expired(now)) else {
        cache.unknown.insert(hash, ());
        return Err(Failure::Invalid);
    };
    let principal = Arc::new(principal);
    cache.principals.insert(hash, principal.clone());
    Ok(principal)
}

/// Lookups of presented credentials in Postgres (cache misses), per client IP per minute. Anyone
/// can present made-up secrets; each costs a query, so each is charged to where it came from.
/// Counted per instance: with N instances an IP gets at most N times the limit.
pub struct LookupLimit {
    per_minute: u32,
    windows: Cache<String, Arc<AtomicU32>>,
    lookups: AtomicU64,
}

impl LookupLimit {
    pub fn new(per_minute: u32) -> Self {
        Self { per_minute, windows: Cache::new(100_000, Duration::from_secs(60)), lookups: AtomicU64::new(0) }
    }

    /// Charges one lookup to the current request's client IP.
    pub fn charge(&self) -> Result<(), Failure> {
        if let Some(ip) = crate::http::middleware::tls::current_client_ip() {
            // One counter per IP even when its first lookups arrive together.
            let counter = self.windows.get_or_insert_with(ip, || Arc::new(AtomicU32::new(0)));
            if counter.fetch_add(1, Ordering::Relaxed) >= self.per_minute {
                return Err(Failure::Throttled);
            }
        }
        self.lookups.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// How many lookups went to Postgres since start (for tests and the benchmarks).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }
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
                queries: Default::default(),
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
        queries: Default::default(),
    }))
}

/// What to drop from every instance's cache.
pub enum Invalidation {
    Credential([u8; 32]),
    User(Uuid),
}
/// Drops the entry here and tells the other instances. A Redis failure is logged, not returned: the
/// change is committed, and other instances' entries expire within the cache TTL anyway.
pub async fn invalidate(cache: &CredentialCache, redis: &Redis, what: Invalidation) {
    let (topic, payload) = match what {
        Invalidation::Credential(hash) => {
            cache.remove(&hash);
            ("cred", hex::encode(hash))
        }
        Invalidation::User(id) => {
            cache.remove_user(id);
            ("user", id.to_string())
        }
    };
    invalidation::publish(redis, topic, &payload).await;
}

/// The identity module's share of the change feed: credentials, users, OAuth clients, signing
/// keys and revocations.
pub fn listener() -> Listener {
    Listener {
        topics: &["cred", "user", "client", "keys", "jti", "wm"],
        apply: |state, topic, payload| Box::pin(apply(state, topic, payload)),
        resync: |state| Box::pin(resync(state)),
        disconnected: |state| {
            // From here until the next connection, requests also ask Postgres about revocation.
            let auth = state.auth();
            auth.revocations.set_live(false);
            auth.cache.clear();
            auth.clients.clear();
        },
    }
}

async fn apply(state: &AppState, topic: &str, payload: &str) {
    let auth = state.auth();
    match topic {
        "cred" => {
            if let Ok(bytes) = hex::decode(payload)
                && let Ok(hash) = <[u8; 32]>::try_from(bytes.as_slice())
            {
                auth.cache.remove(&hash);
            }
        }
        "user" => {
            if let Ok(id) = payload.parse() {
                auth.cache.remove_user(id);
            }
        }
        "client" => auth.clients.remove(payload),
        "keys" => {
            if let Err(e) = state.keys().load(state.db()).await {
                tracing::warn!(error = %e, "reloading signing keys failed");
            }
        }
        _ => auth.revocations.apply(topic, payload),
    }
}

/// After a (re)connection: caches may have missed messages, so they start empty, and revocations
/// and keys are read again; only then is the revocation set trusted alone.
async fn resync(state: &AppState) -> anyhow::Result<()> {
    let auth = state.auth();
    auth.cache.clear();
    auth.clients.clear();
    super::revocation::catch_up(state).await?;
    state.keys().load(state.db()).await?;
    auth.revocations.set_live(true);
    Ok(())
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
