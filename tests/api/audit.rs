//! The audit log: events for identity changes, filters and pages, tamper detection, and a chain
//! that stays linear under concurrent writers.

use reqwest::{Method, StatusCode};
use serde_json::json;

use crate::helpers::{ADMIN_EMAIL, assert_problem, json_ok, spawn_app};

#[tokio::test]
async fn identity_changes_are_audited_and_the_chain_verifies() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    app.login(ADMIN_EMAIL, "wrong-password-1").await;
    let key = app.api_key(&admin, None).await;
    let dev = app.add_member(&admin, &admin.org_id, "dev@acme.test", "member").await;
    let dev_id = dev["user_id"].as_str().unwrap();
    let url = format!("/api/v1/organizations/{}/members/{dev_id}", admin.org_id);
    app.as_(&admin, Method::PATCH, &url).json(&json!({ "role": "admin" })).send().await.unwrap();
    app.as_(&admin, Method::DELETE, &url).send().await.unwrap();

    let page =
        json_ok(app.as_(&key, Method::GET, "/api/v1/audit?limit=200").send().await.unwrap(), StatusCode::OK).await;
    let actions: Vec<&str> = page["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    for expected in [
        "organization.created",
        "member.added",
        "auth.login.succeeded",
        "auth.login.failed",
        "api_key.created",
        "user.created",
        "member.role_changed",
        "member.removed",
    ] {
        assert!(actions.contains(&expected), "{expected} missing from {actions:?}");
    }
    // Newest first, linked by hashes.
    let items = page["items"].as_array().unwrap();
    assert_eq!(items[0]["action"], "member.removed");
    assert_eq!(items[0]["prev_hash"], items[1]["hash"]);
    assert!(items[0]["request_id"].is_string() && items[0]["client_ip"] == "127.0.0.1");

    // Filters and pages.
    let page = json_ok(
        app.as_(&key, Method::GET, "/api/v1/audit?action=member.added&limit=1").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let cursor = page["next_cursor"].as_i64().unwrap();
    let page2 = json_ok(
        app.as_(&key, Method::GET, &format!("/api/v1/audit?action=member.added&limit=1&cursor={cursor}"))
            .send()
            .await
            .unwrap(),
        StatusCode::OK,
    )
    .await;
    assert_eq!(page2["items"][0]["action"], "member.added");
    assert_ne!(page2["items"][0]["id"], page["items"][0]["id"]);
    let by_actor = json_ok(
        app.as_(&key, Method::GET, &format!("/api/v1/audit?actor=user:{}", admin.user_id)).send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(by_actor["items"].as_array().unwrap().iter().all(|e| e["actor_id"] == format!("user:{}", admin.user_id)));
    let future = json_ok(
        app.as_(&key, Method::GET, "/api/v1/audit?since=2999-01-01T00:00:00Z").send().await.unwrap(),
        StatusCode::OK,
    )
    .await;
    assert!(future["items"].as_array().unwrap().is_empty());

    let v = json_ok(app.as_(&key, Method::GET, "/api/v1/audit/verify").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(v["valid"], true, "{v}");
    assert!(v["events_checked"].as_i64().unwrap() >= 8);
}

#[tokio::test]
async fn members_cannot_read_the_audit_log() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    app.add_member(&admin, &admin.org_id, "dev@acme.test", "member").await;
    let dev = app.sign_in("dev@acme.test", crate::helpers::PASSWORD).await;
    let resp = app.as_(&dev, Method::GET, "/api/v1/audit").send().await.unwrap();
    assert_problem(resp, StatusCode::FORBIDDEN, "insufficient_role").await;
}

#[tokio::test]
async fn an_edited_row_is_named_by_verify() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    app.api_key(&admin, None).await;
    app.api_key(&admin, None).await;
    let (id, seq): (uuid::Uuid, i64) = sqlx::query_as(
        "select audit_event_id, seq from audit_event where organization_id = $1::uuid and action = 'api_key.created' order by seq limit 1",
    )
    .bind(&admin.org_id)
    .fetch_one(&app.db)
    .await
    .unwrap();
    sqlx::query("update audit_event set details = '{\"prefix\":\"forged\"}' where audit_event_id = $1")
        .bind(id)
        .execute(&app.db)
        .await
        .unwrap();
    let v = json_ok(app.as_(&admin, Method::GET, "/api/v1/audit/verify").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(v["valid"], false);
    assert_eq!(v["first_invalid_event_id"], id.to_string());
    assert_eq!(v["events_checked"], seq);

    // Deleting the last event is caught too, by the chain head.
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    app.api_key(&admin, None).await;
    sqlx::query(
        "delete from audit_event where seq = (select max(seq) from audit_event where organization_id = $1::uuid)",
    )
    .bind(&admin.org_id)
    .execute(&app.db)
    .await
    .unwrap();
    let v = json_ok(app.as_(&admin, Method::GET, "/api/v1/audit/verify").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(v["valid"], false, "{v}");
}

#[tokio::test]
async fn concurrent_writers_leave_one_linear_chain() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let before: i64 = sqlx::query_scalar("select count(*) from audit_event where organization_id = $1::uuid")
        .bind(&admin.org_id)
        .fetch_one(&app.db)
        .await
        .unwrap();
    let writes = (0..40).map(|i| {
        app.as_(&admin, Method::POST, "/auth/api-keys").json(&json!({ "description": format!("k{i}") })).send()
    });
    for resp in futures_util::future::join_all(writes).await {
        assert_eq!(resp.unwrap().status(), StatusCode::CREATED);
    }
    let v = json_ok(app.as_(&admin, Method::GET, "/api/v1/audit/verify").send().await.unwrap(), StatusCode::OK).await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["events_checked"].as_i64().unwrap(), before + 40);
    let seqs: Vec<i64> =
        sqlx::query_scalar("select seq from audit_event where organization_id = $1::uuid order by seq")
            .bind(&admin.org_id)
            .fetch_all(&app.db)
            .await
            .unwrap();
    assert_eq!(seqs, (1..=before + 40).collect::<Vec<_>>());
}
