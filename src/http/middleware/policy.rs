//! Layer 6, policy: every protected route declares its action, resource type and scope in
//! [`crate::policy::routes::RULES`]; this layer asks the decision point before the handler runs
//! (handlers that must load the resource first call [`crate::policy::require`]). A deny is 403
//! problem+json carrying the policy's reason; a resource in another organization is 404. HEAD is
//! checked as GET; a method a protected route declares nothing for is 405, never let through.

pub use crate::policy::routes::layer;
