//! OpenID Connect for people: clients, the authorization endpoint with its sign-in and consent
//! pages, the code and refresh grants, ID tokens, userinfo, logout and consents, driven by a
//! relying-party library we did not write (authlib), by a real browser, and by hand for the
//! attacks (code replay, PKCE downgrade, redirect URIs off by a slash or a port, refresh reuse,
//! mix-up), and DPoP.

use std::{collections::HashMap, time::Duration};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use reqwest::{Method, StatusCode, redirect::Policy};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::helpers::{ADMIN_EMAIL, Caller, PASSWORD, TestApp, assert_problem, json_ok, spawn_app_with};

/// The app on a port known before it starts, so that its issuer (`server.public_url`) is the URL
/// clients really reach.
pub async fn spawn_oidc(extra: &[(&str, Value)]) -> TestApp {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut all: Vec<(&str, Value)> = vec![
        ("server.bind", json!(format!("127.0.0.1:{port}"))),
        ("server.public_url", json!(format!("http://127.0.0.1:{port}"))),
    ];
    all.extend(extra.iter().cloned());
    spawn_app_with(&all).await
}

pub const CALLBACK: &str = "https://app.example/callback";

/// Registers a client in the caller's organization.
pub async fn register(app: &TestApp, admin: &Caller, body: Value) -> Value {
    json_ok(app.as_(admin, Method::POST, "/api/v1/clients").json(&body).send().await.unwrap(), StatusCode::CREATED)
        .await
}

pub async fn confidential(app: &TestApp, admin: &Caller) -> (String, String) {
    let c = register(app, admin, json!({ "name": "Example App", "redirect_uris": [CALLBACK] })).await;
    (c["client_id"].as_str().unwrap().to_owned(), c["client_secret"].as_str().unwrap().to_owned())
}

pub fn pkce() -> (String, String) {
    let verifier = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
    let challenge = B64.encode(Sha256::digest(verifier.as_bytes()));
    (verifier, challenge)
}

/// A browser without JavaScript: cookies, no automatic redirects.
pub fn user_agent() -> reqwest::Client {
    reqwest::Client::builder().cookie_store(true).redirect(Policy::none()).build().unwrap()
}

fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        rest = &rest[i..];
        let Some(end) = rest.find(';') else { break };
        let entity = &rest[1..end];
        let ch = match entity {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            e if e.starts_with("#x") => u32::from_str_radix(&e[2..], 16).ok().and_then(char::from_u32),
            e if e.starts_with('#') => e[1..].parse().ok().and_then(char::from_u32),
            _ => None,
        };
        match ch {
            Some(c) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!("{name}=\"");
    let i = tag.find(&needle)? + needle.len();
    let j = tag[i..].find('"')? + i;
    Some(unescape(&tag[i..j]))
}

/// The one form of a page: its action and its named inputs.
pub fn form(html: &str) -> (String, Vec<(String, String)>) {
    let start = html.find("<form").expect("a form");
    let tag_end = html[start..].find('>').unwrap() + start;
    let action = attr(&html[start..tag_end], "action").unwrap();
    let mut fields = Vec::new();
    let mut rest = &html[tag_end..];
    while let Some(i) = rest.find("<input") {
        let end = rest[i..].find('>').unwrap() + i;
        let tag = &rest[i..end];
        if let Some(n) = attr(tag, "name") {
            fields.push((n, attr(tag, "value").unwrap_or_default()));
        }
        rest = &rest[end..];
    }
    (action, fields)
}

pub fn query_of(location: &str) -> HashMap<String, String> {
    let url = url::Url::parse(location).unwrap();
    url.query_pairs().into_owned().collect()
}

/// An authorization URL with the given parameters.
pub fn authorize_url(app: &TestApp, params: &[(&str, &str)]) -> String {
    let mut url = url::Url::parse(&app.url("/oauth2/authorize")).unwrap();
    url.query_pairs_mut().extend_pairs(params);
    url.to_string()
}

/// Follows the sign-in and consent pages; returns the final response (the redirect back).
pub async fn sign_in_and_consent(ua: &reqwest::Client, app: &TestApp, url: &str, email: &str) -> reqwest::Response {
    let page = ua.get(url).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();
    assert!(html.contains("Sign in"), "{html}");
    let (action, mut fields) = form(&html);
    for (k, v) in fields.iter_mut() {
        if k == "email" {
            *v = email.to_owned();
        } else if k == "password" {
            *v = PASSWORD.to_owned();
        }
    }
    let next = ua.post(app.url(&action)).form(&fields).send().await.unwrap();
    if next.status() != StatusCode::OK {
        return next;
    }
    let html = next.text().await.unwrap();
    let (action, mut fields) = form(&html);
    fields.push(("decision".into(), "allow".into()));
    ua.post(app.url(&action)).form(&fields).send().await.unwrap()
}

/// A code for `client_id`, through sign-in and consent; returns (code, verifier, the redirect's query).
pub async fn code_for(
    app: &TestApp,
    client_id: &str,
    scope: &str,
    extra: &[(&str, &str)],
) -> (String, String, HashMap<String, String>) {
    let (verifier, challenge) = pkce();
    let mut params = vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", CALLBACK),
        ("scope", scope),
        ("state", "st-1"),
        ("nonce", "n-1"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    params.extend_from_slice(extra);
    let url = authorize_url(app, &params);
    let back = sign_in_and_consent(&user_agent(), app, &url, ADMIN_EMAIL).await;
    assert_eq!(back.status(), StatusCode::SEE_OTHER, "{}", back.text().await.unwrap());
    let location = back.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(CALLBACK), "{location}");
    let q = query_of(&location);
    (q.get("code").cloned().unwrap_or_default(), verifier, q)
}

pub async fn redeem(app: &TestApp, client: (&str, &str), code: &str, verifier: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/token"))
        .basic_auth(client.0, Some(client.1))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code_verifier", verifier),
            ("redirect_uri", CALLBACK),
        ])
        .send()
        .await
        .unwrap()
}

pub async fn oauth_error(resp: reqwest::Response, status: StatusCode, error: &str) -> Value {
    let got = resp.status();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    assert_eq!(got, status, "{body}");
    assert_eq!(body["error"], error, "{body}");
    body
}

fn claims_of(token: &str) -> Value {
    let part = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&B64.decode(part).unwrap()).unwrap()
}

fn venv_python() -> String {
    let out = std::process::Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/venv.sh"))
        .output()
        .expect("scripts/venv.sh runs");
    assert!(out.status.success(), "venv: {}", String::from_utf8_lossy(&out.stderr));
    format!("{}/bin/python", String::from_utf8(out.stdout).unwrap().trim())
}

#[tokio::test]
async fn authlib_signs_a_person_in_with_code_and_pkce_validates_the_id_token_refreshes_and_reads_userinfo() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let (client_id, secret) = confidential(&app, &admin).await;
    let python = venv_python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oidc_client.py");
    let args =
        [app.base.clone(), client_id.clone(), secret, CALLBACK.to_owned(), ADMIN_EMAIL.to_owned(), PASSWORD.to_owned()];
    let out = tokio::process::Command::new(python).arg(script).args(&args).output().await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "authlib client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let seen: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(seen["sub"], format!("user:{}", admin.user_id));
    assert_eq!(seen["email"], ADMIN_EMAIL);
    assert_eq!(seen["id_token_alg"], "ES256");
    // The refreshed access token is a person's RFC 9068 token for our API.
    let at = claims_of(seen["access_token"].as_str().unwrap());
    assert_eq!(at["actor_type"], "human");
    assert_eq!(at["client_id"], client_id);
    assert_eq!(at["org_id"], admin.org_id);
    // The first refresh token was spent by the refresh: presenting it again is reuse.
    let reuse = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth(&client_id, Some(&args[2]))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", seen["first_refresh_token"].as_str().unwrap())])
        .send()
        .await
        .unwrap();
    oauth_error(reuse, StatusCode::BAD_REQUEST, "invalid_grant").await;
    // ...which revoked the family, with the access token the library refreshed into.
    let info = app
        .client
        .get(app.url("/oauth2/userinfo"))
        .bearer_auth(seen["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(info.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn code_exchange_issues_id_token_refresh_and_a_code_replay_revokes_them() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let (id, secret) = confidential(&app, &admin).await;
    let (code, verifier, q) = code_for(&app, &id, "openid email offline_access", &[]).await;
    assert_eq!(q["state"], "st-1");
    assert_eq!(q["iss"], app.base, "RFC 9207 iss");
    assert!(code.starts_with("aidp_ac_"));
    let resp = redeem(&app, (&id, &secret), &code, &verifier).await;
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let tokens = json_ok(resp, StatusCode::OK).await;
    assert_eq!(tokens["token_type"], "Bearer");
    let idt = claims_of(tokens["id_token"].as_str().unwrap());
    for claim in ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "azp", "at_hash"] {
        assert!(!idt[claim].is_null(), "{claim} in {idt}");
    }
    assert_eq!(idt["nonce"], "n-1");
    assert_eq!(idt["email"], ADMIN_EMAIL);
    let h = Sha256::digest(tokens["access_token"].as_str().unwrap().as_bytes());
    assert_eq!(idt["at_hash"], B64.encode(&h[..16]));
    let access = tokens["access_token"].as_str().unwrap().to_owned();
    let refresh = tokens["refresh_token"].as_str().unwrap().to_owned();
    // The person's token works on our own API, as that person in that organization.
    let me =
        json_ok(app.client.get(app.url("/auth/me")).bearer_auth(&access).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(me["actor_id"], format!("user:{}", admin.user_id));
    assert_eq!(me["credential_type"], "access_token");

    // The same code again: refused, and what it issued dies with it.
    oauth_error(redeem(&app, (&id, &secret), &code, &verifier).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
    assert_eq!(app.me_status(&access).await, StatusCode::UNAUTHORIZED);
    let refreshed = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth(&id, Some(&secret))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", refresh.as_str())])
        .send()
        .await
        .unwrap();
    oauth_error(refreshed, StatusCode::BAD_REQUEST, "invalid_grant").await;
}

#[tokio::test]
async fn pkce_is_required_s256_only_and_a_wrong_verifier_is_refused() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let (id, secret) = confidential(&app, &admin).await;
    let ua = user_agent();
    let (_, challenge) = pkce();
    let base = [("response_type", "code"), ("client_id", id.as_str()), ("redirect_uri", CALLBACK), ("state", "s")];
    // No challenge, and the plain method: both refused at the redirect URI.
    for extra in [
        vec![],
        vec![("code_challenge", challenge.as_str()), ("code_challenge_method", "plain")],
        vec![("code_challenge", challenge.as_str())],
    ] {
        let mut params = base.to_vec();
        params.extend(extra);
        let r = ua.get(authorize_url(&app, &params)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FOUND);
        let q = query_of(r.headers()["location"].to_str().unwrap());
        assert_eq!(q["error"], "invalid_request", "{q:?}");
        assert_eq!(q["state"], "s");
        assert_eq!(q["iss"], app.base);
    }
    // A verifier that is not the code's.
    let (code, _, _) = code_for(&app, &id, "openid", &[]).await;
    let (other, _) = pkce();
    oauth_error(redeem(&app, (&id, &secret), &code, &other).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
    // Without a verifier at all.
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth(&id, Some(&secret))
        .form(&[("grant_type", "authorization_code"), ("code", code.as_str()), ("redirect_uri", CALLBACK)])
        .send()
        .await
        .unwrap();
    oauth_error(r, StatusCode::BAD_REQUEST, "invalid_request").await;
}

#[tokio::test]
async fn redirect_uris_match_exactly_and_unregistered_ones_get_a_page_not_a_redirect() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let c = register(&app, &admin, json!({ "name": "Local", "redirect_uris": ["http://127.0.0.1:8123/cb", CALLBACK] }))
        .await;
    let id = c["client_id"].as_str().unwrap();
    let ua = user_agent();
    let (_, challenge) = pkce();
    for bad in [
        "https://app.example/callback/",
        "https://app.example/callback?x=1",
        "http://127.0.0.1:8124/cb",
        "http://127.0.0.1:8123/cb/",
        "https://evil.example/callback",
        "https://app.example.evil.example/callback",
        "javascript:alert(1)",
    ] {
        let url = authorize_url(
            &app,
            &[
                ("response_type", "code"),
                ("client_id", id),
                ("redirect_uri", bad),
                ("code_challenge", &challenge),
                ("code_challenge_method", "S256"),
            ],
        );
        let r = ua.get(url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
        assert!(r.headers().get("location").is_none(), "{bad} redirected");
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        assert!(r.text().await.unwrap().contains("not registered"), "{bad}");
    }
    // An unknown client gets the page too, and so does an invalid request with no usable client.
    let r = ua
        .get(authorize_url(&app, &[("response_type", "code"), ("client_id", "nope"), ("redirect_uri", CALLBACK)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.headers().get("location").is_none());
    // At the token endpoint, a redirect_uri differing from the request's is invalid_grant.
    let secret = c["client_secret"].as_str().unwrap();
    let (code, verifier, _) = code_for(&app, id, "openid", &[]).await;
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth(id, Some(secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("code_verifier", verifier.as_str()),
            ("redirect_uri", "https://app.example/callback/"),
        ])
        .send()
        .await
        .unwrap();
    oauth_error(r, StatusCode::BAD_REQUEST, "invalid_grant").await;
}

#[tokio::test]
async fn errors_after_the_redirect_uri_is_known_go_back_to_it_with_state_and_iss() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let (id, _) = confidential(&app, &admin).await;
    let ua = user_agent();
    let (_, challenge) = pkce();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("response_type", "token")], "unsupported_response_type"),
        (vec![("response_type", "code"), ("scope", "openid agents:write")], "invalid_scope"),
        (vec![("response_type", "code"), ("resource", "https://elsewhere.example/")], "invalid_target"),
        (vec![("response_type", "code"), ("prompt", "none")], "login_required"),
        (vec![("response_type", "code"), ("prompt", "none login")], "invalid_request"),
        (vec![("response_type", "code"), ("max_age", "-1")], "invalid_request"),
        (vec![("response_type", "code"), ("request", "eyJ")], "request_not_supported"),
    ];
    for (extra, error) in cases {
        let mut params = vec![
            ("client_id", id.as_str()),
            ("redirect_uri", CALLBACK),
            ("state", "xyz"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ];
        params.extend(extra);
        let r = ua.get(authorize_url(&app, &params)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::FOUND, "{error}");
        let loc = r.headers()["location"].to_str().unwrap().to_owned();
        assert!(loc.starts_with(CALLBACK), "{loc}");
        let q = query_of(&loc);
        assert_eq!(q["error"], error);
        assert_eq!(q["state"], "xyz");
        assert_eq!(q["iss"], app.base);
    }
}

#[tokio::test]
async fn refresh_tokens_rotate_and_a_reused_one_revokes_the_whole_family() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let (id, secret) = confidential(&app, &admin).await;
    let (code, verifier, _) = code_for(&app, &id, "openid offline_access", &[]).await;
    let first = json_ok(redeem(&app, (&id, &secret), &code, &verifier).await, StatusCode::OK).await;
    let refresh = |token: String| {
        let (app, id, secret) = (&app, id.clone(), secret.clone());
        async move {
            app.client
                .post(app.url("/api/v1/token"))
                .basic_auth(&id, Some(&secret))
                .form(&[("grant_type", "refresh_token"), ("refresh_token", token.as_str())])
                .send()
                .await
                .unwrap()
        }
    };
    let second = json_ok(refresh(first["refresh_token"].as_str().unwrap().to_owned()).await, StatusCode::OK).await;
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert!(!second["id_token"].is_null());
    let third = json_ok(refresh(second["refresh_token"].as_str().unwrap().to_owned()).await, StatusCode::OK).await;
    let live = third["access_token"].as_str().unwrap();
    assert_eq!(app.me_status(live).await, StatusCode::OK);
    // The first token, stolen and replayed: the family dies, the newest tokens too.
    oauth_error(
        refresh(first["refresh_token"].as_str().unwrap().to_owned()).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await;
    oauth_error(
        refresh(third["refresh_token"].as_str().unwrap().to_owned()).await,
        StatusCode::BAD_REQUEST,
        "invalid_grant",
    )
    .await;
    assert_eq!(app.me_status(live).await, StatusCode::UNAUTHORIZED);
    // Another client cannot use a refresh token it was not issued.
    let (other, other_secret) = confidential(&app, &admin).await;
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth(&other, Some(&other_secret))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", first["refresh_token"].as_str().unwrap())])
        .send()
        .await
        .unwrap();
    oauth_error(r, StatusCode::BAD_REQUEST, "invalid_grant").await;
}

#[tokio::test]
async fn codes_expire_after_sixty_seconds_on_the_application_clock() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let (id, secret) = confidential(&app, &admin).await;
    let (code, verifier, _) = code_for(&app, &id, "openid", &[]).await;
    app.state.clock().set(time::OffsetDateTime::now_utc() + time::Duration::seconds(61));
    oauth_error(redeem(&app, (&id, &secret), &code, &verifier).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
}

#[tokio::test]
async fn remembered_consent_skips_the_page_and_can_be_listed_and_withdrawn() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let (id, secret) = confidential(&app, &admin).await;
    let ua = user_agent();
    let (verifier, challenge) = pkce();
    let params = [
        ("response_type", "code"),
        ("client_id", id.as_str()),
        ("redirect_uri", CALLBACK),
        ("scope", "openid profile"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let url = authorize_url(&app, &params);
    let back = sign_in_and_consent(&ua, &app, &url, ADMIN_EMAIL).await;
    assert_eq!(back.status(), StatusCode::SEE_OTHER);
    let q = query_of(back.headers()["location"].to_str().unwrap());
    let tokens = json_ok(redeem(&app, (&id, &secret), &q["code"], &verifier).await, StatusCode::OK).await;
    // Signed in and allowed: straight back, even with prompt=none.
    let mut quiet = params.to_vec();
    quiet.push(("prompt", "none"));
    let again = ua.get(authorize_url(&app, &quiet)).send().await.unwrap();
    assert_eq!(again.status(), StatusCode::FOUND);
    assert!(query_of(again.headers()["location"].to_str().unwrap()).contains_key("code"));
    // A wider scope needs consent again, which prompt=none cannot ask for.
    let mut wider = quiet.clone();
    wider[3] = ("scope", "openid profile email");
    let r = ua.get(authorize_url(&app, &wider)).send().await.unwrap();
    assert_eq!(query_of(r.headers()["location"].to_str().unwrap())["error"], "consent_required");
    // prompt=login shows the sign-in page though a session exists.
    let mut login = params.to_vec();
    login.push(("prompt", "login"));
    let r = ua.get(authorize_url(&app, &login)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.text().await.unwrap().contains("password"));

    let list = json_ok(app.as_(&admin, Method::GET, "/api/v1/me/consents").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["client_id"], id);
    assert_eq!(list[0]["scopes"], json!(["openid", "profile"]));
    let gone = app.as_(&admin, Method::DELETE, &format!("/api/v1/me/consents/{id}")).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::NO_CONTENT);
    // Withdrawn: the refresh token is dead and the page asks again.
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth(&id, Some(&secret))
        .form(&[("grant_type", "refresh_token"), ("refresh_token", tokens["refresh_token"].as_str().unwrap())])
        .send()
        .await
        .unwrap();
    oauth_error(r, StatusCode::BAD_REQUEST, "invalid_grant").await;
    let r = ua.get(authorize_url(&app, &quiet)).send().await.unwrap();
    assert_eq!(query_of(r.headers()["location"].to_str().unwrap())["error"], "consent_required");
    let again = app.as_(&admin, Method::DELETE, &format!("/api/v1/me/consents/{id}")).send().await.unwrap();
    assert_problem(again, StatusCode::NOT_FOUND, "not_found").await;
}

#[tokio::test]
async fn the_sign_in_page_is_strict_checks_csrf_and_a_wrong_password_is_throttled() {
    let app = spawn_oidc(&[("auth.login_max_failures_account", json!(2))]).await;
    let admin = app.bootstrap().await;
    let (id, _) = confidential(&app, &admin).await;
    let ua = user_agent();
    let (_, challenge) = pkce();
    let url = authorize_url(
        &app,
        &[
            ("response_type", "code"),
            ("client_id", id.as_str()),
            ("redirect_uri", CALLBACK),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
            ("state", "<script>alert(1)</script>"),
        ],
    );
    let page = ua.get(&url).send().await.unwrap();
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_owned();
    assert!(csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"), "{csp}");
    assert!(csp.contains("form-action 'self' https://app.example"), "{csp}");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let cookies: Vec<String> =
        page.headers().get_all("set-cookie").iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    assert!(
        cookies
            .iter()
            .any(|c| c.starts_with("agentidp_csrf=") && c.contains("SameSite=Strict") && c.contains("HttpOnly")),
        "{cookies:?}"
    );
    let html = page.text().await.unwrap();
    assert!(!html.contains("<script>"), "state is escaped");
    assert!(!html.contains("src=\"http"), "no external assets");
    let (action, fields) = form(&html);
    // Without the CSRF token, or with another one: refused.
    let mut forged = fields.clone();
    forged.retain(|(k, _)| k != "csrf_token");
    forged.push(("csrf_token".into(), "A".repeat(43)));
    let r = ua.post(app.url(&action)).form(&forged).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = user_agent().post(app.url(&action)).form(&fields).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "a form posted from a browser without the cookie");
    // Wrong passwords: the page again with 401, then the throttle's 429.
    let mut wrong = fields.clone();
    for (k, v) in wrong.iter_mut() {
        if k == "email" {
            *v = ADMIN_EMAIL.into();
        } else if k == "password" {
            *v = "wrong-password".into();
        }
    }
    let mut statuses = Vec::new();
    for _ in 0..3 {
        statuses.push(ua.post(app.url(&action)).form(&wrong).send().await.unwrap().status());
    }
    assert_eq!(statuses[0], StatusCode::UNAUTHORIZED);
    assert_eq!(statuses[2], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
}

#[tokio::test]
async fn clients_are_validated_shown_to_admins_of_their_org_only_and_deleting_one_revokes_its_tokens() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    for (body, field) in [
        (json!({ "name": "x", "redirect_uris": ["javascript:alert(1)"] }), "redirect_uris[0]"),
        (json!({ "name": "x", "redirect_uris": ["http://app.example/cb"] }), "redirect_uris[0]"),
        (json!({ "name": "x", "redirect_uris": [CALLBACK], "scopes": ["root"] }), "scopes[0]"),
        (
            json!({ "name": "x", "redirect_uris": [CALLBACK], "client_type": "public", "token_endpoint_auth_method": "client_secret_basic" }),
            "token_endpoint_auth_method",
        ),
        (json!({ "name": "x", "redirect_uris": [] }), "redirect_uris"),
    ] {
        let r = app.as_(&admin, Method::POST, "/api/v1/clients").json(&body).send().await.unwrap();
        let p = assert_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed").await;
        assert!(p["errors"].as_array().unwrap().iter().any(|e| e["field"] == field), "{p}");
    }
    let public = register(
        &app,
        &admin,
        json!({ "name": "CLI", "client_type": "public", "redirect_uris": ["http://127.0.0.1:9999/cb"] }),
    )
    .await;
    assert!(public["client_secret"].is_null());
    assert_eq!(public["token_endpoint_auth_method"], "none");
    let c = register(
        &app,
        &admin,
        json!({ "name": "Web", "redirect_uris": [CALLBACK], "logo_uri": "https://app.example/logo.png" }),
    )
    .await;
    let secret = c["client_secret"].as_str().unwrap();
    assert!(secret.starts_with("aidp_cs_"));
    let stored: Vec<u8> = sqlx::query_scalar("select secret_hash from oauth_client where client_id = $1")
        .bind(c["client_id"].as_str().unwrap())
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(stored, Sha256::digest(secret.as_bytes()).to_vec(), "only the hash is stored");
    let list = json_ok(app.as_(&admin, Method::GET, "/api/v1/clients").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(list.to_string().find("aidp_cs_").is_none(), "no secret in listings");
    // Another organization's admin sees nothing of it.
    let other = app.org_with_owner(&admin, "Other", "owner@other.test").await;
    let path = format!("/api/v1/clients/{}", c["id"].as_str().unwrap());
    for method in [Method::GET, Method::PATCH, Method::DELETE] {
        let mut r = app.as_(&other, method.clone(), &path).header("x-org-id", &other.org_id);
        if method == Method::PATCH {
            r = r.json(&json!({ "name": "mine" }));
        }
        assert_problem(r.send().await.unwrap(), StatusCode::NOT_FOUND, "not_found").await;
    }
    // Nor can its members sign in through it.
    let ua = user_agent();
    let (_, challenge) = pkce();
    let url = authorize_url(
        &app,
        &[
            ("response_type", "code"),
            ("client_id", c["client_id"].as_str().unwrap()),
            ("redirect_uri", CALLBACK),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    );
    let back = sign_in_and_consent(&ua, &app, &url, "owner@other.test").await;
    assert_eq!(query_of(back.headers()["location"].to_str().unwrap())["error"], "access_denied");
    // A token of the client dies with it.
    let id = c["client_id"].as_str().unwrap();
    let (code, verifier, _) = code_for(&app, id, "openid", &[]).await;
    let tokens = json_ok(redeem(&app, (id, secret), &code, &verifier).await, StatusCode::OK).await;
    let access = tokens["access_token"].as_str().unwrap();
    assert_eq!(app.me_status(access).await, StatusCode::OK);
    let r = app.as_(&admin, Method::DELETE, &path).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.me_status(access).await, StatusCode::UNAUTHORIZED);
    oauth_error(redeem(&app, (id, secret), &code, &verifier).await, StatusCode::UNAUTHORIZED, "invalid_client").await;
}

#[tokio::test]
async fn public_clients_use_pkce_alone_and_secrets_are_checked_by_the_registered_method() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let public =
        register(&app, &admin, json!({ "name": "CLI", "client_type": "public", "redirect_uris": [CALLBACK] })).await;
    let id = public["client_id"].as_str().unwrap();
    let (code, verifier, _) = code_for(&app, id, "openid offline_access", &[]).await;
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("client_id", id),
            ("code", code.as_str()),
            ("code_verifier", verifier.as_str()),
            ("redirect_uri", CALLBACK),
        ])
        .send()
        .await
        .unwrap();
    let tokens = json_ok(r, StatusCode::OK).await;
    assert!(tokens["refresh_token"].is_string());
    // A confidential client without its secret, or with the method it did not register.
    let (cid, secret) = confidential(&app, &admin).await;
    let (code, verifier, _) = code_for(&app, &cid, "openid", &[]).await;
    let base = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("code_verifier", verifier.as_str()),
        ("redirect_uri", CALLBACK),
    ];
    let mut none = base.to_vec();
    none.push(("client_id", cid.as_str()));
    let r = app.client.post(app.url("/api/v1/token")).form(&none).send().await.unwrap();
    oauth_error(r, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let mut post = none.clone();
    post.push(("client_secret", secret.as_str()));
    let r = app.client.post(app.url("/api/v1/token")).form(&post).send().await.unwrap();
    oauth_error(r, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth(&cid, Some("aidp_cs_wrong"))
        .form(&base)
        .send()
        .await
        .unwrap();
    oauth_error(r, StatusCode::UNAUTHORIZED, "invalid_client").await;
    // The code survived those attempts: the right client still redeems it.
    json_ok(redeem(&app, (&cid, &secret), &code, &verifier).await, StatusCode::OK).await;
}

#[tokio::test]
async fn discovery_lists_the_openid_endpoints_truthfully() {
    let app = spawn_oidc(&[]).await;
    let meta = json_ok(app.get("/.well-known/openid-configuration").await, StatusCode::OK).await;
    assert_eq!(meta["issuer"], app.base);
    assert_eq!(meta["authorization_endpoint"], app.url("/oauth2/authorize"));
    assert_eq!(meta["userinfo_endpoint"], app.url("/oauth2/userinfo"));
    assert_eq!(meta["end_session_endpoint"], app.url("/oauth2/logout"));
    assert_eq!(meta["code_challenge_methods_supported"], json!(["S256"]));
    assert_eq!(meta["response_types_supported"], json!(["code"]));
    assert_eq!(meta["authorization_response_iss_parameter_supported"], true);
    assert_eq!(meta["client_id_metadata_document_supported"], true);
    assert!(meta["grant_types_supported"].as_array().unwrap().contains(&json!("refresh_token")));
    assert!(meta["dpop_signing_alg_values_supported"].as_array().unwrap().contains(&json!("ES256")));
    assert!(meta["claims_supported"].as_array().unwrap().contains(&json!("at_hash")));
    // Every endpoint named is served.
    for key in ["authorization_endpoint", "userinfo_endpoint", "jwks_uri", "end_session_endpoint"] {
        let r = app.client.get(meta[key].as_str().unwrap()).send().await.unwrap();
        assert_ne!(r.status(), StatusCode::NOT_FOUND, "{key}");
        assert_ne!(r.status(), StatusCode::INTERNAL_SERVER_ERROR, "{key}");
    }
    let pr = json_ok(app.get("/.well-known/oauth-protected-resource").await, StatusCode::OK).await;
    assert_eq!(pr["authorization_servers"], json!([app.base]));
    // A 401 from our API names the metadata (RFC 9728 §5.1).
    let r = app.get("/auth/me").await;
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.contains(&format!("resource_metadata=\"{}/.well-known/oauth-protected-resource\"", app.base)),
        "{challenge}"
    );
}

#[tokio::test]
async fn userinfo_and_logout() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let c = register(
        &app,
        &admin,
        json!({ "name": "Web", "redirect_uris": [CALLBACK], "post_logout_redirect_uris": ["https://app.example/bye"] }),
    )
    .await;
    let (id, secret) = (c["client_id"].as_str().unwrap(), c["client_secret"].as_str().unwrap());
    let (code, verifier, _) = code_for(&app, id, "openid email profile", &[]).await;
    let tokens = json_ok(redeem(&app, (id, secret), &code, &verifier).await, StatusCode::OK).await;
    let access = tokens["access_token"].as_str().unwrap();
    let info =
        json_ok(app.client.get(app.url("/oauth2/userinfo")).bearer_auth(access).send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(info["sub"], format!("user:{}", admin.user_id));
    assert_eq!(info["email"], ADMIN_EMAIL);
    let info =
        json_ok(app.client.post(app.url("/oauth2/userinfo")).bearer_auth(access).send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(info["sub"], format!("user:{}", admin.user_id));
    let r = app.client.get(app.url("/oauth2/userinfo")).bearer_auth("not-a-token").send().await.unwrap();
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("invalid_token"));
    oauth_error(r, StatusCode::UNAUTHORIZED, "invalid_token").await;
    // An agent's token is not a person's.
    let agent = app.agent_client(&admin, &["agents:read"]).await;
    let r =
        app.client.get(app.url("/oauth2/userinfo")).bearer_auth(app.access_token(&agent).await).send().await.unwrap();
    oauth_error(r, StatusCode::FORBIDDEN, "insufficient_scope").await;

    // Logout: to a registered address only, with state; the session ends.
    let ua = user_agent();
    let (_, challenge) = pkce();
    let url = authorize_url(
        &app,
        &[
            ("response_type", "code"),
            ("client_id", id),
            ("redirect_uri", CALLBACK),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    );
    sign_in_and_consent(&ua, &app, &url, ADMIN_EMAIL).await;
    let id_token = tokens["id_token"].as_str().unwrap();
    let bad = format!(
        "{}?id_token_hint={id_token}&post_logout_redirect_uri=https://evil.example/",
        app.url("/oauth2/logout")
    );
    let r = ua.get(&bad).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.headers().get("location").is_none());
    let good = format!(
        "{}?id_token_hint={id_token}&post_logout_redirect_uri=https://app.example/bye&state=s9",
        app.url("/oauth2/logout")
    );
    let r = ua.get(&good).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FOUND);
    assert_eq!(r.headers()["location"], "https://app.example/bye?state=s9");
    // Signed out: prompt=none now needs a login.
    let mut quiet = url::Url::parse(&url).unwrap();
    quiet.query_pairs_mut().append_pair("prompt", "none");
    let r = ua.get(quiet.as_str()).send().await.unwrap();
    assert_eq!(query_of(r.headers()["location"].to_str().unwrap())["error"], "login_required");
}

/// A tiny HTTP listener standing in for the application's callback: answers 200 and reports the
/// query of the first request.
async fn callback_listener() -> (String, tokio::sync::oneshot::Receiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        loop {
            let Ok((mut sock, _)) = listener.accept().await else { return };
            let mut buf = vec![0u8; 8192];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let head = String::from_utf8_lossy(&buf[..n]).to_string();
            let target = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            let body = "<html><body><p id=\"done\">Signed in</p></body></html>";
            let _ = sock
                .write_all(format!("HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len()).as_bytes())
                .await;
            if target.starts_with("/cb")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(target);
            }
        }
    });
    (format!("http://127.0.0.1:{}/cb", addr.port()), rx)
}

#[tokio::test]
async fn a_real_browser_goes_from_authorize_through_sign_in_and_consent_to_the_callback() {
    use crate::helpers::browser::Browser;
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let (callback, got) = callback_listener().await;
    let c =
        register(&app, &admin, json!({ "name": "Browser App", "redirect_uris": [callback], "client_type": "public" }))
            .await;
    let id = c["client_id"].as_str().unwrap();
    let (verifier, challenge) = pkce();
    let url = authorize_url(
        &app,
        &[
            ("response_type", "code"),
            ("client_id", id),
            ("redirect_uri", callback.as_str()),
            ("scope", "openid email"),
            ("state", "browser-state"),
            ("code_challenge", challenge.as_str()),
            ("code_challenge_method", "S256"),
        ],
    );
    let browser = Browser::start(1024, 800).await;
    browser.goto(&url).await;
    let email = browser.wait_for("#email", Duration::from_secs(20)).await;
    browser.fill(&email, ADMIN_EMAIL).await;
    let password = browser.find("#password").await;
    browser.fill(&password, PASSWORD).await;
    browser.screenshot("oidc-sign-in").await;
    browser.click(&browser.find("#sign-in").await).await;
    let allow = browser.wait_for("#allow", Duration::from_secs(20)).await;
    let scopes = browser.text(&browser.find("#scopes").await).await;
    assert!(scopes.contains("email"), "{scopes}");
    browser.screenshot("oidc-consent").await;
    browser.click(&allow).await;
    let landed = browser.wait_for_url(Duration::from_secs(20), |u| u.starts_with(&callback)).await;
    let target = tokio::time::timeout(Duration::from_secs(10), got).await.unwrap().unwrap();
    let q = query_of(&format!("http://x{target}"));
    assert_eq!(q["state"], "browser-state");
    assert_eq!(q["iss"], app.base);
    assert!(landed.contains("code="));
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("client_id", id),
            ("code", q["code"].as_str()),
            ("code_verifier", verifier.as_str()),
            ("redirect_uri", callback.as_str()),
        ])
        .send()
        .await
        .unwrap();
    let tokens = json_ok(r, StatusCode::OK).await;
    assert_eq!(claims_of(tokens["id_token"].as_str().unwrap())["email"], ADMIN_EMAIL);
}

#[tokio::test]
async fn bad_input_to_the_new_endpoints_is_never_a_server_error() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let (id, secret) = confidential(&app, &admin).await;
    let long = "a".repeat(5000);
    for q in [
        "%ZZ",
        "client_id=&redirect_uri=",
        "client_id=x&client_id=y",
        &format!("client_id={long}"),
        "response_type=code&client_id=\u{0}",
    ] {
        let r = app.client.get(format!("{}?{q}", app.url("/oauth2/authorize"))).send().await.unwrap();
        assert!(r.status().is_client_error(), "{q}: {}", r.status());
    }
    // Each refusal is a status the OpenAPI document lists for the page, with or without a form.
    let doc = serde_json::to_value(agentidp::http::openapi::document()).unwrap();
    let long_email = format!("email={long}");
    for (content_type, body) in [
        (Some("application/x-www-form-urlencoded"), ""),
        (Some("application/x-www-form-urlencoded"), "csrf_token=x"),
        (Some("application/x-www-form-urlencoded"), "%%%"),
        (Some("application/x-www-form-urlencoded"), long_email.as_str()),
        (Some("application/json"), "{}"),
        (None, ""),
    ] {
        for path in ["/oauth2/login", "/oauth2/consent"] {
            let mut req = app.client.post(app.url(path)).body(body.to_owned());
            if let Some(t) = content_type {
                req = req.header("content-type", t);
            }
            let r = req.send().await.unwrap();
            assert!(r.status().is_client_error(), "{path} {content_type:?} {body:.20}: {}", r.status());
            let documented = &doc["paths"][path]["post"]["responses"][r.status().as_str()];
            assert!(documented.is_object(), "{path} answered {} to {content_type:?}, undocumented", r.status());
        }
    }
    for form in [
        vec![("grant_type", "authorization_code")],
        vec![("grant_type", "authorization_code"), ("code", "x"), ("code_verifier", "short")],
        vec![("grant_type", "authorization_code"), ("code", long.as_str()), ("code_verifier", &long[..64])],
        vec![("grant_type", "refresh_token")],
        vec![("grant_type", "refresh_token"), ("refresh_token", "nope"), ("scope", "root")],
    ] {
        let r =
            app.client.post(app.url("/api/v1/token")).basic_auth(&id, Some(&secret)).form(&form).send().await.unwrap();
        assert!(r.status().is_client_error(), "{form:?}: {}", r.status());
    }
    let r = app.client.get(format!("{}?id_token_hint=a.b.c", app.url("/oauth2/logout"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = app.as_(&admin, Method::POST, "/api/v1/clients").json(&json!({ "name": 5 })).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn private_key_jwt_clients_authenticate_with_signed_assertions_used_once() {
    use crate::dpop::DpopKey;
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let key = DpopKey::new();
    let c = register(
        &app,
        &admin,
        json!({
            "name": "Signed",
            "redirect_uris": [CALLBACK],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks": { "keys": [key.public_jwk("k1")] },
        }),
    )
    .await;
    assert!(c["client_secret"].is_null());
    let id = c["client_id"].as_str().unwrap();
    let token_url = app.url("/api/v1/token");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let assertion = |signer: &DpopKey, aud: &str, exp: i64| {
        signer.sign(
            json!({ "alg": "ES256", "typ": "JWT", "kid": "k1" }),
            json!({ "iss": id, "sub": id, "aud": aud, "exp": exp, "iat": now, "jti": uuid::Uuid::new_v4().to_string() }),
        )
    };
    let (code, verifier, _) = code_for(&app, id, "openid", &[]).await;
    let redeem_with = |a: String| {
        let (code, verifier) = (code.clone(), verifier.clone());
        let app = &app;
        async move {
            app.client
                .post(app.url("/api/v1/token"))
                .form(&[
                    ("grant_type", "authorization_code"),
                    ("code", code.as_str()),
                    ("code_verifier", verifier.as_str()),
                    ("redirect_uri", CALLBACK),
                    ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                    ("client_assertion", a.as_str()),
                ])
                .send()
                .await
                .unwrap()
        }
    };
    // Another key, another audience, expired, or too long-lived: refused.
    for bad in [
        assertion(&DpopKey::new(), &token_url, now + 60),
        assertion(&key, "https://elsewhere.example/token", now + 60),
        assertion(&key, &token_url, now - 60),
        assertion(&key, &token_url, now + 7200),
    ] {
        oauth_error(redeem_with(bad).await, StatusCode::UNAUTHORIZED, "invalid_client").await;
    }
    let good = assertion(&key, &token_url, now + 60);
    json_ok(redeem_with(good.clone()).await, StatusCode::OK).await;
    // The same assertion again is refused before the code is even looked at.
    oauth_error(redeem_with(good).await, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let meta = json_ok(app.get("/.well-known/openid-configuration").await, StatusCode::OK).await;
    assert!(meta["token_endpoint_auth_methods_supported"].as_array().unwrap().contains(&json!("private_key_jwt")));
}

#[tokio::test]
async fn dynamic_registration_is_off_by_default_and_on_with_an_initial_access_token() {
    let app = spawn_oidc(&[]).await;
    let meta = json_ok(app.get("/.well-known/openid-configuration").await, StatusCode::OK).await;
    assert!(meta.get("registration_endpoint").is_none(), "{meta}");
    let r = app.post_json("/oauth2/register", &json!({ "redirect_uris": [CALLBACK] })).await;
    oauth_error(r, StatusCode::NOT_FOUND, "invalid_request").await;

    let first = spawn_oidc(&[]).await;
    let admin = first.bootstrap().await;
    let mut cfg = first.config.clone();
    cfg.server.bind = "127.0.0.1:0".parse().unwrap();
    cfg.oidc.registration.enabled = true;
    cfg.oidc.registration.organization = admin.org_id.clone();
    cfg.oidc.registration.initial_access_token = agentidp::config::Secret::new("initial-token-for-tests");
    let app = crate::helpers::spawn_on(cfg, None).await;
    let meta = json_ok(app.get("/.well-known/openid-configuration").await, StatusCode::OK).await;
    assert_eq!(meta["registration_endpoint"], format!("{}/oauth2/register", first.base));
    let post = |body: Value, token: Option<&str>| {
        let mut r = app.client.post(app.url("/oauth2/register")).json(&body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let good = json!({ "client_name": "Legacy", "redirect_uris": [CALLBACK], "grant_types": ["authorization_code", "refresh_token"], "scope": "openid email" });
    oauth_error(post(good.clone(), None).await.unwrap(), StatusCode::UNAUTHORIZED, "invalid_token").await;
    oauth_error(post(good.clone(), Some("wrong")).await.unwrap(), StatusCode::UNAUTHORIZED, "invalid_token").await;
    let t = Some("initial-token-for-tests");
    let js = json!({ "redirect_uris": ["javascript:alert(document.cookie)"] });
    oauth_error(post(js, t).await.unwrap(), StatusCode::BAD_REQUEST, "invalid_redirect_uri").await;
    let wide = json!({ "redirect_uris": [CALLBACK], "scope": "openid agents:write" });
    oauth_error(post(wide, t).await.unwrap(), StatusCode::BAD_REQUEST, "invalid_client_metadata").await;
    let implicit = json!({ "redirect_uris": [CALLBACK], "response_types": ["token"] });
    oauth_error(post(implicit, t).await.unwrap(), StatusCode::BAD_REQUEST, "invalid_client_metadata").await;
    let r = app
        .client
        .post(app.url("/oauth2/register"))
        .bearer_auth("initial-token-for-tests")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    oauth_error(r, StatusCode::BAD_REQUEST, "invalid_client_metadata").await;

    let reg = json_ok(post(good, t).await.unwrap(), StatusCode::CREATED).await;
    let id = reg["client_id"].as_str().unwrap().to_owned();
    let secret = reg["client_secret"].as_str().unwrap().to_owned();
    let rat = reg["registration_access_token"].as_str().unwrap().to_owned();
    assert_eq!(reg["registration_client_uri"], format!("{}/oauth2/register/{id}", first.base));
    // The registered client signs a person in like any other.
    let (code, verifier, _) = code_for(&app, &id, "openid email", &[]).await;
    json_ok(redeem(&app, (&id, &secret), &code, &verifier).await, StatusCode::OK).await;
    // RFC 7592: read with the registration access token only.
    let path = format!("/oauth2/register/{id}");
    let r = app.client.get(app.url(&path)).bearer_auth("aidp_rat_wrong").send().await.unwrap();
    oauth_error(r, StatusCode::UNAUTHORIZED, "invalid_token").await;
    let read = json_ok(app.client.get(app.url(&path)).bearer_auth(&rat).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(read["client_name"], "Legacy");
    let put = |body: Value| app.client.put(app.url(&path)).bearer_auth(&rat).json(&body).send();
    let changed = json_ok(put(json!({ "client_name": "Legacy 2", "redirect_uris": [CALLBACK, "https://app.example/other"], "scope": "openid email" })).await.unwrap(), StatusCode::OK).await;
    assert_eq!(changed["client_name"], "Legacy 2");
    assert_eq!(changed["redirect_uris"].as_array().unwrap().len(), 2);
    oauth_error(
        put(json!({ "redirect_uris": ["javascript:void(0)"] })).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_redirect_uri",
    )
    .await;
    oauth_error(
        put(json!({ "redirect_uris": [CALLBACK], "token_endpoint_auth_method": "none" })).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_client_metadata",
    )
    .await;
    // Unused for longer than reap_idle_days: reaped, and the client learns it must register again.
    app.state.clock().set(time::OffsetDateTime::now_utc() + time::Duration::days(31));
    assert_eq!(agentidp::auth::oidc::registration::reap(&app.state).await.unwrap(), 1);
    app.state.clock().set(time::OffsetDateTime::now_utc());
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth(&id, Some(&secret))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", "x"),
            ("code_verifier", &"a".repeat(43)),
            ("redirect_uri", CALLBACK),
        ])
        .send()
        .await
        .unwrap();
    oauth_error(r, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let r = app.client.get(app.url(&path)).bearer_auth(&rat).send().await.unwrap();
    oauth_error(r, StatusCode::UNAUTHORIZED, "invalid_token").await;
    // A second registration, deleted by its own token.
    let reg = json_ok(
        post(json!({ "redirect_uris": [CALLBACK], "token_endpoint_auth_method": "none" }), t).await.unwrap(),
        StatusCode::CREATED,
    )
    .await;
    assert!(reg["client_secret"].is_null());
    let path = format!("/oauth2/register/{}", reg["client_id"].as_str().unwrap());
    let r = app
        .client
        .delete(app.url(&path))
        .bearer_auth(reg["registration_access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn open_registration_is_limited_per_address() {
    let first = spawn_oidc(&[]).await;
    let admin = first.bootstrap().await;
    let mut cfg = first.config.clone();
    cfg.server.bind = "127.0.0.1:0".parse().unwrap();
    cfg.oidc.registration.enabled = true;
    cfg.oidc.registration.open = true;
    cfg.oidc.registration.per_ip = 2;
    cfg.oidc.registration.organization = admin.org_id.clone();
    let app = crate::helpers::spawn_on(cfg, None).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(app.post_json("/oauth2/register", &json!({ "redirect_uris": [CALLBACK] })).await.status());
    }
    assert_eq!(statuses[..2], [StatusCode::CREATED, StatusCode::CREATED]);
    assert_eq!(statuses[3], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
}
