//! OpenID Connect for people and MCP clients: the OAuth clients of an organization, the
//! authorization endpoint with its sign-in and consent page, the `authorization_code` and
//! `refresh_token` grants with ID tokens, userinfo, RP-initiated logout and remembered consents.
//!
//! Every client uses the authorization code flow with PKCE (`S256` only) and exactly registered
//! redirect URIs. Codes live 60 s and are used once; a replayed code revokes what it issued.
//! Refresh tokens rotate on every use; a used one presented again revokes its whole family.

pub mod assertion;
pub mod authorize;
pub mod clients;
pub mod consents;
pub mod dpop;
pub mod grants;
pub mod metadata_document;
mod pages;
pub mod registration;
pub mod userinfo;

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;
use uuid::Uuid;

use super::actor::Scope;
use crate::state::AppState;

/// The `[oidc]` section: DPoP, client ID metadata documents and dynamic registration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// A DPoP proof's `iat` may be this far from our clock, either way.
    pub dpop_proof_max_age_secs: u64,
    /// The token endpoint asks for a server nonce in every proof (`use_dpop_nonce`).
    pub dpop_require_nonce: bool,
    /// A nonce is valid for its window of this length and the next.
    pub dpop_nonce_lifetime_secs: u64,
    pub metadata_documents: metadata_document::MetadataDocumentConfig,
    pub registration: registration::RegistrationConfig,
}

/// The OpenID Connect scopes, granted besides the API's own.
pub const OIDC_SCOPES: &[&str] = &["openid", "profile", "email", "offline_access"];

/// Whether `s` is a scope a client may be allowed: an OpenID scope or one of the API's.
pub fn known_scope(s: &str) -> bool {
    OIDC_SCOPES.contains(&s) || Scope::parse(s).is_some()
}

/// Every scope a client may ask for, as discovery lists them.
pub fn all_scopes() -> Vec<&'static str> {
    OIDC_SCOPES.iter().copied().chain(Scope::ALL.iter().map(|s| s.as_str())).collect()
}

/// How a client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
    PrivateKeyJwt,
    /// A public client: PKCE alone.
    None,
}

impl AuthMethod {
    pub const ALL: &'static [&'static str] = &["client_secret_basic", "client_secret_post", "private_key_jwt", "none"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "client_secret_basic" => Some(Self::ClientSecretBasic),
            "client_secret_post" => Some(Self::ClientSecretPost),
            "private_key_jwt" => Some(Self::PrivateKeyJwt),
            "none" => Some(Self::None),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClientSecretBasic => "client_secret_basic",
            Self::ClientSecretPost => "client_secret_post",
            Self::PrivateKeyJwt => "private_key_jwt",
            Self::None => "none",
        }
    }

    pub fn uses_secret(self) -> bool {
        matches!(self, Self::ClientSecretBasic | Self::ClientSecretPost)
    }
}

/// What the authorization and token endpoints need to know about a client: a registered one, or
/// one described by its client ID metadata document.
#[derive(Debug, Clone)]
pub struct OidcClient {
    /// The row's id (the `cid` of its tokens, and a revocation subject).
    pub id: Uuid,
    pub client_id: String,
    /// The organization it belongs to; `None` for a metadata-document client.
    pub org_id: Option<Uuid>,
    pub name: String,
    pub auth_method: AuthMethod,
    pub(crate) secret_hash: Option<Vec<u8>>,
    pub redirect_uris: Vec<String>,
    pub post_logout_redirect_uris: Vec<String>,
    pub grant_types: Vec<String>,
    pub allowed_scopes: Vec<String>,
    pub access_ttl: u64,
    pub refresh_ttl: u64,
    pub logo_uri: Option<String>,
    pub client_uri: Option<String>,
    pub policy_uri: Option<String>,
    pub tos_uri: Option<String>,
    pub jwks: Option<Value>,
    pub jwks_uri: Option<String>,
    pub dynamic: bool,
}

impl OidcClient {
    pub fn allows_grant(&self, grant: &str) -> bool {
        self.grant_types.iter().any(|g| g == grant)
    }
}

/// Loads a registered client by its `client_id`. Lookups of unknown ids are charged to the
/// caller's IP, like every anonymous credential lookup.
pub async fn load_client(state: &AppState, client_id: &str) -> Result<Option<Arc<OidcClient>>, sqlx::Error> {
    if client_id.is_empty() || client_id.len() > 512 {
        return Ok(None);
    }
    if state.auth().lookups.charge().is_err() {
        return Ok(None);
    }
    let row = sqlx::query!(
        "select oauth_client_id, organization_id, client_id, name, token_endpoint_auth_method, secret_hash,
                redirect_uris, post_logout_redirect_uris, grant_types, allowed_scopes, access_token_ttl_secs,
                refresh_token_ttl_secs, logo_uri, client_uri, policy_uri, tos_uri, jwks, jwks_uri, dynamic
         from oauth_client where client_id = $1",
        client_id
    )
    .fetch_optional(state.db())
    .await?;
    Ok(row.map(|r| {
        Arc::new(OidcClient {
            id: r.oauth_client_id,
            client_id: r.client_id,
            org_id: Some(r.organization_id),
            name: r.name,
            auth_method: AuthMethod::parse(&r.token_endpoint_auth_method).unwrap_or(AuthMethod::ClientSecretBasic),
            secret_hash: r.secret_hash,
            redirect_uris: r.redirect_uris,
            post_logout_redirect_uris: r.post_logout_redirect_uris,
            grant_types: r.grant_types,
            allowed_scopes: r.allowed_scopes,
            access_ttl: r.access_token_ttl_secs.max(60) as u64,
            refresh_ttl: r.refresh_token_ttl_secs.max(0) as u64,
            logo_uri: r.logo_uri,
            client_uri: r.client_uri,
            policy_uri: r.policy_uri,
            tos_uri: r.tos_uri,
            jwks: r.jwks,
            jwks_uri: r.jwks_uri,
            dynamic: r.dynamic,
        })
    }))
}

/// Why a redirect URI is refused at registration.
pub fn check_redirect_uri(raw: &str) -> Result<(), &'static str> {
    if raw.len() > 2000 {
        return Err("At most 2000 characters.");
    }
    let url = Url::parse(raw).map_err(|_| "Not an absolute URI.")?;
    if url.fragment().is_some() {
        return Err("A redirect URI has no fragment (RFC 6749 §3.1.2).");
    }
    match url.scheme() {
        "https" => Ok(()),
        // Plain http only back to this machine (RFC 8252 §7.3).
        "http" => match url.host() {
            Some(url::Host::Domain("localhost")) => Ok(()),
            Some(url::Host::Ipv4(ip)) if ip.is_loopback() => Ok(()),
            Some(url::Host::Ipv6(ip)) if ip.is_loopback() => Ok(()),
            _ => Err("http is allowed only for loopback redirect URIs; use https."),
        },
        "javascript" | "data" | "vbscript" | "file" | "blob" | "about" | "ftp" | "ws" | "wss" => {
            Err("This scheme cannot be a redirect URI.")
        }
        // RFC 8252 §7.1: a private-use scheme of a native app, in reverse domain order.
        s if s.contains('.') => Ok(()),
        _ => Err("Use https, a loopback http URI, or a private-use scheme such as com.example.app."),
    }
}

/// Why an informational URI (logo, policy, terms) is refused.
pub fn check_info_uri(raw: &str) -> Result<(), &'static str> {
    if raw.len() > 2000 {
        return Err("At most 2000 characters.");
    }
    let url = Url::parse(raw).map_err(|_| "Not an absolute URI.")?;
    match url.scheme() {
        "https" | "http" => Ok(()),
        _ => Err("Must be an http(s) URL."),
    }
}

/// A random identifier derived from nothing but a client's URL, for metadata-document clients:
/// stable, so that their tokens share a revocation subject.
pub fn url_client_uuid(client_id: &str) -> Uuid {
    let h = crate::crypto::sha256(client_id);
    let mut b = [0u8; 16];
    b.copy_from_slice(&h[..16]);
    uuid::Builder::from_random_bytes(b).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_uris() {
        for ok in [
            "https://app.example/cb",
            "http://127.0.0.1:8000/cb",
            "http://localhost/cb",
            "http://[::1]:9/cb",
            "com.example.app:/oauth",
        ] {
            assert!(check_redirect_uri(ok).is_ok(), "{ok}");
        }
        for bad in [
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            "data:text/html,x",
            "http://app.example/cb",
            "https://app.example/cb#frag",
            "/relative",
            "myapp:/cb",
        ] {
            assert!(check_redirect_uri(bad).is_err(), "{bad}");
        }
    }
}
