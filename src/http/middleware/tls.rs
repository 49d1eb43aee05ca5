//! Layer 1, TLS: decides whether the request arrived over HTTPS, redirects plain HTTP when TLS is
//! enforced, and sets HSTS on HTTPS responses.
//!
//! "Arrived over HTTPS" is the listener's own scheme, unless the peer is a configured trusted proxy,
//! in which case its `X-Forwarded-Proto` decides. The header from anyone else is ignored, so a client
//! cannot talk its way past enforcement. The client's address behind trusted proxies is the
//! rightmost `X-Forwarded-For` entry that is not itself a trusted proxy.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use axum::{
    extract::{ConnectInfo, Request, State},
    http::{HeaderValue, Method, StatusCode, Uri, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use crate::state::AppState;

tokio::task_local! {
    static CLIENT_IP: Option<String>;
}

/// The client's IP for the request on this task: the peer, or what a trusted proxy forwarded.
pub fn current_client_ip() -> Option<String> {
    CLIENT_IP.try_with(|ip| ip.clone()).ok().flatten()
}

/// Whether the current request came in over HTTPS, for layers that set cookies.
#[derive(Clone, Copy, Debug)]
pub struct Secure(pub bool);

pub async fn layer(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let tls = &state.config().tls;
    let peer = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let trusted = peer.is_some_and(|ip| tls.trusted_proxies.iter().any(|net| net.contains(&ip)));
    let forwarded = req
        .headers()
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').next().unwrap_or("").trim().eq_ignore_ascii_case("https"));
    let https = match forwarded {
        Some(proto) if trusted => proto,
        _ => state.listener_is_tls(),
    };

    if !https && tls.enforce {
        return redirect_to_https(&state, req.method(), req.uri(), req.headers().get(header::HOST));
    }
    req.extensions_mut().insert(Secure(https));
    let client_ip = match peer {
        Some(peer) if trusted => Some(forwarded_client(req.headers(), peer, &tls.trusted_proxies)),
        _ => peer,
    }
    .map(|ip| ip.to_string());
    let mut response = CLIENT_IP.scope(client_ip, next.run(req)).await;
    if https {
        let value = format!("max-age={}; includeSubDomains", tls.hsts_max_age_secs);
        if let Ok(v) = HeaderValue::from_str(&value) {
            response.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, v);
        }
    }
    response
}

/// The client behind a chain of trusted proxies: each proxy appends the address it saw to
/// `X-Forwarded-For`, so, reading from the right, the first address that is not a trusted proxy is
/// the client (what lies to its left was written by the client and proves nothing). A malformed
/// entry ends the walk at the last address that could be read.
fn forwarded_client(headers: &axum::http::HeaderMap, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>() else { break };
        client = ip;
        if !trusted.iter().any(|net| net.contains(&ip)) {
            break;
        }
    }
    client
}

/// 308 keeps the method and body, so a POST is repeated as a POST over HTTPS.
fn redirect_to_https(state: &AppState, _method: &Method, uri: &Uri, host: Option<&HeaderValue>) -> Response {
    let public = &state.config().server.public_url;
    // Prefer the configured public origin: the Host header is the client's to choose.
    let authority = match public.strip_prefix("https://") {
        Some(rest) => rest.to_owned(),
        None => match host.and_then(|h| h.to_str().ok()).filter(|h| valid_host(h)) {
            Some(h) => h.to_owned(),
            None => return StatusCode::BAD_REQUEST.into_response(),
        },
    };
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    match HeaderValue::from_str(&format!("https://{authority}{path}")) {
        Ok(location) => (StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, location)]).into_response(),
        Err(_) => StatusCode::BAD_REQUEST.into_response(),
    }
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 255
        && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
}
