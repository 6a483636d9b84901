//! The rule for the name the relay greets MX hosts with (EHLO): a fully qualified domain name
//! or an address literal, never a bare pod name. Shared by the relay, which refuses to greet MX
//! hosts with a bad name, and the operator, which says so in each MX route's status.
//!
//! Pure: no lookups (whether the name matches the outbound IPs' reverse DNS is the operator's
//! advice, not a check made here).

/// Why `helo_name` must not greet MX hosts, if it must not: at least two non-empty labels
/// (e.g. the name the outbound IPs' reverse DNS resolves to) or an address literal `[…]`.
pub fn mx_helo_problem(helo_name: &str) -> Option<String> {
    let name = helo_name.trim();
    if name.starts_with('[') && name.ends_with(']') {
        return None;
    }
    let labels: Vec<&str> = name.strip_suffix('.').unwrap_or(name).split('.').collect();
    if labels.len() >= 2 && labels.iter().all(|l| !l.is_empty()) {
        return None;
    }
    Some(format!(
        "not delivering to MX hosts: EHLO name `{name}` is not a fully qualified domain name; \
         set --hostname (chart value relay.hostname) to the name the relay's outbound IP addresses resolve to"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mx_needs_a_fully_qualified_helo_name() {
        for ok in [
            "mail.example.com",
            "mail.example.com.",
            "[192.0.2.1]",
            "[IPv6:2001:db8::1]",
            "a.b",
        ] {
            assert_eq!(mx_helo_problem(ok), None, "{ok}");
        }
        for bad in [
            "mailroute-relay-7d9f-abcde",
            "localhost",
            "",
            "mail..example",
            ".example",
            "example.",
        ] {
            let p = mx_helo_problem(bad).expect(bad);
            assert!(p.contains("relay.hostname"), "{p}");
        }
    }
}
