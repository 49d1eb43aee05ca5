//! Who is calling: the `Actor` built by the auth layer, with roles and scopes, and the checks every
//! handler uses.

use std::sync::Arc;

use axum::{extract::FromRequestParts, http::request::Parts};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::credentials::{Credential, Principal};
use crate::http::{ApiError, ApiResult};

/// What kind of principal acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ActorType {
    Human,
    Agent,
    Service,
}

impl ActorType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::Agent => "agent",
            Self::Service => "service",
        }
    }

    /// The prefix of an actor id of this type: `user`, `agent` or `service`.
    pub fn id_prefix(self) -> &'static str {
        match self {
            Self::Human => "user",
            Self::Agent => "agent",
            Self::Service => "service",
        }
    }
}

/// A role within an organization; `owner` > `admin` > `member`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Member => "member",
            Self::Admin => "admin",
            Self::Owner => "owner",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "member" => Some(Self::Member),
            "admin" => Some(Self::Admin),
            "owner" => Some(Self::Owner),
            _ => None,
        }
    }
}

macro_rules! scopes {
    ($($variant:ident => $name:literal),* $(,)?) => {
        /// A permission a token or API key may carry. Sessions carry them all; an API key carries
        /// those it was created with, never more than its creator had.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Scope { $($variant),* }

        impl Scope {
            pub const ALL: &'static [Scope] = &[$(Scope::$variant),*];
            pub fn as_str(self) -> &'static str {
                match self { $(Scope::$variant => $name),* }
            }
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($name => Some(Scope::$variant),)* _ => None }
            }
        }
    };
}

scopes! {
    OrgsRead => "orgs:read",
    OrgsWrite => "orgs:write",
    MembersRead => "members:read",
    MembersWrite => "members:write",
    ApiKeysRead => "api_keys:read",
    ApiKeysWrite => "api_keys:write",
    AuditRead => "audit:read",
    AgentsRead => "agents:read",
    AgentsWrite => "agents:write",
    TokensIntrospect => "tokens:introspect",
    TokensRevoke => "tokens:revoke",
    KeysManage => "keys:manage",
    PoliciesRead => "policies:read",
    PoliciesWrite => "policies:write",
    PdpEvaluate => "pdp:evaluate",
    TiersRead => "tiers:read",
    TiersWrite => "tiers:write",
    WebhooksRead => "webhooks:read",
    WebhooksWrite => "webhooks:write",
    DelegationsRead => "delegations:read",
    DelegationsWrite => "delegations:write",
    UsageRead => "usage:read",
    UsageWrite => "usage:write",
    UsageManage => "usage:manage",
    CityRead => "city:read",
    CityWrite => "city:write",
    PresenceWrite => "presence:write",
    NodesRead => "nodes:read",
    NodesWrite => "nodes:write",
    ClientsRead => "clients:read",
    ClientsWrite => "clients:write",
}

/// The authenticated caller of this request.
#[derive(Debug, Clone)]
pub struct Actor {
    pub principal: Arc<Principal>,
    pub actor_type: ActorType,
    /// The organization this request acts in (`X-Org-Id`, the API key's org, or the default).
    pub org_id: Option<Uuid>,
}

impl Actor {
    /// `user:<uuid>`, `agent:<uuid>` or `service:<uuid>`.
    pub fn actor_id(&self) -> String {
        format!("{}:{}", self.actor_type.id_prefix(), self.principal.user_id)
    }

    pub fn user_id(&self) -> Uuid {
        self.principal.user_id
    }

    pub fn is_system_admin(&self) -> bool {
        self.principal.system_admin
    }

    /// Whether the system-admin role applies to a request about `org_id` (`None`: the platform,
    /// beyond any one organization). A credential bound to an organization acts only there,
    /// whoever holds it: a system admin's API key or token is an admin of its own organization
    /// and an outsider everywhere else.
    pub fn is_system_admin_for(&self, org_id: Option<Uuid>) -> bool {
        self.is_system_admin()
            && match self.principal.credential.bound_org() {
                None => true,
                Some(bound) => org_id == Some(bound),
            }
    }

    /// The caller's role in `org_id`, if a member.
    pub fn role_in(&self, org_id: Uuid) -> Option<Role> {
        self.principal.memberships.iter().find(|(o, _)| *o == org_id).map(|(_, r)| *r)
    }

    /// The scopes this request carries (`None`: unrestricted, as for a session).
    pub fn scopes(&self) -> Option<&[Scope]> {
        match &self.principal.credential {
            Credential::Session { .. } => None,
            Credential::ApiKey { scopes, .. } | Credential::AccessToken { scopes, .. } => Some(scopes),
        }
    }

    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes().is_none_or(|s| s.contains(&scope))
    }

    /// The organization the request acts in, or 400 asking for `X-Org-Id`.
    pub fn current_org(&self) -> ApiResult<Uuid> {
        self.org_id
            .ok_or_else(|| ApiError::bad_request("org_required", "Choose an organization with the X-Org-Id header."))
    }

    /// 404 when the caller is not in `org_id` (its existence must not leak), 403 when the role is
    /// too low. System admins pass.
    pub fn require_role(&self, org_id: Uuid, min: Role) -> ApiResult<()> {
        // An API key or a token acts only inside its own organization, a system admin's too.
        if self.principal.credential.bound_org().is_some_and(|bound| bound != org_id) {
            return Err(ApiError::NotFound);
        }
        if self.is_system_admin() {
            return Ok(());
        }
        match self.role_in(org_id) {
            None => Err(ApiError::NotFound),
            Some(role) if role >= min => Ok(()),
            Some(_) => Err(ApiError::forbidden(
                "insufficient_role",
                format!("This requires the `{}` role or higher in the organization.", min.as_str()),
            )),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts.extensions.get::<Actor>().cloned().ok_or_else(|| ApiError::unauthorized("Authentication is required."))
    }
}

/// The identity as the API shows it (the original auth service's ActorIdentity).
#[derive(Debug, Serialize, ToSchema)]
pub struct ActorIdentity {
    /// `user:<uuid>`, `agent:<uuid>` or `service:<uuid>`.
    pub actor_id: String,
    pub actor_type: ActorType,
    /// The organization this request acts in.
    pub org_id: Option<Uuid>,
    /// Every organization the actor belongs to.
    pub org_ids: Vec<Uuid>,
    /// Roles in the current organization, plus `system_admin` when global.
    pub roles: Vec<String>,
    pub email: Option<String>,
    pub display_name: Option<String>,
    /// `session`, `api_key` or `access_token`.
    pub credential_type: &'static str,
    /// The scopes this credential carries.
    pub scopes: Vec<&'static str>,
}

impl From<&Actor> for ActorIdentity {
    fn from(a: &Actor) -> Self {
        let mut roles: Vec<String> =
            a.org_id.and_then(|o| a.role_in(o)).map(|r| vec![r.as_str().to_owned()]).unwrap_or_default();
        if a.is_system_admin() {
            roles.push("system_admin".into());
        }
        let org_ids = match a.principal.credential.bound_org() {
            Some(org) => vec![org],
            None => a.principal.memberships.iter().map(|(o, _)| *o).collect(),
        };
        if a.actor_type == ActorType::Agent {
            roles.push("agent".into());
        }
        Self {
            actor_id: a.actor_id(),
            actor_type: a.actor_type,
            org_id: a.org_id,
            org_ids,
            roles,
            email: a.principal.email.clone(),
            display_name: a.principal.display_name.clone(),
            credential_type: match a.principal.credential {
                Credential::Session { .. } => "session",
                Credential::ApiKey { .. } => "api_key",
                Credential::AccessToken { .. } => "access_token",
            },
            scopes: a
                .scopes()
                .map(|s| s.to_vec())
                .unwrap_or_else(|| Scope::ALL.to_vec())
                .iter()
                .map(|s| s.as_str())
                .collect(),
        }
    }
}
