//! The PROXY protocol (v1 text, v2 binary) in front of the listeners: a load balancer that
//! hides the client's address sends it in a header before anything else, and every rule of the
//! relay (relay CIDRs, per-address limits, AUTH lock-outs, the delivery log) then sees the
//! client, not the load balancer.
//!
//! This module owns reading exactly one header off a connection (never a byte of the SMTP
//! dialogue after it) and what the header says. It must not decide who may send the header:
//! the session accepts one only from the configured proxy addresses, since anyone else could
//! claim any address with it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ppp::{HeaderResult, v1, v2};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest v1 header, CRLF included (the specification's bound).
const V1_MAX: usize = 107;
/// v2 signature.
const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v2 address block with TLVs accepted.
const V2_MAX_BODY: usize = 1024;

/// Where a proxied connection comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// A client, whose address replaces the proxy's.
    Client(SocketAddr),
    /// The proxy's own connection (v2 LOCAL, v1 UNKNOWN, health checks): no client address;
    /// the session gets the unspecified address, which no relay rule admits.
    Local,
}

impl Source {
    /// The address the session's rules see.
    pub(crate) fn peer(self) -> SocketAddr {
        match self {
            Source::Client(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
            Source::Local => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("PROXY protocol header longer than allowed")]
    TooLong,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads one whole header, and nothing after it.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, ProxyError> {
    let mut buf = vec![0u8; 6];
    r.read_exact(&mut buf).await?;
    if buf == b"PROXY " {
        // Byte by byte: the client's first SMTP bytes may follow at once.
        while !buf.ends_with(b"\r\n") {
            if buf.len() >= V1_MAX {
                return Err(ProxyError::TooLong);
            }
            buf.push(r.read_u8().await?);
        }
        return Ok(buf);
    }
    if buf[..] != V2_SIG[..6] {
        return Err(ProxyError::Missing);
    }
    buf.resize(16, 0);
    r.read_exact(&mut buf[6..]).await?;
    if buf[..12] != V2_SIG {
        return Err(ProxyError::Missing);
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_BODY {
        return Err(ProxyError::TooLong);
    }
    buf.resize(16 + len, 0);
    r.read_exact(&mut buf[16..]).await?;
    Ok(buf)
}

/// Pure: what a whole header says.
pub(crate) fn source_of(header: &[u8]) -> Result<Source, ProxyError> {
    match HeaderResult::parse(header) {
        HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            v1::Addresses::Tcp4(a) => Source::Client(SocketAddr::new(a.source_address.into(), a.source_port)),
            v1::Addresses::Tcp6(a) => Source::Client(SocketAddr::new(a.source_address.into(), a.source_port)),
            v1::Addresses::Unknown => Source::Local,
        }),
        HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                Source::Client(SocketAddr::new(a.source_address.into(), a.source_port))
            }
            (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                Source::Client(SocketAddr::new(a.source_address.into(), a.source_port))
            }
            _ => Source::Local,
        }),
        HeaderResult::V1(Err(e)) => Err(ProxyError::Malformed(e.to_string())),
        HeaderResult::V2(Err(e)) => Err(ProxyError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut h = V2_SIG.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&u16::try_from(addresses.len()).unwrap().to_be_bytes());
        h.extend_from_slice(addresses);
        h
    }

    #[tokio::test]
    async fn reads_exactly_one_header_and_leaves_what_follows() {
        let mut input: &[u8] = b"PROXY TCP4 203.0.113.7 10.0.0.5 40000 25\r\nEHLO x\r\n";
        let h = read_header(&mut input).await.unwrap();
        assert_eq!(input, b"EHLO x\r\n");
        assert_eq!(
            source_of(&h).unwrap(),
            Source::Client("203.0.113.7:40000".parse().unwrap())
        );

        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n";
        let h = read_header(&mut &v6[..]).await.unwrap();
        assert_eq!(
            source_of(&h).unwrap(),
            Source::Client("[2001:db8::7]:40000".parse().unwrap())
        );

        let unknown = b"PROXY UNKNOWN\r\n";
        let h = read_header(&mut &unknown[..]).await.unwrap();
        assert_eq!(source_of(&h).unwrap(), Source::Local);

        // v2 TCP over IPv4, then the client's bytes.
        let mut bin = v2(1, 0x11, &[198, 51, 100, 9, 10, 0, 0, 5, 0x9c, 0x40, 0, 25]);
        bin.extend_from_slice(b"EHLO y\r\n");
        let mut input = &bin[..];
        let h = read_header(&mut input).await.unwrap();
        assert_eq!(input, b"EHLO y\r\n");
        assert_eq!(
            source_of(&h).unwrap(),
            Source::Client("198.51.100.9:40000".parse().unwrap())
        );

        // v2 LOCAL (a health check of the load balancer).
        let local = v2(0, 0x00, &[]);
        let h = read_header(&mut &local[..]).await.unwrap();
        assert_eq!(source_of(&h).unwrap(), Source::Local);
        assert_eq!(Source::Local.peer().ip(), IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_header() {
        for bad in [&b"EHLO client.example\r\n"[..], b"\r\n\r\n\0\r\nQUIZ\n\x21\x11\x00\x00"] {
            assert!(
                matches!(read_header(&mut &bad[..]).await, Err(ProxyError::Missing)),
                "{bad:?}"
            );
        }
        // A v1 line that never ends stops at the specification's bound.
        let long = [b"PROXY ".as_slice(), &[b'1'; 200]].concat();
        assert!(matches!(read_header(&mut &long[..]).await, Err(ProxyError::TooLong)));
        // A v2 header announcing more than the bound.
        let mut huge = V2_SIG.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert!(matches!(read_header(&mut &huge[..]).await, Err(ProxyError::TooLong)));
        // A well-framed v1 line with nonsense in it.
        let h = read_header(&mut &b"PROXY TCP4 not-an-address 10.0.0.5 1 25\r\n"[..])
            .await
            .unwrap();
        assert!(matches!(source_of(&h), Err(ProxyError::Malformed(_))));
        // The connection ends inside the header.
        assert!(matches!(
            read_header(&mut &b"PROXY TCP4 1.2"[..]).await,
            Err(ProxyError::Io(_))
        ));
    }
}
