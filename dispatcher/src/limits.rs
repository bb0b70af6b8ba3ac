//! Request limits of the API: header size and count, token-bucket request rates (per tenant, per
//! client address without auth, and for wrong tokens per client address), and the client's
//! address behind trusted proxies.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// A request rate: `count` requests per `period`, e.g. `50/s`, `3000/min`, `5/10s`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub count: u32,
    pub period: Duration,
}

impl Rate {
    pub fn per_second(&self) -> f64 {
        f64::from(self.count) / self.period.as_secs_f64()
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let wrong = || format!("`{text}`: expected <count>/<period>, e.g. 50/s, 3000/min, 5/10s");
        let (count, period) = text.trim().split_once('/').ok_or_else(wrong)?;
        let count: u32 = count.trim().parse().map_err(|_| wrong())?;
        let period = period.trim();
        let period = if period.starts_with(|c: char| c.is_ascii_digit()) {
            humantime::parse_duration(period)
        } else {
            humantime::parse_duration(&format!("1{period}"))
        }
        .map_err(|e| format!("{}: {e}", wrong()))?;
        if count == 0 || period.is_zero() {
            return Err(format!(
                "`{text}`: the count and the period must be positive"
            ));
        }
        Ok(Self { count, period })
    }
}

/// Whom a bucket belongs to: a tenant's one bucket (`Token(0)` in its own limiter) or a client
/// address (IPv6 by its /64, what one host usually holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    Token(usize),
    Address(IpAddr),
}

impl Client {
    pub fn address(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::Address(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self::Address(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self::Address(IpAddr::V6(Ipv6Addr::from(prefix)))
                }
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

const SHARDS: usize = 16;
/// A shard holding more buckets than this drops the full ones (a full bucket is the same as
/// none), so addresses seen once do not pile up.
const SHARD_SWEEP_AT: usize = 1024;

/// Token buckets per client: `burst` requests at once, refilled at the rate. Sharded so that
/// requests of different clients rarely meet on a lock, and each lock is held for a few
/// arithmetic operations.
#[derive(Debug)]
pub struct RateLimiter {
    per_second: f64,
    burst: f64,
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<Client, Bucket>>>,
}

impl RateLimiter {
    /// `burst` defaults to the rate's count.
    pub fn new(rate: Rate, burst: Option<u32>) -> Self {
        Self {
            per_second: rate.per_second(),
            burst: f64::from(burst.unwrap_or(rate.count).max(1)),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Takes one token from `client`'s bucket at `now`; when there is none, how long until
    /// there is (for Retry-After).
    pub fn check(&self, client: Client, now: Instant) -> Result<(), Duration> {
        self.take(client, now, true)
    }

    /// Whether `client`'s bucket holds a token at `now`, without taking it.
    pub fn available(&self, client: Client, now: Instant) -> Result<(), Duration> {
        self.take(client, now, false)
    }

    fn take(&self, client: Client, now: Instant, consume: bool) -> Result<(), Duration> {
        let shard = self.hasher.hash_one(client) as usize % SHARDS;
        let Ok(mut buckets) = self.shards[shard].lock() else {
            // A panic while holding the lock cannot leave a bucket half-written (plain
            // arithmetic); but do not fail requests over it.
            return Ok(());
        };
        if buckets.len() >= SHARD_SWEEP_AT && !buckets.contains_key(&client) {
            let (per_second, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_second < burst
            });
        }
        let bucket = buckets.entry(client).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            if consume {
                bucket.tokens -= 1.0;
            }
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

/// The client's address: the TCP peer's, unless the peer is a trusted proxy; then the nearest
/// address in `header` (a comma-separated chain, each proxy appending the address it saw) that
/// is not itself a trusted proxy. An entry that does not parse ends the walk: what lies left of
/// it cannot be trusted, so the address right of it (a proxy's) is taken.
pub fn client_ip(
    peer: IpAddr,
    headers: &HeaderMap,
    header: &axum::http::HeaderName,
    trusted: &[IpNet],
) -> IpAddr {
    let trusted_ip = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !trusted_ip(&peer) {
        return peer;
    }
    let chain: Vec<&str> = headers
        .get_all(header)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let mut client = peer;
    for entry in chain.iter().rev() {
        let entry = entry.trim();
        let parsed = entry
            .parse::<IpAddr>()
            .ok()
            .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|s| s.ip()));
        let Some(ip) = parsed else {
            return client;
        };
        client = ip;
        if !trusted_ip(&ip) {
            return ip;
        }
    }
    client
}

/// Whether a request's headers fit: at most `max_count` fields and `max_bytes` bytes (each
/// field counted as on the wire, `name: value\r\n`). The excess, if any, for the message.
pub fn check_headers(
    headers: &HeaderMap,
    max_count: usize,
    max_bytes: usize,
) -> Result<(), String> {
    let count = headers.len();
    if count > max_count {
        return Err(format!(
            "{count} header fields; at most {max_count} are accepted"
        ));
    }
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if bytes > max_bytes {
        return Err(format!(
            "{bytes} bytes of header fields; at most {max_bytes} are accepted"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units_and_periods() {
        let table = [
            ("50/s", 50, Duration::from_secs(1)),
            ("3000/min", 3000, Duration::from_secs(60)),
            ("3000/m", 3000, Duration::from_secs(60)),
            ("10/h", 10, Duration::from_secs(3600)),
            ("5/10s", 5, Duration::from_secs(10)),
            (" 7 / 500ms ", 7, Duration::from_millis(500)),
        ];
        for (text, count, period) in table {
            assert_eq!(text.parse::<Rate>(), Ok(Rate { count, period }), "{text}");
        }
        for bad in ["", "50", "x/s", "0/s", "5/0s", "5/fortnight", "-1/s", "5/"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        assert_eq!("600/min".parse::<Rate>().map(|r| r.per_second()), Ok(10.0));
    }

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_the_rate() {
        let limiter = RateLimiter::new(
            "2/s".parse().unwrap_or(Rate {
                count: 2,
                period: Duration::from_secs(1),
            }),
            Some(3),
        );
        let start = Instant::now();
        let a = Client::Token(0);
        let b = Client::Token(1);
        for _ in 0..3 {
            assert_eq!(limiter.check(a, start), Ok(()));
        }
        // Empty: the next token in half a second.
        assert_eq!(limiter.check(a, start), Err(Duration::from_millis(500)));
        // Another client has its own bucket.
        assert_eq!(limiter.check(b, start), Ok(()));
        // 250 ms on: half a token, a quarter second to go.
        let later = start + Duration::from_millis(250);
        assert_eq!(limiter.check(a, later), Err(Duration::from_millis(250)));
        let later = start + Duration::from_millis(500);
        assert_eq!(limiter.check(a, later), Ok(()));
        assert!(limiter.check(a, later).is_err());
        // A long pause refills only up to the burst.
        let much_later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert_eq!(limiter.check(a, much_later), Ok(()));
        }
        assert!(limiter.check(a, much_later).is_err());
    }

    #[test]
    fn idle_clients_are_swept_and_the_map_stays_bounded() {
        let limiter = RateLimiter::new(
            Rate {
                count: 1000,
                period: Duration::from_secs(1),
            },
            Some(1),
        );
        let start = Instant::now();
        for i in 0..20_000u32 {
            let ip = IpAddr::from(i.to_be_bytes());
            let now = start + Duration::from_millis(u64::from(i));
            assert_eq!(limiter.check(Client::address(ip), now), Ok(()));
        }
        let held: usize = limiter
            .shards
            .iter()
            .map(|s| s.lock().map(|s| s.len()).unwrap_or(0))
            .sum();
        assert!(held <= SHARDS * SHARD_SWEEP_AT, "{held}");
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_64_and_mapped_ipv4_is_ipv4() {
        let one = Client::address("2001:db8:1:2::1".parse().unwrap_or(IpAddr::from([0u8; 16])));
        let two = Client::address(
            "2001:db8:1:2:ffff::9"
                .parse()
                .unwrap_or(IpAddr::from([0u8; 16])),
        );
        let other = Client::address("2001:db8:1:3::1".parse().unwrap_or(IpAddr::from([0u8; 16])));
        assert_eq!(one, two);
        assert_ne!(one, other);
        let mapped = Client::address(
            "::ffff:192.0.2.1"
                .parse()
                .unwrap_or(IpAddr::from([0u8; 16])),
        );
        assert_eq!(mapped, Client::Address(IpAddr::from([192, 0, 2, 1])));
    }

    #[test]
    fn available_looks_without_taking() {
        let limiter = RateLimiter::new(
            Rate {
                count: 1,
                period: Duration::from_secs(60),
            },
            Some(1),
        );
        let now = Instant::now();
        let client = Client::Token(0);
        for _ in 0..3 {
            assert_eq!(limiter.available(client, now), Ok(()));
        }
        assert_eq!(limiter.check(client, now), Ok(()));
        assert!(limiter.available(client, now).is_err());
    }

    #[test]
    fn the_client_address_comes_from_a_trusted_proxy_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0u8; 4]));
        let trusted: Vec<IpNet> = ["10.0.0.0/8", "fd00::/8"]
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        let header = axum::http::HeaderName::from_static("x-forwarded-for");
        let table: [(&str, &[&str], &str); 9] = [
            // An untrusted peer's header is ignored, whatever it says.
            ("203.0.113.9", &["198.51.100.1"], "203.0.113.9"),
            // A trusted proxy: the nearest untrusted address.
            ("10.0.0.2", &["198.51.100.1"], "198.51.100.1"),
            // A client cannot push itself further left: the proxy appended the real peer.
            ("10.0.0.2", &["1.1.1.1, 198.51.100.1"], "198.51.100.1"),
            // Through two trusted proxies.
            ("10.0.0.2", &["198.51.100.1, 10.0.0.7"], "198.51.100.1"),
            // Repeated header fields are one chain.
            ("10.0.0.2", &["198.51.100.1", "10.0.0.7"], "198.51.100.1"),
            // No header: the proxy itself.
            ("10.0.0.2", &[], "10.0.0.2"),
            // Garbage ends the walk at the last address to its right.
            (
                "10.0.0.2",
                &["198.51.100.1, nonsense, 10.0.0.7"],
                "10.0.0.7",
            ),
            // Ports and IPv6.
            ("fd00::1", &["[2001:db8::5]:4431"], "2001:db8::5"),
            ("10.0.0.2", &["198.51.100.1:5000"], "198.51.100.1"),
        ];
        for (peer, values, want) in table {
            let mut headers = HeaderMap::new();
            for value in values {
                headers.append(
                    &header,
                    axum::http::HeaderValue::from_str(value)
                        .unwrap_or(axum::http::HeaderValue::from_static("")),
                );
            }
            assert_eq!(
                client_ip(ip(peer), &headers, &header, &trusted),
                ip(want),
                "{peer} {values:?}"
            );
        }
    }

    #[test]
    fn headers_are_limited_by_count_and_bytes() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "a",
            "1".parse()
                .unwrap_or(axum::http::HeaderValue::from_static("")),
        );
        headers.insert(
            "bb",
            "22".parse()
                .unwrap_or(axum::http::HeaderValue::from_static("")),
        );
        // a: 1\r\n = 6, bb: 22\r\n = 8.
        assert_eq!(check_headers(&headers, 2, 14), Ok(()));
        assert!(check_headers(&headers, 1, 14).is_err_and(|e| e.contains("2 header fields")));
        assert!(check_headers(&headers, 2, 13).is_err_and(|e| e.contains("14 bytes")));
    }
}
