//! Request and response bodies of the identity routes.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;
use validator::Validate;

use super::actor::{ActorIdentity, Role};

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    #[validate(length(min = 3, max = 254))]
    pub email: String,
    #[validate(length(min = 1, max = 1024))]
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LoginResponse {
    /// Shown once. Send as `Authorization: Bearer`, or rely on the cookie.
    pub session_token: String,
    pub actor: ActorIdentity,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPasswordRequest {
    #[validate(length(min = 1, max = 256))]
    pub token: String,
    #[validate(length(min = 12, max = 256, message = "must be 12 to 256 characters"))]
    pub password: String,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApiKey {
    #[validate(length(min = 1, max = 200))]
    pub description: String,
    /// Days until the key expires (1 to 3650); none: it does not expire.
    #[validate(range(min = 1, max = 3650))]
    pub expires_days: Option<i64>,
    /// Scopes to grant; default: all the creating credential has. Never more.
    #[validate(length(max = 64))]
    pub scopes: Option<Vec<String>>,
    /// A service key acts as a service actor (`service:<key id>`), e.g. a resource server calling
    /// the PDP, rather than as its creator. Owners and admins only.
    pub service: Option<bool>,
}

/// A new API key: the only time `key` is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedApiKey {
    pub id: Uuid,
    /// Whether the key acts as a service actor.
    pub service: bool,
    pub key: String,
    pub prefix: String,
    pub description: String,
    pub scopes: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// An API key without its secret.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiKeyInfo {
    pub id: Uuid,
    pub service: bool,
    pub prefix: String,
    pub description: String,
    pub scopes: Vec<String>,
    pub created_by: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used: Option<OffsetDateTime>,
}

#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateOrganization {
    #[validate(length(min = 1, max = 200))]
    pub name: String,
    /// Lowercase letters, digits and dashes, 3 to 63 characters; derived from the name if absent.
    #[validate(length(min = 3, max = 63))]
    pub slug: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Organization {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    /// The caller's role here (absent for a system admin who is not a member).
    pub role: Option<Role>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct OrganizationPage {
    pub items: Vec<Organization>,
    /// Pass as `after` for the next page.
    pub next_cursor: Option<Uuid>,
}

/// Keyset pagination.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// The `next_cursor` of the previous page.
    pub after: Option<Uuid>,
    /// 1 to 200, default 50.
    pub limit: Option<i64>,
}

/// An invitation to join an organization, by email.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddMember {
    #[validate(email, length(max = 254))]
    pub email: String,
    pub role: Role,
    /// The name a new account starts with, if the invitee has none yet.
    #[validate(length(min = 1, max = 200))]
    pub display_name: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Member {
    pub user_id: Uuid,
    pub email: String,
    pub display_name: Option<String>,
    pub role: Role,
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub joined_at: OffsetDateTime,
}

/// An invitation as its invitee and its organization's admins see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Invitation {
    pub id: Uuid,
    pub organization_id: Uuid,
    pub email: String,
    pub role: Role,
    /// `pending`, `accepted` or `declined`.
    pub status: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
}

/// The answer to an invitation, the same whether or not the email has an account.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedInvitation {
    #[serde(flatten)]
    pub invitation: Invitation,
    /// Shown once; hand it to the invitee. Someone without an account redeems it at
    /// `POST /auth/set-password` (choosing a password); someone with one signs in and accepts at
    /// `POST /api/v1/invitations/{id}/accept`.
    pub invitation_token: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateMember {
    pub role: Role,
}
