//! Client ID metadata documents: an MCP-style client whose `client_id` is an https URL, served
//! here by a local HTTPS server (the client's own site, a third party), signs a person in and
//! obtains a token for a resource named with `resource`; documents that are huge, slow, redirect,
//! name another client or list foreign redirect URIs are refused; `Cache-Control` is honoured. A
//! `private_key_jwt` client's `jwks_uri`, on the same site, is fetched by the same guarded fetcher
//! and cached, and fetched again early (at most every 30 s) when a key is not in the cached set.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode as AxStatus, header},
    response::{IntoResponse, Response},
    routing::get,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    dpop::DpopKey,
    helpers::{ADMIN_EMAIL, TestApp, json_ok},
    oidc::{
        CALLBACK, authorize_url, oauth_error, pkce, query_of, register, sign_in_and_consent, spawn_oidc, user_agent,
    },
};

const RESOURCE: &str = "https://mcp.example/mcp";

#[derive(Clone)]
struct Site {
    origin: String,
    hits: Arc<AtomicUsize>,
    /// The key set the site serves at `/jwks`, and how often it was fetched.
    jwks: Arc<Mutex<Value>>,
    jwks_hits: Arc<AtomicUsize>,
}

async fn jwks(State(site): State<Site>) -> Response {
    site.jwks_hits.fetch_add(1, Ordering::SeqCst);
    let keys = site.jwks.lock().unwrap().clone();
    with_cache(keys, "max-age=600")
}

fn doc(site: &Site, path: &str) -> Value {
    json!({
        "client_id": format!("{}{path}", site.origin),
        "client_name": "Claude-like MCP Client",
        "client_uri": site.origin,
        "redirect_uris": [format!("{}/callback", site.origin)],
        "grant_types": ["authorization_code", "refresh_token"],
        "token_endpoint_auth_method": "none",
        "scope": "openid profile offline_access",
    })
}

fn with_cache(body: Value, cache: &'static str) -> Response {
    let mut r = Json(body).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    r
}

async fn client_doc(State(site): State<Site>) -> Response {
    site.hits.fetch_add(1, Ordering::SeqCst);
    with_cache(doc(&site, "/client"), "public, max-age=60")
}

async fn nostore_doc(State(site): State<Site>) -> Response {
    site.hits.fetch_add(1, Ordering::SeqCst);
    with_cache(doc(&site, "/nostore"), "no-store")
}

async fn huge_doc(State(site): State<Site>) -> Response {
    let mut d = doc(&site, "/huge");
    d["padding"] = json!("x".repeat(20_000));
    Json(d).into_response()
}

async fn slow_doc(State(site): State<Site>) -> Response {
    tokio::time::sleep(Duration::from_secs(5)).await;
    Json(doc(&site, "/slow")).into_response()
}

async fn redirecting(State(site): State<Site>) -> Response {
    let mut h = HeaderMap::new();
    h.insert(header::LOCATION, HeaderValue::from_str(&format!("{}/client", site.origin)).unwrap());
    (AxStatus::FOUND, h).into_response()
}

async fn other_id(State(site): State<Site>) -> Response {
    Json(doc(&site, "/client")).into_response()
}

async fn foreign_redirect(State(site): State<Site>) -> Response {
    let mut d = doc(&site, "/foreign");
    d["redirect_uris"] = json!(["https://evil.example/callback"]);
    Json(d).into_response()
}

async fn with_secret(State(site): State<Site>) -> Response {
    let mut d = doc(&site, "/secret");
    d["token_endpoint_auth_method"] = json!("client_secret_basic");
    Json(d).into_response()
}

async fn scripted(State(site): State<Site>) -> Response {
    let mut d = doc(&site, "/scripted");
    d["redirect_uris"] = json!(["javascript:alert(1)"]);
    Json(d).into_response()
}

/// The client's site over HTTPS on localhost, with a certificate the app is told to trust.
async fn client_site() -> (Site, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let ca_file = std::env::temp_dir().join(format!("agentidp-cimd-{}.pem", uuid::Uuid::new_v4().simple()));
    std::fs::write(&ca_file, cert.cert.pem()).unwrap();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        cert.cert.pem().into_bytes(),
        cert.key_pair.serialize_pem().into_bytes(),
    )
    .await
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let site = Site {
        origin: format!("https://localhost:{port}"),
        hits: Arc::default(),
        jwks: Arc::new(Mutex::new(json!({ "keys": [] }))),
        jwks_hits: Arc::default(),
    };
    let app = Router::new()
        .route("/client", get(client_doc))
        .route("/nostore", get(nostore_doc))
        .route("/huge", get(huge_doc))
        .route("/slow", get(slow_doc))
        .route("/redirect", get(redirecting))
        .route("/other", get(other_id))
        .route("/foreign", get(foreign_redirect))
        .route("/secret", get(with_secret))
        .route("/scripted", get(scripted))
        .route("/jwks", get(jwks))
        .with_state(site.clone());
    tokio::spawn(async move {
        let _ = axum_server::from_tcp_rustls(listener, tls).unwrap().serve(app.into_make_service()).await;
    });
    (site, ca_file.to_string_lossy().into_owned())
}

async fn app_trusting(ca_file: &str) -> TestApp {
    spawn_oidc(&[
        ("oidc.metadata_documents.allow_private_networks", json!(true)),
        ("oidc.metadata_documents.ca_file", json!(ca_file)),
        ("oidc.metadata_documents.timeout_ms", json!(700)),
        ("auth.allowed_resources", json!([RESOURCE])),
    ])
    .await
}

fn params<'a>(client_id: &'a str, redirect: &'a str, challenge: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("response_type", "code"),
        ("client_id", client_id),
        ("redirect_uri", redirect),
        ("scope", "openid offline_access"),
        ("state", "mcp"),
        ("resource", RESOURCE),
        ("code_challenge", challenge),
        ("code_challenge_method", "S256"),
    ]
}

#[tokio::test]
async fn an_mcp_client_with_a_metadata_document_obtains_a_token_for_a_resource() {
    let (site, ca) = client_site().await;
    let app = app_trusting(&ca).await;
    app.bootstrap().await;
    let client_id = format!("{}/client", site.origin);
    let redirect = format!("{}/callback", site.origin);
    let (verifier, challenge) = pkce();
    let ua = user_agent();
    let url = authorize_url(&app, &params(&client_id, &redirect, &challenge));
    let page = ua.get(&url).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let back = sign_in_and_consent(&ua, &app, &url, ADMIN_EMAIL).await;
    assert_eq!(back.status(), StatusCode::SEE_OTHER);
    let location = back.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&redirect), "{location}");
    let q = query_of(&location);
    assert_eq!(q["iss"], app.base);
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("client_id", client_id.as_str()),
            ("code", q["code"].as_str()),
            ("code_verifier", verifier.as_str()),
            ("redirect_uri", redirect.as_str()),
            ("resource", RESOURCE),
        ])
        .send()
        .await
        .unwrap();
    let tokens = json_ok(r, StatusCode::OK).await;
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            tokens["access_token"].as_str().unwrap().split('.').nth(1).unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["aud"], RESOURCE);
    assert_eq!(claims["client_id"], client_id);
    assert_eq!(claims["actor_type"], "human");
    // The consent page read its name from the document, and the document was cached (max-age=60):
    // the page, the sign-in form, the consent form and the token request fetched it once.
    assert_eq!(site.hits.load(Ordering::SeqCst), 1);
    // A resource not served here is refused at the token endpoint as at the authorization one.
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .form(&[
            ("grant_type", "refresh_token"),
            ("client_id", client_id.as_str()),
            ("refresh_token", tokens["refresh_token"].as_str().unwrap()),
            ("resource", "https://elsewhere.example/"),
        ])
        .send()
        .await
        .unwrap();
    oauth_error(r, StatusCode::BAD_REQUEST, "invalid_target").await;
}

#[tokio::test]
async fn no_store_documents_are_fetched_every_time() {
    let (site, ca) = client_site().await;
    let app = app_trusting(&ca).await;
    let client_id = format!("{}/nostore", site.origin);
    let redirect = format!("{}/callback", site.origin);
    let (_, challenge) = pkce();
    for _ in 0..3 {
        let r = user_agent().get(authorize_url(&app, &params(&client_id, &redirect, &challenge))).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    assert_eq!(site.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn huge_slow_redirecting_and_mismatched_documents_are_refused() {
    let (site, ca) = client_site().await;
    let app = app_trusting(&ca).await;
    let (_, challenge) = pkce();
    let redirect = format!("{}/callback", site.origin);
    for (path, says) in [
        ("/huge", "larger than"),
        ("/slow", "too long"),
        ("/redirect", "redirect"),
        ("/other", "not the URL"),
        ("/foreign", "origin"),
        ("/secret", "token_endpoint_auth_method"),
        ("/scripted", "redirect URI is refused"),
        ("/missing", "answered 404"),
    ] {
        let client_id = format!("{}{path}", site.origin);
        let r = user_agent().get(authorize_url(&app, &params(&client_id, &redirect, &challenge))).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        assert!(r.headers().get("location").is_none(), "{path} must not redirect");
        let html = r.text().await.unwrap();
        assert!(html.contains(says), "{path}: {html}");
        // And at the token endpoint, such a client is no client.
        let t = app
            .client
            .post(app.url("/api/v1/token"))
            .form(&[
                ("grant_type", "authorization_code"),
                ("client_id", client_id.as_str()),
                ("code", "x"),
                ("code_verifier", &"a".repeat(43)),
                ("redirect_uri", redirect.as_str()),
            ])
            .send()
            .await
            .unwrap();
        oauth_error(t, StatusCode::UNAUTHORIZED, "invalid_client").await;
    }
}

#[tokio::test]
async fn private_addresses_are_refused_unless_allowed() {
    let (site, ca) = client_site().await;
    let app = spawn_oidc(&[("oidc.metadata_documents.ca_file", json!(ca))]).await;
    let (_, challenge) = pkce();
    let redirect = format!("{}/callback", site.origin);
    for client_id in [
        format!("{}/client", site.origin),
        "https://127.0.0.1/client".to_owned(),
        "https://169.254.169.254/latest".to_owned(),
    ] {
        let r = user_agent().get(authorize_url(&app, &params(&client_id, &redirect, &challenge))).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{client_id}");
        assert!(r.headers().get("location").is_none());
    }
    assert_eq!(site.hits.load(Ordering::SeqCst), 0, "nothing was fetched");
}

#[tokio::test]
async fn a_clients_jwks_uri_is_cached_and_fetched_again_for_a_new_key_at_most_every_30_seconds() {
    let (site, ca) = client_site().await;
    let app = app_trusting(&ca).await;
    let admin = app.bootstrap().await;
    let (k1, k2, k3) = (DpopKey::new(), DpopKey::new(), DpopKey::new());
    *site.jwks.lock().unwrap() = json!({ "keys": [k1.public_jwk("k1")] });
    let c = register(
        &app,
        &admin,
        json!({
            "name": "Signed elsewhere",
            "redirect_uris": [CALLBACK],
            "token_endpoint_auth_method": "private_key_jwt",
            "jwks_uri": format!("{}/jwks", site.origin),
        }),
    )
    .await;
    let id = c["client_id"].as_str().unwrap().to_owned();
    let token_url = app.url("/api/v1/token");
    // The client authenticates before its grant is looked at: a made-up refresh token then tells
    // an accepted assertion (invalid_grant) from a refused one (invalid_client).
    let ask = |key: &DpopKey, kid: &str| {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let assertion = key.sign(
            json!({ "alg": "ES256", "typ": "JWT", "kid": kid }),
            json!({ "iss": id, "sub": id, "aud": token_url, "exp": now + 60, "iat": now,
                    "jti": uuid::Uuid::new_v4().to_string() }),
        );
        app.client
            .post(&token_url)
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", "made-up"),
                ("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"),
                ("client_assertion", assertion.as_str()),
            ])
            .send()
    };
    let fetched = || site.jwks_hits.load(Ordering::SeqCst);
    oauth_error(ask(&k1, "k1").await.unwrap(), StatusCode::BAD_REQUEST, "invalid_grant").await;
    oauth_error(ask(&k1, "k1").await.unwrap(), StatusCode::BAD_REQUEST, "invalid_grant").await;
    assert_eq!(fetched(), 1, "max-age=600: the key set is fetched once");
    // The client rotates to k2: the first assertion with it finds the cached set wanting.
    *site.jwks.lock().unwrap() = json!({ "keys": [k2.public_jwk("k2")] });
    oauth_error(ask(&k2, "k2").await.unwrap(), StatusCode::BAD_REQUEST, "invalid_grant").await;
    assert_eq!(fetched(), 2);
    // Unknown keys right after cost no fetch: refused from the cache.
    oauth_error(ask(&k3, "k3").await.unwrap(), StatusCode::UNAUTHORIZED, "invalid_client").await;
    oauth_error(ask(&k1, "k1").await.unwrap(), StatusCode::UNAUTHORIZED, "invalid_client").await;
    oauth_error(ask(&k2, "k2").await.unwrap(), StatusCode::BAD_REQUEST, "invalid_grant").await;
    assert_eq!(fetched(), 2);
}
