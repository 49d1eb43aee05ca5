//! Usage events as they arrive (a plain JSON body or a CloudEvent), parsed into [`UsageEvent`]
//! with every field checked: a bad field is a [`Rejection`] naming it, never a panic or a guess.

use serde_json::{Map, Value};
use time::OffsetDateTime;
use uuid::Uuid;

/// The largest count (tokens, lengths, durations) accepted: 2^53, what every JSON reader still
/// represents exactly.
pub const MAX_COUNT: u64 = 1 << 53;

/// What an event counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Llm,
    Tool,
    Agent,
    Message,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Llm, Kind::Tool, Kind::Agent, Kind::Message];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llm => "llm",
            Self::Tool => "tool",
            Self::Agent => "agent",
            Self::Message => "message",
        }
    }

    /// The NATS subject (and CloudEvents `type`) of this kind.
    pub fn subject(self) -> &'static str {
        match self {
            Self::Llm => "usage.llm",
            Self::Tool => "usage.tool",
            Self::Agent => "usage.agent",
            Self::Message => "messaging.message.created",
        }
    }

    /// A kind by its short name or its subject/CloudEvents type.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "llm" | "usage.llm" => Some(Self::Llm),
            "tool" | "usage.tool" => Some(Self::Tool),
            "agent" | "usage.agent" => Some(Self::Agent),
            "message" | "usage.message" | "messaging.message.created" => Some(Self::Message),
            _ => None,
        }
    }
}

/// One event, parsed and checked; the organization is resolved by the caller (the body's, or the
/// credential's over HTTP).
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    pub org_id: Uuid,
    pub event_id: String,
    pub kind: Kind,
    pub occurred_at: OffsetDateTime,
    pub actor_id: String,
    pub actor_type: String,
    pub agent_id: Option<Uuid>,
    pub delegation_id: Option<Uuid>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub total_tokens: Option<i64>,
    pub latency_ms: Option<i64>,
    pub success: Option<bool>,
    pub error: Option<String>,
    pub tool_id: Option<String>,
    pub tool_name: Option<String>,
    pub invocations: Option<i64>,
    pub llm_calls: Option<i64>,
    pub tool_calls: Option<i64>,
    pub duration_ms: Option<i64>,
    pub channel_id: Option<String>,
    pub message_length: Option<i64>,
    pub sender: Option<String>,
    /// Set at ingest from the prices in force.
    pub cost_micros: i64,
}

impl UsageEvent {
    /// The tokens a budget counts.
    pub fn tokens(&self) -> i64 {
        self.total_tokens.unwrap_or(0)
    }
}

/// Why an event was not counted: a stable code and a human reason naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub code: &'static str,
    pub reason: String,
}

impl Rejection {
    pub fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Self { code, reason: reason.into() }
    }
    fn field(name: &str, what: &str) -> Self {
        Self::new("invalid_field", format!("{name}: {what}"))
    }
}

/// An event parsed as far as it goes without the database: the organization it names (if any)
/// and its id, known even when it is rejected, so that a rejection can say which event it was.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub org_id: Option<Uuid>,
    pub event_id: Option<String>,
    pub result: Result<UsageEvent, Rejection>,
}

/// The limits parsing checks against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub now: OffsetDateTime,
    pub max_past: time::Duration,
    pub max_future: time::Duration,
}

/// Parses one event: a plain body (`kind` or `type` naming its kind, unless `hint` does) or a
/// CloudEvent (`specversion`, `id`, `type` = `usage.llm` etc., `time`, `data`). The organization
/// is `org_id` (or `microdao_id`); when absent, `default_org`.
pub fn parse(value: &Value, hint: Option<Kind>, default_org: Option<Uuid>, limits: &Limits) -> Parsed {
    let Some(outer) = value.as_object() else {
        return Parsed {
            org_id: default_org,
            event_id: None,
            result: Err(Rejection::new("invalid_event", "an event is a JSON object")),
        };
    };
    // A CloudEvent carries the fields in `data`, its id and time outside.
    let (body, ce_kind, ce_id, ce_time, ce_org) = if outer.contains_key("specversion") {
        let data = match outer.get("data") {
            Some(Value::Object(d)) => d,
            _ => {
                return Parsed {
                    org_id: default_org,
                    event_id: outer.get("id").and_then(Value::as_str).map(short),
                    result: Err(Rejection::field("data", "a CloudEvent's data must be a JSON object")),
                };
            }
        };
        (
            data,
            outer.get("type"),
            outer.get("id"),
            outer.get("time"),
            outer.get("orgid").or_else(|| outer.get("microdao_id")),
        )
    } else {
        (outer, outer.get("kind").or_else(|| outer.get("type")), None, None, None)
    };
    let event_id_value = body.get("event_id").or(ce_id);
    let event_id = event_id_value.and_then(Value::as_str).map(short);
    let org_value = body.get("org_id").or_else(|| body.get("microdao_id")).or(ce_org);
    let org_id = match org_value {
        None | Some(Value::Null) => Ok(default_org),
        Some(Value::String(s)) => s.parse::<Uuid>().map(Some).map_err(|_| Rejection::field("org_id", "must be a UUID")),
        Some(_) => Err(Rejection::field("org_id", "must be a UUID")),
    };
    let parsed_org = org_id.clone().ok().flatten();
    let result = org_id.and_then(|org| {
        let org = org.ok_or_else(|| Rejection::new("org_required", "org_id (or microdao_id) is required"))?;
        let kind = match (ce_kind, hint) {
            (Some(Value::String(k)), _) => {
                Kind::parse(k).ok_or_else(|| Rejection::new("unknown_kind", "kind: not llm, tool, agent or message"))?
            }
            (Some(_), _) => return Err(Rejection::new("unknown_kind", "kind: must be a string")),
            (None, Some(h)) => h,
            (None, None) => return Err(Rejection::new("unknown_kind", "kind (or type) is required")),
        };
        if let (Some(h), true) = (hint, ce_kind.is_some())
            && h != kind
        {
            return Err(Rejection::new(
                "unknown_kind",
                format!("kind: {} sent on the subject of {}", kind.as_str(), h.subject()),
            ));
        }
        event(body, org, kind, event_id_value, ce_time.or(body.get("timestamp")), limits)
    });
    Parsed { org_id: parsed_org, event_id, result }
}

fn short(s: &str) -> String {
    s.chars().take(200).collect()
}

fn event(
    body: &Map<String, Value>,
    org_id: Uuid,
    kind: Kind,
    event_id: Option<&Value>,
    timestamp: Option<&Value>,
    limits: &Limits,
) -> Result<UsageEvent, Rejection> {
    let event_id = match event_id {
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 200 && !s.chars().any(char::is_control) => s.clone(),
        Some(_) => return Err(Rejection::field("event_id", "a string of 1 to 200 printable characters")),
        None => return Err(Rejection::new("invalid_field", "event_id is required")),
    };
    let occurred_at = time_field(timestamp)?;
    if occurred_at < limits.now - limits.max_past || occurred_at > limits.now + limits.max_future {
        return Err(Rejection::new("timestamp_out_of_window", "timestamp: too far in the past or the future"));
    }
    let text = |name: &str, max: usize| text_field(body, name, max);
    let count = |name: &str| count_field(body, name);
    let mut e = UsageEvent {
        org_id,
        event_id,
        kind,
        occurred_at,
        actor_id: text("actor_id", 200)?.unwrap_or_default(),
        actor_type: text("actor_type", 50)?.unwrap_or_default(),
        agent_id: uuid_field(body, "agent_id")?,
        delegation_id: uuid_field(body, "delegation_id")?,
        model: None,
        provider: None,
        prompt_tokens: None,
        completion_tokens: None,
        total_tokens: None,
        latency_ms: None,
        success: None,
        error: None,
        tool_id: None,
        tool_name: None,
        invocations: None,
        llm_calls: None,
        tool_calls: None,
        duration_ms: None,
        channel_id: None,
        message_length: None,
        sender: None,
        cost_micros: 0,
    };
    match kind {
        Kind::Llm => {
            e.model = Some(text("model", 200)?.ok_or_else(|| Rejection::new("invalid_field", "model is required"))?);
            e.provider = text("provider", 100)?;
            let prompt = count("prompt_tokens")?.unwrap_or(0);
            let completion = count("completion_tokens")?.unwrap_or(0);
            let total = match count("total_tokens")? {
                Some(t) => t,
                None => prompt + completion,
            };
            if total as u64 > MAX_COUNT {
                return Err(Rejection::field("total_tokens", "more than 2^53"));
            }
            e.prompt_tokens = Some(prompt);
            e.completion_tokens = Some(completion);
            e.total_tokens = Some(total);
            e.latency_ms = count("latency_ms")?;
            e.success = Some(bool_field(body, "success")?.unwrap_or(true));
            e.error = text("error", 2000)?;
        }
        Kind::Tool => {
            e.tool_id = text("tool_id", 200)?;
            e.tool_name = text("tool_name", 200)?;
            if e.tool_id.is_none() && e.tool_name.is_none() {
                return Err(Rejection::new("invalid_field", "tool_id or tool_name is required"));
            }
            e.success = Some(bool_field(body, "success")?.unwrap_or(true));
            e.latency_ms = count("latency_ms")?;
        }
        Kind::Agent => {
            e.invocations = Some(count("invocations")?.unwrap_or(1));
            e.llm_calls = Some(count("llm_calls")?.unwrap_or(0));
            e.tool_calls = Some(count("tool_calls")?.unwrap_or(0));
            e.duration_ms = count("duration_ms")?;
        }
        Kind::Message => {
            e.channel_id = text("channel_id", 200)?;
            e.message_length = Some(count("message_length")?.unwrap_or(0));
            e.sender = text("sender", 200)?;
        }
    }
    Ok(e)
}

fn text_field(body: &Map<String, Value>, name: &str, max: usize) -> Result<Option<String>, Rejection> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.chars().count() <= max && !s.chars().any(|c| c == '\0') => {
            Ok(if s.is_empty() { None } else { Some(s.clone()) })
        }
        Some(Value::String(_)) => Err(Rejection::field(name, &format!("at most {max} characters, no NUL"))),
        Some(_) => Err(Rejection::field(name, "must be a string")),
    }
}

fn count_field(body: &Map<String, Value>, name: &str) -> Result<Option<i64>, Rejection> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if v <= MAX_COUNT => Ok(Some(v as i64)),
            Some(_) => Err(Rejection::field(name, "more than 2^53")),
            None => Err(Rejection::field(name, "must be a non-negative integer")),
        },
        Some(_) => Err(Rejection::field(name, "must be a non-negative integer")),
    }
}

fn uuid_field(body: &Map<String, Value>, name: &str) -> Result<Option<Uuid>, Rejection> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|_| Rejection::field(name, "must be a UUID")),
        Some(_) => Err(Rejection::field(name, "must be a UUID")),
    }
}

fn bool_field(body: &Map<String, Value>, name: &str) -> Result<Option<bool>, Rejection> {
    match body.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(Rejection::field(name, "must be true or false")),
    }
}

/// RFC 3339, or Unix seconds.
fn time_field(v: Option<&Value>) -> Result<OffsetDateTime, Rejection> {
    match v {
        Some(Value::String(s)) => OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .map_err(|_| Rejection::field("timestamp", "must be an RFC 3339 time or Unix seconds")),
        Some(Value::Number(n)) => n
            .as_i64()
            .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
            .ok_or_else(|| Rejection::field("timestamp", "must be an RFC 3339 time or Unix seconds")),
        Some(_) => Err(Rejection::field("timestamp", "must be an RFC 3339 time or Unix seconds")),
        None => Err(Rejection::new("invalid_field", "timestamp is required")),
    }
}

/// The cost of `prompt` and `completion` tokens at `price` (per million), rounded to the nearest
/// micro-unit, saturating.
pub fn cost(price: Option<crate::usage::Price>, prompt: i64, completion: i64) -> i64 {
    let Some(p) = price else { return 0 };
    let micros = (prompt as i128 * p.prompt as i128 + completion as i128 * p.completion as i128 + 500_000) / 1_000_000;
    micros.clamp(0, i64::MAX as i128) as i64
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn limits() -> Limits {
        Limits {
            now: OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap(),
            max_past: time::Duration::days(30),
            max_future: time::Duration::minutes(5),
        }
    }

    const ORG: &str = "7d1f2a58-2d59-4c50-9b8c-8d7e0f4f4a11";

    fn llm() -> Value {
        json!({ "event_id": "e1", "timestamp": 1_800_000_000, "actor_id": "agent:x", "actor_type": "agent",
                "microdao_id": ORG, "model": "gpt-4o", "prompt_tokens": 10, "completion_tokens": 5 })
    }

    #[test]
    fn a_plain_llm_event_and_its_cloudevent_parse_alike() {
        let plain = parse(&llm(), Some(Kind::Llm), None, &limits()).result.unwrap();
        assert_eq!(plain.total_tokens, Some(15));
        assert_eq!(plain.org_id.to_string(), ORG);
        let mut data = llm();
        let obj = data.as_object_mut().unwrap();
        obj.remove("event_id");
        obj.remove("timestamp");
        let ce = json!({ "specversion": "1.0", "id": "e1", "type": "usage.llm", "source": "x",
                         "time": "2027-01-15T08:00:00Z", "data": data });
        let from_ce = parse(&ce, None, None, &limits()).result.unwrap();
        assert_eq!(from_ce.event_id, "e1");
        assert_eq!(from_ce.kind, Kind::Llm);
        assert_eq!(from_ce.occurred_at, plain.occurred_at);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            ("prompt_tokens", json!(-1), "invalid_field"),
            ("prompt_tokens", json!(9_007_199_254_740_993u64), "invalid_field"),
            ("prompt_tokens", json!("10"), "invalid_field"),
            ("timestamp", json!(1_900_000_000), "timestamp_out_of_window"),
            ("timestamp", json!("yesterday"), "invalid_field"),
            ("microdao_id", json!("not-a-uuid"), "invalid_field"),
            ("agent_id", json!(5), "invalid_field"),
            ("event_id", json!(""), "invalid_field"),
        ];
        for (field, value, code) in cases {
            let mut e = llm();
            e[field] = value;
            let r = parse(&e, Some(Kind::Llm), None, &limits()).result.unwrap_err();
            assert_eq!(r.code, code, "{field}: {r:?}");
        }
        let mut e = llm();
        e["kind"] = json!("video");
        assert_eq!(parse(&e, None, None, &limits()).result.unwrap_err().code, "unknown_kind");
    }

    #[test]
    fn cost_is_per_million_and_saturates() {
        let p = Some(crate::usage::Price { prompt: 2_500_000, completion: 10_000_000 });
        assert_eq!(cost(p, 1_000_000, 0), 2_500_000);
        assert_eq!(cost(p, 1000, 500), 2_500 + 5_000);
        assert_eq!(cost(None, 1000, 500), 0);
        assert_eq!(
            cost(Some(crate::usage::Price { prompt: i64::MAX, completion: i64::MAX }), 1 << 53, 1 << 53),
            i64::MAX
        );
    }
}
