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
//! It knows nothing of Kubernetes: [`grant_from`] turns a route's compiled OAuth2 client
//! (`RelaySecrets::upstream_oauth2`) into a [`Grant`].

pub mod cache;
mod compiled;
pub mod grant;
pub mod http;
pub mod jwt;
mod secret;

pub use cache::{CacheSettings, TokenCache, TokenKey};
pub use compiled::grant_from;
pub use grant::{
    ClientCredential, ClientCredentials, Grant, OAuthError, RefreshTokenGrant, ServiceAccount, Token, TokenRequest,
    endpoint_name,
};
pub use http::TokenClient;
pub use jwt::{JwtAlg, RsaKey};
pub use secret::SecretString;

/// The providers' token endpoints and scopes, as `compile` fills them in.
pub use mailroute_api::compile::{GMAIL_SCOPE, GOOGLE_TOKEN_URL, OFFICE365_SCOPE, entra_token_url};

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
