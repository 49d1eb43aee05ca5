//! Federation: a local issuer plays GitHub Actions, a SPIFFE trust domain and a plain RFC 7523
//! issuer (its own key, discovery and JWKS on loopback; private networks allowed in the test
//! configuration). Trust policies decide which of their tokens become our agents' tokens.

use std::sync::{Arc, Mutex};

use axum::{Json, Router, http::header, response::IntoResponse, routing::get};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Caller, TestApp, assert_problem, json_ok, spawn_app_with};

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// An external OIDC issuer on loopback with an ES256 key.
struct Issuer {
    url: String,
    key: jsonwebtoken::EncodingKey,
    /// What its JWKS endpoint serves (tests swap it).
    jwks: Arc<Mutex<Value>>,
}

impl Issuer {
    async fn start() -> Issuer {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let point = pair.public_key().as_ref();
        let jwk = json!({ "kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "use": "sig",
                          "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]) });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let jwks = Arc::new(Mutex::new(json!({ "keys": [jwk] })));
        let discovery = json!({ "issuer": url, "jwks_uri": format!("{url}/jwks") });
        let served = jwks.clone();
        let router = Router::new()
            .route("/.well-known/openid-configuration", get(move || async move { Json(discovery) }))
            .route(
                "/jwks",
                get(move || async move {
                    let body = served.lock().unwrap().clone();
                    ([(header::CACHE_CONTROL, "max-age=60")], Json(body)).into_response()
                }),
            );
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Issuer { url, key: jsonwebtoken::EncodingKey::from_ec_der(pkcs8.as_ref()), jwks }
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, claims, &self.key).unwrap()
    }
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The claim set GitHub Actions puts in a job's OIDC token.
fn github_claims(iss: &str, repository: &str, git_ref: &str) -> Value {
    let t = now();
    json!({
        "iss": iss,
        "aud": "agentidp-test",
        "sub": format!("repo:{repository}:ref:{git_ref}"),
        "jti": uuid::Uuid::new_v4().to_string(),
        "iat": t, "nbf": t, "exp": t + 300,
        "repository": repository,
        "repository_owner": repository.split('/').next().unwrap(),
        "repository_id": "123456",
        "repository_owner_id": "654321",
        "ref": git_ref,
        "ref_type": "branch",
        "sha": "d6f2a5b0c6a9f0b1",
        "environment": "production",
        "workflow": "deploy",
        "workflow_ref": format!("{repository}/.github/workflows/deploy.yml@{git_ref}"),
        "job_workflow_ref": format!("{repository}/.github/workflows/deploy.yml@{git_ref}"),
        "event_name": "push",
        "actor": "octocat",
        "run_id": "42", "run_number": "7", "run_attempt": "1",
        "runner_environment": "github-hosted",
    })
}

async fn federation_app() -> TestApp {
    spawn_app_with(&[
        ("trust.federation_https_only", json!(false)),
        ("trust.federation_allow_private_networks", json!(true)),
    ])
    .await
}

async fn post(app: &TestApp, who: &Caller, path: &str, body: Value) -> reqwest::Response {
    app.as_(who, Method::POST, path).json(&body).send().await.unwrap()
}

async fn jwt_bearer(app: &TestApp, assertion: &str) -> reqwest::Response {
    app.client
        .post(app.url("/api/v1/token"))
        .form(&[("grant_type", JWT_BEARER), ("assertion", assertion)])
        .send()
        .await
        .unwrap()
}

async fn oauth_error(resp: reqwest::Response, status: StatusCode, error: &str) {
    let got = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(got, status, "{body}");
    assert_eq!(body["error"], error, "{body}");
}

/// A partner and a policy mapping to a new agent allowed `agents:read`; returns the agent id and policy id.
async fn trust(app: &TestApp, owner: &Caller, partner: Value, conditions: Value) -> (String, String, String) {
    let agent = app
        .create_agent(owner, json!({ "name": format!("fed-{}", uuid::Uuid::new_v4().simple()), "allowed_scopes": ["agents:read", "audit:read"] }))
        .await;
    let agent_id = agent["id"].as_str().unwrap().to_owned();
    let partner = json_ok(post(app, owner, "/api/v1/federation/partners", partner).await, StatusCode::CREATED).await;
    let partner_id = partner["id"].as_str().unwrap().to_owned();
    let policy = json_ok(
        post(
            app,
            owner,
            "/api/v1/oidc/trust-policies",
            json!({ "name": format!("policy-{}", uuid::Uuid::new_v4().simple()), "partner_id": partner_id,
                    "conditions": conditions, "agent_id": agent_id, "scopes": ["agents:read"] }),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    (agent_id, partner_id, policy["id"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn a_github_actions_job_on_the_trusted_branch_gets_a_token_and_no_other_job_does() {
    let app = federation_app().await;
    let owner = app.bootstrap().await;
    let gh = Issuer::start().await;
    let discovery = format!("{}/.well-known/openid-configuration", gh.url);

    // A GitHub policy must pin the repository (or owner) exactly: any job anywhere has this issuer.
    let partner = json_ok(
        post(
            &app,
            &owner,
            "/api/v1/federation/partners",
            json!({ "name": "github", "issuer": gh.url, "discovery_url": discovery, "audience": "agentidp-test",
                    "template": "github_actions", "algorithms": ["ES256"] }),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;
    let agent =
        app.create_agent(&owner, json!({ "name": "deployer", "allowed_scopes": ["agents:read", "audit:read"] })).await;
    let agent_id = agent["id"].as_str().unwrap();
    assert_problem(
        post(
            &app,
            &owner,
            "/api/v1/oidc/trust-policies",
            json!({ "name": "too-wide", "partner_id": partner["id"], "conditions": { "repository": "acme/*" },
                    "agent_id": agent_id, "scopes": ["agents:read"] }),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_conditions",
    )
    .await;
    let policy = json_ok(
        post(
            &app,
            &owner,
            "/api/v1/oidc/trust-policies",
            json!({ "name": "deploy-main", "partner_id": partner["id"],
                    "conditions": { "repository": "acme/deployer", "ref": "refs/heads/main", "workflow_ref": "acme/deployer/.github/workflows/*" },
                    "agent_id": agent_id, "scopes": ["agents:read"] }),
        )
        .await,
        StatusCode::CREATED,
    )
    .await;

    // The job on main.
    let main_job = gh.sign(&github_claims(&gh.url, "acme/deployer", "refs/heads/main"));
    let issued = json_ok(jwt_bearer(&app, &main_job).await, StatusCode::OK).await;
    assert_eq!(issued["scope"], "agents:read");
    let token = issued["access_token"].as_str().unwrap();
    let me =
        json_ok(app.client.get(app.url("/auth/me")).bearer_auth(token).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(me["actor_id"], format!("agent:{agent_id}"));
    // The same token again: a replay.
    oauth_error(jwt_bearer(&app, &main_job).await, StatusCode::BAD_REQUEST, "invalid_grant").await;

    // A job on another branch, in another repository, or naming a glob as its value: refused.
    for (repo, git_ref) in
        [("acme/deployer", "refs/heads/feature"), ("evil/deployer", "refs/heads/main"), ("acme/*", "refs/heads/main")]
    {
        let job = gh.sign(&github_claims(&gh.url, repo, git_ref));
        oauth_error(jwt_bearer(&app, &job).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
    }

    // RFC 8693 with the job's token as subject_token works the same way.
    let job = gh.sign(&github_claims(&gh.url, "acme/deployer", "refs/heads/main"));
    let exchanged = json_ok(
        app.client
            .post(app.url("/api/v1/token"))
            .form(&[("grant_type", TOKEN_EXCHANGE), ("subject_token", &job), ("subject_token_type", JWT_TYPE)])
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(exchanged["issued_token_type"], "urn:ietf:params:oauth:token-type:access_token");
    // A scope beyond the policy's ceiling is refused even though the agent holds it.
    let job = gh.sign(&github_claims(&gh.url, "acme/deployer", "refs/heads/main"));
    let resp = app
        .client
        .post(app.url("/api/v1/token"))
        .form(&[("grant_type", JWT_BEARER), ("assertion", &job), ("scope", "audit:read")])
        .send()
        .await
        .unwrap();
    oauth_error(resp, StatusCode::BAD_REQUEST, "invalid_scope").await;

    // The audit chain records the external iss, sub and jti.
    let audit =
        json_ok(app.as_(&owner, Method::GET, "/api/v1/audit?limit=200").send().await.unwrap(), StatusCode::OK).await;
    let text = audit.to_string();
    assert!(text.contains("token.federated") && text.contains("repo:acme/deployer:ref:refs/heads/main"), "{text}");

    // Deleting the policy kills the tokens issued under it.
    let resp =
        app.as_(&owner, Method::DELETE, &format!("/api/v1/oidc/trust-policies/{}", policy["id"].as_str().unwrap()));
    assert_eq!(resp.send().await.unwrap().status(), StatusCode::NO_CONTENT);
    assert_eq!(app.me_status(token).await, StatusCode::UNAUTHORIZED);
    let job = gh.sign(&github_claims(&gh.url, "acme/deployer", "refs/heads/main"));
    oauth_error(jwt_bearer(&app, &job).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
}

#[tokio::test]
async fn a_spiffe_jwt_svid_and_a_plain_jwt_bearer_assertion_are_exchanged_by_their_policies() {
    let app = federation_app().await;
    let owner = app.bootstrap().await;
    let spire = Issuer::start().await;
    let (spiffe_agent, _, _) = trust(
        &app,
        &owner,
        json!({ "name": "spire", "issuer": spire.url, "jwks_uri": format!("{}/jwks", spire.url), "audience": "agentidp-test",
                "template": "spiffe", "algorithms": ["ES256"] }),
        json!({ "sub": "spiffe://example.org/ns/agents/sa/*" }),
    )
    .await;
    let svid = |sub: &str| {
        let t = now();
        spire.sign(&json!({ "iss": spire.url, "sub": sub, "aud": ["agentidp-test"], "exp": t + 300, "iat": t,
                            "jti": uuid::Uuid::new_v4().to_string() }))
    };
    let ok = json_ok(jwt_bearer(&app, &svid("spiffe://example.org/ns/agents/sa/worker")).await, StatusCode::OK).await;
    let me = json_ok(
        app.client.get(app.url("/auth/me")).bearer_auth(ok["access_token"].as_str().unwrap()).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(me["actor_id"], format!("agent:{spiffe_agent}"));
    for other in ["spiffe://example.org/ns/other/sa/worker", "spiffe://evil.org/ns/agents/sa/worker"] {
        oauth_error(jwt_bearer(&app, &svid(other)).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
    }

    // RFC 7523 §2.1 from a generic issuer: sub and a custom claim.
    let idp = Issuer::start().await;
    let (plain_agent, _, _) = trust(
        &app,
        &owner,
        json!({ "name": "ci-idp", "issuer": idp.url, "discovery_url": format!("{}/.well-known/openid-configuration", idp.url),
                "audience": "agentidp-test", "algorithms": ["ES256"] }),
        json!({ "sub": "service-42", "team": "platform" }),
    )
    .await;
    let assertion = |sub: &str, team: &str| {
        let t = now();
        idp.sign(&json!({ "iss": idp.url, "sub": sub, "team": team, "aud": "agentidp-test", "exp": t + 120, "iat": t,
                          "jti": uuid::Uuid::new_v4().to_string() }))
    };
    let ok = json_ok(jwt_bearer(&app, &assertion("service-42", "platform")).await, StatusCode::OK).await;
    assert_eq!(ok["token_type"], "Bearer");
    let me = json_ok(
        app.client.get(app.url("/auth/me")).bearer_auth(ok["access_token"].as_str().unwrap()).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(me["actor_id"], format!("agent:{plain_agent}"));
    oauth_error(jwt_bearer(&app, &assertion("service-42", "sales")).await, StatusCode::BAD_REQUEST, "invalid_grant")
        .await;
}

#[tokio::test]
async fn bad_partners_and_hostile_tokens_are_refused_with_the_right_error_and_never_a_500() {
    let app = federation_app().await;
    let owner = app.bootstrap().await;
    let idp = Issuer::start().await;
    let jwks_uri = format!("{}/jwks", idp.url);

    // Partners: no `none`, no HMAC, no unknown algorithms, a URL that is not one.
    for (algs, uri) in [
        (json!(["none"]), jwks_uri.as_str()),
        (json!(["HS256"]), jwks_uri.as_str()),
        (json!(["XX1"]), jwks_uri.as_str()),
        (json!(["ES256"]), "javascript:alert(1)"),
    ] {
        let resp = post(
            &app,
            &owner,
            "/api/v1/federation/partners",
            json!({ "name": "bad", "issuer": idp.url, "jwks_uri": uri, "audience": "x", "algorithms": algs }),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY, "{algs} {uri}");
    }
    let (_, _, _) = trust(
        &app,
        &owner,
        json!({ "name": "idp", "issuer": idp.url, "jwks_uri": jwks_uri, "audience": "agentidp-test", "algorithms": ["ES256"],
                "max_token_lifetime_secs": 600 }),
        json!({ "sub": "svc" }),
    )
    .await;
    let claims = |f: &dyn Fn(&mut Value)| {
        let t = now();
        let mut c = json!({ "iss": idp.url, "sub": "svc", "aud": "agentidp-test", "exp": t + 120, "iat": t,
                            "jti": uuid::Uuid::new_v4().to_string() });
        f(&mut c);
        c
    };
    let t = now();
    let hostile = [
        ("lookalike issuer: trailing slash", idp.sign(&claims(&|c| c["iss"] = json!(format!("{}/", idp.url))))),
        ("lookalike issuer: case", idp.sign(&claims(&|c| c["iss"] = json!(idp.url.replace("http", "HTTP"))))),
        (
            "lookalike issuer: unicode",
            idp.sign(&claims(&|c| c["iss"] = json!(idp.url.replace("127.0.0.1", "127.0.0.１")))),
        ),
        (
            "expired",
            idp.sign(&claims(&|c| {
                c["exp"] = json!(t - 600);
                c["iat"] = json!(t - 700);
            })),
        ),
        (
            "from the future",
            idp.sign(&claims(&|c| {
                c["iat"] = json!(t + 3600);
                c["exp"] = json!(t + 3700);
            })),
        ),
        ("lives too long", idp.sign(&claims(&|c| c["exp"] = json!(t + 7200)))),
        ("other audience", idp.sign(&claims(&|c| c["aud"] = json!("someone-else")))),
        (
            "no jti",
            idp.sign(&claims(&|c| {
                c.as_object_mut().unwrap().remove("jti");
            })),
        ),
        ("not a JWT", "abc.def".to_owned()),
        ("garbage", "%%%".to_owned()),
    ];
    for (what, token) in &hostile {
        let resp = jwt_bearer(&app, token).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{what}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "invalid_grant", "{what}: {body}");
    }
    // `alg: none` and an HMAC signature made with the public key as the secret.
    let unsigned =
        format!("{}.{}.", B64.encode(r#"{"alg":"none","typ":"JWT"}"#), B64.encode(claims(&|_| {}).to_string()));
    let jwk_x = idp.jwks.lock().unwrap()["keys"][0]["x"].as_str().unwrap().to_owned();
    let hmac = jsonwebtoken::encode(
        &jsonwebtoken::Header { kid: Some("k1".into()), ..jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256) },
        &claims(&|_| {}),
        &jsonwebtoken::EncodingKey::from_secret(jwk_x.as_bytes()),
    )
    .unwrap();
    for token in [unsigned, hmac] {
        oauth_error(jwt_bearer(&app, &token).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
    }
    // No assertion at all.
    let resp = app.client.post(app.url("/api/v1/token")).form(&[("grant_type", JWT_BEARER)]).send().await.unwrap();
    oauth_error(resp, StatusCode::BAD_REQUEST, "invalid_request").await;

    // A JWKS that turns hostile: only an HMAC key, then huge. The cached good one serves until a
    // token names a kid it lacks; then the refetch finds nothing usable.
    let good = idp.sign(&claims(&|_| {}));
    assert_eq!(jwt_bearer(&app, &good).await.status(), StatusCode::OK);
    *idp.jwks.lock().unwrap() = json!({ "keys": [{ "kty": "oct", "kid": "k2", "k": "c2VjcmV0" }] });
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("k2".into());
    let forged =
        jsonwebtoken::encode(&header, &claims(&|_| {}), &jsonwebtoken::EncodingKey::from_secret(b"secret")).unwrap();
    oauth_error(jwt_bearer(&app, &forged).await, StatusCode::BAD_REQUEST, "invalid_grant").await;

    // A partner whose keys are unreachable, or huge.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let huge = Issuer::start().await;
    *huge.jwks.lock().unwrap() =
        json!({ "keys": [{ "kty": "EC", "crv": "P-256", "x": "a".repeat(100_000), "y": "b" }] });
    for (name, issuer, uri, signer) in [
        ("dead", format!("http://{dead}/issuer"), format!("http://{dead}/jwks"), &idp),
        ("huge", huge.url.clone(), format!("{}/jwks", huge.url), &huge),
    ] {
        trust(
            &app,
            &owner,
            json!({ "name": name, "issuer": issuer, "jwks_uri": uri, "audience": "agentidp-test", "algorithms": ["ES256"] }),
            json!({ "sub": "svc" }),
        )
        .await;
        let t = now();
        let token = signer.sign(&json!({ "iss": issuer, "sub": "svc", "aud": "agentidp-test", "exp": t + 60, "iat": t,
                                         "jti": uuid::Uuid::new_v4().to_string() }));
        oauth_error(jwt_bearer(&app, &token).await, StatusCode::BAD_REQUEST, "invalid_grant").await;
    }

    // Another organization sees none of this organization's partners or policies.
    let other = app.org_with_owner(&owner, "Other Org", "owner@other.test").await;
    let partners =
        json_ok(app.as_(&owner, Method::GET, "/api/v1/federation/partners").send().await.unwrap(), StatusCode::OK)
            .await;
    let id = partners[0]["id"].as_str().unwrap();
    for method in [Method::GET, Method::DELETE, Method::HEAD] {
        let resp = app.as_(&other, method.clone(), &format!("/api/v1/federation/partners/{id}")).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method}");
    }
    let theirs =
        json_ok(app.as_(&other, Method::GET, "/api/v1/federation/partners").send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(theirs, json!([]));
}
