//! AgentIdP: identity provider, policy decision point, usage meter and delegation broker for AI
//! agents and for the humans and services that run them.
//!
//! # Layout
//! - [`state`]: [`state::AppState`], the shared state every module takes (low in the house).
//! - [`app`]: the router composing the modules, serving and graceful shutdown.
//! - [`config`]: layered configuration (defaults, file, `AGENTIDP_` environment), validated at boot.
//! - [`db`], [`redis`]: the one Postgres pool and the one Redis pool.
//! - [`http`]: the middleware stack in request order, extractors, `ApiError`, operations routes, OpenAPI.
//! - [`auth`]: organizations, humans, memberships, sessions, API keys, bootstrap.
//! - [`audit`]: the per-organization hash-chained audit log.
//! - [`events`]: the transactional outbox of CloudEvents every change writes, and their catalog.
//! - [`webhooks`]: endpoints, the dispatcher that delivers the outbox signed (Standard Webhooks), replay.
//! - [`policy`]: the Cedar decision point, the per-route policy table and layer, the decision log.
//! - [`tiers`]: plans and limits, the rate limiter and quota counters, Stripe upgrades.
//! - [`analytics`]: per-request and per-token records, written in batches.
//! - [`usage`]: usage events over HTTP and NATS, counted once, priced, rolled up, budgeted; the analytics API.
//! - [`cache`]: the one in-process cache kind, and the change feed that drops entries on every instance.
//! - [`retention`]: the pruning job that deletes rows past their retention, one instance at a time.
//! - [`clock`]: the wall clock quotas read (tests move it).
//! - [`crypto`]: random secrets, hashing, password hashing.
//! - [`cli`]: the `agentidp` command line.
//! - [`delegation`]: the delegation broker: bounded authority for agents, RFC 8693 token exchange.
//! - [`city`]: zones, rooms, placement, live presence and its stream, nodes and the node guardian.
//! - [`console`]: the web console under `/console`: server-rendered pages over the public API.
//! - [`trust`]: did:web documents, signed agent cards, compliance controls and reports, the marketplace, scaffolds.

pub mod analytics;
pub mod app;
pub mod audit;
pub mod auth;
pub mod cache;
pub mod city;
pub mod cli;
pub mod clock;
pub mod config;
pub mod console;
pub mod crypto;
pub mod db;
pub mod delegation;
pub mod events;
pub mod http;
pub mod policy;
pub mod redis;
pub mod retention;
pub mod state;
pub mod telemetry;
pub mod tiers;
pub mod trust;
pub mod usage;
pub mod webhooks;

/// The name of the session cookie.
pub const SESSION_COOKIE: &str = "agentidp_session";
