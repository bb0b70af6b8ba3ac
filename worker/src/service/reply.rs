//! Replies: each finished job's result published to `ember.results` (`ember.results.stored` when
//! the job asked for it to be stored), its reply queue and the callbacks queue, with publisher
//! confirms; then the job is acked (or requeued when a confirm failed or the failure is
//! transient) and counted.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ember_core::amqp::{Headers, unix_ms};
use ember_core::protocol::{
    self, ErrorBody, ErrorCode, JobResult, Outputs, Status, Timing, header,
};
use ember_core::topology;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::LongString;
use lapin::{BasicProperties, Channel};
use tracing::Instrument as _;

use super::Context;
use super::intake::Job;
use crate::error::Disposition;
use crate::{Error, Result};

/// A finished job, ready to be published and acked.
#[derive(Debug)]
pub struct Answer {
    pub job: Job,
    pub outcome: Result<Outputs>,
    pub timing: Timing,
}

impl Answer {
    /// A job answered with `error` before it reached the model.
    pub fn failed(job: Job, error: Error) -> Self {
        Self {
            job,
            outcome: Err(error),
            timing: Timing::default(),
        }
    }
}

/// The result's `traceparent`: the job span's with traces on (a callback's attempts continue
/// the job's trace), else the job's own as it came.
fn result_traceparent(job: &Job) -> Option<LongString> {
    ember_core::otel::traceparent(&job.span)
        .map(LongString::from)
        .or_else(|| job.envelope.traceparent.clone())
}

fn result_headers(result: &JobResult, traceparent: Option<&LongString>) -> Headers {
    let mut headers = Headers::new();
    headers
        .text(header::STATUS, result.status.as_str())
        .text(header::MODEL, result.model.as_str());
    if let Some(version) = &result.model_version {
        headers.text(header::MODEL_VERSION, version.as_str());
    }
    if let Some(traceparent) = traceparent {
        headers.text(header::TRACEPARENT, traceparent.clone());
    }
    headers
}

/// Publishes the results of `done` (to `reply_to`, `ember.results` or `ember.results.stored`,
/// and `ember.callbacks` when a callback was asked for), waits for every confirm, then acks each
/// job; a job whose result was not confirmed, or whose failure is transient, is requeued.
pub async fn finish(ctx: Arc<Context>, publisher: Channel, done: Vec<Answer>) {
    let mut pending = Vec::with_capacity(done.len());
    for Answer {
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
                tracing::warn!(job_id = %job.envelope.job_id, %error, attempt = job.envelope.attempt, "transient failure; requeueing");
                ctx.metrics
                    .requeued
                    .with_label_values(&[error.code().as_str()])
                    .inc();
                settle(&ctx, job, false, None).await;
                continue;
            }
        };
        timing.worker_ms = job.arrived.elapsed().as_secs_f64() * 1e3;
        // A job this version did not run (dead-lettered, pinned to another version) names none.
        let ran_here = !matches!(
            error.as_ref().map(|e| e.code),
            Some(ErrorCode::DeadLettered | ErrorCode::ModelVersionNotFound)
        );
        let result = JobResult {
            job_id: job.envelope.job_id.clone(),
            model: ctx.model.clone(),
            status,
            outputs,
            error,
            timing,
            worker: ctx.worker_id.clone(),
            attempt: job.envelope.attempt,
            model_version: ran_here.then(|| ctx.model_info.version.clone()),
        };
        let outcome = match &result.error {
            Some(error) => error.code.as_str(),
            None => "ok",
        };
        let confirms = publish_result(&ctx, &publisher, &job, &result).await;
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
        settle(&ctx, job, confirmed, Some(outcome)).await;
    }
}

async fn publish_result(
    ctx: &Context,
    publisher: &Channel,
    job: &Job,
    result: &JobResult,
) -> Result<Vec<lapin::PublisherConfirm>> {
    let span = ember_core::otel::step(&job.span, "publish result");
    if result.status != Status::Ok && !job.span.is_disabled() {
        job.span.record("otel.status_code", "ERROR");
    }
    publish_result_in(ctx, publisher, job, result)
        .instrument(span)
        .await
}

async fn publish_result_in(
    ctx: &Context,
    publisher: &Channel,
    job: &Job,
    result: &JobResult,
) -> Result<Vec<lapin::PublisherConfirm>> {
    let traceparent = result_traceparent(job);
    let body = serde_json::to_vec(result).map_err(|e| Error::Internal(e.to_string()))?;
    let mut properties = BasicProperties::default()
        .with_content_type(protocol::content_type::JSON.into())
        .with_message_id(job.envelope.job_id.as_str().into())
        .with_delivery_mode(2)
        .with_timestamp(unix_ms() / 1000)
        .with_headers(result_headers(result, traceparent.as_ref()).into_table());
    if let Some(correlation_id) = &job.envelope.correlation_id {
        properties = properties.with_correlation_id(correlation_id.clone());
    }
    let mut confirms = Vec::with_capacity(3);
    let routing_key = topology::result_routing_key(&ctx.model, result.status);
    let exchange = if job.envelope.store_result {
        topology::RESULTS_STORED_EXCHANGE
    } else {
        topology::RESULTS_EXCHANGE
    };
    confirms.push(
        publisher
            .basic_publish(
                exchange.into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await?,
    );
    if let Some(reply_to) = &job.envelope.reply_to {
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
    if let Some(url) = &job.envelope.callback_url {
        let mut headers = result_headers(result, traceparent.as_ref());
        headers.text(header::CALLBACK_URL, url.clone());
        confirms.push(
            publisher
                .basic_publish(
                    "".into(),
                    topology::CALLBACKS_QUEUE.into(),
                    BasicPublishOptions::default(),
                    &body,
                    properties.with_headers(headers.into_table()),
                )
                .await?,
        );
    }
    Ok(confirms)
}

/// Acks (`answered`) or requeues the job, and counts it.
pub async fn settle(ctx: &Context, job: Job, answered: bool, outcome: Option<&'static str>) {
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
    ctx.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    ctx.metrics.in_flight.dec();
    match (settled, answered, outcome) {
        (Ok(_), true, Some(outcome)) => {
            ctx.stats.completed.fetch_add(1, Ordering::Relaxed);
            ctx.metrics.jobs.with_label_values(&[outcome]).inc();
        }
        (Ok(_), false, Some(_)) => {
            ctx.metrics
                .requeued
                .with_label_values(&["unconfirmed"])
                .inc();
        }
        (Ok(_), _, _) => {}
        (Err(error), _, _) => {
            tracing::debug!(job_id = %job.envelope.job_id, %error, "cannot settle the job; the broker will redeliver it");
        }
    }
}
