//! What the API fuzzer (scripts/fuzz-api.sh, schemathesis over the OpenAPI document) found, each
//! kept as a test: the answer the server gives is the one the document promises.

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::{assert_problem, spawn_app};

/// The operations of the served document, with their documented statuses.
fn operations() -> Vec<(String, String, Value)> {
    let doc = serde_json::to_value(agentidp::http::openapi::document()).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if ["get", "put", "post", "patch", "delete", "head"].contains(&method.as_str()) {
                out.push((method.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    out
}

#[tokio::test]
async fn a_malformed_query_is_a_documented_400() {
    // Every operation with query parameters documents the 400 its query extractor sends.
    let undocumented: Vec<String> = operations()
        .into_iter()
        .filter(|(_, _, op)| op["parameters"].as_array().is_some_and(|ps| ps.iter().any(|p| p["in"] == "query")))
        .filter(|(_, _, op)| op["responses"].get("400").is_none())
        .map(|(m, p, _)| format!("{m} {p}"))
        .collect();
    assert!(undocumented.is_empty(), "query parameters without a documented 400: {undocumented:?}");

    // As found: the internal usage reports with a negative or non-numeric period.
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    for q in ["period_hours=-1", "period_hours=null", "microdao_id="] {
        for report in ["summary", "models", "agents", "tools"] {
            let path = format!("/internal/usage/{report}?{q}");
            let resp = app.as_(&admin, Method::GET, &path).send().await.unwrap();
            assert_problem(resp, StatusCode::BAD_REQUEST, "invalid_query").await;
        }
    }
}
