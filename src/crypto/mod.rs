//! Secrets and hashing: random tokens with recognisable prefixes, SHA-256 for high-entropy secrets,
//! argon2id for human passwords (off the async threads), constant-time comparison.

use argon2::{
    Algorithm, Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier, Version,
    password_hash::{SaltString, rand_core::OsRng},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use rand::Rng;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// A 256-bit random secret, base64url, behind a prefix that secret scanners can match.
pub fn random_token(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// SHA-256 of a high-entropy secret. A slow KDF would buy nothing for 256 random bits.
pub fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Equality that takes the same time wherever the first difference is.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The RFC 7638 thumbprint of a public JWK (EC, RSA or OKP): SHA-256 over its required members,
/// base64url. One function for every use: DPoP's `cnf.jkt`, agents' key ids, DID documents.
pub fn jwk_thumbprint(jwk: &serde_json::Value) -> Option<String> {
    use serde_json::json;
    let s = |k: &str| jwk.get(k).and_then(serde_json::Value::as_str);
    // The required members, in lexicographic order, no whitespace.
    let canonical = match s("kty")? {
        "EC" => json!({ "crv": s("crv")?, "kty": "EC", "x": s("x")?, "y": s("y")? }),
        "RSA" => json!({ "e": s("e")?, "kty": "RSA", "n": s("n")? }),
        "OKP" => json!({ "crv": s("crv")?, "kty": "OKP", "x": s("x")? }),
        _ => return None,
    };
    // serde_json's map is ordered by key, which is the order RFC 7638 asks for.
    Some(URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.to_string().as_bytes())))
}

/// A strong random password for bootstrap output: 24 characters of base64url (144 bits).
pub fn random_password() -> String {
    let mut bytes = [0u8; 18];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Each argon2id run holds 19 MiB: without a bound, a burst of logins (real or with unknown
/// emails) would run hundreds at once on the blocking pool and take gigabytes. One per core is
/// as fast as it gets anyway. Public so that the tests can hold every permit and prove that a
/// route answers without hashing.
pub fn argon2_permits() -> &'static tokio::sync::Semaphore {
    static PERMITS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    PERMITS.get_or_init(|| tokio::sync::Semaphore::new(argon2_permit_count() as usize))
}

/// How many argon2 runs may go at once: one per core.
pub fn argon2_permit_count() -> u32 {
    std::thread::available_parallelism().map(|n| n.get() as u32).unwrap_or(2)
}

/// OWASP's argon2id recommendation: 19 MiB, 2 passes, 1 lane.
fn argon2() -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, Params::new(19 * 1024, 2, 1, None).expect("static params"))
}

/// Hashes a password on the blocking pool.
pub async fn hash_password(password: String) -> anyhow::Result<String> {
    let _permit = argon2_permits().acquire().await?;
    tokio::task::spawn_blocking(move || {
        let salt = SaltString::generate(&mut OsRng);
        argon2().hash_password(password.as_bytes(), &salt).map(|h| h.to_string()).map_err(|e| anyhow::anyhow!("{e}"))
    })
    .await?
}

/// Verifies a password on the blocking pool. With no hash (unknown user, or no password yet) a
/// dummy hash is verified instead, so that the answer takes as long either way.
pub async fn verify_password(password: String, hash: Option<String>) -> anyhow::Result<bool> {
    let _permit = argon2_permits().acquire().await?;
    tokio::task::spawn_blocking(move || {
        let (hash, real) = match hash {
            Some(h) => (h, true),
            None => (dummy_hash().to_owned(), false),
        };
        let parsed = PasswordHash::new(&hash).map_err(|e| anyhow::anyhow!("stored hash: {e}"))?;
        let ok = argon2().verify_password(password.as_bytes(), &parsed).is_ok();
        Ok(ok && real)
    })
    .await?
}

fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        argon2().hash_password(b"timing-equaliser", &salt).map(|h| h.to_string()).unwrap_or_default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_long() {
        let a = random_token("aidp_key_");
        let b = random_token("aidp_key_");
        assert!(a.starts_with("aidp_key_"));
        assert_eq!(a.len(), "aidp_key_".len() + 43);
        assert_ne!(a, b);
    }

    #[test]
    fn rfc7638_thumbprint() {
        // RFC 7638 §3.1.
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(jwk_thumbprint(&jwk).unwrap(), "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs");
        assert_eq!(jwk_thumbprint(&serde_json::json!({ "kty": "oct", "k": "AAAA" })), None);
    }

    #[test]
    fn constant_time_equality() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"ab"));
    }

    #[tokio::test]
    async fn argon2id_round_trip() {
        let h = hash_password("correct horse battery".into()).await.unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_password("correct horse battery".into(), Some(h.clone())).await.unwrap());
        assert!(!verify_password("wrong".into(), Some(h)).await.unwrap());
        assert!(!verify_password("timing-equaliser".into(), None).await.unwrap());
    }
}
