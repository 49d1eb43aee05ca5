//! Trust documents: did:web resolution, agents' keys, signed agent cards, compliance reports, the
//! marketplace and the scaffold snippets (run for real).

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{ADMIN_EMAIL, Caller, PASSWORD, TestApp, assert_problem, json_ok, spawn_app_with};

/// An app whose `server.public_url` is its real address, so that the URLs inside its documents
/// (DIDs, token URLs) lead back to it.
async fn app_at_its_own_url(extra: &[(&str, Value)]) -> TestApp {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut config = vec![
        ("server.bind", json!(format!("127.0.0.1:{port}"))),
        ("server.public_url", json!(format!("http://127.0.0.1:{port}"))),
    ];
    config.extend(extra.iter().cloned());
    spawn_app_with(&config).await
}

/// The did:web method's rule (W3C did:web §3.2, Read): the method-specific id's `:`-separated
/// parts, percent-decoded, are the host and path; no path means `/.well-known/did.json`, else
/// `<path>/did.json`. The method names https; this server listens on plain loopback http.
fn did_web_url(did: &str, scheme: &str) -> String {
    let id = did.strip_prefix("did:web:").expect("a did:web DID");
    let parts: Vec<String> = id.split(':').map(percent_decode).collect();
    let (host, path) = parts.split_first().unwrap();
    if path.is_empty() {
        format!("{scheme}://{host}/.well-known/did.json")
    } else {
        format!("{scheme}://{host}/{}/did.json", path.join("/"))
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn ed25519_jwk() -> Value {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    json!({ "kty": "OKP", "crv": "Ed25519", "x": B64.encode(pair.public_key().as_ref()) })
}

async fn send(app: &TestApp, who: &Caller, method: Method, path: &str, body: Option<Value>) -> reqwest::Response {
    let mut req = app.as_(who, method, path);
    if let Some(b) = body {
        req = req.json(&b);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn did_web_resolution_finds_our_documents_and_the_issuer_keys_are_the_jwks() {
    let app = app_at_its_own_url(&[]).await;
    let admin = app.bootstrap().await;
    let issuer_did = format!("did:web:{}", app.addr.to_string().replace(':', "%3A"));

    let url = did_web_url(&issuer_did, "http");
    let resp = app.client.get(&url).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/did+json");
    let doc = json_ok(resp, StatusCode::OK).await;
    assert_eq!(doc["id"], issuer_did);
    let jwks = json_ok(app.get("/.well-known/jwks.json").await, StatusCode::OK).await;
    let mut from_did: Vec<Value> =
        doc["verificationMethod"].as_array().unwrap().iter().map(|m| m["publicKeyJwk"].clone()).collect();
    let mut from_jwks = jwks["keys"].as_array().unwrap().clone();
    let by_kid = |v: &Value| v["kid"].as_str().unwrap().to_owned();
    from_did.sort_by_key(by_kid);
    from_jwks.sort_by_key(by_kid);
    assert!(!from_jwks.is_empty());
    assert_eq!(from_did, from_jwks, "the issuer's verification methods are exactly the JWKS keys");
    for m in doc["verificationMethod"].as_array().unwrap() {
        assert_eq!(m["controller"], issuer_did);
        assert_eq!(m["id"], format!("{issuer_did}#{}", m["publicKeyJwk"]["kid"].as_str().unwrap()));
        assert!(doc["assertionMethod"].as_array().unwrap().contains(&m["id"]));
    }

    // An agent with a registered key: its DID, as the delegation API names it, resolves too.
    let agent = app.create_agent(&admin, json!({ "name": "resolver-target" })).await;
    let agent_id = agent["id"].as_str().unwrap();
    let jwk = ed25519_jwk();
    let key = json_ok(
        send(&app, &admin, Method::POST, &format!("/api/v1/agents/{agent_id}/keys"), Some(json!({ "jwk": jwk }))).await,
        StatusCode::CREATED,
    )
    .await;
    let kid = key["kid"].as_str().unwrap().to_owned();
    let agent_did = format!("{issuer_did}:agents:{agent_id}");
    assert_eq!(key["verification_method"], format!("{agent_did}#{kid}"));
    let url = did_web_url(&agent_did, "http");
    assert_eq!(url, app.url(&format!("/agents/{agent_id}/did.json")));
    let doc = json_ok(app.client.get(&url).send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(doc["id"], agent_did);
    assert_eq!(doc["controller"], issuer_did);
    let methods = doc["verificationMethod"].as_array().unwrap();
    assert_eq!(methods.len(), 1);
    assert_eq!(methods[0]["publicKeyJwk"]["x"], jwk["x"]);
    assert_eq!(methods[0]["publicKeyJwk"]["kid"], kid.as_str());
    assert!(doc["service"].as_array().unwrap().iter().any(|s| s["serviceEndpoint"] == app.url("/api/v1/token")));
    // Nothing private in it.
    let text = doc.to_string();
    assert!(!text.contains(ADMIN_EMAIL) && !text.contains("resolver-target") && !text.contains(&admin.user_id));

    // The same key again is a conflict; a private key or a symmetric one is refused.
    assert_problem(
        send(&app, &admin, Method::POST, &format!("/api/v1/agents/{agent_id}/keys"), Some(json!({ "jwk": jwk }))).await,
        StatusCode::CONFLICT,
        "kid_taken",
    )
    .await;
    let mut private = jwk.clone();
    private["d"] = json!(B64.encode([1u8; 32]));
    for bad in [private, json!({ "kty": "oct", "k": "c2VjcmV0" }), json!({ "kty": "RSA", "n": "AQAB", "e": "AQAB" })] {
        assert_problem(
            send(&app, &admin, Method::POST, &format!("/api/v1/agents/{agent_id}/keys"), Some(json!({ "jwk": bad })))
                .await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_jwk",
        )
        .await;
    }

    // Another organization sees none of it, by any method.
    let other = app.org_with_owner(&admin, "Other Org", "owner@other.test").await;
    for (method, path) in [
        (Method::GET, format!("/api/v1/agents/{agent_id}/keys")),
        (Method::POST, format!("/api/v1/agents/{agent_id}/keys")),
        (Method::DELETE, format!("/api/v1/agents/{agent_id}/keys/{kid}")),
        (Method::GET, format!("/api/v1/agents/{agent_id}/card")),
        (Method::PUT, format!("/api/v1/agents/{agent_id}/listing")),
        (Method::DELETE, format!("/api/v1/agents/{agent_id}/listing")),
    ] {
        let body = (method == Method::POST).then(|| json!({ "jwk": ed25519_jwk() }));
        let resp = send(&app, &other, method.clone(), &path, body).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {path}");
    }
    let resp = app.client.head(app.url(&format!("/api/v1/agents/{agent_id}/keys"))).bearer_auth(&other.token).send();
    assert_eq!(resp.await.unwrap().status(), StatusCode::NOT_FOUND);

    // Deleting the key removes it from the document at once.
    let resp = send(&app, &admin, Method::DELETE, &format!("/api/v1/agents/{agent_id}/keys/{kid}"), None).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let doc = json_ok(app.client.get(&url).send().await.unwrap(), StatusCode::OK).await;
    assert!(doc["verificationMethod"].as_array().unwrap().is_empty());

    // Unknown agents, suspended agents and hostile paths do not resolve, and none is a 500.
    let unknown = app.get(&format!("/agents/{}/did.json", uuid::Uuid::now_v7())).await;
    assert_problem(unknown, StatusCode::NOT_FOUND, "not_found").await;
    for path in ["/agents/..%2F..%2Fetc%2Fpasswd/did.json", "/agents/not-a-uuid/did.json", "/agents/%00/did.json"] {
        assert_eq!(app.get(path).await.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let resp = send(
        &app,
        &admin,
        Method::PATCH,
        &format!("/api/v1/agents/{agent_id}"),
        Some(json!({ "status": "suspended" })),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(app.client.get(&url).send().await.unwrap().status(), StatusCode::NOT_FOUND);
}

/// Rebuilds the compact JWS from a card's detached signature and verifies it with jsonwebtoken
/// (a JOSE library we did not write) against the published JWKS.
fn verify_card(card: &Value, jwks: &jsonwebtoken::jwk::JwkSet) -> Result<(), String> {
    let signature = &card["signatures"][0];
    let protected = signature["protected"].as_str().ok_or("no protected header")?;
    let mut body = card.clone();
    body.as_object_mut().unwrap().remove("signatures");
    let payload = B64.encode(jcs(&body));
    let compact = format!("{protected}.{payload}.{}", signature["signature"].as_str().ok_or("no signature")?);
    let header = jsonwebtoken::decode_header(&compact).map_err(|e| e.to_string())?;
    let jwk = jwks.find(header.kid.as_deref().ok_or("no kid")?).ok_or("kid not in the JWKS")?;
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    let mut validation = jsonwebtoken::Validation::new(header.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_aud = false;
    jsonwebtoken::decode::<Value>(&compact, &key, &validation).map(|_| ()).map_err(|e| e.to_string())
}

/// RFC 8785 for what a card holds (no floats): members sorted by UTF-16 code units, compact.
fn jcs(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.encode_utf16().cmp(b.encode_utf16()));
            let members: Vec<String> =
                keys.iter().map(|k| format!("{}:{}", Value::from(k.as_str()), jcs(&map[*k]))).collect();
            format!("{{{}}}", members.join(","))
        }
        Value::Array(items) => format!("[{}]", items.iter().map(jcs).collect::<Vec<_>>().join(",")),
        other => other.to_string(),
    }
}

#[tokio::test]
async fn agent_cards_are_signed_over_their_canonical_json_and_verify_with_a_jose_library() {
    let app = app_at_its_own_url(&[]).await;
    let admin = app.bootstrap().await;
    let agent = app
        .create_agent(
            &admin,
            json!({ "name": "card-agent", "description": "Summarises tickets", "capabilities": ["summarize", "triage"],
                    "allowed_scopes": ["agents:read"] }),
        )
        .await;
    let id = agent["id"].as_str().unwrap();
    let jwks: jsonwebtoken::jwk::JwkSet = app.get("/.well-known/jwks.json").await.json().await.unwrap();

    // Unlisted: no public card; the organization still reads it.
    assert_problem(
        app.get(&format!("/agents/{id}/.well-known/agent-card.json")).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let card =
        json_ok(send(&app, &admin, Method::GET, &format!("/api/v1/agents/{id}/card"), None).await, StatusCode::OK)
            .await;
    assert_eq!(card["name"], "card-agent");
    assert_eq!(card["protocolVersion"], "0.3.0");
    let skills: Vec<&str> = card["skills"].as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(skills, ["summarize", "triage"]);
    assert_eq!(card["securitySchemes"]["agentidp"]["flows"]["clientCredentials"]["tokenUrl"], app.url("/api/v1/token"));
    verify_card(&card, &jwks).unwrap();

    // A changed card no longer verifies; neither does one signed by a key we do not publish.
    let mut tampered = card.clone();
    tampered["name"] = json!("someone-else");
    assert!(verify_card(&tampered, &jwks).is_err());
    let mut wrong_kid = card.clone();
    let mut header: Value =
        serde_json::from_slice(&B64.decode(card["signatures"][0]["protected"].as_str().unwrap()).unwrap()).unwrap();
    header["kid"] = json!("not-ours");
    wrong_kid["signatures"][0]["protected"] = json!(B64.encode(header.to_string()));
    assert!(verify_card(&wrong_kid, &jwks).is_err());

    // Listed: public, and the same signature scheme.
    json_ok(send(&app, &admin, Method::PUT, &format!("/api/v1/agents/{id}/listing"), None).await, StatusCode::OK).await;
    let public = json_ok(app.get(&format!("/agents/{id}/.well-known/agent-card.json")).await, StatusCode::OK).await;
    verify_card(&public, &jwks).unwrap();
    assert!(!public.to_string().contains(&admin.user_id), "no owner in a public card");

    // The export: every agent, in both shapes.
    app.create_agent(&admin, json!({ "name": "second" })).await;
    let a2a =
        json_ok(send(&app, &admin, Method::GET, "/api/v1/compliance/agent-cards", None).await, StatusCode::OK).await;
    assert_eq!(a2a["format"], "a2a");
    assert_eq!(a2a["items"].as_array().unwrap().len(), 2);
    for item in a2a["items"].as_array().unwrap() {
        verify_card(item, &jwks).unwrap();
    }
    let oasf = json_ok(
        send(&app, &admin, Method::GET, "/api/v1/compliance/agent-cards?format=oasf", None).await,
        StatusCode::OK,
    )
    .await;
    let names: Vec<&str> = oasf["items"].as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert!(names.iter().all(|n| n.ends_with("/card-agent") || n.ends_with("/second")), "{names:?}");
    let resp = send(&app, &admin, Method::GET, "/api/v1/compliance/agent-cards?format=xml", None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

fn control<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["controls"].as_array().unwrap().iter().find(|c| c["id"] == id).unwrap_or_else(|| panic!("{id} in {report}"))
}

#[tokio::test]
async fn the_compliance_report_follows_changes_and_credential_age_on_the_clock() {
    let app = spawn_app_with(&[]).await;
    let admin = app.bootstrap().await;
    // An API key that outlives the clock moving 91 days (a session would not).
    let key = app.api_key(&admin, None).await;
    let controls = json_ok(app.get("/api/v1/compliance/controls").await, StatusCode::OK).await;
    assert!(controls.as_array().unwrap().iter().any(|c| c["id"] == "agent_credentials_rotated"));

    let client = app.agent_client(&admin, &[]).await;
    let first = json_ok(send(&app, &key, Method::GET, "/api/v1/compliance/report", None).await, StatusCode::OK).await;
    assert_eq!(first["cached"], false);
    assert_eq!(control(&first, "agent_credentials_rotated")["status"], "pass");
    assert_eq!(control(&first, "audit_chain_intact")["status"], "pass");
    assert_eq!(control(&first, "agent_credentials_rotated")["facts"]["credentials"], 1);
    // The API key has no expiry: that control fails today already.
    assert_eq!(control(&first, "api_keys_expire")["status"], "fail");
    // Nothing changed: the cached report.
    let again = json_ok(send(&app, &key, Method::GET, "/api/v1/compliance/report", None).await, StatusCode::OK).await;
    assert_eq!(again["cached"], true);
    assert_eq!(again["generated_at"], first["generated_at"]);

    // An audited change (a second credential) makes the next read recompute.
    app.credential(&admin, &client.agent_id).await;
    let changed = json_ok(send(&app, &key, Method::GET, "/api/v1/compliance/report", None).await, StatusCode::OK).await;
    assert_eq!(changed["cached"], false);
    assert_eq!(control(&changed, "agent_credentials_rotated")["facts"]["credentials"], 2);

    // 91 days on: the credentials pass their 90-day limit and the report says so (the cached one
    // is too old on the same clock to be served).
    app.state.clock().set(time::OffsetDateTime::now_utc() + time::Duration::days(91));
    let later = json_ok(send(&app, &key, Method::GET, "/api/v1/compliance/report", None).await, StatusCode::OK).await;
    assert_eq!(later["cached"], false);
    let stale = control(&later, "agent_credentials_rotated");
    assert_eq!(stale["status"], "fail", "{stale}");
    assert_eq!(stale["facts"]["stale"], 2);
    assert_eq!(control(&later, "api_keys_rotated")["status"], "fail");
    assert!(later["summary"]["failed"].as_u64().unwrap() > first["summary"]["failed"].as_u64().unwrap());

    // A member may not read it; another organization's owner reads only its own.
    let org_id = admin.org_id.clone();
    app.add_member(&admin, &org_id, "member@acme.test", "member").await;
    let member = app.api_key(&app.sign_in("member@acme.test", PASSWORD).await, None).await;
    let resp = send(&app, &member, Method::GET, "/api/v1/compliance/report", None).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn the_marketplace_shows_listed_agents_and_nothing_private() {
    let app = app_at_its_own_url(&[]).await;
    let admin = app.bootstrap().await;
    let listed = app
        .create_agent(
            &admin,
            json!({ "name": "Translator 100%", "description": "Translates text", "capabilities": ["translate"],
                    "allowed_scopes": ["agents:read"], "metadata": { "internal": "secret-note" } }),
        )
        .await;
    let id = listed["id"].as_str().unwrap();
    let hidden = app.create_agent(&admin, json!({ "name": "Internal only", "capabilities": ["translate"] })).await;
    let empty = json_ok(app.get("/api/v1/marketplace").await, StatusCode::OK).await;
    assert_eq!(empty["items"], json!([]));

    let listing =
        json_ok(send(&app, &admin, Method::PUT, &format!("/api/v1/agents/{id}/listing"), None).await, StatusCode::OK)
            .await;
    // Field by field: exactly these, and nothing else.
    let mut fields: Vec<&str> = listing.as_object().unwrap().keys().map(String::as_str).collect();
    fields.sort();
    assert_eq!(
        fields,
        ["agent_card_url", "agent_id", "capabilities", "description", "did", "listed_at", "name", "publisher"]
    );
    assert_eq!(listing["publisher"], json!({ "name": "Acme Labs", "slug": "acme-labs" }));
    let page = json_ok(app.get("/api/v1/marketplace").await, StatusCode::OK).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let text = page.to_string();
    for private in ["secret-note", ADMIN_EMAIL, admin.user_id.as_str(), "agents:read", "Internal only", "owner"] {
        assert!(!text.contains(private), "{private} leaked: {text}");
    }
    let agent =
        json_ok(send(&app, &admin, Method::GET, &format!("/api/v1/agents/{id}"), None).await, StatusCode::OK).await;
    assert!(agent["listed_at"].is_string());
    assert_eq!(
        json_ok(app.get(&format!("/api/v1/marketplace/{id}")).await, StatusCode::OK).await["name"],
        "Translator 100%"
    );

    // Search: text (its LIKE characters are literal), capability, paging.
    let found = json_ok(app.get("/api/v1/marketplace?q=100%25").await, StatusCode::OK).await;
    assert_eq!(found["items"].as_array().unwrap().len(), 1);
    let none = json_ok(app.get("/api/v1/marketplace?q=%25%25x").await, StatusCode::OK).await;
    assert_eq!(none["items"], json!([]));
    let none = json_ok(app.get("/api/v1/marketplace?capability=cooking").await, StatusCode::OK).await;
    assert_eq!(none["items"], json!([]));
    let hidden_id = hidden["id"].as_str().unwrap();
    json_ok(
        send(&app, &admin, Method::PUT, &format!("/api/v1/agents/{hidden_id}/listing"), None).await,
        StatusCode::OK,
    )
    .await;
    let first = json_ok(app.get("/api/v1/marketplace?limit=1").await, StatusCode::OK).await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = json_ok(app.get(&format!("/api/v1/marketplace?limit=1&cursor={cursor}")).await, StatusCode::OK).await;
    assert_eq!(second["items"].as_array().unwrap().len(), 1);
    assert_ne!(second["items"][0]["agent_id"], first["items"][0]["agent_id"]);
    assert!(second["next_cursor"].is_null());
    assert_problem(app.get("/api/v1/marketplace?cursor=garbage!").await, StatusCode::BAD_REQUEST, "invalid_query")
        .await;
    assert_problem(app.get("/api/v1/marketplace?limit=0").await, StatusCode::BAD_REQUEST, "invalid_query").await;

    // Unlisting removes it at once, from the search, the listing and the public card.
    let resp = send(&app, &admin, Method::DELETE, &format!("/api/v1/agents/{id}/listing"), None).await;
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    assert_eq!(app.get(&format!("/api/v1/marketplace/{id}")).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(app.get(&format!("/agents/{id}/.well-known/agent-card.json")).await.status(), StatusCode::NOT_FOUND);
    let page = json_ok(app.get("/api/v1/marketplace").await, StatusCode::OK).await;
    assert!(page["items"].as_array().unwrap().iter().all(|i| i["agent_id"] != id));
    // A suspended agent leaves too, and cannot be listed.
    let resp = send(
        &app,
        &admin,
        Method::PATCH,
        &format!("/api/v1/agents/{hidden_id}"),
        Some(json!({ "status": "suspended" })),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let page = json_ok(app.get("/api/v1/marketplace").await, StatusCode::OK).await;
    assert_eq!(page["items"], json!([]));
    assert_problem(
        send(&app, &admin, Method::PUT, &format!("/api/v1/agents/{hidden_id}/listing"), None).await,
        StatusCode::CONFLICT,
        "agent_suspended",
    )
    .await;

    // A member who does not own the agent cannot list it.
    let org_id = admin.org_id.clone();
    app.add_member(&admin, &org_id, "member@acme.test", "member").await;
    let member = app.sign_in("member@acme.test", PASSWORD).await;
    let resp = send(&app, &member, Method::PUT, &format!("/api/v1/agents/{id}/listing"), None).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn public_documents_are_rate_limited_per_address() {
    let app = spawn_app_with(&[("trust.public_reads_per_minute", json!(3))]).await;
    for _ in 0..3 {
        assert_eq!(app.get("/api/v1/marketplace").await.status(), StatusCode::OK);
    }
    let refused = app.get("/api/v1/marketplace").await;
    assert_eq!(refused.headers()["retry-after"], "60");
    assert_problem(refused, StatusCode::TOO_MANY_REQUESTS, "public_reads_throttled").await;
    assert_problem(
        app.get(&format!("/agents/{}/did.json", uuid::Uuid::now_v7())).await,
        StatusCode::TOO_MANY_REQUESTS,
        "public_reads_throttled",
    )
    .await;
}

#[tokio::test]
async fn scaffold_snippets_run_as_given_and_never_carry_the_secret() {
    let app = app_at_its_own_url(&[]).await;
    let admin = app.bootstrap().await;
    let client = app.agent_client(&admin, &["agents:read"]).await;
    let dir = std::env::temp_dir().join(format!("agentidp-scaffold-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    for (lang, interpreter) in [("curl", "bash"), ("python", "python3")] {
        let s = json_ok(
            send(
                &app,
                &admin,
                Method::GET,
                &format!("/api/v1/scaffold?agent_id={}&lang={lang}", client.agent_id),
                None,
            )
            .await,
            StatusCode::OK,
        )
        .await;
        let (code, env) = (s["code"].as_str().unwrap(), s["env"].as_str().unwrap());
        assert!(!code.contains(&client.secret) && !env.contains(&client.secret), "no secret in the scaffold");
        assert!(env.contains(&format!("AGENTIDP_CLIENT_ID={}\n", client.client_id)), "{env}");
        assert!(env.contains("AGENTIDP_SCOPES=agents:read\n"), "{env}");
        // The developer's one step: paste the secret.
        let filled = env.replace("AGENTIDP_CLIENT_SECRET=\n", &format!("AGENTIDP_CLIENT_SECRET={}\n", client.secret));
        std::fs::write(dir.join(".env"), filled).unwrap();
        let file = s["filename"].as_str().unwrap();
        std::fs::write(dir.join(file), code).unwrap();
        let out = tokio::process::Command::new(interpreter).arg(file).current_dir(&dir).output().await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{lang}: {stdout} {}", String::from_utf8_lossy(&out.stderr));
        let me: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("{lang} printed {stdout}"));
        assert_eq!(me["actor_id"], format!("agent:{}", client.agent_id), "{lang}: {me}");
    }
    std::fs::remove_dir_all(&dir).ok();

    // The other languages are offered; an unknown one and another organization's agent are not.
    for lang in ["typescript", "rust"] {
        let path = format!("/api/v1/scaffold?agent_id={}&lang={lang}", client.agent_id);
        assert!(json_ok(send(&app, &admin, Method::GET, &path, None).await, StatusCode::OK).await["code"].is_string());
    }
    let path = format!("/api/v1/scaffold?agent_id={}&lang=cobol", client.agent_id);
    assert_eq!(send(&app, &admin, Method::GET, &path, None).await.status(), StatusCode::BAD_REQUEST);
    let other = app.org_with_owner(&admin, "Other Org", "owner@other.test").await;
    let path = format!("/api/v1/scaffold?agent_id={}&lang=curl", client.agent_id);
    assert_eq!(send(&app, &other, Method::GET, &path, None).await.status(), StatusCode::NOT_FOUND);
}

/// `trust.max_keys_per_agent` under concurrency: many callers registering keys for one agent at
/// once get exactly the limit through, the rest 409 `too_many_keys` (the count is taken under the
/// agent's row lock; read-then-insert without it would let more through).
#[tokio::test]
async fn concurrent_key_registrations_stop_at_the_limit_exactly() {
    let limit = 4;
    let app = spawn_app_with(&[("trust.max_keys_per_agent", json!(limit))]).await;
    let admin = app.bootstrap().await;
    let agent = app.create_agent(&admin, json!({ "name": "many-keys" })).await;
    let agent_id = agent["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/agents/{agent_id}/keys");
    // Each caller retries a 503 (the test's small pool, exhausted while they queue for the lock).
    let attempts: Vec<_> = (0..24)
        .map(|_| {
            let (app, admin, path, jwk) = (&app, &admin, &path, ed25519_jwk());
            async move {
                loop {
                    let resp = app.as_(admin, Method::POST, path).json(&json!({ "jwk": jwk })).send().await.unwrap();
                    let status = resp.status();
                    let body: Value = resp.json().await.unwrap_or(Value::Null);
                    if status != StatusCode::SERVICE_UNAVAILABLE {
                        return (status, body["code"].as_str().unwrap_or_default().to_owned());
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        })
        .collect();
    let results = futures_util::future::join_all(attempts).await;
    let created = results.iter().filter(|(s, _)| *s == StatusCode::CREATED).count();
    let refused = results.iter().filter(|(s, c)| *s == StatusCode::CONFLICT && c == "too_many_keys").count();
    assert_eq!(created, limit, "{results:?}");
    assert_eq!(refused, results.len() - limit, "{results:?}");
    let keys = json_ok(send(&app, &admin, Method::GET, &path, None).await, StatusCode::OK).await;
    let keys = keys.get("items").unwrap_or(&keys).as_array().unwrap().len();
    assert_eq!(keys, limit, "the agent holds exactly the limit");
}

/// `trust.public_reads_per_minute` under concurrency: many anonymous reads of public documents
/// from one address at once get at most the limit through (exactly, within the minute), the rest
/// 429 problem+json with `Retry-After`. On several threads, so that the requests are charged in
/// parallel, not one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_public_reads_from_one_address_stop_at_the_limit() {
    let limit = 7;
    let app = spawn_app_with(&[("trust.public_reads_per_minute", json!(limit))]).await;
    let reads: Vec<_> = (0..40)
        .map(|i| {
            let url = if i % 2 == 0 {
                app.url("/api/v1/marketplace")
            } else {
                app.url(&format!("/agents/{}/did.json", uuid::Uuid::now_v7()))
            };
            let req = app.client.get(url);
            async move {
                let resp = req.send().await.unwrap();
                let status = resp.status();
                let ct = resp.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
                let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                (status, ct, retry, body["code"].as_str().unwrap_or_default().to_owned())
            }
        })
        .collect();
    let results = futures_util::future::join_all(reads).await;
    // Through the limiter: the list (200) and a DID of no agent (404).
    let through = results.iter().filter(|(s, ..)| matches!(s.as_u16(), 200 | 404)).count();
    let throttled: Vec<_> = results.iter().filter(|(s, ..)| *s == StatusCode::TOO_MANY_REQUESTS).collect();
    assert_eq!(through, limit, "{results:?}");
    assert_eq!(through + throttled.len(), results.len(), "{results:?}");
    for (_, ct, retry, code) in throttled {
        assert_eq!(ct.as_deref(), Some("application/problem+json"));
        assert_eq!(retry.as_deref(), Some("60"));
        assert_eq!(code, "public_reads_throttled");
    }
}
