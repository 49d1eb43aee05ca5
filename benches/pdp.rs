//! In-process policy decisions on the baseline set: p50/p99 per decision, and decisions per second
//! on one core, through the decision cache (what the policy layer sees) and by Cedar alone
//! (`[cedar]`). `cargo bench --bench pdp` (or `make bench`). Under `cargo test` it runs a handful of
//! iterations as a smoke check only.

use std::time::Instant;

use agentidp::policy::{Engine, Query, Resource};
use uuid::Uuid;

fn scenarios(org: Uuid) -> Vec<(&'static str, Query)> {
    let base = |org_role: &str, action: &str, resource: Resource| Query {
        actor_id: "user:7".into(),
        actor_type: "human".into(),
        system_admin: false,
        org_role: org_role.into(),
        scopes: None,
        required_scope: "orgs:read".into(),
        action: action.into(),
        resource_id: "r".into(),
        resource,
        budget_exceeded: false,
        validate: false,
    };
    let mut agent_tool = base(
        "agent",
        "execute",
        Resource::Tool { org_id: org, allowed_agents: vec!["agent:1".into(), "agent:2".into()] },
    );
    agent_tool.actor_type = "agent".into();
    agent_tool.actor_id = "agent:9".into();
    let mut scoped = base("member", "read", Resource::Agent { org_id: org, owner_id: None });
    scoped.scopes = Some(vec!["agents:read".into(), "audit:read".into()]);
    scoped.required_scope = "agents:read".into();
    vec![
        ("owner manages org (permit)", base("owner", "manage", Resource::Organization { org_id: org })),
        ("non-member reads org (deny)", base("none", "read", Resource::Organization { org_id: org })),
        (
            "channel member sends (permit)",
            base(
                "member",
                "send_message",
                Resource::Channel { org_id: org, members: vec!["user:1".into(), "user:7".into()] },
            ),
        ),
        ("agent outside tool allowlist (deny)", agent_tool),
        ("scoped key reads agents (permit)", scoped),
    ]
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let iterations: usize = if bench { 200_000 } else { 50 };
    let engine = Engine::new().expect("baseline compiles");
    let org = Uuid::new_v4();
    if bench {
        println!(
            "{:<48} {:>10} {:>10} {:>10} {:>14}",
            "pdp-inproc scenario", "p50 µs", "p99 µs", "mean µs", "decisions/s"
        );
    }
    // The PEP's path (the decision cache, hit after the first call) and Cedar itself.
    type Eval = fn(&Engine, &Query) -> Result<agentidp::policy::Decision, agentidp::policy::engine::QueryError>;
    let paths: [(&str, Eval); 2] = [("", Engine::evaluate), (" [cedar]", Engine::evaluate_uncached)];
    for (suffix, eval) in paths {
        for (name, query) in scenarios(org) {
            for _ in 0..iterations.min(10_000) {
                std::hint::black_box(eval(&engine, &query).expect("valid query"));
            }
            let mut samples = Vec::with_capacity(iterations);
            let total = Instant::now();
            for _ in 0..iterations {
                let t = Instant::now();
                std::hint::black_box(eval(&engine, &query).expect("valid query"));
                samples.push(t.elapsed().as_nanos() as u64);
            }
            let elapsed = total.elapsed();
            if !bench {
                continue;
            }
            samples.sort_unstable();
            let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
            println!(
                "{:<48} {:>10.2} {:>10.2} {:>10.2} {:>14.0}",
                format!("{name}{suffix}"),
                percentile(&samples, 0.50) as f64 / 1000.0,
                percentile(&samples, 0.99) as f64 / 1000.0,
                mean / 1000.0,
                iterations as f64 / elapsed.as_secs_f64()
            );
        }
    }
}
