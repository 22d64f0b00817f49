//! Where tools may point: `http`/`https` URLs whose host is not loopback, private,
//! link-local or otherwise internal, unless configuration allows private targets. Hosts
//! are read the way clients read them (WHATWG URL parsing), so encoded forms such as
//! `http://2130706433/`, `http://0x7f.1/`, `http://[::ffff:127.0.0.1]/` or `%2e` tricks
//! cannot hide a loopback address. Names that resolve to private addresses are caught at
//! call time by the runtime's `block_networks`; this check covers what the URL says.

use std::net::{Ipv4Addr, Ipv6Addr};

use url::{Host, Url};

/// Why a URL is refused.
#[derive(Debug, PartialEq)]
pub enum UrlError {
    Invalid(String),
    Scheme,
    Credentials,
    /// The host is internal (loopback, private, link-local, ...).
    Internal(String),
}

impl std::fmt::Display for UrlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UrlError::Invalid(m) => write!(f, "is not a valid URL: {m}"),
            UrlError::Scheme => write!(f, "must use http or https"),
            UrlError::Credentials => write!(f, "must not carry a user name or password"),
            UrlError::Internal(h) => write!(
                f,
                "points at an internal address ({h}); only public hosts may be called"
            ),
        }
    }
}

fn internal_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    a == 0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b))
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 0 && c == 0)
        || (a == 192 && b == 168)
        || (a == 198 && (b == 18 || b == 19))
        || a >= 224
}

fn internal_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return internal_v4(v4);
    }
    let s = ip.segments();
    ip.is_loopback()
        || ip.is_unspecified()
        || (s[0] & 0xfe00) == 0xfc00 // unique local
        || (s[0] & 0xffc0) == 0xfe80 // link local
        || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
        || (s[0] & 0xff00) == 0xff00 // multicast
        // NAT64 and 6to4 embed an IPv4 address: judge that address.
        || (s[0] == 0x64 && s[1] == 0xff9b && internal_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8)))
        || (s[0] == 0x2002 && internal_v4(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8)))
        // IPv4-compatible (deprecated) ::a.b.c.d.
        || (s[..6] == [0; 6] && internal_v4(Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8)))
}

fn internal_name(name: &str) -> bool {
    let name = name.trim_end_matches('.');
    ["localhost", "local", "internal", "localdomain", "home.arpa"]
        .iter()
        .any(|suffix| name == *suffix || name.ends_with(&format!(".{suffix}")))
}

/// Checks a tool URL; `allow_private` lifts the internal-address rule (for on-premises
/// tools and tests).
pub fn check_tool_url(raw: &str, allow_private: bool) -> Result<Url, UrlError> {
    let url = Url::parse(raw.trim()).map_err(|e| UrlError::Invalid(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(UrlError::Scheme);
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Credentials);
    }
    let internal = match url.host() {
        None => return Err(UrlError::Invalid("no host".into())),
        Some(Host::Ipv4(ip)) => internal_v4(ip),
        Some(Host::Ipv6(ip)) => internal_v6(ip),
        Some(Host::Domain(d)) => internal_name(d),
    };
    if internal && !allow_private {
        return Err(UrlError::Internal(
            url.host_str().unwrap_or_default().to_string(),
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_http_and_https_urls_pass() {
        for ok in [
            "https://api.example.com/v1/search?q=x",
            "http://93.184.216.34:8080/",
            "https://[2606:2800:220:1::1]/",
        ] {
            assert!(check_tool_url(ok, false).is_ok(), "{ok}");
        }
    }

    #[test]
    fn internal_addresses_are_refused_in_every_spelling() {
        for bad in [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f000001/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://%31%32%37.0.0.1/",
            "http://localhost:8080/",
            "http://api.localhost/",
            "http://LOCALHOST./",
            "http://10.0.0.5/",
            "http://172.16.3.4/",
            "http://192.168.1.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://100.64.0.1/",
            "http://0.0.0.0/",
            "http://[::1]/",
            "http://[::]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
            "http://[fd00::1]/",
            "http://[fe80::1]/",
            "http://[64:ff9b::a00:1]/",
            "http://[2002:c0a8:101::1]/",
            "http://metadata.google.internal/",
            "http://executor.spin.internal/",
            "http://printer.local/",
        ] {
            assert!(
                matches!(check_tool_url(bad, false), Err(UrlError::Internal(_))),
                "{bad}"
            );
            assert!(
                check_tool_url(bad, true).is_ok(),
                "{bad} with private allowed"
            );
        }
    }

    #[test]
    fn other_schemes_credentials_and_garbage_are_refused() {
        assert_eq!(
            check_tool_url("ftp://example.com/", false),
            Err(UrlError::Scheme)
        );
        assert_eq!(
            check_tool_url("file:///etc/passwd", false),
            Err(UrlError::Scheme)
        );
        assert_eq!(
            check_tool_url("https://user:pw@example.com/", false),
            Err(UrlError::Credentials)
        );
        assert!(matches!(
            check_tool_url("not a url", false),
            Err(UrlError::Invalid(_))
        ));
        assert!(matches!(
            check_tool_url("http://", false),
            Err(UrlError::Invalid(_))
        ));
    }
}
