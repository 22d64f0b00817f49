//! Outbound networking rules: a component's `allowed_outbound_hosts` and the runtime
//! config's `[outbound_networking] block_networks`, as Spin applies them.

use std::net::IpAddr;

use anyhow::{Context, Result, bail};
use ipnet::IpNet;

/// One entry of `allowed_outbound_hosts`, e.g. `https://*.example.com:8000..8010`.
#[derive(Debug, Clone, PartialEq)]
pub struct AllowedHost {
    scheme: Option<String>,
    host: HostPattern,
    port: PortPattern,
}

#[derive(Debug, Clone, PartialEq)]
enum HostPattern {
    Any,
    /// `*.example.com`: any subdomain, not the bare domain.
    Subdomains(String),
    Exact(String),
    /// `10.0.0.0/8`: any IP literal inside the network (never a name that resolves there).
    Cidr(IpNet),
}

#[derive(Debug, Clone, PartialEq)]
enum PortPattern {
    Any,
    Range(u16, u16),
}

/// The rules of one component.
#[derive(Debug, Clone, Default)]
pub struct AllowedHosts {
    entries: Vec<AllowedHost>,
}

/// The port a scheme implies when a URL or rule leaves it out.
pub fn default_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        "postgres" => Some(5432),
        "redis" => Some(6379),
        "mysql" => Some(3306),
        _ => None,
    }
}

/// The component a service-chaining host names (`<id>.spin.internal`, a port allowed),
/// parsed as Spin parses it: the first label, when the rest is exactly `spin.internal`.
pub fn chaining_target(host: &str) -> Option<&str> {
    let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let (id, rest) = host.split_once('.')?;
    (rest == "spin.internal").then_some(id)
}

/// Whether an `allowed_outbound_hosts` entry names a service-chaining host
/// (`http://<id>.spin.internal` or `http://*.spin.internal`), as Spin's loader decides it:
/// on the entry as written, so a templated entry never counts and neither does `*`.
pub fn is_chaining_rule(rule: &str) -> bool {
    if rule.contains("{{") {
        return false;
    }
    match AllowedHost::parse(rule) {
        Ok(AllowedHost {
            host: HostPattern::Exact(h),
            ..
        }) => h.ends_with(".spin.internal"),
        Ok(AllowedHost {
            host: HostPattern::Subdomains(d),
            ..
        }) => d == "spin.internal",
        _ => false,
    }
}

impl AllowedHost {
    /// Parses one rule; `{{ variable }}` templates must already be rendered.
    pub fn parse(rule: &str) -> Result<Self> {
        let (scheme, rest) = rule.split_once("://").with_context(|| {
            format!("allowed outbound host `{rule}` needs a scheme, as in `https://{rule}`")
        })?;
        let scheme = match scheme {
            "*" => None,
            s if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '+') => {
                Some(s.to_string())
            }
            _ => bail!("allowed outbound host `{rule}` has an invalid scheme"),
        };
        let (host, port) = split_host_port(rest);
        let host = match (host.parse::<IpNet>(), host) {
            (Ok(net), _) => HostPattern::Cidr(net),
            _ if rest.contains('/') => bail!("allowed outbound host `{rule}` must not have a path"),
            (_, "") => bail!("allowed outbound host `{rule}` has no host"),
            (_, "*") => HostPattern::Any,
            (_, h) if h.starts_with("*.") => HostPattern::Subdomains(h[2..].to_ascii_lowercase()),
            (_, h) if h.contains('*') => bail!(
                "allowed outbound host `{rule}`: `*` must be the whole host or its first label"
            ),
            (_, h) => HostPattern::Exact(h.trim_matches(['[', ']']).to_ascii_lowercase()),
        };
        let port = match port {
            Some("*") => PortPattern::Any,
            Some(p) => match p.split_once("..") {
                Some((lo, hi)) => {
                    let lo: u16 = lo
                        .parse()
                        .with_context(|| format!("bad port range in `{rule}`"))?;
                    let hi: u16 = hi
                        .parse()
                        .with_context(|| format!("bad port range in `{rule}`"))?;
                    if lo >= hi {
                        bail!("bad port range in `{rule}`: the start must be below the end");
                    }
                    // Spin's ranges are half-open, like Rust's `a..b`.
                    PortPattern::Range(lo, hi - 1)
                }
                None => {
                    let p: u16 = p.parse().with_context(|| format!("bad port in `{rule}`"))?;
                    PortPattern::Range(p, p)
                }
            },
            None => {
                let Some(p) = scheme.as_deref().and_then(default_port) else {
                    bail!("allowed outbound host `{rule}` needs a port: its scheme has no default");
                };
                PortPattern::Range(p, p)
            }
        };
        Ok(Self { scheme, host, port })
    }

    fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        let scheme_ok = self.scheme.as_deref().is_none_or(|s| s == scheme);
        let host_ok = match &self.host {
            HostPattern::Any => true,
            HostPattern::Exact(h) => h == host,
            HostPattern::Subdomains(d) => host
                .strip_suffix(d.as_str())
                .is_some_and(|prefix| prefix.len() > 1 && prefix.ends_with('.')),
            HostPattern::Cidr(net) => host.parse::<IpAddr>().is_ok_and(|ip| net.contains(&ip)),
        };
        let port_ok = match self.port {
            PortPattern::Any => true,
            PortPattern::Range(lo, hi) => (lo..=hi).contains(&port),
        };
        scheme_ok && host_ok && port_ok
    }
}

/// Splits `host:port` (with IPv6 literals in brackets) into host and optional port.
fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if let Some(end) = s.strip_prefix('[').and_then(|r| r.find(']')) {
        let host = &s[..end + 2];
        let port = s[end + 2..].strip_prefix(':');
        return (host, port);
    }
    match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    }
}

impl AllowedHosts {
    /// Builds the rules from already-rendered entries.
    pub fn parse(rules: &[String]) -> Result<Self> {
        let mut out = Self::default();
        for rule in rules {
            if rule == "insecure:allow-all" {
                // Spin 3 refuses it outright.
                bail!(
                    "'insecure:allow-all' is not allowed - use '*://*:*' instead if you really want to allow all outbound traffic"
                );
            } else {
                out.entries.push(AllowedHost::parse(rule)?);
            }
        }
        Ok(out)
    }

    /// Whether a connection to `scheme://host:port` is allowed (`port` defaulted by scheme).
    pub fn allows(&self, scheme: &str, host: &str, port: Option<u16>) -> bool {
        let Some(port) = port.or_else(|| default_port(scheme)) else {
            return false;
        };
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        self.entries.iter().any(|e| e.allows(scheme, &host, port))
    }

    /// Whether a URL such as `postgres://user@host:5433/db` is allowed.
    pub fn allows_url(&self, url: &str) -> bool {
        match url::Url::parse(url) {
            Ok(u) => match u.host_str() {
                Some(host) => self.allows(u.scheme(), host, u.port()),
                None => false,
            },
            Err(_) => false,
        }
    }
}

/// The runtime config's `block_networks`: CIDRs, and `private` for every non-public range.
#[derive(Debug, Clone, Default)]
pub struct BlockedNetworks {
    nets: Vec<IpNet>,
    private: bool,
}

impl BlockedNetworks {
    pub fn parse(entries: &[String]) -> Result<Self> {
        let mut out = Self::default();
        for entry in entries {
            if entry == "private" {
                out.private = true;
            } else {
                let net = entry
                    .parse::<IpNet>()
                    .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                    .with_context(|| {
                        format!("block_networks: `{entry}` is not a CIDR or `private`")
                    })?;
                out.nets.push(net);
            }
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty() && !self.private
    }

    /// The addresses `host` (a name or an IP literal, bracketed or not) resolves to on
    /// `port` that these networks block, and how many it resolves to in all: no lookup is
    /// made when nothing is blocked.
    pub async fn blocked_addresses(
        &self,
        host: &str,
        port: u16,
    ) -> std::io::Result<(Vec<std::net::SocketAddr>, usize)> {
        if self.is_empty() {
            return Ok((Vec::new(), 0));
        }
        let host = host.trim_matches(['[', ']']);
        let resolved: Vec<_> = tokio::net::lookup_host((host, port)).await?.collect();
        let total = resolved.len();
        let blocked = resolved
            .into_iter()
            .filter(|a| self.blocks(a.ip()))
            .collect();
        Ok((blocked, total))
    }

    pub fn blocks(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.nets.iter().any(|n| n.contains(&ip)) || (self.private && is_private(ip))
    }
}

/// Not globally routable, as Spin's `private` takes it (IANA's special-purpose ranges).
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || a == 0 // "this network", 0.0.0.0/8
                || a == 100 && (b & 0xc0) == 64 // shared address space (CGNAT), 100.64/10
                || (a, b, c) == (192, 0, 0) // IETF protocol assignments
                || (a, b, c) == (192, 0, 2) // documentation
                || (a, b, c) == (198, 51, 100)
                || (a, b, c) == (203, 0, 113)
                || a == 198 && (b & 0xfe) == 18 // benchmarking, 198.18/15
                || a >= 240 // reserved, and the broadcast address
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link local
                || (s[0], s[1]) == (0x2001, 0xdb8) // documentation
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(r: &[&str]) -> AllowedHosts {
        AllowedHosts::parse(&r.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn private_is_every_range_that_is_not_globally_routable() {
        let private = BlockedNetworks::parse(&["private".into()]).unwrap();
        for ip in [
            "0.0.0.1",
            "10.1.2.3",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "172.31.0.1",
            "192.0.0.8",
            "192.0.2.1",
            "192.168.0.1",
            "198.18.0.1",
            "198.51.100.2",
            "203.0.113.3",
            "240.0.0.1",
            "255.255.255.255",
            "::1",
            "fd00::1",
            "fe80::1",
            "2001:db8::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(private.blocks(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["1.1.1.1", "100.128.0.1", "198.20.0.1", "2606:4700::1111"] {
            assert!(!private.blocks(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn a_rule_without_a_port_takes_the_scheme_default() {
        let r = rules(&["https://api.example.com"]);
        assert!(r.allows("https", "api.example.com", None));
        assert!(r.allows("https", "api.example.com", Some(443)));
        assert!(!r.allows("https", "api.example.com", Some(8443)));
        assert!(!r.allows("http", "api.example.com", None));
    }

    #[test]
    fn wildcards_cover_scheme_subdomains_and_ports() {
        let r = rules(&["*://*.example.com:*"]);
        assert!(r.allows("http", "a.example.com", Some(1)));
        assert!(r.allows("https", "a.b.example.com", None));
        assert!(!r.allows("https", "example.com", None));
        assert!(!r.allows("https", "badexample.com", None));
    }

    #[test]
    fn port_ranges_are_half_open() {
        let r = rules(&["http://localhost:8000..8002"]);
        assert!(r.allows("http", "localhost", Some(8000)));
        assert!(r.allows("http", "localhost", Some(8001)));
        assert!(!r.allows("http", "localhost", Some(8002)));
    }

    #[test]
    fn a_cidr_rule_covers_ip_literals_in_its_network_only() {
        let r = rules(&["http://10.0.0.0/8", "*://fd00::/8:*"]);
        assert!(r.allows("http", "10.1.2.3", None));
        assert!(!r.allows("http", "10.1.2.3", Some(8080)));
        assert!(!r.allows("http", "11.0.0.1", None));
        assert!(!r.allows("http", "ten.example.com", None));
        assert!(r.allows("https", "[fd12::1]", Some(9)));
        assert!(!r.allows("https", "[fe80::1]", Some(9)));
    }

    #[test]
    fn malformed_rules_are_rejected() {
        for bad in [
            "example.com",
            "https://ex*ample.com",
            "https://a.com/path",
            "foo://a.com",
            "http://a:9..3",
            "insecure:allow-all",
        ] {
            assert!(AllowedHosts::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn private_blocks_loopback_and_rfc1918_but_not_public() {
        let b = BlockedNetworks::parse(&["private".into()]).unwrap();
        assert!(b.blocks("127.0.0.1".parse().unwrap()));
        assert!(b.blocks("10.1.2.3".parse().unwrap()));
        assert!(b.blocks("::ffff:192.168.0.1".parse().unwrap()));
        assert!(!b.blocks("93.184.216.34".parse().unwrap()));
    }

    #[test]
    fn chaining_rules_are_named_hosts_and_the_subdomain_wildcard_of_spin_internal() {
        assert!(is_chaining_rule("http://executor.spin.internal"));
        assert!(is_chaining_rule("http://*.spin.internal"));
        assert!(!is_chaining_rule("http://*:*"));
        assert!(!is_chaining_rule("*://*:*"));
        assert!(!is_chaining_rule("http://spin.internal.example.com"));
        assert!(!is_chaining_rule("{{ dispatch_url }}"));
        assert!(!is_chaining_rule("postgres://{{ database_host }}"));
    }

    #[test]
    fn a_chaining_host_names_its_first_label_as_spin_parses_it() {
        assert_eq!(chaining_target("executor.spin.internal"), Some("executor"));
        assert_eq!(
            chaining_target("executor.spin.internal:80"),
            Some("executor")
        );
        assert_eq!(chaining_target("a.b.spin.internal"), None);
        assert_eq!(chaining_target("spin.internal"), None);
        assert_eq!(chaining_target("executor.spin.internal.example.com"), None);
    }
}
