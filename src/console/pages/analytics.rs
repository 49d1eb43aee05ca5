//! Usage and analytics: tokens and cost over time, by model; tool calls with their success rate;
//! the top agents; the agent-activity heatmap; the token-issuance trend; budgets and what is
//! left. Every chart is SVG drawn here from the API's answers for the chosen period.

use std::collections::HashMap;

use askama::Template;
use axum::{extract::Query, response::Response};
use serde::Deserialize;
use serde_json::Value;
use time::{Duration, OffsetDateTime, format_description::well_known::Rfc3339};

use super::{dollars, float, int, items, text};
use crate::console::{
    Shell, Viewer,
    api::with_query,
    charts::{self, Bars, Heatmap, MultiSeries, Series},
    render,
};

pub struct Period {
    pub key: &'static str,
    pub label: &'static str,
}

pub const PERIODS: [Period; 3] = [
    Period { key: "24h", label: "Last 24 hours" },
    Period { key: "7d", label: "Last 7 days" },
    Period { key: "30d", label: "Last 30 days" },
];

pub struct BudgetRow {
    pub scope: String,
    pub tokens_used: i64,
    pub token_limit: Option<i64>,
    pub tokens_remaining: String,
    pub cost_used: String,
    pub cost_limit_micros: Option<i64>,
    pub cost_used_micros: i64,
    pub cost_remaining: String,
    pub exceeded: bool,
    pub threshold_reached: bool,
}

#[derive(Template)]
#[template(path = "console/analytics.html")]
pub struct AnalyticsPage {
    pub shell: Shell,
    pub period: &'static str,
    pub periods: &'static [Period],
    pub since: String,
    pub until: String,
    pub group_by: &'static str,
    pub tokens: Series,
    pub cost: Series,
    pub models: Bars,
    pub model_tokens: MultiSeries,
    pub model_cost: MultiSeries,
    pub tools: Bars,
    pub agents: Bars,
    pub heatmap: Heatmap,
    pub trend: Series,
    pub total_tokens: i64,
    pub total_cost: String,
    pub llm_calls: i64,
    pub tool_calls: i64,
    pub tool_success: String,
    pub budgets: Vec<BudgetRow>,
    pub budgets_allowed: bool,
    pub problem: Option<crate::console::api::Failure>,
}

#[derive(Deserialize, Default)]
pub struct PeriodQuery {
    period: Option<String>,
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Where `period` falls between `since` and `until`, 0 to 1.
fn position(period: &str, since: OffsetDateTime, until: OffsetDateTime) -> f64 {
    let Ok(at) = OffsetDateTime::parse(period, &Rfc3339) else { return 0.0 };
    let span = (until - since).as_seconds_f64().max(1.0);
    (at - since).as_seconds_f64() / span
}

/// `GET /console/analytics?period=24h|7d|30d`.
pub async fn show(viewer: Viewer, Query(q): Query<PeriodQuery>) -> Response {
    let (period, span, group_by) = match q.period.as_deref() {
        Some("7d") => ("7d", Duration::days(7), "day"),
        Some("30d") => ("30d", Duration::days(30), "day"),
        _ => ("24h", Duration::hours(24), "hour"),
    };
    // Whole hours, as the API rounds them: the chart's range is exactly the API's.
    let now = viewer.state.clock().now();
    let until =
        now.replace_minute(0).and_then(|t| t.replace_second(0)).and_then(|t| t.replace_nanosecond(0)).unwrap_or(now)
            + Duration::hours(1);
    let since = until - span;
    let (since_s, until_s) = (rfc3339(since), rfc3339(until));
    let range = [("since", since_s.as_str()), ("until", until_s.as_str()), ("group_by", group_by)];
    let api = &viewer.api;
    let caller = &viewer.caller;
    let summary_path = with_query("/api/v1/usage/summary", &range);
    let trend_path = with_query("/api/v1/analytics/token-trend", &range);
    let activity_path = with_query("/api/v1/analytics/agent-activity", &range[..2]);
    let models_path = with_query("/api/v1/usage/models", &range);
    let (summary, per_model, trend, activity, entitlements, agents) = tokio::join!(
        api.get(caller, &summary_path),
        api.get(caller, &models_path),
        api.get(caller, &trend_path),
        api.get(caller, &activity_path),
        api.get(caller, "/api/v1/usage/entitlements"),
        api.get(caller, "/api/v1/agents?limit=200"),
    );
    // The usage API answers owners and admins; anyone else sees its refusal, not a blank page.
    let problem = summary.as_ref().err().cloned();
    let summary = summary.unwrap_or(Value::Null);
    let trend = trend.unwrap_or(Value::Null);
    let activity = activity.unwrap_or(Value::Null);
    let names: HashMap<String, String> = agents
        .as_ref()
        .map(|a| items(a, "items").iter().map(|x| (text(x, "id"), text(x, "name"))).collect())
        .unwrap_or_default();

    let series = items(&summary, "series");
    let points = |key: &str| -> Vec<(String, f64, i64)> {
        series.iter().map(|p| (text(p, "period"), position(&text(p, "period"), since, until), int(p, key))).collect()
    };
    // Five labels along the time axis, in UTC (the titles of the points carry exact times).
    let label = if group_by == "hour" {
        time::macros::format_description!("[month]-[day] [hour]:00")
    } else {
        time::macros::format_description!("[month]-[day]")
    };
    let ticks: Vec<(f64, String)> = (0..=4i32)
        .map(|k| {
            let at: OffsetDateTime = since + (span * k) / 4;
            (f64::from(k) / 4.0, at.format(label).unwrap_or_default())
        })
        .collect();
    let tokens = charts::series(&points("total_tokens"), |v| v.to_string(), &ticks);
    let cost = charts::series(&points("cost_micros"), dollars, &ticks);

    // Tokens and cost over time, a line per model (the models with the most tokens first).
    let mut per_model: Vec<(String, Vec<&Value>)> = per_model
        .as_ref()
        .map(|m| items(m, "series").iter().map(|s| (text(s, "model"), items(s, "points").iter().collect())).collect())
        .unwrap_or_default();
    per_model.sort_by_key(|(_, pts)| -pts.iter().map(|p| int(p, "total_tokens")).sum::<i64>());
    let model_points = |key: &str| -> Vec<charts::NamedSeries> {
        per_model
            .iter()
            .map(|(model, pts)| {
                let line = pts
                    .iter()
                    .map(|p| (text(p, "period"), position(&text(p, "period"), since, until), int(p, key)))
                    .collect();
                (model.clone(), line)
            })
            .collect()
    };
    let model_tokens = charts::multi(&model_points("total_tokens"), |v| v.to_string(), &ticks);
    let model_cost = charts::multi(&model_points("cost_micros"), dollars, &ticks);

    let mut by_model: Vec<&Value> = items(&summary, "by_model").iter().collect();
    by_model.sort_by_key(|m| -int(m, "total_tokens"));
    let models = charts::bars(
        by_model
            .iter()
            .map(|m| {
                let label = format!("{} tokens · {}", int(m, "total_tokens"), dollars(int(m, "cost_micros")));
                (text(m, "model"), int(m, "total_tokens"), 0, label)
            })
            .collect(),
    );
    let mut by_tool: Vec<&Value> = items(&summary, "by_tool").iter().collect();
    by_tool.sort_by_key(|t| -int(t, "calls"));
    let tools = charts::bars(
        by_tool
            .iter()
            .map(|t| {
                let rate = float(t, "success_rate").map(|r| format!("{:.0}% ok", r * 100.0)).unwrap_or_default();
                (text(t, "tool"), int(t, "calls"), int(t, "failures"), format!("{} calls · {rate}", int(t, "calls")))
            })
            .collect(),
    );
    let mut by_agent: Vec<&Value> = items(&summary, "by_agent").iter().collect();
    by_agent.sort_by_key(|a| -int(a, "total_tokens"));
    let agents = charts::bars(
        by_agent
            .iter()
            .take(10)
            .map(|a| {
                let id = text(a, "agent_id");
                let name = if id.is_empty() {
                    "(no agent)".to_owned()
                } else {
                    names.get(&id).cloned().unwrap_or_else(|| id.chars().take(8).collect())
                };
                let label = format!("{} tokens · {}", int(a, "total_tokens"), dollars(int(a, "cost_micros")));
                (name, int(a, "total_tokens"), 0, label)
            })
            .collect(),
    );
    let cells: Vec<(i64, i64, i64)> =
        items(&activity, "").iter().map(|c| (int(c, "day_of_week"), int(c, "hour"), int(c, "requests"))).collect();
    let trend_points: Vec<(String, f64, i64)> = items(&trend, "")
        .iter()
        .map(|p| (text(p, "period"), position(&text(p, "period"), since, until), int(p, "tokens")))
        .collect();

    let llm = summary.get("llm").cloned().unwrap_or(Value::Null);
    let tool_totals = summary.get("tools").cloned().unwrap_or(Value::Null);
    let (budgets, budgets_allowed) = match &entitlements {
        Ok(e) => (
            items(e, "budgets")
                .iter()
                .map(|b| BudgetRow {
                    scope: text(b, "scope"),
                    tokens_used: int(b, "tokens_used"),
                    token_limit: b.get("token_limit").and_then(Value::as_i64),
                    tokens_remaining: b
                        .get("tokens_remaining")
                        .and_then(Value::as_i64)
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "no limit".into()),
                    cost_used: dollars(int(b, "cost_used_micros")),
                    cost_used_micros: int(b, "cost_used_micros"),
                    cost_limit_micros: b.get("cost_limit_micros").and_then(Value::as_i64),
                    cost_remaining: b
                        .get("cost_remaining_micros")
                        .and_then(Value::as_i64)
                        .map(dollars)
                        .unwrap_or_else(|| "no limit".into()),
                    exceeded: b.get("exceeded").and_then(Value::as_bool).unwrap_or(false),
                    threshold_reached: b.get("threshold_reached").and_then(Value::as_bool).unwrap_or(false),
                })
                .collect(),
            e.get("allowed").and_then(Value::as_bool).unwrap_or(true),
        ),
        Err(_) => (Vec::new(), true),
    };
    render(AnalyticsPage {
        shell: viewer.shell("Usage and analytics", "analytics"),
        period,
        periods: &PERIODS,
        since: since_s,
        until: until_s,
        group_by,
        tokens,
        cost,
        models,
        model_tokens,
        model_cost,
        tools,
        agents,
        heatmap: charts::heatmap(&cells),
        trend: charts::series(&trend_points, |v| v.to_string(), &ticks),
        total_tokens: int(&llm, "total_tokens"),
        total_cost: dollars(int(&llm, "cost_micros")),
        llm_calls: int(&llm, "calls"),
        tool_calls: int(&tool_totals, "calls"),
        tool_success: float(&tool_totals, "success_rate")
            .map(|r| format!("{:.0}%", r * 100.0))
            .unwrap_or_else(|| "–".into()),
        budgets,
        budgets_allowed,
        problem,
    })
}
