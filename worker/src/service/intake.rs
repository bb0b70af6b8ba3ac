//! Intake: a delivery becomes a [`Job`] (its envelope: who to answer, how, by when) and its body
//! becomes the model's input ([`Prepared`], off the async runtime when large), handed to the
//! batcher. A job refused here (cancelled, expired, malformed) is answered at once.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ember_core::amqp::{header_flag, header_str, header_u64, unix_ms};
use ember_core::protocol::header;
use ember_core::{otel, topology};
use lapin::message::Delivery;
use lapin::types::{LongString, ShortString};
use lapin::{Acker, BasicProperties, Channel};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::Context;
use super::reply::{Answer, finish};
use crate::Error;
use crate::process::{Pipeline, Prepared};

/// Bodies up to this size are decoded on the async runtime instead of the blocking pool.
const INLINE_DECODE_BYTES: usize = 16 * 1024;

/// What a job's properties say about it, read without the broker. Everything here comes from
/// the client that published the job: untrusted input, decoded without panics.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// `message_id`, or a fresh UUID when the client sent none.
    pub job_id: String,
    pub reply_to: Option<ShortString>,
    pub correlation_id: Option<ShortString>,
    pub callback_url: Option<LongString>,
    pub traceparent: Option<LongString>,
    /// The result is to be stored (`ember-store-result`, or a callback URL): it goes to
    /// `ember.results.stored` instead of `ember.results`.
    pub store_result: bool,
    /// 1 for the first delivery, 2 after one redelivery, ...
    pub attempt: u32,
    pub submitted_at_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub content_type: Option<String>,
    /// The binary tensor extension's JSON header length (`inference-header-content-length`).
    pub header_length: Option<String>,
}

/// Decodes a job's envelope from its AMQP properties and the delivery's `redelivered` flag.
pub fn decode_envelope(properties: &BasicProperties, redelivered: bool) -> Envelope {
    let headers = properties.headers().as_ref();
    let delivery_count = header_u64(headers, header::DELIVERY_COUNT);
    let prior = header_u64(headers, header::PRIOR_DELIVERIES).unwrap_or(0);
    let deliveries = match delivery_count {
        Some(count) => count.saturating_add(1),
        None if redelivered => 2,
        None => 1,
    };
    let attempt = u32::try_from(deliveries.saturating_add(prior)).unwrap_or(u32::MAX);
    let long = |name: &str| header_str(headers, name).map(LongString::from);
    let callback_url = long(header::CALLBACK_URL);
    Envelope {
        job_id: properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        reply_to: properties.reply_to().clone(),
        correlation_id: properties.correlation_id().clone(),
        store_result: header_flag(headers, header::STORE_RESULT) || callback_url.is_some(),
        callback_url,
        traceparent: long(header::TRACEPARENT),
        attempt,
        submitted_at_ms: header_u64(headers, header::SUBMITTED_AT),
        deadline_ms: header_u64(headers, header::DEADLINE),
        content_type: properties
            .content_type()
            .as_ref()
            .map(|ct| ct.as_str().to_string()),
        header_length: header_str(headers, header::INFERENCE_HEADER_LENGTH)
            .map(str::to_string)
            .or_else(|| {
                header_u64(headers, header::INFERENCE_HEADER_LENGTH).map(|n| n.to_string())
            }),
    }
}

/// A whole job as the worker decodes it: the envelope, then the body prepared for the model.
/// The service runs the two steps apart (the body only when the job is neither cancelled nor
/// expired, and large bodies off the runtime); this is both in one call, for tests and fuzzing.
pub fn decode_job(
    properties: &BasicProperties,
    redelivered: bool,
    body: &[u8],
    pipeline: &Pipeline,
) -> (Envelope, Result<Prepared, Error>) {
    let envelope = decode_envelope(properties, redelivered);
    let prepared = pipeline.prepare(
        envelope.content_type.as_deref(),
        envelope.header_length.as_deref(),
        body,
    );
    (envelope, prepared)
}

/// A job in hand: its envelope and what is needed to ack it.
#[derive(Debug)]
pub struct Job {
    pub acker: Acker,
    pub envelope: Envelope,
    pub arrived: Instant,
    /// How long its body took to prepare (decode, preprocess).
    pub prepare: Duration,
    /// The job's span, with traces on (ended when the job is settled); else none.
    pub span: tracing::Span,
    /// Its wait for a batch, from its preparation to its run (traces on).
    pub batch_wait: tracing::Span,
}

impl Job {
    /// Splits a delivery into the job and its body.
    pub fn from_delivery(delivery: Delivery) -> (Job, Vec<u8>) {
        let Delivery {
            acker,
            properties,
            data,
            redelivered,
            ..
        } = delivery;
        let job = Job {
            acker,
            envelope: decode_envelope(&properties, redelivered),
            arrived: Instant::now(),
            prepare: Duration::ZERO,
            span: tracing::Span::none(),
            batch_wait: tracing::Span::none(),
        };
        (job, data)
    }

    /// Starts the job's trace (traces on): its time in the queue, from the submission stamp to
    /// now, as a span under the publish that sent it, and the job's own span, continuing the
    /// publisher's trace (its `traceparent`; a job without one starts a trace).
    pub fn start_trace(&mut self, model: &str) {
        let traceparent = self.envelope.traceparent.as_ref().map(|t| t.to_string());
        let parent = otel::remote(traceparent.as_deref());
        let queue = topology::jobs_queue(model);
        if let Some(at) = self.envelope.submitted_at_ms {
            let start = UNIX_EPOCH + Duration::from_millis(at);
            let now = SystemTime::now();
            if start <= now {
                otel::record_span(
                    "queue",
                    &parent,
                    start,
                    now,
                    vec![otel::KeyValue::new(
                        "messaging.destination.name",
                        queue.clone(),
                    )],
                );
            }
        }
        let span = tracing::info_span!(
            target: otel::TARGET,
            parent: None,
            "process",
            otel.name = format!("process {queue}"),
            otel.kind = "consumer",
            otel.status_code = tracing::field::Empty,
            messaging.system = "rabbitmq",
            messaging.operation.type = "process",
            messaging.destination.name = queue,
            messaging.message.id = self.envelope.job_id.as_str(),
            ember.attempt = self.envelope.attempt,
        );
        otel::set_remote_parent(&span, traceparent.as_deref());
        self.span = span;
    }

    pub fn id(&self) -> &str {
        &self.envelope.job_id
    }

    /// By how many milliseconds the deadline has passed, if it has.
    pub fn expired_by(&self, now_ms: u64) -> Option<u64> {
        self.envelope
            .deadline_ms
            .filter(|&deadline| now_ms > deadline)
            .map(|deadline| now_ms - deadline)
    }

    /// Time since the client submitted it (or since it arrived here, without a timestamp).
    pub fn queue_wait(&self, now_ms: u64) -> Duration {
        match self.envelope.submitted_at_ms {
            Some(at) if at <= now_ms => Duration::from_millis(now_ms - at),
            _ => self.arrived.elapsed(),
        }
    }
}

/// Takes one delivery: answers a cancelled or expired job at once, else prepares it (off the
/// runtime when large) and hands it to the batcher.
pub fn accept(
    ctx: &Arc<Context>,
    publisher: &Channel,
    tracker: &TaskTracker,
    prepared_tx: &mpsc::Sender<(Job, Prepared)>,
    delivery: Delivery,
) {
    ctx.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    ctx.metrics.in_flight.inc();
    let (mut job, body) = Job::from_delivery(delivery);
    if otel::on() {
        job.start_trace(&ctx.model);
    }
    chaos_crash_on(&body);
    if let Some(error) = ctx.refusal(&job, unix_ms()) {
        tracker.spawn(finish(
            ctx.clone(),
            publisher.clone(),
            vec![Answer::failed(job, error)],
        ));
        return;
    }
    ctx.stats.preparing.fetch_add(1, Ordering::SeqCst);
    let (ctx, publisher, prepared_tx) = (ctx.clone(), publisher.clone(), prepared_tx.clone());
    tracker.spawn(async move {
        let mut job = job;
        let started = Instant::now();
        let decode = otel::step(&job.span, "decode");
        let prepared = prepare(&ctx, &job.envelope, body).instrument(decode).await;
        job.prepare = started.elapsed();
        job.batch_wait = otel::step(&job.span, "batch wait");
        ctx.stats.preparing.fetch_sub(1, Ordering::SeqCst);
        match prepared {
            // A closed batcher (connection lost) drops the job: the broker redelivers it.
            Ok(prepared) => drop(prepared_tx.send((job, prepared)).await),
            Err(error) => finish(ctx, publisher, vec![Answer::failed(job, error)]).await,
        }
    });
}

async fn prepare(
    ctx: &Arc<Context>,
    envelope: &Envelope,
    body: Vec<u8>,
) -> Result<Prepared, Error> {
    // Small bodies decode in microseconds: a hop to the blocking pool costs more than that.
    if body.len() <= INLINE_DECODE_BYTES {
        return ctx.engine.pipeline.prepare(
            envelope.content_type.as_deref(),
            envelope.header_length.as_deref(),
            &body,
        );
    }
    let (content_type, header_length) = (
        envelope.content_type.clone(),
        envelope.header_length.clone(),
    );
    let pipeline = ctx.engine.pipeline.clone();
    tokio::task::spawn_blocking(move || {
        pipeline.prepare(content_type.as_deref(), header_length.as_deref(), &body)
    })
    .await
    .unwrap_or_else(|e| Err(Error::Internal(format!("preprocessing panicked: {e}"))))
}

/// Fault injection for the chaos suite (docs/chaos.md), off unless the hidden variable
/// `EMBER_WORKER_CHAOS_CRASH_ON` is set: a job whose body contains its (non-empty) value aborts
/// the process, as a model that crashes on one input would.
fn chaos_crash_on(body: &[u8]) {
    static MARKER: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    let marker = MARKER.get_or_init(|| {
        std::env::var_os("EMBER_WORKER_CHAOS_CRASH_ON")
            .map(|m| m.into_encoded_bytes())
            .filter(|m| !m.is_empty())
    });
    if let Some(marker) = marker
        && body.windows(marker.len()).any(|w| w == marker.as_slice())
    {
        tracing::error!("EMBER_WORKER_CHAOS_CRASH_ON matched a job: aborting (fault injection)");
        std::process::abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldTable};

    fn properties(headers: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert(ShortString::from(*name), value.clone());
        }
        BasicProperties::default()
            .with_message_id("job-1".into())
            .with_content_type("application/json".into())
            .with_headers(table)
    }

    #[test]
    fn the_envelope_counts_deliveries_across_the_retry_lane_and_reads_every_header() {
        let envelope = decode_envelope(
            &properties(&[
                (header::DELIVERY_COUNT, AMQPValue::LongLongInt(1)),
                (header::PRIOR_DELIVERIES, AMQPValue::LongLongInt(2)),
                (header::DEADLINE, AMQPValue::LongLongInt(1_000)),
                (header::INFERENCE_HEADER_LENGTH, AMQPValue::LongLongInt(42)),
                (
                    header::CALLBACK_URL,
                    AMQPValue::LongString("http://h/x".into()),
                ),
            ]),
            true,
        );
        assert_eq!(envelope.job_id, "job-1");
        assert_eq!(envelope.attempt, 4, "two before the lane, two in it");
        assert_eq!(envelope.deadline_ms, Some(1_000));
        assert_eq!(envelope.header_length.as_deref(), Some("42"));
        assert_eq!(
            envelope
                .callback_url
                .as_ref()
                .map(|u| u.to_string())
                .as_deref(),
            Some("http://h/x")
        );
        assert!(envelope.store_result, "a callback's result is stored");
        let stored = decode_envelope(
            &properties(&[(header::STORE_RESULT, AMQPValue::Boolean(true))]),
            false,
        );
        assert!(stored.store_result && stored.callback_url.is_none());
        let fresh = decode_envelope(&BasicProperties::default(), false);
        assert!(!fresh.store_result, "a plain job's result is a reply only");
        assert_eq!(fresh.attempt, 1);
        assert!(
            !fresh.job_id.is_empty(),
            "a job without a message id gets one"
        );
        assert_eq!(
            decode_envelope(&BasicProperties::default(), true).attempt,
            2
        );
    }
}
