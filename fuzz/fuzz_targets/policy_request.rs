//! The Cedar request built from an HTTP request: the method and path as sent (matched against the
//! declared routes as the router would), the `X-Org-Id` header choosing the organization, and a
//! caller of any credential kind, memberships and scopes; then the query the policy layer makes
//! (`policy::routes::query_for_request`) decided by the real engine with the baseline.
//!
//! Input lines: `METHOD /path`; the `X-Org-Id` value (an empty line: none); the credential
//! (`session`, `key`, `service`, `agent` or `person`, then `admin` for a system admin, then
//! scopes); the memberships (`<org>:<role>`, `<org>` an index 0-3 into four fixed organizations
//! or a UUID). Checks: a query built from a request always evaluates (an error would be a 500),
//! the same with the schema check, and a permit never reaches an organization the caller is not
//! in (unless a system admin acting there) nor lacks the route's scope.
#![no_main]

use std::sync::{Arc, LazyLock};

use agentidp::{
    auth::{
        Actor, ActorType, Credential, Principal, Role, Scope,
        tokens::{Audience, Claims},
    },
    http::middleware::org_context::{OrgChoice, choose_org},
    policy::{Engine, routes},
};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

static ENGINE: LazyLock<Engine> = LazyLock::new(|| Engine::with_cache(0).expect("the baseline compiles"));
const ORGS: [Uuid; 4] = [
    Uuid::from_u128(0x0190f5b8_0000_7000_8000_000000000001),
    Uuid::from_u128(0x0190f5b8_0000_7000_8000_000000000002),
    Uuid::from_u128(0x0190f5b8_0000_7000_8000_000000000003),
    Uuid::from_u128(0x0190f5b8_0000_7000_8000_000000000004),
];

fn org(s: &str) -> Option<Uuid> {
    match s.parse::<usize>() {
        Ok(i) => ORGS.get(i).copied(),
        Err(_) => s.parse().ok(),
    }
}

/// The declared template the router would match `path` to.
fn template_of(path: &str) -> Option<&'static str> {
    let segs: Vec<&str> = path.split('/').collect();
    routes::RULES.iter().map(|r| r.path).find(|t| {
        let ts: Vec<&str> = t.split('/').collect();
        ts.len() == segs.len()
            && ts.iter().zip(&segs).all(|(t, s)| if t.starts_with('{') { !s.is_empty() } else { t == s })
    })
}

fn claims(org_id: Uuid, sub: String, actor_type: &str, scope: String) -> Arc<Claims> {
    Arc::new(Claims {
        iss: "http://127.0.0.1:8080".into(),
        sub,
        aud: Audience::One("http://127.0.0.1:8080".into()),
        exp: 1_800_000_900,
        iat: 1_800_000_000,
        nbf: 1_800_000_000,
        jti: Uuid::nil(),
        client_id: "aidp_ci_1".into(),
        scope,
        org_id,
        actor_type: actor_type.into(),
        cid: Uuid::nil(),
        act: None,
        delegation_id: None,
        cnf: None,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut lines = text.split('\n');
    let request = lines.next().unwrap_or_default();
    let header = lines.next().filter(|h| !h.is_empty());
    let credential = lines.next().unwrap_or_default();
    let memberships: Vec<(Uuid, Role)> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|m| m.split_once(':'))
        .filter_map(|(o, r)| Some((org(o)?, Role::parse(r)?)))
        .collect();
    let Some((method, path)) = request.split_once(' ') else { return };
    let Ok(method) = http::Method::from_bytes(method.as_bytes()) else { return };

    let mut words = credential.split_whitespace();
    let kind = words.next().unwrap_or("session");
    let mut words = words.peekable();
    let system_admin = words.next_if_eq(&"admin").is_some();
    let scope_words: Vec<&str> = words.collect();
    let scopes: Vec<Scope> = scope_words.iter().filter_map(|s| Scope::parse(s)).collect();
    let home = memberships.first().map_or(ORGS[0], |(o, _)| *o);
    let user_id = Uuid::from_u128(0x0190f5b8_0000_7000_8000_0000000000aa);
    let (actor_type, credential, memberships, system_admin) = match kind {
        "session" => (
            ActorType::Human,
            Credential::Session { session_id: Uuid::nil(), expires_at: time::OffsetDateTime::UNIX_EPOCH },
            memberships,
            system_admin,
        ),
        "key" | "service" => (
            if kind == "key" { ActorType::Human } else { ActorType::Service },
            Credential::ApiKey { key_id: Uuid::nil(), org_id: home, scopes, expires_at: None },
            memberships,
            system_admin,
        ),
        "agent" => (
            ActorType::Agent,
            Credential::AccessToken {
                claims: claims(home, format!("agent:{user_id}"), "agent", scope_words.join(" ")),
                scopes,
            },
            Vec::new(),
            false,
        ),
        "person" => {
            let role = memberships.first().map_or(Role::Member, |(_, r)| *r);
            (
                ActorType::Human,
                Credential::AccessToken {
                    claims: claims(home, format!("user:{user_id}"), "human", scope_words.join(" ")),
                    scopes,
                },
                vec![(home, role)],
                false,
            )
        }
        _ => return,
    };
    let principal = Arc::new(Principal {
        user_id,
        actor_type,
        email: None,
        display_name: None,
        system_admin,
        memberships,
        credential,
        secret_hash: [0; 32],
        queries: Default::default(),
    });
    let OrgChoice::Chosen(org_id) = choose_org(&principal, header) else { return };
    let actor = Actor { principal: principal.clone(), actor_type, org_id };

    let Some(template) = template_of(path) else { return };
    let Some(rule) = routes::rule_for_method(&method, template) else { return };
    let Ok(Some(query)) = routes::query_for_request(rule, path, &actor) else { return };
    let decision = ENGINE.evaluate(&query).unwrap_or_else(|e| panic!("{query:?}: {e}"));
    let validated = ENGINE.evaluate(&agentidp::policy::Query { validate: true, ..query.clone() });
    let validated = validated.unwrap_or_else(|e| panic!("schema check of {query:?}: {e}"));
    assert_eq!(decision.effect, validated.effect, "{query:?}");
    if !decision.permitted() {
        return;
    }
    if let Some(o) = query.resource.org_id() {
        let inside = match principal.credential.bound_org() {
            Some(bound) => bound == o,
            None => principal.memberships.iter().any(|(m, _)| *m == o),
        };
        assert!(inside || actor.is_system_admin_for(Some(o)), "a permit outside the caller's organizations: {query:?}");
    }
    if let Some(scopes) = &query.scopes {
        assert!(scopes.iter().any(|s| *s == rule.scope), "a permit without the route's scope: {query:?}");
    }
});
