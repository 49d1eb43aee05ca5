//! Plans and their limits, as configured, and an organization's effective limits (its plan with
//! its own overrides on top).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::{
    PartialSchema, ToSchema,
    openapi::{ObjectBuilder, OneOfBuilder, RefOr, Schema, Type},
};

/// A count limit: a number, or `"unlimited"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Max(u64),
    Unlimited,
}

impl Limit {
    /// The limit as the rate limiter takes it: -1 is unlimited.
    pub fn as_arg(self) -> i64 {
        match self {
            Self::Max(n) => n.min(i64::MAX as u64) as i64,
            Self::Unlimited => -1,
        }
    }
    pub fn max(self) -> Option<u64> {
        match self {
            Self::Max(n) => Some(n),
            Self::Unlimited => None,
        }
    }
    /// Whether `used` more would exceed it.
    pub fn allows(self, used: u64) -> bool {
        self.max().is_none_or(|m| used < m)
    }
}

impl Serialize for Limit {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Max(n) => s.serialize_u64(*n),
            Self::Unlimited => s.serialize_str("unlimited"),
        }
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::N(n)) => Ok(Self::Max(n)),
            Ok(Raw::S(s)) if s == "unlimited" => Ok(Self::Unlimited),
            _ => Err(serde::de::Error::custom("expected a non-negative integer or \"unlimited\"")),
        }
    }
}

impl PartialSchema for Limit {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(0)))
            .item(ObjectBuilder::new().schema_type(Type::String).enum_values(Some(["unlimited"])))
            .description(Some("A count, or \"unlimited\"."))
            .into()
    }
}

impl ToSchema for Limit {}

/// The per-client rate limit: a steady rate and how many requests may come at once (GCRA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests_per_minute: u32,
    pub burst: u32,
}

impl RateLimit {
    /// Whole microseconds between two requests at the steady rate (the limiter works in integers,
    /// so that a burst of N is exactly N).
    pub fn interval_us(&self) -> i64 {
        (60_000_000 + self.requests_per_minute.max(1) as i64 / 2) / self.requests_per_minute.max(1) as i64
    }
    /// Seconds an empty bucket takes to fill: the window of the `RateLimit-Policy`.
    pub fn window_secs(&self) -> u64 {
        ((self.interval_us() * self.burst as i64) as u64).div_ceil(1_000_000).max(1)
    }
}

/// One plan's limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    pub max_agents: Limit,
    pub api_calls_per_day: Limit,
    pub tokens_per_day: Limit,
    pub tokens_per_month: Limit,
    pub rate_limit: RateLimit,
}

/// Per-org limits that win over the plan's. Absent fields keep the plan's value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_agents: Option<Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_calls_per_day: Option<Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_day: Option<Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_month: Option<Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

impl Overrides {
    /// The plan with these overrides applied.
    pub fn apply(&self, plan: &Plan) -> Plan {
        Plan {
            max_agents: self.max_agents.unwrap_or(plan.max_agents),
            api_calls_per_day: self.api_calls_per_day.unwrap_or(plan.api_calls_per_day),
            tokens_per_day: self.tokens_per_day.unwrap_or(plan.tokens_per_day),
            tokens_per_month: self.tokens_per_month.unwrap_or(plan.tokens_per_month),
            rate_limit: self.rate_limit.unwrap_or(plan.rate_limit),
        }
    }

    /// What is wrong with these values, if anything.
    pub fn problem(&self) -> Option<&'static str> {
        self.rate_limit.and_then(|r| rate_problem(&r))
    }
}

/// What is wrong with a rate limit, if anything.
pub fn rate_problem(r: &RateLimit) -> Option<&'static str> {
    if r.requests_per_minute == 0 || r.burst == 0 {
        Some("rate_limit.requests_per_minute and rate_limit.burst must be at least 1")
    } else if r.requests_per_minute > 6_000_000 || r.burst > 1_000_000 {
        Some("rate_limit is beyond what one client can send (at most 6000000 per minute, burst 1000000)")
    } else {
        None
    }
}

/// Whether a plan name is acceptable (it is stored and shown in URLs and logs).
pub fn valid_plan_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=63).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-' || *c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_read_numbers_and_unlimited_only() {
        assert_eq!(serde_json::from_str::<Limit>("5").unwrap(), Limit::Max(5));
        assert_eq!(serde_json::from_str::<Limit>("\"unlimited\"").unwrap(), Limit::Unlimited);
        assert!(serde_json::from_str::<Limit>("-1").is_err());
        assert!(serde_json::from_str::<Limit>("\"lots\"").is_err());
        assert_eq!(serde_json::to_string(&Limit::Unlimited).unwrap(), "\"unlimited\"");
        assert!(Limit::Max(2).allows(1) && !Limit::Max(2).allows(2) && Limit::Unlimited.allows(u64::MAX));
    }

    #[test]
    fn overrides_win_field_by_field() {
        let plan = Plan {
            max_agents: Limit::Max(3),
            api_calls_per_day: Limit::Max(100),
            tokens_per_day: Limit::Max(10),
            tokens_per_month: Limit::Max(100),
            rate_limit: RateLimit { requests_per_minute: 60, burst: 10 },
        };
        let o: Overrides = serde_json::from_str(r#"{"api_calls_per_day": "unlimited"}"#).unwrap();
        let eff = o.apply(&plan);
        assert_eq!(eff.api_calls_per_day, Limit::Unlimited);
        assert_eq!(eff.max_agents, Limit::Max(3));
        assert!(serde_json::from_str::<Overrides>(r#"{"max_agent": 3}"#).is_err());
    }

    #[test]
    fn a_bucket_fills_in_its_window() {
        let r = RateLimit { requests_per_minute: 60, burst: 10 };
        assert_eq!(r.interval_us(), 1_000_000);
        assert_eq!(RateLimit { requests_per_minute: 7, burst: 1 }.interval_us(), 8_571_429);
        assert_eq!(r.window_secs(), 10);
        assert!(valid_plan_name("pro") && valid_plan_name("team-2") && !valid_plan_name("Pro") && !valid_plan_name(""));
    }
}
