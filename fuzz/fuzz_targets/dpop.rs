//! DPoP proofs (RFC 9449) on untrusted bytes: the `DPoP` header as presented (the header's JSON,
//! the embedded JWK, the algorithm pinned to the key type, the signature), and, signed with a
//! real P-256 key so that parsing gets past the signature, arbitrary header and claims JSON (`htm`,
//! `htu`, `iat`, `ath`, `jti`). The input's first line is the request: `METHOD URL`. Then either
//! the header's value (one line), or the proof's header JSON and claims JSON (two lines). Any
//! input: an answer, never a panic.
#![no_main]

use std::sync::LazyLock;

use agentidp::auth::oidc::dpop;
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use http::{HeaderMap, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use p256::ecdsa::{Signature, SigningKey, signature::Signer};
use serde_json::{Value, json};

static KEY: LazyLock<(SigningKey, Value)> = LazyLock::new(|| {
    let key = SigningKey::from_slice(&[7u8; 32]).expect("a P-256 scalar");
    let point = key.verifying_key().to_encoded_point(false);
    let jwk = json!({ "kty": "EC", "crv": "P-256", "x": B64.encode(point.x().unwrap()), "y": B64.encode(point.y().unwrap()) });
    (key, jwk)
});
const NOW: i64 = 1_800_000_000;
const TOKEN: &str = "eyJhbGciOiJFUzI1NiJ9.e30.c2ln";

fn check(method: &Method, url: &str, value: &[u8]) {
    let Ok(v) = HeaderValue::from_bytes(value) else { return };
    let mut headers = HeaderMap::new();
    headers.insert("dpop", v);
    for token in [None, Some(TOKEN)] {
        if let Ok(Some(checked)) = dpop::check_proof(&headers, method, url, token, NOW, 300) {
            assert!(!checked.jti.is_empty() && checked.jti.len() <= 256, "{checked:?}");
            assert!(!checked.jkt.is_empty());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.splitn(3, |b| *b == b'\n');
    let request = std::str::from_utf8(lines.next().unwrap_or_default()).unwrap_or_default();
    let (method, url) = request.split_once(' ').unwrap_or(("POST", "http://127.0.0.1:8080/api/v1/token"));
    let method = Method::from_bytes(method.as_bytes()).unwrap_or(Method::POST);
    let first = lines.next().unwrap_or_default();
    let Some(second) = lines.next() else {
        // As presented.
        check(&method, url, first);
        return;
    };
    // As signed by a real key: the header names it unless the input gives its own.
    let (key, jwk) = &*KEY;
    let mut header: Value = serde_json::from_slice(first).unwrap_or_else(|_| json!({}));
    if let Some(h) = header.as_object_mut() {
        h.entry("typ").or_insert("dpop+jwt".into());
        h.entry("alg").or_insert("ES256".into());
        h.entry("jwk").or_insert(jwk.clone());
    }
    let signing_input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(second));
    let signature: Signature = key.sign(signing_input.as_bytes());
    check(&method, url, format!("{signing_input}.{}", B64.encode(signature.to_bytes())).as_bytes());
});
