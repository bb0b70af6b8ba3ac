//! Signed HTTP callbacks. Results whose job carried `ember-callback-url` wait on the
//! `ember.callbacks` queue; every dispatcher consumes it competitively and POSTs each result,
//! signed per Standard Webhooks, retrying with exponential backoff and jitter (honouring
//! Retry-After) up to an attempt count and an age, then dead-letters it to
//! `ember.callbacks.dead` with the last error. A message is acked only when delivered or
//! dead-lettered, so a dispatcher crash never loses a callback (it is redelivered).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ember_core::amqp::header_str;
use ember_core::protocol::header;
use ember_core::topology;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use ipnet::IpNet;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::Store;

/// Where callbacks that could not be delivered end up.
pub const CALLBACKS_DEAD_QUEUE: &str = "ember.callbacks.dead";

/// Retry settings.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub max_age: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// The wait after failed attempt `attempt` (1-based): the receiver's Retry-After when it
    /// gave one, else `initial * 2^(attempt-1)`, in both cases capped at `max_backoff`; the
    /// exponential one is jittered into its upper half (`jitter` in 0..=1).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        if let Some(retry_after) = retry_after {
            return retry_after.min(self.max_backoff);
        }
        let exponent = attempt.saturating_sub(1).min(30);
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << exponent)
            .min(self.max_backoff);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// The Standard Webhooks signing key from a `whsec_<base64>` secret (or raw text).
pub fn signing_key(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(encoded) => BASE64
            .decode(encoded)
            .unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    }
}

/// `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn sign(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return String::new();
    };
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

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
    fn check_before_send(&self, raw: &str) -> Result<(), String> {
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
fn refused_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a RefusedAddress> {
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(refused) = error.downcast_ref::<RefusedAddress>() {
            return Some(refused);
        }
        cause = error.source();
    }
    None
}

/// An error with its causes, `a: b: c`, for the dead-letter header and the log.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        let next = error.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = error.source();
    }
    text
}

/// Delivers callbacks.
pub struct CallbackSender {
    pub client: reqwest::Client,
    pub key: Vec<u8>,
    pub policy: RetryPolicy,
    pub guard: CallbackGuard,
    pub store: Store,
    pub metrics: Metrics,
}

impl std::fmt::Debug for CallbackSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackSender")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

enum Attempt {
    Delivered,
    Retry {
        error: String,
        retry_after: Option<Duration>,
    },
    GiveUp(String),
}

impl CallbackSender {
    async fn attempt(&self, url: &str, id: &str, body: &[u8]) -> Attempt {
        if let Err(error) = self.guard.check_before_send(url) {
            return Attempt::GiveUp(error);
        }
        let timestamp = ember_core::amqp::unix_ms() / 1000;
        let sent = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", sign(&self.key, id, timestamp, body))
            .body(body.to_vec())
            .send()
            .await;
        self.metrics.callback_attempts.inc();
        match sent {
            Ok(response) if response.status().is_success() => Attempt::Delivered,
            Ok(response) if response.status() == reqwest::StatusCode::GONE => {
                Attempt::GiveUp("the receiver answered 410 Gone".into())
            }
            Ok(response) if response.status().is_redirection() => Attempt::GiveUp(format!(
                "the receiver answered {}; redirects are not followed",
                response.status()
            )),
            Ok(response) => {
                let retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                Attempt::Retry {
                    error: format!("the receiver answered {}", response.status()),
                    retry_after,
                }
            }
            Err(error) => match refused_in(&error) {
                Some(refused) => Attempt::GiveUp(format!("refused: {refused}")),
                None => Attempt::Retry {
                    error: format!("request failed: {}", error_chain(&error)),
                    retry_after: None,
                },
            },
        }
    }

    async fn deliver(&self, channel: &Channel, delivery: Delivery, shutdown: &CancellationToken) {
        let headers = delivery.properties.headers().as_ref();
        let job_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|m| m.to_string())
            .unwrap_or_default();
        let Some(url) = header_str(headers, header::CALLBACK_URL).map(str::to_string) else {
            self.dead_letter(channel, delivery, "no callback URL", 0)
                .await;
            return;
        };
        if self
            .store
            .callback_delivered(&job_id)
            .await
            .unwrap_or(false)
        {
            self.metrics
                .callbacks
                .with_label_values(&["duplicate"])
                .inc();
            let _ = delivery.ack(BasicAckOptions::default()).await;
            return;
        }
        self.metrics.callbacks_pending.inc();
        let started = Instant::now();
        let mut attempt = 1;
        let outcome = loop {
            match self.attempt(&url, &job_id, &delivery.data).await {
                Attempt::Delivered => break Ok(()),
                Attempt::GiveUp(error) => break Err(error),
                Attempt::Retry { error, retry_after } => {
                    tracing::info!(job_id, attempt, %error, "callback attempt failed");
                    if attempt >= self.policy.max_attempts
                        || started.elapsed() >= self.policy.max_age
                    {
                        break Err(format!("{error} (after {attempt} attempts)"));
                    }
                    let delay = self.policy.delay(attempt, retry_after, rand::random());
                    tokio::select! {
                        () = shutdown.cancelled() => {
                            // Back to the queue: another dispatcher (or this one, restarted)
                            // takes it over.
                            self.metrics.callbacks_pending.dec();
                            let _ = delivery.nack(BasicNackOptions { requeue: true, ..BasicNackOptions::default() }).await;
                            return;
                        }
                        () = tokio::time::sleep(delay) => {}
                    }
                    attempt += 1;
                }
            }
        };
        self.metrics.callbacks_pending.dec();
        match outcome {
            Ok(()) => {
                let _ = self.store.mark_callback_delivered(&job_id).await;
                self.metrics
                    .callbacks
                    .with_label_values(&["delivered"])
                    .inc();
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            Err(error) => {
                tracing::warn!(job_id, %error, "callback dead-lettered");
                self.dead_letter(channel, delivery, &error, attempt).await;
            }
        }
    }

    async fn dead_letter(&self, channel: &Channel, delivery: Delivery, error: &str, attempts: u32) {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        headers.insert(
            ShortString::from("ember-callback-error"),
            AMQPValue::LongString(LongString::from(error)),
        );
        headers.insert(
            ShortString::from("ember-callback-attempts"),
            AMQPValue::LongInt(attempts as i32),
        );
        let properties = delivery.properties.clone().with_headers(headers);
        let published = async {
            channel
                .basic_publish(
                    "".into(),
                    CALLBACKS_DEAD_QUEUE.into(),
                    BasicPublishOptions::default(),
                    &delivery.data,
                    properties,
                )
                .await?
                .await
        }
        .await;
        match published {
            Ok(confirmation) if confirmation.is_ack() => {
                self.metrics
                    .callbacks
                    .with_label_values(&["dead_lettered"])
                    .inc();
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            _ => {
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            }
        }
    }
}

/// Consumes `ember.callbacks` until shutdown or connection loss; each delivery is a task in
/// `tracker`, so shutdown waits for the ones in hand.
pub async fn consume(
    channel: Channel,
    sender: Arc<CallbackSender>,
    concurrency: u16,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let setup = async {
        topology::declare_quorum_queue(&channel, CALLBACKS_DEAD_QUEUE).await?;
        channel
            .basic_qos(concurrency.max(1), BasicQosOptions::default())
            .await?;
        channel
            .basic_consume(
                topology::CALLBACKS_QUEUE.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }
    .await;
    let mut consumer = match setup {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::warn!(%error, "cannot consume callbacks");
            return;
        }
    };
    loop {
        let delivery = tokio::select! {
            () = shutdown.cancelled() => return,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                _ => return,
            },
        };
        let sender = sender.clone();
        let channel = channel.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move { sender.deliver(&channel, delivery, &shutdown).await });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        max_age: Duration::from_secs(3600),
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(10),
    };

    #[test]
    fn backoff_doubles_with_jitter_is_capped_and_honours_retry_after() {
        let table = [
            // (attempt, retry_after, jitter, expected)
            (1, None, 1.0, Duration::from_secs(1)),
            (1, None, 0.0, Duration::from_millis(500)),
            (2, None, 1.0, Duration::from_secs(2)),
            (3, None, 1.0, Duration::from_secs(4)),
            (4, None, 0.5, Duration::from_secs(6)),
            (5, None, 1.0, Duration::from_secs(10)),
            (40, None, 1.0, Duration::from_secs(10)),
            (1, Some(Duration::from_secs(7)), 0.0, Duration::from_secs(7)),
            (
                1,
                Some(Duration::from_secs(99)),
                0.0,
                Duration::from_secs(10),
            ),
        ];
        for (attempt, retry_after, jitter, expected) in table {
            assert_eq!(
                POLICY.delay(attempt, retry_after, jitter),
                expected,
                "attempt {attempt}, retry-after {retry_after:?}, jitter {jitter}"
            );
        }
    }

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example from the Standard Webhooks specification.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let signature = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

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
