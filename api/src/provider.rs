//! Provider presets: the host, port, TLS mode and known limits of well-known upstreams, so a route
//! can say `provider: office365` instead of repeating them. Pure data, as the providers publish it
//! in their own help pages (Microsoft 365's limits are Exchange Online's sending limits).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::route::TlsMode;

/// A provider preset that fills in host, port, TLS mode and known limits: `gmail`
/// (smtp.gmail.com:465 implicit), `outlook` (smtp-mail.outlook.com:587 STARTTLS), `office365`
/// (smtp.office365.com:587 STARTTLS, 30 messages/minute, 10,000 recipients/day), `yahoo-jp`
/// (smtp.mail.yahoo.co.jp:465 implicit), `icloud` (smtp.mail.me.com:587 STARTTLS), `docomo`
/// (smtp.spmode.ne.jp:465 implicit), `au` (smtp.ezweb.ne.jp:587 STARTTLS), `softbank`
/// (smtp.softbank.jp:587 STARTTLS), `sendgrid` (smtp.sendgrid.net:587 STARTTLS, user `apikey`),
/// `ses` (email-smtp.REGION.amazonaws.com:587 STARTTLS), `google-workspace-relay`
/// (smtp-relay.gmail.com:587 STARTTLS), `custom` (no preset). Fields set on the route override
/// the preset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    /// Gmail / Google Workspace: smtp.gmail.com:465, implicit TLS; an app password (needs
    /// 2-Step Verification) or OAuth2 (`auth.oauth2`: refreshToken, or serviceAccount in Workspace).
    Gmail,
    /// Outlook.com (consumer): smtp-mail.outlook.com:587, STARTTLS; OAuth2 only
    /// (`auth.oauth2` with grant refreshToken, provider microsoft).
    Outlook,
    /// Microsoft 365: smtp.office365.com:587, STARTTLS; 30 messages a minute, 10,000 recipients a
    /// day. Use OAuth2 client credentials (`auth.oauth2` with grant clientCredentials): Basic
    /// authentication for SMTP AUTH is off by default from the end of December 2026.
    Office365,
    /// Yahoo! JAPAN mail: smtp.mail.yahoo.co.jp:465, implicit TLS.
    YahooJp,
    /// iCloud mail: smtp.mail.me.com:587, STARTTLS (app-specific password).
    Icloud,
    /// NTT docomo: smtp.spmode.ne.jp:465, implicit TLS.
    Docomo,
    /// au (KDDI): smtp.ezweb.ne.jp:587, STARTTLS.
    Au,
    /// SoftBank: smtp.softbank.jp:587, STARTTLS.
    Softbank,
    /// SendGrid: smtp.sendgrid.net:587, STARTTLS (user `apikey`).
    Sendgrid,
    /// Amazon SES: email-smtp.REGION.amazonaws.com:587, STARTTLS (set `region`).
    Ses,
    /// Google Workspace's SMTP relay service: smtp-relay.gmail.com:587, STARTTLS (the Workspace
    /// admin allows the relays' IP addresses, or SMTP AUTH).
    GoogleWorkspaceRelay,
    /// No preset: `host`, `port` and `tls` come from the route.
    Custom,
}

/// What a preset fills in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preset {
    pub host: String,
    pub port: u16,
    pub tls: TlsMode,
    pub messages_per_minute: Option<u32>,
    pub recipients_per_day: Option<u32>,
    /// The AUTH user the provider expects whatever the account (SendGrid: `apikey`); used when
    /// the route's Secret has no user name.
    pub fixed_user: Option<&'static str>,
}

impl Provider {
    /// The preset, or `None` for `custom`. `region` is used by `ses` only (default `us-east-1`).
    pub fn preset(self, region: Option<&str>) -> Option<Preset> {
        let p = |host: &str, port, tls| Preset {
            host: host.to_string(),
            port,
            tls,
            messages_per_minute: None,
            recipients_per_day: None,
            fixed_user: None,
        };
        Some(match self {
            Self::Gmail => p("smtp.gmail.com", 465, TlsMode::Implicit),
            Self::Outlook => p("smtp-mail.outlook.com", 587, TlsMode::Starttls),
            Self::Office365 => Preset {
                messages_per_minute: Some(30),
                recipients_per_day: Some(10_000),
                ..p("smtp.office365.com", 587, TlsMode::Starttls)
            },
            Self::YahooJp => p("smtp.mail.yahoo.co.jp", 465, TlsMode::Implicit),
            Self::Icloud => p("smtp.mail.me.com", 587, TlsMode::Starttls),
            Self::Docomo => p("smtp.spmode.ne.jp", 465, TlsMode::Implicit),
            Self::Au => p("smtp.ezweb.ne.jp", 587, TlsMode::Starttls),
            Self::Softbank => p("smtp.softbank.jp", 587, TlsMode::Starttls),
            Self::Sendgrid => Preset {
                fixed_user: Some("apikey"),
                ..p("smtp.sendgrid.net", 587, TlsMode::Starttls)
            },
            Self::Ses => p(
                &format!("email-smtp.{}.amazonaws.com", region.unwrap_or("us-east-1")),
                587,
                TlsMode::Starttls,
            ),
            Self::GoogleWorkspaceRelay => p("smtp-relay.gmail.com", 587, TlsMode::Starttls),
            Self::Custom => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gmail => "gmail",
            Self::Outlook => "outlook",
            Self::Office365 => "office365",
            Self::YahooJp => "yahoo-jp",
            Self::Icloud => "icloud",
            Self::Docomo => "docomo",
            Self::Au => "au",
            Self::Softbank => "softbank",
            Self::Sendgrid => "sendgrid",
            Self::Ses => "ses",
            Self::GoogleWorkspaceRelay => "google-workspace-relay",
            Self::Custom => "custom",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn office365_carries_its_limits() {
        let p = Provider::Office365.preset(None).unwrap();
        assert_eq!(
            (p.host.as_str(), p.port, p.tls),
            ("smtp.office365.com", 587, TlsMode::Starttls)
        );
        assert_eq!((p.messages_per_minute, p.recipients_per_day), (Some(30), Some(10_000)));
    }

    #[test]
    fn gmail_is_implicit_tls_and_ses_uses_region() {
        let g = Provider::Gmail.preset(None).unwrap();
        assert_eq!((g.port, g.tls), (465, TlsMode::Implicit));
        assert_eq!(
            Provider::Ses.preset(Some("eu-west-1")).unwrap().host,
            "email-smtp.eu-west-1.amazonaws.com"
        );
        assert!(Provider::Custom.preset(None).is_none());
    }

    #[test]
    fn every_preset_fills_in_its_host_port_tls_limits_and_user() {
        use TlsMode::{Implicit, Starttls};
        let cases = [
            (Provider::Gmail, "smtp.gmail.com", 465, Implicit, None, None),
            (Provider::Outlook, "smtp-mail.outlook.com", 587, Starttls, None, None),
            (Provider::Office365, "smtp.office365.com", 587, Starttls, Some(30), None),
            (Provider::YahooJp, "smtp.mail.yahoo.co.jp", 465, Implicit, None, None),
            (Provider::Icloud, "smtp.mail.me.com", 587, Starttls, None, None),
            (Provider::Docomo, "smtp.spmode.ne.jp", 465, Implicit, None, None),
            (Provider::Au, "smtp.ezweb.ne.jp", 587, Starttls, None, None),
            (Provider::Softbank, "smtp.softbank.jp", 587, Starttls, None, None),
            (
                Provider::Sendgrid,
                "smtp.sendgrid.net",
                587,
                Starttls,
                None,
                Some("apikey"),
            ),
            (
                Provider::Ses,
                "email-smtp.us-east-1.amazonaws.com",
                587,
                Starttls,
                None,
                None,
            ),
            (
                Provider::GoogleWorkspaceRelay,
                "smtp-relay.gmail.com",
                587,
                Starttls,
                None,
                None,
            ),
        ];
        for (provider, host, port, tls, per_minute, user) in cases {
            let p = provider.preset(None).unwrap();
            assert_eq!(
                (p.host.as_str(), p.port, p.tls, p.messages_per_minute, p.fixed_user),
                (host, port, tls, per_minute, user),
                "{provider:?}"
            );
        }
    }

    #[test]
    fn serde_names_match_as_str() {
        for p in [
            Provider::YahooJp,
            Provider::Office365,
            Provider::GoogleWorkspaceRelay,
            Provider::Custom,
        ] {
            assert_eq!(serde_json::to_value(p).unwrap(), serde_json::json!(p.as_str()));
        }
    }
}
