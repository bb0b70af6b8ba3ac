//! Batching: prepared jobs are gathered ([`next_batch`]: up to max batch, waiting a little only
//! while more are on their way), cancelled or expired ones answered, the rest bucketed — jobs
//! share a `session.run` only when the non-batch dimensions of all their inputs are equal and
//! their rows fit under the max batch — and each bucket runs once; each job then gets its rows of
//! the outputs through the model's output processor.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ember_core::amqp::unix_ms;
use ember_core::otel;
use ember_core::protocol::Timing;
use lapin::Channel;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use super::Context;
use super::intake::Job;
use super::reply::{Answer, finish};
use crate::Error;
use crate::batcher::next_batch;
use crate::process::Prepared;

/// Gathers, buckets and runs batches until the intake side closes. A batch is gathered only
/// once a model instance is free to run it, so jobs that come while every instance is busy join
/// the next batch rather than wait behind a small one.
pub async fn batch_loop(
    ctx: Arc<Context>,
    publisher: Channel,
    mut rx: mpsc::Receiver<(Job, Prepared)>,
    tracker: TaskTracker,
) {
    let more_coming = || ctx.stats.preparing.load(Ordering::SeqCst) > 0;
    let max_rows = ctx.engine.max_batch;
    let batching = ctx.engine.pipeline.signature.batching;
    let instances = Arc::new(Semaphore::new(ctx.engine.instances));
    loop {
        let Ok(free) = instances.clone().acquire_owned().await else {
            break;
        };
        let Some(batch) = next_batch(&mut rx, max_rows, ctx.max_batch_delay, more_coming).await
        else {
            break;
        };
        let now_ms = unix_ms();
        let mut refused = Vec::new();
        let mut live = Vec::with_capacity(batch.len());
        for (job, prepared) in batch {
            match ctx.refusal(&job, now_ms) {
                Some(error) => refused.push(Answer::failed(job, error)),
                None => live.push((job, prepared)),
            }
        }
        if !refused.is_empty() {
            tracker.spawn(finish(ctx.clone(), publisher.clone(), refused));
        }
        let mut free = Some(free);
        for bucket in buckets(live, max_rows, batching) {
            let instance = match free.take() {
                Some(instance) => instance,
                // The semaphore is never closed, so this waits for a free instance.
                None => match instances.clone().acquire_owned().await {
                    Ok(instance) => instance,
                    Err(_) => break,
                },
            };
            let (ctx, publisher) = (ctx.clone(), publisher.clone());
            tracker.spawn(async move {
                let done = run(&ctx, bucket, now_ms).await;
                drop(instance);
                finish(ctx, publisher, done).await;
            });
        }
    }
}

/// Splits jobs, in arrival order, into runs: equal batch keys, at most `max_rows` rows each
/// (a job larger than that runs alone), and one job per run when the graph cannot batch.
pub fn buckets<J>(
    jobs: Vec<(J, Prepared)>,
    max_rows: usize,
    batching: bool,
) -> Vec<Vec<(J, Prepared)>> {
    let mut buckets: Vec<(usize, Vec<(J, Prepared)>)> = Vec::new();
    for (job, prepared) in jobs {
        let rows = prepared.rows;
        let open = batching
            .then(|| {
                buckets.iter_mut().find(|(used, bucket)| {
                    used + rows <= max_rows && bucket[0].1.batches_with(&prepared)
                })
            })
            .flatten();
        match open {
            Some((used, bucket)) => {
                *used += rows;
                bucket.push((job, prepared));
            }
            None => buckets.push((rows, vec![(job, prepared)])),
        }
    }
    buckets.into_iter().map(|(_, bucket)| bucket).collect()
}

/// Runs one bucket and makes each job's result.
async fn run(ctx: &Context, bucket: Vec<(Job, Prepared)>, now_ms: u64) -> Vec<Answer> {
    let (jobs, mut prepared): (Vec<Job>, Vec<Prepared>) = bucket.into_iter().unzip();
    let rows: usize = prepared.iter().map(|p| p.rows).sum();
    ctx.metrics.batch_size.observe(rows as f64);
    let batch_start = Instant::now();
    let waits: Vec<Duration> = jobs.iter().map(|job| job.queue_wait(now_ms)).collect();
    for wait in &waits {
        ctx.metrics.queue_wait.observe(wait.as_secs_f64());
    }
    let mut jobs = jobs;
    let run_span = run_span(ctx, &mut jobs, rows);
    let inferred = ctx
        .engine
        .infer(prepared.iter_mut().collect())
        .instrument(run_span)
        .await;
    match inferred {
        Ok(output) => {
            let seconds = output.inference.as_secs_f64();
            ctx.metrics.inference.observe(seconds);
            // Divided among the instances: busy_seconds stays the worker's busy time (its rate
            // of change the busy ratio, completed / busy_seconds its service rate) however many
            // instances share the work.
            let instances = ctx.engine.instances.max(1) as u128;
            ctx.stats.busy_nanos.fetch_add(
                (output.inference.as_nanos() / instances) as u64,
                Ordering::Relaxed,
            );
            let pipeline = &ctx.engine.pipeline;
            jobs.into_iter()
                .zip(prepared)
                .zip(output.outputs)
                .zip(waits)
                .map(|(((job, prepared), outputs), wait)| Answer {
                    timing: Timing {
                        queue_ms: wait.as_secs_f64() * 1e3,
                        batch_size: rows as u32,
                        inference_ms: seconds * 1e3,
                        worker_ms: 0.0,
                        wait_ms: (batch_start - job.arrived).as_secs_f64() * 1e3,
                        prepare_ms: job.prepare.as_secs_f64() * 1e3,
                    },
                    job,
                    outcome: pipeline.finish(&prepared.shape, prepared.rows, outputs),
                })
                .collect()
        }
        Err(error) => {
            tracing::error!(%error, batch = jobs.len(), "inference failed; requeueing the batch");
            let message = error.to_string();
            jobs.into_iter()
                .map(|job| Answer::failed(job, Error::Model(message.clone())))
                .collect()
        }
    }
}

/// The span of one `session.run` (traces on): a trace of its own, linked to each of its jobs'
/// spans and they to it; each job's wait for a batch ends here.
fn run_span(ctx: &Context, jobs: &mut [Job], rows: usize) -> tracing::Span {
    for job in jobs.iter_mut() {
        job.batch_wait = tracing::Span::none();
    }
    if !otel::on() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        target: otel::TARGET,
        parent: None,
        "session.run",
        otel.name = "session.run",
        ember.model = ctx.model.as_str(),
        ember.batch.jobs = jobs.len(),
        ember.batch.rows = rows,
    );
    for job in jobs.iter() {
        otel::link(&span, &job.span);
        otel::link(&job.span, &span);
    }
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::JobShape;
    use crate::tensor::{Data, Tensor};

    fn job(rows: usize, width: i64) -> Prepared {
        let n = rows * width as usize;
        Prepared {
            inputs: vec![
                Tensor::new(vec![rows as i64, width], Data::F32(vec![0.0; n])).expect("tensor"),
            ],
            rows,
            shape: JobShape {
                raw: true,
                requested: None,
                geometry: None,
            },
        }
    }

    fn ids(buckets: &[Vec<(u32, Prepared)>]) -> Vec<Vec<u32>> {
        buckets
            .iter()
            .map(|b| b.iter().map(|(id, _)| *id).collect())
            .collect()
    }

    #[test]
    fn jobs_of_equal_shape_share_a_run_and_other_shapes_run_apart() {
        let jobs = vec![
            (1, job(1, 4)),
            (2, job(1, 8)),
            (3, job(1, 4)),
            (4, job(1, 8)),
        ];
        assert_eq!(ids(&buckets(jobs, 8, true)), [vec![1, 3], vec![2, 4]]);
    }

    #[test]
    fn rows_never_exceed_the_max_batch_and_without_batching_each_job_runs_alone() {
        let jobs = vec![
            (1, job(3, 4)),
            (2, job(2, 4)),
            (3, job(2, 4)),
            (4, job(1, 4)),
        ];
        assert_eq!(ids(&buckets(jobs, 5, true)), [vec![1, 2], vec![3, 4]]);
        let jobs = vec![(1, job(1, 4)), (2, job(1, 4))];
        assert_eq!(ids(&buckets(jobs, 8, false)), [vec![1], vec![2]]);
    }
}
