//! The analytics API over the per-request records: token trend, agent activity heatmap and the
//! per-agent summary, read from the hourly rollup and equal to what was done.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Caller, assert_problem, json_ok, spawn_app_with};

#[tokio::test]
async fn the_analytics_api_reports_tokens_activity_and_errors_per_agent() {
    let app =
        spawn_app_with(&[("analytics.flush_interval_ms", json!(100)), ("usage.analytics_rollup_secs", json!(0))]).await;
    let admin = app.bootstrap().await;
    let client = app.agent_client(&admin, &["agents:read"]).await;
    let mut token = String::new();
    for _ in 0..3 {
        token = app.access_token(&client).await;
    }
    let bearer = Caller { token, org_id: admin.org_id.clone(), user_id: client.agent_id.clone() };
    for _ in 0..4 {
        let r = app.as_(&bearer, Method::GET, &format!("/api/v1/agents/{}", client.agent_id)).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    // Agents may not list agents: two errors.
    for _ in 0..2 {
        let r = app.as_(&bearer, Method::GET, "/api/v1/agents").send().await.unwrap();
        assert!(r.status().is_client_error());
    }
    let agent = client.agent_id.clone();
    let mut summary = Value::Null;
    for _ in 0..100 {
        agentidp::usage::analytics::roll_up(&app.db, 400).await.unwrap();
        summary = json_ok(
            app.as_(&admin, Method::GET, "/api/v1/analytics/usage-summary").send().await.unwrap(),
            StatusCode::OK,
        )
        .await;
        if summary[0]["requests"] == 6 && summary[0]["tokens"] == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(summary[0]["agent_id"], agent.as_str(), "{summary}");
    assert_eq!(
        (summary[0]["requests"].as_i64(), summary[0]["tokens"].as_i64(), summary[0]["errors"].as_i64()),
        (Some(6), Some(3), Some(2)),
        "{summary}"
    );
    assert!(summary[0]["last_seen"].is_string());
    // Rebuilding again changes nothing.
    agentidp::usage::analytics::roll_up(&app.db, 400).await.unwrap();
    let again =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/analytics/usage-summary").send().await.unwrap(), StatusCode::OK)
            .await;
    assert_eq!(again, summary);

    let trend = json_ok(
        app.as_(&admin, Method::GET, "/api/v1/analytics/token-trend?group_by=day").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    let tokens: i64 = trend.as_array().unwrap().iter().map(|p| p["tokens"].as_i64().unwrap()).sum();
    assert_eq!(tokens, 3, "{trend}");
    let heat =
        json_ok(app.as_(&admin, Method::GET, "/api/v1/analytics/agent-activity").send().await.unwrap(), StatusCode::OK)
            .await;
    let cells = heat.as_array().unwrap();
    let now = time::OffsetDateTime::now_utc();
    let total: i64 = cells.iter().map(|c| c["requests"].as_i64().unwrap()).sum();
    assert_eq!(total, 6, "{heat}");
    assert!(
        cells
            .iter()
            .all(|c| c["agent_id"] == agent.as_str() && c["day_of_week"] == now.weekday().number_from_monday() as i64),
        "{heat}"
    );

    // Agents and members see none of it; bad ranges are 400.
    let r = app.as_(&bearer, Method::GET, "/api/v1/analytics/usage-summary").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = app.as_(&admin, Method::GET, "/api/v1/analytics/token-trend?group_by=minute").send().await.unwrap();
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_query").await;
    let r = app
        .as_(
            &admin,
            Method::GET,
            "/api/v1/analytics/agent-activity?since=2020-01-01T00:00:00Z&until=2019-01-01T00:00:00Z",
        )
        .send()
        .await
        .unwrap();
    assert_problem(r, StatusCode::BAD_REQUEST, "invalid_query").await;
}
