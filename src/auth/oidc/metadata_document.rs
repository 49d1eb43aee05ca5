//! Client ID metadata documents (the OAuth draft MCP clients use): a `client_id` that is an https
//! URL names a JSON document describing the client, fetched from that URL.
//!
//! The fetch goes through the one guarded fetcher ([`crate::http::fetch`]: the webhooks' SSRF
//! guard on every resolved address and literal IPs, no redirects followed, no proxy), with a size
//! cap and a timeout. The document must name itself (`client_id` equal to its URL), use no shared
//! secret, and list redirect URIs on its own origin (unless configured otherwise). Documents are cached as long as their `Cache-Control`
//! allows, within configured bounds; `no-store` is fetched every time.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use super::{AuthMethod, OidcClient, check_info_uri, check_redirect_uri, known_scope, url_client_uuid};
use crate::{
    http::fetch::{DocCache, FetchError, Fetcher, Freshness, Options},
    state::AppState,
};

/// `[oidc.metadata_documents]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetadataDocumentConfig {
    pub enabled: bool,
    /// Fetch documents from loopback and private addresses (tests, on-premise clients).
    pub allow_private_networks: bool,
    /// A PEM file of extra certificate authorities to trust for the fetch (empty: the public roots).
    pub ca_file: String,
    pub max_bytes: usize,
    pub timeout_ms: u64,
    /// Without `Cache-Control: max-age`, a document is kept this long; never longer than the max.
    pub default_cache_secs: u64,
    pub max_cache_secs: u64,
    /// Redirect URIs must be on the document's own origin.
    pub same_origin_redirect_uris: bool,
    /// The scopes such a client may ask for at most.
    pub scopes: Vec<String>,
    pub refresh_token_ttl_secs: u64,
}

/// Why a document is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("Client ID metadata documents are not accepted here.")]
    Disabled,
    #[error("The client_id URL is refused: {0}")]
    Url(&'static str),
    #[error("The client's metadata document could not be fetched.")]
    Unreachable,
    #[error("The client's metadata document answered with a redirect; it must be served at its URL.")]
    Redirected,
    #[error("The client's metadata document answered {0}.")]
    Status(u16),
    #[error("The client's metadata document is larger than {0} bytes.")]
    TooLarge(usize),
    #[error("The client's metadata document took too long.")]
    Timeout,
    #[error("The client's metadata document is invalid: {0}")]
    Invalid(String),
}

/// The guarded fetcher (also for clients' `jwks_uri`) and this instance's caches.
pub struct Documents {
    enabled: bool,
    pub(super) fetcher: Fetcher,
    cache: DocCache<OidcClient>,
    /// Clients' key sets fetched from their `jwks_uri`, by URL.
    pub(super) jwks: DocCache<Value>,
}

impl Documents {
    pub fn new(cfg: &MetadataDocumentConfig) -> anyhow::Result<Self> {
        let fetcher = Fetcher::new(Options {
            https_only: true,
            allow_private: cfg.allow_private_networks,
            max_bytes: cfg.max_bytes,
            timeout: Duration::from_millis(cfg.timeout_ms),
            ca_file: &cfg.ca_file,
        })
        .map_err(|e| anyhow::anyhow!("oidc.metadata_documents.ca_file: {e}"))?;
        Ok(Self {
            enabled: cfg.enabled,
            fetcher,
            cache: DocCache::new(10_000, Duration::from_secs(cfg.max_cache_secs.max(1))),
            jwks: DocCache::new(10_000, Duration::from_secs(86_400)),
        })
    }
}

/// The lifetime `Cache-Control` allows (`None`: do not store).
fn cache_for(freshness: Freshness, cfg: &MetadataDocumentConfig) -> Option<Duration> {
    let secs = match freshness {
        Freshness::NoStore => return None,
        Freshness::MaxAge(s) => s,
        Freshness::Unspecified => cfg.default_cache_secs,
    }
    .min(cfg.max_cache_secs);
    (secs > 0).then(|| Duration::from_secs(secs))
}

impl From<FetchError> for Refused {
    fn from(e: FetchError) -> Self {
        match e {
            FetchError::Refused(r) => Refused::Url(r.message()),
            FetchError::Unreachable => Refused::Unreachable,
            FetchError::Redirected => Refused::Redirected,
            FetchError::Status(s) => Refused::Status(s),
            FetchError::TooLarge(n) => Refused::TooLarge(n),
            FetchError::Timeout => Refused::Timeout,
            FetchError::NotJson => Refused::Invalid("it is not JSON.".into()),
        }
    }
}

#[derive(Deserialize)]
struct Document {
    client_id: Option<String>,
    client_name: Option<String>,
    redirect_uris: Option<Vec<String>>,
    post_logout_redirect_uris: Option<Vec<String>>,
    grant_types: Option<Vec<String>>,
    token_endpoint_auth_method: Option<String>,
    scope: Option<String>,
    logo_uri: Option<String>,
    client_uri: Option<String>,
    policy_uri: Option<String>,
    tos_uri: Option<String>,
    jwks: Option<Value>,
    jwks_uri: Option<String>,
}

fn validate(url: &Url, raw: &str, doc: Document, state: &AppState) -> Result<OidcClient, Refused> {
    let cfg = &state.config().oidc.metadata_documents;
    let bad = |m: &str| Refused::Invalid(m.to_owned());
    if doc.client_id.as_deref() != Some(raw) {
        return Err(bad("its client_id is not the URL it was fetched from."));
    }
    let redirect_uris = doc.redirect_uris.unwrap_or_default();
    if redirect_uris.is_empty() || redirect_uris.len() > 20 {
        return Err(bad("it lists no redirect_uris (or more than 20)."));
    }
    let origin = url.origin();
    for u in redirect_uris.iter().chain(doc.post_logout_redirect_uris.iter().flatten()) {
        check_redirect_uri(u).map_err(|why| Refused::Invalid(format!("a redirect URI is refused: {why}")))?;
        if cfg.same_origin_redirect_uris && Url::parse(u).map(|r| r.origin()).ok() != Some(origin.clone()) {
            return Err(bad("a redirect URI is not on the document's origin."));
        }
    }
    let auth_method = match doc.token_endpoint_auth_method.as_deref().unwrap_or("none") {
        "none" => AuthMethod::None,
        "private_key_jwt" if doc.jwks.is_some() || doc.jwks_uri.is_some() => AuthMethod::PrivateKeyJwt,
        _ => return Err(bad("token_endpoint_auth_method must be none, or private_key_jwt with keys.")),
    };
    let grant_types = doc.grant_types.unwrap_or_else(|| vec!["authorization_code".into(), "refresh_token".into()]);
    if !grant_types.iter().all(|g| g == "authorization_code" || g == "refresh_token") {
        return Err(bad("grant_types may be authorization_code and refresh_token only."));
    }
    let allowed_scopes: Vec<String> = match doc.scope {
        Some(s) => {
            s.split(' ').filter(|s| known_scope(s) && cfg.scopes.iter().any(|c| c == s)).map(str::to_owned).collect()
        }
        None => cfg.scopes.clone(),
    };
    for u in [&doc.logo_uri, &doc.client_uri, &doc.policy_uri, &doc.tos_uri].into_iter().flatten() {
        check_info_uri(u).map_err(|why| Refused::Invalid(format!("a URI is refused: {why}")))?;
    }
    if let Some(u) = &doc.jwks_uri
        && !u.starts_with("https://")
    {
        return Err(bad("jwks_uri must be https."));
    }
    let name: String = doc.client_name.unwrap_or_else(|| url.host_str().unwrap_or("an application").to_owned());
    Ok(OidcClient {
        id: url_client_uuid(raw),
        client_id: raw.to_owned(),
        org_id: None,
        name: name.chars().take(200).collect(),
        auth_method,
        secret_hash: None,
        redirect_uris,
        post_logout_redirect_uris: doc.post_logout_redirect_uris.unwrap_or_default(),
        grant_types,
        allowed_scopes,
        access_ttl: state.config().auth.access_token_ttl_secs,
        refresh_ttl: cfg.refresh_token_ttl_secs,
        logo_uri: doc.logo_uri,
        client_uri: doc.client_uri,
        policy_uri: doc.policy_uri,
        tos_uri: doc.tos_uri,
        jwks: doc.jwks,
        jwks_uri: doc.jwks_uri,
        dynamic: false,
    })
}

/// The client a metadata-document `client_id` names: from the cache, or fetched and validated.
pub async fn client(state: &AppState, raw: &str) -> Result<Arc<OidcClient>, Refused> {
    let docs = &state.auth().documents;
    if !docs.enabled {
        return Err(Refused::Disabled);
    }
    if let Some(c) = docs.cache.fresh(raw, false) {
        return Ok(c);
    }
    let (url, body, ttl) = fetch(state, raw).await?;
    let doc: Document = serde_json::from_slice(&body)
        .map_err(|_| Refused::Invalid("it is not a JSON object of client metadata.".into()))?;
    let client = validate(&url, raw, doc, state)?;
    metrics::counter!("oidc_metadata_documents_fetched_total").increment(1);
    Ok(match ttl {
        Some(ttl) => docs.cache.put(raw.to_owned(), client, ttl),
        None => Arc::new(client),
    })
}

/// Fetches `raw` through the guard: https only, every address checked, no redirects, the size
/// cap and the timeout. Returns the URL, the body and how long it may be cached.
async fn fetch(state: &AppState, raw: &str) -> Result<(Url, Vec<u8>, Option<Duration>), Refused> {
    let docs = &state.auth().documents;
    let url = docs.fetcher.check(raw)?;
    if url.path() == "/" || url.query().is_some() {
        return Err(Refused::Url("it must have a path and no query."));
    }
    state.auth().lookups.charge().map_err(|_| Refused::Unreachable)?;
    let fetched = docs.fetcher.get(url.clone()).await?;
    Ok((url, fetched.body, cache_for(fetched.freshness, &state.config().oidc.metadata_documents)))
}
