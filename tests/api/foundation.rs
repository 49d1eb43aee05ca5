//! The foundation: operations endpoints, problem+json everywhere, the TLS layer, outages,
//! configuration errors, OpenAPI.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_EMAIL, PASSWORD, assert_problem, fresh_database, json_ok, proxy::Proxy, redis_url, spawn_app, spawn_app_with,
    spawn_on, test_config,
};

#[tokio::test]
async fn health_and_ready_report_ok() {
    let app = spawn_app().await;
    let body = json_ok(app.get("/health").await, StatusCode::OK).await;
    assert_eq!(body["status"], "ok");
    let body = json_ok(app.get("/ready").await, StatusCode::OK).await;
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["postgres"]["status"], "ok");
    assert_eq!(body["redis"]["status"], "ok");
}

#[tokio::test]
async fn unknown_route_is_problem_json_with_the_request_id() {
    let app = spawn_app().await;
    let body = assert_problem(app.get("/nope").await, StatusCode::NOT_FOUND, "not_found").await;
    assert!(body["request_id"].as_str().unwrap().len() >= 32);

    let resp = app.client.get(app.url("/nope")).header("x-request-id", "trace-abc.123").send().await.unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-abc.123");
    let body = assert_problem(resp, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(body["request_id"], "trace-abc.123");

    // A hostile id is replaced, not echoed into logs and headers.
    let resp = app.client.get(app.url("/nope")).header("x-request-id", "a b\"<script>").send().await.unwrap();
    assert_ne!(resp.headers()["x-request-id"], "a b\"<script>");
}

#[tokio::test]
async fn wrong_method_is_405_problem_with_allow() {
    let app = spawn_app().await;
    let resp = app.client.delete(app.url("/health")).send().await.unwrap();
    let allow = resp.headers().get("allow").cloned();
    assert_problem(resp, StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed").await;
    assert!(allow.unwrap().to_str().unwrap().contains("GET"));
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_problem() {
    let app = spawn_app().await;
    let body = vec![b'a'; 2 * 1024 * 1024];
    let resp =
        app.client.post(app.url("/health")).header("content-type", "application/json").body(body).send().await.unwrap();
    assert_problem(resp, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
}

#[tokio::test]
async fn metrics_use_route_templates() {
    let app = spawn_app().await;
    app.get("/health").await;
    app.get("/no/such/path/12345").await;
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(text.contains(r#"http_requests_total{method="GET",route="/health",status="200"}"#), "{text}");
    assert!(text.contains("http_request_duration_seconds_bucket"), "{text}");
    assert!(!text.contains("/no/such/path/12345"), "raw paths must not become labels");
}

#[tokio::test]
async fn made_up_methods_add_no_metric_series() {
    let app = spawn_app().await;
    for i in 0..20 {
        let method = reqwest::Method::from_bytes(format!("XABCDEF{i}").as_bytes()).unwrap();
        let resp = app.client.request(method, app.url("/health")).send().await.unwrap();
        assert!(resp.status().is_client_error(), "{}", resp.status());
    }
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(!text.contains("XABCDEF"), "a made-up method became a label: {text}");
    assert!(text.contains(r#"method="other""#), "{text}");
}

#[tokio::test]
async fn swagger_ui_is_served_from_local_assets() {
    let app = spawn_app().await;
    let resp = app.get("/docs/").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let html = resp.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    let init = app.get("/docs/swagger-initializer.js").await.text().await.unwrap();
    assert!(init.contains("/openapi.json"), "{init}");
    let css = app.get("/docs/swagger-ui.css").await;
    assert_eq!(css.status(), StatusCode::OK);
    assert!(css.text().await.unwrap().len() > 10_000);
}

#[tokio::test]
async fn openapi_document_is_committed_and_current() {
    let app = spawn_app().await;
    let served = app.get("/openapi.json").await.text().await.unwrap();
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json")).unwrap();
    assert!(served == committed, "openapi/openapi.json is stale: run `make openapi`");
    let doc: Value = serde_json::from_str(&served).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for scheme in ["bearer", "api_key", "session_cookie", "client_secret_basic"] {
        assert!(doc["components"]["securitySchemes"][scheme].is_object(), "{scheme}");
    }
    assert!(doc["components"]["schemas"]["Problem"].is_object());
    for path in ["/health", "/ready", "/metrics", "/openapi.json"] {
        assert!(doc["paths"][path].is_object(), "{path} is documented");
    }
}

#[tokio::test]
async fn redis_outage_degrades_and_recovers_without_restart() {
    let proxy = Proxy::start(redis_url().trim_start_matches("redis://").to_owned()).await;
    let app = spawn_app_with(&[("redis.url", json!(format!("redis://{}", proxy.addr)))]).await;
    assert_eq!(json_ok(app.get("/ready").await, StatusCode::OK).await["status"], "ok");

    let admin = app.bootstrap().await;
    proxy.down().await;
    let body = json_ok(app.get("/ready").await, StatusCode::OK).await;
    assert_eq!(body["status"], "degraded", "{body}");
    // Identity keeps working without Redis: login (its throttle falls back per process), authenticated
    // calls, and logout (whose broadcast fails quietly).
    let other = app.sign_in(ADMIN_EMAIL, PASSWORD).await;
    assert_eq!(app.login(ADMIN_EMAIL, "wrong-password-x").await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(app.as_(&admin, reqwest::Method::GET, "/auth/me").send().await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        app.as_(&other, reqwest::Method::POST, "/auth/logout").send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.as_(&other, reqwest::Method::GET, "/auth/me").send().await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(body["redis"]["status"], "down");
    assert_eq!(app.get("/health").await.status(), StatusCode::OK);
    assert_problem(app.get("/nope").await, StatusCode::NOT_FOUND, "not_found").await;

    proxy.up();
    let mut status = Value::Null;
    for _ in 0..50 {
        status = json_ok(app.get("/ready").await, StatusCode::OK).await["status"].clone();
        if status == "ok" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, "ok");
}

#[tokio::test]
async fn postgres_outage_is_503_and_recovers_without_restart() {
    let (db_url, db_name) = fresh_database().await;
    let upstream = db_url.split('@').nth(1).unwrap().split('/').next().unwrap().to_owned();
    let proxy = Proxy::start(upstream.clone()).await;
    let via_proxy = db_url.replace(&upstream, &proxy.addr.to_string());
    assert!(via_proxy.ends_with(&db_name));
    let app = spawn_on(test_config(&via_proxy, &[]), None).await;
    assert_eq!(app.get("/ready").await.status(), StatusCode::OK);
    let admin = app.bootstrap().await;

    proxy.down().await;
    let resp = app.get("/ready").await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["postgres"]["status"], "down");
    assert_eq!(app.get("/health").await.status(), StatusCode::OK, "liveness touches nothing");
    // Routes that need Postgres say so with a retryable 503, never a 500.
    assert_problem(app.login(ADMIN_EMAIL, PASSWORD).await, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable")
        .await;
    let resp = app.client.get(app.url("/auth/me")).bearer_auth("aidp_ses_not-cached-anywhere").send().await.unwrap();
    assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable").await;
    let resp = app.as_(&admin, reqwest::Method::GET, "/api/v1/audit").send().await.unwrap();
    assert_problem(resp, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable").await;

    proxy.up();
    let mut code = StatusCode::SERVICE_UNAVAILABLE;
    for _ in 0..50 {
        code = app.get("/ready").await.status();
        if code == StatusCode::OK {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, StatusCode::OK);
    assert_eq!(app.as_(&admin, reqwest::Method::GET, "/api/v1/audit").send().await.unwrap().status(), StatusCode::OK);
}

fn self_signed() -> (tempfile_path::Path, tempfile_path::Path) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let dir = std::env::temp_dir().join(format!("agentidp-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
    (tempfile_path::Path(c), tempfile_path::Path(k))
}

mod tempfile_path {
    /// A path removed with its folder when dropped.
    pub struct Path(pub std::path::PathBuf);
    impl Drop for Path {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

#[tokio::test]
async fn https_serves_http1_and_http2_with_hsts() {
    let (cert, key) = self_signed();
    let app = spawn_app_with(&[
        ("tls.cert_path", json!(cert.0.to_str().unwrap())),
        ("tls.key_path", json!(key.0.to_str().unwrap())),
        ("tls.enforce", json!(true)),
    ])
    .await;
    assert!(app.base.starts_with("https://"));
    let h1 = reqwest::Client::builder().danger_accept_invalid_certs(true).http1_only().build().unwrap();
    let resp = h1.get(app.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), reqwest::Version::HTTP_11);
    assert!(resp.headers()["strict-transport-security"].to_str().unwrap().starts_with("max-age="));

    let h2 = reqwest::Client::builder().danger_accept_invalid_certs(true).build().unwrap();
    let resp = h2.get(app.url("/health")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), reqwest::Version::HTTP_2, "ALPN negotiates h2");
}

#[tokio::test]
async fn enforced_tls_redirects_plain_http_with_308() {
    let app =
        spawn_app_with(&[("tls.enforce", json!(true)), ("server.public_url", json!("https://idp.example.com"))]).await;
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = client.post(app.url("/health?x=1")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(resp.headers()["location"], "https://idp.example.com/health?x=1");

    // The loopback peer is a trusted proxy by default: its word that the client used HTTPS counts.
    let resp = client.get(app.url("/health")).header("x-forwarded-proto", "https").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().contains_key("strict-transport-security"));
}

#[tokio::test]
async fn forwarded_proto_from_an_untrusted_peer_is_ignored() {
    let app = spawn_app_with(&[
        ("tls.enforce", json!(true)),
        ("tls.trusted_proxies", json!([])),
        ("server.public_url", json!("https://idp.example.com")),
    ])
    .await;
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let resp = client.get(app.url("/health")).header("x-forwarded-proto", "https").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
}

fn agentidp(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agentidp"));
    cmd.args(args).env_remove("AGENTIDP_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run agentidp")
}

#[test]
fn an_invalid_configuration_exits_2_naming_the_key() {
    for (key, value, named) in [
        ("AGENTIDP_SERVER__REQUEST_TIMEOUT_SECS", "soon", "request_timeout_secs"),
        ("AGENTIDP_SERVER__BIND", "not-an-address", "bind"),
        ("AGENTIDP_REDIS__URL", "http://nope", "redis.url"),
        ("AGENTIDP_LOG__FORMAT", "xml", "format"),
        ("AGENTIDP_SERVER__TYPO", "1", "typo"),
    ] {
        let out = agentidp(&["serve"], &[(key, value)]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{key}: {stderr}");
        assert!(stderr.contains(named), "{key}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[test]
fn config_command_redacts_secrets() {
    let out = agentidp(&["config"], &[("AGENTIDP_DATABASE__URL", "postgres://app:hunter2@db:5432/x")]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("[redacted]"), "{stdout}");
    assert!(!stdout.contains("hunter2"), "{stdout}");
}

#[test]
fn openapi_command_prints_the_document() {
    let out = agentidp(&["openapi"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["info"]["title"], "AgentIdP");
}

#[test]
fn serve_gives_up_on_an_unreachable_postgres() {
    let out = agentidp(
        &["serve"],
        &[
            ("AGENTIDP_DATABASE__URL", "postgres://postgres@127.0.0.1:1/none"),
            ("AGENTIDP_DATABASE__CONNECT_RETRY_SECS", "1"),
            ("AGENTIDP_SERVER__BIND", "127.0.0.1:0"),
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not reachable"));
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_request_finish_then_exits_0() {
    use std::io::{BufRead, BufReader, Read, Write};
    let (db_url, _) = fresh_database().await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agentidp"))
        .arg("serve")
        .env_remove("AGENTIDP_CONFIG")
        .env("AGENTIDP_DATABASE__URL", &db_url)
        .env("AGENTIDP_SERVER__BIND", "127.0.0.1:0")
        .env("AGENTIDP_LOG__FORMAT", "json")
        .env("AGENTIDP_REDIS__KEY_PREFIX", format!("test:{}:", uuid::Uuid::new_v4().simple()))
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("server logs before exiting").unwrap();
        if line.contains("\"listening\"") {
            let v: Value = serde_json::from_str(&line).unwrap();
            break v["fields"]["addr"].as_str().unwrap().to_owned();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});

    let body = br#"{"email":"nobody@example.com","password":"not-a-real-password"}"#;
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /auth/login HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    conn.write_all(&body[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.try_wait().unwrap().is_none(), "the server waits for the in-flight request");

    conn.write_all(&body[10..]).unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 401"), "{response}");
    assert!(response.contains("application/problem+json"), "{response}");

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(std::time::Instant::now() < deadline, "server did not exit after draining");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn cors_and_compression_follow_configuration() {
    let app = spawn_app_with(&[("cors.allowed_origins", json!(["https://console.example.com"]))]).await;
    let resp = app
        .client
        .request(reqwest::Method::OPTIONS, app.url("/auth/me"))
        .header("origin", "https://console.example.com")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    assert_eq!(resp.headers()["access-control-allow-origin"], "https://console.example.com");
    let resp = app.client.get(app.url("/health")).header("origin", "https://evil.example.com").send().await.unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());

    // A client that accepts gzip gets it for a large body.
    let raw = reqwest::Client::builder().no_gzip().build().unwrap();
    let resp = raw.get(app.url("/openapi.json")).header("accept-encoding", "gzip").send().await.unwrap();
    assert_eq!(resp.headers()["content-encoding"], "gzip");
}

#[test]
fn bootstrap_runs_once_then_refuses() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (db_url, _) = rt.block_on(fresh_database());
    let run = |password: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_agentidp"))
            .args(["bootstrap", "--org", "Acme Labs", "--email", "root@acme.test", "--password-stdin"])
            .env_remove("AGENTIDP_CONFIG")
            .env("AGENTIDP_DATABASE__URL", &db_url)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let first = run("a-long-enough-password");
    assert_eq!(first.status.code(), Some(0), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(String::from_utf8_lossy(&first.stdout).contains("system admin"));
    let second = run("another-long-password");
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let users: i64 = rt.block_on(async {
        let pool = sqlx::PgPool::connect(&db_url).await.unwrap();
        sqlx::query_scalar("select count(*) from app_user").fetch_one(&pool).await.unwrap()
    });
    assert_eq!(users, 1, "the second run changed nothing");
}

#[tokio::test]
async fn every_operation_documents_the_errors_the_stack_sends() {
    let app = spawn_app().await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        let public = agentidp::auth::is_public(Some(path));
        let oauth = agentidp::auth::OAUTH_ROUTES.contains(&path.as_str());
        let page = agentidp::auth::PAGE_ROUTES.contains(&path.as_str());
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            let mut needed = vec!["500", "503"];
            if !public {
                needed.extend(["401", "403", "429"]);
            }
            if op["requestBody"]["content"].get("application/json").is_some() {
                needed.extend(if oauth { vec!["400", "413"] } else { vec!["400", "415", "422"] });
            }
            if path.contains('{') {
                needed.push("404");
            }
            for status in needed {
                assert!(responses.contains_key(status), "{method} {path} does not document {status}");
            }
            for (status, response) in responses {
                if !(status.starts_with('4') || status.starts_with('5')) {
                    continue;
                }
                let types: Vec<&String> = response["content"].as_object().unwrap().keys().collect();
                let expected = if page && status.starts_with('4') {
                    "text/html"
                } else if oauth && status != "500" && status != "413" && !(status == "404" && path.contains('{')) {
                    "application/json"
                } else {
                    "application/problem+json"
                };
                assert_eq!(types, [expected], "{method} {path} {status}");
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "{checked} operations");
}

#[tokio::test]
async fn a_redis_answer_slower_than_half_a_second_is_awaited_up_to_the_configured_timeout() {
    let url = std::env::var("AGENTIDP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let redis = agentidp::redis::Redis::new(&agentidp::config::RedisConfig {
        url,
        key_prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
        pool_size: 1,
        timeout_ms: 5_000,
    })
    .unwrap();
    let mut conn = redis.multiplexed().await.unwrap();
    // BLPOP on an empty list answers nil after its own 0.8 s: past the Redis client's default
    // deadline of 500 ms, within the configured 5 s.
    let got: Option<(String, String)> = redis::cmd("BLPOP")
        .arg(redis.key("nothing-here"))
        .arg(0.8)
        .query_async(&mut conn)
        .await
        .expect("a slow answer within redis.timeout_ms is an answer");
    assert!(got.is_none());
}
