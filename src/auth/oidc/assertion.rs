//! `private_key_jwt` (RFC 7523 §2.2, OIDC Core §9): a client authenticates with a JWT it signed
//! with a key of its registered JWKS (inline, or at its `jwks_uri`, fetched through the guarded
//! fetcher and cached for its `Cache-Control` max-age, one minute to one day, and fetched again,
//! at most every 30 s, when no key of the cached set verifies the assertion). The assertion names
//! the client as `iss` and `sub`, our token endpoint (or issuer) as `aud`, expires soon, and is
//! used once (`jti`, remembered in Redis until it expires).

use std::sync::Arc;

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde_json::Value;

use super::{AuthMethod, OidcClient, dpop, load_client};
use crate::{auth::oauth::OAuthError, state::AppState};

/// The `client_assertion_type` of a JWT assertion.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// The longest an assertion may live.
const MAX_LIFETIME_SECS: i64 = 600;

fn part(token: &str, i: usize) -> Option<Value> {
    let p = token.split('.').nth(i)?;
    serde_json::from_slice(&B64.decode(p).ok()?).ok()
}

/// The client's key set: inline, or from its `jwks_uri` (cached; `wanting`: the cached set had no
/// key that verified, so fetch it again unless that was done in the last 30 s).
async fn keys_of(state: &AppState, client: &OidcClient, wanting: bool) -> Option<Arc<Value>> {
    if let Some(jwks) = &client.jwks {
        return Some(Arc::new(jwks.clone()));
    }
    let uri = client.jwks_uri.as_deref()?;
    let docs = &state.auth().documents;
    if let Some(keys) = docs.jwks.fresh(uri, wanting) {
        return Some(keys);
    }
    state.auth().lookups.charge().ok()?;
    match docs.fetcher.get_json(uri).await {
        Ok((keys, freshness)) => {
            metrics::counter!("oidc_client_jwks_fetched_total").increment(1);
            Some(docs.jwks.put(uri.to_owned(), keys, freshness.for_key_set()))
        }
        Err(e) => {
            tracing::info!(client_id = %client.client_id, error = %e, "client jwks_uri could not be fetched");
            None
        }
    }
}

/// The assertion's claims, when a key of `jwks` (the one named by `kid`, if any) verifies it.
fn verified(jwks: &Value, alg: &str, kid: Option<&str>, assertion: &str) -> Option<Value> {
    jwks.get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|k| kid.is_none_or(|kid| k.get("kid").and_then(Value::as_str) == Some(kid)))
        .find_map(|k| dpop::verify_with_jwk(alg, k, assertion))
}

/// Authenticates the client a `client_assertion` names.
pub async fn authenticate(
    state: &AppState,
    client_id: Option<&str>,
    assertion: &str,
    endpoint: &str,
) -> Result<Arc<OidcClient>, OAuthError> {
    let refuse = OAuthError::invalid_client;
    if assertion.len() > 8192 || assertion.split('.').count() != 3 {
        return Err(refuse());
    }
    let header = part(assertion, 0).ok_or_else(refuse)?;
    let unverified = part(assertion, 1).ok_or_else(refuse)?;
    let iss = unverified.get("iss").and_then(Value::as_str).ok_or_else(refuse)?.to_owned();
    if unverified.get("sub").and_then(Value::as_str) != Some(iss.as_str()) || client_id.is_some_and(|c| c != iss) {
        return Err(refuse());
    }
    let client = if iss.starts_with("https://") {
        super::metadata_document::client(state, &iss).await.map_err(|_| refuse())?
    } else {
        load_client(state, &iss).await?.ok_or_else(refuse)?
    };
    if client.auth_method != AuthMethod::PrivateKeyJwt {
        return Err(refuse());
    }
    let alg = header.get("alg").and_then(Value::as_str).ok_or_else(refuse)?;
    if !dpop::ALGS.contains(&alg) {
        return Err(refuse());
    }
    let kid = header.get("kid").and_then(Value::as_str);
    let jwks = keys_of(state, &client, false).await.ok_or_else(refuse)?;
    let claims = match verified(&jwks, alg, kid, assertion) {
        Some(c) => c,
        // The client may have rotated its keys since they were cached.
        None if client.jwks_uri.is_some() && client.jwks.is_none() => {
            let jwks = keys_of(state, &client, true).await.ok_or_else(refuse)?;
            verified(&jwks, alg, kid, assertion).ok_or_else(refuse)?
        }
        None => return Err(refuse()),
    };
    let base = &state.config().server.public_url;
    let accepted = [format!("{base}/api/v1/{endpoint}"), base.clone()];
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => accepted.contains(a),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(|a| accepted.iter().any(|x| x == a)),
        _ => false,
    };
    let now = state.clock().now().unix_timestamp();
    let exp = claims.get("exp").and_then(Value::as_i64).ok_or_else(refuse)?;
    let jti =
        claims.get("jti").and_then(Value::as_str).filter(|j| !j.is_empty() && j.len() <= 256).ok_or_else(refuse)?;
    if !aud_ok || exp <= now - 5 || exp > now + MAX_LIFETIME_SECS {
        return Err(refuse());
    }
    if claims.get("iat").and_then(Value::as_i64).is_some_and(|iat| iat > now + 60) {
        return Err(refuse());
    }
    if !dpop::once(state, "assertion:jti", &format!("{iss}\0{jti}"), (exp - now + 5).max(1) as u64).await {
        return Err(OAuthError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "invalid_client",
            "This client assertion was already used.",
        ));
    }
    Ok(client)
}
