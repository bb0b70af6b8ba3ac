//! The AMQP side of the worker, one broker connection at a time, in the order a job travels:
//!
//! 1. [`intake`]: a delivery -> envelope + prepared input (off the runtime when large);
//! 2. [`batch`]: gather, bucket by shape, one `session.run` per bucket, output processing;
//! 3. [`reply`]: publish results with confirms, then ack;
//!
//! beside them [`recovery`] (retry lane, dead-letter notices, cancellations) and [`heartbeat`].
//! When the connection is lost the caller reconnects and calls [`serve_connection`] again; what
//! was unacked is redelivered by the broker.

pub mod batch;
pub mod heartbeat;
pub mod intake;
pub mod recovery;
pub mod reply;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ember_core::protocol::{ModelInfo, WorkerState};
use ember_core::telemetry::Readiness;
use ember_core::topology::{self, QueueSettings};
use futures_util::StreamExt;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Result;
use crate::engine::Engine;
use crate::metrics::Metrics;
pub use heartbeat::Stats;
pub use intake::{Envelope, Job, decode_envelope, decode_job};

/// Everything a connection's tasks share; lives for the whole process.
#[derive(Debug)]
pub struct Context {
    pub model: String,
    pub worker_id: String,
    /// The model, its processing and its inference thread.
    pub engine: Engine,
    /// What heartbeats say about the model (read from the graph at load).
    pub model_info: ModelInfo,
    pub metrics: Metrics,
    pub stats: Stats,
    pub readiness: Readiness,
    /// The newest NVML reading, sampled on its own thread (none without a GPU or NVML).
    pub gpu: Option<crate::gpu::Latest>,
    /// Where the model runs (`cpu`, `cuda:0`) and whether that is a fallback from a GPU.
    pub device: String,
    pub device_fallback: bool,
    pub max_batch_delay: Duration,
    pub prefetch: u16,
    pub queue: QueueSettings,
    pub heartbeat_interval: Duration,
    pub drain_timeout: Duration,
    pub model_load_seconds: f64,
    /// Job ids announced on `ember.cancel` for this model, with when they were seen.
    pub cancelled: Mutex<HashMap<String, Instant>>,
}

/// How a connection's service ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// Shutdown was asked for and the jobs in hand were answered (or the drain timed out).
    Drained { timed_out: bool },
    /// The connection or a channel failed; reconnect.
    Lost(String),
}

/// Serves one broker connection until shutdown (drain) or failure.
pub async fn serve_connection(
    ctx: &Arc<Context>,
    connection: &Connection,
    shutdown: &CancellationToken,
) -> SessionEnd {
    match serve(ctx, connection, shutdown).await {
        Ok(end) => end,
        Err(error) => SessionEnd::Lost(error.to_string()),
    }
}

/// A connection's channels and consumers.
struct Channels {
    publisher: Channel,
    telemetry: Channel,
    cancellations: lapin::Consumer,
    /// The model's queue, its version's queue (jobs pinned to it), its retry lane and its
    /// dead-letter notices: (channel, consumer).
    jobs: (Channel, lapin::Consumer),
    pinned: (Channel, lapin::Consumer),
    retries: (Channel, lapin::Consumer),
    notices: (Channel, lapin::Consumer),
}

/// Declares the model's topology and starts every consumer on `connection`.
async fn open(ctx: &Context, connection: &Connection) -> Result<Channels> {
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    topology::declare_model(&publisher, &ctx.model, ctx.queue).await?;
    let telemetry = connection.create_channel().await?;
    let cancellations = recovery::cancel_consumer(&telemetry, &ctx.model).await?;
    let version = &ctx.model_info.version;
    topology::declare_version(&publisher, &ctx.model, version, ctx.queue).await?;
    let queue = topology::jobs_queue(&ctx.model);
    let jobs = consume(connection, &queue, ctx.worker_id.clone(), ctx.prefetch).await?;
    let pinned = consume(
        connection,
        &topology::version_queue(&ctx.model, version),
        format!("{}-pinned", ctx.worker_id),
        ctx.prefetch,
    )
    .await?;
    // The retry lane: one job at a time per worker, so a job that kills its worker takes only
    // itself (and that worker's first-time jobs, which then come here) down each time.
    let retry_queue = topology::retry_queue(&ctx.model);
    let retries = consume(
        connection,
        &retry_queue,
        format!("{}-retry", ctx.worker_id),
        1,
    )
    .await?;
    // Copies of the model's dead letters: each is answered with a `dead_lettered` error, so its
    // client learns what happened instead of waiting forever.
    let notice_queue = topology::dead_notice_queue(&ctx.model);
    let notices = consume(
        connection,
        &notice_queue,
        format!("{}-deadnotice", ctx.worker_id),
        8,
    )
    .await?;
    tracing::info!(%queue, prefetch = ctx.prefetch, max_batch = ctx.engine.max_batch, "consuming");
    Ok(Channels {
        publisher,
        telemetry,
        cancellations,
        jobs,
        pinned,
        retries,
        notices,
    })
}

async fn serve(
    ctx: &Arc<Context>,
    connection: &Connection,
    shutdown: &CancellationToken,
) -> Result<SessionEnd> {
    let mut channels = open(ctx, connection).await?;
    ctx.stats.set_state(WorkerState::Ready);
    ctx.readiness.set(true);
    let session_done = CancellationToken::new();
    let heartbeats = tokio::spawn(heartbeat::heartbeat_loop(
        ctx.clone(),
        channels.telemetry.clone(),
        session_done.clone(),
    ));
    let tracker = TaskTracker::new();
    let (prepared_tx, prepared_rx) =
        mpsc::channel(usize::from(ctx.prefetch) + ctx.engine.max_batch);
    tracker.spawn(batch::batch_loop(
        ctx.clone(),
        channels.publisher.clone(),
        prepared_rx,
        tracker.clone(),
    ));
    let end = take_deliveries(ctx, &mut channels, &tracker, &prepared_tx, shutdown).await;
    drop(prepared_tx);
    tracker.close();
    let outcome = match end {
        None => drain(ctx, &channels, &tracker).await,
        Some(reason) => lose(ctx, &tracker, reason).await,
    };
    session_done.cancel();
    let _ = heartbeats.await;
    if matches!(outcome, SessionEnd::Drained { .. }) {
        for channel in [
            &channels.jobs.0,
            &channels.pinned.0,
            &channels.retries.0,
            &channels.notices.0,
            &channels.publisher,
            &channels.telemetry,
        ] {
            let _ = channel.close(200, "worker shutting down".into()).await;
        }
    }
    Ok(outcome)
}

/// Hands each delivery to its path until shutdown (`None`) or a consumer fails (the reason).
async fn take_deliveries(
    ctx: &Arc<Context>,
    channels: &mut Channels,
    tracker: &TaskTracker,
    prepared_tx: &mpsc::Sender<(Job, crate::process::Prepared)>,
    shutdown: &CancellationToken,
) -> Option<String> {
    let publisher = channels.publisher.clone();
    loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => return None,
            cancel = channels.cancellations.next() => match cancel {
                Some(Ok(delivery)) => {
                    if let Ok(job_id) = String::from_utf8(delivery.data) {
                        tracing::info!(%job_id, "job cancelled");
                        ctx.remember_cancel(job_id);
                    }
                }
                Some(Err(error)) => return Some(format!("cancellation consumer failed: {error}")),
                None => return Some("the broker cancelled the cancellation consumer".to_string()),
            },
            // The version's queue before the model's: its jobs could only be served here.
            next = channels.pinned.1.next() => match next {
                Some(Ok(delivery)) => take_job(ctx, &publisher, tracker, prepared_tx, delivery, true),
                Some(Err(error)) => return Some(format!("version queue consumer failed: {error}")),
                None => return Some("the broker cancelled the version queue consumer".to_string()),
            },
            next = channels.jobs.1.next() => match next {
                Some(Ok(delivery)) => take_job(ctx, &publisher, tracker, prepared_tx, delivery, false),
                Some(Err(error)) => return Some(format!("consumer failed: {error}")),
                None => return Some("the broker cancelled the consumer".to_string()),
            },
            next = channels.retries.1.next() => match next {
                Some(Ok(delivery)) => {
                    let (ctx, publisher, prepared_tx) =
                        (ctx.clone(), publisher.clone(), prepared_tx.clone());
                    let inner = tracker.clone();
                    tracker.spawn(async move {
                        recovery::settle_moves(&ctx).await;
                        if let Some(version) = recovery::pinned_elsewhere(&ctx, &delivery) {
                            let version = version.to_string();
                            forward_or_dead_letter(ctx, publisher, delivery, version).await;
                        } else {
                            intake::accept(&ctx, &publisher, &inner, &prepared_tx, delivery);
                        }
                    });
                }
                Some(Err(error)) => return Some(format!("retry consumer failed: {error}")),
                None => return Some("the broker cancelled the retry consumer".to_string()),
            },
            next = channels.notices.1.next() => match next {
                Some(Ok(delivery)) => recovery::answer_dead_letter(ctx, &publisher, tracker, delivery),
                Some(Err(error)) => return Some(format!("dead-letter notice consumer failed: {error}")),
                None => return Some("the broker cancelled the dead-letter notice consumer".to_string()),
            },
        }
    }
}

/// A job from the model's queue or the version's (`from_version_queue`): forwarded when
/// pinned to another version, moved to the retry lane when redelivered (a job from the
/// version's queue keeps its pin there, even one pinned by routing key alone), else prepared
/// for the batcher.
fn take_job(
    ctx: &Arc<Context>,
    publisher: &Channel,
    tracker: &TaskTracker,
    prepared_tx: &mpsc::Sender<(Job, crate::process::Prepared)>,
    delivery: lapin::message::Delivery,
    from_version_queue: bool,
) {
    if let Some(version) = recovery::pinned_elsewhere(ctx, &delivery) {
        let version = version.to_string();
        tracker.spawn(forward_or_dead_letter(
            ctx.clone(),
            publisher.clone(),
            delivery,
            version,
        ));
    } else if recovery::is_redelivery(&delivery) {
        ctx.stats.moving.fetch_add(1, Ordering::SeqCst);
        let pin = from_version_queue.then(|| ctx.model_info.version.clone());
        tracker.spawn(recovery::to_retry_lane(
            ctx.clone(),
            publisher.clone(),
            delivery,
            pin,
        ));
    } else {
        intake::accept(ctx, publisher, tracker, prepared_tx, delivery);
    }
}

/// Forwards a job pinned to another version, unless it has had the delivery limit already
/// (each move between the version's queue and the retry lane restarts the broker's count): then
/// it is dead-lettered, so a pinned job that kills workers cannot go round for ever.
async fn forward_or_dead_letter(
    ctx: Arc<Context>,
    publisher: Channel,
    delivery: lapin::message::Delivery,
    version: String,
) {
    let so_far = topology::deliveries_so_far(&delivery.properties, delivery.redelivered);
    if so_far >= u64::from(ctx.queue.delivery_limit) {
        tracing::warn!(%version, "a pinned job reached the delivery limit going round: dead-lettered");
        recovery::dead_letter(delivery).await;
    } else {
        recovery::forward_pinned(ctx, publisher, delivery, version).await;
    }
}

/// Shutdown: stop consuming, finish the jobs in hand (bounded), say so in one last heartbeat.
async fn drain(ctx: &Context, channels: &Channels, tracker: &TaskTracker) -> SessionEnd {
    ctx.stats.set_state(WorkerState::Draining);
    ctx.readiness.set(false);
    tracing::info!("draining: consumer cancelled, finishing the jobs in hand");
    for (channel, consumer) in [
        &channels.jobs,
        &channels.pinned,
        &channels.retries,
        &channels.notices,
    ] {
        if let Err(error) = channel
            .basic_cancel(consumer.tag(), BasicCancelOptions::default())
            .await
        {
            tracing::warn!(%error, "basic.cancel failed");
        }
    }
    let timed_out = tokio::time::timeout(ctx.drain_timeout, tracker.wait())
        .await
        .is_err();
    if timed_out {
        tracing::warn!(timeout = ?ctx.drain_timeout, "drain timed out; unacked jobs go back to the queue");
    }
    // One last heartbeat so the autoscaler sees the draining state at once.
    heartbeat::publish_heartbeat(ctx, &channels.telemetry).await;
    SessionEnd::Drained { timed_out }
}

/// The connection failed: the jobs in hand cannot be acked on a new channel; the broker
/// redelivers them.
async fn lose(ctx: &Context, tracker: &TaskTracker, reason: String) -> SessionEnd {
    ctx.readiness.set(false);
    ctx.stats.set_state(WorkerState::Starting);
    tracing::warn!(%reason, "lost the broker; jobs in hand will be redelivered");
    // Let their tasks fail fast.
    let _ = tokio::time::timeout(Duration::from_secs(30), tracker.wait()).await;
    // Whatever was not settled went back to the queue with the old channel.
    ctx.stats.in_flight.store(0, Ordering::Relaxed);
    ctx.metrics.in_flight.set(0);
    SessionEnd::Lost(reason)
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
