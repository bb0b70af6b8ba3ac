//! The AMQP side of the worker: one broker connection at a time. Consume -> prepare (off the
//! runtime) -> batch -> infer -> publish results with confirms -> ack. When the connection is
//! lost the caller reconnects and calls [`serve_connection`] again; what was unacked is
//! redelivered by the broker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_core::amqp::{header_str, header_u64, unix_ms};
use ember_core::protocol::{
    self, ErrorBody, Heartbeat, JobResult, Outputs, Status, Timing, WorkerState, header,
};
use ember_core::telemetry::Readiness;
use ember_core::topology::{self, QueueSettings};
use futures_util::StreamExt;
use lapin::Acker;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use lapin::{BasicProperties, Channel, Confirmation, Connection, message::Delivery};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batcher::next_batch;
use crate::engine::{Engine, ImageSize};
use crate::error::Disposition;
use crate::metrics::Metrics;
use crate::preprocess::{InputLimits, Prepared, Target, prepare};
use crate::{Error, Result};

/// Counters shared with heartbeats.
#[derive(Debug, Default)]
pub struct Stats {
    in_flight: AtomicU64,
    /// Jobs accepted and still being prepared (not yet handed to the batcher).
    preparing: AtomicU64,
    completed: AtomicU64,
    busy_nanos: AtomicU64,
    state: AtomicU8,
    /// Redelivered jobs being moved to the retry lane right now.
    moving: AtomicU64,
}

impl Stats {
    fn set_state(&self, state: WorkerState) {
        let v = match state {
            WorkerState::Starting => 0,
            WorkerState::Ready => 1,
            WorkerState::Draining => 2,
        };
        self.state.store(v, Ordering::Relaxed);
    }
    fn state(&self) -> WorkerState {
        match self.state.load(Ordering::Relaxed) {
            1 => WorkerState::Ready,
            2 => WorkerState::Draining,
            _ => WorkerState::Starting,
        }
    }
}

/// Everything a connection's tasks share; lives for the whole process.
#[derive(Debug)]
pub struct Shared {
    pub model: String,
    pub worker_id: String,
    pub engine: Engine,
    pub metrics: Metrics,
    pub stats: Stats,
    pub readiness: Readiness,
    /// The newest NVML reading, sampled on its own thread (none without a GPU or NVML).
    pub gpu: Option<crate::gpu::Latest>,
    /// Where the model runs (`cpu`, `cuda:0`) and whether that is a fallback from a GPU.
    pub device: String,
    pub device_fallback: bool,
    pub limits: InputLimits,
    pub target: Target,
    pub max_batch: usize,
    pub max_batch_delay: Duration,
    pub prefetch: u16,
    pub queue: QueueSettings,
    pub heartbeat_interval: Duration,
    pub drain_timeout: Duration,
    pub model_load_seconds: f64,
    /// Job ids announced on `ember.cancel` for this model, with when they were seen.
    pub cancelled: Mutex<HashMap<String, Instant>>,
}

/// Bodies up to this size are decoded on the async runtime instead of the blocking pool.
const INLINE_DECODE_BYTES: usize = 16 * 1024;

/// How long a cancellation is remembered.
const CANCEL_MEMORY: Duration = Duration::from_secs(3600);

impl Shared {
    fn is_cancelled(&self, job_id: &str) -> bool {
        self.cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(job_id)
    }

    fn remember_cancel(&self, job_id: String) {
        let mut cancelled = self.cancelled.lock().unwrap_or_else(|e| e.into_inner());
        if cancelled.len() >= 100_000 {
            cancelled.retain(|_, at| at.elapsed() < CANCEL_MEMORY);
        }
        cancelled.insert(job_id, Instant::now());
    }
}

/// How a connection's service ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Shutdown was asked for and the jobs in hand were answered (or the drain timed out).
    Drained { timed_out: bool },
    /// The connection or a channel failed; reconnect.
    Lost(String),
}

/// A job's envelope: what is needed to answer and ack it.
struct Job {
    acker: Acker,
    job_id: String,
    reply_to: Option<ShortString>,
    correlation_id: Option<ShortString>,
    callback_url: Option<LongString>,
    traceparent: Option<LongString>,
    attempt: u32,
    arrived: Instant,
    submitted_at_ms: Option<u64>,
    deadline_ms: Option<u64>,
}

impl Job {
    fn expired_by(&self, now_ms: u64) -> Option<u64> {
        self.deadline_ms
            .filter(|&deadline| now_ms > deadline)
            .map(|deadline| now_ms - deadline)
    }

    fn queue_wait(&self, now_ms: u64) -> Duration {
        match self.submitted_at_ms {
            Some(at) if at <= now_ms => Duration::from_millis(now_ms - at),
            _ => self.arrived.elapsed(),
        }
    }
}

/// A finished job, ready to be published and acked.
struct Done {
    job: Job,
    outcome: Result<Outputs>,
    timing: Timing,
}

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
    /// 1 for the first delivery, 2 after one redelivery, ...
    pub attempt: u32,
    pub submitted_at_ms: Option<u64>,
    pub deadline_ms: Option<u64>,
    pub content_type: Option<String>,
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
    Envelope {
        job_id: properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        reply_to: properties.reply_to().clone(),
        correlation_id: properties.correlation_id().clone(),
        callback_url: long(header::CALLBACK_URL),
        traceparent: long(header::TRACEPARENT),
        attempt,
        submitted_at_ms: header_u64(headers, header::SUBMITTED_AT),
        deadline_ms: header_u64(headers, header::DEADLINE),
        content_type: properties
            .content_type()
            .as_ref()
            .map(|ct| ct.as_str().to_string()),
    }
}

/// A whole job as the worker decodes it: the envelope, then the body prepared for the model.
/// The service runs the two steps apart (the body only when the job is neither cancelled nor
/// expired, and large bodies off the runtime); this is both in one call, for tests and fuzzing.
pub fn decode_job(
    properties: &BasicProperties,
    redelivered: bool,
    body: &[u8],
    limits: InputLimits,
    target: &Target,
) -> (Envelope, Result<Prepared>) {
    let envelope = decode_envelope(properties, redelivered);
    let prepared = prepare(envelope.content_type.as_deref(), body, limits, target);
    (envelope, prepared)
}

fn split(delivery: Delivery) -> (Job, Option<String>, Vec<u8>) {
    let Delivery {
        acker,
        properties,
        data,
        redelivered,
        ..
    } = delivery;
    let Envelope {
        job_id,
        reply_to,
        correlation_id,
        callback_url,
        traceparent,
        attempt,
        submitted_at_ms,
        deadline_ms,
        content_type,
    } = decode_envelope(&properties, redelivered);
    let job = Job {
        job_id,
        reply_to,
        correlation_id,
        callback_url,
        traceparent,
        attempt,
        arrived: Instant::now(),
        submitted_at_ms,
        deadline_ms,
        acker,
    };
    (job, content_type, data)
}

/// Serves one broker connection until shutdown (drain) or failure.
pub async fn serve_connection(
    shared: &Arc<Shared>,
    connection: &Connection,
    shutdown: &CancellationToken,
) -> SessionEnd {
    match serve(shared, connection, shutdown).await {
        Ok(end) => end,
        Err(error) => SessionEnd::Lost(error.to_string()),
    }
}

async fn serve(
    shared: &Arc<Shared>,
    connection: &Connection,
    shutdown: &CancellationToken,
) -> Result<SessionEnd> {
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    topology::declare_model(&publisher, &shared.model, shared.queue).await?;
    let telemetry = connection.create_channel().await?;
    let mut cancellations = cancel_consumer(&telemetry, &shared.model).await?;
    let queue = topology::jobs_queue(&shared.model);
    let (consumer_channel, mut consumer) = consume(
        connection,
        &queue,
        shared.worker_id.clone(),
        shared.prefetch,
    )
    .await?;
    // The retry lane: one job at a time per worker, so a job that kills its worker takes only
    // itself (and that worker's first-time jobs, which then come here) down each time.
    let (retry_channel, mut retries) = consume(
        connection,
        &topology::retry_queue(&shared.model),
        format!("{}-retry", shared.worker_id),
        1,
    )
    .await?;
    // Copies of the model's dead letters: each is answered with a `dead_lettered` error, so its
    // client learns what happened instead of waiting forever.
    let (notice_channel, mut notices) = consume(
        connection,
        &topology::dead_notice_queue(&shared.model),
        format!("{}-deadnotice", shared.worker_id),
        8,
    )
    .await?;
    tracing::info!(%queue, prefetch = shared.prefetch, max_batch = shared.max_batch, "consuming");
    shared.stats.set_state(WorkerState::Ready);
    shared.readiness.set(true);

    let session_done = CancellationToken::new();
    let heartbeats = tokio::spawn(heartbeat_loop(
        shared.clone(),
        telemetry.clone(),
        session_done.clone(),
    ));
    let tracker = TaskTracker::new();
    let (prepared_tx, prepared_rx) = mpsc::channel(usize::from(shared.prefetch) + shared.max_batch);
    tracker.spawn(batch_loop(
        shared.clone(),
        publisher.clone(),
        prepared_rx,
        tracker.clone(),
    ));

    let end = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break None,
            cancel = cancellations.next() => match cancel {
                Some(Ok(delivery)) => {
                    if let Ok(job_id) = String::from_utf8(delivery.data) {
                        tracing::info!(%job_id, "job cancelled");
                        shared.remember_cancel(job_id);
                    }
                }
                Some(Err(error)) => break Some(format!("cancellation consumer failed: {error}")),
                None => break Some("the broker cancelled the cancellation consumer".to_string()),
            },
            next = consumer.next() => match next {
                Some(Ok(delivery)) if is_redelivery(&delivery) => {
                    shared.stats.moving.fetch_add(1, Ordering::SeqCst);
                    tracker.spawn(to_retry_lane(shared.clone(), publisher.clone(), delivery));
                }
                Some(Ok(delivery)) => {
                    accept(shared, &publisher, &tracker, &prepared_tx, delivery);
                }
                Some(Err(error)) => break Some(format!("consumer failed: {error}")),
                None => break Some("the broker cancelled the consumer".to_string()),
            },
            next = retries.next() => match next {
                Some(Ok(delivery)) => {
                    let (shared, publisher, prepared_tx) =
                        (shared.clone(), publisher.clone(), prepared_tx.clone());
                    let inner = tracker.clone();
                    tracker.spawn(async move {
                        settle_moves(&shared).await;
                        accept(&shared, &publisher, &inner, &prepared_tx, delivery);
                    });
                }
                Some(Err(error)) => break Some(format!("retry consumer failed: {error}")),
                None => break Some("the broker cancelled the retry consumer".to_string()),
            },
            next = notices.next() => match next {
                Some(Ok(delivery)) => answer_dead_letter(shared, &publisher, &tracker, delivery),
                Some(Err(error)) => break Some(format!("dead-letter notice consumer failed: {error}")),
                None => break Some("the broker cancelled the dead-letter notice consumer".to_string()),
            },
        }
    };
    drop(prepared_tx);
    tracker.close();

    let outcome = match end {
        None => {
            shared.stats.set_state(WorkerState::Draining);
            shared.readiness.set(false);
            tracing::info!("draining: consumer cancelled, finishing the jobs in hand");
            for (channel, tag) in [
                (&consumer_channel, consumer.tag()),
                (&retry_channel, retries.tag()),
                (&notice_channel, notices.tag()),
            ] {
                if let Err(error) = channel
                    .basic_cancel(tag, BasicCancelOptions::default())
                    .await
                {
                    tracing::warn!(%error, "basic.cancel failed");
                }
            }
            let timed_out = tokio::time::timeout(shared.drain_timeout, tracker.wait())
                .await
                .is_err();
            if timed_out {
                tracing::warn!(timeout = ?shared.drain_timeout, "drain timed out; unacked jobs go back to the queue");
            }
            // One last heartbeat so the autoscaler sees the draining state at once.
            publish_heartbeat(shared, &telemetry).await;
            SessionEnd::Drained { timed_out }
        }
        Some(reason) => {
            shared.readiness.set(false);
            shared.stats.set_state(WorkerState::Starting);
            tracing::warn!(%reason, "lost the broker; jobs in hand will be redelivered");
            // The jobs in hand cannot be acked on a new channel; let their tasks fail fast.
            let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
            // Whatever was not settled went back to the queue with the old channel.
            shared.stats.in_flight.store(0, Ordering::Relaxed);
            shared.metrics.in_flight.set(0);
            SessionEnd::Lost(reason)
        }
    };
    session_done.cancel();
    let _ = heartbeats.await;
    if matches!(outcome, SessionEnd::Drained { .. }) {
        for channel in [
            &consumer_channel,
            &retry_channel,
            &notice_channel,
            &publisher,
            &telemetry,
        ] {
            let _ = channel.close(200, "worker shutting down".into()).await;
        }
    }
    Ok(outcome)
}

/// A channel of its own with `prefetch`, consuming `queue` as `tag`.
async fn consume(
    connection: &Connection,
    queue: &str,
    tag: String,
    prefetch: u16,
) -> Result<(Channel, lapin::Consumer)> {
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let consumer = channel
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok((channel, consumer))
}

/// A job from the model's queue that was delivered before: its worker failed it, lost the
/// broker, or died holding it — perhaps because of it, perhaps beside the job that did.
fn is_redelivery(delivery: &Delivery) -> bool {
    delivery.redelivered
        || header_u64(
            delivery.properties.headers().as_ref(),
            header::DELIVERY_COUNT,
        )
        .is_some_and(|count| count > 0)
}

/// Waits (at most 5 s) until no redelivered job has been in this worker's hands for 100 ms. A
/// retry-lane job may be the one that kills workers; the jobs a dead worker held come back
/// redelivered, and the next worker must get them safely into the lane before it runs the
/// killer again, or they would ride along to the delivery limit with it.
async fn settle_moves(shared: &Shared) {
    const QUIET: Duration = Duration::from_millis(100);
    let started = Instant::now();
    let mut quiet_since = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if shared.stats.moving.load(Ordering::SeqCst) > 0 {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= QUIET {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Moves a redelivered job to the model's retry lane (publish with confirm, then ack; if the
/// publish is not confirmed, the job goes back to the queue). A worker holds one retry-lane job
/// at a time, so a job that crashes workers is dead-lettered after the delivery limit without
/// dragging the jobs that happened to be delivered beside it over the limit too.
async fn to_retry_lane(shared: Arc<Shared>, publisher: Channel, delivery: Delivery) {
    let Delivery {
        acker,
        properties,
        data,
        redelivered,
        ..
    } = delivery;
    let mut headers = properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    let count = header_u64(properties.headers().as_ref(), header::DELIVERY_COUNT)
        .unwrap_or(u64::from(redelivered));
    let prior = header_u64(properties.headers().as_ref(), header::PRIOR_DELIVERIES).unwrap_or(0);
    // The lane's own deliveries are counted afresh by the broker.
    headers.remove(header::DELIVERY_COUNT);
    headers.insert(
        ShortString::from(header::PRIOR_DELIVERIES),
        AMQPValue::LongLongInt(i64::try_from(count.saturating_add(prior)).unwrap_or(i64::MAX)),
    );
    let properties = properties.with_headers(FieldTable::from(headers));
    let retry_queue = topology::retry_queue(&shared.model);
    let published = publisher
        .basic_publish(
            "".into(),
            retry_queue.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            &data,
            properties,
        )
        .await;
    let confirmed = match published {
        Ok(confirm) => matches!(confirm.await, Ok(Confirmation::Ack(None))),
        Err(_) => false,
    };
    let settled = if confirmed {
        shared
            .metrics
            .requeued
            .with_label_values(&["retry_lane"])
            .inc();
        acker.ack(BasicAckOptions::default()).await
    } else {
        acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
    };
    if let Err(error) = settled {
        tracing::debug!(%error, "cannot settle a job moved to the retry lane; the broker will redeliver it");
    }
    shared.stats.moving.fetch_sub(1, Ordering::SeqCst);
}

/// Answers a dead-lettered job (a copy from the model's dead-notice queue) with a
/// `dead_lettered` error result, by the job's own reply routes (reply-to, results, callback).
fn answer_dead_letter(
    shared: &Arc<Shared>,
    publisher: &Channel,
    tracker: &TaskTracker,
    delivery: Delivery,
) {
    shared.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    shared.metrics.in_flight.inc();
    let headers = delivery.properties.headers().as_ref();
    let reason = header_str(headers, "x-first-death-reason")
        .unwrap_or("unknown")
        .to_string();
    let queue = header_str(headers, "x-first-death-queue")
        .unwrap_or("its queue")
        .to_string();
    let (job, _, _) = split(delivery);
    tracing::warn!(job_id = %job.job_id, %reason, %queue, "answering a dead-lettered job");
    let message = format!(
        "the job was dead-lettered from {queue} ({reason}): every worker that took it failed or \
         died with it, as many times as the queue's delivery limit allows; it is kept in {}",
        topology::dead_letter_queue(&shared.model)
    );
    let done = Done {
        job,
        outcome: Err(Error::DeadLettered(message)),
        timing: Timing::default(),
    };
    tracker.spawn(finish(shared.clone(), publisher.clone(), vec![done]));
}

/// An exclusive queue of this worker's own, bound to the model's cancellations.
async fn cancel_consumer(channel: &Channel, model: &str) -> Result<lapin::Consumer> {
    let queue = channel
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..lapin::options::QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            topology::CANCEL_EXCHANGE.into(),
            model.into(),
            lapin::options::QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await?)
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

/// Takes one delivery: answers an expired job at once, else prepares it off the runtime and
/// hands it to the batcher.
fn accept(
    shared: &Arc<Shared>,
    publisher: &Channel,
    tracker: &TaskTracker,
    prepared_tx: &mpsc::Sender<(Job, Prepared)>,
    delivery: Delivery,
) {
    shared.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    shared.metrics.in_flight.inc();
    let (job, content_type, body) = split(delivery);
    chaos_crash_on(&body);
    let refused = if shared.is_cancelled(&job.job_id) {
        Some(Error::Cancelled)
    } else {
        job.expired_by(unix_ms()).map(Error::DeadlineExceeded)
    };
    if let Some(error) = refused {
        let done = Done {
            job,
            outcome: Err(error),
            timing: Timing::default(),
        };
        tracker.spawn(finish(shared.clone(), publisher.clone(), vec![done]));
        return;
    }
    shared.stats.preparing.fetch_add(1, Ordering::SeqCst);
    let shared = shared.clone();
    let publisher = publisher.clone();
    let prepared_tx = prepared_tx.clone();
    tracker.spawn(async move {
        let limits = shared.limits;
        // Small bodies decode in microseconds: a hop to the blocking pool costs more than that.
        let prepared = if body.len() <= INLINE_DECODE_BYTES {
            prepare(content_type.as_deref(), &body, limits, &shared.target)
        } else {
            let target = shared.target.clone();
            tokio::task::spawn_blocking(move || {
                prepare(content_type.as_deref(), &body, limits, &target)
            })
            .await
            .unwrap_or_else(|e| Err(Error::Internal(format!("preprocessing panicked: {e}"))))
        };
        match prepared {
            Ok(prepared) => {
                let sent = prepared_tx.send((job, prepared)).await;
                shared.stats.preparing.fetch_sub(1, Ordering::SeqCst);
                if let Err(mpsc::error::SendError((job, _))) = sent {
                    // The batcher is gone (connection lost): the broker redelivers the job.
                    drop(job);
                }
            }
            Err(error) => {
                shared.stats.preparing.fetch_sub(1, Ordering::SeqCst);
                let done = Done {
                    job,
                    outcome: Err(error),
                    timing: Timing::default(),
                };
                finish(shared, publisher, vec![done]).await;
            }
        }
    });
}

async fn batch_loop(
    shared: Arc<Shared>,
    publisher: Channel,
    mut rx: mpsc::Receiver<(Job, Prepared)>,
    tracker: TaskTracker,
) {
    let more_coming = || shared.stats.preparing.load(Ordering::SeqCst) > 0;
    while let Some(batch) = next_batch(
        &mut rx,
        shared.max_batch,
        shared.max_batch_delay,
        more_coming,
    )
    .await
    {
        let now_ms = unix_ms();
        let mut expired = Vec::new();
        let mut jobs = Vec::with_capacity(batch.len());
        let mut pixels = Vec::with_capacity(batch.len());
        let mut sizes = Vec::with_capacity(batch.len());
        let mut raw = Vec::with_capacity(batch.len());
        for (job, prepared) in batch {
            let refused = if shared.is_cancelled(&job.job_id) {
                Some(Error::Cancelled)
            } else {
                job.expired_by(now_ms).map(Error::DeadlineExceeded)
            };
            if let Some(error) = refused {
                expired.push(Done {
                    job,
                    outcome: Err(error),
                    timing: Timing::default(),
                });
                continue;
            }
            sizes.push(ImageSize {
                width: prepared.original_width,
                height: prepared.original_height,
            });
            pixels.push(prepared.pixels);
            raw.push(prepared.raw_outputs);
            jobs.push(job);
        }
        if !expired.is_empty() {
            tracker.spawn(finish(shared.clone(), publisher.clone(), expired));
        }
        if jobs.is_empty() {
            continue;
        }
        let n = jobs.len();
        shared.metrics.batch_size.observe(n as f64);
        let waits: Vec<Duration> = jobs.iter().map(|job| job.queue_wait(now_ms)).collect();
        for wait in &waits {
            shared.metrics.queue_wait.observe(wait.as_secs_f64());
        }
        let output = shared.engine.infer(pixels, sizes, raw).await;
        let done: Vec<Done> = match output {
            Ok(output) => {
                let seconds = output.inference.as_secs_f64();
                shared.metrics.inference.observe(seconds);
                shared
                    .stats
                    .busy_nanos
                    .fetch_add(output.inference.as_nanos() as u64, Ordering::Relaxed);
                jobs.into_iter()
                    .zip(output.detections.into_iter().zip(output.tensors))
                    .zip(waits)
                    .map(|((job, (detections, tensors)), wait)| Done {
                        timing: Timing {
                            queue_ms: wait.as_secs_f64() * 1e3,
                            batch_size: n as u32,
                            inference_ms: seconds * 1e3,
                            worker_ms: 0.0,
                        },
                        job,
                        outcome: Ok(match tensors {
                            Some(tensors) => Outputs {
                                detections: None,
                                tensors: Some(tensors),
                            },
                            None => Outputs {
                                detections: Some(detections),
                                tensors: None,
                            },
                        }),
                    })
                    .collect()
            }
            Err(error) => {
                tracing::error!(%error, batch = n, "inference failed; requeueing the batch");
                let message = error.to_string();
                jobs.into_iter()
                    .map(|job| Done {
                        job,
                        outcome: Err(Error::Model(message.clone())),
                        timing: Timing::default(),
                    })
                    .collect()
            }
        };
        tracker.spawn(finish(shared.clone(), publisher.clone(), done));
    }
}

fn result_headers(model: &str, status: Status, traceparent: Option<&LongString>) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        ShortString::from(header::STATUS),
        AMQPValue::LongString(LongString::from(status.as_str())),
    );
    headers.insert(
        ShortString::from(header::MODEL),
        AMQPValue::LongString(LongString::from(model)),
    );
    if let Some(traceparent) = traceparent {
        headers.insert(
            ShortString::from(header::TRACEPARENT),
            AMQPValue::LongString(traceparent.clone()),
        );
    }
    headers
}

/// Publishes the results of `done` (to `reply_to`, `ember.results`, and `ember.callbacks` when a
/// callback was asked for), waits for every confirm, then acks each job; a job whose result was
/// not confirmed, or whose failure is transient, is requeued.
async fn finish(shared: Arc<Shared>, publisher: Channel, done: Vec<Done>) {
    let mut pending = Vec::with_capacity(done.len());
    for Done {
        job,
        outcome,
        mut timing,
    } in done
    {
        let (status, outputs, error) = match outcome {
            Ok(outputs) => (Status::Ok, Some(outputs), None),
            Err(error) if error.disposition() == Disposition::AckWithError => (
                Status::Error,
                None,
                Some(ErrorBody {
                    code: error.code(),
                    message: error.to_string(),
                }),
            ),
            Err(error) => {
                tracing::warn!(job_id = %job.job_id, %error, attempt = job.attempt, "transient failure; requeueing");
                shared
                    .metrics
                    .requeued
                    .with_label_values(&[error.code().as_str()])
                    .inc();
                settle(&shared, job, false, None).await;
                continue;
            }
        };
        timing.worker_ms = job.arrived.elapsed().as_secs_f64() * 1e3;
        let result = JobResult {
            job_id: job.job_id.clone(),
            model: shared.model.clone(),
            status,
            outputs,
            error,
            timing,
            worker: shared.worker_id.clone(),
            attempt: job.attempt,
        };
        let outcome = match &result.error {
            Some(error) => error.code.as_str(),
            None => "ok",
        };
        let confirms = publish_result(&shared, &publisher, &job, &result).await;
        pending.push((job, confirms, outcome));
    }
    for (job, confirms, outcome) in pending {
        let mut confirmed = confirms.is_ok();
        if let Ok(confirms) = confirms {
            for confirm in confirms {
                match confirm.await {
                    Ok(confirmation) if confirmation.is_ack() => {}
                    Ok(_) => confirmed = false,
                    Err(error) => {
                        tracing::debug!(%error, "result confirm failed");
                        confirmed = false;
                    }
                }
            }
        }
        settle(&shared, job, confirmed, Some(outcome)).await;
    }
}

async fn publish_result(
    shared: &Shared,
    publisher: &Channel,
    job: &Job,
    result: &JobResult,
) -> Result<Vec<lapin::PublisherConfirm>> {
    let body = serde_json::to_vec(result).map_err(|e| Error::Internal(e.to_string()))?;
    let mut properties = BasicProperties::default()
        .with_content_type(protocol::content_type::JSON.into())
        .with_message_id(job.job_id.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(unix_ms() / 1000)
        .with_headers(result_headers(
            &shared.model,
            result.status,
            job.traceparent.as_ref(),
        ));
    if let Some(correlation_id) = &job.correlation_id {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    let mut confirms = Vec::with_capacity(3);
    let routing_key = topology::result_routing_key(&shared.model, result.status);
    confirms.push(
        publisher
            .basic_publish(
                topology::RESULTS_EXCHANGE.into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await?,
    );
    if let Some(reply_to) = &job.reply_to {
        confirms.push(
            publisher
                .basic_publish(
                    "".into(),
                    reply_to.clone(),
                    BasicPublishOptions::default(),
                    &body,
                    properties.clone(),
                )
                .await?,
        );
    }
    if let Some(url) = &job.callback_url {
        let mut headers = result_headers(&shared.model, result.status, job.traceparent.as_ref());
        headers.insert(
            ShortString::from(header::CALLBACK_URL),
            AMQPValue::LongString(url.clone()),
        );
        confirms.push(
            publisher
                .basic_publish(
                    "".into(),
                    topology::CALLBACKS_QUEUE.into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties.with_headers(headers),
                )
                .await?,
        );
    }
    Ok(confirms)
}

/// Acks (`answered`) or requeues the job, and counts it.
async fn settle(shared: &Shared, job: Job, answered: bool, outcome: Option<&'static str>) {
    let settled = if answered {
        job.acker.ack(BasicAckOptions::default()).await
    } else {
        job.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await
    };
    shared.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    shared.metrics.in_flight.dec();
    match (settled, answered, outcome) {
        (Ok(_), true, Some(outcome)) => {
            shared.stats.completed.fetch_add(1, Ordering::Relaxed);
            shared.metrics.jobs.with_label_values(&[outcome]).inc();
        }
        (Ok(_), false, Some(_)) => {
            shared
                .metrics
                .requeued
                .with_label_values(&["unconfirmed"])
                .inc();
        }
        (Ok(_), _, _) => {}
        (Err(error), _, _) => {
            tracing::debug!(job_id = %job.job_id, %error, "cannot settle the job; the broker will redeliver it");
        }
    }
}

fn heartbeat(shared: &Shared) -> Heartbeat {
    let gpu = shared.gpu.as_ref().and_then(crate::gpu::Latest::get);
    Heartbeat {
        worker: shared.worker_id.clone(),
        model: shared.model.clone(),
        state: shared.stats.state(),
        in_flight: shared.stats.in_flight.load(Ordering::Relaxed),
        completed: shared.stats.completed.load(Ordering::Relaxed),
        busy_seconds: shared.stats.busy_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        model_load_seconds: shared.model_load_seconds,
        at_ms: unix_ms(),
        device: Some(shared.device.clone()),
        device_fallback: shared.device_fallback,
        gpu,
    }
}

async fn publish_heartbeat(shared: &Shared, channel: &Channel) {
    let Ok(body) = serde_json::to_vec(&heartbeat(shared)) else {
        return;
    };
    let routing_key = format!("{}.{}", shared.model, shared.worker_id);
    let published = channel
        .basic_publish(
            topology::TELEMETRY_EXCHANGE.into(),
            routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_content_type(protocol::content_type::JSON.into())
                .with_expiration("10000".into()),
        )
        .await;
    if let Err(error) = published {
        tracing::debug!(%error, "heartbeat not published");
    }
}

async fn heartbeat_loop(shared: Arc<Shared>, channel: Channel, done: CancellationToken) {
    let mut ticker = tokio::time::interval(shared.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            _ = ticker.tick() => publish_heartbeat(&shared, &channel).await,
        }
    }
}
