//! `/api/v1/delegations`: create, read, list and revoke delegations, check commands against
//! their budgets, and decide ceremonies.
//!
//! Who sees what: a delegation is visible to the actors of its chain (its delegator, the
//! delegators above, its agent) and to the organization's owners and admins; to anyone else it
//! does not exist (404). Revoking is for the same people; approving and denying a ceremony is for
//! its delegator alone; the command check is for its agent (with a token of this delegation) or a
//! service key of the organization acting as the enforcement point.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{
    Grant, canonical,
    ceiling::{self, Level, Refusal},
    model::*,
};
use crate::{
    auth::{Actor, ActorType, Credential, Role, tokens::Audience},
    http::{
        ApiError, ApiResult,
        error::{FieldError, Problem},
        extract::{ApiJson, ApiPath, ApiQuery},
        pagination,
    },
    state::AppState,
};

#[derive(Debug)]
struct Row {
    delegation_id: Uuid,
    organization_id: Uuid,
    parent_id: Option<Uuid>,
    depth: i32,
    chain: Vec<String>,
    delegator_id: String,
    #[allow(dead_code)]
    delegator_credential: String,
    agent_id: Uuid,
    ephemeral: bool,
    agent_type: Option<String>,
    agent_model: Option<String>,
    purpose: String,
    scopes: Vec<String>,
    capability_ceiling: String,
    ceremony_required_for: Vec<String>,
    prohibited_commands: Vec<String>,
    max_commands: i32,
    commands_executed: i32,
    reserved_commands: i32,
    max_cost: Option<i64>,
    cost_spent: i64,
    max_tokens: Option<i64>,
    tokens_spent: i64,
    status: String,
    ended_reason: Option<String>,
    ended_at: Option<OffsetDateTime>,
    expires_at: OffsetDateTime,
    chronicle_cid: String,
    created_at: OffsetDateTime,
    #[allow(dead_code)]
    updated_at: OffsetDateTime,
}

impl Row {
    fn remaining(&self) -> i64 {
        (self.max_commands - self.commands_executed - self.reserved_commands).max(0) as i64
    }

    fn info(self, state: &AppState) -> DelegationInfo {
        let now = state.clock().now();
        let live = self.status == "active";
        DelegationInfo {
            delegation_id: self.delegation_id,
            commands_remaining: if live { self.remaining() } else { 0 },
            ttl_remaining_seconds: if live { (self.expires_at - now).whole_seconds().max(0) } else { 0 },
            agent_did: did(state, self.agent_id),
            status: if live && self.expires_at <= now { "expired".into() } else { self.status },
            agent_id: self.agent_id,
            agent_type: self.agent_type,
            agent_model: self.agent_model,
            ephemeral: self.ephemeral,
            delegator_id: self.delegator_id,
            parent_id: self.parent_id,
            chain: self.chain,
            purpose: self.purpose,
            scopes: self.scopes,
            capability_ceiling: self.capability_ceiling,
            ceremony_required_for: self.ceremony_required_for,
            prohibited_commands: self.prohibited_commands,
            max_commands: self.max_commands as i64,
            commands_executed: self.commands_executed as i64,
            reserved_commands: self.reserved_commands as i64,
            max_cost: self.max_cost,
            cost_spent: self.cost_spent,
            max_tokens: self.max_tokens,
            tokens_spent: self.tokens_spent,
            ended_reason: self.ended_reason.or_else(|| (live && self.expires_at <= now).then(|| "ttl".into())),
            ended_at: self.ended_at,
            created_at: self.created_at,
            expires_at: self.expires_at,
            chronicle_cid: self.chronicle_cid,
        }
    }
}

/// The agent's DID: `did:web:<host>:agents:<id>`, resolvable at `/agents/<id>/did.json`.
fn did(state: &AppState, agent_id: Uuid) -> String {
    crate::trust::did::agent_did(&state.config().server.public_url, agent_id)
}

async fn fetch(conn: &mut PgConnection, org_id: Uuid, id: Uuid, lock: bool) -> ApiResult<Row> {
    let row = if lock {
        sqlx::query_as!(
            Row,
            "select * from delegation where delegation_id = $1 and organization_id = $2 for update",
            id,
            org_id
        )
        .fetch_optional(&mut *conn)
        .await?
    } else {
        sqlx::query_as!(Row, "select * from delegation where delegation_id = $1 and organization_id = $2", id, org_id)
            .fetch_optional(&mut *conn)
            .await?
    };
    row.ok_or(ApiError::NotFound)
}

/// The organization's owners and admins (system admins included) see every delegation.
fn is_admin(actor: &Actor, org_id: Uuid) -> bool {
    actor.actor_type == ActorType::Human && actor.require_role(org_id, Role::Admin).is_ok()
}

/// Whether `actor` may see the delegation (else it is a 404).
fn visible(actor: &Actor, row: &Row) -> bool {
    let me = actor.actor_id();
    row.chain.contains(&me) || is_admin(actor, row.organization_id)
}

fn no_store() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h
}

/// Who delegates, and within what.
struct Delegator {
    id: String,
    credential: String,
    /// `None`: unrestricted (a session).
    scopes: Option<Vec<String>>,
    max_level: Level,
    /// The chain down to the delegator.
    chain: Vec<String>,
    /// The human at the root: the owner of an ephemeral agent.
    root_user: Uuid,
    parent: Option<Row>,
}

async fn delegator(state: &AppState, conn: &mut PgConnection, actor: &Actor, org_id: Uuid) -> ApiResult<Delegator> {
    let human_level = |actor: &Actor| -> ApiResult<Level> {
        actor.require_role(org_id, Role::Member)?;
        Ok(if is_admin(actor, org_id) { Level::Admin } else { Level::Mutate })
    };
    match &actor.principal.credential {
        Credential::Session { session_id, .. } if actor.actor_type == ActorType::Human => Ok(Delegator {
            id: actor.actor_id(),
            credential: format!("session:{session_id}"),
            scopes: None,
            max_level: human_level(actor)?,
            chain: vec![actor.actor_id()],
            root_user: actor.user_id(),
            parent: None,
        }),
        Credential::ApiKey { key_id, scopes, .. } if actor.actor_type == ActorType::Human => Ok(Delegator {
            id: actor.actor_id(),
            credential: format!("api_key:{key_id}"),
            scopes: Some(scopes.iter().map(|s| s.as_str().to_owned()).collect()),
            max_level: human_level(actor)?,
            chain: vec![actor.actor_id()],
            root_user: actor.user_id(),
            parent: None,
        }),
        Credential::AccessToken { claims, .. } => {
            let Some(parent_id) = claims.delegation_id else {
                return Err(ApiError::forbidden(
                    "not_delegated",
                    "An agent delegates only under a delegation: present a delegated token.",
                ));
            };
            let parent = fetch(conn, org_id, parent_id, true).await?;
            if parent.status != "active" || parent.expires_at <= state.clock().now() {
                return Err(ApiError::forbidden(
                    "delegation_ended",
                    "The delegation this token was issued under has ended.",
                ));
            }
            if parent.depth + 1 > state.config().delegation.max_delegation_depth as i32 {
                return Err(ApiError::forbidden(
                    "delegation_depth_exceeded",
                    format!(
                        "This delegation may not be delegated further (delegation.max_delegation_depth = {}).",
                        state.config().delegation.max_delegation_depth
                    ),
                ));
            }
            let root_user =
                parent.chain.first().and_then(|r| r.strip_prefix("user:")).and_then(|u| u.parse().ok()).ok_or_else(
                    || ApiError::Internal(anyhow::anyhow!("delegation {parent_id} has no human at its root")),
                )?;
            let token_scopes: Vec<String> = claims.scopes().map(str::to_owned).collect();
            Ok(Delegator {
                id: actor.actor_id(),
                credential: format!("delegation:{parent_id}"),
                scopes: Some(token_scopes.into_iter().filter(|s| parent.scopes.contains(s)).collect()),
                max_level: Level::parse(&parent.capability_ceiling).unwrap_or(Level::Read),
                chain: parent.chain.clone(),
                root_user,
                parent: Some(parent),
            })
        }
        _ => Err(ApiError::forbidden("cannot_delegate", "Only humans, and agents under a delegation, delegate.")),
    }
}

/// Checks a list of command names: at most `max` items, each 1 to 200 characters.
fn commands(field: &str, items: &[String], max: usize, errors: &mut Vec<FieldError>) {
    if items.len() > max {
        errors.push(FieldError {
            field: field.into(),
            code: "too_many".into(),
            message: format!("at most {max} items"),
        });
        return;
    }
    for (i, c) in items.iter().enumerate() {
        if c.is_empty() || c.chars().count() > 200 || c.chars().any(char::is_control) {
            errors.push(FieldError {
                field: format!("{field}[{i}]"),
                code: "invalid_command".into(),
                message: "1 to 200 characters, no control characters".into(),
            });
        }
    }
}

fn text(field: &str, value: Option<&String>, max: usize, errors: &mut Vec<FieldError>) {
    if let Some(v) = value
        && (v.chars().count() > max || v.chars().any(|c| c.is_control() && c != '\n'))
    {
        errors.push(FieldError {
            field: field.into(),
            code: "length".into(),
            message: format!("at most {max} characters, no control characters"),
        });
    }
}

fn refusal(r: Refusal) -> ApiError {
    let names = |v: &[String]| v.iter().map(|s| format!("`{s}`")).collect::<Vec<_>>().join(", ");
    match r {
        Refusal::Delegator(v) => ApiError::forbidden(
            "scope_exceeds_delegator",
            format!("The delegator does not have {}; a delegation never widens authority.", names(&v)),
        ),
        Refusal::Agent(v) => ApiError::forbidden(
            "scope_exceeds_agent",
            format!("The agent's allowed_scopes do not include {}.", names(&v)),
        ),
        Refusal::Ceiling(v) => ApiError::forbidden(
            "scope_exceeds_ceiling",
            format!("{} are above the delegation's capability_ceiling.", names(&v)),
        ),
        Refusal::Unspecified => ApiError::field(
            "scope.scopes",
            "required",
            "name the scopes: neither the delegator nor a new agent bounds them",
        ),
    }
}

/// Creates a delegation from the caller to an agent, and a delegated token for it.
#[utoipa::path(post, path = "/api/v1/delegations", tag = "delegations", request_body = CreateDelegation,
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses(
        (status = 201, body = CreatedDelegation),
        (status = 403, description = "Scopes or ceiling beyond the delegator's (named), depth exceeded", body = Problem),
        (status = 422, body = Problem)))]
pub(super) async fn create_delegation(
    State(state): State<AppState>,
    actor: Actor,
    ApiJson(req): ApiJson<CreateDelegation>,
) -> ApiResult<(StatusCode, HeaderMap, Json<CreatedDelegation>)> {
    let cfg = &state.config().delegation;
    let org_id = actor.current_org()?;
    let scope = req.scope.unwrap_or_default();
    let mut errors = Vec::new();
    let ttl_asked = scope.max_ttl_minutes.is_some();
    let ttl = scope.max_ttl_minutes.unwrap_or(cfg.default_ttl_minutes as i64);
    if !(1..=cfg.max_ttl_minutes as i64).contains(&ttl) {
        errors.push(FieldError {
            field: "scope.max_ttl_minutes".into(),
            code: "range".into(),
            message: format!("between 1 and {}", cfg.max_ttl_minutes),
        });
    }
    let budget_asked = scope.max_commands.is_some();
    let max_commands = scope.max_commands.unwrap_or(cfg.default_max_commands as i64);
    if !(1..=cfg.max_commands as i64).contains(&max_commands) {
        errors.push(FieldError {
            field: "scope.max_commands".into(),
            code: "range".into(),
            message: format!("between 1 and {}", cfg.max_commands),
        });
    }
    for (field, v) in [("scope.max_cost", scope.max_cost), ("scope.max_tokens", scope.max_tokens)] {
        if v.is_some_and(|v| v <= 0) {
            errors.push(FieldError { field: field.into(), code: "range".into(), message: "at least 1".into() });
        }
    }
    let level = match scope.capability_ceiling.as_deref() {
        None => Level::parse(&cfg.default_capability_ceiling).unwrap_or(Level::Mutate),
        Some(name) => Level::parse(name).unwrap_or_else(|| {
            errors.push(FieldError {
                field: "scope.capability_ceiling".into(),
                code: "unknown_ceiling".into(),
                message: "CAP_READ, CAP_MUTATE or CAP_ADMIN".into(),
            });
            Level::Read
        }),
    };
    let ceremony = scope.ceremony_required_for.unwrap_or_else(|| cfg.default_ceremony_required_for.clone());
    let prohibited = scope.prohibited_commands.unwrap_or_default();
    commands("scope.ceremony_required_for", &ceremony, cfg.max_list_items, &mut errors);
    commands("scope.prohibited_commands", &prohibited, cfg.max_list_items, &mut errors);
    if let Some(asked) = &scope.scopes {
        if asked.len() > cfg.max_list_items {
            errors.push(FieldError {
                field: "scope.scopes".into(),
                code: "too_many".into(),
                message: format!("at most {} items", cfg.max_list_items),
            });
        } else {
            for (i, s) in asked.iter().enumerate() {
                if !ceiling::valid_scope(s) {
                    errors.push(FieldError {
                        field: format!("scope.scopes[{i}]"),
                        code: "invalid_scope".into(),
                        message: "1 to 100 of a-z 0-9 _ - . :".into(),
                    });
                }
            }
        }
    }
    text("agent_type", req.agent_type.as_ref(), 100, &mut errors);
    text("agent_model", req.agent_model.as_ref(), 100, &mut errors);
    text("purpose", req.purpose.as_ref(), 2000, &mut errors);
    match (&req.agent_id, &req.agent_type) {
        (Some(_), _) | (None, Some(_)) => {}
        (None, None) => errors.push(FieldError {
            field: "agent_id".into(),
            code: "required".into(),
            message: "name an agent (agent_id) or the type of a new one (agent_type)".into(),
        }),
    }
    if req.agent_type.as_deref().is_some_and(|t| t.trim().is_empty()) {
        errors.push(FieldError { field: "agent_type".into(), code: "length".into(), message: "not empty".into() });
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation { errors });
    }

    let now = state.clock().now();
    let mut tx = state.db().begin().await?;
    let who = delegator(&state, &mut tx, &actor, org_id).await?;
    if level > who.max_level {
        return Err(ApiError::forbidden(
            "ceiling_exceeds_delegator",
            format!("{} is above the delegator's own ceiling, {}.", level.as_str(), who.max_level.as_str()),
        ));
    }
    // The agent: one of the organization's, or a new ephemeral one.
    let existing = match req.agent_id {
        Some(agent_id) => {
            let me = format!("agent:{agent_id}");
            if actor.actor_id() == me {
                return Err(ApiError::field("agent_id", "self_delegation", "a delegator cannot delegate to itself"));
            }
            if who.chain.contains(&me) {
                return Err(ApiError::field("agent_id", "delegation_cycle", "this agent is already in the chain"));
            }
            let agent = crate::auth::agents::for_delegation(&mut tx, org_id, agent_id)
                .await?
                .ok_or_else(|| ApiError::field("agent_id", "unknown_agent", "no such agent in this organization"))?;
            if !agent.active {
                return Err(ApiError::field("agent_id", "agent_suspended", "the agent is suspended"));
            }
            Some((agent_id, agent))
        }
        None => None,
    };
    let scopes = ceiling::grant(
        who.scopes.as_deref(),
        existing.as_ref().map(|(_, a)| a.allowed_scopes.as_slice()),
        scope.scopes.as_deref(),
        level,
        &cfg.ceilings,
    )
    .map_err(refusal)?;

    let mut expires_at = now + time::Duration::minutes(ttl);
    let mut max_commands = max_commands;
    let (mut max_cost, mut max_tokens) = (scope.max_cost, scope.max_tokens);
    if let Some(parent) = &who.parent {
        if expires_at > parent.expires_at {
            if ttl_asked {
                return Err(ApiError::field("scope.max_ttl_minutes", "exceeds_parent", "it would outlive its parent"));
            }
            expires_at = parent.expires_at;
        }
        let remaining = parent.remaining();
        if max_commands > remaining {
            if budget_asked || remaining == 0 {
                return Err(ApiError::field(
                    "scope.max_commands",
                    "exceeds_parent",
                    format!("the parent has {remaining} commands left"),
                ));
            }
            max_commands = remaining;
        }
        for (field, mine, theirs) in [
            ("scope.max_cost", &mut max_cost, parent.max_cost.map(|m| m - parent.cost_spent)),
            ("scope.max_tokens", &mut max_tokens, parent.max_tokens.map(|m| m - parent.tokens_spent)),
        ] {
            if let Some(left) = theirs {
                match *mine {
                    Some(v) if v > left => {
                        return Err(ApiError::field(field, "exceeds_parent", format!("the parent has {left} left")));
                    }
                    None => *mine = Some(left.max(1)),
                    _ => {}
                }
            }
        }
        sqlx::query!(
            "update delegation set reserved_commands = reserved_commands + $2 where delegation_id = $1",
            parent.delegation_id,
            max_commands as i32
        )
        .execute(&mut *tx)
        .await?;
    }
    let id = Uuid::now_v7();
    let (agent_id, display_name, client) = match existing {
        Some((agent_id, agent)) => (agent_id, agent.name, None),
        None => {
            // An ephemeral agent is an agent: it counts against the plan's max_agents, checked as
            // the agent registry checks it (the tier row locked to the commit) when there is one.
            if crate::tiers::org_tier(&state, org_id).await.limits.max_agents.max().is_some() {
                let tier = crate::tiers::lock_limits(&state, &mut tx, org_id).await?;
                if let Some(max) = tier.limits.max_agents.max() {
                    let agents = crate::auth::agents::count(&mut *tx, org_id).await?;
                    if agents >= max {
                        return Err(ApiError::Forbidden {
                            code: "agent_limit_reached".into(),
                            detail: format!(
                                "The {} plan allows {max} agents and the organization has {agents}: an ephemeral \
                                 agent would be one more.",
                                tier.plan
                            )
                            .into(),
                        });
                    }
                }
            }
            let agent_type = req.agent_type.clone().unwrap_or_default();
            let short = who.id.rsplit(':').next().unwrap_or_default().chars().take(8).collect::<String>();
            let name = format!("{agent_type} (delegated by {short})");
            let metadata = json!({ "delegation_id": id, "agent_type": agent_type, "agent_model": req.agent_model });
            let e =
                crate::auth::agents::create_ephemeral(&mut tx, org_id, who.root_user, &name, &scopes, metadata).await?;
            (e.agent_id, name, Some(e))
        }
    };
    let mut chain = who.chain.clone();
    chain.push(format!("agent:{agent_id}"));
    let depth = who.parent.as_ref().map_or(0, |p| p.depth + 1);
    let purpose = req.purpose.unwrap_or_default();
    let mut data = json!({
        "event_code": super::DELEGATION_CREATED,
        "delegation_id": id,
        "delegator_id": who.id,
        "agent_id": agent_id,
        "agent_type": req.agent_type.clone().unwrap_or_default(),
        "chain": chain,
        "depth": depth,
        "scopes": scopes,
        "capability_ceiling": level.as_str(),
        "max_commands": max_commands,
        "expires_at": crate::events::rfc3339(expires_at),
        "purpose": purpose,
    });
    let cid = canonical::cid(&data);
    sqlx::query!(
        "insert into delegation (delegation_id, organization_id, parent_id, depth, chain, delegator_id,
             delegator_credential, agent_id, ephemeral, agent_type, agent_model, purpose, scopes, capability_ceiling,
             ceremony_required_for, prohibited_commands, max_commands, max_cost, max_tokens, expires_at, chronicle_cid)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21)",
        id,
        org_id,
        who.parent.as_ref().map(|p| p.delegation_id),
        depth,
        &chain,
        who.id,
        who.credential,
        agent_id,
        client.is_some(),
        req.agent_type,
        req.agent_model,
        purpose,
        &scopes,
        level.as_str(),
        &ceremony,
        &prohibited,
        max_commands as i32,
        max_cost,
        max_tokens,
        expires_at,
        cid
    )
    .execute(&mut *tx)
    .await?;
    super::count_active(&mut tx, org_id, 1).await?;
    data["chronicle_cid"] = json!(cid);
    crate::events::emit(&mut tx, org_id, "delegation.created", format!("delegations/{id}"), data.clone()).await?;
    let grant = Grant { delegation_id: id, org_id, scopes: scopes.clone(), expires_at, chain };
    let (client_id, credential_id) =
        client.as_ref().map_or((String::new(), Uuid::nil()), |c| (c.client_id.clone(), c.credential_id));
    let aud = Audience::One(state.config().audience());
    let (agent_token, _) =
        crate::auth::oauth::issue_delegated(&state, &grant, &client_id, credential_id, &scopes.join(" "), aud)
            .map_err(ApiError::Internal)?;
    // Last: the audit record locks the head of the organization's chain until the commit, so
    // concurrent creates queue only for this step.
    crate::audit::record(
        &mut tx,
        crate::audit::Event::by(&actor, org_id, "delegation.created").target("delegation", id).details(data),
    )
    .await?;
    tx.commit().await?;
    metrics::counter!("delegations_created_total").increment(1);
    metrics::gauge!("delegations_active").increment(1.0);
    Ok((
        StatusCode::CREATED,
        no_store(),
        Json(CreatedDelegation {
            delegation_id: id,
            status: "active".into(),
            agent_principal: AgentPrincipal {
                agent_id,
                did: did(&state, agent_id),
                client_id: client.as_ref().map(|c| c.client_id.clone()),
                client_secret: client.map(|c| c.client_secret),
                display_name,
            },
            agent_token,
            scopes,
            expires_at,
            max_commands,
            parent_id: who.parent.map(|p| p.delegation_id),
            chronicle_cid: cid,
        }),
    ))
}

/// A delegation: its state, budget, time left, chain and why it ended.
#[utoipa::path(get, path = "/api/v1/delegations/{id}", tag = "delegations", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = DelegationInfo), (status = 404, body = Problem)))]
pub(super) async fn get_delegation(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<DelegationInfo>> {
    let org_id = actor.current_org()?;
    let mut conn = state.db().acquire().await?;
    let row = fetch(&mut conn, org_id, id, false).await?;
    if !visible(&actor, &row) {
        return Err(ApiError::NotFound);
    }
    Ok(Json(row.info(&state)))
}

/// The organization's delegations (owners and admins: all; others: those they are in), newest
/// first, with the count of active ones.
#[utoipa::path(get, path = "/api/v1/delegations", tag = "delegations", params(ListQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = DelegationPage), (status = 400, body = Problem)))]
pub(super) async fn list_delegations(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<DelegationPage>> {
    let org_id = actor.current_org()?;
    let limit = pagination::limit(q.limit)?;
    if q.status.as_deref().is_some_and(|s| !["active", "expired", "revoked"].contains(&s)) {
        return Err(ApiError::bad_request("invalid_query", "status is active, expired or revoked"));
    }
    if q.delegator_id.as_deref().is_some_and(|d| d.len() > 100) {
        return Err(ApiError::bad_request("invalid_query", "delegator_id is an actor id"));
    }
    let participant = (!is_admin(&actor, org_id)).then(|| actor.actor_id());
    let rows = sqlx::query_as!(
        Row,
        "select * from delegation
         where organization_id = $1
           and ($2::text is null or status = $2)
           and ($3::uuid is null or agent_id = $3)
           and ($4::text is null or delegator_id = $4)
           and ($5::uuid is null or delegation_id < $5)
           and ($6::text is null or $6 = any(chain))
         order by delegation_id desc limit $7",
        org_id,
        q.status,
        q.agent_id,
        q.delegator_id,
        q.after,
        participant,
        limit + 1
    )
    .fetch_all(state.db())
    .await?;
    let (rows, next_cursor) = pagination::page(rows, limit, |r| r.delegation_id);
    let total_active = super::active_count(state.db(), org_id).await?;
    Ok(Json(DelegationPage { items: rows.into_iter().map(|r| r.info(&state)).collect(), next_cursor, total_active }))
}

/// Revokes a delegation, its descendants, and every token issued under any of them, on every
/// instance at once.
#[utoipa::path(post, path = "/api/v1/delegations/{id}/revoke", tag = "delegations", params(("id" = Uuid, Path)),
    request_body(content = RevokeRequest, description = "Optional; `reason` defaults to manual_revocation"),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Revoked), (status = 404, body = Problem), (status = 409, description = "Already ended", body = Problem)))]
pub(super) async fn revoke_delegation(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Revoked>> {
    let org_id = actor.current_org()?;
    let req: RevokeRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RevokeRequest::default()
    } else {
        crate::http::extract::parse_json(&body)?
    };
    let reason = req.reason.unwrap_or_else(|| "manual_revocation".into());
    if reason.is_empty()
        || reason.len() > 100
        || !reason.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
    {
        return Err(ApiError::field("reason", "invalid_reason", "1 to 100 of A-Z a-z 0-9 _ - ."));
    }
    let mut tx = state.db().begin().await?;
    let row = fetch(&mut tx, org_id, id, true).await?;
    if !visible(&actor, &row) {
        return Err(ApiError::NotFound);
    }
    if row.status != "active" {
        return Err(ApiError::conflict(
            "delegation_ended",
            format!("The delegation has already ended ({}).", row.status),
        ));
    }
    let ending = super::end_tree(&mut tx, state.clock().now(), &[id], "revoked", &reason, Some(&actor), false).await?;
    tx.commit().await?;
    let ended: Vec<Uuid> = ending.ended.iter().map(|e| e.delegation_id).collect();
    let cid = ending.ended.iter().find(|e| e.delegation_id == id).map(|e| e.chronicle_cid.clone());
    super::finish(&state, ending).await;
    Ok(Json(Revoked { delegation_id: id, status: "revoked".into(), reason, ended, chronicle_cid: cid }))
}

/// SHA-256 of the canonical JSON of a command's arguments.
fn args_hash(args: Option<&Value>) -> Vec<u8> {
    let text = args.and_then(canonical::canonical).unwrap_or_else(|| "null".into());
    Sha256::digest(text.as_bytes()).to_vec()
}

/// Checks a command against the delegation, consuming one unit of its budget when permitted:
/// prohibited commands are denied without consuming, ceremony commands need an approval (one
/// is requested), and the last unit ends the delegation (`command_limit`).
#[utoipa::path(post, path = "/api/v1/delegations/{id}/commands", tag = "delegations", params(("id" = Uuid, Path)),
    request_body = CommandRequest,
    security(("bearer" = []), ("api_key" = [])),
    responses(
        (status = 200, body = CommandDecision),
        (status = 403, description = "Not the delegation's agent or a service key", body = Problem),
        (status = 404, body = Problem),
        (status = 422, body = Problem)))]
pub(super) async fn check_command(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
    body: axum::body::Bytes,
) -> ApiResult<Json<CommandDecision>> {
    let org_id = actor.current_org()?;
    let enforcer = match &actor.principal.credential {
        Credential::AccessToken { claims, .. } => claims.delegation_id == Some(id),
        Credential::ApiKey { org_id: key_org, .. } => actor.actor_type == ActorType::Service && *key_org == org_id,
        Credential::Session { .. } => false,
    };
    let now = state.clock().now();
    let mut conn = state.db().acquire().await?;
    if !enforcer {
        let row = fetch(&mut conn, org_id, id, false).await?;
        if !visible(&actor, &row) {
            return Err(ApiError::NotFound);
        }
        return Err(ApiError::forbidden(
            "not_enforcement_point",
            "Commands are checked by the delegation's agent (with its delegated token) or a service key.",
        ));
    }
    let policy = sqlx::query!(
        "select status, expires_at, prohibited_commands, ceremony_required_for,
                max_commands - commands_executed - reserved_commands as \"remaining!\"
         from delegation where delegation_id = $1 and organization_id = $2",
        id,
        org_id
    )
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(ApiError::NotFound)?;
    // Read only once the delegation is known to be the caller's: another organization's is a
    // 404 whatever the body.
    let req: CommandRequest = crate::http::extract::parse_json(&body)?;
    let mut errors = Vec::new();
    commands("command", std::slice::from_ref(&req.command), 1, &mut errors);
    if req.args.as_ref().is_some_and(|a| a.to_string().len() > 16_384) {
        errors.push(FieldError { field: "args".into(), code: "too_large".into(), message: "at most 16 KiB".into() });
    }
    if !errors.is_empty() {
        return Err(ApiError::Validation { errors });
    }
    let deny = |reason: String, remaining: i64| -> ApiResult<Json<CommandDecision>> {
        metrics::counter!("delegation_commands_total", "decision" => "deny").increment(1);
        Ok(Json(CommandDecision { decision: "deny", reason, commands_remaining: remaining, approval_id: None }))
    };
    if policy.status != "active" || policy.expires_at <= now {
        return deny("delegation_ended".into(), 0);
    }
    let remaining = policy.remaining as i64;
    if policy.prohibited_commands.contains(&req.command) {
        return deny("prohibited_command".into(), remaining);
    }
    let hash = args_hash(req.args.as_ref());
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    if policy.ceremony_required_for.contains(&req.command) {
        // An approval permits this command, with these arguments, once.
        let used = sqlx::query_scalar!(
            "update delegation_approval set status = 'used'
             where approval_id = (select approval_id from delegation_approval
                                  where delegation_id = $1 and command = $2 and args_hash = $3
                                    and status = 'approved' and expires_at > $4
                                  order by approval_id limit 1 for update skip locked)
             returning approval_id",
            id,
            req.command,
            &hash,
            now
        )
        .fetch_optional(&mut *tx)
        .await?;
        if used.is_none() {
            let pending = sqlx::query_scalar!(
                "select approval_id from delegation_approval
                 where delegation_id = $1 and command = $2 and args_hash = $3 and status = 'pending' and expires_at > $4
                 order by approval_id desc limit 1",
                id,
                req.command,
                &hash,
                now
            )
            .fetch_optional(&mut *tx)
            .await?;
            let approval_id = match pending {
                Some(a) => a,
                None => request_approval(&state, &mut tx, &actor, org_id, id, &req, &hash, now).await?,
            };
            tx.commit().await?;
            metrics::counter!("delegation_commands_total", "decision" => "ceremony_required").increment(1);
            return Ok(Json(CommandDecision {
                decision: "ceremony_required",
                reason: "ceremony_required".into(),
                commands_remaining: remaining,
                approval_id: Some(approval_id),
            }));
        }
    }
    // One unit, atomically: the row lock orders concurrent checks, and the condition admits
    // exactly as many as the budget holds.
    let consumed = sqlx::query!(
        "update delegation set commands_executed = commands_executed + 1
         where delegation_id = $1 and status = 'active' and expires_at > $2
           and commands_executed + reserved_commands < max_commands
         returning max_commands - commands_executed - reserved_commands as \"remaining!\"",
        id,
        now
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(consumed) = consumed else {
        tx.rollback().await?;
        return deny("command_limit".into(), 0);
    };
    let ending = if consumed.remaining == 0 {
        Some(super::end_tree(&mut tx, now, &[id], "expired", "command_limit", Some(&actor), false).await?)
    } else {
        None
    };
    tx.commit().await?;
    if let Some(ending) = ending {
        super::finish(&state, ending).await;
    }
    metrics::counter!("delegation_commands_total", "decision" => "permit").increment(1);
    Ok(Json(CommandDecision {
        decision: "permit",
        reason: "within_budget".into(),
        commands_remaining: consumed.remaining as i64,
        approval_id: None,
    }))
}

#[allow(clippy::too_many_arguments)]
async fn request_approval(
    state: &AppState,
    conn: &mut PgConnection,
    actor: &Actor,
    org_id: Uuid,
    delegation_id: Uuid,
    req: &CommandRequest,
    hash: &[u8],
    now: OffsetDateTime,
) -> Result<Uuid, sqlx::Error> {
    let approval_id = Uuid::now_v7();
    let expires_at = now + time::Duration::seconds(state.config().delegation.approval_request_secs as i64);
    let delegator_id = sqlx::query_scalar!(
        "insert into delegation_approval (approval_id, delegation_id, organization_id, command, args, args_hash, expires_at)
         values ($1, $2, $3, $4, $5, $6, $7)
         returning (select delegator_id from delegation where delegation_id = $2) as \"delegator!\"",
        approval_id,
        delegation_id,
        org_id,
        req.command,
        req.args,
        hash,
        expires_at
    )
    .fetch_one(&mut *conn)
    .await?;
    let data = json!({
        "delegation_id": delegation_id,
        "approval_id": approval_id,
        "delegator_id": delegator_id,
        "command": req.command,
        "expires_at": crate::events::rfc3339(expires_at),
    });
    super::record(conn, org_id, "delegation.approval_requested", delegation_id, data, Some(actor)).await?;
    Ok(approval_id)
}

#[derive(Debug)]
struct ApprovalRow {
    approval_id: Uuid,
    delegation_id: Uuid,
    command: String,
    args: Option<Value>,
    status: String,
    decided_by: Option<String>,
    decided_at: Option<OffsetDateTime>,
    expires_at: OffsetDateTime,
    created_at: OffsetDateTime,
}

impl ApprovalRow {
    fn approval(self, now: OffsetDateTime) -> Approval {
        let lapsed = matches!(self.status.as_str(), "pending" | "approved") && self.expires_at <= now;
        Approval {
            approval_id: self.approval_id,
            delegation_id: self.delegation_id,
            command: self.command,
            args: self.args,
            status: if lapsed { "expired".into() } else { self.status },
            decided_by: self.decided_by,
            decided_at: self.decided_at,
            expires_at: self.expires_at,
            created_at: self.created_at,
        }
    }
}

/// The delegation's approval requests, newest first (at most 200).
#[utoipa::path(get, path = "/api/v1/delegations/{id}/approvals", tag = "delegations", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Vec<Approval>), (status = 404, body = Problem)))]
pub(super) async fn list_approvals(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Json<Vec<Approval>>> {
    let org_id = actor.current_org()?;
    let mut conn = state.db().acquire().await?;
    let row = fetch(&mut conn, org_id, id, false).await?;
    if !visible(&actor, &row) {
        return Err(ApiError::NotFound);
    }
    let rows = sqlx::query_as!(
        ApprovalRow,
        "select approval_id, delegation_id, command, args, status, decided_by, decided_at, expires_at, created_at
         from delegation_approval where delegation_id = $1 order by approval_id desc limit 200",
        id
    )
    .fetch_all(&mut *conn)
    .await?;
    let now = state.clock().now();
    Ok(Json(rows.into_iter().map(|r| r.approval(now)).collect()))
}

async fn decide(
    state: &AppState,
    actor: &Actor,
    id: Uuid,
    approval_id: Uuid,
    approve: bool,
) -> ApiResult<Json<Approval>> {
    let org_id = actor.current_org()?;
    let now = state.clock().now();
    let mut tx = state.db().begin().await?;
    let row = fetch(&mut tx, org_id, id, false).await?;
    if !visible(actor, &row) {
        return Err(ApiError::NotFound);
    }
    if row.delegator_id != actor.actor_id() {
        return Err(ApiError::forbidden("not_delegator", "Only the delegator decides a ceremony."));
    }
    if row.status != "active" {
        return Err(ApiError::conflict("delegation_ended", "The delegation has ended."));
    }
    let (status, expires_at) = if approve {
        ("approved", now + time::Duration::seconds(state.config().delegation.approval_valid_secs as i64))
    } else {
        ("denied", now)
    };
    let decided = sqlx::query_as!(
        ApprovalRow,
        "update delegation_approval set status = $3, decided_by = $4, decided_at = $5, expires_at = $6
         where approval_id = $1 and delegation_id = $2 and status = 'pending' and expires_at > $5
         returning approval_id, delegation_id, command, args, status, decided_by, decided_at, expires_at, created_at",
        approval_id,
        id,
        status,
        actor.actor_id(),
        now,
        expires_at
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(decided) = decided else {
        let exists = sqlx::query_scalar!(
            "select 1 as \"one!\" from delegation_approval where approval_id = $1 and delegation_id = $2",
            approval_id,
            id
        )
        .fetch_optional(&mut *tx)
        .await?;
        return Err(match exists {
            None => ApiError::NotFound,
            Some(_) => ApiError::conflict("approval_not_pending", "The request was already decided, or has lapsed."),
        });
    };
    crate::audit::record(
        &mut tx,
        crate::audit::Event::by(
            actor,
            org_id,
            if approve { "delegation.approval_granted" } else { "delegation.approval_denied" },
        )
        .target("delegation", id)
        .details(json!({ "approval_id": approval_id, "command": decided.command })),
    )
    .await?;
    tx.commit().await?;
    Ok(Json(decided.approval(now)))
}

/// Approves a ceremony: the command (with its arguments) is permitted once, within
/// `delegation.approval_valid_secs`.
#[utoipa::path(post, path = "/api/v1/delegations/{id}/approvals/{approval_id}/approve", tag = "delegations",
    params(("id" = Uuid, Path), ("approval_id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Approval), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem)))]
pub(super) async fn approve_ceremony(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath((id, approval_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<Approval>> {
    decide(&state, &actor, id, approval_id, true).await
}

/// Denies a ceremony.
#[utoipa::path(post, path = "/api/v1/delegations/{id}/approvals/{approval_id}/deny", tag = "delegations",
    params(("id" = Uuid, Path), ("approval_id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Approval), (status = 403, body = Problem), (status = 404, body = Problem),
              (status = 409, body = Problem)))]
pub(super) async fn deny_ceremony(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath((id, approval_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<Approval>> {
    decide(&state, &actor, id, approval_id, false).await
}
