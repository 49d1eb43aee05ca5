//! DPoP (RFC 9449): proofs of possession of a key, at the token endpoint (the token is then bound
//! to the key's thumbprint, `cnf.jkt`) and on every request to our API with a bound token (`ath`
//! binds the proof to the token).
//!
//! A proof is checked for its type, an asymmetric algorithm, its signature by the embedded public
//! key, `htm` and `htu` against the request, `iat` within a window, and a `jti` never seen before:
//! the replay cache is in Redis, so a proof used at one instance is refused at every other (a
//! short in-process cache stands in while Redis is away). Server nonces (`use_dpop_nonce`) are
//! stateless: a keyed hash of the current time window, valid for that window and the one before.

use std::{sync::Arc, time::Duration};

use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
    auth::{Credential, Principal, credentials::Failure, keys::Algorithm, oauth::OAuthError},
    cache::Cache,
    state::AppState,
};

/// The algorithms a proof may be signed with.
pub const ALGS: &[&str] = &["ES256", "RS256", "EdDSA"];

/// A verified proof: the key's thumbprint, and headers to send (a fresh `DPoP-Nonce`).
#[derive(Debug)]
pub struct Proof {
    pub jkt: String,
    pub headers: HeaderMap,
}

/// Why a proof is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// `invalid_dpop_proof`, with what is wrong.
    Proof(&'static str),
    /// `use_dpop_nonce`: send the nonce in `DPoP-Nonce`.
    Nonce(String),
}

/// Replayed proofs seen while Redis was away.
pub struct ReplayCache {
    local: Cache<String, ()>,
}

impl ReplayCache {
    pub fn new(window: Duration) -> Self {
        Self { local: Cache::new(200_000, window * 2 + Duration::from_secs(5)) }
    }
}

#[derive(Deserialize)]
struct Header {
    typ: Option<String>,
    alg: String,
    jwk: Option<Value>,
}

#[derive(Deserialize)]
struct Claims {
    jti: Option<String>,
    htm: Option<String>,
    htu: Option<String>,
    iat: Option<i64>,
    ath: Option<String>,
    nonce: Option<String>,
}

/// Verifies a compact JWS made by `jwk` with `alg`, the algorithm pinned to the key's type.
pub fn verify_with_jwk(alg: &str, jwk: &Value, token: &str) -> Option<Value> {
    let algorithm = Algorithm::parse(alg)?;
    let kty = jwk.get("kty").and_then(Value::as_str)?;
    let crv = jwk.get("crv").and_then(Value::as_str);
    let fits = match algorithm {
        Algorithm::ES256 => kty == "EC" && crv == Some("P-256"),
        Algorithm::RS256 => kty == "RSA",
        Algorithm::EdDSA => kty == "OKP" && crv == Some("Ed25519"),
    };
    if !fits || jwk.get("d").is_some() {
        return None;
    }
    let verifier = crate::auth::keys::verifier_from_jwk(algorithm, jwk).ok()?;
    let (signed, sig) = token.rsplit_once('.')?;
    let (_, claims) = signed.split_once('.')?;
    let signature = B64.decode(sig).ok()?;
    if !verifier.verify(signed.as_bytes(), &signature) {
        return None;
    }
    serde_json::from_slice(&B64.decode(claims).ok()?).ok()
}

fn nonce_for(state: &AppState, window: i64) -> String {
    let mut h = Sha256::new();
    h.update(b"agentidp dpop nonce\0");
    h.update(state.config().kek());
    h.update(window.to_be_bytes());
    let mac = h.finalize();
    format!("{window:x}.{}", B64.encode(&mac[..16]))
}

/// The nonce to send now (`DPoP-Nonce`).
pub fn current_nonce(state: &AppState) -> String {
    let life = state.config().oidc.dpop_nonce_lifetime_secs.max(1) as i64;
    nonce_for(state, state.clock().now().unix_timestamp() / life)
}

fn nonce_valid(state: &AppState, nonce: &str) -> bool {
    let life = state.config().oidc.dpop_nonce_lifetime_secs.max(1) as i64;
    let now = state.clock().now().unix_timestamp() / life;
    let Some((w, _)) = nonce.split_once('.') else { return false };
    let Ok(w) = i64::from_str_radix(w, 16) else { return false };
    (w == now || w == now - 1) && crate::crypto::ct_eq(nonce_for(state, w).as_bytes(), nonce.as_bytes())
}

/// `htu` compared as RFC 9449 §4.3 asks: without query and fragment, scheme and host in any case.
fn same_htu(htu: &str, expected: &str) -> bool {
    let (Ok(mut a), Ok(b)) = (url::Url::parse(htu), url::Url::parse(expected)) else { return false };
    a.set_query(None);
    a.set_fragment(None);
    a.as_str() == b.as_str()
}

/// Marks `jti` of the key as used; `false` when it was used before.
async fn first_use(state: &AppState, jkt: &str, jti: &str) -> bool {
    let ttl = state.config().oidc.dpop_proof_max_age_secs * 2 + 5;
    once(state, "dpop:jti", &format!("{jkt}\0{jti}"), ttl).await
}

/// Marks `what` as seen for `ttl_secs` on every instance (Redis, with this instance's memory while
/// Redis is away); `false` when it was seen before. Replay caches for proofs and client assertions.
pub(crate) async fn once(state: &AppState, namespace: &str, what: &str, ttl_secs: u64) -> bool {
    let key = format!("{namespace}:{}", hex::encode(crate::crypto::sha256(what)));
    let redis = state.redis();
    let set = async {
        let mut conn = redis.multiplexed().await?;
        let done: Option<String> = tokio::time::timeout(
            redis.timeout(),
            redis::cmd("SET")
                .arg(redis.key(&key))
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(ttl_secs.max(1))
                .query_async(&mut conn),
        )
        .await??;
        anyhow::Ok(done.is_some())
    };
    let local = &state.auth().dpop_replays.local;
    let seen_here = local.get(&key).is_some();
    local.insert(key.clone(), ());
    match set.await {
        Ok(first) => first && !seen_here,
        Err(e) => {
            tracing::warn!(error = %e, "replay cache: Redis unavailable, checking this instance only");
            !seen_here
        }
    }
}

/// A proof whose form, signature, `htm`, `htu`, `iat` and `ath` are right: what is left to check
/// needs state (the server's nonce, the replay cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub jkt: String,
    pub jti: String,
    pub nonce: Option<String>,
}

/// Checks everything a proof says about itself and the request, without state: the one `DPoP`
/// header of a request to `method` `url` at `now`, `iat` within `window` seconds, and, when
/// `token` is given, `ath` binding it to that access token. Takes untrusted bytes (`make fuzz`).
pub fn check_proof(
    headers: &HeaderMap,
    method: &Method,
    url: &str,
    token: Option<&str>,
    now: i64,
    window: i64,
) -> Result<Option<Checked>, Invalid> {
    let mut values = headers.get_all("dpop").iter();
    let Some(value) = values.next() else { return Ok(None) };
    if values.next().is_some() {
        return Err(Invalid::Proof("Send one DPoP proof."));
    }
    let proof = value.to_str().map_err(|_| Invalid::Proof("The proof is not a JWT."))?;
    if proof.len() > 8192 {
        return Err(Invalid::Proof("The proof is too long."));
    }
    let (h, _) = proof.split_once('.').ok_or(Invalid::Proof("The proof is not a JWT."))?;
    let header: Header = B64
        .decode(h)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Invalid::Proof("The proof's header is malformed."))?;
    if header.typ.as_deref() != Some("dpop+jwt") {
        return Err(Invalid::Proof("The proof's typ must be dpop+jwt."));
    }
    if !ALGS.contains(&header.alg.as_str()) {
        return Err(Invalid::Proof("The proof's algorithm is not supported."));
    }
    let jwk = header.jwk.ok_or(Invalid::Proof("The proof names no jwk."))?;
    let claims =
        verify_with_jwk(&header.alg, &jwk, proof).ok_or(Invalid::Proof("The proof's signature is invalid."))?;
    let claims: Claims =
        serde_json::from_value(claims).map_err(|_| Invalid::Proof("The proof's claims are malformed."))?;
    let jkt = crate::crypto::jwk_thumbprint(&jwk).ok_or(Invalid::Proof("The proof's jwk is not a public key."))?;
    let (Some(jti), Some(htm), Some(htu), Some(iat)) = (claims.jti, claims.htm, claims.htu, claims.iat) else {
        return Err(Invalid::Proof("The proof needs jti, htm, htu and iat."));
    };
    if jti.is_empty() || jti.len() > 256 {
        return Err(Invalid::Proof("The proof's jti is malformed."));
    }
    if htm != method.as_str() {
        return Err(Invalid::Proof("The proof is for another method (htm)."));
    }
    if !same_htu(&htu, url) {
        return Err(Invalid::Proof("The proof is for another URL (htu)."));
    }
    if now.abs_diff(iat) > window.unsigned_abs() {
        return Err(Invalid::Proof("The proof's iat is outside the accepted window."));
    }
    if let Some(token) = token {
        let ath = B64.encode(Sha256::digest(token.as_bytes()));
        if claims.ath.as_deref().is_none_or(|a| !crate::crypto::ct_eq(a.as_bytes(), ath.as_bytes())) {
            return Err(Invalid::Proof("The proof's ath does not match the access token."));
        }
    }
    Ok(Some(Checked { jkt, jti, nonce: claims.nonce }))
}

/// Verifies the one `DPoP` header of a request to `method` `url`; `token` is the access token it
/// must be bound to (`ath`), for requests to resources.
pub async fn verify(
    state: &AppState,
    headers: &HeaderMap,
    method: &Method,
    url: &str,
    token: Option<&str>,
    require_nonce: bool,
) -> Result<Option<Proof>, Invalid> {
    let window = state.config().oidc.dpop_proof_max_age_secs as i64;
    let now = state.clock().now().unix_timestamp();
    let Some(Checked { jkt, jti, nonce }) = check_proof(headers, method, url, token, now, window)? else {
        return Ok(None);
    };
    if require_nonce && nonce.as_deref().is_none_or(|n| !nonce_valid(state, n)) {
        return Err(Invalid::Nonce(current_nonce(state)));
    }
    if !first_use(state, &jkt, &jti).await {
        return Err(Invalid::Proof("The proof was already used (jti)."));
    }
    let mut out = HeaderMap::new();
    if require_nonce && let Ok(v) = HeaderValue::from_str(&current_nonce(state)) {
        out.insert("dpop-nonce", v);
    }
    Ok(Some(Proof { jkt, headers: out }))
}

/// With nonces required, every response to a request that carries a DPoP proof (or the `DPoP`
/// scheme) carries the current nonce, so that a client always holds one that is still valid
/// (RFC 9449 §8.2): refusals asking for it (`use_dpop_nonce`) and successes alike. Whether this
/// request is one of those.
pub fn wants_nonce(state: &AppState, request: &HeaderMap) -> bool {
    state.config().oidc.dpop_require_nonce
        && (request.contains_key("dpop")
            || request
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.len() > 5 && v[..5].eq_ignore_ascii_case("dpop ")))
}

/// Adds the current nonce to a response (see [`wants_nonce`]), unless it has one.
pub fn add_nonce(state: &AppState, response: &mut HeaderMap) {
    if !response.contains_key("dpop-nonce")
        && let Ok(v) = HeaderValue::from_str(&current_nonce(state))
    {
        response.insert("dpop-nonce", v);
    }
}

/// The proof at the token endpoint, if one was sent; refusals are RFC 9449 §5 errors.
pub async fn at_token_endpoint(state: &AppState, headers: &HeaderMap) -> Result<Option<Proof>, OAuthError> {
    let url = format!("{}/api/v1/token", state.config().server.public_url);
    let require_nonce = state.config().oidc.dpop_require_nonce;
    verify(state, headers, &Method::POST, &url, None, require_nonce).await.map_err(|e| match e {
        Invalid::Proof(why) => OAuthError::new(StatusCode::BAD_REQUEST, "invalid_dpop_proof", why),
        Invalid::Nonce(nonce) => {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&nonce) {
                h.insert("dpop-nonce", v);
            }
            OAuthError::new(
                StatusCode::BAD_REQUEST,
                "use_dpop_nonce",
                "Send the server's nonce (DPoP-Nonce) in the proof.",
            )
            .with_headers(h)
        }
    })
}

/// On our API: a DPoP-bound token needs the `DPoP` scheme and a proof of its key made for this
/// request (`htm`, `htu`, `ath`, and the server's nonce when `oidc.dpop_require_nonce` is on); a
/// token sent with the `DPoP` scheme must be bound. Public routes
/// that take tokens (userinfo) check their proofs themselves, so a bound token identifies nobody
/// there.
pub async fn check_bound(
    state: &AppState,
    headers: &HeaderMap,
    method: &Method,
    path: &str,
    route: Option<&str>,
    token: &str,
    principal: Arc<Principal>,
) -> Result<Arc<Principal>, Failure> {
    let Credential::AccessToken { claims, .. } = &principal.credential else { return Ok(principal) };
    let dpop_scheme = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.len() > 5 && v[..5].eq_ignore_ascii_case("dpop "));
    let Some(cnf) = &claims.cnf else {
        return if dpop_scheme { Err(Failure::Invalid) } else { Ok(principal) };
    };
    if !dpop_scheme || crate::auth::is_public(route) {
        return Err(Failure::DpopProof);
    }
    let url = format!("{}{}", state.config().server.public_url, path);
    let require_nonce = state.config().oidc.dpop_require_nonce;
    match verify(state, headers, method, &url, Some(token), require_nonce).await {
        Ok(Some(proof)) if proof.jkt == cnf.jkt => Ok(principal),
        Ok(_) => Err(Failure::DpopProof),
        Err(Invalid::Nonce(_)) => Err(Failure::DpopNonce),
        Err(why) => {
            tracing::debug!(?why, "DPoP proof refused");
            Err(Failure::DpopProof)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htu_ignores_query_only() {
        assert!(same_htu("https://a.example/api?x=1", "https://a.example/api"));
        assert!(same_htu("HTTPS://A.example/api", "https://a.example/api"));
        assert!(!same_htu("https://a.example/api/", "https://a.example/api"));
        assert!(!same_htu("https://b.example/api", "https://a.example/api"));
    }
}
