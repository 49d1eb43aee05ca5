//! What viewers read: the map, the agent lists, the presence snapshot and its live stream (SSE),
//! and the route agents report their presence on.
//!
//! Every read joins three things: the organization's active agents (Postgres, so a suspended or
//! deleted agent is never shown, whatever Redis still holds), their placements, and their live
//! presence (one Redis round trip).

use std::{collections::HashMap, convert::Infallible, sync::Arc};

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::sse::{Event, KeepAlive, Sse},
};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::broadcast::{self, error::RecvError};
use utoipa::ToSchema;
use uuid::Uuid;
use validator::Validate;

use super::{
    feed::{self, Change, StreamId},
    map::{Room, rooms_of},
    presence::{self, Status},
};
use crate::{
    auth::{Actor, ActorType, agents},
    http::{ApiError, ApiResult, error::Problem, extract::ValidatedJson},
    state::AppState,
};

/// An agent as the city shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CityAgent {
    pub id: Uuid,
    pub name: String,
    /// `online`, `busy`, `idle`, or `offline` when its presence has lapsed (or it never reported).
    pub status: String,
    pub activity: Option<String>,
    pub room_id: Option<Uuid>,
    pub node_id: Option<Uuid>,
    /// The last presence report, while it is live.
    #[serde(with = "time::serde::rfc3339::option")]
    pub reported_at: Option<OffsetDateTime>,
    /// Coarse (minutes), from Postgres: when the agent was last seen at all.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen_at: Option<OffsetDateTime>,
}

/// A room with the agents in it.
#[derive(Debug, Serialize, ToSchema)]
pub struct MapRoom {
    #[serde(flatten)]
    pub room: Room,
    pub agents: Vec<CityAgent>,
}

/// A zone with its rooms.
#[derive(Debug, Serialize, ToSchema)]
pub struct MapZone {
    pub id: Uuid,
    pub name: String,
    pub slug: String,
    pub rooms: Vec<MapRoom>,
}

/// The city map.
#[derive(Debug, Serialize, ToSchema)]
pub struct CityMap {
    pub zones: Vec<MapZone>,
    /// Active agents placed in no room.
    pub unplaced: Vec<CityAgent>,
    pub online_count: usize,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// The agents of the city.
#[derive(Debug, Serialize, ToSchema)]
pub struct AgentList {
    pub agents: Vec<CityAgent>,
    pub online_count: usize,
}

/// A room in the snapshot: where it is and who is in it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SnapshotRoom {
    pub id: Uuid,
    pub zone_id: Uuid,
    pub slug: String,
    pub name: String,
    pub agent_ids: Vec<Uuid>,
}

/// The presence snapshot (also the first event of the stream).
#[derive(Debug, Serialize, ToSchema)]
pub struct Snapshot {
    pub rooms: Vec<SnapshotRoom>,
    pub agents: Vec<CityAgent>,
    pub online_count: usize,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// An agent's room, node and coarse last sighting.
type Placed = (Option<Uuid>, Option<Uuid>, Option<OffsetDateTime>);

/// Every active agent of the organization, with placement and presence.
pub(super) async fn city_agents(state: &AppState, org_id: Uuid) -> ApiResult<Vec<CityAgent>> {
    let roster = agents::roster(state.db(), org_id).await?;
    let placements: HashMap<Uuid, Placed> = sqlx::query!(
        "select agent_id, room_id, node_id, last_seen_at from agent_placement where organization_id = $1",
        org_id
    )
    .fetch_all(state.db())
    .await?
    .into_iter()
    .map(|r| (r.agent_id, (r.room_id, r.node_id, r.last_seen_at)))
    .collect();
    let active: Vec<_> = roster.into_iter().filter(|a| a.active).collect();
    let ids: Vec<Uuid> = active.iter().map(|a| a.id).collect();
    let live = presence::read(state, org_id, &ids).await.map_err(|e| {
        tracing::warn!(error = %e, "presence unavailable");
        ApiError::Unavailable("presence store".into())
    })?;
    Ok(active
        .into_iter()
        .map(|a| {
            let (room_id, node_id, last_seen_at) = placements.get(&a.id).copied().unwrap_or_default();
            let p = live.get(&a.id);
            CityAgent {
                id: a.id,
                name: a.name,
                status: p.map(|p| p.status.as_str()).unwrap_or("offline").to_owned(),
                activity: p.and_then(|p| p.activity.clone()),
                room_id,
                node_id,
                reported_at: p.map(|p| p.at),
                last_seen_at,
            }
        })
        .collect())
}

fn online(agents: &[CityAgent]) -> usize {
    agents.iter().filter(|a| a.status != "offline").count()
}

async fn build_map(state: &AppState, org_id: Uuid) -> ApiResult<CityMap> {
    let zones =
        sqlx::query!("select zone_id, name, slug from zone where organization_id = $1 order by name, zone_id", org_id)
            .fetch_all(state.db())
            .await?;
    let rooms = rooms_of(state, org_id).await?;
    let agents = city_agents(state, org_id).await?;
    let online_count = online(&agents);
    let mut by_room: HashMap<Uuid, Vec<CityAgent>> = HashMap::new();
    let mut unplaced = Vec::new();
    for a in agents {
        match a.room_id {
            Some(r) => by_room.entry(r).or_default().push(a),
            None => unplaced.push(a),
        }
    }
    let mut rooms_by_zone: HashMap<Uuid, Vec<MapRoom>> = HashMap::new();
    for room in rooms {
        let agents = by_room.remove(&room.id).unwrap_or_default();
        rooms_by_zone.entry(room.zone_id).or_default().push(MapRoom { room, agents });
    }
    Ok(CityMap {
        zones: zones
            .into_iter()
            .map(|z| MapZone {
                rooms: rooms_by_zone.remove(&z.zone_id).unwrap_or_default(),
                id: z.zone_id,
                name: z.name,
                slug: z.slug,
            })
            .collect(),
        unplaced,
        online_count,
        at: state.clock().now(),
    })
}

pub(super) async fn build_snapshot(state: &AppState, org_id: Uuid) -> ApiResult<Snapshot> {
    let rooms = rooms_of(state, org_id).await?;
    let agents = city_agents(state, org_id).await?;
    let mut by_room: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for a in &agents {
        if let Some(r) = a.room_id {
            by_room.entry(r).or_default().push(a.id);
        }
    }
    Ok(Snapshot {
        rooms: rooms
            .into_iter()
            .map(|r| SnapshotRoom {
                agent_ids: by_room.remove(&r.id).unwrap_or_default(),
                id: r.id,
                zone_id: r.zone_id,
                slug: r.slug,
                name: r.name,
            })
            .collect(),
        online_count: online(&agents),
        agents,
        at: state.clock().now(),
    })
}

/// The city map: zones, rooms with coordinates, and in each room its agents with their presence.
#[utoipa::path(get, path = "/api/v1/city/map", tag = "city",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = CityMap), (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem)))]
pub(super) async fn get_map(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<CityMap>> {
    Ok(Json(build_map(&state, actor.current_org()?).await?))
}

/// The city map (the original path; the same as `/api/v1/city/map`).
#[utoipa::path(get, path = "/city/map", tag = "city",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = CityMap), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn get_map_alias(state: State<AppState>, actor: Actor) -> ApiResult<Json<CityMap>> {
    get_map(state, actor).await
}

/// Every active agent of the organization, with room, node and presence.
#[utoipa::path(get, path = "/api/v1/city/agents", tag = "city",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = AgentList), (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem)))]
pub(super) async fn list_city_agents(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<AgentList>> {
    let agents = city_agents(&state, actor.current_org()?).await?;
    Ok(Json(AgentList { online_count: online(&agents), agents }))
}

/// The agents (the original path; the same as `/api/v1/city/agents`).
#[utoipa::path(get, path = "/city/agents", tag = "city",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = AgentList), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn list_city_agents_alias(state: State<AppState>, actor: Actor) -> ApiResult<Json<AgentList>> {
    list_city_agents(state, actor).await
}

/// The agents whose presence is live.
#[utoipa::path(get, path = "/api/v1/city/agents/online", tag = "city",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = AgentList), (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem)))]
pub(super) async fn list_online(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<AgentList>> {
    let mut agents = city_agents(&state, actor.current_org()?).await?;
    agents.retain(|a| a.status != "offline");
    Ok(Json(AgentList { online_count: agents.len(), agents }))
}

/// The online agents (the original path; the same as `/api/v1/city/agents/online`).
#[utoipa::path(get, path = "/city/agents/online", tag = "city",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = AgentList), (status = 401, body = Problem), (status = 403, body = Problem)))]
pub(super) async fn list_online_alias(state: State<AppState>, actor: Actor) -> ApiResult<Json<AgentList>> {
    list_online(state, actor).await
}

/// The presence snapshot: rooms with who is in them, every agent with its presence.
#[utoipa::path(get, path = "/api/v1/city/presence", tag = "city",
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, body = Snapshot), (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem)))]
pub(super) async fn get_snapshot(State(state): State<AppState>, actor: Actor) -> ApiResult<Json<Snapshot>> {
    Ok(Json(build_snapshot(&state, actor.current_org()?).await?))
}

/// A presence report.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub status: Status,
    /// What the agent is doing, in a few words.
    #[validate(length(max = 200), custom(function = "validate_activity"))]
    pub activity: Option<String>,
}

fn validate_activity(s: &str) -> Result<(), validator::ValidationError> {
    if s.chars().any(char::is_control) {
        return Err(validator::ValidationError::new("text").with_message("no control characters".into()));
    }
    Ok(())
}

/// What a report did.
#[derive(Debug, Serialize, ToSchema)]
pub struct Reported {
    pub status: Status,
    /// Report again within this many seconds, or be offline.
    pub ttl_secs: u64,
}

/// An agent reports its own presence (with its own access token): `online`, `busy` or `idle`.
/// Unrenewed for `city.presence_ttl_secs`, it is offline.
#[utoipa::path(post, path = "/api/v1/city/presence", tag = "city", request_body = Report,
    security(("bearer" = [])),
    responses((status = 200, body = Reported), (status = 401, body = Problem), (status = 403, body = Problem),
              (status = 422, body = Problem), (status = 429, description = "Reporting too often", body = Problem),
              (status = 503, body = Problem)))]
pub(super) async fn report(
    State(state): State<AppState>,
    actor: Actor,
    ValidatedJson(req): ValidatedJson<Report>,
) -> ApiResult<Json<Reported>> {
    let org_id = actor.current_org()?;
    if actor.actor_type != ActorType::Agent {
        return Err(ApiError::forbidden("agent_self", "Only an agent reports its presence, with its own token."));
    }
    let agent_id = actor.user_id();
    let cfg = &state.config().city;
    if !state.city().presences.admit(agent_id, cfg.presence_reports_per_sec) {
        return Err(ApiError::TooManyRequests {
            code: "presence_rate_limited",
            detail: format!("At most {} presence reports per second.", cfg.presence_reports_per_sec).into(),
            retry_after: 1,
        });
    }
    let activity = req.activity.as_deref().map(str::trim).filter(|a| !a.is_empty());
    let outcome = presence::report(&state, org_id, agent_id, req.status, activity).await.map_err(|e| {
        tracing::warn!(error = %e, "presence report failed");
        ApiError::Unavailable("presence store".into())
    })?;
    if outcome.last_seen_due {
        sqlx::query!(
            "insert into agent_placement (agent_id, organization_id, last_seen_at) values ($1, $2, now())
             on conflict (agent_id) do update set last_seen_at = now()",
            agent_id,
            org_id
        )
        .execute(state.db())
        .await?;
    }
    Ok(Json(Reported { status: req.status, ttl_secs: cfg.presence_ttl_secs }))
}

/// How long a snapshot may be handed to further viewers while no change has happened (presence
/// lapses are changes too, but are announced by a sweep that may lag by `sweep_interval_ms`).
const SNAPSHOT_REUSE: std::time::Duration = std::time::Duration::from_millis(500);

/// The latest snapshot of each organization with viewers connecting, shared by viewers that
/// connect while it is current.
pub struct Snapshots {
    slots: crate::cache::Cache<Uuid, Arc<SnapshotSlot>>,
}

type SnapshotSlot = tokio::sync::Mutex<Option<(StreamId, std::time::Instant, Arc<str>)>>;

impl Default for Snapshots {
    fn default() -> Self {
        Self::new()
    }
}

impl Snapshots {
    pub fn new() -> Self {
        Self { slots: crate::cache::Cache::new(100_000, std::time::Duration::from_secs(60)) }
    }

    fn slot(&self, org_id: Uuid) -> Arc<SnapshotSlot> {
        self.slots.get_or_insert_with(org_id, Arc::default)
    }
}

/// One viewer's stream: its receiver of live changes, what it still has to send, and the id of
/// the last change it sent (so that live changes already replayed are not sent twice).
struct Viewer {
    state: AppState,
    org_id: Uuid,
    rx: broadcast::Receiver<Arc<Change>>,
    pending: std::collections::VecDeque<Event>,
    last: StreamId,
}

fn change_event(c: &Change) -> Event {
    Event::default().id(c.id.to_string()).event(&c.kind).data(&c.data)
}

impl Viewer {
    /// A snapshot, its id the latest change it includes. Viewers of one organization connecting
    /// at once (a reconnect storm after a restart) share one: it is built once per change id.
    async fn snapshot(&mut self) -> ApiResult<()> {
        let slot = self.state.city().snapshots.slot(self.org_id);
        let mut shared = slot.lock().await;
        let last = feed::last_id(self.state.redis(), self.org_id)
            .await
            .map_err(|_| ApiError::Unavailable("presence store".into()))?;
        let data = match &*shared {
            Some((id, built, data)) if *id == last && built.elapsed() < SNAPSHOT_REUSE => data.clone(),
            _ => {
                let snap = build_snapshot(&self.state, self.org_id).await?;
                let data: Arc<str> = serde_json::to_string(&snap).map_err(anyhow::Error::from)?.into();
                *shared = Some((last, std::time::Instant::now(), data.clone()));
                data
            }
        };
        drop(shared);
        self.pending.push_back(Event::default().id(last.to_string()).event("snapshot").data(&*data));
        self.last = last;
        Ok(())
    }

    /// Everything after the last change sent, from the log (or a snapshot if the log no longer
    /// reaches back that far).
    async fn catch_up(&mut self) -> ApiResult<()> {
        match feed::since(self.state.redis(), self.org_id, self.last).await {
            Ok(Some(changes)) => {
                for c in changes {
                    if c.id > self.last {
                        self.last = c.id;
                        self.pending.push_back(change_event(&c));
                    }
                }
                Ok(())
            }
            Ok(None) => self.snapshot().await,
            Err(_) => Err(ApiError::Unavailable("presence store".into())),
        }
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some((Ok(e), self));
            }
            match self.rx.recv().await {
                Ok(c) if c.catch_up => {
                    if self.catch_up().await.is_err() {
                        return None;
                    }
                }
                Ok(c) => {
                    if c.id > self.last {
                        self.last = c.id;
                        return Some((Ok(change_event(&c)), self));
                    }
                }
                Err(RecvError::Lagged(_)) => {
                    if self.catch_up().await.is_err() {
                        return None;
                    }
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

/// The live presence stream (Server-Sent Events): first a `snapshot` event (the presence
/// snapshot), then each change as it happens on any instance: `presence` (an agent's status
/// changed, `offline` included), `moved` (an agent changed rooms), `node` (a node became active
/// or stale). Every event has an `id`; reconnect with `Last-Event-ID` to receive what was missed
/// (from a bounded window; further back, a fresh snapshot comes instead).
#[utoipa::path(get, path = "/api/v1/city/presence/stream", tag = "city",
    params(("Last-Event-ID" = Option<String>, Header, description = "The id of the last event received")),
    security(("bearer" = []), ("api_key" = []), ("session_cookie" = [])),
    responses((status = 200, description = "An event stream", content_type = "text/event-stream", body = String),
              (status = 401, body = Problem), (status = 403, body = Problem), (status = 503, body = Problem)))]
pub(super) async fn stream(
    State(state): State<AppState>,
    actor: Actor,
    headers: HeaderMap,
) -> ApiResult<(StatusCode, Sse<impl Stream<Item = Result<Event, Infallible>>>)> {
    let org_id = actor.current_org()?;
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(StreamId::parse);
    // Subscribed before reading, so that nothing published meanwhile is missed.
    let rx = state.city().hub.subscribe(org_id);
    let mut viewer =
        Viewer { state: state.clone(), org_id, rx, pending: Default::default(), last: StreamId::default() };
    match resume {
        Some(id) => {
            viewer.last = id;
            viewer.catch_up().await?;
        }
        None => viewer.snapshot().await?,
    }
    let events = futures_util::stream::unfold(viewer, Viewer::next);
    Ok((StatusCode::OK, Sse::new(events).keep_alive(KeepAlive::default())))
}
