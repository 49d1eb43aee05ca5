//! Standard Webhooks v1 signatures: `webhook-id`, `webhook-timestamp` and
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, one `v1,` entry per
//! secret in use (two while a rotated secret overlaps), separated by spaces.

use base64::{Engine, engine::general_purpose::STANDARD};
use rand::Rng;

/// The prefix of a signing secret; the rest is the base64 of its bytes.
pub const SECRET_PREFIX: &str = "whsec_";

/// A new secret: its `whsec_...` form (shown once) and the bytes that sign.
pub fn new_secret() -> (String, Vec<u8>) {
    let mut raw = vec![0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    (format!("{SECRET_PREFIX}{}", STANDARD.encode(&raw)), raw)
}

/// One `v1,<signature>` entry.
pub fn sign(secret: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(msg_id.as_bytes());
    ctx.update(b".");
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    format!("v1,{}", STANDARD.encode(ctx.sign().as_ref()))
}

/// The `webhook-signature` header value for every secret that signs.
pub fn header(secrets: &[Vec<u8>], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets.iter().map(|s| sign(s, msg_id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_specification_example() {
        // From the Standard Webhooks specification's test vectors.
        let secret = STANDARD.decode("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(&secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_look_like_secrets() {
        let (text, raw) = new_secret();
        assert!(text.starts_with("whsec_"));
        assert_eq!(STANDARD.decode(&text[6..]).unwrap(), raw);
        assert_eq!(header(&[raw.clone(), raw], "m", 1, b"{}").split(' ').count(), 2);
    }
}
