//! The outbox's feed to NATS JetStream: committed events, published from the outbox.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::helpers::spawn_app_with;

fn nats_url() -> String {
    std::env::var("AGENTIDP_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

#[tokio::test]
async fn committed_events_are_published_to_jetstream_once_each() {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("t{run}.events");
    let stream = format!("T{run}");
    let app = spawn_app_with(&[
        ("events.nats.enabled", json!(true)),
        ("events.nats.url", json!(nats_url())),
        ("events.nats.subject_prefix", json!(prefix)),
        ("events.nats.stream", json!(stream)),
    ])
    .await;
    let nc = async_nats::connect(nats_url()).await.expect("NATS (is `make services` done?)");
    let mut sub = nc.subscribe(format!("{prefix}.agent.*")).await.unwrap();
    let admin = app.bootstrap().await;
    let agent = app.create_agent(&admin, json!({ "name": "published" })).await;

    let msg = tokio::time::timeout(Duration::from_secs(20), sub.next()).await.expect("published").unwrap();
    assert_eq!(msg.subject.as_str(), format!("{prefix}.agent.created"));
    let ce: Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(ce["specversion"], "1.0");
    assert_eq!(ce["type"], "agent.created");
    assert_eq!(ce["data"]["agent_id"], agent["id"]);
    assert_eq!(ce["orgid"], admin.org_id.as_str());
    let msg_id = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.as_str().to_owned());
    assert_eq!(msg_id.as_deref(), ce["id"].as_str(), "JetStream deduplicates on the event id");

    // Durable in the stream, and marked published in the outbox.
    let js = async_nats::jetstream::new(nc);
    let mut s = js.get_stream(&stream).await.unwrap();
    let info = s.info().await.unwrap();
    assert!(info.state.messages >= 2, "the start-up key rotation and the agent: {:?}", info.state);
    let mut unpublished = -1i64;
    for _ in 0..100 {
        unpublished = sqlx::query_scalar("select count(*) from event_outbox where published_at is null")
            .fetch_one(&app.db)
            .await
            .unwrap();
        if unpublished == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(unpublished, 0, "marked published once JetStream acknowledged");
    let _ = js.delete_stream(&stream).await;
}
