//! RFC 9068 access tokens: issuing (signing with the active key) and verifying (algorithm pinned
//! to the key, `typ`, `iss`, `aud`, `exp`, `nbf`), with a verified-token cache so that a token seen
//! before costs a hash lookup instead of a signature check. Revocation is checked on every use.

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::keys::KeyRing;
use crate::cache::Cache;

/// The claims of our access tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub iss: String,
    /// `agent:<uuid>`.
    pub sub: String,
    pub aud: Audience,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: Uuid,
    pub client_id: String,
    /// Space-separated scopes.
    pub scope: String,
    pub org_id: Uuid,
    pub actor_type: String,
    /// The credential the token was issued to (for per-credential revocation).
    pub cid: Uuid,
    /// RFC 8693 §4.1: the acting party of a delegated token (`sub` is then the delegator), with
    /// the earlier actors of a chain nested inside, newest outermost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Act>,
    /// The delegation a delegated token was issued under.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegation_id: Option<Uuid>,
    /// RFC 9449 §6: the key a DPoP-bound token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// The `cnf` claim of a sender-constrained token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Confirmation {
    /// The RFC 7638 thumbprint of the DPoP key.
    pub jkt: String,
}

/// An RFC 8693 `act` claim: the actor, and the actor before it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Act {
    /// `agent:<uuid>`.
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Act>>,
}

impl Act {
    /// The actors from the newest to the oldest.
    pub fn actors(&self) -> Vec<&str> {
        let mut out = vec![self.sub.as_str()];
        let mut next = self.act.as_deref();
        while let Some(a) = next {
            out.push(a.sub.as_str());
            next = a.act.as_deref();
        }
        out
    }

    /// A chain whose newest actor is `sub`, with `earlier` (newest first) inside it.
    pub fn chain(sub: String, earlier: Option<Act>) -> Self {
        Self { sub, act: earlier.map(Box::new) }
    }
}

/// `aud` is a string or an array of strings (RFC 7519 §4.1.3).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Audience {
    pub fn contains(&self, aud: &str) -> bool {
        match self {
            Self::One(a) => a == aud,
            Self::Many(list) => list.iter().any(|a| a == aud),
        }
    }
}

impl Claims {
    /// The agent that acts with this token: the outermost `act` of a delegated token, else `sub`.
    pub fn agent_id(&self) -> Option<Uuid> {
        let acting = self.act.as_ref().map_or(self.sub.as_str(), |a| a.sub.as_str());
        acting.strip_prefix("agent:")?.parse().ok()
    }

    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.split_whitespace()
    }
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'a str,
    typ: &'static str,
    kid: &'a str,
}

/// Signs `claims` with the key that signs at their `iat`.
pub fn sign(keys: &KeyRing, claims: &Claims) -> anyhow::Result<String> {
    sign_jwt(keys, "at+jwt", claims.iat, claims).map(|(t, _)| t)
}

/// Signs any claims as a compact JWS of type `typ` (`at+jwt`, or `JWT` for ID tokens) with the key
/// that signs at `iat`; returns the token and the algorithm it was signed with.
pub fn sign_jwt(
    keys: &KeyRing,
    typ: &'static str,
    iat: i64,
    claims: &impl Serialize,
) -> anyhow::Result<(String, super::keys::Algorithm)> {
    let set = keys.current().ok_or_else(|| anyhow::anyhow!("signing keys not loaded"))?;
    let active = set.signer(iat);
    let header = serde_json::to_vec(&Header { alg: active.algorithm.as_str(), typ, kid: &active.kid })?;
    let body = serde_json::to_vec(claims)?;
    let mut token = String::with_capacity(64 + body.len() * 4 / 3 + 360);
    B64.encode_string(header, &mut token);
    token.push('.');
    B64.encode_string(body, &mut token);
    let signature = active.sign(token.as_bytes())?;
    token.push('.');
    B64.encode_string(signature, &mut token);
    Ok((token, active.algorithm))
}

/// Why a JWT was rejected. Never shown in detail to clients; logged at debug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    Malformed,
    /// `alg` not the key's own (covers `none` and HMAC-with-a-public-key), or `typ` not `at+jwt`.
    BadHeader,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    typ: Option<String>,
    kid: Option<String>,
}

/// Verifies a compact JWS against our keys and validates its claims.
pub fn verify(keys: &KeyRing, token: &str, issuer: &str, audiences: &[String], now: i64) -> Result<Claims, Rejection> {
    let mut parts = token.splitn(3, '.');
    let (Some(h), Some(c), Some(s)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Rejection::Malformed);
    };
    let header: RawHeader =
        serde_json::from_slice(&B64.decode(h).map_err(|_| Rejection::Malformed)?).map_err(|_| Rejection::Malformed)?;
    let typ_ok = header
        .typ
        .as_deref()
        .is_some_and(|t| t.eq_ignore_ascii_case("at+jwt") || t.eq_ignore_ascii_case("application/at+jwt"));
    if !typ_ok {
        return Err(Rejection::BadHeader);
    }
    let set = keys.current().ok_or(Rejection::UnknownKey)?;
    let verifier = header.kid.as_deref().and_then(|k| set.verifiers.get(k)).ok_or(Rejection::UnknownKey)?;
    // The algorithm is the key's, never the token's choice.
    if header.alg != verifier.algorithm().as_str() {
        return Err(Rejection::BadHeader);
    }
    let signature = B64.decode(s).map_err(|_| Rejection::Malformed)?;
    let signed = &token[..h.len() + 1 + c.len()];
    if !verifier.verify(signed.as_bytes(), &signature) {
        return Err(Rejection::BadSignature);
    }
    let claims: Claims =
        serde_json::from_slice(&B64.decode(c).map_err(|_| Rejection::Malformed)?).map_err(|_| Rejection::Malformed)?;
    validate_times_and_parties(&claims, issuer, audiences, now)?;
    Ok(claims)
}

/// Clock skew tolerated between instances.
pub(crate) const LEEWAY: i64 = 5;

fn validate_times_and_parties(claims: &Claims, issuer: &str, audiences: &[String], now: i64) -> Result<(), Rejection> {
    if claims.exp <= now - LEEWAY {
        return Err(Rejection::Expired);
    }
    if claims.nbf > now + LEEWAY {
        return Err(Rejection::NotYetValid);
    }
    if claims.iss != issuer {
        return Err(Rejection::WrongIssuer);
    }
    if !audiences.iter().any(|a| claims.aud.contains(a)) {
        return Err(Rejection::WrongAudience);
    }
    Ok(())
}

/// Tokens whose signature has been checked, by SHA-256 of the token, for at most a token's lifetime.
pub struct VerifiedCache {
    entries: Cache<[u8; 32], Arc<Claims>>,
}

const VERIFIED_MAX: u64 = 200_000;

impl VerifiedCache {
    pub fn new(token_ttl: Duration) -> Self {
        Self { entries: Cache::new(VERIFIED_MAX, token_ttl + Duration::from_secs(LEEWAY as u64)) }
    }

    /// Verifies through the cache: a hit skips the signature check, never the claim checks (so a
    /// token cached for one audience is not accepted for another).
    pub fn verify(
        &self,
        keys: &KeyRing,
        token: &str,
        issuer: &str,
        audiences: &[String],
        now: i64,
    ) -> Result<Arc<Claims>, Rejection> {
        self.verify_hashed(keys, token, crate::crypto::sha256(token), issuer, audiences, now)
    }

    /// [`Self::verify`] for a caller that already has the token's SHA-256 (`hash`).
    pub fn verify_hashed(
        &self,
        keys: &KeyRing,
        token: &str,
        hash: [u8; 32],
        issuer: &str,
        audiences: &[String],
        now: i64,
    ) -> Result<Arc<Claims>, Rejection> {
        if let Some(claims) = self.entries.get(&hash) {
            if claims.exp <= now - LEEWAY {
                self.entries.remove(&hash);
                return Err(Rejection::Expired);
            }
            validate_times_and_parties(&claims, issuer, audiences, now)?;
            return Ok(claims);
        }
        let claims = Arc::new(verify(keys, token, issuer, audiences, now)?);
        self.entries.insert(hash, claims.clone());
        Ok(claims)
    }
}

/// Whether a bearer value looks like a JWT rather than one of our opaque secrets.
pub fn looks_like_jwt(value: &str) -> bool {
    value.len() < 8192 && value.bytes().filter(|b| *b == b'.').count() == 2 && !value.starts_with("aidp_")
}
