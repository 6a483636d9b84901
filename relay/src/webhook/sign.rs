//! Standard Webhooks signatures (<https://www.standardwebhooks.com/>): HMAC-SHA256 over
//! `<webhook-id>.<webhook-timestamp>.<body>` with the key decoded from `whsec_<base64>`, sent
//! as `webhook-signature: v1,<base64>`. Pure functions; the key never leaves this module.

use base64::Engine;

/// The signing key of one webhook. `Debug` never shows it.
#[derive(Clone)]
pub struct SigningKey(ring::hmac::Key);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// From the Secret's text, `whsec_<base64>` (the error never contains the key).
    pub fn parse(secret: &str) -> Result<Self, String> {
        let raw = mailroute_api::compile::decode_signing_key(secret)?;
        Ok(SigningKey(ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &raw)))
    }

    /// The `webhook-signature` header value for a message.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut ctx = ring::hmac::Context::with_key(&self.0);
        ctx.update(id.as_bytes());
        ctx.update(b".");
        ctx.update(timestamp.to_string().as_bytes());
        ctx.update(b".");
        ctx.update(body);
        let tag = ctx.sign();
        format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(tag.as_ref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference vector of the Standard Webhooks libraries (their test suites' secret,
    /// message id, timestamp, payload and signature).
    #[test]
    fn signs_like_the_reference_libraries() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert!(!format!("{key:?}").contains("MfKQ"));
        assert!(SigningKey::parse("whsec_???").is_err());
    }
}
