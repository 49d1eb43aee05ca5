//! `did:web` (W3C DID Core, and the did:web method's URL rule): the issuer is
//! `did:web:<host>` at `/.well-known/did.json`, an agent is `did:web:<host>:agents:<id>` at
//! `/agents/<id>/did.json`. The host is that of `server.public_url`, with a port's colon
//! percent-encoded as the method requires.
//!
//! Agents may register public keys (JWKs; private members are refused). They are the agent's
//! verification methods and can verify its RFC 7523 client assertions.

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use utoipa::ToSchema;
use uuid::Uuid;
use validator::Validate;

use crate::{
    audit::{self, Event},
    auth::{Actor, directory},
    http::{
        ApiError, ApiResult,
        error::Problem,
        extract::{ApiPath, ValidatedJson},
    },
    policy::Resource,
    state::AppState,
};

/// The media type of a DID document in JSON.
pub const DID_JSON: &str = "application/did+json";

/// The did:web method-specific id of this issuer: the public URL's host, `:` as `%3A`.
pub fn issuer_did(public_url: &str) -> String {
    let rest = public_url.split_once("://").map_or(public_url, |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest);
    format!("did:web:{}", host.replace(':', "%3A"))
}

/// An agent's DID.
pub fn agent_did(public_url: &str, agent_id: Uuid) -> String {
    format!("{}:agents:{agent_id}", issuer_did(public_url))
}

/// A DID document response, cacheable by resolvers for five minutes.
fn did_response(doc: Value) -> Response {
    let mut response = Json(doc).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(DID_JSON));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    response
}

fn verification_method(did: &str, kid: &str, jwk: &Value) -> Value {
    json!({
        "id": format!("{did}#{kid}"),
        "type": "JsonWebKey2020",
        "controller": did,
        "publicKeyJwk": jwk,
    })
}

const CONTEXT: [&str; 2] = ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/suites/jws-2020/v1"];

/// The issuer's DID document: one verification method per key of the JWKS.
#[utoipa::path(get, path = "/.well-known/did.json", tag = "trust",
    responses((status = 200, description = "The issuer's DID document", content_type = "application/did+json", body = Object)))]
pub(super) async fn issuer_did_document(State(state): State<AppState>) -> Response {
    let base = &state.config().server.public_url;
    let did = issuer_did(base);
    let keys = state.keys().current().map(|k| k.jwks.clone());
    let methods: Vec<Value> = keys
        .as_ref()
        .and_then(|k| k["keys"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|jwk| Some(verification_method(&did, jwk["kid"].as_str()?, jwk)))
        .collect();
    let ids: Vec<Value> = methods.iter().map(|m| m["id"].clone()).collect();
    did_response(json!({
        "@context": CONTEXT,
        "id": did,
        "verificationMethod": methods,
        "authentication": ids,
        "assertionMethod": ids,
        "service": [{
            "id": format!("{did}#oauth"),
            "type": "OAuthAuthorizationServer",
            "serviceEndpoint": format!("{base}/.well-known/oauth-authorization-server"),
        }],
    }))
}

/// An agent's DID document: its registered keys and its service endpoints. Suspended and unknown
/// agents do not resolve.
#[utoipa::path(get, path = "/agents/{id}/did.json", tag = "trust", params(("id" = Uuid, Path)),
    responses((status = 200, description = "The agent's DID document", content_type = "application/did+json", body = Object),
        (status = 404, body = Problem), (status = 429, body = Problem)))]
pub(super) async fn agent_did_document(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Response> {
    super::charge_public_read(&state)?;
    let agent = directory::agent_profile(state.db(), id).await?.filter(|a| a.active).ok_or(ApiError::NotFound)?;
    let base = &state.config().server.public_url;
    let did = agent_did(base, id);
    let keys = directory::agent_keys(state.db(), id).await?;
    let methods: Vec<Value> = keys.iter().map(|k| verification_method(&did, &k.kid, &k.public_jwk)).collect();
    let ids: Vec<Value> = methods.iter().map(|m| m["id"].clone()).collect();
    let mut services = vec![json!({
        "id": format!("{did}#token"),
        "type": "OAuth2TokenEndpoint",
        "serviceEndpoint": format!("{base}/api/v1/token"),
    })];
    if agent.listed_at.is_some() {
        services.push(json!({
            "id": format!("{did}#agent-card"),
            "type": "A2AAgentCard",
            "serviceEndpoint": super::cards::public_card_url(base, id),
        }));
    }
    Ok(did_response(json!({
        "@context": CONTEXT,
        "id": did,
        "controller": issuer_did(base),
        "verificationMethod": methods,
        "authentication": ids,
        "assertionMethod": ids,
        "service": services,
    })))
}

/// A public key to register.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAgentKey {
    /// The public JWK: `EC` on P-256, `OKP` Ed25519, or `RSA` of at least 2048 bits.
    #[schema(value_type = Object)]
    pub jwk: Value,
    /// Defaults to the key's RFC 7638 thumbprint (or the JWK's own `kid`).
    #[validate(length(min = 1, max = 200))]
    pub kid: Option<String>,
}

/// A registered public key.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentKey {
    pub kid: String,
    #[schema(value_type = Object)]
    pub jwk: Value,
    /// The verification method's id in the agent's DID document.
    pub verification_method: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

/// Why a JWK was refused, as the detail of a 422.
fn bad_key(detail: &'static str) -> ApiError {
    ApiError::Status { status: StatusCode::UNPROCESSABLE_ENTITY, code: "invalid_jwk", detail: detail.into() }
}

fn b64_len(v: &Value, name: &str) -> Result<usize, ApiError> {
    let s = v.get(name).and_then(Value::as_str).ok_or(bad_key("a required JWK member is missing"))?;
    B64.decode(s).map(|b| b.len()).map_err(|_| bad_key("a JWK member is not base64url"))
}

/// Checks a public JWK and keeps only its public members; returns it with its RFC 7638
/// thumbprint. Symmetric keys and any private member are refused.
pub fn public_jwk(jwk: &Value) -> Result<(Value, String), ApiError> {
    let obj = jwk.as_object().ok_or(bad_key("jwk must be a JSON object"))?;
    const PRIVATE: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];
    if PRIVATE.iter().any(|m| obj.contains_key(*m)) {
        return Err(bad_key("jwk carries private or symmetric key material: register the public key only"));
    }
    let kty = obj.get("kty").and_then(Value::as_str).ok_or(bad_key("jwk.kty is required"))?;
    let required: &[&str] = match kty {
        "EC" => {
            if obj.get("crv").and_then(Value::as_str) != Some("P-256") {
                return Err(bad_key("EC keys must be on P-256"));
            }
            if b64_len(jwk, "x")? != 32 || b64_len(jwk, "y")? != 32 {
                return Err(bad_key("P-256 coordinates are 32 bytes each"));
            }
            &["crv", "kty", "x", "y"]
        }
        "OKP" => {
            if obj.get("crv").and_then(Value::as_str) != Some("Ed25519") {
                return Err(bad_key("OKP keys must be Ed25519"));
            }
            if b64_len(jwk, "x")? != 32 {
                return Err(bad_key("an Ed25519 public key is 32 bytes"));
            }
            &["crv", "kty", "x"]
        }
        "RSA" => {
            if b64_len(jwk, "n")? < 256 {
                return Err(bad_key("RSA keys must be at least 2048 bits"));
            }
            if b64_len(jwk, "e")? > 8 {
                return Err(bad_key("RSA exponent too long"));
            }
            &["e", "kty", "n"]
        }
        _ => return Err(bad_key("jwk.kty must be EC, OKP or RSA")),
    };
    // The required members only.
    let mut members = Map::new();
    for m in required {
        members.insert((*m).to_owned(), obj[*m].clone());
    }
    let thumbprint =
        crate::crypto::jwk_thumbprint(&Value::Object(members.clone())).ok_or(bad_key("jwk members must be strings"))?;
    // Keep what verifiers need: the required members plus `alg` and `use` when given.
    for m in ["alg", "use"] {
        if let Some(v) = obj.get(m).filter(|v| v.as_str().is_some_and(|s| s.len() <= 20)) {
            members.insert(m.to_owned(), v.clone());
        }
    }
    Ok((Value::Object(members), thumbprint))
}

fn valid_kid(kid: &str) -> bool {
    !kid.is_empty() && kid.len() <= 200 && kid.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

async fn agent_for_change(state: &AppState, actor: &Actor, id: Uuid) -> ApiResult<directory::AgentProfile> {
    let org_id = actor.current_org()?;
    let agent =
        directory::agent_profile(state.db(), id).await?.filter(|a| a.org_id == org_id).ok_or(ApiError::NotFound)?;
    crate::policy::require(state, actor, "manage", Resource::Agent { org_id, owner_id: Some(agent.owner_id) }, id)?;
    Ok(agent)
}

fn present(state: &AppState, agent_id: Uuid, k: directory::AgentKey) -> AgentKey {
    let did = agent_did(&state.config().server.public_url, agent_id);
    AgentKey {
        verification_method: format!("{did}#{}", k.kid),
        kid: k.kid,
        jwk: k.public_jwk,
        created_at: k.created_at,
    }
}

/// The agent's registered public keys.
#[utoipa::path(get, path = "/api/v1/agents/{id}/keys", tag = "trust", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<AgentKey>), (status = 401, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn list_agent_keys(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<AgentKey>>> {
    let org_id = actor.current_org()?;
    directory::agent_profile(state.db(), id).await?.filter(|a| a.org_id == org_id).ok_or(ApiError::NotFound)?;
    let keys = directory::agent_keys(state.db(), id).await?;
    Ok(Json(keys.into_iter().map(|k| present(&state, id, k)).collect()))
}

/// Registers a public key for the agent: it appears in the agent's DID document at once.
#[utoipa::path(post, path = "/api/v1/agents/{id}/keys", tag = "trust", params(("id" = Uuid, Path)),
    request_body = NewAgentKey,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 201, body = AgentKey), (status = 403, body = Problem), (status = 404, body = Problem),
        (status = 409, body = Problem), (status = 422, body = Problem)))]
pub(super) async fn add_agent_key(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    ValidatedJson(req): ValidatedJson<NewAgentKey>,
) -> ApiResult<(StatusCode, Json<AgentKey>)> {
    let agent = agent_for_change(&state, &actor, id).await?;
    let (jwk, thumbprint) = public_jwk(&req.jwk)?;
    let kid = req.kid.or_else(|| req.jwk.get("kid").and_then(Value::as_str).map(str::to_owned)).unwrap_or(thumbprint);
    if !valid_kid(&kid) {
        return Err(bad_key("kid may hold letters, digits, '-', '_' and '.' only (at most 200)"));
    }
    let mut jwk = jwk;
    jwk["kid"] = json!(kid);
    let mut tx = state.db().begin().await?;
    // Counted under the agent's row lock, so parallel registrations cannot pass the limit.
    crate::auth::agents::brief_for_update(&mut tx, agent.org_id, id).await?.ok_or(ApiError::NotFound)?;
    let existing = directory::agent_keys(state.db(), id).await?.len();
    if existing >= state.config().trust.max_keys_per_agent as usize {
        return Err(ApiError::Status {
            status: StatusCode::CONFLICT,
            code: "too_many_keys",
            detail: "The agent has as many keys as it may; delete one first.".into(),
        });
    }
    let key = directory::add_agent_key(&mut tx, agent.org_id, id, &kid, &jwk)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.constraint() == Some("agent_key_kid_unique") => ApiError::Status {
                status: StatusCode::CONFLICT,
                code: "kid_taken",
                detail: "The agent already has a key with this kid.".into(),
            },
            _ => e.into(),
        })?
        .ok_or(ApiError::NotFound)?;
    audit::record(
        &mut tx,
        Event::by(&actor, agent.org_id, "agent.key_added").target("agent", id).details(json!({ "kid": kid })),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(present(&state, id, key))))
}

/// Removes one of the agent's public keys.
#[utoipa::path(delete, path = "/api/v1/agents/{id}/keys/{kid}", tag = "trust",
    params(("id" = Uuid, Path), ("kid" = String, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 204), (status = 403, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn delete_agent_key(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath((id, kid)): ApiPath<(Uuid, String)>,
) -> ApiResult<StatusCode> {
    let agent = agent_for_change(&state, &actor, id).await?;
    let mut tx = state.db().begin().await?;
    if !directory::delete_agent_key(&mut tx, agent.org_id, id, &kid).await? {
        return Err(ApiError::NotFound);
    }
    audit::record(
        &mut tx,
        Event::by(&actor, agent.org_id, "agent.key_removed").target("agent", id).details(json!({ "kid": kid })),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dids_follow_the_web_method_rule() {
        assert_eq!(issuer_did("https://idp.example.com"), "did:web:idp.example.com");
        assert_eq!(issuer_did("http://127.0.0.1:8080"), "did:web:127.0.0.1%3A8080");
        let id = Uuid::nil();
        assert_eq!(agent_did("https://idp.example.com/", id), format!("did:web:idp.example.com:agents:{id}"));
    }

    #[test]
    fn the_rfc_7638_example_thumbprint() {
        // RFC 7638 §3.1.
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        let (public, thumbprint) = public_jwk(&jwk).unwrap();
        assert_eq!(thumbprint, "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
        assert_eq!(public["alg"], "RS256");
        assert!(public.get("kid").is_none());
    }

    #[test]
    fn private_and_symmetric_keys_are_refused() {
        let x = B64.encode([7u8; 32]);
        assert!(public_jwk(&json!({"kty": "OKP", "crv": "Ed25519", "x": x, "d": x})).is_err());
        assert!(public_jwk(&json!({"kty": "oct", "k": x})).is_err());
        assert!(public_jwk(&json!({"kty": "EC", "crv": "P-384", "x": x, "y": x})).is_err());
        assert!(public_jwk(&json!({"kty": "OKP", "crv": "Ed25519", "x": "not base64!"})).is_err());
        assert!(public_jwk(&json!("a string")).is_err());
        assert!(public_jwk(&json!({"kty": "OKP", "crv": "Ed25519", "x": x})).is_ok());
    }
}
