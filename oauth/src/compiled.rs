//! From the compiled configuration to a [`Grant`]: what a relay does with
//! `RelaySecrets::upstream_oauth2` of a route. Parses the certificate, key and key file here, so
//! a bad one is an error before any request (never quoting it).

use mailroute_api::config::OAuth2Credentials;
use mailroute_api::route::{AssertionAlgorithm, OAuth2Grant};

use crate::grant::{ClientCredential, ClientCredentials, Grant, OAuthError, RefreshTokenGrant, ServiceAccount};
use crate::jwt::{JwtAlg, RsaKey, Thumbprints};
use crate::secret::SecretString;

fn missing(what: &str) -> OAuthError {
    OAuthError::Key(format!("the OAuth2 client has no {what}"))
}

/// The grant a route's compiled OAuth2 client describes.
pub fn grant_from(c: &OAuth2Credentials) -> Result<Grant, OAuthError> {
    match c.grant {
        OAuth2Grant::ClientCredentials => {
            let credential = match (&c.client_secret, &c.certificate, &c.private_key) {
                (Some(s), _, _) => ClientCredential::Secret(SecretString::new(s.clone())),
                (None, Some(cert), Some(key)) => ClientCredential::Certificate {
                    key: Box::new(RsaKey::from_pem(key)?),
                    thumbprints: Thumbprints::from_pem(cert)?,
                    alg: match c.assertion_algorithm.unwrap_or_default() {
                        AssertionAlgorithm::Rs256 => JwtAlg::Rs256,
                        AssertionAlgorithm::Ps256 => JwtAlg::Ps256,
                    },
                },
                _ => return Err(missing("client secret or certificate and key")),
            };
            Ok(Grant::ClientCredentials(ClientCredentials {
                token_url: c.token_url.clone(),
                client_id: c.client_id.clone().ok_or_else(|| missing("client id"))?,
                credential,
                scope: c.scope.clone(),
            }))
        }
        OAuth2Grant::RefreshToken => Ok(Grant::RefreshToken(RefreshTokenGrant {
            token_url: c.token_url.clone(),
            client_id: c.client_id.clone().ok_or_else(|| missing("client id"))?,
            client_secret: c.client_secret.clone().map(SecretString::new),
            refresh_token: SecretString::new(c.refresh_token.clone().ok_or_else(|| missing("refresh token"))?),
            scope: Some(c.scope.clone()),
        })),
        OAuth2Grant::ServiceAccount => {
            let json = c
                .service_account_key
                .as_deref()
                .ok_or_else(|| missing("service account key"))?;
            let mut sa = ServiceAccount::from_json_key(json, &c.user, &c.scope)?;
            // The compiled endpoint wins: Google's, or the route's tokenUrl.
            sa.token_url = c.token_url.clone();
            Ok(Grant::ServiceAccount(sa))
        }
    }
}
