//! The city: the map drawn as SVG from `GET /api/v1/city/map` (zones coloured, rooms as tiles at
//! their coordinates, agents as badges in their presence colour; a room's agents one click away),
//! the same agents as a list, and the nodes with their status, metrics and models. The page's
//! script follows `GET /api/v1/city/presence/stream` and redraws from `/console/city/live`.

use askama::Template;
use axum::{extract::Query, response::Response};
use serde::Deserialize;
use serde_json::Value;

use super::{bytes, float, int, items, opt_text, text};
use crate::console::{Shell, Viewer, render};

/// Grid cell size in SVG units.
const CELL: i64 = 40;
/// Room for a zone's name above its rooms.
const ZONE_HEADER: i64 = 28;
const ZONE_GAP: i64 = 24;
const BADGE_STEP: i64 = 16;

pub struct Badge {
    pub id: String,
    pub name: String,
    pub status: String,
    pub cx: i64,
    pub cy: i64,
}

pub struct RoomTile {
    pub id: String,
    pub name: String,
    pub kind: String,
    pub capacity: i64,
    pub x: i64,
    pub y: i64,
    pub w: i64,
    pub h: i64,
    pub badges: Vec<Badge>,
    /// Agents that did not fit on the tile.
    pub more: usize,
    pub agents: Vec<CityAgentView>,
}

pub struct ZoneTile {
    pub name: String,
    pub colour: usize,
    pub x: i64,
    pub y: i64,
    pub w: i64,
    pub h: i64,
    pub rooms: Vec<RoomTile>,
}

pub struct CityAgentView {
    pub id: String,
    pub name: String,
    pub status: String,
    pub activity: String,
    pub room: String,
    pub reported_at: String,
}

pub struct NodeView {
    pub id: String,
    pub name: String,
    pub hostname: String,
    pub status: String,
    pub last_heartbeat_at: String,
    pub cpu: String,
    pub memory: String,
    pub models: String,
    pub agents: usize,
}

/// Everything the live part of the page draws.
pub struct CityView {
    pub zones: Vec<ZoneTile>,
    pub width: i64,
    pub height: i64,
    /// The size it is drawn at: larger than its units, within a wide screen.
    pub display_width: i64,
    pub display_height: i64,
    pub agents: Vec<CityAgentView>,
    pub unplaced: Vec<CityAgentView>,
    pub online: i64,
    pub at: String,
    pub nodes: Vec<NodeView>,
    pub nodes_visible: bool,
}

fn agent_view(a: &Value, room: &str) -> CityAgentView {
    CityAgentView {
        id: text(a, "id"),
        name: text(a, "name"),
        status: text(a, "status"),
        activity: text(a, "activity"),
        room: room.to_owned(),
        reported_at: opt_text(a, "reported_at").or_else(|| opt_text(a, "last_seen_at")).unwrap_or_default(),
    }
}

/// Lays the map out: zones side by side, each as wide and tall as its rooms reach; rooms at
/// their grid coordinates inside their zone; badges in rows inside each room.
fn layout(map: &Value) -> (Vec<ZoneTile>, i64, i64, Vec<CityAgentView>) {
    let mut zones = Vec::new();
    let mut agents = Vec::new();
    let mut left = 0;
    let mut height = 0;
    for (i, z) in items(map, "zones").iter().enumerate() {
        let rooms_json = items(z, "rooms");
        let cols = rooms_json.iter().map(|r| int(r, "x") + int(r, "width")).max().unwrap_or(0).max(3);
        let rows = rooms_json.iter().map(|r| int(r, "y") + int(r, "height")).max().unwrap_or(0).max(2);
        let (zx, zy, zw, zh) = (left, 0, cols * CELL + 16, rows * CELL + ZONE_HEADER + 16);
        let mut rooms = Vec::new();
        for r in rooms_json {
            let (x, y) = (zx + 8 + int(r, "x") * CELL, zy + ZONE_HEADER + 8 + int(r, "y") * CELL);
            let (w, h) = (int(r, "width").max(1) * CELL - 4, int(r, "height").max(1) * CELL - 4);
            let name = text(r, "name");
            let per_row = ((w - 8) / BADGE_STEP).max(1);
            let fit_rows = ((h - 26) / BADGE_STEP).max(1);
            let mut badges = Vec::new();
            let mut room_agents = Vec::new();
            let list = items(r, "agents");
            for (k, a) in list.iter().enumerate() {
                let k = k as i64;
                if k < per_row * fit_rows {
                    badges.push(Badge {
                        id: text(a, "id"),
                        name: text(a, "name"),
                        status: text(a, "status"),
                        cx: x + 10 + (k % per_row) * BADGE_STEP,
                        cy: y + 28 + (k / per_row) * BADGE_STEP,
                    });
                }
                room_agents.push(agent_view(a, &name));
                agents.push(agent_view(a, &name));
            }
            rooms.push(RoomTile {
                id: text(r, "id"),
                kind: text(r, "kind"),
                capacity: int(r, "capacity"),
                more: list.len().saturating_sub(badges.len()),
                name,
                x,
                y,
                w,
                h,
                badges,
                agents: room_agents,
            });
        }
        zones.push(ZoneTile { name: text(z, "name"), colour: i % 6, x: zx, y: zy, w: zw, h: zh, rooms });
        left += zw + ZONE_GAP;
        height = height.max(zh);
    }
    (zones, (left - ZONE_GAP).max(CELL * 4), height.max(CELL * 2), agents)
}

async fn city_view(viewer: &Viewer) -> Result<CityView, crate::console::api::Failure> {
    let map = viewer.api.get(&viewer.caller, "/api/v1/city/map").await?;
    // Nodes are read with `nodes:read`; a viewer who may not read them sees the map alone.
    let nodes = viewer.api.get(&viewer.caller, "/api/v1/nodes").await.ok();
    let (zones, width, height, mut agents) = layout(&map);
    let unplaced: Vec<CityAgentView> = items(&map, "unplaced").iter().map(|a| agent_view(a, "")).collect();
    agents.extend(unplaced.iter().map(|a| CityAgentView {
        id: a.id.clone(),
        name: a.name.clone(),
        status: a.status.clone(),
        activity: a.activity.clone(),
        room: String::new(),
        reported_at: a.reported_at.clone(),
    }));
    agents.sort_by_key(|a| a.name.to_lowercase());
    let nodes_visible = nodes.is_some();
    let nodes = nodes
        .as_ref()
        .map(|n| items(n, ""))
        .unwrap_or(&[])
        .iter()
        .map(|n| {
            let m = n.get("metrics").filter(|m| !m.is_null());
            NodeView {
                id: text(n, "id"),
                name: text(n, "name"),
                hostname: text(n, "hostname"),
                status: text(n, "status"),
                last_heartbeat_at: text(n, "last_heartbeat_at"),
                cpu: m.and_then(|m| float(m, "cpu_percent")).map(|c| format!("{c:.0}%")).unwrap_or_default(),
                memory: m
                    .map(|m| {
                        format!("{} / {}", bytes(int(m, "memory_used_bytes")), bytes(int(m, "memory_total_bytes")))
                    })
                    .unwrap_or_default(),
                models: items(n, "models")
                    .iter()
                    .map(|x| {
                        if x.get("loaded").and_then(Value::as_bool).unwrap_or(false) {
                            text(x, "name")
                        } else {
                            format!("{} (not loaded)", text(x, "name"))
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                agents: items(n, "agents").len(),
            }
        })
        .collect();
    let display_width = (width * 2).min(1180);
    Ok(CityView {
        zones,
        width,
        height,
        display_width,
        display_height: height * display_width / width.max(1),
        agents,
        unplaced,
        online: int(&map, "online_count"),
        at: text(&map, "at"),
        nodes,
        nodes_visible,
    })
}

#[derive(Template)]
#[template(path = "console/city.html")]
pub struct CityPage {
    pub shell: Shell,
    pub data: CityView,
    pub list: bool,
}

#[derive(Template)]
#[template(path = "console/city_live.html")]
pub struct CityLive {
    pub data: CityView,
    pub list: bool,
}

#[derive(Deserialize, Default)]
pub struct CityQuery {
    view: Option<String>,
}

/// `GET /console/city` (`?view=list` for the list).
pub async fn show(viewer: Viewer, Query(q): Query<CityQuery>) -> Response {
    match city_view(&viewer).await {
        Ok(data) => {
            render(CityPage { shell: viewer.shell("City", "city"), data, list: q.view.as_deref() == Some("list") })
        }
        Err(e) => viewer.failed(e, "city"),
    }
}

/// `GET /console/city/live`: the live part alone, for the page's script to swap in.
pub async fn live(viewer: Viewer, Query(q): Query<CityQuery>) -> Response {
    match city_view(&viewer).await {
        Ok(data) => render(CityLive { data, list: q.view.as_deref() == Some("list") }),
        Err(e) => viewer.failed(e, "city"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn rooms_sit_at_their_grid_cells_and_badges_stay_inside() {
        let agents: Vec<Value> = (0..40)
            .map(|i| json!({ "id": format!("a{i}"), "name": format!("agent {i}"), "status": "online" }))
            .collect();
        let map = json!({ "zones": [
            { "name": "North", "rooms": [
                { "id": "r1", "name": "Lab", "x": 0, "y": 0, "width": 2, "height": 1, "agents": agents },
                { "id": "r2", "name": "Hall", "x": 3, "y": 2, "width": 1, "height": 1, "agents": [] } ] },
            { "name": "South", "rooms": [] } ] });
        let (zones, width, _, listed) = layout(&map);
        assert_eq!(zones.len(), 2);
        let lab = &zones[0].rooms[0];
        let hall = &zones[0].rooms[1];
        assert_eq!(hall.x - lab.x, 3 * CELL);
        assert_eq!(hall.y - lab.y, 2 * CELL);
        assert!(lab.badges.iter().all(|b| b.cx < lab.x + lab.w && b.cy < lab.y + lab.h));
        assert_eq!(lab.badges.len() + lab.more, 40);
        assert!(lab.more > 0);
        assert_eq!(listed.len(), 40);
        assert!(zones[1].x > zones[0].x + zones[0].w - 1);
        assert!(width >= zones[1].x + zones[1].w);
    }
}
