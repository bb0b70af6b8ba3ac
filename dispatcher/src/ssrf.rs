//! Where callbacks may go (the SSRF guard): no internal address unless `--callback-allow-net`
//! covers it, checked on the URL at submit time and again, by the callbacks' HTTP client's
//! resolver, when each attempt connects (so DNS rebinding cannot lead a callback inside).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::error::ApiError;

/// Whether an address is one a callback must not reach unless allow-listed: loopback, private,
/// link-local (where cloud metadata lives: 169.254.169.254, fd00:ec2::254), unspecified, shared
/// (100.64/10, Alibaba's metadata among them), unique-local, site-local, multicast, reserved;
/// and IPv6 forms that carry an IPv4 address (mapped, compatible, translated, NAT64, 6to4,
/// Teredo) when that address is one of these.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
                || (a == 192 && b == 0 && c == 0)
                || (a == 198 && (b & 0xfe) == 18)
                || a >= 224
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_ipv4(v6) {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] & 0xffc0) == 0xfec0
                || (s[0] & 0xff00) == 0xff00
                // 64:ff9b:1::/48, NAT64 for local use: where it leads is the operator's choice.
                || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)
        }
    }
}

/// The IPv4 address an IPv6 address stands for, where it is one of the forms that reach IPv4:
/// `::a.b.c.d` (compatible, and `::`/`::1` with it), `::ffff:a.b.c.d` (mapped),
/// `::ffff:0:a.b.c.d` (translated), `64:ff9b::a.b.c.d` (NAT64), `2002:aabb:ccdd::/48` (6to4),
/// `2001:0::/32` (Teredo, the client address inverted in the last 32 bits).
fn embedded_ipv4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    match s {
        [0, 0, 0, 0, 0, 0, ..]
        | [0, 0, 0, 0, 0, 0xffff, ..]
        | [0, 0, 0, 0, 0xffff, 0, ..]
        | [0x64, 0xff9b, 0, 0, 0, 0, ..] => Some(low),
        [0x2002, hi, lo, ..] => Some(Ipv4Addr::new(
            (hi >> 8) as u8,
            hi as u8,
            (lo >> 8) as u8,
            lo as u8,
        )),
        [0x2001, 0, ..] => Some(Ipv4Addr::from(!u32::from(low))),
        _ => None,
    }
}

/// Resolves names with the system resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_string();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// A name that resolved only to addresses a callback must not reach; the connect-time resolver's
/// error, recognised by the sender to give up at once.
#[derive(Debug, thiserror::Error)]
#[error(
    "`{host}` resolved to {}, internal at connect time; allow-list it with \
     --callback-allow-net if that is intended",
    addresses_text(.addresses)
)]
pub struct RefusedAddress {
    pub host: String,
    pub addresses: Vec<IpAddr>,
}

fn addresses_text(addresses: &[IpAddr]) -> String {
    let text: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
    text.join(", ")
}

/// Where callbacks may go: nowhere internal ([`is_internal`]) unless `--callback-allow-net`
/// covers it. Checked on the URL at submit time (resolving the name), and again when each
/// attempt connects: the callbacks' HTTP client resolves through [`CallbackGuard::resolver`],
/// which drops internal addresses, so a name that changes its answer after the submit-time
/// check (DNS rebinding) cannot lead a callback inside. The name resolver itself is injectable
/// (tests simulate rebinding with it).
#[derive(Clone)]
pub struct CallbackGuard {
    allow: Arc<[IpNet]>,
    names: Arc<dyn Resolve>,
}

impl std::fmt::Debug for CallbackGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackGuard")
            .field("allow", &self.allow)
            .finish_non_exhaustive()
    }
}

impl CallbackGuard {
    pub fn new(allow: Vec<IpNet>, names: Arc<dyn Resolve>) -> Self {
        Self {
            allow: allow.into(),
            names,
        }
    }

    /// With the system resolver.
    pub fn system(allow: Vec<IpNet>) -> Self {
        Self::new(allow, Arc::new(SystemResolver))
    }

    /// Whether a callback may connect to `ip`: not internal, or allow-listed (an IPv6 form of
    /// an IPv4 address is allowed where the IPv4 address is).
    pub fn permits(&self, ip: IpAddr) -> bool {
        if !is_internal(ip) {
            return true;
        }
        let v4 = match ip {
            IpAddr::V6(v6) => embedded_ipv4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.allow
            .iter()
            .any(|net| net.contains(&ip) || v4.is_some_and(|v4| net.contains(&v4)))
    }

    /// The resolver for the callbacks' HTTP client: the names resolver, less every address
    /// [`CallbackGuard::permits`] refuses; a name left with none fails with [`RefusedAddress`].
    pub fn resolver(&self) -> Arc<dyn Resolve> {
        Arc::new(GuardedResolver(self.clone()))
    }

    /// The HTTP client for callbacks: connects only where the guard permits, follows no
    /// redirects, and ignores proxy settings (through a proxy the target is never resolved
    /// here, so the guard could not hold).
    pub fn http_client(&self, timeout: Duration) -> reqwest::Result<reqwest::Client> {
        reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .dns_resolver(self.resolver())
            .user_agent("ember-dispatcher")
            .build()
    }

    /// Checks a callback URL at submit time: http(s), a host that resolves, and nothing it
    /// resolves to internal unless allow-listed.
    pub async fn check_url(&self, raw: &str) -> Result<(), ApiError> {
        let invalid = |why: String| ApiError::bad_request("invalid_callback_url", why);
        let url = parse_url(raw).map_err(invalid)?;
        let addresses: Vec<IpAddr> = match host(&url) {
            Some(Host::Ip(ip)) => vec![ip],
            Some(Host::Name(host)) => {
                let name = Name::from_str(host)
                    .map_err(|_| invalid(format!("`{raw}`: `{host}` is not a host name")))?;
                let resolved = self
                    .names
                    .resolve(name)
                    .await
                    .map_err(|e| invalid(format!("cannot resolve `{host}`: {e}")))?
                    .map(|addr| addr.ip())
                    .collect::<Vec<_>>();
                if resolved.is_empty() {
                    return Err(invalid(format!("`{host}` resolves to no address")));
                }
                resolved
            }
            None => return Err(invalid(format!("`{raw}` has no host"))),
        };
        if let Some(ip) = addresses.into_iter().find(|ip| !self.permits(*ip)) {
            return Err(ApiError::bad_request(
                "callback_url_forbidden",
                format!(
                    "`{raw}` reaches {ip}, an internal address; allow-list it with \
                     --callback-allow-net if that is intended"
                ),
            ));
        }
        Ok(())
    }

    /// The check before each attempt: the URL parses, and an IP literal is permitted (the HTTP
    /// client connects to literals without resolving them, so its resolver never sees them;
    /// names are checked there, at connect time).
    pub(crate) fn check_before_send(&self, raw: &str) -> Result<(), String> {
        let url = parse_url(raw)?;
        let ip = match host(&url) {
            Some(Host::Ip(ip)) => ip,
            Some(Host::Name(_)) => return Ok(()),
            None => return Err(format!("`{raw}` has no host")),
        };
        if self.permits(ip) {
            Ok(())
        } else {
            Err(format!(
                "`{raw}` reaches {ip}, an internal address; allow-list it with \
                 --callback-allow-net if that is intended"
            ))
        }
    }
}

/// Where a URL points: an IP literal or a name.
enum Host<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

/// The URL's host; the URL parser has already normalised IPv4 forms such as `2130706433` or
/// `0x7f.1` to dotted quads, and IPv6 literals come bracketed.
fn host(url: &reqwest::Url) -> Option<Host<'_>> {
    let host = url.host_str()?;
    let literal = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some(match literal.parse::<IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => Host::Name(host),
    })
}

fn parse_url(raw: &str) -> Result<reqwest::Url, String> {
    let url = reqwest::Url::parse(raw).map_err(|e| format!("`{raw}`: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("`{raw}`: only http and https"));
    }
    Ok(url)
}

struct GuardedResolver(CallbackGuard);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let (permitted, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = guard
                .names
                .resolve(name)
                .await?
                .partition(|addr| guard.permits(addr.ip()));
            if permitted.is_empty() && !refused.is_empty() {
                let addresses = refused.iter().map(SocketAddr::ip).collect();
                return Err(Box::new(RefusedAddress { host, addresses }) as _);
            }
            if !refused.is_empty() {
                tracing::info!(host, refused = %addresses_text(&refused.iter().map(SocketAddr::ip).collect::<Vec<_>>()), "callback: internal addresses of a name dropped");
            }
            Ok(Box::new(permitted.into_iter()) as Addrs)
        })
    }
}

/// The connect-time refusal in a failed request's chain of causes, if that is why it failed.
pub(crate) fn refused_in<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a RefusedAddress> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(refused) = error.downcast_ref::<RefusedAddress>() {
            return Some(refused);
        }
        cause = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "100.100.100.200",
            "100.127.255.255",
            "192.0.0.1",
            "198.18.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fd00:ec2::254",
            "fc00::1",
            "fdff:ffff::1",
            "fe80::1",
            "febf::1",
            "fec0::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:7f00:1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::169.254.169.254",
            "::ffff:0:127.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "100.63.255.255",
            "100.128.0.1",
            "172.32.0.1",
            "203.0.113.7",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "2001:4860:4860::8888",
        ] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[test]
    fn allow_lists_cover_the_ipv6_forms_of_an_allowed_ipv4_address() {
        let guard = CallbackGuard::system(vec!["127.0.0.1/32".parse().expect("net")]);
        assert!(guard.permits("127.0.0.1".parse().expect("ip")));
        assert!(guard.permits("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!guard.permits("127.0.0.2".parse().expect("ip")));
        assert!(!guard.permits("::1".parse().expect("ip")));
        assert!(guard.permits("8.8.8.8".parse().expect("ip")));
    }

    /// Answers each name from a script: the first lookup of `name` gets `first`, later ones
    /// `later`; counts lookups.
    struct Rebinding {
        name: &'static str,
        first: IpAddr,
        later: Vec<IpAddr>,
        lookups: std::sync::atomic::AtomicUsize,
    }

    impl Resolve for Rebinding {
        fn resolve(&self, name: Name) -> Resolving {
            let n = self
                .lookups
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let answer: Vec<SocketAddr> = if name.as_str() != self.name {
                vec![]
            } else if n == 0 {
                vec![SocketAddr::new(self.first, 0)]
            } else {
                self.later
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, 0))
                    .collect()
            };
            Box::pin(async move { Ok(Box::new(answer.into_iter()) as Addrs) })
        }
    }

    fn rebinding(later: &[&str]) -> Arc<Rebinding> {
        Arc::new(Rebinding {
            name: "rebind.test",
            first: "203.0.113.7".parse().expect("ip"),
            later: later.iter().map(|ip| ip.parse().expect("ip")).collect(),
            lookups: Default::default(),
        })
    }

    #[tokio::test]
    async fn a_name_that_rebinds_to_loopback_after_the_check_is_refused_at_connect_time() {
        let names = rebinding(&["127.0.0.1"]);
        let guard = CallbackGuard::new(vec![], names.clone());
        // Submit time: public.
        assert!(guard.check_url("http://rebind.test/hook").await.is_ok());
        // Connect time: loopback, refused by the client's resolver.
        let resolved = guard
            .resolver()
            .resolve(Name::from_str("rebind.test").expect("name"))
            .await;
        let error = resolved.err().expect("refused");
        let refused = refused_in(error.as_ref()).expect("a RefusedAddress");
        assert_eq!(
            refused.addresses,
            vec!["127.0.0.1".parse::<IpAddr>().expect("ip")]
        );
        assert_eq!(names.lookups.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_rebinding_name_is_never_connected_to_by_the_callback_client() {
        // A receiver on loopback that must stay untouched.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = accepted.clone();
        let accept = tokio::spawn(async move {
            if listener.accept().await.is_ok() {
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let guard = CallbackGuard::new(vec![], rebinding(&["127.0.0.1", "::1"]));
        let url = format!("http://rebind.test:{port}/hook");
        assert!(guard.check_url(&url).await.is_ok());
        let client = guard.http_client(Duration::from_secs(5)).expect("client");
        let error = client.post(&url).send().await.expect_err("refused");
        let refused = refused_in(&error).expect("a RefusedAddress in the error's causes");
        assert_eq!(refused.host, "rebind.test");
        assert!(refused.to_string().contains("127.0.0.1, ::1"), "{refused}");
        tokio::task::yield_now().await;
        assert!(!accepted.load(std::sync::atomic::Ordering::SeqCst));
        accept.abort();
    }

    #[tokio::test]
    async fn a_name_with_public_and_internal_addresses_keeps_only_the_public_ones() {
        let guard = CallbackGuard::new(vec![], rebinding(&["10.0.0.1", "203.0.113.8"]));
        let _ = guard.check_url("http://rebind.test/").await;
        let addrs: Vec<IpAddr> = guard
            .resolver()
            .resolve(Name::from_str("rebind.test").expect("name"))
            .await
            .map(|a| a.map(|a| a.ip()).collect())
            .unwrap_or_default();
        assert_eq!(addrs, vec!["203.0.113.8".parse::<IpAddr>().expect("ip")]);
    }

    #[test]
    fn ip_literals_are_checked_before_each_send() {
        let guard = CallbackGuard::system(vec!["127.0.0.1/32".parse().expect("net")]);
        for url in [
            "http://[::1]/hook",
            "http://[::ffff:10.0.0.1]/",
            "http://[fe80::1]/",
            "http://[fc00::1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00:ec2::254]/",
            "http://100.64.0.1/",
            "http://2130706434/",
            "http://0x7f.0.0.2/",
        ] {
            let refused = guard.check_before_send(url);
            assert!(refused.is_err(), "{url}");
        }
        for url in [
            "http://127.0.0.1:9/hook",
            "http://[::ffff:127.0.0.1]:9/",
            "http://example.invalid/",
            "https://203.0.113.7/",
        ] {
            assert!(guard.check_before_send(url).is_ok(), "{url}");
        }
    }

    #[tokio::test]
    async fn callback_urls_into_internal_networks_are_refused_unless_allow_listed() {
        let none = CallbackGuard::system(vec![]);
        for url in [
            "http://127.0.0.1:9/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://localhost:9/hook",
            "http://[::1]/",
            "http://[::ffff:127.0.0.1]/",
            "http://[fe80::1]/",
            "http://[fc00::1]/",
            "http://100.64.0.1/",
            "http://2130706433/",
            "http://127.1/",
        ] {
            let refused = none.check_url(url).await;
            assert_eq!(
                refused.expect_err("refused").code,
                "callback_url_forbidden",
                "{url}"
            );
        }
        let allow = CallbackGuard::system(vec!["127.0.0.1/32".parse().expect("net")]);
        assert!(allow.check_url("http://127.0.0.1:9/hook").await.is_ok());
        let bad = allow.check_url("ftp://example.com/x").await;
        assert_eq!(bad.expect_err("bad").code, "invalid_callback_url");
        let bad = allow.check_url("not a url").await;
        assert_eq!(bad.expect_err("bad").code, "invalid_callback_url");
    }
}
