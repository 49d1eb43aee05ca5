//! The application: the router, and serving with graceful shutdown. Used by `main` and by the
//! integration tests alike. The shared state it serves lives in [`crate::state`].

use std::{net::SocketAddr, time::Duration};

use axum::{Router, response::IntoResponse};
use axum_server::{Handle, tls_rustls::RustlsConfig};
use sqlx::PgPool;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

pub use crate::state::AppState;
use crate::{
    config::Config,
    db,
    http::{self, error::problem_for_status, openapi::ApiDoc},
    redis::Redis,
};

/// Every documented route of every module. The OpenAPI document is derived from this.
pub fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(http::ops::router())
        .merge(crate::auth::router())
        .merge(crate::audit::router())
        .merge(crate::policy::router())
        .merge(crate::tiers::router())
        .merge(crate::webhooks::router())
        .merge(crate::delegation::router())
        .merge(crate::usage::router())
        .merge(crate::city::router())
        .merge(crate::trust::router())
}

/// The complete router: documented routes, the console, Swagger UI, problem+json fallbacks, the
/// middleware stack. The console calls the API in process through a second copy of the API's
/// router with the same stack, so each of its calls is checked as any client's would be.
pub fn build_router(state: AppState) -> Router {
    let (api, _) = api_router().split_for_parts();
    let console = crate::console::router(crate::console::Api(with_fallbacks(api.clone(), &state)));
    let router =
        api.merge(console).merge(SwaggerUi::new("/docs").config(utoipa_swagger_ui::Config::from("/openapi.json")));
    with_fallbacks(router, &state)
}

/// The problem+json fallbacks and the middleware stack around `router`.
fn with_fallbacks(router: axum::Router<AppState>, state: &AppState) -> Router {
    let router = router
        .fallback(|| async { problem_for_status(axum::http::StatusCode::NOT_FOUND, None) })
        .method_not_allowed_fallback(|| async {
            problem_for_status(axum::http::StatusCode::METHOD_NOT_ALLOWED, None).into_response()
        });
    http::middleware::stack(router, state).with_state(state.clone())
}

/// A bound, ready-to-serve application.
pub struct Application {
    state: AppState,
    listener: std::net::TcpListener,
    tls: Option<RustlsConfig>,
}

impl Application {
    /// Connects to Postgres (retrying), migrates if configured, prepares Redis, binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let db = db::connect(&config.database).await?;
        if config.database.migrate_on_start {
            db::migrate(&db).await?;
        }
        let redis = Redis::new(&config.redis)?;
        if let Err(e) = redis.ping().await {
            tracing::warn!(error = %e, "redis unreachable at start-up: serving degraded until it returns");
        }
        Self::with_parts(config, db, redis).await
    }

    /// Binds with existing pools (tests bring their own database and key prefix).
    pub async fn with_parts(config: Config, db: PgPool, redis: Redis) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind(config.server.bind)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.bind))?;
        listener.set_nonblocking(true)?;
        let tls = if config.tls.enabled() {
            Some(
                RustlsConfig::from_pem_file(&config.tls.cert_path, &config.tls.key_path)
                    .await
                    .map_err(|e| anyhow::anyhow!("tls.cert_path/tls.key_path: {e}"))?,
            )
        } else {
            None
        };
        if config.auth.key_encryption_key.is_empty() {
            tracing::warn!(
                "auth.key_encryption_key is not set: signing keys are sealed with the PUBLIC development key. \
                 Never run like this in production (server.environment = \"production\" refuses to)."
            );
        }
        let state = AppState::new(config, db, redis)?;
        let cfg = state.config();
        state.keys().ensure(state.db(), cfg.algorithm(), cfg.auth.access_token_ttl_secs).await?;
        // Revocations made before this instance started.
        crate::auth::revocation::catch_up(&state).await?;
        // Every organization's active policies.
        crate::policy::sync_all(&state).await?;
        // This month's and next month's usage partitions.
        crate::usage::maintain_once(&state).await?;
        Ok(Self { state, listener, tls })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish within
    /// the grace period, and closes the pools.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let Self { state, listener, tls } = self;
        let grace = Duration::from_secs(state.config().server.shutdown_grace_secs);
        let handle: Handle<SocketAddr> = Handle::new();
        let signal = handle.clone();
        let streams = state.clone();
        tokio::spawn(async move {
            shutdown.await;
            // Live streams never finish by themselves: end them, so that draining can.
            streams.city().hub.close();
            tracing::info!(grace_secs = grace.as_secs(), "shutting down: draining in-flight requests");
            signal.graceful_shutdown(Some(grace));
        });
        let background = spawn_background(&state);
        let dispatcher = crate::webhooks::spawn(&state);
        let publisher = crate::events::nats::spawn(&state);
        let retention = crate::retention::spawn(&state);
        let settler = spawn_settler(&state);
        let delegation = crate::delegation::spawn(&state);
        let usage_ingest = crate::usage::nats::spawn(&state);
        let usage_tasks = crate::usage::spawn(&state);
        let city = crate::city::spawn(&state);
        let registrations = crate::auth::oidc::registration::spawn(&state);
        let analytics = state.analytics().spawn_writer(state.db().clone());
        let decisions = state.decision_log().spawn_writer(state.db().clone());
        let service = build_router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
        tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "listening");
        match tls {
            Some(tls) => axum_server::from_tcp_rustls(listener, tls)?.handle(handle).serve(service).await?,
            None => axum_server::from_tcp(listener)?.handle(handle).serve(service).await?,
        }
        // Webhook attempts in flight finish and are recorded, and the NATS batch in flight is
        // acknowledged; what is left is taken by the other instances.
        state.webhooks().stop();
        if let Some(mut d) = dispatcher
            && tokio::time::timeout(grace, &mut d).await.is_err()
        {
            tracing::warn!("webhook attempts still in flight after the grace period; their leases will lapse");
            d.abort();
        }
        if let Some(mut p) = publisher {
            let _ = p.stop.send(true);
            if tokio::time::timeout(grace, &mut p.task).await.is_err() {
                p.task.abort();
            }
        }
        // The usage batch in flight commits and is acknowledged; what is left stays in the stream.
        if let Some(mut u) = usage_ingest {
            let _ = u.stop.send(true);
            if tokio::time::timeout(grace, &mut u.task).await.is_err() {
                u.task.abort();
            }
        }
        for t in usage_tasks {
            t.abort();
        }
        background.abort();
        settler.abort();
        delegation.abort();
        city.abort();
        if let Some(r) = registrations {
            r.abort();
        }
        if let Some(r) = retention {
            r.abort();
        }
        // What was buffered in memory goes out before the pool closes, all of it within one grace
        // period: leases go back and counts made in memory reach Redis (for the instances that
        // stay), `last_used` times, analytics records and decisions reach Postgres.
        let deadline = tokio::time::Instant::now() + grace;
        state.analytics().stop();
        state.decision_log().stop();
        let settle = async {
            let giveback = state.tiers().limiter.settle(state.redis(), crate::tiers::Giveback::All);
            let _ = tokio::time::timeout_at(deadline, giveback).await;
        };
        let last_used = async {
            let _ = tokio::time::timeout_at(deadline, state.auth().last_used.flush(state.db())).await;
        };
        tokio::join!(
            settle,
            last_used,
            drain(analytics, deadline, "analytics records"),
            drain(decisions, deadline, "decisions for the decision log"),
        );
        state.db().close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Waits for a writer asked to stop until `deadline`, then gives up on what it still holds.
async fn drain(writer: Option<tokio::task::JoinHandle<()>>, deadline: tokio::time::Instant, what: &str) {
    if let Some(mut writer) = writer
        && tokio::time::timeout_at(deadline, &mut writer).await.is_err()
    {
        tracing::warn!("{what} still unwritten after the grace period; dropping them");
        writer.abort();
    }
}

/// Background work of one instance: cache invalidations from other instances, the safety-net
/// syncs, scheduled key rotation.
fn spawn_background(state: &AppState) -> tokio::task::JoinHandle<()> {
    let listeners = vec![
        crate::auth::credentials::listener(),
        crate::policy::listener(),
        crate::tiers::listener(),
        crate::usage::listener(),
    ];
    let subscriber = tokio::spawn(crate::cache::invalidation::run(state.clone(), listeners));
    let state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(15));
        let mut ticks: u64 = 0;
        loop {
            tick.tick().await;
            ticks += 1;
            if subscriber.is_finished() {
                tracing::error!("a background task stopped");
            }
            state.auth().last_used.flush(state.db()).await;
            // Safety net under pub/sub: re-read revocations every 30 s.
            if ticks.is_multiple_of(2) {
                if let Err(e) = crate::auth::revocation::catch_up(&state).await {
                    tracing::warn!(error = %e, "revocation sync failed");
                }
                if let Err(e) = crate::policy::sync_all(&state).await {
                    tracing::warn!(error = %e, "policy sync failed");
                }
            }
            // Scheduled key rotation, checked every 15 minutes.
            if ticks % 60 == 1 {
                crate::auth::agents::rotate_if_due(&state).await;
            }
        }
    })
}

/// Gives back the rate limiter's expired leases and adds its in-memory counts to Redis, often.
fn spawn_settler(state: &AppState) -> tokio::task::JoinHandle<()> {
    let state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(state.config().tiers.limiter.settle_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            state.tiers().limiter.settle(state.redis(), crate::tiers::Giveback::Expired).await;
        }
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
