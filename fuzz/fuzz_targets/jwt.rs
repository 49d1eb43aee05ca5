//! Access-token verification on untrusted bytes: a compact JWS as presented (header parsing,
//! the kid and alg checks, base64 of every part), and, signed with a real key so that parsing gets
//! past the signature, arbitrary header and claims JSON. Any input: an answer, never a panic.
#![no_main]

use std::sync::LazyLock;

use agentidp::auth::{
    keys::{Algorithm, KeyRing},
    tokens,
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use libfuzzer_sys::fuzz_target;

static RING: LazyLock<KeyRing> = LazyLock::new(|| KeyRing::ephemeral(Algorithm::ES256).expect("a key"));
const ISSUER: &str = "http://127.0.0.1:8080";

fuzz_target!(|data: &[u8]| {
    let audiences = vec![ISSUER.to_owned()];
    let now = 1_800_000_000;
    // As presented.
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = tokens::verify(&RING, token, ISSUER, &audiences, now);
        let _ = tokens::looks_like_jwt(token);
    }
    // As signed by us: the first line is the header's JSON, the rest the claims' JSON; the header
    // names our kid unless the input gives its own.
    let (header, claims) = match data.iter().position(|b| *b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"{}"[..], data),
    };
    let set = RING.current().expect("loaded");
    let mut header: serde_json::Value = serde_json::from_slice(header).unwrap_or_else(|_| serde_json::json!({}));
    if let Some(h) = header.as_object_mut() {
        h.entry("kid").or_insert(set.active.kid.clone().into());
        h.entry("alg").or_insert("ES256".into());
        h.entry("typ").or_insert("at+jwt".into());
    }
    let signing_input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims));
    let signature = set.active.sign(signing_input.as_bytes()).expect("signs");
    let token = format!("{signing_input}.{}", B64.encode(signature));
    if let Ok(c) = tokens::verify(&RING, &token, ISSUER, &audiences, now) {
        let _ = (c.scopes().count(), c.agent_id(), c.aud.contains(ISSUER));
        if let Some(act) = &c.act {
            let _ = act.actors();
        }
    }
});
