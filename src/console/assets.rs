//! The console's static assets, embedded in the binary: nothing is fetched from anywhere else.
//!
//! Each asset is served under a name carrying a hash of its content, so it may be cached for a
//! year (`immutable`): a new build has new names. Pages reference them with Subresource
//! Integrity hashes. The gzip form is made once, on first use, and served to clients that accept
//! it.

use std::{io::Write, sync::LazyLock};

use axum::{
    extract::Path,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use base64::Engine as _;
use sha2::{Digest, Sha256, Sha384};

/// One embedded file.
pub struct Asset {
    /// The URL it is served at: `/console/assets/<stem>.<hash>.<ext>`.
    pub url: String,
    /// `sha384-<base64>`, for the `integrity` attribute.
    pub integrity: String,
    content_type: &'static str,
    raw: &'static [u8],
    gzip: Vec<u8>,
}

impl Asset {
    fn new(stem: &str, ext: &str, content_type: &'static str, raw: &'static [u8]) -> Self {
        let digest = hex::encode(&Sha256::digest(raw)[..8]);
        let integrity = format!("sha384-{}", base64::engine::general_purpose::STANDARD.encode(Sha384::digest(raw)));
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let gzip = enc.write_all(raw).and_then(|_| enc.finish()).unwrap_or_default();
        Self { url: format!("/console/assets/{stem}.{digest}.{ext}"), integrity, content_type, raw, gzip }
    }

    fn name(&self) -> &str {
        self.url.rsplit('/').next().unwrap_or_default()
    }
}

/// Every asset the pages use.
pub struct Assets {
    pub css: Asset,
    pub js: Asset,
}

pub static ASSETS: LazyLock<Assets> = LazyLock::new(|| Assets {
    css: Asset::new("console", "css", "text/css; charset=utf-8", include_bytes!("assets/console.css")),
    js: Asset::new("console", "js", "text/javascript; charset=utf-8", include_bytes!("assets/console.js")),
});

/// `GET /console/assets/{name}`: an embedded asset, gzipped when the client accepts it.
pub async fn serve(Path(name): Path<String>, headers: HeaderMap) -> Response {
    let assets = &*ASSETS;
    let Some(asset) = [&assets.css, &assets.js].into_iter().find(|a| a.name() == name) else {
        return (StatusCode::NOT_FOUND, [(header::CACHE_CONTROL, "no-store")], "not found").into_response();
    };
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.split(';').next().is_some_and(|e| e.trim() == "gzip")))
        && !asset.gzip.is_empty();
    let mut response = if gzip {
        let mut r = asset.gzip.clone().into_response();
        r.headers_mut().insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        r
    } else {
        asset.raw.into_response()
    };
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=31536000, immutable"));
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    response
}
