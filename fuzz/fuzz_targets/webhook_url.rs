//! Webhook endpoint URLs as an organization gives them: parsing, the scheme and userinfo rules,
//! and the address checks on literal IPs (with and without private networks allowed).
#![no_main]

use agentidp::webhooks::ssrf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    for https_only in [false, true] {
        if let Ok(url) = ssrf::parse(raw, https_only) {
            for allow_private in [false, true] {
                if let Err(refused) = ssrf::check_literal(&url, allow_private) {
                    let _ = (refused.code(), refused.message());
                }
            }
        }
    }
});
