//! The city: how an organization sees its agent population at a glance.
//!
//! - [`map`]: zones and rooms on an integer grid (rooms never overlap within a zone).
//! - [`placement`]: an agent in at most one room (capacity enforced) and on at most one node.
//! - [`presence`]: what agents report, in Redis with a time to live; lapses become `offline`.
//! - [`feed`]: every change in a bounded per-organization replay log plus pub/sub, so viewers on
//!   any instance see it live and resume with `Last-Event-ID`.
//! - [`views`]: the map, the agent lists, the snapshot and the SSE stream.
//! - [`nodes`]: machines with node credentials and heartbeats; `node.active` / `node.stale`.
//! - [`guardian`]: the `agentidp node-guardian` command that sends a machine's heartbeats.

pub mod feed;
pub mod guardian;
mod map;
pub mod nodes;
mod placement;
pub mod presence;
pub mod views;

use std::time::Duration;

use utoipa_axum::{router::OpenApiRouter, routes};
use uuid::Uuid;

use crate::state::AppState;

/// The city's in-process state: this instance's viewers and the presence scripts.
pub struct City {
    pub hub: feed::Hub,
    pub presences: presence::Presences,
    pub snapshots: views::Snapshots,
}

impl City {
    pub fn new(cfg: &crate::config::CityConfig) -> Self {
        Self {
            hub: feed::Hub::new(cfg.viewer_buffer),
            presences: presence::Presences::new(cfg),
            snapshots: views::Snapshots::new(),
        }
    }
}

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(map::list_zones, map::create_zone))
        .routes(routes!(map::get_zone, map::update_zone, map::delete_zone))
        .routes(routes!(map::list_rooms, map::create_room))
        .routes(routes!(map::get_room, map::update_room, map::delete_room))
        .routes(routes!(placement::place_in_room, placement::unplace_from_room))
        .routes(routes!(placement::place_on_node, placement::unplace_from_node))
        .routes(routes!(views::get_map))
        .routes(routes!(views::get_map_alias))
        .routes(routes!(views::list_city_agents))
        .routes(routes!(views::list_city_agents_alias))
        .routes(routes!(views::list_online))
        .routes(routes!(views::list_online_alias))
        .routes(routes!(views::get_snapshot, views::report))
        .routes(routes!(views::stream))
        .routes(routes!(nodes::list_nodes, nodes::create_node))
        .routes(routes!(nodes::get_node, nodes::update_node, nodes::delete_node))
        .routes(routes!(nodes::rotate_node_credential))
        .routes(routes!(nodes::heartbeat))
}

/// A suspended or deleted agent leaves presence at once, on every viewer.
pub async fn forget_agent(state: &AppState, org_id: Uuid, agent_id: Uuid, reason: &str) {
    presence::forget(state, org_id, agent_id, reason).await;
}

/// The city's background work on this instance: the change subscriber for its viewers, and the
/// sweeper that announces lapsed presences and stale nodes (any number of instances may sweep;
/// each change is announced once).
pub fn spawn(state: &AppState) -> tokio::task::JoinHandle<()> {
    let subscriber = tokio::spawn(feed::run_subscriber(state.clone()));
    let state = state.clone();
    tokio::spawn(async move {
        let _subscriber = AbortOnDrop(subscriber);
        let mut tick = tokio::time::interval(Duration::from_millis(state.config().city.sweep_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = presence::sweep(&state, 1000).await {
                state.redis().drop_multiplexed();
                tracing::debug!(error = %e, "presence sweep failed");
            }
            if let Err(e) = nodes::sweep_stale(&state).await {
                tracing::debug!(error = %e, "node sweep failed");
            }
        }
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
