//! The test harness: the real application on 127.0.0.1:0, with its own database (a copy of a
//! migrated template) and its own Redis key prefix, plus helpers that read like the API.
// Helpers serve many test files; not every one uses every helper.
#![allow(dead_code)]

pub mod browser;
pub mod proxy;

use std::{sync::Once, time::Duration};

use agentidp::{
    app::Application,
    config::{Config, DEFAULTS},
    redis::Redis,
};
use figment::{
    Figment,
    providers::{Format, Serialized, Toml},
};
use reqwest::{Response, StatusCode};
use serde_json::Value;
use sqlx::{Connection, PgConnection, PgPool, postgres::PgPoolOptions};

/// The server the tests own: a maintenance connection creates one database per test from it.
pub fn admin_url() -> String {
    std::env::var("AGENTIDP_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("AGENTIDP_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn with_db(url: &str, db: &str) -> String {
    let (base, _) = url.rsplit_once('/').expect("database URL has a path");
    format!("{base}/{db}")
}

static INIT: Once = Once::new();

/// Where the test run's logs go: `$CARGO_TARGET_DIR/test-logs` (else `target/test-logs`). Every
/// instance the tests start logs there, at the product's default level, and `make test` scans
/// the files for the secrets the tests recorded (`scripts/scan-logs.sh`).
pub fn test_logs_dir() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    let dir = target.join("test-logs");
    std::fs::create_dir_all(&dir).expect("create the test log directory");
    dir
}

/// A new log file in the test log directory, for an instance started as a process.
pub fn test_log_file(name: &str) -> (std::path::PathBuf, std::fs::File) {
    let path = test_logs_dir().join(format!("{name}-{}.log", uuid::Uuid::new_v4().simple()));
    let file = std::fs::File::create(&path).expect("create a test log file");
    (path, file)
}

/// Records a secret a test was shown, for the scan of every log of the run (one per line:
/// what it is, a tab, the secret).
pub fn record_secret(what: &str, secret: &str) {
    use std::io::Write;
    static FILE: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);
    if secret.len() < 12 || secret.contains(['\n', '\t']) {
        return;
    }
    let mut file = FILE.lock().unwrap_or_else(|e| e.into_inner());
    let f = file.get_or_insert_with(|| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(test_logs_dir().join("secrets.txt"))
            .expect("open the recorded secrets")
    });
    let _ = writeln!(f, "{what}\t{secret}");
}

/// The log of the in-process instances: a buffered file flushed by a thread of its own every
/// 100 ms, so that logging costs the requests one memory copy.
#[derive(Clone)]
struct LogFile(std::sync::Arc<std::sync::Mutex<std::io::BufWriter<std::fs::File>>>);

impl std::io::Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

fn init_process() {
    INIT.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        // The level the product runs at by default (config/default.toml), unless RUST_LOG says.
        let level: String =
            Figment::from(Toml::string(DEFAULTS)).extract_inner("log.level").unwrap_or_else(|_| "info".into());
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&level));
        if std::env::var("TEST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
            return;
        }
        let (_, file) = test_log_file("api");
        let log = LogFile(std::sync::Arc::new(std::sync::Mutex::new(std::io::BufWriter::with_capacity(1 << 16, file))));
        let flusher = log.clone();
        std::thread::Builder::new()
            .name("test-log-flush".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_millis(100));
                    let _ = std::io::Write::flush(&mut flusher.clone());
                }
            })
            .expect("spawn the log flusher");
        let _ = tracing_subscriber::fmt().json().with_env_filter(filter).with_writer(move || log.clone()).try_init();
    });
}

/// The template database name: a hash of the migrations, so a schema change makes a new one.
fn template_name() -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for m in agentidp::db::MIGRATOR.iter() {
        for b in m.checksum.iter().chain(m.version.to_le_bytes().iter()) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    format!("agentidp_tmpl_{h:016x}")
}

/// Creates a fresh, migrated database and returns its URL. Test binaries running at once agree on
/// the template through an advisory lock.
pub async fn fresh_database() -> (String, String) {
    let admin = admin_url();
    let mut conn =
        PgConnection::connect(&admin).await.expect("connect to the test Postgres (is `make services` done?)");
    let template = template_name();
    sqlx::query("select pg_advisory_lock(727274)").execute(&mut conn).await.unwrap();
    let exists: bool = sqlx::query_scalar("select exists(select 1 from pg_database where datname = $1)")
        .bind(&template)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    if !exists {
        sqlx::query(&format!("create database {template}")).execute(&mut conn).await.unwrap();
        let pool = PgPoolOptions::new().max_connections(1).connect(&with_db(&admin, &template)).await.unwrap();
        agentidp::db::MIGRATOR.run(&pool).await.expect("migrations apply to an empty database");
        pool.close().await;
        // Old templates and databases of earlier runs are only clutter now. Without `force`, so
        // that a database another test run (of another schema) is still using stays.
        let stale: Vec<String> = sqlx::query_scalar(
            "select datname from pg_database where (datname like 'agentidp\\_tmpl\\_%' and datname <> $1) or datname like 'agentidp\\_t\\_%'",
        )
        .bind(&template)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        for db in stale {
            let _ = sqlx::query(&format!("drop database if exists {db}")).execute(&mut conn).await;
        }
    }
    let name = format!("agentidp_t_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("create database {name} template {template}")).execute(&mut conn).await.unwrap();
    sqlx::query("select pg_advisory_unlock(727274)").execute(&mut conn).await.unwrap();
    (with_db(&admin, &name), name)
}

/// A configuration for a test app: defaults, then the test's own values.
pub fn test_config(db_url: &str, extra: &[(&str, Value)]) -> Config {
    let mut fig = Figment::from(Toml::string(DEFAULTS))
        .merge(Serialized::default("server.bind", "127.0.0.1:0"))
        .merge(Serialized::default("database.url", db_url))
        .merge(Serialized::default("database.connect_retry_secs", 5))
        .merge(Serialized::default("database.acquire_timeout_ms", 1500))
        .merge(Serialized::default("redis.url", redis_url()))
        .merge(Serialized::default("server.shutdown_grace_secs", 10))
        // Tests that are not about limits should never meet one; the tier tests set their own.
        .merge(Serialized::default(
            "tiers.plans.free",
            serde_json::json!({
                "max_agents": "unlimited",
                "api_calls_per_day": "unlimited",
                "tokens_per_day": "unlimited",
                "tokens_per_month": "unlimited",
                "rate_limit": { "requests_per_minute": 6_000_000, "burst": 1_000_000 },
            }),
        ));
    for (k, v) in extra {
        fig = fig.merge(Serialized::default(k, v.clone()));
    }
    Config::from_figment(fig).expect("test configuration is valid")
}

/// A running application and a client for it.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub db: PgPool,
    pub db_url: String,
    pub redis: Redis,
    pub config: Config,
    pub state: agentidp::state::AppState,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pub server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// The application with default test configuration.
pub async fn spawn_app() -> TestApp {
    spawn_app_with(&[]).await
}

/// The application with extra configuration keys (dotted, as in the TOML file).
pub async fn spawn_app_with(extra: &[(&str, Value)]) -> TestApp {
    init_process();
    let (db_url, _) = fresh_database().await;
    spawn_on(test_config(&db_url, extra), None).await
}

/// Starts the app on an existing configuration; `redis_prefix` lets two apps share one namespace.
pub async fn spawn_on(config: Config, redis_prefix: Option<String>) -> TestApp {
    init_process();
    let db = agentidp::db::pool_options(&config.database)
        .connect(&config.database.url)
        .await
        .expect("connect to the test database");
    let prefix = redis_prefix.unwrap_or_else(|| format!("test:{}:", uuid::Uuid::new_v4().simple()));
    let redis = Redis::with_prefix(&config.redis, prefix).unwrap();
    let app = Application::with_parts(config.clone(), db.clone(), redis.clone()).await.expect("app builds");
    let addr = app.local_addr();
    let state = app.state().clone();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    let scheme = if config.tls.enabled() { "https" } else { "http" };
    let client =
        reqwest::Client::builder().danger_accept_invalid_certs(true).timeout(Duration::from_secs(30)).build().unwrap();
    TestApp {
        addr,
        base: format!("{scheme}://{addr}"),
        client,
        db,
        db_url: config.database.url.clone(),
        redis,
        config,
        state,
        shutdown: Some(tx),
        server: Some(server),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.expect("request sent")
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.client.post(self.url(path)).json(body).send().await.expect("request sent")
    }

    /// Asks the server to stop and returns its join handle.
    pub fn begin_shutdown(&mut self) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        self.server.take().expect("server still running")
    }
}

pub const ADMIN_EMAIL: &str = "admin@acme.test";
pub const PASSWORD: &str = "correct-horse-battery";

/// A signed-in caller: a session token or an API key, and the organization it acts in.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token: String,
    pub org_id: String,
    pub user_id: String,
}

impl TestApp {
    /// The first organization and its owner (a system admin), signed in.
    pub async fn bootstrap(&self) -> Caller {
        match agentidp::auth::bootstrap::run(&self.db, "Acme Labs", ADMIN_EMAIL, Some(PASSWORD.into())).await.unwrap() {
            agentidp::auth::bootstrap::Outcome::Created { .. } => {}
            agentidp::auth::bootstrap::Outcome::AlreadyDone(w) => panic!("bootstrap: {w}"),
        }
        self.sign_in(ADMIN_EMAIL, PASSWORD).await
    }

    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post_json("/auth/login", &serde_json::json!({ "email": email, "password": password })).await
    }

    pub async fn sign_in(&self, email: &str, password: &str) -> Caller {
        let body = json_ok(self.login(email, password).await, StatusCode::OK).await;
        record_secret("session token", body["session_token"].as_str().unwrap_or_default());
        Caller {
            token: body["session_token"].as_str().unwrap().to_owned(),
            org_id: body["actor"]["org_id"].as_str().unwrap_or_default().to_owned(),
            user_id: body["actor"]["actor_id"].as_str().unwrap().trim_start_matches("user:").to_owned(),
        }
    }

    /// A request with the caller's bearer token.
    pub fn as_(&self, caller: &Caller, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(&caller.token)
    }

    /// A new organization (as a system admin) with a fresh owner, signed in.
    pub async fn org_with_owner(&self, admin: &Caller, name: &str, owner_email: &str) -> Caller {
        let org = json_ok(
            self.as_(admin, reqwest::Method::POST, "/api/v1/organizations")
                .json(&serde_json::json!({ "name": name }))
                .send()
                .await
                .unwrap(),
            StatusCode::CREATED,
        )
        .await;
        let org_id = org["id"].as_str().unwrap().to_owned();
        self.add_member(admin, &org_id, owner_email, "owner").await;
        let mut caller = self.sign_in(owner_email, PASSWORD).await;
        caller.org_id = org_id;
        caller
    }

    /// Invites `email`; returns the invitation body (with its one-time token).
    pub async fn invite(&self, by: &Caller, org_id: &str, email: &str, role: &str) -> Value {
        json_ok(
            self.as_(by, reqwest::Method::POST, &format!("/api/v1/organizations/{org_id}/members"))
                .json(&serde_json::json!({ "email": email, "role": role }))
                .send()
                .await
                .unwrap(),
            StatusCode::ACCEPTED,
        )
        .await
    }

    /// Adds a member the way people join: an invitation, redeemed with the standard test password
    /// by a new person, or accepted by a signed-in existing one. Returns the member body.
    pub async fn add_member(&self, by: &Caller, org_id: &str, email: &str, role: &str) -> Value {
        let invitation = self.invite(by, org_id, email, role).await;
        let token = invitation["invitation_token"].as_str().unwrap();
        record_secret("invitation token", token);
        let redeemed =
            self.post_json("/auth/set-password", &serde_json::json!({ "token": token, "password": PASSWORD })).await;
        if redeemed.status() == StatusCode::NO_CONTENT {
            let me = self.sign_in(email, PASSWORD).await;
            return serde_json::json!({ "user_id": me.user_id, "email": email, "role": role });
        }
        let invitee = self.sign_in(email, PASSWORD).await;
        let id = invitation["id"].as_str().unwrap();
        json_ok(
            self.as_(&invitee, reqwest::Method::POST, &format!("/api/v1/invitations/{id}/accept"))
                .send()
                .await
                .unwrap(),
            StatusCode::CREATED,
        )
        .await
    }

    /// A new API key for the caller, acting in its org.
    pub async fn api_key(&self, by: &Caller, scopes: Option<&[&str]>) -> Caller {
        let mut body = serde_json::json!({ "description": "test key" });
        if let Some(s) = scopes {
            body["scopes"] = serde_json::json!(s);
        }
        let created = json_ok(
            self.as_(by, reqwest::Method::POST, "/auth/api-keys")
                .header("x-org-id", &by.org_id)
                .json(&body)
                .send()
                .await
                .unwrap(),
            StatusCode::CREATED,
        )
        .await;
        record_secret("api key", created["key"].as_str().unwrap_or_default());
        Caller {
            token: created["key"].as_str().unwrap().to_owned(),
            org_id: by.org_id.clone(),
            user_id: by.user_id.clone(),
        }
    }
}

/// An agent's client credential.
#[derive(Clone, Debug)]
pub struct Client {
    pub agent_id: String,
    pub credential_id: String,
    pub client_id: String,
    pub secret: String,
}

impl TestApp {
    /// A new agent in the caller's organization.
    pub async fn create_agent(&self, by: &Caller, body: Value) -> Value {
        json_ok(
            self.as_(by, reqwest::Method::POST, "/api/v1/agents").json(&body).send().await.unwrap(),
            StatusCode::CREATED,
        )
        .await
    }

    /// An agent allowed `scopes`, with one credential.
    pub async fn agent_client(&self, by: &Caller, scopes: &[&str]) -> Client {
        let agent = self.create_agent(by, serde_json::json!({ "name": "worker", "allowed_scopes": scopes })).await;
        let agent_id = agent["id"].as_str().unwrap().to_owned();
        self.credential(by, &agent_id).await
    }

    pub async fn credential(&self, by: &Caller, agent_id: &str) -> Client {
        let cred = json_ok(
            self.as_(by, reqwest::Method::POST, &format!("/api/v1/agents/{agent_id}/credentials"))
                .send()
                .await
                .unwrap(),
            StatusCode::CREATED,
        )
        .await;
        record_secret("agent client secret", cred["client_secret"].as_str().unwrap_or_default());
        Client {
            agent_id: agent_id.to_owned(),
            credential_id: cred["id"].as_str().unwrap().to_owned(),
            client_id: cred["client_id"].as_str().unwrap().to_owned(),
            secret: cred["client_secret"].as_str().unwrap().to_owned(),
        }
    }

    /// POSTs a form to the token endpoint with client_secret_basic.
    pub async fn token_request(&self, client: &Client, form: &[(&str, &str)]) -> Response {
        self.client
            .post(self.url("/api/v1/token"))
            .basic_auth(&client.client_id, Some(&client.secret))
            .form(form)
            .send()
            .await
            .unwrap()
    }

    /// A fresh access token for the client.
    pub async fn access_token(&self, client: &Client) -> String {
        let body =
            json_ok(self.token_request(client, &[("grant_type", "client_credentials")]).await, StatusCode::OK).await;
        let token = body["access_token"].as_str().unwrap().to_owned();
        record_secret("access token", &token);
        token
    }

    /// GET /auth/me with a bearer token; the status.
    pub async fn me_status(&self, token: &str) -> StatusCode {
        self.client.get(self.url("/auth/me")).bearer_auth(token).send().await.unwrap().status()
    }
}

/// Asserts a problem+json response with the given status and code; returns the body.
pub async fn assert_problem(resp: Response, status: StatusCode, code: &str) -> Value {
    let got = resp.status();
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let header_id = resp.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "status; body: {text}");
    assert_eq!(ct, "application/problem+json", "content type; body: {text}");
    let body: Value = serde_json::from_str(&text).expect("problem body is JSON");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert!(body["type"].as_str().is_some_and(|t| !t.is_empty()), "{body}");
    assert!(body["title"].is_string() && body["detail"].is_string(), "{body}");
    assert_eq!(body["request_id"].as_str().map(str::to_owned), header_id, "request id in body and header");
    body
}

/// Reads a JSON body after checking the status.
pub async fn json_ok(resp: Response, status: StatusCode) -> Value {
    let got = resp.status();
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "body: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}
