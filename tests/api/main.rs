//! Integration tests: one binary, the real router, a real Postgres and a real Redis.

mod helpers;

mod analytics_api;
mod audit;
mod browser;
mod city;
mod conformance;
mod console;
mod delegation;
mod dpop;
mod events;
mod federation;
mod foundation;
mod identity;
mod isolation;
mod metadata_documents;
mod oauth;
mod oidc;
mod policy;
mod retention;
mod secrets;
mod tiers;
mod trust;
mod usage;
mod webhooks;
