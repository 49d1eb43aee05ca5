//! The token endpoint's parsing of untrusted bytes: the form body (RFC 6749 §3.2, parameters once
//! each) and the client's HTTP Basic header (base64 of two form-urlencoded parts). The input's
//! first line is the Authorization header's value, the rest the body.
#![no_main]

use http::{HeaderMap, HeaderValue, header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (auth, body) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b""[..], data),
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
    if let Ok(v) = HeaderValue::from_bytes(auth) {
        headers.insert(header::AUTHORIZATION, v);
    }
    let _ = agentidp::auth::oauth::parse_token_request(&headers, body);
});
