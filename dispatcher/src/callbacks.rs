//! Signed HTTP callbacks. Results whose job carried `ember-callback-url` wait on the
//! `ember.callbacks` queue; every dispatcher consumes it competitively and POSTs each result,
//! signed per Standard Webhooks, retrying with exponential backoff and jitter (honouring
//! Retry-After) up to an attempt count and an age, then dead-letters it to
//! `ember.callbacks.dead` with the last error. A message is acked only when delivered or
//! dead-lettered, so a dispatcher crash never loses a callback (it is redelivered).

use std::net::IpAddr;
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

/// Whether an address is one a callback must not reach unless allow-listed: loopback,
/// private, link-local (cloud metadata lives there), unspecified, shared, unique-local.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || a == 0
                || (a == 100 && (64..128).contains(&b))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
    }
}

/// Checks a callback URL at submit time: http(s), resolvable, and not into an internal network
/// unless `allow` covers it.
pub async fn check_url(raw: &str, allow: &[IpNet]) -> Result<(), ApiError> {
    let invalid = |why: String| ApiError::bad_request("invalid_callback_url", why);
    let url = reqwest::Url::parse(raw).map_err(|e| invalid(format!("`{raw}`: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid(format!("`{raw}`: only http and https")));
    }
    let host = url
        .host_str()
        .ok_or_else(|| invalid(format!("`{raw}` has no host")))?;
    let port = url.port_or_known_default().unwrap_or(80);
    let literal = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<IpAddr> = match literal.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| invalid(format!("cannot resolve `{host}`: {e}")))?
            .map(|addr| addr.ip())
            .collect(),
    };
    for ip in addresses {
        if is_internal(ip) && !allow.iter().any(|net| net.contains(&ip)) {
            return Err(ApiError::bad_request(
                "callback_url_forbidden",
                format!(
                    "`{raw}` reaches {ip}, an internal address; allow-list it with \
                     --callback-allow-net if that is intended"
                ),
            ));
        }
    }
    Ok(())
}

/// Delivers callbacks.
pub struct CallbackSender {
    pub client: reqwest::Client,
    pub key: Vec<u8>,
    pub policy: RetryPolicy,
    pub allow: Vec<IpNet>,
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
        if let Err(error) = check_url(url, &self.allow).await {
            return Attempt::GiveUp(error.message);
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
            Err(error) => Attempt::Retry {
                error: format!("request failed: {error}"),
                retry_after: None,
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
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[tokio::test]
    async fn callback_urls_into_internal_networks_are_refused_unless_allow_listed() {
        let refused = check_url("http://127.0.0.1:9/hook", &[]).await;
        assert_eq!(refused.expect_err("refused").code, "callback_url_forbidden");
        let refused = check_url("http://169.254.169.254/latest/meta-data", &[]).await;
        assert_eq!(refused.expect_err("refused").code, "callback_url_forbidden");
        let refused = check_url("http://localhost:9/hook", &[]).await;
        assert_eq!(refused.expect_err("refused").code, "callback_url_forbidden");
        let allow: Vec<IpNet> = vec!["127.0.0.1/32".parse().expect("net")];
        assert!(check_url("http://127.0.0.1:9/hook", &allow).await.is_ok());
        let bad = check_url("ftp://example.com/x", &allow).await;
        assert_eq!(bad.expect_err("bad").code, "invalid_callback_url");
        let bad = check_url("not a url", &allow).await;
        assert_eq!(bad.expect_err("bad").code, "invalid_callback_url");
    }
}
