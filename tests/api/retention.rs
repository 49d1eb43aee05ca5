//! Retention: rows past their retention are pruned, recent ones kept, by one instance at a time.

use reqwest::StatusCode;

use crate::helpers::{spawn_app, spawn_on};

async fn count(db: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(db).await.unwrap()
}

#[tokio::test]
async fn rows_past_their_retention_are_pruned_and_recent_ones_kept() {
    let app = spawn_app().await;
    let admin = app.bootstrap().await;
    let org = &admin.org_id;
    let db = &app.db;
    // Old and recent rows of every pruned table.
    let user = &admin.user_id;
    for age in ["1000 days", "1 minute"] {
        let at = format!("now() - interval '{age}'");
        for insert in [
            format!(
                "insert into analytics_event (organization_id, kind, method, route, status, occurred_at, request_count,
                                              latency_sum_us, latency_max_us, latency_buckets)
                 values ('{org}', 'request', 'GET', '/x', 200, {at}, 1, 1, 1, array[1]::bigint[])"
            ),
            format!(
                "insert into decision_log (decision_id, organization_id, actor_id, action, resource_type, resource_id,
                                           effect, reason, policy_version, determining_policies, decided_at)
                 values (gen_random_uuid(), '{org}', 'user:x', 'read', 'Agent', 'a', 'permit', 'r', 'v1', '{{}}', {at})"
            ),
            format!(
                "insert into session (session_id, user_id, token_hash, created_at, expires_at, user_agent)
                 values (gen_random_uuid(), '{user}', gen_random_uuid()::text::bytea, {at}, {at} + interval '1 hour',
                         'retention-test')"
            ),
            format!(
                "insert into password_token (token_hash, user_id, created_at, expires_at)
                 values (gen_random_uuid()::text::bytea, '{user}', {at}, {at} + interval '1 hour')"
            ),
            format!(
                "insert into stripe_event (event_id, event_type, outcome, received_at)
                 values (gen_random_uuid()::text, 'checkout.session.completed', 'applied', {at})"
            ),
            format!(
                "insert into token_revocation (jti, organization_id, expires_at)
                 values (gen_random_uuid(), '{org}', {at} + interval '2 hours')"
            ),
            format!(
                "insert into revocation_watermark (subject, not_before) values ('agent:' || gen_random_uuid(), {at})"
            ),
            format!(
                "insert into event_outbox (event_id, organization_id, type, subject, data, occurred_at, fanned_out_at, published_at)
                 values (gen_random_uuid(), '{org}', 'agent.created', 'retention-test', '{{}}', {at}, {at}, {at})"
            ),
        ] {
            sqlx::query(&insert).execute(db).await.unwrap();
        }
    }
    // Each table: what the old row is, and what marks the rows this test wrote.
    let tables = [
        ("analytics_event", "occurred_at < now() - interval '1 day'", "route = '/x'"),
        ("decision_log", "decided_at < now() - interval '1 day'", "actor_id = 'user:x'"),
        ("session", "created_at < now() - interval '1 day'", "user_agent = 'retention-test'"),
        ("password_token", "created_at < now() - interval '1 day'", "true"),
        ("stripe_event", "received_at < now() - interval '1 day'", "true"),
        ("token_revocation", "expires_at < now() - interval '1 day'", "true"),
        ("revocation_watermark", "not_before < now() - interval '1 day'", "subject like 'agent:%'"),
        ("event_outbox", "occurred_at < now() - interval '1 day'", "subject = 'retention-test'"),
    ];
    for (t, old, ours) in tables {
        assert_eq!(count(db, &format!("select count(*) from {t} where {old}")).await, 1, "{t}");
        assert_eq!(count(db, &format!("select count(*) from {t} where {ours}")).await, 2, "{t}");
    }

    // Two instances prune at once: one takes the round (or both, one after the other), and only
    // the old rows go.
    // Its own start-up round would race the two below (and could take the lock from both).
    let mut quiet = app.config.clone();
    quiet.retention.interval_secs = 0;
    let app2 = spawn_on(quiet, None).await;
    let cfg = &app.config.retention;
    let (a, b) = tokio::join!(
        agentidp::retention::prune_once(db, cfg, 900),
        agentidp::retention::prune_once(&app2.db, cfg, 900)
    );
    let rounds: Vec<_> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert!(!rounds.is_empty(), "some instance pruned");
    let deleted: u64 = rounds.iter().flat_map(|r| r.iter().map(|(_, n)| *n)).sum();
    assert_eq!(deleted, tables.len() as u64, "each old row deleted once: {rounds:?}");
    for (t, old, ours) in tables {
        assert_eq!(count(db, &format!("select count(*) from {t} where {old}")).await, 0, "{t} pruned");
        assert_eq!(count(db, &format!("select count(*) from {t} where {ours}")).await, 1, "{t}: the recent row stays");
    }
    // The service is none the worse.
    let resp = app.as_(&admin, reqwest::Method::GET, "/auth/me").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}
