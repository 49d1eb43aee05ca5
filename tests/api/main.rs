//! Integration tests: one binary, the real router, a real Postgres and a real Redis.

mod helpers;

mod audit;
mod city;
mod events;
mod foundation;
mod identity;
mod oauth;
mod policy;
mod retention;
mod tiers;
mod webhooks;
