//! The dispatcher's side of RabbitMQ: one connection, re-established by itself. On it: a
//! confirm-mode channel that publishes jobs and consumes Direct Reply-to (so a request can wait
//! for its job's result without a queue of its own), the result-store consumer, the heartbeat
//! listener and the callback sender.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ember_core::amqp::{AmqpConfig, Headers, unix_ms};
use ember_core::protocol::{Heartbeat, ModelInfo, WorkerState, header};
use ember_core::topology::{self, QueueSettings};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{RwLock, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::callbacks::{self, CallbackSender};
use crate::metrics::Metrics;
use crate::store::Store;

/// Direct Reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = topology::DIRECT_REPLY_TO;
/// The shared queue the dispatchers store results from (competing consumers).
pub const RESULTS_STORE_QUEUE: &str = "ember.results.store";
/// Where results dropped from [`RESULTS_STORE_QUEUE`] (its length bound, its TTL) go, for the
/// dispatchers to mark their jobs `expired`.
pub const RESULTS_EXPIRED_QUEUE: &str = "ember.results.expired";

/// Bounds of the results store queue: what it holds while no dispatcher takes results in.
#[derive(Debug, Clone, Copy)]
pub struct ResultsStoreSettings {
    /// `x-max-length`, with `drop-head` (the oldest go to [`RESULTS_EXPIRED_QUEUE`]).
    pub max_length: u32,
    /// `x-message-ttl`: the job records' TTL (a result kept longer has no record to answer).
    pub ttl: Duration,
}

/// Why a job could not be published.
#[derive(Debug)]
pub enum PublishError {
    /// The model's queue is at its max length (`reject-publish`).
    QueueFull,
    /// No queue took the job.
    Unroutable,
    /// Nothing was published: no broker connection, or the broker nacked the job (a quorum
    /// queue electing a leader, a node going). Worth a retry, and the job is not in any queue.
    Refused(String),
    /// The publish's outcome is unknown (its confirm never came): the job may be in the queue.
    Unavailable(String),
}

/// A job to publish.
#[derive(Debug)]
pub struct OutgoingJob<'a> {
    pub job_id: &'a str,
    pub model: &'a str,
    /// Published as it is (the HTTP body, not a copy of it).
    pub body: &'a [u8],
    pub content_type: &'a str,
    /// A binary-tensor job's JSON header length (`inference-header-content-length`).
    pub inference_header_length: Option<u64>,
    pub callback_url: Option<&'a str>,
    pub deadline_ms: Option<u64>,
    pub traceparent: Option<&'a str>,
    /// Only this version of the model may answer (routing key `<model>@<version>`, header
    /// `ember-model-version`); unroutable when no queue of the version is bound.
    pub version: Option<&'a str>,
    /// Wait for the result by Direct Reply-to.
    pub reply: bool,
}

struct Link {
    channel: Channel,
    pending: Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>,
    /// A channel of its own for asking a queue's depth after a nack (a failed passive declare
    /// closes its channel; the publishing one must not be it).
    probe: Channel,
    /// The model queues' `x-max-length`.
    max_length: u32,
}

impl Link {
    /// Why the broker nacked a job: the model's queue at its bound (429: at least half of it
    /// ready), or anything else — a quorum queue electing a leader, a node going — which a
    /// retry may get past (503). A nack says no more by itself.
    async fn nack_reason(&self, model: &str) -> PublishError {
        let probe = self.probe.queue_declare(
            topology::jobs_queue(model).as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        );
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            // A quorum queue counts the jobs in workers' hands against its bound too, and a
            // passive declare tells only the ready ones (measured under overload: nacks with
            // 245 to 269 of 300 ready, docs/chaos.md). Half the bound ready counts as full; a
            // queue electing a leader under ordinary load holds far fewer.
            Ok(Ok(queue)) if queue.message_count() >= self.max_length / 2 => {
                PublishError::QueueFull
            }
            Ok(Ok(queue)) => PublishError::Refused(format!(
                "nacked with {} of {} jobs ready: not a full queue",
                queue.message_count(),
                self.max_length
            )),
            _ => PublishError::Refused("nacked, and the queue's depth cannot be read".into()),
        }
    }
}

/// Heartbeats older than this are forgotten (but not the model info they carried).
const FORGET_AFTER: Duration = Duration::from_secs(60);

/// The last heartbeat of each worker, per model, and the model info the workers publish.
#[derive(Debug, Default)]
pub struct Heartbeats {
    inner: Mutex<HeartbeatsInner>,
}

#[derive(Debug, Default)]
struct HeartbeatsInner {
    /// `(model, worker)` -> its last heartbeat.
    workers: HashMap<(String, String), WorkerBeat>,
    /// Per model, the model info of the latest heartbeat that had one; kept when the model's
    /// workers are gone, so that metadata stays right after a scale to zero.
    last_info: HashMap<String, Arc<ModelInfo>>,
}

#[derive(Debug)]
struct WorkerBeat {
    state: WorkerState,
    /// Tokio's clock, so that tests can move it.
    at: tokio::time::Instant,
    info: Option<Arc<ModelInfo>>,
}

/// What the workers of one model say about it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelReport {
    /// The model info of the freshest heartbeat that carried one (for the version asked, if
    /// one was).
    pub info: Arc<ModelInfo>,
    /// The distinct versions of the workers heard from lately, and the last reported one.
    pub versions: Vec<String>,
}

impl Heartbeats {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeartbeatsInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Workers of `model` (that reported `version`, when given) that said `ready` in the last
    /// `within`.
    pub fn ready_workers(&self, model: &str, version: Option<&str>, within: Duration) -> usize {
        self.lock()
            .workers
            .iter()
            .filter(|((m, _), beat)| {
                m == model
                    && beat.state == WorkerState::Ready
                    && beat.at.elapsed() <= within
                    && version.is_none_or(|v| beat.info.as_ref().is_some_and(|i| i.version == v))
            })
            .count()
    }

    /// What the workers of `model` reported about it: the info of the freshest heartbeat (of
    /// `version`, when given), and the versions of the workers heard from in the last `within`
    /// plus the last one reported. `None` until a worker has reported (that version).
    pub fn model_report(
        &self,
        model: &str,
        version: Option<&str>,
        within: Duration,
    ) -> Option<ModelReport> {
        let inner = self.lock();
        let last = inner.last_info.get(model)?;
        let mut versions = std::collections::BTreeSet::from([last.version.clone()]);
        let mut freshest: Option<(&Arc<ModelInfo>, tokio::time::Instant)> = None;
        for ((m, _), beat) in &inner.workers {
            let Some(info) = beat.info.as_ref().filter(|_| m == model) else {
                continue;
            };
            if beat.at.elapsed() <= within {
                versions.insert(info.version.clone());
            }
            if version.is_none_or(|v| v == info.version)
                && freshest.is_none_or(|(_, at)| beat.at > at)
            {
                freshest = Some((info, beat.at));
            }
        }
        let info = match version {
            // The last reported info is the freshest of all.
            None => last.clone(),
            Some(v) if last.version == v => last.clone(),
            Some(_) => freshest?.0.clone(),
        };
        Some(ModelReport {
            info,
            versions: versions.into_iter().collect(),
        })
    }

    /// The model version `worker` of `model` last reported, if it did.
    pub fn worker_version(&self, model: &str, worker: &str) -> Option<String> {
        let inner = self.lock();
        let beat = inner
            .workers
            .get(&(model.to_string(), worker.to_string()))?;
        Some(beat.info.as_ref()?.version.clone())
    }

    fn record(&self, beat: &Heartbeat) {
        let mut inner = self.lock();
        inner
            .workers
            .retain(|_, known| known.at.elapsed() < FORGET_AFTER);
        let info = beat.model_info.as_ref().map(|info| {
            // The same info every second: keep the one in hand rather than another copy.
            match inner.last_info.get(&beat.model) {
                Some(last) if **last == *info => last.clone(),
                _ => Arc::new(info.clone()),
            }
        });
        if let Some(info) = &info {
            inner.last_info.insert(beat.model.clone(), info.clone());
        }
        inner.workers.insert(
            (beat.model.clone(), beat.worker.clone()),
            WorkerBeat {
                state: beat.state,
                at: tokio::time::Instant::now(),
                info,
            },
        );
    }
}

/// The broker side, shared by all requests.
pub struct Broker {
    link: RwLock<Option<Arc<Link>>>,
    pub heartbeats: Heartbeats,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker").finish_non_exhaustive()
    }
}

/// What the broker loop needs besides the broker itself.
#[derive(Debug, Clone)]
pub struct BrokerContext {
    pub amqp: AmqpConfig,
    pub models: Vec<String>,
    pub queue: QueueSettings,
    pub results: ResultsStoreSettings,
    pub store: Store,
    pub metrics: Metrics,
    pub callbacks: Arc<CallbackSender>,
    pub callback_concurrency: u16,
}

impl Broker {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            link: RwLock::new(None),
            heartbeats: Heartbeats::default(),
        })
    }

    pub async fn connected(&self) -> bool {
        self.link.read().await.is_some()
    }

    /// Publishes a job with confirms. With `reply`, returns the receiver of its result.
    pub async fn publish(
        &self,
        job: OutgoingJob<'_>,
        metrics: &Metrics,
    ) -> Result<Option<oneshot::Receiver<Vec<u8>>>, PublishError> {
        let link = self
            .link
            .read()
            .await
            .clone()
            .ok_or_else(|| PublishError::Refused("not connected to the broker".into()))?;
        // With traces on, the publish is a span of its own (a child of the request's), and the
        // job carries its context: the worker's spans continue this trace.
        let span = publish_span(&job);
        let traceparent = ember_core::otel::traceparent(&span);
        let job = OutgoingJob {
            traceparent: traceparent.as_deref().or(job.traceparent),
            ..job
        };
        let headers = job_headers(&job, unix_ms());
        let mut properties = BasicProperties::default()
            .with_message_id(job.job_id.into())
            .with_correlation_id(job.job_id.into())
            .with_content_type(job.content_type.into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let receiver = if job.reply {
            let (tx, rx) = oneshot::channel();
            link.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(job.job_id.to_string(), tx);
            properties = properties.with_reply_to(DIRECT_REPLY_TO.into());
            Some(rx)
        } else {
            None
        };
        let routing_key = job
            .version
            .map(|version| topology::version_routing_key(job.model, version));
        let started = Instant::now();
        let confirmed = tracing::Instrument::instrument(
            async {
                link.channel
                    .basic_publish(
                        topology::JOBS_EXCHANGE.into(),
                        routing_key.as_deref().unwrap_or(job.model).into(),
                        BasicPublishOptions {
                            mandatory: true,
                            ..BasicPublishOptions::default()
                        },
                        job.body,
                        properties,
                    )
                    .await?
                    .await
            },
            span.clone(),
        )
        .await;
        metrics
            .publish_confirm
            .observe(started.elapsed().as_secs_f64());
        let outcome = match confirmed {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(_))) => Err(PublishError::Unroutable),
            Ok(Confirmation::Nack(_)) => Err(link.nack_reason(job.model).await),
            Ok(Confirmation::NotRequested) => Err(PublishError::Unavailable(
                "publisher confirms are off".into(),
            )),
            Err(error) => Err(PublishError::Unavailable(error.to_string())),
        };
        if outcome.is_err() && job.reply {
            link.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(job.job_id);
        }
        outcome.map(|()| receiver)
    }

    /// Tells the model's workers to skip `job_id` (they answer it `cancelled`).
    pub async fn announce_cancel(&self, model: &str, job_id: &str) -> Result<(), String> {
        let link = self
            .link
            .read()
            .await
            .clone()
            .ok_or_else(|| "not connected to the broker".to_string())?;
        let confirmation = async {
            link.channel
                .basic_publish(
                    topology::CANCEL_EXCHANGE.into(),
                    model.into(),
                    BasicPublishOptions::default(),
                    job_id.as_bytes(),
                    BasicProperties::default().with_expiration("3600000".into()),
                )
                .await?
                .await
        }
        .await
        .map_err(|e| e.to_string())?;
        if confirmation.is_ack() {
            Ok(())
        } else {
            Err("the broker refused the cancellation".into())
        }
    }

    /// Forgets a waiter that gave up (its result still reaches the store).
    pub async fn forget(&self, job_id: &str) {
        if let Some(link) = self.link.read().await.as_ref() {
            link.pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(job_id);
        }
    }

    /// Connects, serves, and reconnects until `shutdown`; `tracker` holds the callback tasks.
    pub async fn run(
        self: Arc<Self>,
        context: BrokerContext,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        while !shutdown.is_cancelled() {
            let Some(connection) =
                ember_core::amqp::connect(&context.amqp, "ember-dispatcher", &shutdown).await
            else {
                break;
            };
            match self.serve(&connection, &context, &shutdown, &tracker).await {
                Ok(()) => tracing::info!("broker link closed for shutdown"),
                Err(error) => {
                    tracing::warn!(%error, "lost the broker; reconnecting");
                    context.metrics.broker_reconnects.inc();
                }
            }
            *self.link.write().await = None;
            if shutdown.is_cancelled() {
                // Let the callbacks in hand finish or go back to the queue before closing.
                tracker.close();
                tracker.wait().await;
                let _ = connection
                    .close(200, "dispatcher shutting down".into())
                    .await;
                break;
            }
            let _ = connection.close(200, "reconnecting".into()).await;
        }
    }

    async fn serve(
        &self,
        connection: &Connection,
        context: &BrokerContext,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
    ) -> lapin::Result<()> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        for model in &context.models {
            topology::declare_model(&channel, model, context.queue).await?;
        }
        declare_results_store(&channel, context.results).await?;
        let mut replies = topology::direct_reply_consumer(&channel).await?;
        let link = Arc::new(Link {
            channel,
            pending: Mutex::new(HashMap::new()),
            probe: connection.create_channel().await?,
            max_length: context.queue.max_length,
        });
        let session = CancellationToken::new();
        let store_task = tokio::spawn(take_results(
            connection.create_channel().await?,
            Take::Store,
            context.store.clone(),
            context.metrics.clone(),
            session.clone(),
        ));
        let expired_task = tokio::spawn(take_results(
            connection.create_channel().await?,
            Take::Expired,
            context.store.clone(),
            context.metrics.clone(),
            session.clone(),
        ));
        let heartbeat_channel = connection.create_channel().await?;
        let heartbeats = topology::HeartbeatFeed::subscribe(&heartbeat_channel, "#").await?;
        let callback_channel = connection.create_channel().await?;
        callback_channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let callback_task = tokio::spawn(callbacks::consume(
            callback_channel,
            context.callbacks.clone(),
            context.callback_concurrency,
            shutdown.clone(),
            tracker.clone(),
        ));
        *self.link.write().await = Some(link.clone());
        tracing::info!(models = ?context.models, "broker link ready");

        let mut heartbeats = heartbeats;
        let outcome = loop {
            tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                reply = replies.next() => match reply {
                    Some(Ok(delivery)) => {
                        let id = delivery.properties.correlation_id().as_ref().map(|c| c.to_string());
                        if let Some(id) = id {
                            let waiter = link.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                            if let Some(waiter) = waiter {
                                let _ = waiter.send(delivery.data);
                            }
                        }
                    }
                    Some(Err(error)) => break Err(error),
                    None => break Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))),
                },
                beat = heartbeats.next() => match beat {
                    Some(Ok(beat)) => self.heartbeats.record(&beat),
                    Some(Err(error)) => break Err(error),
                    None => break Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed))),
                },
            }
        };
        session.cancel();
        let _ = store_task.await;
        let _ = expired_task.await;
        // The callback consumer stops by itself on shutdown or when the connection fails.
        let _ = callback_task.await;
        // Waiters of this link will not get their replies; dropping them ends their waits.
        link.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        outcome
    }
}

/// The span of a job's publish, with the OpenTelemetry messaging attributes; none with traces
/// off.
fn publish_span(job: &OutgoingJob<'_>) -> tracing::Span {
    if !ember_core::otel::on() {
        return tracing::Span::none();
    }
    let destination = match job.version {
        Some(version) => topology::version_routing_key(job.model, version),
        None => job.model.to_string(),
    };
    tracing::info_span!(
        target: ember_core::otel::TARGET,
        "publish",
        otel.name = format!("publish {}", topology::JOBS_EXCHANGE),
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = topology::JOBS_EXCHANGE,
        messaging.rabbitmq.destination.routing_key = destination,
        messaging.message.id = job.job_id,
        ember.model = job.model,
    )
}

/// A job's AMQP headers: when it was submitted (`now_ms`), and whichever of the callback URL,
/// trace context, deadline and binary header length it has.
fn job_headers(job: &OutgoingJob<'_>, now_ms: u64) -> FieldTable {
    let mut headers = Headers::new();
    headers.uint(header::SUBMITTED_AT, now_ms);
    // Every job the dispatcher submits can be polled, so its result is stored.
    headers.bool(header::STORE_RESULT, true);
    if let Some(deadline) = job.deadline_ms {
        headers.uint(header::DEADLINE, deadline);
    }
    if let Some(length) = job.inference_header_length {
        headers.uint(header::INFERENCE_HEADER_LENGTH, length);
    }
    if let Some(url) = job.callback_url {
        headers.text(header::CALLBACK_URL, url);
    }
    if let Some(traceparent) = job.traceparent {
        headers.text(header::TRACEPARENT, traceparent);
    }
    if let Some(version) = job.version {
        headers.text(header::MODEL_VERSION, version);
    }
    headers.into_table()
}

/// Arguments of [`RESULTS_STORE_QUEUE`] (`dead_letter`) and of [`RESULTS_EXPIRED_QUEUE`]: both
/// bounded in length (oldest dropped first) and in age.
pub fn results_queue_arguments(settings: ResultsStoreSettings, dead_letter: bool) -> FieldTable {
    let mut args = Headers::new();
    args.text("x-queue-type", "quorum")
        .text("x-overflow", "drop-head")
        .uint("x-max-length", u64::from(settings.max_length))
        .uint(
            "x-message-ttl",
            u64::try_from(settings.ttl.as_millis()).unwrap_or(u64::MAX),
        );
    if dead_letter {
        // The default exchange, by queue name; at-most-once (what drop-head allows).
        args.text("x-dead-letter-exchange", "")
            .text("x-dead-letter-routing-key", RESULTS_EXPIRED_QUEUE);
    }
    args.into_table()
}

async fn declare_results_store(
    channel: &Channel,
    settings: ResultsStoreSettings,
) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(
            RESULTS_EXPIRED_QUEUE.into(),
            durable,
            results_queue_arguments(settings, false),
        )
        .await?;
    channel
        .queue_declare(
            RESULTS_STORE_QUEUE.into(),
            durable,
            results_queue_arguments(settings, true),
        )
        .await?;
    // A broker upgraded from before results were stored only when asked still binds the store
    // to `ember.results` with `#`. It is left alone: while older workers run, or jobs queued by
    // older dispatchers (without `ember-store-result`) are served, their results come that way.
    // docs/deploy.md says when to remove it.
    channel
        .queue_bind(
            RESULTS_STORE_QUEUE.into(),
            topology::RESULTS_STORED_EXCHANGE.into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// Which results queue [`take_results`] consumes.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Take {
    /// Results: into the store.
    Store,
    /// Results dropped before they were stored: their jobs marked expired.
    Expired,
}

/// Takes results in (into the store, or marking their jobs expired), and stops counting each
/// job among its tenant's outstanding ones; acks after the store has it.
async fn take_results(
    channel: Channel,
    take: Take,
    store: Store,
    metrics: Metrics,
    done: CancellationToken,
) {
    let queue = match take {
        Take::Store => RESULTS_STORE_QUEUE,
        Take::Expired => RESULTS_EXPIRED_QUEUE,
    };
    let consumer = async {
        channel.basic_qos(64, BasicQosOptions::default()).await?;
        channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }
    .await;
    let mut consumer = match consumer {
        Ok(consumer) => consumer,
        Err(error) => {
            tracing::warn!(%error, queue, "cannot consume results");
            return;
        }
    };
    loop {
        let delivery = tokio::select! {
            () = done.cancelled() => return,
            next = consumer.next() => match next {
                Some(Ok(delivery)) => delivery,
                _ => return,
            },
        };
        let job_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string());
        let taken = match (&job_id, take) {
            (None, _) => Ok(("no_job_id", None)),
            (Some(id), Take::Store) => store
                .put_result(id, &delivery.data)
                .await
                .map(|(stored, record)| (if stored { "stored" } else { "duplicate" }, record)),
            (Some(id), Take::Expired) => store
                .mark_expired(id)
                .await
                .map(|record| ("expired", record)),
        };
        match taken {
            Ok((outcome, record)) => {
                // Only a job its tenant's share counted has a count to release: no Redis call
                // per result for the others.
                if let (Some(id), Some(record)) = (&job_id, record)
                    && record.counted
                    && let Some(tenant) = &record.tenant
                {
                    store.release(tenant, &record.model, id).await;
                }
                metrics.results_stored.with_label_values(&[outcome]).inc();
                let _ = delivery.ack(BasicAckOptions::default()).await;
            }
            Err(error) => {
                tracing::warn!(%error, queue, "cannot store a result; it goes back to the queue");
                tokio::time::sleep(Duration::from_millis(500)).await;
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

#[cfg(test)]
mod tests {
    use ember_core::amqp::{header_flag, header_str, header_u64};

    use super::*;

    #[test]
    fn a_binary_job_carries_its_header_length_and_a_json_one_does_not() {
        let mut job = OutgoingJob {
            job_id: "j",
            model: "m",
            body: b"{}",
            content_type: ember_core::protocol::content_type::OIP_BINARY,
            inference_header_length: Some(123),
            callback_url: None,
            deadline_ms: Some(99),
            traceparent: Some("00-abc-def-01"),
            version: Some("2"),
            reply: false,
        };
        let headers = job_headers(&job, 42);
        let headers = Some(&headers);
        assert_eq!(
            header_u64(headers, header::INFERENCE_HEADER_LENGTH),
            Some(123)
        );
        assert_eq!(header_u64(headers, header::SUBMITTED_AT), Some(42));
        assert_eq!(header_u64(headers, header::DEADLINE), Some(99));
        assert_eq!(
            header_str(headers, header::TRACEPARENT),
            Some("00-abc-def-01")
        );
        assert_eq!(header_str(headers, header::CALLBACK_URL), None);
        assert!(
            header_flag(headers, header::STORE_RESULT),
            "a job submitted over HTTP can be polled"
        );
        job.inference_header_length = None;
        let headers = job_headers(&job, 42);
        assert_eq!(
            header_u64(Some(&headers), header::INFERENCE_HEADER_LENGTH),
            None
        );
    }

    fn info(version: &str, input: &str) -> ModelInfo {
        ModelInfo {
            version: version.into(),
            inputs: vec![ember_core::protocol::oip::TensorMeta {
                name: input.into(),
                datatype: "FP32".into(),
                shape: vec![-1, 4],
            }],
            outputs: vec![],
            max_batch: 8,
            input: "tensor".into(),
            decoder: "tensor".into(),
        }
    }

    fn beat(model: &str, worker: &str, info: Option<ModelInfo>) -> Heartbeat {
        Heartbeat {
            worker: worker.into(),
            model: model.into(),
            state: WorkerState::Ready,
            in_flight: 0,
            completed: 0,
            busy_seconds: 0.0,
            model_load_seconds: 0.0,
            at_ms: 0,
            device: None,
            device_fallback: false,
            gpu: None,
            model_info: info,
        }
    }

    #[test]
    fn the_freshest_model_info_answers_and_versions_are_the_workers() {
        let heartbeats = Heartbeats::default();
        let within = Duration::from_secs(5);
        assert_eq!(heartbeats.model_report("m", None, within), None);
        // A worker from before model_info counts as ready but says nothing about the model.
        heartbeats.record(&beat("m", "old", None));
        assert_eq!(heartbeats.ready_workers("m", None, within), 1);
        assert_eq!(heartbeats.model_report("m", None, within), None);

        heartbeats.record(&beat("m", "a", Some(info("1", "x"))));
        heartbeats.record(&beat("m", "b", Some(info("2", "y"))));
        heartbeats.record(&beat("other", "c", Some(info("9", "z"))));
        let report = heartbeats
            .model_report("m", None, within)
            .expect("reported");
        assert_eq!(report.info.inputs[0].name, "y");
        assert_eq!(report.versions, ["1", "2"]);
        let one = heartbeats.model_report("m", Some("1"), within).expect("v1");
        assert_eq!(one.info.inputs[0].name, "x");
        assert_eq!(heartbeats.model_report("m", Some("3"), within), None);
        assert_eq!(heartbeats.ready_workers("m", None, within), 3);
        assert_eq!(heartbeats.ready_workers("m", Some("1"), within), 1);
        assert_eq!(heartbeats.ready_workers("m", Some("3"), within), 0);
        assert_eq!(heartbeats.worker_version("m", "a").as_deref(), Some("1"));
        assert_eq!(heartbeats.worker_version("m", "old"), None);
        assert_eq!(heartbeats.worker_version("m", "nobody"), None);
        // The same info again is not another copy.
        heartbeats.record(&beat("m", "b", Some(info("2", "y"))));
        let again = heartbeats
            .model_report("m", None, within)
            .expect("reported");
        assert!(Arc::ptr_eq(&report.info, &again.info));
    }

    #[tokio::test(start_paused = true)]
    async fn model_info_outlives_the_workers_that_sent_it() {
        let heartbeats = Heartbeats::default();
        let within = Duration::from_secs(5);
        heartbeats.record(&beat("m", "a", Some(info("1", "x"))));
        heartbeats.record(&beat("m", "b", Some(info("2", "y"))));
        tokio::time::advance(FORGET_AFTER + Duration::from_secs(1)).await;
        // Another model's heartbeat sweeps the gone workers out.
        heartbeats.record(&beat("other", "c", None));
        assert_eq!(heartbeats.ready_workers("m", None, within), 0);
        let report = heartbeats
            .model_report("m", None, within)
            .expect("remembered");
        assert_eq!(report.info.inputs[0].name, "y");
        assert_eq!(report.versions, ["2"]);
        let two = heartbeats.model_report("m", Some("2"), within).expect("v2");
        assert_eq!(two.versions, ["2"]);
        assert_eq!(heartbeats.model_report("m", Some("1"), within), None);
    }
}
