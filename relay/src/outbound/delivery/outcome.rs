//! What one delivery attempt came to ([`Outcome`], [`AttemptResult`]): the remote reply as the
//! server sent it (a [`Reply`], enhanced code parsed once, by the SMTP client), or the failure
//! that stood in for one, and the verdict (temporary or permanent, bounce class) the worker acts
//! on. The one attempt-outcome type of the relay: the deliverer returns it, the worker decides on
//! it (including the outcomes it makes itself: no route, expired), and pacing, bounce
//! classification, the DSN and the delivery log read the reply it keeps.
//!
//! Must not retry, schedule or write anything: it only describes.

use std::net::SocketAddr;

use mailroute_smtp::{ErrorKind, StepError};

use super::{Reply, Stage};
use crate::outbound::bounce::{self, BounceClass, EnhancedStatusCode, Failure, Kind, Verdict};

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The next hop accepted the message (its 2xx reply to the content).
    Delivered { reply: Reply },
    /// The server answered with a failure reply.
    Rejected { stage: Stage, reply: Reply },
    /// No reply: DNS, connection, timeout or TLS failure.
    Failed {
        stage: Stage,
        failure: Failure,
        detail: String,
    },
    /// The server broke the protocol or lacks what the route needs (e.g. the configured AUTH
    /// mechanism), or the route is misconfigured. Always temporary.
    Protocol {
        stage: Stage,
        class: BounceClass,
        detail: String,
    },
    /// The relay did not try: no route serves the recipient (temporary), or the message's
    /// lifetime ended first (permanent). `status` is the RFC 3463 code the relay names for it,
    /// if any (the delivery log's enhanced code).
    NotTried {
        verdict: Verdict,
        detail: String,
        status: Option<EnhancedStatusCode>,
    },
}

/// The result of [`super::Deliverer::deliver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptResult {
    pub outcome: Outcome,
    /// Host name of the server that produced the outcome (MX host or smarthost).
    pub remote_host: Option<String>,
    pub remote_addr: Option<SocketAddr>,
    /// Whether the session was TLS-protected when the outcome happened.
    pub tls: bool,
    /// Whether a pooled connection carried the attempt.
    pub reused_connection: bool,
}

impl AttemptResult {
    pub fn is_delivered(&self) -> bool {
        matches!(self.outcome, Outcome::Delivered { .. })
    }

    /// The remote reply, if the server answered.
    pub fn reply(&self) -> Option<&Reply> {
        match &self.outcome {
            Outcome::Delivered { reply } | Outcome::Rejected { reply, .. } => Some(reply),
            _ => None,
        }
    }

    pub fn stage(&self) -> Stage {
        match &self.outcome {
            Outcome::Delivered { .. } => Stage::Message,
            Outcome::Rejected { stage, .. } | Outcome::Failed { stage, .. } | Outcome::Protocol { stage, .. } => *stage,
            Outcome::NotTried { .. } => Stage::Setup,
        }
    }

    /// Temporary or permanent, and the bounce class; `None` when delivered.
    pub fn verdict(&self) -> Option<Verdict> {
        match &self.outcome {
            Outcome::Delivered { .. } => None,
            // A 2xx/3xx where a failure was reported means an out-of-sequence reply.
            Outcome::Rejected { reply, .. } => {
                Some(bounce::classify_parsed(reply).unwrap_or(Verdict::new(Kind::Temporary, BounceClass::Other)))
            }
            Outcome::Failed { failure, .. } => Some(failure.verdict()),
            Outcome::Protocol { class, .. } => Some(Verdict::new(Kind::Temporary, *class)),
            Outcome::NotTried { verdict, .. } => Some(*verdict),
        }
    }

    /// Whether the relay gives up on the recipient (bounce): a permanent verdict, except that
    /// an AUTH rejection by a smarthost is temporary on purpose (our credentials broke, e.g. a
    /// changed mailbox password; the mail waits for the fix or its lifetime instead of bouncing
    /// to every sender).
    pub fn is_permanent(&self) -> bool {
        match self.verdict() {
            Some(v) => v.is_permanent() && self.stage() != Stage::Auth && v.class != BounceClass::AuthFailure,
            None => false,
        }
    }

    /// Not delivered, and worth another attempt.
    pub fn is_temporary(&self) -> bool {
        !self.is_delivered() && !self.is_permanent()
    }

    /// One line for logs and DSNs: the reply, or what went wrong.
    pub fn summary(&self) -> String {
        match &self.outcome {
            Outcome::Delivered { reply } | Outcome::Rejected { reply, .. } => reply.to_string(),
            Outcome::Failed { stage, detail, .. } | Outcome::Protocol { stage, detail, .. } => {
                format!("{} ({})", detail, stage.as_str())
            }
            Outcome::NotTried { detail, .. } => detail.clone(),
        }
    }

    /// The reply code, the enhanced status and the text as the delivery log records them: the
    /// reply's own fields, or what happened instead (with the status the relay named, if any).
    pub(crate) fn log_parts(&self) -> (Option<u16>, Option<EnhancedStatusCode>, String) {
        match &self.outcome {
            Outcome::Delivered { reply } | Outcome::Rejected { reply, .. } => {
                (Some(reply.code), reply.enhanced, reply.text.clone())
            }
            Outcome::NotTried { detail, status, .. } => (None, *status, detail.clone()),
            Outcome::Failed { .. } | Outcome::Protocol { .. } => (None, None, self.summary()),
        }
    }

    /// An outcome the relay decided without trying (see [`Outcome::NotTried`]).
    pub(crate) fn not_tried(verdict: Verdict, detail: impl Into<String>, status: Option<EnhancedStatusCode>) -> Self {
        Self {
            outcome: Outcome::NotTried {
                verdict,
                detail: detail.into(),
                status,
            },
            remote_host: None,
            remote_addr: None,
            tls: false,
            reused_connection: false,
        }
    }

    pub(crate) fn failed(stage: Stage, failure: Failure, detail: impl Into<String>) -> Self {
        Self {
            outcome: Outcome::Failed {
                stage,
                failure,
                detail: detail.into(),
            },
            remote_host: None,
            remote_addr: None,
            tls: false,
            reused_connection: false,
        }
    }

    /// Nothing was sent: the attempt stopped before connecting, for a reason of ours (its
    /// settings), which is always temporary.
    pub(super) fn not_attempted(class: BounceClass, detail: String, remote_host: Option<String>) -> Self {
        Self {
            outcome: Outcome::Protocol {
                stage: Stage::Setup,
                class,
                detail,
            },
            remote_host,
            remote_addr: None,
            tls: false,
            reused_connection: false,
        }
    }

    pub(super) fn from_step(e: StepError, host: &str, addr: SocketAddr, reused: bool) -> Self {
        let outcome = match e.kind {
            ErrorKind::Reply(reply) => Outcome::Rejected { stage: e.stage, reply },
            kind => {
                let detail = kind.detail();
                match no_reply_failure(&kind) {
                    Some(failure) => Outcome::Failed {
                        stage: e.stage,
                        failure,
                        detail,
                    },
                    None => Outcome::Protocol {
                        stage: e.stage,
                        class: if matches!(kind, ErrorKind::AuthNotOffered { .. } | ErrorKind::Auth(_)) {
                            BounceClass::AuthFailure
                        } else {
                            BounceClass::Other
                        },
                        detail,
                    },
                }
            }
        };
        Self {
            outcome,
            remote_host: Some(host.to_owned()),
            remote_addr: Some(addr),
            tls: e.tls,
            reused_connection: reused,
        }
    }
}

/// The failure a step error without a reply counts as; `None` for a protocol problem.
pub(super) fn no_reply_failure(kind: &ErrorKind) -> Option<Failure> {
    Some(match kind {
        ErrorKind::Connect(_) => Failure::ConnectionRefused,
        ErrorKind::ConnectTimeout(_) | ErrorKind::TlsTimeout | ErrorKind::NoGreeting | ErrorKind::Timeout(_) => {
            Failure::Timeout
        }
        ErrorKind::Lost(_) => Failure::ConnectionLost,
        ErrorKind::TlsHandshake(_) | ErrorKind::Tls(_) | ErrorKind::StartTlsNotOffered => Failure::Tls,
        ErrorKind::Reply(_) | ErrorKind::AuthNotOffered { .. } | ErrorKind::Auth(_) | ErrorKind::Protocol(_) => {
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_outcome() {
        let base = AttemptResult::failed(Stage::Connect, Failure::ConnectionRefused, "refused");
        assert_eq!(base.verdict(), Some(Verdict::new(Kind::Temporary, BounceClass::Other)));
        let rejected = AttemptResult {
            outcome: Outcome::Rejected {
                stage: Stage::RcptTo,
                reply: Reply::new(550, "5.1.1 User unknown"),
            },
            ..base.clone()
        };
        assert_eq!(
            rejected.verdict(),
            Some(Verdict::new(Kind::Permanent, BounceClass::InvalidRecipient))
        );
        assert_eq!(rejected.summary(), "550 5.1.1 User unknown");
        let auth = AttemptResult {
            outcome: Outcome::Rejected {
                stage: Stage::Auth,
                reply: Reply::new(535, "5.7.8 Username and password not accepted."),
            },
            ..base.clone()
        };
        assert_eq!(auth.verdict().map(|v| v.class), Some(BounceClass::AuthFailure));
        let delivered = AttemptResult {
            outcome: Outcome::Delivered {
                reply: Reply::new(250, "2.0.0 OK"),
            },
            ..base.clone()
        };
        assert_eq!(delivered.verdict(), None);
        assert!(delivered.is_delivered());
        let odd = AttemptResult {
            outcome: Outcome::Rejected {
                stage: Stage::Data,
                reply: Reply::new(250, "OK"),
            },
            ..base
        };
        assert_eq!(odd.verdict(), Some(Verdict::new(Kind::Temporary, BounceClass::Other)));
    }
}
