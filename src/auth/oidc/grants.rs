//! The token endpoint's grants for people: `authorization_code` (one-time, 60 s codes bound to
//! the client, the redirect URI and the PKCE verifier) and `refresh_token` (rotated on every use,
//! a reused token revoking its whole family), with OpenID Connect ID tokens.

use std::sync::Arc;

use axum::{
    Json,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::Serialize;
use sha2::{Digest, Sha256, Sha512};
use time::{Duration, OffsetDateTime};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{AuthMethod, OidcClient, authorize::pkce_shaped, load_client};
use crate::{
    auth::{
        keys::Algorithm,
        oauth::{Form, OAuthError, client_secret, no_store},
        revocation::{self, Announced},
        tokens::{self, Audience, Claims, Confirmation},
    },
    crypto,
    state::AppState,
};

/// The prefix of refresh tokens.
pub const REFRESH_PREFIX: &str = "aidp_rt_";

/// The token response for people (RFC 6749 §5.1, OpenID Connect Core §3.1.3.3).
#[derive(Serialize, ToSchema)]
pub struct PersonTokenResponse {
    pub access_token: String,
    /// `Bearer`, or `DPoP` for a DPoP-bound token.
    pub token_type: &'static str,
    pub expires_in: u64,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

fn invalid_grant(d: &str) -> OAuthError {
    OAuthError::new(StatusCode::BAD_REQUEST, "invalid_grant", d)
}

/// Authenticates an OpenID client by the method it registered: a secret (Basic or post), a
/// private-key JWT assertion (RFC 7523), or none (a public client naming itself).
pub(in crate::auth) async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
    endpoint: &str,
) -> Result<Arc<OidcClient>, OAuthError> {
    if let Some(t) = form.params.get("client_assertion_type") {
        if t != super::assertion::JWT_BEARER || client_secret(headers, form)?.is_some() {
            return Err(OAuthError::invalid_client());
        }
        let assertion = form
            .params
            .get("client_assertion")
            .ok_or_else(|| OAuthError::invalid_request("client_assertion is required."))?;
        let id = form.params.get("client_id").map(String::as_str);
        return super::assertion::authenticate(state, id, assertion, endpoint).await;
    }
    let presented = client_secret(headers, form)?;
    let (id, secret, basic) = match presented {
        Some((id, secret, basic)) => (id, Some(secret), basic),
        None => (form.params.get("client_id").cloned().ok_or_else(OAuthError::invalid_client)?, None, false),
    };
    let client = if id.starts_with("https://") {
        super::metadata_document::client(state, &id).await.map_err(|e| {
            tracing::debug!(error = %e, "metadata document refused at the token endpoint");
            OAuthError::invalid_client()
        })?
    } else {
        match load_client(state, &id).await? {
            Some(c) => c,
            None => return Err(OAuthError::invalid_client()),
        }
    };
    let ok = match (client.auth_method, secret) {
        (AuthMethod::None, None) => true,
        (AuthMethod::ClientSecretBasic, Some(s)) if basic => secret_matches(&client, &s),
        (AuthMethod::ClientSecretPost, Some(s)) if !basic => secret_matches(&client, &s),
        _ => false,
    };
    if ok { Ok(client) } else { Err(OAuthError::invalid_client()) }
}

fn secret_matches(client: &OidcClient, secret: &str) -> bool {
    client.secret_hash.as_ref().is_some_and(|h| crypto::ct_eq(h, &crypto::sha256(secret)))
}

/// What a grant issues tokens for.
struct Subject {
    org_id: Uuid,
    user_id: Uuid,
    scope: String,
    resources: Vec<String>,
    auth_time: OffsetDateTime,
    nonce: Option<String>,
    session_id: Option<Uuid>,
    family: Uuid,
    jkt: Option<String>,
}

/// The tokens of one grant, and what revokes them.
struct Issued {
    response: PersonTokenResponse,
    jti: Uuid,
    exp: i64,
}

/// The left half of the hash of `token` that the ID token's algorithm uses (OIDC Core §3.1.3.6).
pub fn half_hash(alg: Algorithm, token: &str) -> String {
    match alg {
        Algorithm::EdDSA => {
            let h = Sha512::digest(token.as_bytes());
            B64.encode(&h[..32])
        }
        _ => {
            let h = Sha256::digest(token.as_bytes());
            B64.encode(&h[..16])
        }
    }
}

#[derive(Serialize)]
struct IdTokenClaims<'a> {
    iss: &'a str,
    sub: String,
    aud: &'a str,
    exp: i64,
    iat: i64,
    auth_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    acr: &'static str,
    amr: [&'static str; 1],
    azp: &'a str,
    at_hash: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    sid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email_verified: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    org_id: Uuid,
}

/// The `acr` of a password sign-in.
pub const ACR_PASSWORD: &str = "urn:agentidp:acr:password";

/// Signs the access token, the ID token (with `openid`) and a new refresh token of `family`
/// (when the client may refresh), recording the refresh token in `tx`.
async fn issue(
    state: &AppState,
    tx: &mut sqlx::PgConnection,
    client: &OidcClient,
    s: &Subject,
) -> Result<Issued, OAuthError> {
    let cfg = state.config();
    let now = state.clock().now();
    let iat = now.unix_timestamp();
    let ttl = client.access_ttl;
    let aud = match s.resources.as_slice() {
        [] => Audience::One(cfg.audience()),
        [one] => Audience::One(one.clone()),
        many => Audience::Many(many.to_vec()),
    };
    let jti = Uuid::new_v4();
    let claims = Claims {
        iss: cfg.server.public_url.clone(),
        sub: format!("user:{}", s.user_id),
        aud,
        exp: iat + ttl as i64,
        iat,
        nbf: iat,
        jti,
        client_id: client.client_id.clone(),
        scope: s.scope.clone(),
        org_id: s.org_id,
        actor_type: "human".into(),
        cid: client.id,
        act: None,
        delegation_id: None,
        cnf: s.jkt.clone().map(|jkt| Confirmation { jkt }),
    };
    let signing_failed = |e: anyhow::Error| {
        tracing::error!(error = %e, "signing failed");
        OAuthError::server_error()
    };
    let (access_token, alg) = tokens::sign_jwt(state.keys(), "at+jwt", iat, &claims).map_err(signing_failed)?;
    let scopes: Vec<&str> = s.scope.split(' ').collect();
    let id_token = if scopes.contains(&"openid") {
        let user = sqlx::query!("select email, display_name from app_user where user_id = $1", s.user_id)
            .fetch_one(&mut *tx)
            .await?;
        let email = scopes.contains(&"email");
        let id = IdTokenClaims {
            iss: &cfg.server.public_url,
            sub: format!("user:{}", s.user_id),
            aud: &client.client_id,
            exp: iat + ttl as i64,
            iat,
            auth_time: s.auth_time.unix_timestamp(),
            nonce: s.nonce.as_deref(),
            acr: ACR_PASSWORD,
            amr: ["pwd"],
            azp: &client.client_id,
            at_hash: half_hash(alg, &access_token),
            sid: s.session_id.map(|id| id.to_string()),
            email: email.then(|| user.email.clone()),
            email_verified: email.then_some(false),
            name: if scopes.contains(&"profile") { user.display_name.clone() } else { None },
            org_id: s.org_id,
        };
        Some(tokens::sign_jwt(state.keys(), "JWT", iat, &id).map_err(signing_failed)?.0)
    } else {
        None
    };
    let refresh_token = if client.allows_grant("refresh_token") && client.refresh_ttl > 0 {
        let token = crypto::random_token(REFRESH_PREFIX);
        sqlx::query!(
            "insert into oauth_refresh_token (refresh_token_id, token_hash, family_id, client_id, organization_id,
                 user_id, scope, resources, auth_time, jkt, access_jti, access_exp, expires_at)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            Uuid::now_v7(),
            &crypto::sha256(&token)[..],
            s.family,
            client.client_id,
            s.org_id,
            s.user_id,
            s.scope,
            &s.resources,
            s.auth_time,
            // Only a public client's refresh token is bound to its key (RFC 9449 §5).
            if client.auth_method == AuthMethod::None { s.jkt.clone() } else { None },
            jti,
            iat + ttl as i64,
            now + Duration::seconds(client.refresh_ttl as i64)
        )
        .execute(&mut *tx)
        .await?;
        Some(token)
    } else {
        None
    };
    if client.org_id.is_some() {
        sqlx::query!("update oauth_client set last_used_at = now() where oauth_client_id = $1", client.id)
            .execute(&mut *tx)
            .await?;
    }
    metrics::counter!("tokens_issued_total", "grant_type" => "authorization_code").increment(1);
    state.analytics().record(crate::analytics::Event {
        org_id: s.org_id,
        kind: crate::analytics::Kind::TokenIssued,
        actor_id: Some(format!("user:{}", s.user_id)),
        client_id: Some(client.client_id.clone()),
        method: "POST".into(),
        route: "/api/v1/token".into(),
        status: 200,
        latency_us: 0,
        at: now,
    });
    Ok(Issued {
        response: PersonTokenResponse {
            access_token,
            token_type: if s.jkt.is_some() { "DPoP" } else { "Bearer" },
            expires_in: ttl,
            scope: s.scope.clone(),
            refresh_token,
            id_token,
        },
        jti,
        exp: iat + ttl as i64,
    })
}

/// Revokes every refresh token of `family` and the access tokens they issued; returns the access
/// tokens to announce after commit.
async fn revoke_family(
    tx: &mut sqlx::PgConnection,
    family: Uuid,
    org_id: Uuid,
) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
    let rows = sqlx::query!(
        "update oauth_refresh_token set revoked_at = coalesce(revoked_at, now()) where family_id = $1
         returning access_jti, access_exp",
        family
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        revocation::revoke_jti(tx, r.access_jti, org_id, r.access_exp).await?;
        out.push((r.access_jti, r.access_exp));
    }
    Ok(out)
}

async fn announce_all(state: &AppState, revoked: Vec<(Uuid, i64)>) {
    for (jti, exp) in revoked {
        revocation::announce(state, Announced::Jti { jti, exp }).await;
    }
}

/// The organization's token quota and the client's rate, as for agents.
async fn charge(state: &AppState, org_id: Uuid, client_id: &str) -> Result<HeaderMap, OAuthError> {
    let (tier, charged, limit_headers) = crate::tiers::charge_token(state, org_id, client_id).await;
    if let Some(refusal) = charged.refused {
        let error = if refusal == crate::tiers::Refusal::Rate { "too_many_requests" } else { "quota_exceeded" };
        return Err(OAuthError::new(
            StatusCode::TOO_MANY_REQUESTS,
            error,
            crate::tiers::refusal_detail(refusal, &tier),
        )
        .with_headers(limit_headers));
    }
    Ok(limit_headers)
}

fn respond(issued: Issued, mut extra: HeaderMap) -> Response {
    let mut response = Json(issued.response).into_response();
    no_store(response.headers_mut());
    response.headers_mut().extend(extra.drain());
    response
}

/// The RFC 8707 resources of a token request: those granted, or fewer of them; when the grant
/// named none, any resource served here.
fn narrowed(state: &AppState, granted: &[String], asked: &[String]) -> Result<Vec<String>, OAuthError> {
    if asked.is_empty() {
        return Ok(granted.to_vec());
    }
    let ok = asked
        .iter()
        .all(|r| if granted.is_empty() { super::authorize::resource_served(state, r) } else { granted.contains(r) });
    if !ok {
        return Err(OAuthError::new(StatusCode::BAD_REQUEST, "invalid_target", "This resource was not granted here."));
    }
    let mut out: Vec<String> = Vec::new();
    for r in asked {
        if !out.contains(r) {
            out.push(r.clone());
        }
    }
    Ok(out)
}

/// `grant_type=authorization_code`.
pub(in crate::auth) async fn authorization_code(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
) -> Result<Response, OAuthError> {
    let client = authenticate(state, headers, form, "token").await?;
    if !client.allows_grant("authorization_code") {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "This client may not use this grant.",
        ));
    }
    let p = &form.params;
    let code = p.get("code").ok_or_else(|| OAuthError::invalid_request("code is required."))?;
    let verifier =
        p.get("code_verifier").ok_or_else(|| OAuthError::invalid_request("code_verifier is required (PKCE)."))?;
    if !pkce_shaped(verifier) {
        return Err(OAuthError::invalid_request("code_verifier must be 43 to 128 unreserved characters."));
    }
    let dpop = super::dpop::at_token_endpoint(state, headers).await?;
    let mut tx = state.db().begin().await?;
    let Some(row) = sqlx::query!(
        "select client_id, organization_id, user_id, session_id, redirect_uri, code_challenge, scope, nonce, resources,
                auth_time, expires_at, used_at, access_jti, refresh_family
         from oauth_code where code_hash = $1 for update",
        &crypto::sha256(code)[..]
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Err(invalid_grant("The code is unknown or expired."));
    };
    if row.used_at.is_some() {
        // A replay: whoever holds the code now may not be its owner. Everything it issued dies.
        let mut revoked = match row.refresh_family {
            Some(f) => revoke_family(&mut tx, f, row.organization_id).await?,
            None => Vec::new(),
        };
        if let Some(jti) = row.access_jti {
            let exp = state.clock().now().unix_timestamp() + client.access_ttl as i64;
            revocation::revoke_jti(&mut tx, jti, row.organization_id, exp).await?;
            revoked.push((jti, exp));
        }
        tx.commit().await?;
        announce_all(state, revoked).await;
        metrics::counter!("oidc_code_replays_total").increment(1);
        return Err(invalid_grant("The code was already used; what it issued is revoked."));
    }
    if row.expires_at <= state.clock().now() {
        return Err(invalid_grant("The code is unknown or expired."));
    }
    if row.client_id != client.client_id {
        return Err(invalid_grant("The code was issued to another client."));
    }
    if p.get("redirect_uri").is_none_or(|u| *u != row.redirect_uri) {
        return Err(invalid_grant("redirect_uri differs from the authorization request's."));
    }
    let computed = B64.encode(Sha256::digest(verifier.as_bytes()));
    if !crypto::ct_eq(computed.as_bytes(), row.code_challenge.as_bytes()) {
        return Err(invalid_grant("The code_verifier does not match the code_challenge."));
    }
    let resources = narrowed(state, &row.resources, &form.resources)?;
    let limit_headers = charge(state, row.organization_id, &client.client_id).await?;
    let family = Uuid::now_v7();
    let subject = Subject {
        org_id: row.organization_id,
        user_id: row.user_id,
        scope: row.scope,
        resources,
        auth_time: row.auth_time,
        nonce: row.nonce,
        session_id: row.session_id,
        family,
        jkt: dpop.as_ref().map(|d| d.jkt.clone()),
    };
    let issued = issue(state, &mut tx, &client, &subject).await?;
    sqlx::query!(
        "update oauth_code set used_at = now(), access_jti = $2, access_exp = $3, refresh_family = $4 where code_hash = $1",
        &crypto::sha256(code)[..],
        issued.jti,
        issued.exp,
        family
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut extra = limit_headers;
    if let Some(d) = dpop {
        extra.extend(d.headers);
    }
    Ok(respond(issued, extra))
}

/// `grant_type=refresh_token`: a new access token and a new refresh token; the old one is spent.
pub(in crate::auth) async fn refresh_token(
    state: &AppState,
    headers: &HeaderMap,
    form: &Form,
) -> Result<Response, OAuthError> {
    let client = authenticate(state, headers, form, "token").await?;
    if !client.allows_grant("refresh_token") {
        return Err(OAuthError::new(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "This client may not use this grant.",
        ));
    }
    let presented =
        form.params.get("refresh_token").ok_or_else(|| OAuthError::invalid_request("refresh_token is required."))?;
    let dpop = super::dpop::at_token_endpoint(state, headers).await?;
    let mut tx = state.db().begin().await?;
    let Some(row) = sqlx::query!(
        "select r.refresh_token_id, r.family_id, r.client_id, r.organization_id, r.user_id, r.scope, r.resources,
                r.auth_time, r.jkt, r.expires_at, r.used_at, r.revoked_at, u.status
         from oauth_refresh_token r join app_user u using (user_id) where r.token_hash = $1 for update of r",
        &crypto::sha256(presented)[..]
    )
    .fetch_optional(&mut *tx)
    .await?
    else {
        return Err(invalid_grant("The refresh token is unknown."));
    };
    if row.client_id != client.client_id {
        return Err(invalid_grant("The refresh token was issued to another client."));
    }
    if row.used_at.is_some() {
        // Reuse: one of the two holders is not the client. The whole family dies.
        let revoked = revoke_family(&mut tx, row.family_id, row.organization_id).await?;
        tx.commit().await?;
        announce_all(state, revoked).await;
        metrics::counter!("oidc_refresh_reuse_total").increment(1);
        return Err(invalid_grant("The refresh token was already used; its family is revoked."));
    }
    if row.revoked_at.is_some() || row.expires_at <= state.clock().now() || row.status != "active" {
        return Err(invalid_grant("The refresh token is revoked or expired."));
    }
    if let Some(bound) = &row.jkt
        && dpop.as_ref().is_none_or(|d| &d.jkt != bound)
    {
        return Err(invalid_grant("The refresh token is bound to a DPoP key; send a proof made with it."));
    }
    let scope = match form.params.get("scope") {
        None => row.scope.clone(),
        Some(asked) => {
            let had: Vec<&str> = row.scope.split(' ').collect();
            let mut out: Vec<&str> = Vec::new();
            for s in asked.split(' ').filter(|s| !s.is_empty()) {
                if !had.contains(&s) {
                    return Err(OAuthError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_scope",
                        "A refresh cannot widen the scope.",
                    ));
                }
                if !out.contains(&s) {
                    out.push(s);
                }
            }
            out.join(" ")
        }
    };
    let resources = narrowed(state, &row.resources, &form.resources)?;
    let limit_headers = charge(state, row.organization_id, &client.client_id).await?;
    sqlx::query!("update oauth_refresh_token set used_at = now() where refresh_token_id = $1", row.refresh_token_id)
        .execute(&mut *tx)
        .await?;
    let subject = Subject {
        org_id: row.organization_id,
        user_id: row.user_id,
        scope,
        resources,
        auth_time: row.auth_time,
        nonce: None,
        session_id: None,
        family: row.family_id,
        jkt: dpop.as_ref().map(|d| d.jkt.clone()).or(row.jkt),
    };
    let issued = issue(state, &mut tx, &client, &subject).await?;
    tx.commit().await?;
    let mut extra = limit_headers;
    if let Some(d) = dpop {
        extra.extend(d.headers);
    }
    Ok(respond(issued, extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_hash_is_the_left_half() {
        // OpenID Connect Core, A.3: the at_hash of this access token.
        assert_eq!(
            half_hash(Algorithm::RS256, "jHkWEdUXMU1BwAsC4vtUsZwnNvTIxEl0z9K3vx5KF0Y"),
            "77QmUPtjPfzWtF2AnpK9RQ"
        );
    }
}
