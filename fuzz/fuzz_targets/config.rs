//! Configuration values: any TOML layered over the built-in defaults is either a valid
//! configuration or a clear error, never a panic.
#![no_main]

use agentidp::config::{Config, DEFAULTS};
use figment::{
    Figment,
    providers::{Format, Toml},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let figment = Figment::from(Toml::string(DEFAULTS)).merge(Toml::string(text));
    if let Err(e) = Config::from_figment(figment) {
        let _ = e.to_string();
    }
});
