//! Recovery: redelivered jobs move to the model's retry lane (one at a time per worker, so a
//! job that kills workers is dead-lettered alone), dead letters are answered with a
//! `dead_lettered` error, and cancellations announced on `ember.cancel` are remembered.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ember_core::amqp::{Headers, header_str, header_u64};
use ember_core::protocol::header;
use ember_core::topology;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::FieldTable;
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
pub async fn to_retry_lane(ctx: Arc<Context>, publisher: Channel, delivery: Delivery) {
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
    let mut headers = Headers::from(FieldTable::from(headers));
    headers.uint(header::PRIOR_DELIVERIES, count.saturating_add(prior));
    let properties = properties.with_headers(headers.into_table());
    let retry_queue = topology::retry_queue(&ctx.model);
    // A move refused while the lane's quorum queue elects a leader (a broker node lost) is
    // tried again, 0.1 s to 1.6 s apart, before the job goes back to the queue: each return
    // counts as a delivery, and returns in quick succession would take an innocent job to the
    // delivery limit in a second (seen in the chaos suite's cluster-kill-leader).
    let mut confirmed = false;
    let mut delay = Duration::from_millis(100);
    for attempt in 0..MOVE_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        let published = publisher
            .basic_publish(
                "".into(),
                retry_queue.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &data,
                properties.clone(),
            )
            .await;
        confirmed = match published {
            Ok(confirm) => matches!(confirm.await, Ok(Confirmation::Ack(None))),
            // The channel is gone: the broker returns the job itself.
            Err(_) => break,
        };
        if confirmed {
            break;
        }
    }
    let settled = if confirmed {
        ctx.metrics
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
    ctx.stats.moving.fetch_sub(1, Ordering::SeqCst);
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
