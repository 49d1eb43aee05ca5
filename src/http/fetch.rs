//! One guarded fetcher for the documents other parties name by URL: client ID metadata documents,
//! clients' `jwks_uri`, federation partners' discovery documents and key sets.
//!
//! Every fetch goes through the webhooks' SSRF guard (the URL's literal address and every address
//! its name resolves to are checked; no proxy), follows no redirect, reads at most a size cap and
//! gives up after a timeout. What the response's `Cache-Control` allows is parsed once here
//! ([`Freshness`]); each caller maps it to its own bounds. [`DocCache`] keeps fetched documents
//! for as long as that, and lets a caller that finds a document wanting (a key set without the
//! `kid` a token names) fetch it again early, at most every 30 s.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::Value;
use url::Url;

use crate::{cache::Cache, webhooks::ssrf};

/// How a [`Fetcher`] fetches.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    /// Refuse `http://` URLs.
    pub https_only: bool,
    /// Fetch from loopback and private addresses (tests, closed networks).
    pub allow_private: bool,
    pub max_bytes: usize,
    /// For the whole fetch, connecting included.
    pub timeout: Duration,
    /// A PEM file of extra certificate authorities to trust (empty: the public roots only).
    pub ca_file: &'a str,
}

/// Why a document could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("the URL is refused: {}", .0.message())]
    Refused(ssrf::Refused),
    #[error("it could not be fetched")]
    Unreachable,
    #[error("it answered with a redirect")]
    Redirected,
    #[error("it answered {0}")]
    Status(u16),
    #[error("it is larger than {0} bytes")]
    TooLarge(usize),
    #[error("it took too long")]
    Timeout,
    #[error("it is not JSON")]
    NotJson,
}

/// What a response's `Cache-Control` says about keeping it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// `no-store` or `no-cache`.
    NoStore,
    /// `max-age=<seconds>`.
    MaxAge(u64),
    /// Neither.
    Unspecified,
}

impl Freshness {
    pub fn of(headers: &reqwest::header::HeaderMap) -> Self {
        let cc = headers.get(reqwest::header::CACHE_CONTROL).and_then(|v| v.to_str().ok()).unwrap_or("");
        let mut max_age = None;
        for d in cc.split(',').map(str::trim) {
            let lower = d.to_ascii_lowercase();
            if lower == "no-store" || lower == "no-cache" {
                return Self::NoStore;
            }
            if let Some(v) = lower.strip_prefix("max-age=") {
                max_age = v.trim_matches('"').parse::<u64>().ok();
            }
        }
        max_age.map_or(Self::Unspecified, Self::MaxAge)
    }

    /// How long a key set is kept: its max-age within one minute and one day, five minutes
    /// without one. Keys are refetched at least every minute even under `no-store`: a token
    /// check must not cost a fetch.
    pub fn for_key_set(self) -> Duration {
        Duration::from_secs(match self {
            Self::NoStore => 60,
            Self::MaxAge(s) => s.clamp(60, 86_400),
            Self::Unspecified => 300,
        })
    }
}

/// A fetched document.
#[derive(Debug)]
pub struct Fetched {
    pub body: Vec<u8>,
    pub freshness: Freshness,
}

/// An HTTP client that fetches only through the guard.
pub struct Fetcher {
    client: reqwest::Client,
    https_only: bool,
    allow_private: bool,
    max_bytes: usize,
    timeout: Duration,
}

impl Fetcher {
    pub fn new(o: Options<'_>) -> anyhow::Result<Self> {
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("agentidp/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(o.timeout)
            .connect_timeout(o.timeout)
            .dns_resolver(Arc::new(ssrf::GuardedResolver { allow_private: o.allow_private }));
        if !o.ca_file.is_empty() {
            let pem = std::fs::read(o.ca_file).map_err(|e| anyhow::anyhow!("{}: {e}", o.ca_file))?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)? {
                b = b.add_root_certificate(cert);
            }
        }
        Ok(Self {
            client: b.build()?,
            https_only: o.https_only,
            allow_private: o.allow_private,
            max_bytes: o.max_bytes,
            timeout: o.timeout,
        })
    }

    /// Parses `raw` and checks its scheme and literal address (names are checked when resolved).
    pub fn check(&self, raw: &str) -> Result<Url, FetchError> {
        let url = ssrf::parse(raw, self.https_only).map_err(FetchError::Refused)?;
        ssrf::check_literal(&url, self.allow_private).map_err(FetchError::Refused)?;
        Ok(url)
    }

    /// GETs a checked URL: a 2xx within the size cap and the timeout, or why not.
    pub async fn get(&self, url: Url) -> Result<Fetched, FetchError> {
        let cap = self.max_bytes;
        let failed = |e: reqwest::Error| if e.is_timeout() { FetchError::Timeout } else { FetchError::Unreachable };
        let fetch = async {
            let mut resp = self
                .client
                .get(url)
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await
                .map_err(failed)?;
            if resp.status().is_redirection() {
                return Err(FetchError::Redirected);
            }
            if !resp.status().is_success() {
                return Err(FetchError::Status(resp.status().as_u16()));
            }
            if resp.content_length().is_some_and(|n| n > cap as u64) {
                return Err(FetchError::TooLarge(cap));
            }
            let freshness = Freshness::of(resp.headers());
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(failed)? {
                if body.len() + chunk.len() > cap {
                    return Err(FetchError::TooLarge(cap));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Fetched { body, freshness })
        };
        tokio::time::timeout(self.timeout, fetch).await.map_err(|_| FetchError::Timeout)?
    }

    /// Checks and fetches `raw`, a JSON document.
    pub async fn get_json(&self, raw: &str) -> Result<(Value, Freshness), FetchError> {
        let fetched = self.get(self.check(raw)?).await?;
        let value = serde_json::from_slice(&fetched.body).map_err(|_| FetchError::NotJson)?;
        Ok((value, fetched.freshness))
    }
}

/// How soon a document may be fetched again when a caller finds it wanting.
pub const REFETCH_EVERY: Duration = Duration::from_secs(30);

struct Entry<T> {
    value: Arc<T>,
    fetched: Instant,
    keep: Duration,
}

impl<T> Clone for Entry<T> {
    fn clone(&self) -> Self {
        Self { value: self.value.clone(), fetched: self.fetched, keep: self.keep }
    }
}

/// Fetched documents (as the caller parsed them) by key, each kept as long as the caller said.
pub struct DocCache<T> {
    entries: Cache<String, Entry<T>>,
    /// Keys fetched again early within the last [`REFETCH_EVERY`].
    refetched: Cache<String, ()>,
}

impl<T: Send + Sync + 'static> DocCache<T> {
    /// At most `max_entries`, none kept longer than `longest`.
    pub fn new(max_entries: u64, longest: Duration) -> Self {
        Self { entries: Cache::new(max_entries, longest), refetched: Cache::new(max_entries, REFETCH_EVERY) }
    }

    /// The cached document while it is fresh; `None` means: fetch it. With `wanting` (the cached
    /// one lacked what the caller looked for), `None` once per [`REFETCH_EVERY`].
    pub fn fresh(&self, key: &str, wanting: bool) -> Option<Arc<T>> {
        let entry = self.entries.get(key)?;
        if entry.fetched.elapsed() >= entry.keep {
            return None;
        }
        if wanting && self.refetched.get(key).is_none() {
            self.refetched.insert(key.to_owned(), ());
            return None;
        }
        Some(entry.value)
    }

    /// Keeps `value` for `keep`, and hands it back.
    pub fn put(&self, key: String, value: T, keep: Duration) -> Arc<T> {
        let value = Arc::new(value);
        self.entries.insert(key, Entry { value: value.clone(), fetched: Instant::now(), keep });
        value
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::{CACHE_CONTROL, HeaderMap, HeaderValue};

    use super::*;

    fn cc(v: &'static str) -> Freshness {
        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_static(v));
        Freshness::of(&h)
    }

    #[test]
    fn cache_control_is_read_once_for_everyone() {
        assert_eq!(cc("public, max-age=60"), Freshness::MaxAge(60));
        assert_eq!(cc("Max-Age=\"10\""), Freshness::MaxAge(10));
        assert_eq!(cc("max-age=60, no-store"), Freshness::NoStore);
        assert_eq!(cc("no-cache"), Freshness::NoStore);
        assert_eq!(cc("public"), Freshness::Unspecified);
        assert_eq!(Freshness::of(&HeaderMap::new()), Freshness::Unspecified);
        assert_eq!(Freshness::MaxAge(5).for_key_set(), Duration::from_secs(60));
        assert_eq!(Freshness::MaxAge(10_000_000).for_key_set(), Duration::from_secs(86_400));
        assert_eq!(Freshness::NoStore.for_key_set(), Duration::from_secs(60));
        assert_eq!(Freshness::Unspecified.for_key_set(), Duration::from_secs(300));
    }

    #[test]
    fn a_wanting_caller_refetches_at_most_once_per_window() {
        let cache = DocCache::<u32>::new(10, Duration::from_secs(3600));
        assert!(cache.fresh("k", false).is_none());
        cache.put("k".into(), 1, Duration::from_secs(600));
        assert_eq!(cache.fresh("k", false).as_deref(), Some(&1));
        assert!(cache.fresh("k", true).is_none(), "the first wanting look fetches again");
        cache.put("k".into(), 2, Duration::from_secs(600));
        assert_eq!(cache.fresh("k", true).as_deref(), Some(&2), "the next one within 30 s does not");
        cache.put("s".into(), 3, Duration::ZERO);
        assert!(cache.fresh("s", false).is_none(), "a stale entry is fetched again");
    }
}
