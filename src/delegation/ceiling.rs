//! The ceiling of a delegation's scopes: the delegator's own scopes ∩ the agent's `allowed_scopes`
//! ∩ what was asked, narrowed by a capability level. Asking for more than the delegator (or the
//! agent, or the level) allows is refused, naming the scopes; nothing is ever widened.

use super::config::Ceilings;

/// A capability level: `CAP_READ` < `CAP_MUTATE` < `CAP_ADMIN`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Read,
    Mutate,
    Admin,
}

impl Level {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "CAP_READ" => Some(Self::Read),
            "CAP_MUTATE" => Some(Self::Mutate),
            "CAP_ADMIN" => Some(Self::Admin),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "CAP_READ",
            Self::Mutate => "CAP_MUTATE",
            Self::Admin => "CAP_ADMIN",
        }
    }

    /// Whether the level lets `scope` through, by the configured patterns.
    pub fn allows(self, ceilings: &Ceilings, scope: &str) -> bool {
        let patterns = match self {
            Self::Read => &ceilings.read,
            Self::Mutate => &ceilings.mutate,
            Self::Admin => &ceilings.admin,
        };
        patterns.iter().any(|p| pattern_matches(p, scope))
    }
}

/// `*`, `<prefix>:*`, `*:<suffix>` or an exact name.
fn pattern_matches(pattern: &str, scope: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    if let Some(suffix) = pattern.strip_prefix("*:") {
        return scope.rsplit_once(':').is_some_and(|(_, s)| s == suffix);
    }
    if let Some(prefix) = pattern.strip_suffix(":*") {
        return scope.split_once(':').is_some_and(|(p, _)| p == prefix);
    }
    pattern == scope
}

/// A well-formed scope name: 1 to 100 of `a-z 0-9 _ - . :`.
pub fn valid_scope(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.:".contains(&b))
}

/// Why the asked scopes cannot be granted.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Scopes the delegator does not have.
    Delegator(Vec<String>),
    /// Scopes outside the agent's `allowed_scopes`.
    Agent(Vec<String>),
    /// Scopes above the capability ceiling.
    Ceiling(Vec<String>),
    /// Nothing to derive the scopes from (an unrestricted delegator, a new agent, nothing asked).
    Unspecified,
}

/// The delegation's scopes. `None` for the delegator or the agent means unrestricted (a session;
/// an ephemeral agent made for this delegation). Defaults (nothing asked) are narrowed silently;
/// what is asked must fit every bound.
pub fn grant(
    delegator: Option<&[String]>,
    agent: Option<&[String]>,
    asked: Option<&[String]>,
    level: Level,
    ceilings: &Ceilings,
) -> Result<Vec<String>, Refusal> {
    let has = |set: Option<&[String]>, s: &str| set.is_none_or(|set| set.iter().any(|x| x == s));
    let Some(asked) = asked else {
        let base = agent.or(delegator).ok_or(Refusal::Unspecified)?;
        let mut out: Vec<String> = Vec::new();
        for s in base {
            if has(delegator, s) && has(agent, s) && level.allows(ceilings, s) && !out.contains(s) {
                out.push(s.clone());
            }
        }
        return Ok(out);
    };
    let beyond = |ok: &dyn Fn(&str) -> bool| -> Vec<String> {
        let mut v: Vec<String> = asked.iter().filter(|s| !ok(s)).cloned().collect();
        v.dedup();
        v
    };
    let over = beyond(&|s| has(delegator, s));
    if !over.is_empty() {
        return Err(Refusal::Delegator(over));
    }
    let over = beyond(&|s| has(agent, s));
    if !over.is_empty() {
        return Err(Refusal::Agent(over));
    }
    let over = beyond(&|s| level.allows(ceilings, s));
    if !over.is_empty() {
        return Err(Refusal::Ceiling(over));
    }
    let mut out: Vec<String> = Vec::new();
    for s in asked {
        if !out.contains(s) {
            out.push(s.clone());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ceilings() -> Ceilings {
        Ceilings {
            read: vec!["*:read".into()],
            mutate: vec!["*:read".into(), "*:write".into()],
            admin: vec!["*".into()],
        }
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn levels_are_ordered_and_patterns_match() {
        assert!(Level::Read < Level::Mutate && Level::Mutate < Level::Admin);
        assert!(pattern_matches("*:read", "agents:read"));
        assert!(!pattern_matches("*:read", "agents:readx"));
        assert!(pattern_matches("agents:*", "agents:write"));
        assert!(!pattern_matches("agents:*", "agentsx:write"));
        assert!(pattern_matches("*", "anything"));
        assert_eq!(Level::parse("CAP_ROOT"), None);
    }

    #[test]
    fn defaults_narrow_and_asks_never_widen() {
        let c = ceilings();
        let delegator = v(&["agents:read", "agents:write"]);
        let agent = v(&["agents:read", "tools:read", "agents:write"]);
        // Nothing asked: the intersection, under the level.
        assert_eq!(grant(Some(&delegator), Some(&agent), None, Level::Read, &c).unwrap(), v(&["agents:read"]));
        // Asked beyond the delegator: refused, naming the scope.
        assert_eq!(
            grant(Some(&delegator), Some(&agent), Some(&v(&["tools:read"])), Level::Admin, &c),
            Err(Refusal::Delegator(v(&["tools:read"])))
        );
        assert_eq!(
            grant(None, Some(&agent), Some(&v(&["keys:manage"])), Level::Admin, &c),
            Err(Refusal::Agent(v(&["keys:manage"])))
        );
        assert_eq!(
            grant(None, None, Some(&v(&["agents:write"])), Level::Read, &c),
            Err(Refusal::Ceiling(v(&["agents:write"])))
        );
        assert_eq!(grant(None, None, None, Level::Read, &c), Err(Refusal::Unspecified));
        assert_eq!(grant(None, None, Some(&v(&["a:read", "a:read"])), Level::Read, &c).unwrap(), v(&["a:read"]));
    }
}
