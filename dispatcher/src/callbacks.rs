//! Signed HTTP callbacks. Results whose job carried `ember-callback-url` wait on the
//! `ember.callbacks` queue; every dispatcher consumes it competitively and POSTs each result,
//! signed per Standard Webhooks, retrying with exponential backoff and jitter (honouring
//! Retry-After) up to an attempt count and an age, then dead-letters it to
//! `ember.callbacks.dead` with the last error. A message is acked only when delivered or
//! dead-lettered, so a dispatcher crash never loses a callback (it is redelivered). Where a
//! callback may go is [`crate::ssrf`]'s to say.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ember_core::amqp::{Headers, header_str};
use ember_core::protocol::header;
use ember_core::topology;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::ssrf::{CallbackGuard, refused_in};
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
        ember_core::retry::jittered_backoff(self.initial_backoff, self.max_backoff, attempt, jitter)
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

/// Every key's signature, space-separated, as Standard Webhooks lists several: a receiver
/// accepts the message when any of them verifies with its secret.
pub fn sign_all(keys: &[Vec<u8>], id: &str, timestamp: u64, body: &[u8]) -> String {
    keys.iter()
        .map(|key| sign(key, id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The callback secrets of a secrets file: one per line, blank lines and `#` comments skipped.
pub fn parse_secrets(text: &str) -> Vec<Vec<u8>> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(signing_key)
        .collect()
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
    /// Signing keys: each signs every callback (several while a secret is rotated).
    pub keys: Vec<Vec<u8>>,
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

/// The span of one callback attempt (a client request), in the job's trace (the result's
/// `traceparent` is the worker's job span); none with traces off.
fn attempt_span(traceparent: Option<&str>, job_id: &str, attempt: u32) -> tracing::Span {
    if !ember_core::otel::on() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: ember_core::otel::TARGET,
        "callback",
        otel.name = "POST callback",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        ember.job_id = job_id,
        ember.callback.attempt = attempt,
    );
    ember_core::otel::set_remote_parent(&span, traceparent);
    span
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
            .header(
                "webhook-signature",
                sign_all(&self.keys, id, timestamp, body),
            )
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
        let traceparent = header_str(headers, header::TRACEPARENT).map(str::to_string);
        let outcome = loop {
            let span = attempt_span(traceparent.as_deref(), &job_id, attempt);
            let tried = self.attempt(&url, &job_id, &delivery.data);
            let tried = tracing::Instrument::instrument(tried, span.clone()).await;
            if !span.is_disabled() {
                let status = if matches!(tried, Attempt::Delivered) {
                    "OK"
                } else {
                    "ERROR"
                };
                span.record("otel.status_code", status);
            }
            match tried {
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
        let mut headers = Headers::from(delivery.properties.headers().clone().unwrap_or_default());
        headers
            .text("ember-callback-error", error)
            .int32("ember-callback-attempts", attempts as i32);
        let properties = delivery
            .properties
            .clone()
            .with_headers(headers.into_table());
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
        topology::declare_bounded_queue(
            &channel,
            CALLBACKS_DEAD_QUEUE,
            topology::DEAD_LETTERS_MAX_LENGTH,
            "drop-head",
        )
        .await?;
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
    fn a_secrets_file_signs_with_each_of_its_secrets() {
        let keys = parse_secrets(
            "# rotating: the new secret first\n\nwhsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n  raw-old  \n",
        );
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1], b"raw-old".to_vec());
        let body = br#"{"test": 2432232314}"#;
        let all = sign_all(&keys, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        let listed: Vec<&str> = all.split(' ').collect();
        assert_eq!(
            listed,
            [
                "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=".to_string(),
                sign(b"raw-old", "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
            ]
        );
    }
}
