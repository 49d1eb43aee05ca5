//! Usage events as they arrive over HTTP or NATS: plain JSON bodies and CloudEvents, with and
//! without a subject naming their kind and with and without a default organization.
#![no_main]

use agentidp::usage::model::{self, Kind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let limits = model::Limits {
        now: time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
        max_past: time::Duration::days(35),
        max_future: time::Duration::minutes(5),
    };
    let org = Some("0190f5b8-0000-7000-8000-000000000001".parse().unwrap());
    for hint in [None, Some(Kind::Llm), Some(Kind::Tool), Some(Kind::Agent), Some(Kind::Message)] {
        for default_org in [None, org] {
            let _ = model::parse(&value, hint, default_org, &limits);
        }
    }
});
