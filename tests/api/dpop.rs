//! DPoP (RFC 9449): tokens bound to a key at the token endpoint, refused on our API without a
//! proof of that key and accepted with one; replayed proofs, proofs for another method or URL,
//! stale proofs and proofs of another key refused; server nonces; the replay cache shared by
//! instances.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use p256::ecdsa::{Signature, SigningKey, signature::Signer};
use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::{
    helpers::{TestApp, json_ok, spawn_on},
    oidc::{CALLBACK, code_for, oauth_error, register, spawn_oidc},
};

/// A client's DPoP key.
pub struct DpopKey {
    key: SigningKey,
    jwk: Value,
}

impl DpopKey {
    pub fn new() -> Self {
        let key = SigningKey::random(&mut rand_core::OsRng);
        let point = key.verifying_key().to_encoded_point(false);
        let jwk = json!({
            "kty": "EC", "crv": "P-256",
            "x": B64.encode(point.x().unwrap()),
            "y": B64.encode(point.y().unwrap()),
        });
        Self { key, jwk }
    }

    /// RFC 7638, computed here independently of the server.
    pub fn jkt(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            self.jwk["x"].as_str().unwrap(),
            self.jwk["y"].as_str().unwrap()
        );
        B64.encode(Sha256::digest(canonical.as_bytes()))
    }

    /// The public key as a JWK with a kid, for a client's JWKS.
    pub fn public_jwk(&self, kid: &str) -> Value {
        let mut j = self.jwk.clone();
        j["kid"] = json!(kid);
        j["use"] = json!("sig");
        j
    }

    /// Any compact JWS, ES256.
    pub fn sign(&self, header: Value, claims: Value) -> String {
        let signed = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
        let sig: Signature = self.key.sign(signed.as_bytes());
        format!("{signed}.{}", B64.encode(sig.to_bytes()))
    }

    pub fn proof_at(&self, htm: &str, htu: &str, token: Option<&str>, nonce: Option<&str>, iat: i64) -> String {
        let header = json!({ "typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk });
        let mut claims = json!({ "jti": uuid::Uuid::new_v4().to_string(), "htm": htm, "htu": htu, "iat": iat });
        if let Some(t) = token {
            claims["ath"] = json!(B64.encode(Sha256::digest(t.as_bytes())));
        }
        if let Some(n) = nonce {
            claims["nonce"] = json!(n);
        }
        let signed = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
        let sig: Signature = self.key.sign(signed.as_bytes());
        format!("{signed}.{}", B64.encode(sig.to_bytes()))
    }

    pub fn proof(&self, htm: &str, htu: &str, token: Option<&str>) -> String {
        self.proof_at(htm, htu, token, None, time::OffsetDateTime::now_utc().unix_timestamp())
    }
}

async fn bound_agent_token(app: &TestApp, key: &DpopKey) -> String {
    let admin = app.bootstrap().await;
    let client = app.agent_client(&admin, &["agents:read"]).await;
    let r = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth(&client.client_id, Some(&client.secret))
        .header("dpop", key.proof("POST", &app.url("/api/v1/token"), None))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    let body = json_ok(r, StatusCode::OK).await;
    assert_eq!(body["token_type"], "DPoP");
    let token = body["access_token"].as_str().unwrap().to_owned();
    let claims: Value = serde_json::from_slice(&B64.decode(token.split('.').nth(1).unwrap()).unwrap()).unwrap();
    assert_eq!(claims["cnf"]["jkt"], key.jkt());
    token
}

async fn me(app: &TestApp, authorization: String, proof: Option<String>) -> reqwest::Response {
    let mut r = app.client.get(app.url("/auth/me")).header("authorization", authorization);
    if let Some(p) = proof {
        r = r.header("dpop", p);
    }
    r.send().await.unwrap()
}

#[tokio::test]
async fn a_dpop_bound_token_is_refused_without_its_proof_and_accepted_with_it() {
    let app = spawn_oidc(&[]).await;
    let key = DpopKey::new();
    let token = bound_agent_token(&app, &key).await;
    let me_url = app.url("/auth/me");
    // As a bearer token, or with the DPoP scheme but no proof: refused.
    let r = me(&app, format!("Bearer {token}"), None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.starts_with("DPoP error=\"invalid_dpop_proof\""), "{challenge}");
    assert!(challenge.contains("resource_metadata="), "{challenge}");
    assert_eq!(me(&app, format!("DPoP {token}"), None).await.status(), StatusCode::UNAUTHORIZED);
    // With a proof of its key for this request: accepted.
    let proof = key.proof("GET", &me_url, Some(&token));
    let r = me(&app, format!("DPoP {token}"), Some(proof.clone())).await;
    assert_eq!(r.status(), StatusCode::OK);
    // The same proof again: a replay.
    assert_eq!(me(&app, format!("DPoP {token}"), Some(proof)).await.status(), StatusCode::UNAUTHORIZED);
    // For another method, another URL, without ath, stale, or by another key: refused.
    let other = DpopKey::new();
    let old = time::OffsetDateTime::now_utc().unix_timestamp() - 300;
    for bad in [
        key.proof("POST", &me_url, Some(&token)),
        key.proof("GET", &app.url("/api/v1/agents"), Some(&token)),
        key.proof("GET", "https://elsewhere.example/auth/me", Some(&token)),
        key.proof("GET", &me_url, None),
        key.proof("GET", &me_url, Some("another-token")),
        key.proof_at("GET", &me_url, Some(&token), None, old),
        other.proof("GET", &me_url, Some(&token)),
        "not.a.proof".to_owned(),
    ] {
        assert_eq!(me(&app, format!("DPoP {token}"), Some(bad)).await.status(), StatusCode::UNAUTHORIZED);
    }
    // A query string does not change htu.
    let r = app
        .client
        .get(format!("{me_url}?x=1"))
        .header("authorization", format!("DPoP {token}"))
        .header("dpop", key.proof("GET", &me_url, Some(&token)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_token_endpoint_refuses_replayed_misdirected_and_stale_proofs() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let client = app.agent_client(&admin, &["agents:read"]).await;
    let key = DpopKey::new();
    let token_url = app.url("/api/v1/token");
    let ask = |proof: String| {
        app.client
            .post(app.url("/api/v1/token"))
            .basic_auth(&client.client_id, Some(&client.secret))
            .header("dpop", proof)
            .form(&[("grant_type", "client_credentials")])
            .send()
    };
    let proof = key.proof("POST", &token_url, None);
    json_ok(ask(proof.clone()).await.unwrap(), StatusCode::OK).await;
    oauth_error(ask(proof).await.unwrap(), StatusCode::BAD_REQUEST, "invalid_dpop_proof").await;
    oauth_error(ask(key.proof("GET", &token_url, None)).await.unwrap(), StatusCode::BAD_REQUEST, "invalid_dpop_proof")
        .await;
    oauth_error(
        ask(key.proof("POST", &app.url("/oauth2/userinfo"), None)).await.unwrap(),
        StatusCode::BAD_REQUEST,
        "invalid_dpop_proof",
    )
    .await;
    let stale = key.proof_at("POST", &token_url, None, None, time::OffsetDateTime::now_utc().unix_timestamp() - 120);
    oauth_error(ask(stale).await.unwrap(), StatusCode::BAD_REQUEST, "invalid_dpop_proof").await;
    // A proof whose signature is not its key's.
    let good = key.proof("POST", &token_url, None);
    let forged = format!("{}.{}", good.rsplit_once('.').unwrap().0, B64.encode([7u8; 64]));
    oauth_error(ask(forged).await.unwrap(), StatusCode::BAD_REQUEST, "invalid_dpop_proof").await;
    // An HMAC "proof" or alg none: refused.
    let none = format!(
        "{}.{}.",
        B64.encode(json!({ "typ": "dpop+jwt", "alg": "none", "jwk": key.jwk }).to_string()),
        B64.encode(json!({ "jti": "x", "htm": "POST", "htu": token_url, "iat": 1 }).to_string())
    );
    oauth_error(ask(none).await.unwrap(), StatusCode::BAD_REQUEST, "invalid_dpop_proof").await;
}

#[tokio::test]
async fn server_nonces_are_asked_for_and_then_accepted() {
    let app = spawn_oidc(&[("oidc.dpop_require_nonce", json!(true))]).await;
    let admin = app.bootstrap().await;
    let client = app.agent_client(&admin, &["agents:read"]).await;
    let key = DpopKey::new();
    let token_url = app.url("/api/v1/token");
    let ask = |proof: String| {
        app.client
            .post(app.url("/api/v1/token"))
            .basic_auth(&client.client_id, Some(&client.secret))
            .header("dpop", proof)
            .form(&[("grant_type", "client_credentials")])
            .send()
    };
    let r = ask(key.proof("POST", &token_url, None)).await.unwrap();
    let nonce = r.headers()["dpop-nonce"].to_str().unwrap().to_owned();
    oauth_error(r, StatusCode::BAD_REQUEST, "use_dpop_nonce").await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let r = ask(key.proof_at("POST", &token_url, None, Some("made-up"), now)).await.unwrap();
    oauth_error(r, StatusCode::BAD_REQUEST, "use_dpop_nonce").await;
    let r = ask(key.proof_at("POST", &token_url, None, Some(&nonce), now)).await.unwrap();
    assert!(r.headers().contains_key("dpop-nonce"));
    let body = json_ok(r, StatusCode::OK).await;
    assert_eq!(body["token_type"], "DPoP");
}

#[tokio::test]
async fn our_api_asks_for_server_nonces_and_refuses_replayed_and_misdirected_proofs_that_carry_one() {
    let app =
        spawn_oidc(&[("oidc.dpop_require_nonce", json!(true)), ("oidc.dpop_nonce_lifetime_secs", json!(100))]).await;
    // Just past the start of a nonce window (100 s each), so that the steps below land where meant.
    let real = time::OffsetDateTime::now_utc().unix_timestamp();
    let base = time::OffsetDateTime::from_unix_timestamp(real - real % 100 + 100 + 2).unwrap();
    app.state.clock().set(base);
    let admin = app.bootstrap().await;
    let client = app.agent_client(&admin, &["agents:read"]).await;
    let key = DpopKey::new();
    let token_url = app.url("/api/v1/token");
    let me_url = app.url("/auth/me");
    let now = || app.state.clock().now().unix_timestamp();
    let ask_token = |proof: String| {
        app.client
            .post(&token_url)
            .basic_auth(&client.client_id, Some(&client.secret))
            .header("dpop", proof)
            .form(&[("grant_type", "client_credentials")])
            .send()
    };
    let r = ask_token(key.proof_at("POST", &token_url, None, None, now())).await.unwrap();
    let nonce = r.headers()["dpop-nonce"].to_str().unwrap().to_owned();
    let r = ask_token(key.proof_at("POST", &token_url, None, Some(&nonce), now())).await.unwrap();
    let token = json_ok(r, StatusCode::OK).await["access_token"].as_str().unwrap().to_owned();
    let dpop = format!("DPoP {token}");

    // A proof of the right key for this request, but without a nonce: 401 use_dpop_nonce, with one.
    let r = me(&app, dpop.clone(), Some(key.proof_at("GET", &me_url, Some(&token), None, now()))).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(challenge.starts_with("DPoP error=\"use_dpop_nonce\""), "{challenge}");
    assert!(challenge.contains("resource_metadata="), "{challenge}");
    let nonce = r.headers()["dpop-nonce"].to_str().unwrap().to_owned();
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["status"], 401);
    // A made-up nonce is no nonce.
    let r = me(&app, dpop.clone(), Some(key.proof_at("GET", &me_url, Some(&token), Some("1.made-up"), now()))).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("use_dpop_nonce"));

    // The retry with the nonce is served, and the answer carries the nonce to use next.
    let proof = key.proof_at("GET", &me_url, Some(&token), Some(&nonce), now());
    let r = me(&app, dpop.clone(), Some(proof.clone())).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("dpop-nonce"));
    // A nonce does not make a proof reusable, nor good for another method or URL.
    for bad in [
        proof,
        key.proof_at("POST", &me_url, Some(&token), Some(&nonce), now()),
        key.proof_at("GET", &app.url("/api/v1/agents"), Some(&token), Some(&nonce), now()),
    ] {
        let r = me(&app, dpop.clone(), Some(bad)).await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(challenge.starts_with("DPoP error=\"invalid_dpop_proof\""), "{challenge}");
    }

    // A nonce is good for its window and the next one, not later: then a fresh one is handed out.
    app.state.clock().set(base + time::Duration::seconds(100));
    let r = me(&app, dpop.clone(), Some(key.proof_at("GET", &me_url, Some(&token), Some(&nonce), now()))).await;
    assert_eq!(r.status(), StatusCode::OK);
    app.state.clock().set(base + time::Duration::seconds(200));
    let r = me(&app, dpop.clone(), Some(key.proof_at("GET", &me_url, Some(&token), Some(&nonce), now()))).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let fresh = r.headers()["dpop-nonce"].to_str().unwrap().to_owned();
    assert_ne!(fresh, nonce);
    let r = me(&app, dpop.clone(), Some(key.proof_at("GET", &me_url, Some(&token), Some(&fresh), now()))).await;
    assert_eq!(r.status(), StatusCode::OK);

    // Userinfo, a resource of its own, asks for the nonce too (this token is an agent's, so the
    // nonce passes and the token is then refused for what it is).
    let info = app.url("/oauth2/userinfo");
    let r = app
        .client
        .get(&info)
        .header("authorization", &dpop)
        .header("dpop", key.proof_at("GET", &info, Some(&token), None, now()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert!(r.headers()["www-authenticate"].to_str().unwrap().contains("use_dpop_nonce"));
    assert!(r.headers().contains_key("dpop-nonce"));
}

#[tokio::test]
async fn a_proof_used_at_one_instance_is_refused_at_another() {
    let app1 = spawn_oidc(&[]).await;
    let mut cfg2 = app1.config.clone();
    cfg2.server.bind = "127.0.0.1:0".parse().unwrap();
    // Both serve the same public URL, as two instances behind one load balancer.
    let app2 = spawn_on(cfg2, Some(app1.redis.prefix().to_owned())).await;
    let key = DpopKey::new();
    let token = bound_agent_token(&app1, &key).await;
    let proof = key.proof("GET", &app1.url("/auth/me"), Some(&token));
    assert_eq!(me(&app1, format!("DPoP {token}"), Some(proof.clone())).await.status(), StatusCode::OK);
    assert_eq!(me(&app2, format!("DPoP {token}"), Some(proof)).await.status(), StatusCode::UNAUTHORIZED);
    let fresh = key.proof("GET", &app1.url("/auth/me"), Some(&token));
    assert_eq!(me(&app2, format!("DPoP {token}"), Some(fresh)).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_public_clients_tokens_and_refresh_token_are_bound_to_its_key() {
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let c =
        register(&app, &admin, json!({ "name": "CLI", "client_type": "public", "redirect_uris": [CALLBACK] })).await;
    let id = c["client_id"].as_str().unwrap();
    let key = DpopKey::new();
    let token_url = app.url("/api/v1/token");
    let (code, verifier, _) = code_for(&app, id, "openid offline_access", &[]).await;
    let r = app
        .client
        .post(&token_url)
        .header("dpop", key.proof("POST", &token_url, None))
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
    assert_eq!(tokens["token_type"], "DPoP");
    let access = tokens["access_token"].as_str().unwrap();
    // Userinfo checks the proof too.
    let info_url = app.url("/oauth2/userinfo");
    let r = app.client.get(&info_url).bearer_auth(access).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = app
        .client
        .get(&info_url)
        .header("authorization", format!("DPoP {access}"))
        .header("dpop", key.proof("GET", &info_url, Some(access)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // The refresh token needs a proof of the same key.
    let refresh = tokens["refresh_token"].as_str().unwrap();
    let form = [("grant_type", "refresh_token"), ("client_id", id), ("refresh_token", refresh)];
    let r = app.client.post(&token_url).form(&form).send().await.unwrap();
    oauth_error(r, StatusCode::BAD_REQUEST, "invalid_grant").await;
    let r = app
        .client
        .post(&token_url)
        .header("dpop", DpopKey::new().proof("POST", &token_url, None))
        .form(&form)
        .send()
        .await
        .unwrap();
    oauth_error(r, StatusCode::BAD_REQUEST, "invalid_grant").await;
    let r = app
        .client
        .post(&token_url)
        .header("dpop", key.proof("POST", &token_url, None))
        .form(&form)
        .send()
        .await
        .unwrap();
    let again = json_ok(r, StatusCode::OK).await;
    assert_eq!(again["token_type"], "DPoP");
}

/// Found while writing the `dpop` fuzz target: a proof whose P-256 key has coordinates of another
/// length than 32 bytes panicked in the key's parsing (a 500), and an `iat` of i64::MIN
/// overflowed the window's arithmetic (a panic in a debug build). Both are `invalid_dpop_proof`.
#[tokio::test]
async fn a_proof_with_a_malformed_key_or_an_extreme_iat_is_invalid_not_a_500() {
    let app = crate::helpers::spawn_app().await;
    let admin = app.bootstrap().await;
    let client = app.agent_client(&admin, &["agents:read"]).await;
    let key = DpopKey::new();
    let url = app.url("/api/v1/token");
    let claims =
        json!({ "jti": "j-short", "htm": "POST", "htu": url, "iat": time::OffsetDateTime::now_utc().unix_timestamp() });
    let mut proofs = Vec::new();
    for (x, y) in [("AA", "AA"), ("", ""), (&*B64.encode([1u8; 33]), &*B64.encode([1u8; 31]))] {
        let header =
            json!({ "typ": "dpop+jwt", "alg": "ES256", "jwk": { "kty": "EC", "crv": "P-256", "x": x, "y": y } });
        proofs.push(key.sign(header, claims.clone()));
    }
    for iat in [i64::MIN, i64::MAX] {
        let header = json!({ "typ": "dpop+jwt", "alg": "ES256", "jwk": key.jwk });
        proofs.push(key.sign(header, json!({ "jti": format!("j-{iat}"), "htm": "POST", "htu": url, "iat": iat })));
    }
    for proof in proofs {
        let r = app
            .client
            .post(&url)
            .basic_auth(&client.client_id, Some(&client.secret))
            .header("dpop", &proof)
            .form(&[("grant_type", "client_credentials")])
            .send()
            .await
            .unwrap();
        oauth_error(r, StatusCode::BAD_REQUEST, "invalid_dpop_proof").await;
    }
}
