//! Secrets at rest: the real binary, logging at debug, is given one of every secret it handles
//! (passwords, invitation tokens, session tokens, API keys, agent client secrets and their
//! rotations, access and delegated tokens, an ephemeral agent's secret, webhook signing secrets,
//! node credentials, OpenID Connect client secrets and their rotation, authorization codes, ID
//! tokens, refresh tokens and their rotation, the dynamic registration's initial access token and
//! a registration access token, the signing key's private part and the key-encryption key). Then
//! `pg_dump` of its database and everything it logged are searched for each of them, as text,
//! without its prefix, and hex-encoded. Its log stays in the test log directory and its secrets
//! are recorded, so that `make test` also looks for them in every log of the run.

use std::{process::Stdio, time::Duration};

use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    helpers::{fresh_database, json_ok, record_secret, redis_url, test_log_file},
    oidc::{CALLBACK, form, pkce, query_of, user_agent},
};

struct Server {
    base: String,
    client: reqwest::Client,
}

impl Server {
    async fn post(&self, path: &str, bearer: Option<&str>, body: Value) -> Value {
        let mut req = self.client.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "POST {path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
}

fn s(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_else(|| panic!("{key} in {v}")).to_owned()
}

/// The forms a leaked secret could take in a dump or a log line.
fn forms(secret: &str) -> Vec<String> {
    let mut out = vec![secret.to_owned()];
    // Without its recognisable prefix (`aidp_sk_...`), or a JWT's signature alone.
    if let Some((_, tail)) = secret.rsplit_once(['_', '.'])
        && tail.len() >= 16
    {
        out.push(tail.to_owned());
    }
    out.push(hex::encode(secret.as_bytes()));
    out
}

#[tokio::test]
async fn no_secret_is_in_the_database_dump_or_the_logs() {
    let (db_url, db_name) = fresh_database().await;
    let kek: [u8; 32] = rand::random();
    let kek_b64 = STANDARD.encode(kek);
    let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
    let outcome =
        agentidp::auth::bootstrap::run(&pool, "Secret Org", "admin@secret.test", Some(password.clone())).await.unwrap();
    let agentidp::auth::bootstrap::Outcome::Created { org_id, .. } = outcome else { panic!("bootstrap was done") };
    let initial_access_token = format!("iat-{}", uuid::Uuid::new_v4().simple());

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let _ = db_name;
    let (log_path, log_file) = test_log_file("secrets");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_agentidp"))
        .arg("serve")
        .env("AGENTIDP_DATABASE__URL", &db_url)
        .env("AGENTIDP_SERVER__BIND", format!("127.0.0.1:{port}"))
        .env("AGENTIDP_SERVER__PUBLIC_URL", &base)
        .env("AGENTIDP_REDIS__URL", redis_url())
        .env("AGENTIDP_REDIS__KEY_PREFIX", format!("test:{}:", uuid::Uuid::new_v4().simple()))
        .env("AGENTIDP_AUTH__KEY_ENCRYPTION_KEY", &kek_b64)
        .env("AGENTIDP_WEBHOOKS__ALLOW_PRIVATE_NETWORKS", "true")
        .env("AGENTIDP_WEBHOOKS__POLL_INTERVAL_MS", "100")
        .env("AGENTIDP_OIDC__REGISTRATION__ENABLED", "true")
        .env("AGENTIDP_OIDC__REGISTRATION__ORGANIZATION", org_id.to_string())
        .env("AGENTIDP_OIDC__REGISTRATION__INITIAL_ACCESS_TOKEN", &initial_access_token)
        .env("AGENTIDP_LOG__FORMAT", "json")
        .env("AGENTIDP_LOG__LEVEL", "debug")
        .env_remove("RUST_LOG")
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start agentidp serve");
    let server = Server { base: base.clone(), client: reqwest::Client::new() };
    let mut up = false;
    for _ in 0..600 {
        if server.client.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status().is_success()) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "the server came up: {}", std::fs::read_to_string(&log_path).unwrap_or_default());

    let mut secrets: Vec<(&str, String)> = vec![
        ("admin password", password.clone()),
        ("key-encryption key", kek_b64),
        ("initial access token", initial_access_token.clone()),
    ];
    let login = server.post("/auth/login", None, json!({ "email": "admin@secret.test", "password": password })).await;
    let session = s(&login, "session_token");
    let org = login["actor"]["org_id"].as_str().unwrap().to_owned();
    secrets.push(("session token", session.clone()));
    let admin = Some(session.as_str());

    let invite = server
        .post(
            &format!("/api/v1/organizations/{org}/members"),
            admin,
            json!({ "email": "m@secret.test", "role": "admin" }),
        )
        .await;
    let invitation = s(&invite, "invitation_token");
    secrets.push(("invitation token", invitation.clone()));
    let member_password = format!("pw-{}", uuid::Uuid::new_v4().simple());
    let resp = server
        .client
        .post(format!("{base}/auth/set-password"))
        .json(&json!({ "token": invitation, "password": member_password }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    secrets.push(("member password", member_password.clone()));
    let member =
        server.post("/auth/login", None, json!({ "email": "m@secret.test", "password": member_password })).await;
    secrets.push(("member session token", s(&member, "session_token")));

    let key = server.post("/auth/api-keys", admin, json!({ "description": "k" })).await;
    secrets.push(("api key", s(&key, "key")));
    let service = server
        .post("/auth/api-keys", admin, json!({ "description": "svc", "service": true, "scopes": ["usage:write"] }))
        .await;
    secrets.push(("service api key", s(&service, "key")));

    let agent = server
        .post("/api/v1/agents", admin, json!({ "name": "a", "allowed_scopes": ["agents:read", "tools:read"] }))
        .await;
    let agent_id = s(&agent, "id");
    let cred = server.post(&format!("/api/v1/agents/{agent_id}/credentials"), admin, json!({})).await;
    let client_id = s(&cred, "client_id");
    let client_secret = s(&cred, "client_secret");
    secrets.push(("agent client secret", client_secret.clone()));
    let rotated = server
        .post(&format!("/api/v1/agents/{agent_id}/credentials/{}/rotate", s(&cred, "id")), admin, json!({}))
        .await;
    let client_secret = s(&rotated, "client_secret");
    secrets.push(("rotated client secret", client_secret.clone()));
    let token = server
        .client
        .post(format!("{base}/api/v1/token"))
        .basic_auth(&client_id, Some(&client_secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    let token = json_ok(token, StatusCode::OK).await;
    let access = s(&token, "access_token");
    secrets.push(("access token", access.clone()));
    // Used once, so that its verification is logged as it would be.
    let me = server.client.get(format!("{base}/auth/me")).bearer_auth(&access).send().await.unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    let delegation = server
        .post("/api/v1/delegations", admin, json!({ "agent_id": agent_id, "scope": { "scopes": ["tools:read"] } }))
        .await;
    secrets.push(("delegated token", s(&delegation, "agent_token")));

    let hook =
        server.post("/api/v1/webhooks", admin, json!({ "url": "http://127.0.0.1:9/hook", "event_types": ["*"] })).await;
    secrets.push(("webhook secret", s(&hook, "secret")));
    let rotated = server.post(&format!("/api/v1/webhooks/{}/rotate-secret", s(&hook, "id")), admin, json!({})).await;
    secrets.push(("rotated webhook secret", s(&rotated, "secret")));

    let node = server.post("/api/v1/nodes", admin, json!({ "name": "n1", "hostname": "n1.local" })).await;
    secrets.push(("node credential", s(&node, "credential")));

    // An ephemeral agent's secret, made for a delegation.
    let ephemeral = server
        .post(
            "/api/v1/delegations",
            admin,
            json!({ "agent_type": "claude-code", "scope": { "scopes": ["tools:read"] } }),
        )
        .await;
    let found = find_key(&ephemeral, "client_secret").expect("an ephemeral agent's secret");
    secrets.push(("ephemeral agent client secret", found));
    secrets.push(("ephemeral delegated token", s(&ephemeral, "agent_token")));

    // OpenID Connect: a confidential client and its rotated secret; a code through the sign-in
    // and consent pages; the tokens it is redeemed for; a refresh and its rotation.
    let client = server.post("/api/v1/clients", admin, json!({ "name": "App", "redirect_uris": [CALLBACK] })).await;
    let rp_id = s(&client, "client_id");
    secrets.push(("OpenID Connect client secret", s(&client, "client_secret")));
    let rotated = server.post(&format!("/api/v1/clients/{}/rotate-secret", s(&client, "id")), admin, json!({})).await;
    let rp_secret = s(&rotated, "client_secret");
    secrets.push(("rotated OpenID Connect client secret", rp_secret.clone()));
    let (verifier, challenge) = pkce();
    let mut url = url::Url::parse(&format!("{base}/oauth2/authorize")).unwrap();
    url.query_pairs_mut().extend_pairs([
        ("response_type", "code"),
        ("client_id", rp_id.as_str()),
        ("redirect_uri", CALLBACK),
        ("scope", "openid email offline_access"),
        ("state", "st"),
        ("nonce", "n"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ]);
    let ua = user_agent();
    let html = ua.get(url.as_str()).send().await.unwrap().text().await.unwrap();
    let (action, mut fields) = form(&html);
    for (k, v) in fields.iter_mut() {
        match k.as_str() {
            "email" => *v = "admin@secret.test".into(),
            "password" => *v = password.clone(),
            _ => {}
        }
    }
    let consent = ua.post(format!("{base}{action}")).form(&fields).send().await.unwrap().text().await.unwrap();
    let (action, mut fields) = form(&consent);
    fields.push(("decision".into(), "allow".into()));
    let back = ua.post(format!("{base}{action}")).form(&fields).send().await.unwrap();
    assert_eq!(back.status(), StatusCode::SEE_OTHER);
    let code = query_of(back.headers()["location"].to_str().unwrap())["code"].clone();
    secrets.push(("authorization code", code.clone()));
    secrets.push(("PKCE verifier", verifier.clone()));
    let token = |form: Vec<(&'static str, String)>| {
        server.client.post(format!("{base}/api/v1/token")).basic_auth(&rp_id, Some(&rp_secret)).form(&form).send()
    };
    let tokens = json_ok(
        token(vec![
            ("grant_type", "authorization_code".into()),
            ("code", code),
            ("code_verifier", verifier),
            ("redirect_uri", CALLBACK.into()),
        ])
        .await
        .unwrap(),
        StatusCode::OK,
    )
    .await;
    secrets.push(("person's access token", s(&tokens, "access_token")));
    secrets.push(("ID token", s(&tokens, "id_token")));
    let refresh = s(&tokens, "refresh_token");
    secrets.push(("refresh token", refresh.clone()));
    let refreshed = json_ok(
        token(vec![("grant_type", "refresh_token".into()), ("refresh_token", refresh)]).await.unwrap(),
        StatusCode::OK,
    )
    .await;
    secrets.push(("rotated refresh token", s(&refreshed, "refresh_token")));
    // Dynamic registration (RFC 7591): a client secret and a registration access token.
    let registered = server
        .post(
            "/oauth2/register",
            Some(initial_access_token.as_str()),
            json!({ "client_name": "Legacy", "redirect_uris": [CALLBACK], "grant_types": ["authorization_code", "refresh_token"] }),
        )
        .await;
    secrets.push(("registered client secret", s(&registered, "client_secret")));
    secrets.push(("registration access token", s(&registered, "registration_access_token")));

    // The signing key's private part, as the key ring unseals it.
    let (kid, sealed): (String, Vec<u8>) =
        sqlx::query_as("select kid, private_key_sealed from signing_key where status = 'active'")
            .fetch_one(&pool)
            .await
            .unwrap();
    let ring = agentidp::auth::keys::KeyRing::new(kek);
    let private = ring.unseal(&kid, &sealed).expect("the key unseals with the configured key-encryption key");
    secrets.push(("signing key (hex DER)", hex::encode(&private)));
    secrets.push(("signing key (base64 DER)", STANDARD.encode(&private)));
    secrets.push(("signing key (base64url DER)", URL_SAFE_NO_PAD.encode(&private)));

    // Let the event feed and the dispatcher handle what these made (and log it).
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.start_kill().unwrap();
    child.wait().await.unwrap();
    pool.close().await;

    let dump = std::process::Command::new("pg_dump")
        .args(["--no-owner", "--data-only", &db_url])
        .output()
        .expect("pg_dump runs");
    assert!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    let dump = String::from_utf8_lossy(&dump.stdout).to_lowercase();
    assert!(dump.contains("copy public.agent "), "the dump holds the data");
    // What is not secret is there in plain text, so a plaintext secret would be found the same way.
    assert!(dump.contains(&client_id.to_lowercase()), "the client id is in the dump");
    let logs = std::fs::read_to_string(&log_path).unwrap().to_lowercase();
    assert!(logs.lines().count() > 20, "the server logged at debug: {logs}");
    for (what, secret) in &secrets {
        record_secret(what, secret);
    }

    let mut found = Vec::new();
    for (what, secret) in &secrets {
        for form in forms(secret) {
            let form = form.to_lowercase();
            if dump.contains(&form) {
                found.push(format!("{what} in the database dump"));
            }
            if logs.contains(&form) {
                found.push(format!("{what} in the logs"));
            }
        }
    }
    assert!(secrets.len() >= 31, "{} secrets", secrets.len());
    assert!(found.is_empty(), "secrets at rest in plaintext: {found:?}");
}

/// The first string value under `key` anywhere in `v`.
fn find_key(v: &Value, key: &str) -> Option<String> {
    match v {
        Value::Object(m) => {
            m.get(key).and_then(Value::as_str).map(str::to_owned).or_else(|| m.values().find_map(|x| find_key(x, key)))
        }
        Value::Array(a) => a.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}
