//! The browser harness itself, against a page we already serve: Swagger UI renders in a real
//! headless Chromium from our vendored assets alone and lists our operations.

use std::time::Duration;

use crate::helpers::{browser::Browser, spawn_app};

#[tokio::test]
async fn swagger_ui_renders_our_operations_in_a_real_browser() {
    let app = spawn_app().await;
    let browser = Browser::start(1280, 800).await;
    browser.goto(&app.url("/docs/")).await;
    // Swagger UI builds the operation list in JavaScript from /openapi.json.
    let op = browser.wait_for(".opblock-summary-path", Duration::from_secs(30)).await;
    assert!(!browser.text(&op).await.is_empty());
    let paths: Vec<String> = {
        let mut v = Vec::new();
        for e in browser.find_all(".opblock-summary-path").await {
            v.push(browser.text(&e).await);
        }
        v
    };
    assert!(paths.iter().any(|p| p.contains("/health")), "operations listed: {paths:?}");
    let shot = browser.screenshot("swagger-ui").await;
    assert!(std::fs::metadata(shot).unwrap().len() > 1000);
}
