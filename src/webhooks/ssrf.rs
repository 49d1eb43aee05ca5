//! The SSRF guard: a webhook URL may name only a public http(s) address.
//!
//! Checked twice: when an endpoint is created or changed ([`check_url`], resolving its host), and
//! at every delivery, where [`GuardedResolver`] is the HTTP client's only resolver, so the client
//! connects to exactly the addresses that passed (a DNS answer that changes between the two checks
//! cannot point a delivery at an internal address). IP literals never reach a resolver and are
//! checked by [`check_literal`] before each attempt.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::Url;

/// Why a URL is refused; `code()` is what a 422 names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Malformed,
    TooLong,
    Scheme,
    HttpsRequired,
    Userinfo,
    NonAsciiHost,
    Fragment,
    Unresolvable,
    Loopback,
    Private,
    LinkLocal,
    SharedAddressSpace,
    Multicast,
    Metadata,
    Unspecified,
    Reserved,
}

impl Refused {
    pub fn code(self) -> &'static str {
        match self {
            Refused::Malformed => "malformed",
            Refused::TooLong => "too_long",
            Refused::Scheme => "scheme_not_allowed",
            Refused::HttpsRequired => "https_required",
            Refused::Userinfo => "userinfo_not_allowed",
            Refused::NonAsciiHost => "non_ascii_host",
            Refused::Fragment => "fragment_not_allowed",
            Refused::Unresolvable => "unresolvable_host",
            Refused::Loopback => "loopback_address",
            Refused::Private => "private_address",
            Refused::LinkLocal => "link_local_address",
            Refused::SharedAddressSpace => "cgnat_address",
            Refused::Multicast => "multicast_address",
            Refused::Metadata => "metadata_address",
            Refused::Unspecified => "unspecified_address",
            Refused::Reserved => "reserved_address",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            Refused::Malformed => "The URL is not an absolute URL with a host.",
            Refused::TooLong => "The URL is longer than 2048 characters.",
            Refused::Scheme => "Only http and https URLs are allowed.",
            Refused::HttpsRequired => "Only https URLs are allowed in production.",
            Refused::Userinfo => "The URL must not carry a user name or password.",
            Refused::NonAsciiHost => "The host must be ASCII (use its punycode form).",
            Refused::Fragment => "The URL must not have a #fragment.",
            Refused::Unresolvable => "The host does not resolve to any address.",
            Refused::Loopback => "The host is, or resolves to, a loopback address.",
            Refused::Private => "The host is, or resolves to, a private-network address.",
            Refused::LinkLocal => "The host is, or resolves to, a link-local address.",
            Refused::SharedAddressSpace => "The host is, or resolves to, a carrier-grade NAT (100.64.0.0/10) address.",
            Refused::Multicast => "The host is, or resolves to, a multicast or broadcast address.",
            Refused::Metadata => "The host is, or resolves to, a cloud metadata address.",
            Refused::Unspecified => "The host is, or resolves to, an unspecified address.",
            Refused::Reserved => "The host is, or resolves to, a reserved or documentation address.",
        }
    }

    /// Whether `webhooks.allow_private_networks` lifts this refusal.
    fn private_network(self) -> bool {
        matches!(self, Refused::Loopback | Refused::Private | Refused::LinkLocal | Refused::SharedAddressSpace)
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for Refused {}

/// What a URL's address is, if it is not a public unicast one.
pub fn classify(ip: IpAddr) -> Option<Refused> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Refused> {
    let o = ip.octets();
    // AWS, GCP, Azure (169.254.169.254), Alibaba (100.100.100.200), Oracle (192.0.0.192).
    if [[169, 254, 169, 254], [100, 100, 100, 200], [192, 0, 0, 192], [169, 254, 170, 2]].contains(&o) {
        return Some(Refused::Metadata);
    }
    Some(match o {
        [0, 0, 0, 0] => Refused::Unspecified,
        [0, ..] => Refused::Reserved,
        [127, ..] => Refused::Loopback,
        [10, ..] => Refused::Private,
        [172, b, ..] if (16..32).contains(&b) => Refused::Private,
        [192, 168, ..] => Refused::Private,
        [169, 254, ..] => Refused::LinkLocal,
        [100, b, ..] if (64..128).contains(&b) => Refused::SharedAddressSpace,
        [a, ..] if (224..240).contains(&a) => Refused::Multicast,
        [255, 255, 255, 255] => Refused::Multicast,
        [a, ..] if a >= 240 => Refused::Reserved,
        [192, 0, 0, _] | [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => Refused::Reserved,
        [198, b, ..] if b == 18 || b == 19 => Refused::Reserved,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<Refused> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return classify_v4(v4);
    }
    let s = ip.segments();
    // NAT64 (64:ff9b::/96) reaches the IPv4 address it embeds.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        let [a, b] = s[6].to_be_bytes();
        let [c, d] = s[7].to_be_bytes();
        return classify_v4(Ipv4Addr::new(a, b, c, d));
    }
    if ip == "fd00:ec2::254".parse::<Ipv6Addr>().unwrap_or(Ipv6Addr::UNSPECIFIED) {
        return Some(Refused::Metadata);
    }
    Some(match s {
        [0, 0, 0, 0, 0, 0, 0, 0] => Refused::Unspecified,
        [0, 0, 0, 0, 0, 0, 0, 1] => Refused::Loopback,
        // IPv4-compatible (deprecated) and other ::/96 forms.
        [0, 0, 0, 0, 0, 0, _, _] => Refused::Reserved,
        [a, ..] if a & 0xfe00 == 0xfc00 => Refused::Private,
        [a, ..] if a & 0xffc0 == 0xfe80 => Refused::LinkLocal,
        [a, ..] if a & 0xffc0 == 0xfec0 => Refused::Private,
        [a, ..] if a & 0xff00 == 0xff00 => Refused::Multicast,
        [0x2001, 0x0db8, ..] => Refused::Reserved,
        [0x100, 0, 0, 0, ..] => Refused::Reserved,
        _ => return None,
    })
}

/// Whether `ip` may be connected to.
pub fn permitted(ip: IpAddr, allow_private: bool) -> Result<(), Refused> {
    match classify(ip) {
        None => Ok(()),
        Some(r) if allow_private && r.private_network() => Ok(()),
        Some(r) => Err(r),
    }
}

/// The syntactic checks: an absolute http(s) URL with an ASCII host, no credentials, no fragment.
pub fn parse(raw: &str, https_only: bool) -> Result<Url, Refused> {
    if raw.len() > 2048 {
        return Err(Refused::TooLong);
    }
    let scheme_end = raw.find("://").ok_or(Refused::Malformed)?;
    let scheme = raw[..scheme_end].to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(Refused::Scheme);
    }
    if https_only && scheme != "https" {
        return Err(Refused::HttpsRequired);
    }
    // The parser would turn a unicode host into punycode silently; ask for it spelled out.
    let authority = raw[scheme_end + 3..].split(['/', '?', '#']).next().unwrap_or_default();
    if !authority.is_ascii() {
        return Err(Refused::NonAsciiHost);
    }
    if !raw.is_ascii() || raw.chars().any(|c| c.is_ascii_whitespace() || c.is_ascii_control()) {
        return Err(Refused::Malformed);
    }
    let url = Url::parse(raw).map_err(|_| Refused::Malformed)?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refused::Userinfo);
    }
    if url.fragment().is_some() {
        return Err(Refused::Fragment);
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Refused::Malformed);
    }
    Ok(url)
}

/// The URL's host as an IP address, when it is one.
fn literal(url: &Url) -> Option<IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

/// Checks an IP-literal host (a resolver never sees those).
pub fn check_literal(url: &Url, allow_private: bool) -> Result<(), Refused> {
    literal(url).map_or(Ok(()), |ip| permitted(ip, allow_private))
}

/// The check at creation: syntax, then every address the host resolves to.
pub async fn check_url(raw: &str, https_only: bool, allow_private: bool) -> Result<Url, Refused> {
    let url = parse(raw, https_only)?;
    if literal(&url).is_some() {
        check_literal(&url, allow_private)?;
        return Ok(url);
    }
    let host = url.host_str().unwrap_or_default().to_owned();
    resolve_checked(&host, allow_private).await?;
    Ok(url)
}

/// Resolves `host` and keeps the permitted addresses; refuses when any address is refused (a host
/// with one internal address among public ones is an attack, not a mistake).
async fn resolve_checked(host: &str, allow_private: bool) -> Result<Vec<SocketAddr>, Refused> {
    if host.eq_ignore_ascii_case("localhost") || host.to_ascii_lowercase().ends_with(".localhost") {
        permitted(IpAddr::V4(Ipv4Addr::LOCALHOST), allow_private)?;
    }
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::lookup_host((host, 0))).await {
            Ok(Ok(a)) => a.collect(),
            _ => return Err(Refused::Unresolvable),
        };
    if addrs.is_empty() {
        return Err(Refused::Unresolvable);
    }
    for a in &addrs {
        permitted(a.ip(), allow_private)?;
    }
    Ok(addrs)
}

/// The delivery client's resolver: only addresses that pass the guard are ever returned.
#[derive(Debug, Clone, Copy)]
pub struct GuardedResolver {
    pub allow_private: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs = resolve_checked(&host, allow).await?;
            Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn internal_addresses_are_named() {
        for (addr, why) in [
            ("127.0.0.1", Refused::Loopback),
            ("127.8.9.10", Refused::Loopback),
            ("::1", Refused::Loopback),
            ("10.1.2.3", Refused::Private),
            ("172.16.0.1", Refused::Private),
            ("172.31.255.255", Refused::Private),
            ("192.168.1.1", Refused::Private),
            ("fd12::1", Refused::Private),
            ("169.254.1.1", Refused::LinkLocal),
            ("fe80::1", Refused::LinkLocal),
            ("100.64.0.1", Refused::SharedAddressSpace),
            ("100.127.255.255", Refused::SharedAddressSpace),
            ("224.0.0.1", Refused::Multicast),
            ("ff02::1", Refused::Multicast),
            ("255.255.255.255", Refused::Multicast),
            ("169.254.169.254", Refused::Metadata),
            ("100.100.100.200", Refused::Metadata),
            ("fd00:ec2::254", Refused::Metadata),
            ("0.0.0.0", Refused::Unspecified),
            ("::", Refused::Unspecified),
            ("::ffff:127.0.0.1", Refused::Loopback),
            ("::ffff:169.254.169.254", Refused::Metadata),
            ("64:ff9b::a00:1", Refused::Private),
            ("192.0.2.1", Refused::Reserved),
            ("240.0.0.1", Refused::Reserved),
        ] {
            assert_eq!(classify(ip(addr)), Some(why), "{addr}");
        }
        for public in ["1.1.1.1", "8.8.8.8", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "192.169.0.1"] {
            assert_eq!(classify(ip(public)), None, "{public}");
        }
    }

    #[test]
    fn private_networks_can_be_allowed_but_metadata_never() {
        assert!(permitted(ip("127.0.0.1"), true).is_ok());
        assert!(permitted(ip("10.0.0.1"), true).is_ok());
        assert_eq!(permitted(ip("169.254.169.254"), true), Err(Refused::Metadata));
        assert_eq!(permitted(ip("224.0.0.1"), true), Err(Refused::Multicast));
        assert_eq!(permitted(ip("127.0.0.1"), false), Err(Refused::Loopback));
    }

    #[test]
    fn syntax() {
        assert_eq!(parse("example.com/hook", false), Err(Refused::Malformed));
        assert_eq!(parse("file:///etc/passwd", false), Err(Refused::Scheme));
        assert_eq!(parse("file:/etc/passwd", false), Err(Refused::Malformed));
        assert_eq!(parse("ftp://example.com/", false), Err(Refused::Scheme));
        assert_eq!(parse("gopher://example.com/", false), Err(Refused::Scheme));
        assert_eq!(parse("http://example.com/", true), Err(Refused::HttpsRequired));
        assert_eq!(parse("https://user:pw@example.com/", false), Err(Refused::Userinfo));
        assert_eq!(parse("https://user@example.com/", false), Err(Refused::Userinfo));
        assert_eq!(parse("https://exämple.com/", false), Err(Refused::NonAsciiHost));
        assert_eq!(parse("https://example.com/#x", false), Err(Refused::Fragment));
        assert_eq!(parse(&format!("https://example.com/{}", "a".repeat(10_000)), false), Err(Refused::TooLong));
        assert!(parse("https://example.com/hooks?x=1", true).is_ok());
        assert!(parse("HTTPS://EXAMPLE.com:8443/h", true).is_ok());
    }
}
