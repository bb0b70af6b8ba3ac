//! Recovery: redelivered jobs move to the model's retry lane (one at a time per worker, so a
//! job that kills workers is dead-lettered alone), dead letters are answered with a
//! `dead_lettered` error, and cancellations announced on `ember.cancel` are remembered.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ember_core::amqp::{header_str, header_u64};
use ember_core::protocol::header;
use ember_core::topology;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::{Channel, Confirmation};
use tokio_util::task::TaskTracker;

use super::Context;
use super::intake::Job;
use super::reply::{Answer, finish};
use crate::{Error, Result};

/// How long a cancellation is remembered.
const CANCEL_MEMORY: Duration = Duration::from_secs(3600);

impl Context {
    /// Why a job must not reach the model: cancelled, or past its deadline at `now_ms`.
    pub fn refusal(&self, job: &Job, now_ms: u64) -> Option<Error> {
        let cancelled = self
            .cancelled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(job.id());
        if cancelled {
            Some(Error::Cancelled)
        } else {
            job.expired_by(now_ms).map(Error::DeadlineExceeded)
        }
    }

    pub fn remember_cancel(&self, job_id: String) {
        let mut cancelled = self.cancelled.lock().unwrap_or_else(|e| e.into_inner());
        if cancelled.len() >= 100_000 {
            cancelled.retain(|_, at| at.elapsed() < CANCEL_MEMORY);
        }
        cancelled.insert(job_id, Instant::now());
    }
}

/// A job from the model's queue that was delivered before: its worker failed it, lost the
/// broker, or died holding it — perhaps because of it, perhaps beside the job that did.
pub fn is_redelivery(delivery: &Delivery) -> bool {
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
pub async fn settle_moves(ctx: &Context) {
    const QUIET: Duration = Duration::from_millis(100);
    let started = Instant::now();
    let mut quiet_since = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if ctx.stats.moving.load(Ordering::SeqCst) > 0 {
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() >= QUIET {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Tries to publish a move to the retry lane this many times before giving the job back.
const MOVE_ATTEMPTS: u32 = 5;

/// Moves a redelivered job to the model's retry lane (publish with confirm, then ack; if the
/// publish is not confirmed after [`MOVE_ATTEMPTS`] tries, the job goes back to the queue). A worker holds one retry-lane job
/// at a time, so a job that crashes workers is dead-lettered after the delivery limit without
/// dragging the jobs that happened to be delivered beside it over the limit too.
pub async fn to_retry_lane(
    ctx: Arc<Context>,
    publisher: Channel,
    delivery: Delivery,
    pin: Option<String>,
) {
    let retry_queue = topology::retry_queue(&ctx.model);
    let properties =
        topology::moved_properties(&delivery.properties, delivery.redelivered, pin.as_deref());
    // A move refused while the lane's quorum queue elects a leader (a broker node lost) is
    // tried again, 0.1 s to 1.6 s apart, before the job goes back to the queue: each return
    // counts as a delivery, and returns in quick succession would take an innocent job to the
    // delivery limit in a second (seen in the chaos suite's cluster-kill-leader).
    let moved = republish(&publisher, "", &retry_queue, &delivery.data, properties).await;
    if moved == Moved::Confirmed {
        ctx.metrics
            .requeued
            .with_label_values(&["retry_lane"])
            .inc();
    }
    settle_move(delivery.acker, moved == Moved::Confirmed).await;
    ctx.stats.moving.fetch_sub(1, Ordering::SeqCst);
}

/// How a [`republish`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Moved {
    Confirmed,
    /// The broker returned it: no queue is bound to the routing key.
    Unroutable,
    /// Not confirmed after [`MOVE_ATTEMPTS`] tries, or the channel is gone.
    Refused,
}

/// Publishes a job being moved (mandatory, with confirms), trying a refused publish again
/// 0.1 s to 1.6 s apart.
async fn republish(
    publisher: &Channel,
    exchange: &str,
    routing_key: &str,
    data: &[u8],
    properties: lapin::BasicProperties,
) -> Moved {
    let mut delay = Duration::from_millis(100);
    for attempt in 0..MOVE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        let published = publisher
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                data,
                properties.clone(),
            )
            .await;
        match published {
            Ok(confirm) => match confirm.await {
                Ok(Confirmation::Ack(None)) => return Moved::Confirmed,
                Ok(Confirmation::Ack(Some(_))) => return Moved::Unroutable,
                _ => {}
            },
            // The channel is gone: the broker returns the job itself.
            Err(_) => return Moved::Refused,
        }
    }
    Moved::Refused
}

/// Acks a moved job, or gives it back to its queue when the move failed.
async fn settle_move(acker: lapin::Acker, moved: bool) {
    let settled = if moved {
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
        tracing::debug!(%error, "cannot settle a moved job; the broker will redeliver it");
    }
}

/// Dead-letters a job (rejected without requeue: its queue sends it to `ember.dead.<model>`,
/// and the notice is answered `dead_lettered`): for a pinned job that went round the version's
/// queue and the retry lane `x-delivery-limit` times, whose count each move started afresh.
pub async fn dead_letter(delivery: Delivery) {
    let rejected = delivery
        .acker
        .reject(lapin::options::BasicRejectOptions { requeue: false })
        .await;
    if let Err(error) = rejected {
        tracing::debug!(%error, "cannot reject a job; the broker will redeliver it");
    }
}

/// The version a job pinned (`ember-model-version`) when it is not this worker's.
pub fn pinned_elsewhere<'a>(ctx: &Context, delivery: &'a Delivery) -> Option<&'a str> {
    header_str(
        delivery.properties.headers().as_ref(),
        header::MODEL_VERSION,
    )
    .filter(|pinned| *pinned != ctx.model_info.version)
}

/// Forwards a job pinned to another version of the model to that version's queue; when no
/// queue of that version is bound (not served, not coming, or retired) answers it
/// `model_version_not_found`.
pub async fn forward_pinned(
    ctx: Arc<Context>,
    publisher: Channel,
    delivery: Delivery,
    version: String,
) {
    let key = topology::version_routing_key(&ctx.model, &version);
    let properties = topology::moved_properties(&delivery.properties, delivery.redelivered, None);
    let moved = republish(
        &publisher,
        topology::JOBS_EXCHANGE,
        &key,
        &delivery.data,
        properties,
    )
    .await;
    if moved == Moved::Unroutable {
        ctx.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        ctx.metrics.in_flight.inc();
        let (job, _) = Job::from_delivery(delivery);
        let error = Error::VersionNotServed(format!(
            "version `{version}` of model `{}` is not served (no worker has it and none is coming)",
            ctx.model
        ));
        finish(ctx, publisher, vec![Answer::failed(job, error)]).await;
        return;
    }
    if moved == Moved::Confirmed {
        ctx.metrics
            .requeued
            .with_label_values(&["pinned_version"])
            .inc();
    }
    settle_move(delivery.acker, moved == Moved::Confirmed).await;
}

/// Answers a dead-lettered job (a copy from the model's dead-notice queue) with a
/// `dead_lettered` error result, by the job's own reply routes (reply-to, results, callback).
pub fn answer_dead_letter(
    ctx: &Arc<Context>,
    publisher: &Channel,
    tracker: &TaskTracker,
    delivery: Delivery,
) {
    ctx.stats.in_flight.fetch_add(1, Ordering::Relaxed);
    ctx.metrics.in_flight.inc();
    let headers = delivery.properties.headers().as_ref();
    let reason = header_str(headers, "x-first-death-reason")
        .unwrap_or("unknown")
        .to_string();
    let queue = header_str(headers, "x-first-death-queue")
        .unwrap_or("its queue")
        .to_string();
    let (job, _) = Job::from_delivery(delivery);
    tracing::warn!(job_id = %job.id(), %reason, %queue, "answering a dead-lettered job");
    let message = format!(
        "the job was dead-lettered from {queue} ({reason}): every worker that took it failed or \
         died with it, as many times as the queue's delivery limit allows; it is kept in {}",
        topology::dead_letter_queue(&ctx.model)
    );
    let done = Answer::failed(job, Error::DeadLettered(message));
    tracker.spawn(finish(ctx.clone(), publisher.clone(), vec![done]));
}

/// An exclusive queue of this worker's own, bound to the model's cancellations.
pub async fn cancel_consumer(channel: &Channel, model: &str) -> Result<lapin::Consumer> {
    Ok(topology::exclusive_consumer(channel, topology::CANCEL_EXCHANGE, model).await?)
}
