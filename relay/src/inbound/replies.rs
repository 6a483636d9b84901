//! The fixed replies of the inbound session, by name: what each says stays in one place, and
//! tests and readers find a reply by what it means. Replies that carry values (the greeting,
//! EHLO, queue ids, quota answers) are built where they are sent.
//!
//! Constants only.

pub const HELP: &str = "214 2.0.0 See RFC 5321";
pub const READY_FOR_TLS: &str = "220 2.0.0 Ready to start TLS";
pub const BYE: &str = "221 2.0.0 Bye";
pub const AUTH_OK: &str = "235 2.7.0 Authentication successful";
pub const OK: &str = "250 2.0.0 Ok";
pub const RECIPIENT_OK: &str = "250 2.1.5 Ok";
pub const SENDER_OK: &str = "250 2.1.0 Ok";
pub const CANNOT_VRFY: &str = "252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery";
pub const AUTH_CONTINUE: &str = "334 ";
pub const AUTH_LOGIN_PASSWORD: &str = "334 UGFzc3dvcmQ6";
pub const AUTH_LOGIN_USERNAME: &str = "334 VXNlcm5hbWU6";
pub const START_DATA: &str = "354 End data with <CR><LF>.<CR><LF>";
pub const ADDRESS_LOCKED_OUT: &str = "421 4.7.0 Too many authentication failures from your address, try again later";
pub const COMMAND_TIMEOUT: &str = "421 4.4.2 Timeout waiting for command, closing connection";
pub const DATA_TIMEOUT: &str = "421 4.4.2 Timeout waiting for data, closing connection";
pub const SHUTTING_DOWN: &str = "421 4.3.2 Service shutting down";
pub const TOO_MANY_AUTH_FAILURES: &str = "421 4.7.0 Too many authentication failures, closing connection";
pub const PROXY_HEADER_REQUIRED: &str = "421 4.7.0 PROXY protocol header required from this address";
pub const TOO_MANY_CONNECTIONS: &str = "421 4.7.0 Too many connections from your address, try again later";
pub const TOO_MANY_ERRORS: &str = "421 4.7.0 Too many errors, closing connection";
pub const TOO_MANY_RECIPIENTS: &str = "452 4.5.3 Too many recipients";
pub const AUTH_TEMPORARY_FAILURE: &str = "454 4.7.0 Temporary authentication failure, try again later";
pub const LINE_TOO_LONG: &str = "500 5.5.2 Line too long";
pub const AUTH_CANCELLED: &str = "501 5.0.0 Authentication cancelled";
pub const AUTH_UNDECODABLE: &str = "501 5.5.2 Cannot decode AUTH response";
pub const BAD_RECIPIENT_SYNTAX: &str = "501 5.1.3 Bad recipient address syntax";
pub const BAD_SENDER_SYNTAX: &str = "501 5.1.7 Bad sender address syntax";
pub const BDAT_UNSUPPORTED: &str = "502 5.5.1 BDAT not supported, use DATA";
pub const NOT_IMPLEMENTED: &str = "502 5.5.1 Command not implemented";
pub const STARTTLS_UNAVAILABLE: &str = "502 5.5.1 STARTTLS not available";
pub const ALREADY_AUTHENTICATED: &str = "503 5.5.1 Already authenticated";
pub const AUTH_IN_TRANSACTION: &str = "503 5.5.1 AUTH not allowed during a mail transaction";
pub const EHLO_FIRST: &str = "503 5.5.1 Send EHLO first";
pub const HELO_FIRST: &str = "503 5.5.1 Send HELO/EHLO first";
pub const NEED_MAIL: &str = "503 5.5.1 Need MAIL command first";
pub const SENDER_ALREADY_GIVEN: &str = "503 5.5.1 Sender already specified";
pub const TLS_ALREADY_ACTIVE: &str = "503 5.5.1 TLS already active";
pub const AUTH_MECHANISM_UNKNOWN: &str = "504 5.5.4 Unrecognized authentication mechanism";
pub const AUTH_REQUIRED: &str = "530 5.7.0 Authentication required";
pub const STARTTLS_FIRST: &str = "530 5.7.0 Must issue a STARTTLS command first";
pub const AUTH_INVALID: &str = "535 5.7.8 Authentication credentials invalid";
pub const AUTH_NEEDS_TLS: &str = "538 5.7.11 Encryption required for requested authentication mechanism";
pub const RECIPIENT_UNWRITABLE: &str = "553 5.1.3 Recipient address cannot be written in RFC 5321 form";
pub const SENDER_UNWRITABLE: &str = "553 5.1.7 Sender address cannot be written in RFC 5321 form";
pub const NO_VALID_RECIPIENTS: &str = "554 5.5.1 No valid recipients";
