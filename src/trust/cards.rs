//! Agent cards. Each agent has an A2A Agent Card (name, description, its capabilities as skills,
//! and a security scheme pointing at our token endpoint), signed by us as A2A prescribes: a JWS
//! whose payload is the RFC 8785 canonical JSON of the card without its `signatures`, carried
//! detached in `signatures[]` (`protected` and `signature`, base64url). Any JOSE library checks it
//! against our JWKS: rebuild `protected.<base64url(canonical card)>.signature` and verify.
//!
//! A listed agent's card is public at `/agents/<id>/.well-known/agent-card.json`; any agent's
//! card is at `/api/v1/agents/<id>/card` for its organization, and
//! `/api/v1/compliance/agent-cards` exports all of them (A2A or AGNTCY OASF records).

use axum::{
    Json,
    extract::State,
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use time::format_description::well_known::Rfc3339;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use crate::{
    auth::{
        Actor,
        directory::{self, AgentProfile},
    },
    delegation::canonical::canonical,
    http::{
        ApiError, ApiResult,
        error::Problem,
        extract::{ApiPath, ApiQuery},
    },
    state::AppState,
};

/// The A2A protocol version our cards follow.
pub const A2A_PROTOCOL_VERSION: &str = "0.3.0";

/// Where a listed agent's card is public.
pub fn public_card_url(base: &str, agent_id: Uuid) -> String {
    format!("{base}/agents/{agent_id}/.well-known/agent-card.json")
}

/// The unsigned A2A card of an agent.
pub fn a2a_card(base: &str, agent: &AgentProfile) -> Value {
    let skills: Vec<Value> = agent
        .capabilities
        .iter()
        .map(|c| json!({ "id": c, "name": c, "description": format!("The agent's `{c}` capability."), "tags": [c] }))
        .collect();
    let scopes: Map<String, Value> = agent.allowed_scopes.iter().map(|s| (s.clone(), json!(s))).collect();
    json!({
        "protocolVersion": A2A_PROTOCOL_VERSION,
        "name": agent.name,
        "description": agent.description,
        "url": format!("{base}/agents/{}", agent.id),
        "version": agent.updated_at.format(&Rfc3339).unwrap_or_default(),
        "provider": { "organization": agent.org_name, "url": base },
        "capabilities": { "streaming": false, "pushNotifications": false },
        "defaultInputModes": ["application/json", "text/plain"],
        "defaultOutputModes": ["application/json", "text/plain"],
        "skills": skills,
        "securitySchemes": {
            "agentidp": {
                "type": "oauth2",
                "description": "OAuth 2.0 client credentials from this identity provider.",
                "flows": { "clientCredentials": { "tokenUrl": format!("{base}/api/v1/token"), "scopes": scopes } },
            }
        },
        "security": [ { "agentidp": agent.allowed_scopes } ],
        "documentationUrl": super::did::agent_did(base, agent.id),
    })
}

/// Signs a card in place: appends our detached JWS to its `signatures`.
pub fn sign_card(state: &AppState, mut card: Value) -> ApiResult<Value> {
    let set = state.keys().current().ok_or_else(|| anyhow::anyhow!("signing keys not loaded"))?;
    let key = set.signer(state.clock().now().unix_timestamp());
    let base = &state.config().server.public_url;
    let header = json!({ "alg": key.algorithm.as_str(), "kid": key.kid, "typ": "JOSE",
                         "jku": format!("{base}/.well-known/jwks.json") });
    if let Some(obj) = card.as_object_mut() {
        obj.remove("signatures");
    }
    let payload = canonical(&card).ok_or_else(|| anyhow::anyhow!("card holds a non-integer number"))?;
    let protected = B64.encode(header.to_string());
    let input = format!("{protected}.{}", B64.encode(payload));
    let signature = B64.encode(key.sign(input.as_bytes())?);
    card["signatures"] = json!([{ "protected": protected, "signature": signature }]);
    Ok(card)
}

/// The OASF record of an agent (the AGNTCY Open Agentic Schema Framework shape).
pub fn oasf_record(base: &str, agent: &AgentProfile) -> Value {
    json!({
        "schema_version": "0.7.0",
        "name": format!("{}/{}", agent.org_slug, agent.name),
        "version": agent.updated_at.format(&Rfc3339).unwrap_or_default(),
        "description": agent.description,
        "authors": [agent.org_name],
        "created_at": agent.updated_at.format(&Rfc3339).unwrap_or_default(),
        "skills": agent.capabilities.iter().map(|c| json!({ "name": c })).collect::<Vec<_>>(),
        "locators": [
            { "type": "agent-card", "url": public_card_url(base, agent.id) },
            { "type": "did", "url": super::did::agent_did(base, agent.id) },
        ],
    })
}

fn card_response(card: Value, public: bool) -> Response {
    let mut response = Json(card).into_response();
    if public {
        response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
    }
    response
}

/// A listed agent's signed A2A card. Unlisted, suspended and unknown agents: 404.
#[utoipa::path(get, path = "/agents/{id}/.well-known/agent-card.json", tag = "trust", params(("id" = Uuid, Path)),
    responses((status = 200, description = "The signed A2A Agent Card", body = Object),
        (status = 404, body = Problem), (status = 429, body = Problem)))]
pub(super) async fn public_agent_card(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Response> {
    super::charge_public_read(&state)?;
    let agent = directory::agent_profile(state.db(), id)
        .await?
        .filter(|a| a.active && a.listed_at.is_some())
        .ok_or(ApiError::NotFound)?;
    let card = sign_card(&state, a2a_card(&state.config().server.public_url, &agent))?;
    Ok(card_response(card, true))
}

/// Any agent's signed A2A card, for its organization.
#[utoipa::path(get, path = "/api/v1/agents/{id}/card", tag = "trust", params(("id" = Uuid, Path)),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, description = "The signed A2A Agent Card", body = Object),
        (status = 401, body = Problem), (status = 404, body = Problem)))]
pub(super) async fn agent_card(
    State(state): State<AppState>,
    actor: Actor,
    ApiPath(id): ApiPath<Uuid>,
) -> ApiResult<Response> {
    let org_id = actor.current_org()?;
    let agent =
        directory::agent_profile(state.db(), id).await?.filter(|a| a.org_id == org_id).ok_or(ApiError::NotFound)?;
    let card = sign_card(&state, a2a_card(&state.config().server.public_url, &agent))?;
    Ok(card_response(card, false))
}

/// The export's shape.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CardFormat {
    /// Signed A2A Agent Cards.
    #[default]
    A2a,
    /// AGNTCY OASF agent records.
    Oasf,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ExportQuery {
    /// `a2a` (default) or `oasf`.
    pub format: Option<CardFormat>,
}

/// Every card of the organization.
#[derive(Debug, Serialize, ToSchema)]
pub struct CardExport {
    pub format: CardFormat,
    pub org_id: Uuid,
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<Value>,
}

/// All of the organization's agent cards, in the A2A or OASF shape.
#[utoipa::path(get, path = "/api/v1/compliance/agent-cards", tag = "trust", params(ExportQuery),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = CardExport), (status = 400, body = Problem), (status = 401, body = Problem),
        (status = 403, body = Problem)))]
pub(super) async fn export_agent_cards(
    State(state): State<AppState>,
    actor: Actor,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> ApiResult<Json<CardExport>> {
    let org_id = actor.current_org()?;
    let format = q.format.unwrap_or_default();
    let base = state.config().server.public_url.clone();
    let agents = directory::agent_profiles(state.db(), org_id).await?;
    let items = agents
        .iter()
        .map(|a| match format {
            CardFormat::A2a => sign_card(&state, a2a_card(&base, a)),
            CardFormat::Oasf => Ok(oasf_record(&base, a)),
        })
        .collect::<ApiResult<Vec<Value>>>()?;
    Ok(Json(CardExport { format, org_id, items }))
}
