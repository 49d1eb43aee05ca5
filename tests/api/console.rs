//! The web console: its security headers and CSRF refusals over plain HTTP, and what a person
//! does with it in a real headless Chromium (sign in, agents and a secret shown once, the live
//! city map, the analytics charts against the API's numbers, the audit chain, what a member sees,
//! an XSS payload shown as text). Screenshots go under the target directory.

use std::{io::Read, time::Duration};

use base64::Engine as _;
use reqwest::{Method, StatusCode, header};
use serde_json::{Value, json};
use sha2::{Digest, Sha384};

use crate::helpers::{ADMIN_EMAIL, Caller, PASSWORD, TestApp, browser::Browser, json_ok, spawn_app};

/// A client that keeps cookies and does not follow redirects, like a browser one step at a time.
fn cookie_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The value of `<input ... name="{name}" value="...">` in a page.
fn hidden_input(html: &str, name: &str) -> String {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html.find(&marker).unwrap_or_else(|| panic!("no {name} field in the page")) + marker.len();
    html[start..start + html[start..].find('"').unwrap()].to_owned()
}

/// Signs in through the console's form with a cookie-keeping client; returns the session token.
async fn console_sign_in(app: &TestApp, client: &reqwest::Client, email: &str) -> String {
    let page = client.get(app.url("/console/login")).send().await.unwrap().text().await.unwrap();
    let csrf = hidden_input(&page, "csrf");
    let resp = client
        .post(app.url("/console/login"))
        .form(&[("email", email), ("password", PASSWORD), ("csrf", &csrf), ("next", "/console/agents")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER, "{}", resp.text().await.unwrap());
    assert_eq!(resp.headers()[header::LOCATION], "/console/agents");
    let cookie = resp
        .headers()
        .get_all(header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("agentidp_session="))
        .expect("the API's session cookie is handed on");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"), "{cookie}");
    cookie.trim_start_matches("agentidp_session=").split(';').next().unwrap().to_owned()
}

async fn agent_names(app: &TestApp, by: &Caller) -> Vec<String> {
    let page = json_ok(app.as_(by, Method::GET, "/api/v1/agents").send().await.unwrap(), StatusCode::OK).await;
    page["items"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn console_pages_carry_a_strict_csp_and_forms_without_a_valid_token_change_nothing() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let client = cookie_client();

    // A browser at / goes to the console; an API client still gets the API's 404.
    let resp = client.get(app.url("/")).header(header::ACCEPT, "text/html").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[header::LOCATION], "/console");
    let resp = client.get(app.url("/")).header(header::ACCEPT, "application/json").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/problem+json");
    // Signed out: every page sends you to sign in, and back afterwards.
    let resp = client.get(app.url("/console/agents?q=x")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[header::LOCATION], "/console/login?next=%2Fconsole%2Fagents%3Fq%3Dx");

    let resp = client.get(app.url("/console/login")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let csp = resp.headers()[header::CONTENT_SECURITY_POLICY].to_str().unwrap().to_owned();
    for part in ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"] {
        assert!(csp.contains(part), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert_eq!(resp.headers()[header::X_FRAME_OPTIONS], "DENY");
    assert_eq!(resp.headers()[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    let page = resp.text().await.unwrap();
    assert!(!page.contains("<script>") && !page.contains(" style="), "no inline script or style");

    // The assets: embedded, named by their hash, cacheable for a year, gzipped, and matching the
    // integrity hash the page names.
    for (attr, tag) in [("href", "<link rel=\"stylesheet\""), ("src", "<script")] {
        let at = page.find(tag).unwrap();
        let element = &page[at..at + page[at..].find('>').unwrap()];
        let url = element.split(&format!("{attr}=\"")).nth(1).unwrap().split('"').next().unwrap();
        let integrity = element.split("integrity=\"").nth(1).unwrap().split('"').next().unwrap();
        assert!(url.starts_with("/console/assets/"), "{url}");
        let resp = client.get(app.url(url)).header(header::ACCEPT_ENCODING, "gzip").send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CACHE_CONTROL], "public, max-age=31536000, immutable");
        assert_eq!(resp.headers()[header::CONTENT_ENCODING], "gzip");
        let gz = resp.bytes().await.unwrap();
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut raw).unwrap();
        let sri = format!("sha384-{}", base64::engine::general_purpose::STANDARD.encode(Sha384::digest(&raw)));
        assert_eq!(sri, integrity, "{url}");
        let plain = client.get(app.url(url)).send().await.unwrap();
        assert!(plain.headers().get(header::CONTENT_ENCODING).is_none());
        assert_eq!(plain.bytes().await.unwrap().len(), raw.len());
    }
    assert_eq!(client.get(app.url("/console/assets/nothing.js")).send().await.unwrap().status(), StatusCode::NOT_FOUND);

    // Sign-in without the form's token is refused before the password is looked at.
    let bare = cookie_client();
    let resp = bare
        .post(app.url("/console/login"))
        .form(&[("email", ADMIN_EMAIL), ("password", PASSWORD), ("csrf", "made-up")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(
        resp.headers().get_all(header::SET_COOKIE).iter().all(|c| !c.to_str().unwrap().starts_with("agentidp_session"))
    );
    // A wrong password shows the API's problem detail, and the API's throttle applies.
    let page = client.get(app.url("/console/login")).send().await.unwrap().text().await.unwrap();
    let csrf = hidden_input(&page, "csrf");
    let mut last = None;
    for _ in 0..7 {
        let resp = client
            .post(app.url("/console/login"))
            .form(&[("email", "nobody@acme.test"), ("password", "wrong"), ("csrf", &csrf)])
            .send()
            .await
            .unwrap();
        last = Some((resp.status(), resp.headers().get(header::RETRY_AFTER).cloned(), resp.text().await.unwrap()));
        if last.as_ref().unwrap().0 == StatusCode::TOO_MANY_REQUESTS {
            break;
        }
        assert_eq!(last.as_ref().unwrap().0, StatusCode::UNAUTHORIZED);
        assert!(last.as_ref().unwrap().2.contains("Invalid email or password."));
    }
    let (status, retry_after, body) = last.unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(retry_after.is_some());
    assert!(body.contains("Too many failed logins"), "{body}");
    assert!(body.contains("login_throttled"));

    // Signed in: a form needs the page's token; without it, or from another site, nothing happens.
    let session = console_sign_in(&app, &client, ADMIN_EMAIL).await;
    let page = client.get(app.url("/console/agents")).send().await.unwrap().text().await.unwrap();
    let csrf = hidden_input(&page, "csrf");
    let resp = client.post(app.url("/console/agents")).form(&[("name", "no-token")]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = client
        .post(app.url("/console/agents"))
        .form(&[("name", "wrong-token"), ("csrf", "AAAA")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = client
        .post(app.url("/console/agents"))
        .header(header::ORIGIN, "http://evil.example")
        .form(&[("name", "cross-site"), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Another session's token does not fit this session.
    let other = cookie_client();
    console_sign_in(&app, &other, ADMIN_EMAIL).await;
    let others_page = other.get(app.url("/console/agents")).send().await.unwrap().text().await.unwrap();
    let others_csrf = hidden_input(&others_page, "csrf");
    assert_ne!(others_csrf, csrf);
    let resp = client
        .post(app.url("/console/agents"))
        .form(&[("name", "other-token"), ("csrf", others_csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(agent_names(&app, &admin).await.is_empty(), "no refused form created anything");

    // With the token, it does what the API does.
    let resp = client
        .post(app.url("/console/agents"))
        .form(&[("name", "from-the-console"), ("capabilities", "search, code"), ("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert!(resp.headers()[header::LOCATION].to_str().unwrap().ends_with("?done=created"));
    assert_eq!(agent_names(&app, &admin).await, ["from-the-console"]);
    // The API's refusals come back as its problem detail: a name the API rejects.
    let resp = client.post(app.url("/console/agents")).form(&[("name", ""), ("csrf", &csrf)]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/html; charset=utf-8");
    let body = resp.text().await.unwrap();
    assert!(body.contains("class=\"problem\"") && body.contains("name"), "{body}");

    // Signing out ends the session at the API too.
    let resp = client.post(app.url("/console/logout")).form(&[("csrf", &csrf)]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(app.me_status(&session).await, StatusCode::UNAUTHORIZED);
}

/// Signs in through the form in the browser; lands on `next`.
async fn browser_sign_in(app: &TestApp, browser: &Browser, email: &str, next: &str) {
    browser.goto(&app.url(&format!("/console/login?next={next}"))).await;
    let e = browser.find("#email").await;
    browser.fill(&e, email).await;
    let p = browser.find("#password").await;
    browser.fill(&p, PASSWORD).await;
    browser.click(&browser.find("#sign-in").await).await;
    browser.wait_for_url(Duration::from_secs(30), |u| u.contains(next)).await;
}

#[tokio::test]
async fn a_person_creates_an_agent_sees_its_secret_once_and_suspends_it_in_a_browser() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let browser = Browser::start(1280, 800).await;
    browser_sign_in(&app, &browser, ADMIN_EMAIL, "/console/agents").await;
    browser.find("p.empty").await;
    let name = browser.find("#a-name").await;
    browser.fill(&name, "indexer").await;
    browser.fill(&browser.find("#a-scopes").await, "agents:read").await;
    browser.click(&browser.find("#create-agent button[type=submit]").await).await;
    let url = browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=created")).await;
    let agent_url = url.split('?').next().unwrap().to_owned();
    let agent_id = agent_url.rsplit('/').next().unwrap().to_owned();
    assert_eq!(browser.text(&browser.find("#agent-title").await).await, "indexer active");

    browser.click(&browser.find("#create-credential").await).await;
    let secret = browser.text(&browser.find("#client-secret").await).await;
    let client_id = browser.text(&browser.find("#client-id").await).await;
    assert!(browser.text(&browser.find("#secret .warning").await).await.contains("shown only once"));
    assert!(browser.find_now("button[data-copy=client-secret]:not([hidden])").await.is_some(), "a copy button");
    browser.screenshot("console-secret-once").await;
    // The secret is the real one: it gets a token.
    let resp = app
        .client
        .post(app.url("/api/v1/token"))
        .basic_auth(&client_id, Some(&secret))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    // Loaded again, the page shows the credential but never its secret.
    browser.goto(&agent_url).await;
    browser.find("#credentials").await;
    assert!(browser.find_now("#client-secret").await.is_none());
    assert!(!browser.source().await.contains(&secret));
    assert!(browser.text(&browser.find("#credentials").await).await.contains(&client_id));

    // Suspend (the confirmation is the page's own; accept it).
    browser.execute("window.confirm = function () { return true; };", vec![]).await;
    browser.click(&browser.find("#suspend").await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=suspended")).await;
    assert_eq!(browser.text(&browser.find("#agent-status").await).await, "suspended");
    let agent = json_ok(
        app.as_(&admin, Method::GET, &format!("/api/v1/agents/{agent_id}")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(agent["status"], "suspended");
    assert!(browser.find_now("#reactivate").await.is_some());
    browser.screenshot("console-agent").await;
    browser.goto(&app.url("/console/agents")).await;
    browser.find("#agents").await;
    browser.screenshot("console-agents").await;
}

async fn send(app: &TestApp, by: &Caller, method: Method, path: &str, body: Value) -> Value {
    let resp = app.as_(by, method, path).json(&body).send().await.unwrap();
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{path}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

#[tokio::test]
async fn the_city_map_shows_a_heartbeat_and_a_presence_without_a_reload() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let north = send(&app, &admin, Method::POST, "/api/v1/city/zones", json!({ "name": "North" })).await;
    let south = send(&app, &admin, Method::POST, "/api/v1/city/zones", json!({ "name": "South" })).await;
    let room = |zone: &Value, name: &str, x: i32, y: i32, w: i32| json!({ "zone_id": zone["id"], "name": name, "kind": "lab", "capacity": 8, "x": x, "y": y, "width": w, "height": 2 });
    let lab = send(&app, &admin, Method::POST, "/api/v1/city/rooms", room(&north, "Lab", 0, 0, 3)).await;
    send(&app, &admin, Method::POST, "/api/v1/city/rooms", room(&north, "Library", 4, 1, 2)).await;
    let hall = send(&app, &admin, Method::POST, "/api/v1/city/rooms", room(&south, "Hall", 0, 0, 4)).await;
    let mut agents = Vec::new();
    for (i, name) in ["scout", "planner", "coder"].iter().enumerate() {
        let a = app.create_agent(&admin, json!({ "name": name, "allowed_scopes": ["presence:write"] })).await;
        let id = a["id"].as_str().unwrap().to_owned();
        let target = if i == 2 { &hall } else { &lab };
        send(&app, &admin, Method::PUT, &format!("/api/v1/agents/{id}/room"), json!({ "room_id": target["id"] })).await;
        agents.push(id);
    }
    let client = app.credential(&admin, &agents[0]).await;
    let token = app.access_token(&client).await;
    let node =
        send(&app, &admin, Method::POST, "/api/v1/nodes", json!({ "name": "gpu-1", "hostname": "gpu-1.local" })).await;

    let browser = Browser::start(1280, 800).await;
    browser_sign_in(&app, &browser, ADMIN_EMAIL, "/console/city").await;
    let scout = format!("circle.agent-badge[data-agent-id=\"{}\"]", agents[0]);
    browser.find(&scout).await;
    assert!(browser.find_now(&format!("{scout}.p-offline")).await.is_some());
    assert_eq!(browser.find_all("svg#map a.room").await.len(), 3);
    assert_eq!(browser.find_all("svg#map circle.agent-badge").await.len(), 3);
    browser.wait_for("#live-state[data-state=live]", Duration::from_secs(15)).await;
    // A mark on this page: it is gone if anything reloads it.
    browser.execute("window.__same_page = 42;", vec![]).await;

    let resp = app
        .client
        .post(app.url("/api/v1/city/presence"))
        .bearer_auth(&token)
        .json(&json!({ "status": "busy", "activity": "crawling" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    browser.wait_for(&format!("{scout}.p-busy"), Duration::from_secs(15)).await;
    let heartbeat = app
        .client
        .post(app.url(&format!("/api/v1/nodes/{}/heartbeat", node["id"].as_str().unwrap())))
        .bearer_auth(node["credential"].as_str().unwrap())
        .json(&json!({ "metrics": { "cpu_percent": 37.0, "cpu_count": 8, "load_1": 0.5, "load_5": 0.4, "load_15": 0.3,
                       "memory_total_bytes": 16_000_000_000u64, "memory_used_bytes": 4_000_000_000u64,
                       "disk_total_bytes": 500_000_000_000u64, "disk_used_bytes": 100_000_000_000u64 },
                       "models": [{ "name": "llama-3-8b.gguf", "size_bytes": 4_900_000_000u64, "loaded": true }] }))
        .send()
        .await
        .unwrap();
    assert_eq!(heartbeat.status(), StatusCode::OK);
    let row = browser.wait_for("#nodes .n-active", Duration::from_secs(15)).await;
    assert_eq!(browser.text(&row).await, "active");
    assert!(browser.text(&browser.find("#nodes").await).await.contains("llama-3-8b.gguf"));
    assert_eq!(browser.execute("return window.__same_page;", vec![]).await, json!(42), "the page never reloaded");
    browser.wait_for(&format!("{scout}.p-busy"), Duration::from_secs(5)).await;

    // A room's agents, one click away.
    browser.click(&browser.find(&format!("a.room[data-room-id=\"{}\"]", lab["id"].as_str().unwrap())).await).await;
    let panel = browser.find(&format!("#room-{}", lab["id"].as_str().unwrap())).await;
    let listed = browser.text(&panel).await;
    assert!(listed.contains("scout") && listed.contains("planner") && !listed.contains("coder"), "{listed}");
    assert!(listed.contains("busy"), "{listed}");
    browser.goto(&app.url("/console/city")).await;
    browser.wait_for(&format!("{scout}.p-busy"), Duration::from_secs(10)).await;
    browser.screenshot("console-city").await;
    // The list, without a reload.
    browser.click(&browser.find("a[data-view=list]").await).await;
    let list = browser.find("#city-list:not([hidden])").await;
    let text = browser.text(&list).await;
    assert!(text.contains("coder") && text.contains("Hall") && text.contains("crawling"), "{text}");
    browser.screenshot("console-city-list").await;
}

#[tokio::test]
async fn the_analytics_page_draws_the_points_the_api_returns() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let agent = app.create_agent(&admin, json!({ "name": "writer" })).await;
    let agent_id = agent["id"].as_str().unwrap();
    let key = json_ok(
        app.as_(&admin, Method::POST, "/auth/api-keys")
            .json(&json!({ "description": "gateway", "service": true,
                           "scopes": ["usage:read", "usage:write", "usage:manage"] }))
            .send()
            .await
            .unwrap(),
        StatusCode::CREATED,
    )
    .await;
    let key = key["key"].as_str().unwrap().to_owned();
    let price = json!({ "model": "gpt-4o", "prompt": 10_000_000, "completion": 30_000_000 });
    let resp =
        app.client.post(app.url("/api/v1/usage/prices")).header("x-api-key", &key).json(&price).send().await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let budget = json!({ "token_limit": 5000, "cost_limit_micros": 1_000_000 });
    let resp =
        app.client.post(app.url("/api/v1/usage/budgets")).header("x-api-key", &key).json(&budget).send().await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    let now = time::OffsetDateTime::now_utc();
    let at = |hours_ago: i64| {
        (now - time::Duration::hours(hours_ago)).format(&time::format_description::well_known::Rfc3339).unwrap()
    };
    let mut events = Vec::new();
    for (i, (model, hours_ago, prompt)) in
        [("gpt-4o", 0, 100), ("gpt-4o", 3, 400), ("claude-3", 3, 250), ("llama-3", 7, 50)].iter().enumerate()
    {
        events.push(json!({ "kind": "llm", "event_id": format!("e-{i}"), "timestamp": at(*hours_ago),
            "actor_id": "service:gateway", "actor_type": "service", "org_id": admin.org_id, "agent_id": agent_id,
            "model": model, "provider": "x", "prompt_tokens": prompt, "completion_tokens": 10, "latency_ms": 100,
            "success": true }));
    }
    for (i, ok) in [true, true, false].iter().enumerate() {
        events.push(
            json!({ "kind": "tool", "event_id": format!("t-{i}"), "timestamp": at(1), "actor_id": "service:gateway",
            "actor_type": "service", "org_id": admin.org_id, "agent_id": agent_id, "tool_id": "search-id",
            "tool_name": "search", "success": ok, "latency_ms": 40 }),
        );
    }
    let resp =
        app.client.post(app.url("/api/v1/usage/events")).header("x-api-key", &key).json(&events).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().await.unwrap());

    let browser = Browser::start(1280, 800).await;
    browser_sign_in(&app, &browser, ADMIN_EMAIL, "/console/analytics").await;
    let chart = browser.find("#analytics").await;
    let since = browser.attribute(&chart, "data-since").await.unwrap();
    let until = browser.attribute(&chart, "data-until").await.unwrap();
    let path = format!("/api/v1/usage/summary?since={}&until={}&group_by=hour", urlencode(&since), urlencode(&until));
    // The same question to the API, until the events are counted.
    let mut summary = Value::Null;
    for _ in 0..300 {
        summary = json_ok(app.as_(&admin, Method::GET, &path).send().await.unwrap(), StatusCode::OK).await;
        if summary["llm"]["calls"] == 4 && summary["tools"]["calls"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(summary["llm"]["calls"], 4, "{summary}");
    browser.goto(&app.url("/console/analytics")).await;
    browser.find("#tokens-chart").await;
    let drawn = browser
        .execute(
            "return Array.from(document.querySelectorAll('#tokens-chart circle.point')).map(function (c) {
                 return [c.getAttribute('data-period'), Number(c.getAttribute('data-value'))]; });",
            vec![],
        )
        .await;
    let expected: Vec<Value> =
        summary["series"].as_array().unwrap().iter().map(|p| json!([p["period"], p["total_tokens"]])).collect();
    assert_eq!(drawn, json!(expected), "the chart's points are the API's series");
    assert!(expected.len() >= 3, "{expected:?}");
    let bars = browser
        .execute(
            "return Array.from(document.querySelectorAll('#models-chart g.bar')).map(function (g) {
                 return [g.getAttribute('data-label'), Number(g.getAttribute('data-value'))]; });",
            vec![],
        )
        .await;
    let mut by_model: Vec<(String, i64)> = summary["by_model"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["model"].as_str().unwrap().to_owned(), m["total_tokens"].as_i64().unwrap()))
        .collect();
    by_model.sort_by_key(|(_, t)| -t);
    assert_eq!(bars, json!(by_model));
    assert_eq!(by_model[0], ("gpt-4o".to_owned(), 520));
    // Tokens over time by model: a line per model, its points the API's per-model series.
    let models_path =
        format!("/api/v1/usage/models?since={}&until={}&group_by=hour", urlencode(&since), urlencode(&until));
    let per_model = json_ok(app.as_(&admin, Method::GET, &models_path).send().await.unwrap(), StatusCode::OK).await;
    let lines = browser
        .execute(
            "return Array.from(document.querySelectorAll('#model-tokens-chart g.model-line')).map(function (g) {
                 return [g.getAttribute('data-model'), Array.from(g.querySelectorAll('circle.point')).map(function (c) {
                     return [c.getAttribute('data-period'), Number(c.getAttribute('data-value'))]; })]; });",
            vec![],
        )
        .await;
    let mut expected: Vec<(String, i64, Value)> = per_model["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let points: Vec<Value> =
                s["points"].as_array().unwrap().iter().map(|p| json!([p["period"], p["total_tokens"]])).collect();
            let total = s["points"].as_array().unwrap().iter().map(|p| p["total_tokens"].as_i64().unwrap()).sum();
            (s["model"].as_str().unwrap().to_owned(), total, json!(points))
        })
        .collect();
    expected.sort_by_key(|(_, total, _)| -total);
    let expected: Vec<Value> = expected.into_iter().map(|(m, _, p)| json!([m, p])).collect();
    assert_eq!(lines, json!(expected), "a line per model, drawn from the API's series");
    assert_eq!(expected.len(), 3, "{per_model}");
    // gpt-4o was called twice, three hours apart: two points of 110 and 410 tokens.
    assert_eq!(expected[0][0], "gpt-4o");
    let gpt: Vec<i64> = expected[0][1].as_array().unwrap().iter().map(|p| p[1].as_i64().unwrap()).collect();
    assert_eq!(gpt, [410, 110]);
    let costs = browser
        .execute(
            "return Array.from(document.querySelectorAll('#model-cost-chart circle.point')).map(function (c) {
                 return Number(c.getAttribute('data-value')); }).reduce(function (a, b) { return a + b; }, 0);",
            vec![],
        )
        .await;
    assert_eq!(costs, summary["llm"]["cost_micros"], "the cost lines add up to the period's cost");
    let legend = browser.text(&browser.find("#model-tokens-chart + .legend").await).await;
    assert!(legend.contains("gpt-4o") && legend.contains("claude-3") && legend.contains("llama-3"), "{legend}");
    let tools = browser.text(&browser.find("#tools-chart").await).await;
    assert!(tools.contains("search") && tools.contains("3 calls") && tools.contains("67% ok"), "{tools}");
    let top = browser.text(&browser.find("#agents-chart").await).await;
    assert!(top.contains("writer"), "{top}");
    assert_eq!(browser.text(&browser.find("#total-tokens").await).await, summary["llm"]["total_tokens"].to_string());
    let budgets = browser.text(&browser.find("#budgets").await).await;
    assert!(budgets.contains("organization") && budgets.contains("5000"), "{budgets}");
    assert!(browser.find_now("#budgets meter").await.is_some(), "budget bars");
    browser.find("#heatmap").await;
    browser.find("#trend-chart, #trend-chart + p, figure").await;
    browser.screenshot("console-analytics").await;
    // The period picker asks the API for a week, per day.
    browser.click(&browser.find("a[href=\"/console/analytics?period=7d\"]").await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.ends_with("period=7d")).await;
    let week = browser.find("#analytics").await;
    assert_eq!(browser.attribute(&week, "data-group-by").await.as_deref(), Some("day"));
}

fn urlencode(s: &str) -> String {
    s.replace(':', "%3A").replace('+', "%2B")
}

#[tokio::test]
async fn the_audit_chain_is_verified_from_the_page() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    app.create_agent(&admin, json!({ "name": "audited" })).await;
    let browser = Browser::start(1280, 800).await;
    browser_sign_in(&app, &browser, ADMIN_EMAIL, "/console/audit").await;
    let events = browser.text(&browser.find("#audit-events").await).await;
    assert!(events.contains("agent.created"), "{events}");
    assert!(browser.find_now("#verification").await.is_none());
    browser.click(&browser.find("#verify-chain").await).await;
    let verdict = browser.find("#verification.ok").await;
    assert!(browser.text(&verdict).await.contains("Chain intact"));
    let checked = browser.text(&browser.find("#events-checked").await).await;
    let api = json_ok(app.as_(&admin, Method::GET, "/api/v1/audit/verify").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(api["valid"], true);
    assert_eq!(checked, api["events_checked"].to_string());
    browser.screenshot("console-audit").await;
    // Filters are the API's.
    browser.fill(&browser.find("#f-action").await, "agent.created").await;
    browser.click(&browser.find("form.filters button").await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("action=agent.created")).await;
    let rows = browser.find_all("#audit-events tbody tr").await;
    assert_eq!(rows.len(), 1);
    // The decision log is one click away.
    browser.goto(&app.url("/console/audit/decisions")).await;
    browser.find("h1").await;
    assert_eq!(browser.text(&browser.find("h1").await).await, "Decision log");
}

#[tokio::test]
async fn a_member_sees_no_admin_buttons_and_an_agent_name_with_markup_stays_text() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let payload = "<img src=x onerror=\"window.__xss=1\"><script>window.__xss=2</script>\"'&";
    let agent = app.create_agent(&admin, json!({ "name": payload, "description": "<b>bold?</b>" })).await;
    let agent_id = agent["id"].as_str().unwrap().to_owned();
    app.add_member(&admin, &admin.org_id, "member@acme.test", "member").await;

    let browser = Browser::start(390, 844).await;
    browser_sign_in(&app, &browser, "member@acme.test", "/console/agents").await;
    let shown = browser.find(".agent-name").await;
    assert_eq!(browser.text(&shown).await, payload, "the name is shown as the text it is");
    assert_eq!(browser.execute("return typeof window.__xss;", vec![]).await, json!("undefined"));
    assert!(browser.find_now("img[src=x]").await.is_none());
    assert!(browser.find_now("#agents script").await.is_none());
    browser.screenshot("console-agents-phone").await;
    // A member may create agents, but this one is the admin's: none of its buttons are shown.
    assert!(browser.find_now("#create-agent").await.is_some());
    browser.click(&shown).await;
    browser.find("#credentials, p.empty").await;
    assert_eq!(browser.text(&browser.find("#agent-description").await).await, "<b>bold?</b>");
    for button in ["#suspend", "#delete-agent", "#create-credential", "#revoke-tokens", "#edit-agent"] {
        assert!(browser.find_now(button).await.is_none(), "{button} is not shown to a member");
    }
    let nav = browser.text(&browser.find("header nav").await).await;
    assert!(!nav.contains("Audit") && !nav.contains("Policies"), "{nav}");
    // The API refuses anyway: the member's own session, with a valid token, through the console.
    let csrf = browser.execute("return document.querySelector('input[name=csrf]').value;", vec![]).await;
    let status = browser
        .execute(
            "var f = new FormData(); f.append('csrf', arguments[0]); f.append('status', 'suspended');
             var x = new XMLHttpRequest(); x.open('POST', arguments[1], false);
             x.send(new URLSearchParams(f)); return x.status;",
            vec![csrf, json!(format!("/console/agents/{agent_id}/status"))],
        )
        .await;
    assert_eq!(status, json!(403));
    let still = json_ok(
        app.as_(&admin, Method::GET, &format!("/api/v1/agents/{agent_id}")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(still["status"], "active");
    // A page the member may not read shows the API's refusal, not a blank page.
    browser.goto(&app.url("/console/audit")).await;
    let problem = browser.text(&browser.find(".problem").await).await;
    assert!(problem.contains("403") && problem.contains("Denied by policy"), "{problem}");

    // The admin sees the buttons on the same agent.
    let admin_browser = Browser::start(1280, 800).await;
    browser_sign_in(&app, &admin_browser, ADMIN_EMAIL, &format!("/console/agents/{agent_id}")).await;
    // Waited for (the page may still be loading), then each looked for at once.
    admin_browser.find("#suspend").await;
    for button in ["#suspend", "#delete-agent", "#create-credential", "#revoke-tokens", "#edit-agent"] {
        assert!(admin_browser.find_now(button).await.is_some(), "{button} is shown to an admin");
    }
    assert!(admin_browser.text(&admin_browser.find("header nav").await).await.contains("Audit"));
}

/// A page's text with the tags taken out (enough to look for what it says).
fn page_text(client: &reqwest::Client, app: &TestApp, path: &str) -> impl Future<Output = (StatusCode, String)> {
    let req = client.get(app.url(path));
    async move {
        let resp = req.send().await.unwrap();
        (resp.status(), resp.text().await.unwrap())
    }
}

#[tokio::test]
async fn the_policy_webhook_delegation_and_organization_pages_show_and_do_what_the_api_does() {
    let app = crate::helpers::spawn_app_with(&[("webhooks.allow_private_networks", json!(true))]).await;
    let admin = app.bootstrap().await;
    let client = cookie_client();
    console_sign_in(&app, &client, ADMIN_EMAIL).await;
    let csrf = hidden_input(&page_text(&client, &app, "/console/agents").await.1, "csrf");

    // Policies: two versions, their difference, the dry run, activation.
    for source in [
        "@id(\"a\")\npermit (principal, action == AgentIdP::Action::\"read\", resource is AgentIdP::Organization)\nwhen { context.org_role == \"member\" };\n",
        "@id(\"b\")\npermit (principal, action == AgentIdP::Action::\"read\", resource is AgentIdP::Organization)\nwhen { context.org_role == \"admin\" };\n",
    ] {
        send(&app, &admin, Method::POST, "/api/v1/policies/versions", json!({ "source": source })).await;
    }
    let (status, page) = page_text(&client, &app, "/console/policies?a=1&b=2").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("class=\"d-del\">- @id(&quot;a&quot;)") || page.contains("class=\"d-del\">- @id(&#34;a&#34;)"),
        "{page}"
    );
    assert!(page.contains("d-add") && page.contains("context.org_role == "), "the changed lines are marked");
    let examples = hidden_textarea(&page);
    let resp = client
        .post(app.url("/console/policies/test"))
        .form(&[("csrf", csrf.as_str()), ("version", "2"), ("examples", examples.as_str())])
        .send()
        .await
        .unwrap();
    let body = resp.text().await.unwrap();
    assert!(body.contains("id=\"test-results\"") && body.contains("I read my organization"), "{body}");
    let resp = client.post(app.url("/console/policies/2/activate")).form(&[("csrf", &csrf)]).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let versions =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/policies/versions").send().await.unwrap(), StatusCode::OK).await;
    assert!(versions.as_array().unwrap().iter().any(|v| v["version"] == 2 && v["status"] == "active"), "{versions}");

    // Webhooks: the secret on the creating response only.
    let resp = client
        .post(app.url("/console/webhooks"))
        .form(&[("csrf", csrf.as_str()), ("url", "http://127.0.0.1:9/hook"), ("event_types", "agent.*")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    let body = resp.text().await.unwrap();
    let secret = body.split("id=\"webhook-secret\">").nth(1).unwrap().split('<').next().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    let (_, list) = page_text(&client, &app, "/console/webhooks").await;
    assert!(list.contains("http://127.0.0.1:9/hook") && !list.contains(&secret));
    let endpoints =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/webhooks").send().await.unwrap(), StatusCode::OK).await;
    let endpoint = endpoints[0]["id"].as_str().unwrap().to_owned();
    app.create_agent(&admin, json!({ "name": "hooked" })).await;
    let (status, detail) = page_text(&client, &app, &format!("/console/webhooks/{endpoint}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(detail.contains("Deliveries"), "{detail}");

    // Delegations: the empty state says what to do.
    let (status, page) = page_text(&client, &app, "/console/delegations").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains("POST /api/v1/delegations"), "{page}");
    let worker = app.agent_client(&admin, &["agents:read"]).await;
    let created = send(
        &app,
        &admin,
        Method::POST,
        "/api/v1/delegations",
        json!({ "agent_id": worker.agent_id, "purpose": "triage <the> inbox",
                "scope": { "max_commands": 3, "max_ttl_minutes": 30, "scopes": ["agents:read"] } }),
    )
    .await;
    let delegation = created["delegation_id"].as_str().unwrap().to_owned();
    let (_, page) = page_text(&client, &app, "/console/delegations").await;
    assert!(page.contains("triage &lt;the&gt; inbox") || page.contains("triage &#60;the&#62; inbox"), "{page}");
    assert!(page.contains("0 used, 3 left of 3") && page.contains("<meter"), "{page}");
    assert!(page.contains("1 active in this organization"));
    let resp = client
        .post(app.url(&format!("/console/delegations/{delegation}/revoke")))
        .form(&[("csrf", &csrf)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    let info = json_ok(
        app.as_(&admin, Method::GET, &format!("/api/v1/delegations/{delegation}")).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(info["status"], "revoked");
    let (_, ended) = page_text(&client, &app, "/console/delegations?status=revoked").await;
    assert!(ended.contains("manual_revocation"), "{ended}");

    // Organization: members, the plan against its limits, an API key shown once.
    let (status, page) = page_text(&client, &app, "/console/organization").await;
    assert_eq!(status, StatusCode::OK);
    assert!(page.contains(ADMIN_EMAIL) && page.contains("Plan: free") && page.contains("Agents"), "{page}");
    let resp = client
        .post(app.url("/console/organization/api-keys"))
        .form(&[("csrf", csrf.as_str()), ("description", "ci"), ("scopes", "agents:read")])
        .send()
        .await
        .unwrap();
    let body = resp.text().await.unwrap();
    let key = body.split("id=\"api-key\">").nth(1).unwrap().split('<').next().unwrap().to_owned();
    assert_eq!(
        app.client.get(app.url("/api/v1/agents")).header("x-api-key", &key).send().await.unwrap().status(),
        StatusCode::OK
    );
    let (_, again) = page_text(&client, &app, "/console/organization").await;
    assert!(again.contains("ci") && !again.contains(&key), "the key is not shown again");
    // An invitation's token is shown once, and it works.
    let resp = client
        .post(app.url("/console/organization/members"))
        .form(&[("csrf", csrf.as_str()), ("email", "new@acme.test"), ("role", "member")])
        .send()
        .await
        .unwrap();
    let body = resp.text().await.unwrap();
    let token = body.split("id=\"invitation-token\">").nth(1).unwrap().split('<').next().unwrap().to_owned();
    let redeemed = app.post_json("/auth/set-password", &json!({ "token": token, "password": PASSWORD })).await;
    assert_eq!(redeemed.status(), StatusCode::NO_CONTENT);
    let (_, members) = page_text(&client, &app, "/console/organization").await;
    assert!(members.contains("new@acme.test") && !members.contains(&token), "{members}");
    // A draft policy from the page, refused with the API's diagnostics when it does not compile.
    let resp = client
        .post(app.url("/console/policies/versions"))
        .form(&[("csrf", csrf.as_str()), ("source", "permit(principal, action,")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(resp.text().await.unwrap().contains("class=\"problem\""));
    let resp = client
        .post(app.url("/console/policies/versions"))
        .form(&[("csrf", csrf.as_str()), ("source", "// nothing beyond the baseline\n")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SEE_OTHER);
    assert_eq!(resp.headers()[header::LOCATION], "/console/policies?v=3&done=created");
}

/// The dry-run form's examples as the page filled them in.
fn hidden_textarea(html: &str) -> String {
    let start = html.find("name=\"examples\"").unwrap();
    let from = start + html[start..].find('>').unwrap() + 1;
    let raw = &html[from..from + html[from..].find("</textarea>").unwrap()];
    raw.replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[tokio::test]
async fn the_trust_page_shows_the_compliance_report_and_lists_an_agent_in_the_marketplace() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let agent = app.create_agent(&admin, json!({ "name": "publishable", "capabilities": ["translate"] })).await;
    let agent_id = agent["id"].as_str().unwrap().to_owned();
    let browser = Browser::start(1280, 800).await;
    browser_sign_in(&app, &browser, ADMIN_EMAIL, "/console/trust").await;

    // The report the page shows is the API's.
    let report =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/compliance/report").send().await.unwrap(), StatusCode::OK).await;
    let summary = browser.text(&browser.find("#compliance-summary").await).await;
    assert_eq!(summary, format!("{} controls pass, {} fail", report["summary"]["passed"], report["summary"]["failed"]),);
    let row = browser.text(&browser.find("[data-control=audit_chain_intact]").await).await;
    assert!(row.contains("pass"), "{row}");

    // Listing from the page lists it through the API, and the public marketplace shows it.
    let toggle = browser.find(&format!("#listings [data-agent=\"{agent_id}\"] button.list-toggle")).await;
    assert_eq!(browser.text(&toggle).await, "List publicly");
    browser.click(&toggle).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=listed")).await;
    let public = json_ok(app.get(&format!("/api/v1/marketplace/{agent_id}")).await, StatusCode::OK).await;
    assert_eq!(public["name"], "publishable");
    assert!(browser.text(&browser.find("#market").await).await.contains("publishable"));
    browser.screenshot("console-trust").await;
    let toggle = browser.find(&format!("#listings [data-agent=\"{agent_id}\"] button.list-toggle")).await;
    assert_eq!(browser.text(&toggle).await, "Unlist");
    browser.click(&toggle).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=unlisted")).await;
    assert_eq!(app.get(&format!("/api/v1/marketplace/{agent_id}")).await.status(), StatusCode::NOT_FOUND);

    // A member sees the controls (not the report) and no list button on the admin's agent.
    app.add_member(&admin, &admin.org_id, "member@acme.test", "member").await;
    let member = Browser::start(1280, 800).await;
    browser_sign_in(&app, &member, "member@acme.test", "/console/trust").await;
    member.find("#compliance-controls").await;
    assert!(member.find_now("#compliance-summary").await.is_none());
    assert!(member.find_now(&format!("#listings [data-agent=\"{agent_id}\"] button")).await.is_none());
}

/// A local webhook receiver (a third party): answers `status`, keeps each delivery's event type
/// and `webhook-id`.
#[derive(Clone)]
struct Hook {
    url: String,
    status: std::sync::Arc<std::sync::atomic::AtomicU16>,
    hits: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Hook {
    async fn start(status: u16) -> Self {
        use axum::{body::Bytes, extract::State, http::HeaderMap, routing::post};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hook = Hook {
            url: format!("http://{}/hook", listener.local_addr().unwrap()),
            status: std::sync::Arc::new(std::sync::atomic::AtomicU16::new(status)),
            hits: Default::default(),
        };
        async fn receive(State(h): State<Hook>, headers: HeaderMap, body: Bytes) -> axum::http::StatusCode {
            let ty = serde_json::from_slice::<Value>(&body).ok().and_then(|v| v["type"].as_str().map(str::to_owned));
            let id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            h.hits.lock().unwrap().push((ty.unwrap_or_default(), id));
            axum::http::StatusCode::from_u16(h.status.load(std::sync::atomic::Ordering::Relaxed)).unwrap()
        }
        let router = axum::Router::new().route("/hook", post(receive)).with_state(hook.clone());
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        hook
    }

    fn hits(&self) -> Vec<(String, String)> {
        self.hits.lock().unwrap().clone()
    }

    /// Waits (bounded, for a loaded machine) until `n` deliveries arrived.
    async fn wait_for(&self, n: usize) -> Vec<(String, String)> {
        for _ in 0..600 {
            if self.hits().len() >= n {
                return self.hits();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("expected {n} deliveries, got {:?}", self.hits());
    }
}

/// Waits (bounded) until the API shows a delivery of the endpoint in `status`.
async fn wait_delivery(app: &TestApp, by: &Caller, endpoint: &str, status: &str) -> Value {
    let path = format!("/api/v1/webhooks/{endpoint}/deliveries?status={status}");
    for _ in 0..600 {
        let list = json_ok(app.as_(by, Method::GET, &path).send().await.unwrap(), StatusCode::OK).await;
        if let Some(d) = list.as_array().unwrap().first() {
            return d.clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no {status} delivery for {endpoint}");
}

#[tokio::test]
async fn a_webhook_endpoint_is_edited_tested_retried_from_the_dead_letters_and_deleted_in_a_browser() {
    let app = crate::helpers::spawn_app_with(&[
        ("webhooks.allow_private_networks", json!(true)),
        ("webhooks.poll_interval_ms", json!(100)),
    ])
    .await;
    let admin = app.bootstrap().await;
    // The receiver first answers 410 Gone: the test event becomes a dead letter at once.
    let hook = Hook::start(410).await;
    let browser = Browser::start(1280, 800).await;
    browser_sign_in(&app, &browser, ADMIN_EMAIL, "/console/webhooks").await;
    browser.find("p.empty").await;
    browser.fill(&browser.find("#w-url").await, &hook.url).await;
    browser.fill(&browser.find("#w-events").await, "agent.*").await;
    browser.click(&browser.find("form[action=\"/console/webhooks\"] button[type=submit]").await).await;
    browser.find("#webhook-secret").await;
    let endpoints =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/webhooks").send().await.unwrap(), StatusCode::OK).await;
    let id = endpoints[0]["id"].as_str().unwrap().to_owned();
    browser.goto(&app.url(&format!("/console/webhooks/{id}"))).await;

    // Edit: a description with markup, another event type, still enabled.
    browser.click(&browser.find("details.card > summary").await).await;
    browser.fill(&browser.find("#e-desc").await, "billing <b>hooks</b>").await;
    browser.fill(&browser.find("#e-events").await, "agent.*, webhook.test").await;
    browser.click(&browser.find("#edit-endpoint button[type=submit]").await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=saved")).await;
    let ep =
        json_ok(app.as_(&admin, Method::GET, &format!("/api/v1/webhooks/{id}")).send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(ep["description"], "billing <b>hooks</b>");
    assert_eq!(ep["event_types"], json!(["agent.*", "webhook.test"]));
    assert_eq!(ep["enabled"], true);
    assert!(browser.text(&browser.find("main .meta").await).await.contains("billing <b>hooks</b>"), "shown as text");

    // A test event goes to this endpoint; 410 makes it a dead letter.
    browser.click(&browser.find("#send-test").await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=test_sent")).await;
    let hits = hook.wait_for(1).await;
    assert_eq!(hits[0].0, "webhook.test");
    let dead = wait_delivery(&app, &admin, &id, "dead").await;
    assert_eq!(dead["event_type"], "webhook.test");

    // The dead letters page lists it; the endpoint is fixed and enabled again, and the retry
    // delivers the same event (the same webhook-id).
    browser.click(&browser.find("a[href=\"/console/webhooks\"]").await).await;
    browser.click(&browser.find("#dead-letters-link").await).await;
    let table = browser.text(&browser.find("#dead-letters").await).await;
    assert!(table.contains("webhook.test") && table.contains(&hook.url) && table.contains("410"), "{table}");
    browser.screenshot("console-dead-letters").await;
    hook.status.store(200, std::sync::atomic::Ordering::Relaxed);
    browser.goto(&app.url(&format!("/console/webhooks/{id}"))).await;
    assert!(browser.find_now("#e-enabled:checked").await.is_none(), "410 disabled the endpoint");
    browser.click(&browser.find("details.card > summary").await).await;
    browser.click(&browser.find("#e-enabled").await).await;
    browser.click(&browser.find("#edit-endpoint button[type=submit]").await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=saved")).await;
    browser.goto(&app.url("/console/webhooks/dead-letters")).await;
    browser.click(&browser.find("#dead-letters button[type=submit]").await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("dead-letters?done=retried")).await;
    let hits = hook.wait_for(2).await;
    assert_eq!(hits[1], hits[0], "the retry sends the same event again");
    let ok = wait_delivery(&app, &admin, &id, "succeeded").await;
    assert_eq!(ok["id"], dead["id"]);
    browser.goto(&app.url("/console/webhooks/dead-letters")).await;
    assert!(browser.text(&browser.find("p.empty").await).await.contains("No dead letters"));

    // Delete (the page's confirmation accepted).
    browser.goto(&app.url(&format!("/console/webhooks/{id}"))).await;
    browser.execute("window.confirm = function () { return true; };", vec![]).await;
    browser.click(&browser.find("#delete-endpoint").await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=deleted")).await;
    let gone = app.as_(&admin, Method::GET, &format!("/api/v1/webhooks/{id}")).send().await.unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    browser.find("p.empty").await;
}

#[tokio::test]
async fn a_person_in_two_organizations_switches_the_one_the_console_works_in() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let beta = app.org_with_owner(&admin, "Beta Works", "pat@beta.test").await;
    app.add_member(&admin, &admin.org_id, "pat@beta.test", "admin").await;
    let made = app
        .as_(&beta, Method::POST, "/api/v1/agents")
        .header("x-org-id", &beta.org_id)
        .json(&json!({ "name": "beta-bot" }))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), StatusCode::CREATED);
    let browser = Browser::start(1280, 800).await;
    browser_sign_in(&app, &browser, "pat@beta.test", "/console/organization").await;
    let first = browser.text_of("main h1").await;
    // The switcher lists both, marks the current one, and offers the other.
    let list = browser.text_of("#org-list").await;
    assert!(list.contains("Beta Works") && list.contains("Acme Labs") && list.contains("working here"), "{list}");
    assert!(browser.find_now("#switch-org").await.is_some(), "the header links to the switcher");
    let (target, target_name) =
        if first.starts_with("Acme Labs") { (&beta.org_id, "Beta Works") } else { (&admin.org_id, "Acme Labs") };
    browser.click(&browser.find(&format!("button[data-org=\"{target}\"]")).await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=switched")).await;
    assert!(browser.text_of("main h1").await.starts_with(target_name));
    let cookie = browser.cookies().await.into_iter().find(|c| c["name"] == "agentidp_console_org").unwrap();
    assert_eq!(cookie["httpOnly"], true);
    // Now in Acme Labs (switching there if it was Beta first): an agent made from the console
    // lands in Acme, and Beta's agent is not listed.
    if target_name == "Beta Works" {
        browser.click(&browser.find(&format!("button[data-org=\"{}\"]", admin.org_id)).await).await;
        browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=switched")).await;
    }
    browser.goto(&app.url("/console/agents")).await;
    browser.fill(&browser.find("#a-name").await, "acme-bot").await;
    browser.click(&browser.find("#create-agent button[type=submit]").await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=created")).await;
    assert_eq!(names_in(&app, &beta, &admin.org_id).await, ["acme-bot"]);
    assert_eq!(names_in(&app, &beta, &beta.org_id).await, ["beta-bot"]);
    browser.goto(&app.url("/console/agents")).await;
    let agents = browser.text_of("#agents").await;
    assert!(agents.contains("acme-bot") && !agents.contains("beta-bot"), "{agents}");

    // The cookie decides only among the person's own organizations: another one is ignored.
    let outsider = app.org_with_owner(&admin, "Gamma", "gil@gamma.test").await;
    let client = cookie_client();
    let session = console_sign_in(&app, &client, "pat@beta.test").await;
    for (org, shown) in [(&beta.org_id, "Beta Works"), (&admin.org_id, "Acme Labs")] {
        let page = client
            .get(app.url("/console/organization"))
            .header(header::COOKIE, format!("agentidp_session={session}; agentidp_console_org={org}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(page.contains(&format!("<h1>{shown} ")), "{shown}: {page}");
    }
    let page = client
        .get(app.url("/console/organization"))
        .header(header::COOKIE, format!("agentidp_session={session}; agentidp_console_org={}", outsider.org_id))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let page = page.text().await.unwrap();
    assert!(!page.contains("<h1>Gamma ") && page.contains("id=\"org-list\""), "{page}");
    // Switching to it is refused with the API's answer, and sets nothing.
    let csrf =
        hidden_input(&client.get(app.url("/console/agents")).send().await.unwrap().text().await.unwrap(), "csrf");
    let resp = client
        .post(app.url("/console/organization/switch"))
        .form(&[("csrf", csrf.as_str()), ("org", outsider.org_id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    assert!(resp.headers().get(header::SET_COOKIE).is_none());
}

/// The names of the agents in `org`, asked with `X-Org-Id`.
async fn names_in(app: &TestApp, by: &Caller, org: &str) -> Vec<String> {
    let resp = app.as_(by, Method::GET, "/api/v1/agents").header("x-org-id", org).send().await.unwrap();
    let page = json_ok(resp, StatusCode::OK).await;
    page["items"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn an_admin_registers_an_oauth_client_once_and_a_person_revokes_their_consent() {
    use crate::oidc::{CALLBACK, authorize_url, pkce, query_of, redeem, sign_in_and_consent, spawn_oidc, user_agent};
    let app = spawn_oidc(&[]).await;
    let admin = app.bootstrap().await;
    let browser = Browser::start(1280, 800).await;
    browser_sign_in(&app, &browser, ADMIN_EMAIL, "/console/applications").await;
    let empty = browser.text(&browser.find("#consents-title + p.empty").await).await;
    assert!(empty.contains("consent screen"), "{empty}");
    browser.fill(&browser.find("#c-name").await, "Example <App>").await;
    browser.fill(&browser.find("#c-redirects").await, CALLBACK).await;
    browser.click(&browser.find("#create-client button[type=submit]").await).await;
    let secret = browser.text(&browser.find("#new-client-secret").await).await;
    let client_id = browser.text(&browser.find("#new-client-id").await).await;
    assert!(browser.text(&browser.find("#secret .warning").await).await.contains("shown only once"));
    browser.screenshot("console-applications").await;
    let clients = json_ok(app.as_(&admin, Method::GET, "/api/v1/clients").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(clients[0]["client_id"], client_id.as_str());
    assert_eq!(clients[0]["name"], "Example <App>");
    // Reloaded: listed, never with its secret.
    browser.goto(&app.url("/console/applications")).await;
    assert!(browser.text(&browser.find("#clients").await).await.contains(&client_id));
    assert!(browser.find_now("#new-client-secret").await.is_none() && !browser.source().await.contains(&secret));

    // The person allows the application; its secret from the page redeems the code.
    let ua = user_agent();
    let (verifier, challenge) = pkce();
    let params = [
        ("response_type", "code"),
        ("client_id", client_id.as_str()),
        ("redirect_uri", CALLBACK),
        ("scope", "openid profile"),
        ("code_challenge", challenge.as_str()),
        ("code_challenge_method", "S256"),
    ];
    let back = sign_in_and_consent(&ua, &app, &authorize_url(&app, &params), ADMIN_EMAIL).await;
    let code = query_of(back.headers()["location"].to_str().unwrap())["code"].clone();
    json_ok(redeem(&app, (&client_id, &secret), &code, &verifier).await, StatusCode::OK).await;
    browser.goto(&app.url("/console/applications")).await;
    let consents = browser.text(&browser.find("#consents").await).await;
    assert!(consents.contains("Example <App>") && consents.contains("openid, profile"), "{consents}");
    browser.execute("window.confirm = function () { return true; };", vec![]).await;
    browser.click(&browser.find("#consents button[type=submit]").await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=revoked")).await;
    let list = json_ok(app.as_(&admin, Method::GET, "/api/v1/me/consents").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(list, json!([]));

    // Deleting the client.
    browser.execute("window.confirm = function () { return true; };", vec![]).await;
    browser.click(&browser.find(&format!("button[data-client=\"{client_id}\"]")).await).await;
    browser.wait_for_url(Duration::from_secs(10), |u| u.contains("done=deleted")).await;
    let clients = json_ok(app.as_(&admin, Method::GET, "/api/v1/clients").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(clients, json!([]));
    // A member sees no clients section, only their own consents.
    app.add_member(&admin, &admin.org_id, "mo@acme.test", "member").await;
    let member = Browser::start(1280, 800).await;
    browser_sign_in(&app, &member, "mo@acme.test", "/console/applications").await;
    member.find("#consents-title").await;
    assert!(member.find_now("#clients-title").await.is_none() && member.find_now("#create-client").await.is_none());
}

#[tokio::test]
async fn a_console_page_counts_as_one_call_against_the_quota_however_many_it_makes() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let client = cookie_client();
    console_sign_in(&app, &client, ADMIN_EMAIL).await;
    let calls_today = || async {
        let status =
            json_ok(app.as_(&admin, Method::GET, "/api/v1/tiers/status").send().await.unwrap(), StatusCode::OK).await;
        status["usage"]["api_calls_today"].as_u64().unwrap()
    };
    let before = calls_today().await;
    // The analytics page asks the API six questions; the organization counts one page view.
    let page = client.get(app.url("/console/analytics")).send().await.unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("id=\"analytics\""));
    assert_eq!(calls_today().await - before, 1);
    // A direct API call still counts by itself.
    json_ok(app.as_(&admin, Method::GET, "/api/v1/agents").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(calls_today().await - before, 2);
}
