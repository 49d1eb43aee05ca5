//! Layer 3, metering: counts every request for Prometheus by method, route template and status,
//! and records each request made in an organization (org, actor, route template, status, latency)
//! for analytics.
//!
//! The method is one of the standard ones or `other`; the route is axum's matched template (`/api/v1/agents/{id}`), never the raw path, so label
//! cardinality stays bounded whatever clients send. Recording is an atomic increment and a
//! non-blocking push onto a bounded queue (see [`crate::analytics`]): it never blocks and never
//! fails a request. Requests the tier layer refuses are recorded too.

use std::{
    collections::HashMap,
    sync::{LazyLock, RwLock},
    time::Instant,
};

use axum::{
    extract::{MatchedPath, Request, State},
    http::Method,
    middleware::Next,
    response::Response,
};

use super::org_context::{Identified, OrgChoice};
use crate::{
    analytics::{Event, Kind},
    auth::Credential,
    state::AppState,
};

pub const REQUESTS_TOTAL: &str = "http_requests_total";
pub const REQUEST_DURATION: &str = "http_request_duration_seconds";

/// The method as a metric label: the standard methods by name, anything else `other`, so that
/// clients cannot mint series by sending made-up methods.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "other",
    }
}

/// The counter and histogram of one (method, route, status) series.
struct Series {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

/// Series by (method, status), then route template. Looked up in the recorder once each: a request
/// then records without building label strings or hashing them in the recorder. Bounded like the
/// labels themselves (standard methods, route templates, the statuses we send).
type SeriesMap = HashMap<(&'static str, u16), HashMap<Box<str>, Series>>;
static SERIES: LazyLock<RwLock<SeriesMap>> = LazyLock::new(Default::default);

fn record_metrics(method: &'static str, route: &str, status: u16, seconds: f64) {
    {
        let map = SERIES.read().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = map.get(&(method, status)).and_then(|m| m.get(route)) {
            s.requests.increment(1);
            s.duration.record(seconds);
            return;
        }
    }
    let labels = [("method", method.to_owned()), ("route", route.to_owned()), ("status", status.to_string())];
    let series = Series {
        requests: metrics::counter!(REQUESTS_TOTAL, &labels),
        duration: metrics::histogram!(REQUEST_DURATION, &labels),
    };
    series.requests.increment(1);
    series.duration.record(seconds);
    SERIES.write().unwrap_or_else(|e| e.into_inner()).entry((method, status)).or_default().insert(route.into(), series);
}

pub async fn layer(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = method_label(req.method());
    let route = req.extensions().get::<MatchedPath>().cloned();
    let who = match req.extensions().get::<Identified>() {
        Some(Identified { principal: Ok(p), org: OrgChoice::Chosen(Some(org)) })
            if route.is_some() && state.analytics().records_requests() =>
        {
            let client = match &p.credential {
                Credential::AccessToken { claims, .. } => Some(claims.client_id.clone()),
                _ => None,
            };
            Some((*org, format!("{}:{}", p.actor_type.id_prefix(), p.user_id), client))
        }
        _ => None,
    };
    let response = next.run(req).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    let route = route.as_ref().map_or("unmatched", |p| p.as_str());
    if let Some((org_id, actor_id, client_id)) = who {
        state.analytics().record(Event {
            org_id,
            kind: Kind::Request,
            actor_id: Some(actor_id),
            client_id,
            method: method.to_owned(),
            route: route.to_owned(),
            status,
            latency_us: elapsed.as_micros().min(u32::MAX as u128) as u32,
            at: state.clock().now(),
        });
    }
    record_metrics(method, route, status, elapsed.as_secs_f64());
    response
}
