//! The UserInfo endpoint (OIDC Core §5.3) and RP-initiated logout (`end_session_endpoint`).

use axum::{
    Json,
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde_json::{Value, json};

use super::{authorize, dpop, load_client, pages};
use crate::{
    auth::{
        credentials::{self, Invalidation},
        oauth::live_claims,
    },
    http::middleware::tls::Secure,
    state::AppState,
};

/// An RFC 6750 §3 refusal, with its challenge.
fn refuse(status: StatusCode, scheme: &str, error: &str, description: &str) -> Response {
    let mut r = (status, Json(json!({ "error": error, "error_description": description }))).into_response();
    let challenge = format!("{scheme} error=\"{error}\", error_description=\"{description}\"");
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// The presented access token and whether it came with the DPoP scheme.
fn presented(headers: &HeaderMap) -> Option<(String, bool)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        Some((token.trim().to_owned(), false))
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Some((token.trim().to_owned(), true))
    } else {
        None
    }
}

async fn userinfo(state: AppState, headers: HeaderMap, method: Method) -> Response {
    let Some((token, dpop_scheme)) = presented(&headers) else {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "Bearer",
            "invalid_request",
            "Send the access token in Authorization.",
        );
    };
    let claims = match live_claims(&state, &token).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "Bearer",
                "invalid_token",
                "The token is invalid, expired or revoked.",
            );
        }
        Err(e) => return e.into_response(),
    };
    if let Some(cnf) = &claims.cnf {
        if !dpop_scheme {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "DPoP",
                "invalid_token",
                "This token is DPoP-bound: use the DPoP scheme and a proof.",
            );
        }
        let url = format!("{}/oauth2/userinfo", state.config().server.public_url);
        let require_nonce = state.config().oidc.dpop_require_nonce;
        match dpop::verify(&state, &headers, &method, &url, Some(&token), require_nonce).await {
            Ok(Some(p)) if p.jkt == cnf.jkt => {}
            Ok(_) => {
                return refuse(
                    StatusCode::UNAUTHORIZED,
                    "DPoP",
                    "invalid_dpop_proof",
                    "A proof made with the token's key is required.",
                );
            }
            Err(dpop::Invalid::Proof(why)) => {
                return refuse(StatusCode::UNAUTHORIZED, "DPoP", "invalid_dpop_proof", why_str(why));
            }
            Err(dpop::Invalid::Nonce(_)) => {
                return refuse(StatusCode::UNAUTHORIZED, "DPoP", "use_dpop_nonce", "A server nonce is required.");
            }
        }
    } else if dpop_scheme {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "Bearer",
            "invalid_token",
            "This token is not DPoP-bound; use the Bearer scheme.",
        );
    }
    let scopes: Vec<&str> = claims.scopes().collect();
    let Some(user_id) = claims.sub.strip_prefix("user:").and_then(|u| u.parse::<uuid::Uuid>().ok()) else {
        return refuse(StatusCode::FORBIDDEN, "Bearer", "insufficient_scope", "This token is not a person's.");
    };
    if claims.actor_type != "human" || !scopes.contains(&"openid") {
        return refuse(StatusCode::FORBIDDEN, "Bearer", "insufficient_scope", "The token lacks the openid scope.");
    }
    let user = match sqlx::query!("select email, display_name, status from app_user where user_id = $1", user_id)
        .fetch_optional(state.db())
        .await
    {
        Ok(Some(u)) if u.status == "active" => u,
        Ok(_) => return refuse(StatusCode::UNAUTHORIZED, "Bearer", "invalid_token", "The account is not active."),
        Err(e) => return crate::auth::oauth::OAuthError::from(e).into_response(),
    };
    let mut body = json!({ "sub": claims.sub, "org_id": claims.org_id });
    if scopes.contains(&"email") {
        body["email"] = json!(user.email);
        body["email_verified"] = json!(false);
    }
    if scopes.contains(&"profile") {
        body["name"] = json!(user.display_name);
    }
    let mut r = Json(body).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn why_str(s: &str) -> &str {
    if s.contains('"') { "The proof is invalid." } else { s }
}

/// The claims of the person's access token, per its scopes (`sub`, `email`, `name`).
#[utoipa::path(get, path = "/oauth2/userinfo", tag = "oidc",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`sub`, plus `email` and `name` as the scopes allow", body = Value),
        (status = 401, description = "RFC 6750: invalid_token (or invalid_dpop_proof for a DPoP-bound token)", body = crate::auth::oauth::OAuthErrorBody),
        (status = 403, description = "insufficient_scope: not a person's token, or without `openid`", body = crate::auth::oauth::OAuthErrorBody)))]
pub(in crate::auth) async fn userinfo_get(State(state): State<AppState>, headers: HeaderMap) -> Response {
    userinfo(state, headers, Method::GET).await
}

/// The same as `GET /oauth2/userinfo`.
#[utoipa::path(post, path = "/oauth2/userinfo", tag = "oidc",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "`sub`, plus `email` and `name` as the scopes allow", body = Value),
        (status = 401, body = crate::auth::oauth::OAuthErrorBody),
        (status = 403, body = crate::auth::oauth::OAuthErrorBody)))]
pub(in crate::auth) async fn userinfo_post(State(state): State<AppState>, headers: HeaderMap) -> Response {
    userinfo(state, headers, Method::POST).await
}

/// The claims of one of our ID tokens, checked for signature and issuer only (a logout hint may
/// have expired).
fn id_token_claims(state: &AppState, token: &str) -> Option<Value> {
    let (signed, sig) = token.rsplit_once('.')?;
    let (h, c) = signed.split_once('.')?;
    let header: Value = serde_json::from_slice(&B64.decode(h).ok()?).ok()?;
    let set = state.keys().current()?;
    let verifier = set.verifiers.get(header.get("kid")?.as_str()?)?;
    if header.get("alg")?.as_str()? != verifier.algorithm().as_str() {
        return None;
    }
    if !verifier.verify(signed.as_bytes(), &B64.decode(sig).ok()?) {
        return None;
    }
    let claims: Value = serde_json::from_slice(&B64.decode(c).ok()?).ok()?;
    (claims.get("iss")?.as_str()? == state.config().server.public_url).then_some(claims)
}

/// RP-initiated logout (OpenID Connect RP-Initiated Logout 1.0): ends the session, then sends the
/// browser to `post_logout_redirect_uri` only if the client (from `client_id` or `id_token_hint`)
/// registered it exactly; otherwise shows a signed-out page.
#[utoipa::path(get, path = "/oauth2/logout", tag = "oidc",
    params(
        ("id_token_hint" = Option<String>, Query),
        ("client_id" = Option<String>, Query),
        ("post_logout_redirect_uri" = Option<String>, Query),
        ("state" = Option<String>, Query)),
    responses(
        (status = 200, description = "Signed out", content_type = "text/html"),
        (status = 302, description = "To the registered post_logout_redirect_uri, with state"),
        (status = 400, description = "A post_logout_redirect_uri not registered, or an id_token_hint not ours", content_type = "text/html")))]
pub(in crate::auth) async fn end_session(
    State(state): State<AppState>,
    axum::Extension(Secure(secure)): axum::Extension<Secure>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or("")).unwrap_or_default();
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let hint = match get("id_token_hint") {
        Some(t) => match id_token_claims(&state, &t) {
            Some(c) => Some(c),
            None => {
                return pages::error(
                    StatusCode::BAD_REQUEST,
                    "Sign-out failed",
                    "The id_token_hint was not issued here.",
                );
            }
        },
        None => None,
    };
    let client_id = get("client_id").or_else(|| hint.as_ref().and_then(|c| c.get("aud")?.as_str().map(str::to_owned)));
    let target = match get("post_logout_redirect_uri") {
        None => None,
        Some(uri) => {
            let client = match client_id.as_deref() {
                Some(id) => load_client(&state, id).await.ok().flatten(),
                None => None,
            };
            match client {
                Some(c) if c.post_logout_redirect_uris.contains(&uri) => Some(uri),
                _ => {
                    return pages::error(
                        StatusCode::BAD_REQUEST,
                        "Sign-out failed",
                        "The address to return to is not registered for this application.",
                    );
                }
            }
        }
    };
    // The session ends whoever asked: a sign-out link can only make someone sign in again.
    if let Some((user_id, session_id, hash)) = authorize::session_of(&state, &headers).await {
        let hinted_other = hint
            .as_ref()
            .and_then(|c| c.get("sub")?.as_str().map(str::to_owned))
            .is_some_and(|s| s != format!("user:{user_id}"));
        if !hinted_other {
            let ended = sqlx::query!(
                "update session set ended_at = now() where session_id = $1 and ended_at is null",
                session_id
            )
            .execute(state.db())
            .await;
            if let Err(e) = ended {
                tracing::warn!(error = %e, "ending a session at logout failed");
            }
            credentials::invalidate(&state.auth().cache, state.redis(), Invalidation::Credential(hash)).await;
        }
    }
    let clear = crate::auth::sessions::session_cookie("", 0, secure);
    match target {
        Some(uri) => {
            let st = get("state");
            let location = match st.as_deref() {
                Some(s) => authorize::with_params(&uri, &[("state", s)]),
                None => uri,
            };
            let mut r = StatusCode::FOUND.into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r.headers_mut().insert(header::SET_COOKIE, clear);
            r
        }
        None => {
            let nonce = pages::nonce();
            let mut h = pages::headers(&nonce, None, None);
            h.insert(header::SET_COOKIE, clear);
            pages::render(StatusCode::OK, &pages::LoggedOutPage { nonce: &nonce }, h)
        }
    }
}
