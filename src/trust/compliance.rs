//! Compliance: the controls we implement, each with how it is checked, and per organization a
//! report of each control's state computed from its data.
//!
//! The report is cached in Redis for `trust.compliance_cache_secs` (five minutes by default), as
//! in the original design, and stamped with the organization's audit-chain head: every audited
//! change (a credential made or rotated, a member added, a key registered...) moves the head, so
//! the next read recomputes. Age limits are measured on the application's clock, and a cached
//! report is also refused once it is older than the cache lifetime on that clock.

use axum::{Json, extract::State};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::{Duration, OffsetDateTime};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    auth::{Actor, directory},
    http::{ApiResult, error::Problem},
    state::AppState,
};

/// One control we implement.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Control {
    pub id: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    /// How the report decides the control's state.
    pub checked_by: &'static str,
    /// `platform`: a property of this deployment; `organization`: computed from the org's data.
    pub scope: &'static str,
}

const fn control(
    id: &'static str,
    title: &'static str,
    description: &'static str,
    checked_by: &'static str,
    scope: &'static str,
) -> Control {
    Control { id, title, description, checked_by, scope }
}

/// Every control, in report order.
pub const CONTROLS: &[Control] = &[
    control(
        "secrets_hashed",
        "Secrets are stored hashed",
        "Passwords (argon2id), session tokens, API keys, agent client secrets and node credentials are \
         stored as hashes and shown once; comparisons are constant-time.",
        "By construction: no table holds a secret in plaintext (checked by the test suite with pg_dump).",
        "platform",
    ),
    control(
        "signing_keys_encrypted",
        "Signing keys are encrypted at rest",
        "Token-signing private keys are sealed with AES-256-GCM under the key-encryption key.",
        "Fails while the deployment uses the public development key-encryption key.",
        "platform",
    ),
    control(
        "transport_encrypted",
        "Traffic is encrypted in transit",
        "The server terminates TLS itself, or its public URL is https behind a TLS proxy.",
        "Passes when tls.cert_path is set or server.public_url starts with https://.",
        "platform",
    ),
    control(
        "signing_key_rotation",
        "The signing key is rotated",
        "The key that signs tokens is younger than the rotation limit.",
        "The active signing key's age against trust.signing_key_max_age_days.",
        "platform",
    ),
    control(
        "audit_chain_intact",
        "The audit trail is tamper-evident",
        "Every change is appended to a per-organization SHA-256 hash chain.",
        "The organization's chain is recomputed from its first event; any broken link fails.",
        "organization",
    ),
    control(
        "agents_owned",
        "Every agent has an accountable owner",
        "Each agent names a human owner who is an active member of the organization.",
        "Counts agents whose owner left the organization or was deactivated.",
        "organization",
    ),
    control(
        "agent_credentials_rotated",
        "Agent credentials are rotated",
        "No live agent client secret is older than the age limit without rotation.",
        "Counts live credentials created or last rotated before trust.credential_max_age_days ago.",
        "organization",
    ),
    control(
        "api_keys_rotated",
        "API keys are rotated",
        "No live API key is older than the age limit.",
        "Counts live API keys created before trust.credential_max_age_days ago.",
        "organization",
    ),
    control(
        "api_keys_expire",
        "API keys expire",
        "Every API key has an expiry.",
        "Counts live API keys without expires_at.",
        "organization",
    ),
    control(
        "least_privilege",
        "Few people hold administrative rights",
        "The organization has an owner, and its owners and admins together stay within the limit.",
        "Owners at least 1; owners plus admins at most trust.max_privileged_members.",
        "organization",
    ),
    control(
        "delegations_bounded",
        "Delegations are short-lived",
        "Every delegation has an expiry (enforced by the schema) no further than the limit.",
        "Counts active delegations granted a lifetime over trust.delegation_max_ttl_hours.",
        "organization",
    ),
    control(
        "mfa",
        "People sign in with a second factor",
        "Multi-factor sign-in for people.",
        "Not applicable: this deployment offers password sign-in only; use an external issuer with MFA.",
        "platform",
    ),
];

/// The controls, with how each is checked. Public.
#[utoipa::path(get, path = "/api/v1/compliance/controls", tag = "trust",
    responses((status = 200, body = Vec<Control>)))]
pub(super) async fn compliance_controls() -> Json<&'static [Control]> {
    Json(CONTROLS)
}

/// A control's state in a report.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ControlStatus {
    Pass,
    Fail,
    NotApplicable,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ControlState {
    pub id: String,
    pub title: String,
    pub status: ControlStatus,
    pub detail: String,
    /// The figures the state was decided on.
    #[schema(value_type = Object)]
    pub facts: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComplianceSummary {
    pub passed: usize,
    pub failed: usize,
    pub not_applicable: usize,
}

/// An organization's compliance report.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComplianceReport {
    pub org_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub generated_at: OffsetDateTime,
    /// Whether this answer came from the cache.
    pub cached: bool,
    pub summary: ComplianceSummary,
    pub controls: Vec<ControlState>,
}

fn state_of(id: &str, pass: Option<bool>, detail: String, facts: Value) -> ControlState {
    let title = CONTROLS.iter().find(|c| c.id == id).map_or(id, |c| c.title).to_owned();
    let status = match pass {
        Some(true) => ControlStatus::Pass,
        Some(false) => ControlStatus::Fail,
        None => ControlStatus::NotApplicable,
    };
    ControlState { id: id.to_owned(), title, status, detail, facts }
}

/// Computes the report from the organization's data now.
async fn compute(state: &AppState, org_id: Uuid, now: OffsetDateTime) -> ApiResult<ComplianceReport> {
    let cfg = state.config();
    let trust = &cfg.trust;
    let stale_before = now - Duration::days(trust.credential_max_age_days.into());
    let facts = directory::identity_facts(state.db(), org_id, stale_before).await?;
    let chain = crate::audit::verify(state.db(), org_id).await?;
    let long_lived =
        crate::delegation::long_lived_count(state.db(), org_id, i64::from(trust.delegation_max_ttl_hours) * 3600)
            .await?;
    let key_age_days = facts.signing_key_created_at.map(|c| (now - c).whole_days());
    let dev_kek = cfg.auth.key_encryption_key.is_empty();
    let tls = cfg.tls.enabled() || cfg.server.public_url.starts_with("https://");
    let privileged = facts.owners + facts.admins;
    let controls = vec![
        state_of("secrets_hashed", Some(true), "Secrets are hashed by construction.".into(), json!({})),
        state_of(
            "signing_keys_encrypted",
            Some(!dev_kek),
            if dev_kek {
                "Keys are sealed with the public development key: set auth.key_encryption_key.".into()
            } else {
                "Keys are sealed under the configured key-encryption key.".into()
            },
            json!({ "development_key": dev_kek }),
        ),
        state_of(
            "transport_encrypted",
            Some(tls),
            if tls { "TLS protects traffic.".into() } else { "Neither TLS nor an https public URL.".into() },
            json!({ "tls": cfg.tls.enabled(), "public_url": cfg.server.public_url }),
        ),
        state_of(
            "signing_key_rotation",
            key_age_days.map(|d| d <= i64::from(trust.signing_key_max_age_days)),
            match key_age_days {
                Some(d) => format!("The signing key is {d} days old (limit {}).", trust.signing_key_max_age_days),
                None => "No signing key is active.".into(),
            },
            json!({ "age_days": key_age_days, "limit_days": trust.signing_key_max_age_days }),
        ),
        state_of(
            "audit_chain_intact",
            Some(chain.valid),
            if chain.valid {
                format!("{} events verified.", chain.events_checked)
            } else {
                "The chain is broken: see GET /api/v1/audit/verify.".into()
            },
            json!({ "events_checked": chain.events_checked, "first_invalid_event_id": chain.first_invalid_event_id }),
        ),
        state_of(
            "agents_owned",
            Some(facts.agents_without_owner == 0),
            format!("{} of {} agents have no active owner.", facts.agents_without_owner, facts.agents),
            json!({ "agents": facts.agents, "without_owner": facts.agents_without_owner }),
        ),
        state_of(
            "agent_credentials_rotated",
            Some(facts.credentials_stale == 0),
            format!(
                "{} of {} live agent credentials are older than {} days.",
                facts.credentials_stale, facts.credentials, trust.credential_max_age_days
            ),
            json!({ "credentials": facts.credentials, "stale": facts.credentials_stale,
                    "limit_days": trust.credential_max_age_days }),
        ),
        state_of(
            "api_keys_rotated",
            Some(facts.api_keys_stale == 0),
            format!(
                "{} of {} live API keys are older than {} days.",
                facts.api_keys_stale, facts.api_keys, trust.credential_max_age_days
            ),
            json!({ "api_keys": facts.api_keys, "stale": facts.api_keys_stale,
                    "limit_days": trust.credential_max_age_days }),
        ),
        state_of(
            "api_keys_expire",
            Some(facts.api_keys_without_expiry == 0),
            format!("{} live API keys never expire.", facts.api_keys_without_expiry),
            json!({ "without_expiry": facts.api_keys_without_expiry }),
        ),
        state_of(
            "least_privilege",
            Some(facts.owners >= 1 && privileged <= i64::from(trust.max_privileged_members)),
            format!(
                "{} owners and {} admins (limit {} together).",
                facts.owners, facts.admins, trust.max_privileged_members
            ),
            json!({ "owners": facts.owners, "admins": facts.admins, "limit": trust.max_privileged_members }),
        ),
        state_of(
            "delegations_bounded",
            Some(long_lived == 0),
            format!("{long_lived} active delegations outlive {} hours.", trust.delegation_max_ttl_hours),
            json!({ "long_lived": long_lived, "limit_hours": trust.delegation_max_ttl_hours }),
        ),
        state_of("mfa", None, "Password sign-in only.".into(), json!({})),
    ];
    let count = |s: ControlStatus| controls.iter().filter(|c| c.status == s).count();
    let summary = ComplianceSummary {
        passed: count(ControlStatus::Pass),
        failed: count(ControlStatus::Fail),
        not_applicable: count(ControlStatus::NotApplicable),
    };
    Ok(ComplianceReport { org_id, generated_at: now, cached: false, summary, controls })
}

/// What the cache holds: the report and the chain head it was computed at.
#[derive(Serialize, Deserialize)]
struct Cached {
    head: i64,
    report: ComplianceReport,
}

fn cache_key(state: &AppState, org_id: Uuid) -> String {
    state.redis().key(&format!("compliance:report:{org_id}"))
}

async fn cached(state: &AppState, org_id: Uuid) -> anyhow::Result<Option<Cached>> {
    let redis = state.redis();
    let mut conn = redis.multiplexed().await?;
    let text: Option<String> =
        tokio::time::timeout(redis.timeout(), redis::cmd("GET").arg(cache_key(state, org_id)).query_async(&mut conn))
            .await??;
    Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
}

async fn store(state: &AppState, org_id: Uuid, entry: &Cached) -> anyhow::Result<()> {
    let redis = state.redis();
    let mut conn = redis.multiplexed().await?;
    let secs = state.config().trust.compliance_cache_secs.max(1);
    let () = tokio::time::timeout(
        redis.timeout(),
        redis::cmd("SET")
            .arg(cache_key(state, org_id))
            .arg(serde_json::to_string(entry)?)
            .arg("EX")
            .arg(secs)
            .query_async(&mut conn),
    )
    .await??;
    Ok(())
}

/// The report: from the cache while nothing audited changed and it is young enough, else anew.
/// Redis being away costs only the cache.
pub async fn report_for(state: &AppState, org_id: Uuid) -> ApiResult<ComplianceReport> {
    let now = state.clock().now();
    let lifetime = Duration::seconds(state.config().trust.compliance_cache_secs as i64);
    let head = crate::audit::head_seq(state.db(), org_id).await?;
    if lifetime.is_positive() {
        match cached(state, org_id).await {
            Ok(Some(c)) if c.head == head && c.report.generated_at <= now && now - c.report.generated_at < lifetime => {
                let mut report = c.report;
                report.cached = true;
                return Ok(report);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "compliance cache unavailable"),
        }
    }
    let report = compute(state, org_id, now).await?;
    if lifetime.is_positive()
        && let Err(e) = store(state, org_id, &Cached { head, report: report.clone() }).await
    {
        tracing::warn!(error = %e, "compliance cache not written");
    }
    Ok(report)
}

/// The organization's compliance report (owners and admins).
#[utoipa::path(get, path = "/api/v1/compliance/report", tag = "trust",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = ComplianceReport), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn compliance_report(
    State(state): State<AppState>,
    actor: Actor,
) -> ApiResult<Json<ComplianceReport>> {
    let org_id = actor.current_org()?;
    Ok(Json(report_for(&state, org_id).await?))
}
