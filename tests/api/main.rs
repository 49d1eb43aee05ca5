//! Integration tests: one binary, the real router, a real Postgres and a real Redis.

mod helpers;

mod analytics_api;
mod audit;
mod browser;
mod city;
mod delegation;
mod dpop;
mod events;
mod foundation;
mod identity;
mod metadata_documents;
mod oauth;
mod oidc;
mod policy;
mod retention;
mod tiers;
mod usage;
mod webhooks;
