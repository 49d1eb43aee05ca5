//! Signing keys: generation, sealing at rest, rotation, the JWKS, and the parsed keys kept ready.
//!
//! Private keys are sealed with AES-256-GCM under the key-encryption key from configuration (the
//! kid is the associated data, so a sealed key cannot be swapped onto another row). The active key
//! signs; retired keys stay published until every token they signed has expired. Keys are parsed
//! once into a [`KeySet`] and swapped whole on rotation, never re-parsed per request.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use aes_gcm::{
    Aes256Gcm, KeyInit, Nonce,
    aead::{Aead, Payload},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use rand_core::{OsRng, RngCore};
use rsa::{
    pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey},
    traits::PublicKeyParts,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::Sha256;
use sqlx::PgPool;
use time::OffsetDateTime;

/// The algorithms tokens can be signed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    ES256,
    RS256,
    EdDSA,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ES256 => "ES256",
            Self::RS256 => "RS256",
            Self::EdDSA => "EdDSA",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ES256" => Some(Self::ES256),
            "RS256" => Some(Self::RS256),
            "EdDSA" => Some(Self::EdDSA),
            _ => None,
        }
    }
}

/// A parsed private key, ready to sign. Signing goes through ring (constant-time, several times
/// faster than the pure-Rust implementations used for generation and JWK export).
enum Signer {
    Es256(ring::signature::EcdsaKeyPair),
    Rs256(ring::signature::RsaKeyPair),
    EdDsa(ring::signature::Ed25519KeyPair),
}

/// A parsed public key, ready to verify.
pub enum Verifier {
    Es256(p256::ecdsa::VerifyingKey),
    Rs256(Box<rsa::pkcs1v15::VerifyingKey<Sha256>>),
    EdDsa(ed25519_dalek::VerifyingKey),
}

impl Verifier {
    pub fn algorithm(&self) -> Algorithm {
        match self {
            Self::Es256(_) => Algorithm::ES256,
            Self::Rs256(_) => Algorithm::RS256,
            Self::EdDsa(_) => Algorithm::EdDSA,
        }
    }

    /// Checks a signature made with this key's own algorithm (the caller pins `alg` to the key).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        use signature::Verifier as _;
        match self {
            Self::Es256(k) => {
                p256::ecdsa::Signature::from_slice(signature).is_ok_and(|s| k.verify(message, &s).is_ok())
            }
            Self::Rs256(k) => {
                rsa::pkcs1v15::Signature::try_from(signature).is_ok_and(|s| k.verify(message, &s).is_ok())
            }
            Self::EdDsa(k) => {
                ed25519_dalek::Signature::from_slice(signature).is_ok_and(|s| k.verify_strict(message, &s).is_ok())
            }
        }
    }
}

/// The signing key in use.
pub struct ActiveKey {
    pub kid: String,
    pub algorithm: Algorithm,
    signer: Signer,
}

impl ActiveKey {
    pub fn sign(&self, message: &[u8]) -> anyhow::Result<Vec<u8>> {
        let rng = ring::rand::SystemRandom::new();
        Ok(match &self.signer {
            Signer::Es256(k) => {
                k.sign(&rng, message).map_err(|_| anyhow::anyhow!("ES256 signing failed"))?.as_ref().to_vec()
            }
            Signer::Rs256(k) => {
                let mut sig = vec![0u8; k.public().modulus_len()];
                k.sign(&ring::signature::RSA_PKCS1_SHA256, &rng, message, &mut sig)
                    .map_err(|_| anyhow::anyhow!("RS256 signing failed"))?;
                sig
            }
            Signer::EdDsa(k) => k.sign(message).as_ref().to_vec(),
        })
    }
}

/// Every key that may verify a token, plus the one that signs.
pub struct KeySet {
    pub active: Arc<ActiveKey>,
    /// The published next key and when it starts signing (unix seconds). Every instance switches
    /// to it on its own clock at that moment; the rows follow at the next [`KeyRing::tick`].
    pub next: Option<(Arc<ActiveKey>, i64)>,
    pub verifiers: HashMap<String, Arc<Verifier>>,
    /// The JWKS document, rendered once per key set.
    pub jwks: Arc<Value>,
}

impl KeySet {
    /// The key that signs at `now` (unix seconds).
    pub fn signer(&self, now: i64) -> &Arc<ActiveKey> {
        match &self.next {
            Some((next, at)) if now >= *at => next,
            _ => &self.active,
        }
    }
}

/// How a rotation takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotation {
    /// The new key signs at once: for a compromised key. Relying parties that cached the JWKS
    /// refetch it when they meet the unknown kid (or fail until their cache expires).
    Emergency,
    /// The new key is published now and signs `ahead` later, so that every cached JWKS has it.
    Scheduled { ahead: time::Duration },
}

/// A rotation's outcome.
pub struct Rotated {
    pub kid: String,
    pub activates_at: OffsetDateTime,
}

/// The key-encryption key and the current key set, swappable on rotation.
pub struct KeyRing {
    kek: [u8; 32],
    current: RwLock<Option<Arc<KeySet>>>,
    last_reload: std::sync::Mutex<Option<Instant>>,
}

struct Generated {
    private: Vec<u8>,
    jwk: Value,
}

fn generate(algorithm: Algorithm, kid: &str) -> anyhow::Result<Generated> {
    Ok(match algorithm {
        Algorithm::ES256 => {
            let key = p256::ecdsa::SigningKey::random(&mut OsRng);
            let point = key.verifying_key().to_encoded_point(false);
            let jwk = json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
                "x": B64.encode(point.x().ok_or_else(|| anyhow::anyhow!("no x"))?),
                "y": B64.encode(point.y().ok_or_else(|| anyhow::anyhow!("no y"))?),
            });
            Generated { private: key.to_bytes().to_vec(), jwk }
        }
        Algorithm::RS256 => {
            let key = rsa::RsaPrivateKey::new(&mut OsRng, 2048)?;
            let public = key.to_public_key();
            let jwk = json!({
                "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                "n": B64.encode(public.n().to_bytes_be()),
                "e": B64.encode(public.e().to_bytes_be()),
            });
            let private = key.to_pkcs1_der()?.as_bytes().to_vec();
            Generated { private, jwk }
        }
        Algorithm::EdDSA => {
            let key = ed25519_dalek::SigningKey::generate(&mut OsRng);
            let jwk = json!({
                "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA", "kid": kid,
                "x": B64.encode(key.verifying_key().as_bytes()),
            });
            Generated { private: key.to_bytes().to_vec(), jwk }
        }
    })
}

fn signer_from(algorithm: Algorithm, private: &[u8]) -> anyhow::Result<Signer> {
    let rejected = |e: ring::error::KeyRejected| anyhow::anyhow!("{} key rejected: {e}", algorithm.as_str());
    Ok(match algorithm {
        Algorithm::ES256 => {
            // ring wants the public point too; derive it from the scalar.
            let secret = p256::ecdsa::SigningKey::from_slice(private)?;
            let public = secret.verifying_key().to_encoded_point(false);
            Signer::Es256(
                ring::signature::EcdsaKeyPair::from_private_key_and_public_key(
                    &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
                    private,
                    public.as_bytes(),
                    &ring::rand::SystemRandom::new(),
                )
                .map_err(rejected)?,
            )
        }
        Algorithm::RS256 => {
            // Parsed by the rsa crate first, which accepts what it wrote.
            rsa::RsaPrivateKey::from_pkcs1_der(private)?;
            Signer::Rs256(ring::signature::RsaKeyPair::from_der(private).map_err(rejected)?)
        }
        Algorithm::EdDSA => {
            Signer::EdDsa(ring::signature::Ed25519KeyPair::from_seed_unchecked(private).map_err(rejected)?)
        }
    })
}

/// Parses a published JWK of ours back into a verifier.
pub fn verifier_from_jwk(algorithm: Algorithm, jwk: &Value) -> anyhow::Result<Verifier> {
    let field = |name: &str| -> anyhow::Result<Vec<u8>> {
        Ok(B64.decode(jwk[name].as_str().ok_or_else(|| anyhow::anyhow!("jwk lacks {name}"))?)?)
    };
    Ok(match algorithm {
        Algorithm::ES256 => {
            let (x, y) = (field("x")?, field("y")?);
            // `FieldBytes::from_slice` panics on any other length: the JWK may come from outside.
            if x.len() != 32 || y.len() != 32 {
                anyhow::bail!("a P-256 coordinate is 32 bytes");
            }
            let point = p256::EncodedPoint::from_affine_coordinates(
                p256::FieldBytes::from_slice(&x),
                p256::FieldBytes::from_slice(&y),
                false,
            );
            Verifier::Es256(p256::ecdsa::VerifyingKey::from_encoded_point(&point)?)
        }
        Algorithm::RS256 => {
            let n = rsa::BigUint::from_bytes_be(&field("n")?);
            let e = rsa::BigUint::from_bytes_be(&field("e")?);
            Verifier::Rs256(Box::new(rsa::pkcs1v15::VerifyingKey::new(rsa::RsaPublicKey::new(n, e)?)))
        }
        Algorithm::EdDSA => Verifier::EdDsa(ed25519_dalek::VerifyingKey::from_bytes(
            field("x")?.as_slice().try_into().map_err(|_| anyhow::anyhow!("Ed25519 key is not 32 bytes"))?,
        )?),
    })
}

impl KeyRing {
    pub fn new(kek: [u8; 32]) -> Self {
        Self { kek, current: RwLock::new(None), last_reload: std::sync::Mutex::new(None) }
    }

    /// A ring holding one freshly generated key and nothing in Postgres, for the fuzz targets
    /// (token verification needs a key to get past the signature to the claims).
    #[doc(hidden)]
    pub fn ephemeral(algorithm: Algorithm) -> anyhow::Result<Self> {
        let ring = Self::new([7; 32]);
        let kid = format!("ephemeral-{}", algorithm.as_str());
        let generated = generate(algorithm, &kid)?;
        let verifier = Arc::new(verifier_from_jwk(algorithm, &generated.jwk)?);
        let active =
            Arc::new(ActiveKey { kid: kid.clone(), algorithm, signer: signer_from(algorithm, &generated.private)? });
        let set = KeySet {
            active,
            next: None,
            verifiers: HashMap::from([(kid, verifier)]),
            jwks: Arc::new(json!({ "keys": [generated.jwk] })),
        };
        *ring.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
        Ok(ring)
    }

    /// Encrypts with the key-encryption key (AES-256-GCM), bound to `kid`: a signing key's id, or
    /// any label naming the row the secret belongs to (a webhook endpoint's).
    pub fn seal(&self, kid: &str, plaintext: &[u8]) -> anyhow::Result<Vec<u8>> {
        let cipher = Aes256Gcm::new_from_slice(&self.kek)?;
        let mut nonce = [0u8; 12];
        OsRng.fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: kid.as_bytes() })
            .map_err(|_| anyhow::anyhow!("sealing failed"))?;
        Ok([nonce.as_slice(), &sealed].concat())
    }

    /// Decrypts what [`Self::seal`] sealed under the same `kid`.
    pub fn unseal(&self, kid: &str, sealed: &[u8]) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(sealed.len() > 12, "sealed key too short");
        let cipher = Aes256Gcm::new_from_slice(&self.kek)?;
        cipher.decrypt(Nonce::from_slice(&sealed[..12]), Payload { msg: &sealed[12..], aad: kid.as_bytes() }).map_err(
            |_| {
                anyhow::anyhow!(
                    "cannot unseal signing key {kid}: wrong auth.key_encryption_key, or the row was altered"
                )
            },
        )
    }

    /// The current key set; `None` only before the first load.
    pub fn current(&self) -> Option<Arc<KeySet>> {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads every publishable key from Postgres and swaps the parsed set in.
    pub async fn load(&self, db: &PgPool) -> anyhow::Result<()> {
        let rows = sqlx::query!(
            "select kid, algorithm, public_jwk, private_key_sealed, status, activates_at from signing_key
             where status in ('active', 'next') or expires_at > now() order by created_at"
        )
        .fetch_all(db)
        .await?;
        let mut verifiers = HashMap::new();
        let mut keys = Vec::new();
        let mut active = None;
        let mut next = None;
        for r in rows {
            let algorithm = Algorithm::parse(&r.algorithm).ok_or_else(|| anyhow::anyhow!("unknown algorithm"))?;
            verifiers.insert(r.kid.clone(), Arc::new(verifier_from_jwk(algorithm, &r.public_jwk)?));
            keys.push(r.public_jwk.clone());
            if r.status == "active" || r.status == "next" {
                let private = self.unseal(&r.kid, &r.private_key_sealed)?;
                let key = Arc::new(ActiveKey { kid: r.kid, algorithm, signer: signer_from(algorithm, &private)? });
                match r.activates_at {
                    Some(at) if r.status == "next" => next = Some((key, at.unix_timestamp())),
                    _ => active = Some(key),
                }
            }
        }
        let active = active.ok_or_else(|| anyhow::anyhow!("no active signing key"))?;
        // Newest first: the next key (when there is one), the signing key, then retired ones.
        keys.reverse();
        let set = KeySet { active, next, verifiers, jwks: Arc::new(json!({ "keys": keys })) };
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(set));
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        Ok(())
    }

    /// Reloads when a token names a kid we do not know (another instance rotated), at most once a second.
    pub async fn reload_for_unknown_kid(&self, db: &PgPool) {
        {
            let mut last = self.last_reload.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return;
            }
            *last = Some(Instant::now());
        }
        if let Err(e) = self.load(db).await {
            tracing::warn!(error = %e, "reloading signing keys failed");
        }
    }

    /// Makes sure an active key of `algorithm` exists (creating or rotating to one), then loads.
    pub async fn ensure(&self, db: &PgPool, algorithm: Algorithm, token_ttl_secs: u64) -> anyhow::Result<()> {
        let mut tx = db.begin().await?;
        // Several instances starting at once: one generates, the others find it.
        sqlx::query!("select pg_advisory_xact_lock(7273)").execute(&mut *tx).await?;
        let active = sqlx::query_scalar!("select algorithm from signing_key where status = 'active'")
            .fetch_optional(&mut *tx)
            .await?;
        if active.as_deref() != Some(algorithm.as_str()) {
            self.rotate_in(&mut tx, algorithm, token_ttl_secs).await?;
        }
        tx.commit().await?;
        self.load(db).await
    }

    /// Rotates to a new key of `algorithm`, at once or after publishing it (see [`Rotation`]).
    pub async fn rotate(
        &self,
        db: &PgPool,
        algorithm: Algorithm,
        token_ttl_secs: u64,
        how: Rotation,
    ) -> anyhow::Result<Rotated> {
        let mut tx = db.begin().await?;
        sqlx::query!("select pg_advisory_xact_lock(7273)").execute(&mut *tx).await?;
        promote_due(&mut tx, token_ttl_secs).await?;
        // Without an active key (a new database) there is nothing to wait for.
        let has_active =
            sqlx::query_scalar!("select exists(select 1 from signing_key where status = 'active') as \"e!\"")
                .fetch_one(&mut *tx)
                .await?;
        let rotated = match how {
            Rotation::Scheduled { ahead } if has_active => self.schedule_in(&mut tx, algorithm, ahead).await?,
            _ => {
                let kid = self.rotate_in(&mut tx, algorithm, token_ttl_secs).await?;
                Rotated { kid, activates_at: OffsetDateTime::now_utc() }
            }
        };
        tx.commit().await?;
        self.load(db).await?;
        Ok(rotated)
    }

    /// Retires the active key (and drops a waiting one) and makes a new key sign now.
    async fn rotate_in(
        &self,
        tx: &mut sqlx::PgConnection,
        algorithm: Algorithm,
        token_ttl_secs: u64,
    ) -> anyhow::Result<String> {
        let (kid, generated, sealed) = self.generate_sealed(algorithm).await?;
        // A retired key verifies until the last token it signed has expired (plus clock skew).
        let keep = (token_ttl_secs + 60) as f64;
        sqlx::query!(
            "update signing_key set status = 'retired', retired_at = now(),
                    expires_at = case when status = 'next' then now() else now() + make_interval(secs => $1) end
             where status in ('active', 'next')",
            keep
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query!(
            "insert into signing_key (kid, algorithm, public_jwk, private_key_sealed, status, activates_at)
             values ($1, $2, $3, $4, 'active', now())",
            kid,
            algorithm.as_str(),
            generated.jwk,
            sealed
        )
        .execute(&mut *tx)
        .await?;
        audit_rotation(tx, &kid, algorithm, "emergency", OffsetDateTime::now_utc()).await?;
        Ok(kid)
    }

    /// Publishes a new key that starts signing `ahead` from now; a key already waiting is kept.
    async fn schedule_in(
        &self,
        tx: &mut sqlx::PgConnection,
        algorithm: Algorithm,
        ahead: time::Duration,
    ) -> anyhow::Result<Rotated> {
        let waiting = sqlx::query!("select kid, activates_at from signing_key where status = 'next'")
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(w) = waiting
            && let Some(activates_at) = w.activates_at
        {
            return Ok(Rotated { kid: w.kid, activates_at });
        }
        let (kid, generated, sealed) = self.generate_sealed(algorithm).await?;
        let activates_at = OffsetDateTime::now_utc() + ahead;
        sqlx::query!(
            "insert into signing_key (kid, algorithm, public_jwk, private_key_sealed, status, activates_at)
             values ($1, $2, $3, $4, 'next', $5)",
            kid,
            algorithm.as_str(),
            generated.jwk,
            sealed,
            activates_at
        )
        .execute(&mut *tx)
        .await?;
        audit_rotation(tx, &kid, algorithm, "scheduled", activates_at).await?;
        Ok(Rotated { kid, activates_at })
    }

    async fn generate_sealed(&self, algorithm: Algorithm) -> anyhow::Result<(String, Generated, Vec<u8>)> {
        let mut raw = [0u8; 16];
        OsRng.fill_bytes(&mut raw);
        let kid = B64.encode(raw);
        // RSA generation takes a while: keep it off the async threads.
        let kid2 = kid.clone();
        let generated = tokio::task::spawn_blocking(move || generate(algorithm, &kid2)).await??;
        let sealed = self.seal(&kid, &generated.private)?;
        Ok((kid, generated, sealed))
    }

    /// The periodic step, under the lock so that several instances act once between them: a
    /// waiting key whose time has come becomes the active one in Postgres, and when the active key
    /// is older than `max_age` (if set) the next one is published `ahead` of signing.
    pub async fn tick(
        &self,
        db: &PgPool,
        algorithm: Algorithm,
        token_ttl_secs: u64,
        max_age: Option<time::Duration>,
        ahead: time::Duration,
    ) -> anyhow::Result<Option<Rotated>> {
        let mut tx = db.begin().await?;
        sqlx::query!("select pg_advisory_xact_lock(7273)").execute(&mut *tx).await?;
        let promoted = promote_due(&mut tx, token_ttl_secs).await?;
        let created = sqlx::query_scalar!(
            "select created_at from signing_key where status = 'active'
             and not exists (select 1 from signing_key where status = 'next')"
        )
        .fetch_optional(&mut *tx)
        .await?;
        let due = max_age.zip(created).is_some_and(|(max, c)| OffsetDateTime::now_utc() - c >= max);
        let scheduled = if due { Some(self.schedule_in(&mut tx, algorithm, ahead).await?) } else { None };
        tx.commit().await?;
        if promoted || scheduled.is_some() {
            self.load(db).await?;
        }
        Ok(scheduled)
    }
}

/// Makes a waiting key whose time has come the active one; the key it replaces verifies until
/// the last token it may have signed has expired. Returns whether it did.
async fn promote_due(tx: &mut sqlx::PgConnection, token_ttl_secs: u64) -> anyhow::Result<bool> {
    let due = sqlx::query_scalar!(
        "select activates_at from signing_key where status = 'next' and activates_at <= now() for update"
    )
    .fetch_optional(&mut *tx)
    .await?
    .flatten();
    let Some(at) = due else { return Ok(false) };
    let keep = (token_ttl_secs + 60) as f64;
    sqlx::query!(
        "update signing_key set status = 'retired', retired_at = $1,
                expires_at = greatest(now(), $1) + make_interval(secs => $2)
         where status = 'active'",
        at,
        keep
    )
    .execute(&mut *tx)
    .await?;
    sqlx::query!("update signing_key set status = 'active' where status = 'next'").execute(&mut *tx).await?;
    Ok(true)
}

async fn audit_rotation(
    tx: &mut sqlx::PgConnection,
    kid: &str,
    algorithm: Algorithm,
    how: &str,
    activates_at: OffsetDateTime,
) -> anyhow::Result<()> {
    crate::audit::record(
        tx,
        crate::audit::Event::anonymous(crate::audit::SYSTEM_CHAIN, "signing_key.rotated").target("signing_key", kid).details(
            json!({ "algorithm": algorithm.as_str(), "rotation": how, "activates_at": activates_at.unix_timestamp() }),
        ),
    )
    .await?;
    let data = json!({ "kid": kid, "algorithm": algorithm.as_str(), "rotation": how,
        "activates_at": crate::events::rfc3339(activates_at) });
    crate::events::emit(tx, crate::events::PLATFORM, "signing_key.rotated", format!("signing-keys/{kid}"), data)
        .await?;
    Ok(())
}

/// The development key-encryption key: fixed, public, and only for machines with nothing to protect.
pub const DEV_KEK: [u8; 32] = *b"agentidp-development-only-kek!!!";

/// Decodes `auth.key_encryption_key` (base64 of 32 bytes).
pub fn parse_kek(b64: &str) -> Result<[u8; 32], String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .or_else(|_| B64.decode(b64.trim()))
        .map_err(|_| "must be base64".to_owned())?;
    bytes.try_into().map_err(|_| "must decode to exactly 32 bytes (try: openssl rand -base64 32)".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_signs_and_its_jwk_verifies() {
        for alg in [Algorithm::ES256, Algorithm::RS256, Algorithm::EdDSA] {
            let g = generate(alg, "k1").unwrap();
            let active = ActiveKey { kid: "k1".into(), algorithm: alg, signer: signer_from(alg, &g.private).unwrap() };
            let sig = active.sign(b"header.claims").unwrap();
            let v = verifier_from_jwk(alg, &g.jwk).unwrap();
            assert!(v.verify(b"header.claims", &sig), "{alg:?}");
            assert!(!v.verify(b"header.claimz", &sig), "{alg:?}");
        }
    }

    #[test]
    fn sealing_binds_the_kid() {
        let ring = KeyRing::new([7u8; 32]);
        let sealed = ring.seal("a", b"secret").unwrap();
        assert_eq!(ring.unseal("a", &sealed).unwrap(), b"secret");
        assert!(ring.unseal("b", &sealed).is_err());
        assert!(KeyRing::new([8u8; 32]).unseal("a", &sealed).is_err());
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn kek_parsing() {
        assert!(parse_kek(&base64::engine::general_purpose::STANDARD.encode([1u8; 32])).is_ok());
        assert!(parse_kek("short").is_err());
    }
}
