//! OAuth2 access tokens for upstream SMTP AUTH (XOAUTH2). Owns the three grants mailbox providers
//! use (`grant`: Entra ID client credentials with a client secret or a certificate's JWT client
//! assertion, the refresh-token grant of Google and Microsoft, Google's service-account JWT bearer
//! grant with domain-wide delegation), the HTTPS call to a token endpoint (`http`) and the token
//! cache every relay shares through Redis (`cache`: one token per route and user, refreshed ahead
//! of expiry by one holder at a time).
//!
//! It must not log, print or put in an error any token, refresh token, client secret or private
//! key: they live in [`SecretString`] and [`RsaKey`], whose `Debug` says `[redacted]`. A provider's
//! error text (`AADSTS7000215: ...`, `invalid_grant`) is kept verbatim in [`OAuthError`].
//! It knows nothing of routes or Kubernetes: the relay and the operator build a [`Grant`] from
//! their compiled configuration.

pub mod cache;
pub mod grant;
pub mod http;
pub mod jwt;
mod secret;

pub use cache::{CacheSettings, TokenCache, TokenKey};
pub use grant::{
    ClientCredential, ClientCredentials, Grant, OAuthError, RefreshTokenGrant, ServiceAccount, Token, TokenRequest,
};
pub use http::TokenClient;
pub use jwt::{JwtAlg, RsaKey};
pub use secret::SecretString;

/// Microsoft Entra ID's token endpoint of a tenant.
pub fn entra_token_url(tenant: &str) -> String {
    format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token")
}

/// Google's token endpoint.
pub const GOOGLE_TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// The scope for SMTP AUTH to Exchange Online with client credentials.
pub const OFFICE365_SCOPE: &str = "https://outlook.office365.com/.default";
/// The scope for SMTP AUTH to Gmail.
pub const GMAIL_SCOPE: &str = "https://mail.google.com/";

/// The SASL XOAUTH2 initial response (before base64): `user=U\x01auth=Bearer T\x01\x01`. It holds
/// the token: a [`SecretString`].
pub fn xoauth2_response(user: &str, token: &SecretString) -> SecretString {
    SecretString::new(format!("user={user}\x01auth=Bearer {}\x01\x01", token.expose()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_xoauth2_response_holds_the_token_and_never_shows_it() {
        let r = xoauth2_response("relay@contoso.com", &SecretString::new("at-secret"));
        assert_eq!(r.expose(), "user=relay@contoso.com\x01auth=Bearer at-secret\x01\x01");
        assert_eq!(format!("{r:?} {r}"), "[redacted] [redacted]");
    }
}
