//! The console's pages, one module per section. Each reads the API's JSON into small view
//! structs that its template draws.

pub mod agents;
pub mod analytics;
pub mod applications;
pub mod audit;
pub mod city;
pub mod delegations;
pub mod home;
pub mod organization;
pub mod policies;
pub mod session;
pub mod trust;
pub mod webhooks;

use askama::Template;
use serde_json::Value;

use super::Shell;

/// A page that only reports the API's problem.
#[derive(Template)]
#[template(path = "console/error.html")]
pub struct ErrorPage {
    pub shell: Shell,
}

/// A form refused before anything ran (bad CSRF token, another site).
#[derive(Template)]
#[template(path = "console/refused.html")]
pub struct Refused {
    pub why: &'static str,
}

/// The text of a `?done=` notice: only these codes show anything.
pub fn notice_text(code: &str) -> Option<&'static str> {
    Some(match code {
        "created" => "Created.",
        "saved" => "Saved.",
        "suspended" => "The agent is suspended: its tokens stop working on their next use.",
        "reactivated" => "The agent is active again.",
        "deleted" => "Deleted.",
        "revoked" => "Revoked.",
        "tokens_revoked" => "Every token issued so far is revoked.",
        "signed_out" => "You are signed out.",
        "activated" => "The version is active.",
        "rolled_back" => "Rolled back to the previous version.",
        "approved" => "Approved.",
        "denied" => "Denied.",
        "retried" => "The delivery is queued again.",
        "replayed" => "The events are queued for delivery again.",
        "test_sent" => "A webhook.test event is queued for this endpoint; it shows in the deliveries below.",
        "upgraded" => "The plan is changed.",
        "switched" => "The console now works in this organization.",
        "listed" => "The agent is listed in the marketplace.",
        "unlisted" => "The agent is off the marketplace.",
        _ => return None,
    })
}

/// A string field, or "".
pub fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// A string field, if present and not null.
pub fn opt_text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(|x| match x {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    })
}

pub fn int(v: &Value, key: &str) -> i64 {
    v.get(key).and_then(Value::as_i64).unwrap_or(0)
}

pub fn float(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

/// A list of strings, joined with ", ".
pub fn joined(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(", "))
        .unwrap_or_default()
}

/// The items of an array field (or of the value itself when it is an array).
pub fn items<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    let arr = if key.is_empty() { v.as_array() } else { v.get(key).and_then(Value::as_array) };
    arr.map(Vec::as_slice).unwrap_or(&[])
}

/// A comma- or whitespace-separated form field as a list.
pub fn split_list(s: &str) -> Vec<String> {
    s.split(|c: char| c == ',' || c.is_whitespace())
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Micro-units of currency as dollars: cents, or finer for amounts under a cent.
pub fn dollars(micros: i64) -> String {
    let d = micros as f64 / 1_000_000.0;
    if micros != 0 && micros.abs() < 10_000 { format!("${d:.4}") } else { format!("${d:.2}") }
}

/// A byte count for people.
pub fn bytes(n: i64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.1} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.1} MB", n / 1e6)
    } else {
        format!("{:.0} kB", n / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_on_commas_and_spaces() {
        assert_eq!(split_list(" a, b  c,,"), vec!["a", "b", "c"]);
        assert!(split_list("  ").is_empty());
    }

    #[test]
    fn small_amounts_keep_their_digits() {
        assert_eq!(dollars(1_234_567), "$1.23");
        assert_eq!(dollars(2_500), "$0.0025");
        assert_eq!(dollars(0), "$0.00");
    }

    #[test]
    fn only_known_notices_show() {
        assert!(notice_text("created").is_some());
        assert!(notice_text("<script>").is_none());
    }
}
