//! Shared HTTP machinery: the middleware stack, extractors, the error type and operations routes.

pub mod error;
pub mod extract;
pub mod fetch;
pub mod middleware;
pub mod no_store;
pub mod openapi;
pub mod ops;
pub mod pagination;
pub mod problem;
pub mod request_id;

pub use error::{ApiError, ApiResult};
