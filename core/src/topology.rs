//! The AMQP topology every part declares at start (idempotently: re-declaring with the same
//! arguments is a no-op, so any part may come up first).

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};

use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};

use crate::amqp::{Headers, header_u64};
use crate::protocol::{Heartbeat, header};

/// Direct exchange jobs are published to, routing key = model name.
pub const JOBS_EXCHANGE: &str = "ember.jobs";
/// Dead-letter exchange; routes by the job's routing key (the model) to `ember.dead.<model>`.
pub const DEAD_LETTER_EXCHANGE: &str = "ember.dlx";
/// Topic exchange carrying the results of jobs that did not ask to be stored, routing key
/// `<model>.<status>`: a reply only, unless a user binds a queue of their own.
pub const RESULTS_EXCHANGE: &str = "ember.results";
/// Topic exchange carrying the results of jobs that asked to be stored (header
/// `ember-store-result`, or a callback URL), routing key `<model>.<status>`; the dispatchers bind
/// `ember.results.store` to it. Only workers may publish to either.
pub const RESULTS_STORED_EXCHANGE: &str = "ember.results.stored";
/// Quorum queue of results whose job asked for an HTTP callback.
pub const CALLBACKS_QUEUE: &str = "ember.callbacks";
/// Topic exchange for cancellations, routing key = model, body = the job id. Workers bind a
/// queue of their own and skip (answer `cancelled`) the jobs named there.
pub const CANCEL_EXCHANGE: &str = "ember.cancel";
/// Transient topic exchange for worker heartbeats, routing key `<model>.<worker-id>`.
pub const TELEMETRY_EXCHANGE: &str = "ember.telemetry";

/// The model's work queue.
pub fn jobs_queue(model: &str) -> String {
    format!("ember.jobs.{model}")
}

/// The routing key on [`JOBS_EXCHANGE`] of jobs pinned to one version of a model.
pub fn version_routing_key(model: &str, version: &str) -> String {
    format!("{model}@{version}")
}

/// The queue of jobs pinned to one version of a model (routing key
/// [`version_routing_key`]), consumed by that version's workers beside the model's queue.
pub fn version_queue(model: &str, version: &str) -> String {
    format!("ember.jobs.{model}@{version}")
}

/// Arguments of a version's queue: the job queue's, with dead letters routed by the model
/// name (so they reach the model's dead-letter queue and notices).
pub fn version_queue_arguments(model: &str, settings: QueueSettings) -> FieldTable {
    retry_queue_arguments(model, settings)
}

/// Declares `version`'s queue of `model` and binds it (idempotent): from now on jobs pinned
/// to the version wait in it for a worker of that version.
pub async fn declare_version(
    channel: &Channel,
    model: &str,
    version: &str,
    settings: QueueSettings,
) -> lapin::Result<()> {
    let queue = version_queue(model, version);
    channel
        .queue_declare(
            queue.as_str().into(),
            durable_queue(),
            version_queue_arguments(model, settings),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            JOBS_EXCHANGE.into(),
            version_routing_key(model, version).as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// The properties of a job moved to another queue by republishing it (to the retry lane, to
/// its version's queue, back from a retired version's queue): the broker's delivery count so
/// far goes into [`header::PRIOR_DELIVERIES`] (the new quorum queue counts afresh), and `pin`,
/// when given, into [`header::MODEL_VERSION`].
pub fn moved_properties(
    properties: &BasicProperties,
    redelivered: bool,
    pin: Option<&str>,
) -> BasicProperties {
    let so_far = deliveries_so_far(properties, redelivered);
    let table = properties.headers().as_ref();
    let mut headers = table.map(|h| h.inner().clone()).unwrap_or_default();
    headers.remove(header::DELIVERY_COUNT);
    let mut headers = Headers::from(FieldTable::from(headers));
    headers.uint(header::PRIOR_DELIVERIES, so_far);
    if let Some(version) = pin {
        headers.text(header::MODEL_VERSION, version);
    }
    properties.clone().with_headers(headers.into_table())
}

/// Ready messages in `queue`, by a passive declare (which fails, closing `channel`, when the
/// queue does not exist).
pub async fn ready_messages(channel: &Channel, queue: &str) -> lapin::Result<u32> {
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map(|q| q.message_count())
}

/// Deliveries a job has had in every queue it went through: the broker's count in this one
/// (`x-delivery-count`, else 1 for a redelivered message) and [`header::PRIOR_DELIVERIES`] from
/// the queues before.
pub fn deliveries_so_far(properties: &BasicProperties, redelivered: bool) -> u64 {
    let table = properties.headers().as_ref();
    let here = header_u64(table, header::DELIVERY_COUNT).unwrap_or(u64::from(redelivered));
    here.saturating_add(header_u64(table, header::PRIOR_DELIVERIES).unwrap_or(0))
}

/// How [`retire_version`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retired {
    /// The queue is gone (or never was); this many waiting jobs were moved out of it.
    Done { moved: u64 },
    /// A consumer (a worker of the version) is still on the queue: try again later.
    InUse { moved: u64 },
}

/// Retires `version` of `model` once none of its workers is left: unbinds its queue (jobs
/// pinned to it from now on are unroutable: the dispatcher answers 404, a worker forwarding
/// one answers `model_version_not_found`), moves the jobs waiting in it to the model's queue
/// marked with the version they pinned (so a worker answers each `model_version_not_found`
/// rather than one being lost), and deletes the queue once it is empty and unused. Runs on
/// channels of its own (a refused delete closes its channel).
pub async fn retire_version(
    connection: &Connection,
    model: &str,
    version: &str,
) -> lapin::Result<Retired> {
    let queue = version_queue(model, version);
    let probe = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let found = match probe
        .queue_declare(queue.as_str().into(), passive, FieldTable::default())
        .await
    {
        Ok(found) => found,
        Err(error) if is_not_found(&error) => return Ok(Retired::Done { moved: 0 }),
        Err(error) => return Err(error),
    };
    let _ = probe.close(200, "probed".into()).await;
    if found.consumer_count() > 0 {
        return Ok(Retired::InUse { moved: 0 });
    }
    let channel = connection.create_channel().await?;
    channel
        .queue_unbind(
            queue.as_str().into(),
            JOBS_EXCHANGE.into(),
            version_routing_key(model, version).as_str().into(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "unbound".into()).await;
    let mut moved = 0;
    // Quorum queues refuse `if-empty`/`if-unused` deletes (a connection error), so the check is
    // ours: unbound, drained, then deleted once a passive declare finds it empty and unused.
    // Only a publish to the default exchange by the queue's name, or a worker of the version
    // starting in between, could reach it in that window.
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        match move_to_model_queue(&channel, &queue, model, version).await? {
            (count, true) => moved += count,
            (count, false) => {
                return Ok(Retired::InUse {
                    moved: moved + count,
                });
            }
        }
        let now = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await?;
        if now.consumer_count() > 0 {
            return Ok(Retired::InUse { moved });
        }
        if now.message_count() > 0 {
            // Acks to a quorum queue apply asynchronously: look again.
            continue;
        }
        let lost = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await?;
        if lost > 0 {
            tracing::error!(%queue, lost, "jobs reached a retired version's queue as it was deleted");
        }
        let _ = channel.close(200, "retired".into()).await;
        return Ok(Retired::Done { moved });
    }
    Ok(Retired::InUse { moved })
}

/// The broker's 404 NOT_FOUND (a passive declare of a queue that does not exist).
fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), lapin::ErrorKind::ProtocolError(e) if e.get_id() == 404)
}

/// Moves the jobs waiting in a retired version's `queue` to the model's queue, marked with the
/// version they pinned: how many, and false when the broker refused one (it stays).
async fn move_to_model_queue(
    channel: &Channel,
    queue: &str,
    model: &str,
    version: &str,
) -> lapin::Result<(u64, bool)> {
    let mut moved = 0;
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: false })
        .await?
    {
        let delivery = message.delivery;
        let properties =
            moved_properties(&delivery.properties, delivery.redelivered, Some(version));
        let confirm = channel
            .basic_publish(
                JOBS_EXCHANGE.into(),
                model.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                properties,
            )
            .await?
            .await?;
        if !matches!(confirm, Confirmation::Ack(None)) {
            delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await?;
            return Ok((moved, false));
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
        moved += 1;
    }
    Ok((moved, true))
}

/// Where the model's poison and expired jobs end up.
pub fn retry_queue(model: &str) -> String {
    format!("ember.retry.{model}")
}

/// Arguments of a model's retry lane: the job queue's, with dead letters routed by the model
/// name (the lane is published to by queue name).
pub fn retry_queue_arguments(model: &str, settings: QueueSettings) -> FieldTable {
    let mut args = Headers::from(jobs_queue_arguments(settings));
    args.text("x-dead-letter-routing-key", model);
    args.into_table()
}

/// Every queue [`declare_model`] declares for a model: jobs, retry lane, dead letters, and
/// the dead-letter notices the workers answer.
pub fn model_queues(model: &str) -> [String; 4] {
    [
        jobs_queue(model),
        retry_queue(model),
        dead_letter_queue(model),
        dead_notice_queue(model),
    ]
}

/// A copy of each of the model's dead letters, for the workers to answer its client with a
/// `dead_lettered` error (the dead-letter queue itself keeps them for operators).
pub fn dead_notice_queue(model: &str) -> String {
    format!("ember.deadnotice.{model}")
}

pub fn dead_letter_queue(model: &str) -> String {
    format!("ember.dead.{model}")
}

/// The routing key of a result on [`RESULTS_EXCHANGE`] and [`RESULTS_STORED_EXCHANGE`].
pub fn result_routing_key(model: &str, status: crate::protocol::Status) -> String {
    format!("{model}.{}", status.as_str())
}

/// Per-model queue settings. Every part declaring a model's queue must agree on them (RabbitMQ
/// refuses a re-declaration with different arguments), so they have one default here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// Deliveries after which a job is dead-lettered (`x-delivery-limit`).
    pub delivery_limit: u32,
    /// Ready messages beyond which publishes are refused (`x-max-length`, `reject-publish`).
    pub max_length: u32,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            delivery_limit: 5,
            max_length: 10_000,
        }
    }
}

/// Arguments of a model's job queue.
pub fn jobs_queue_arguments(settings: QueueSettings) -> FieldTable {
    let mut args = Headers::new();
    args.text("x-queue-type", "quorum")
        .int32("x-delivery-limit", settings.delivery_limit as i32)
        .text("x-dead-letter-exchange", DEAD_LETTER_EXCHANGE)
        .text("x-dead-letter-strategy", "at-least-once")
        .text("x-overflow", "reject-publish")
        .uint("x-max-length", u64::from(settings.max_length));
    args.into_table()
}

/// Most callbacks `ember.callbacks` holds (waiting for a dispatcher to deliver them); beyond it
/// a worker's publish is refused (`reject-publish`) and its job goes back to its queue to be
/// answered later: backpressure, not a callback lost.
pub const CALLBACKS_MAX_LENGTH: u32 = 100_000;

/// Most dead letters kept per queue for operators (`ember.dead.<model>`, the notices, and
/// `ember.callbacks.dead`): the newest stay, the oldest are dropped (`drop-head`), so a poison
/// flood cannot fill the broker's disk.
pub const DEAD_LETTERS_MAX_LENGTH: u32 = 100_000;

/// A durable quorum queue's arguments with a length bound and what happens past it
/// (`reject-publish` or `drop-head`).
pub fn bounded_queue_arguments(max_length: u32, overflow: &str) -> FieldTable {
    let mut args = Headers::new();
    args.text("x-queue-type", "quorum")
        .text("x-overflow", overflow)
        .uint("x-max-length", u64::from(max_length));
    args.into_table()
}

/// Declares a durable quorum queue bounded to `max_length` messages, `overflow` past it.
pub async fn declare_bounded_queue(
    channel: &Channel,
    name: &str,
    max_length: u32,
    overflow: &str,
) -> lapin::Result<()> {
    channel
        .queue_declare(
            name.into(),
            durable_queue(),
            bounded_queue_arguments(max_length, overflow),
        )
        .await
        .map(|_| ())
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

fn durable_queue() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    }
}

/// A queue of the caller's own (server-named, exclusive, deleted with its channel), consumed
/// without acks: its name (a `reply_to`, or what to bind) and its consumer.
pub async fn private_queue(channel: &Channel) -> lapin::Result<(String, lapin::Consumer)> {
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let consumer = consume_without_acks(channel, queue.name().as_str()).await?;
    Ok((queue.name().to_string(), consumer))
}

/// A [`private_queue`] bound to `exchange` with `routing_key`: for transient broadcasts each
/// process must see (heartbeats, cancellations), which need no redelivery.
pub async fn exclusive_consumer(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
) -> lapin::Result<lapin::Consumer> {
    let (queue, consumer) = private_queue(channel).await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(consumer)
}

async fn consume_without_acks(channel: &Channel, queue: &str) -> lapin::Result<lapin::Consumer> {
    channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// RabbitMQ's Direct Reply-to pseudo-queue: a job published with this `reply_to` is answered
/// straight to the publishing channel's [`direct_reply_consumer`].
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The replies to what this channel publishes with `reply_to` [`DIRECT_REPLY_TO`], consumed
/// without acks (Direct Reply-to allows no other mode); must be consumed before publishing.
pub async fn direct_reply_consumer(channel: &Channel) -> lapin::Result<lapin::Consumer> {
    consume_without_acks(channel, DIRECT_REPLY_TO).await
}

/// Every heartbeat of every worker: an [`exclusive_consumer`] of [`TELEMETRY_EXCHANGE`] with `#`.
pub async fn telemetry_consumer(channel: &Channel) -> lapin::Result<lapin::Consumer> {
    heartbeat_consumer(channel, "#").await
}

/// Like [`telemetry_consumer`], for the heartbeats whose routing key matches `pattern`
/// (`<model>.*` for one model's workers).
pub async fn heartbeat_consumer(
    channel: &Channel,
    pattern: &str,
) -> lapin::Result<lapin::Consumer> {
    exclusive_consumer(channel, TELEMETRY_EXCHANGE, pattern).await
}

/// Worker heartbeats, parsed: what the dispatcher, the autoscaler and the chaos bench follow.
#[derive(Debug)]
pub struct HeartbeatFeed(lapin::Consumer);

impl HeartbeatFeed {
    /// Follows the heartbeats whose routing key (`<model>.<worker-id>`) matches `pattern`: `#`
    /// for every worker, `<model>.*` for one model's.
    pub async fn subscribe(channel: &Channel, pattern: &str) -> lapin::Result<Self> {
        heartbeat_consumer(channel, pattern).await.map(Self)
    }

    /// The next heartbeat (messages that are not one are skipped); `None` once the consumer
    /// has ended (its channel or connection closed). Cancel-safe, for a `select!`: a heartbeat
    /// is taken from the consumer only when it is returned.
    pub async fn next(&mut self) -> Option<lapin::Result<Heartbeat>> {
        use futures_util::StreamExt;
        loop {
            match self.0.next().await? {
                Ok(delivery) => {
                    if let Ok(beat) = serde_json::from_slice::<Heartbeat>(&delivery.data) {
                        return Some(Ok(beat));
                    }
                }
                Err(error) => return Some(Err(error)),
            }
        }
    }
}

/// Declares the shared exchanges and the callbacks queue.
pub async fn declare_shared(channel: &Channel) -> lapin::Result<()> {
    for (name, kind) in [
        (JOBS_EXCHANGE, ExchangeKind::Direct),
        (DEAD_LETTER_EXCHANGE, ExchangeKind::Direct),
        (RESULTS_EXCHANGE, ExchangeKind::Topic),
        (RESULTS_STORED_EXCHANGE, ExchangeKind::Topic),
        (CANCEL_EXCHANGE, ExchangeKind::Topic),
    ] {
        channel
            .exchange_declare(name.into(), kind, durable_exchange(), FieldTable::default())
            .await?;
    }
    channel
        .exchange_declare(
            TELEMETRY_EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    declare_bounded_queue(
        channel,
        CALLBACKS_QUEUE,
        CALLBACKS_MAX_LENGTH,
        "reject-publish",
    )
    .await
}

/// Declares everything a model needs: the shared parts, its job queue bound to
/// [`JOBS_EXCHANGE`], its retry lane ([`retry_queue`]: jobs delivered again after a failure,
/// taken one at a time per worker), and its dead-letter queue bound to
/// [`DEAD_LETTER_EXCHANGE`].
pub async fn declare_model(
    channel: &Channel,
    model: &str,
    settings: QueueSettings,
) -> lapin::Result<()> {
    declare_shared(channel).await?;
    let jobs = jobs_queue(model);
    let dead = dead_letter_queue(model);
    channel
        .queue_declare(
            jobs.as_str().into(),
            durable_queue(),
            jobs_queue_arguments(settings),
        )
        .await?;
    channel
        .queue_bind(
            jobs.as_str().into(),
            JOBS_EXCHANGE.into(),
            model.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let retry = retry_queue(model);
    channel
        .queue_declare(
            retry.as_str().into(),
            durable_queue(),
            retry_queue_arguments(model, settings),
        )
        .await?;
    for queue in [dead, dead_notice_queue(model)] {
        declare_bounded_queue(channel, &queue, DEAD_LETTERS_MAX_LENGTH, "drop-head").await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                DEAD_LETTER_EXCHANGE.into(),
                model.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, LongString};

    fn long_string(value: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(value))
    }

    #[test]
    fn bounded_queues_carry_their_bound_and_overflow() {
        let args = bounded_queue_arguments(DEAD_LETTERS_MAX_LENGTH, "drop-head");
        let get = |key: &str| args.inner().get(key).cloned();
        assert_eq!(get("x-queue-type"), Some(long_string("quorum")));
        assert_eq!(get("x-overflow"), Some(long_string("drop-head")));
        assert_eq!(
            get("x-max-length"),
            Some(AMQPValue::LongLongInt(i64::from(DEAD_LETTERS_MAX_LENGTH)))
        );
    }

    #[test]
    fn job_queue_arguments_bound_the_backlog_and_dead_letter_poison() {
        let args = jobs_queue_arguments(QueueSettings {
            delivery_limit: 3,
            max_length: 7,
        });
        let get = |k: &str| args.inner().get(k).cloned();
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongInt(3)));
        assert_eq!(get("x-max-length"), Some(AMQPValue::LongLongInt(7)));
        assert_eq!(get("x-overflow"), Some(long_string("reject-publish")));
        assert_eq!(
            get("x-dead-letter-strategy"),
            Some(long_string("at-least-once"))
        );
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(long_string(DEAD_LETTER_EXCHANGE))
        );
        assert_eq!(get("x-queue-type"), Some(long_string("quorum")));
    }

    #[test]
    fn a_moved_job_keeps_its_delivery_count_and_may_carry_its_pin() {
        let mut table = FieldTable::default();
        table.insert(header::DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        table.insert(header::PRIOR_DELIVERIES.into(), AMQPValue::LongLongInt(3));
        table.insert("keep".into(), long_string("me"));
        let before = BasicProperties::default()
            .with_message_id("j".into())
            .with_headers(table);
        let moved = moved_properties(&before, true, Some("7"));
        let headers = moved.headers().as_ref().expect("headers");
        let get = |k: &str| headers.inner().get(k).cloned();
        assert_eq!(
            get(header::DELIVERY_COUNT),
            None,
            "the new queue counts afresh"
        );
        assert_eq!(
            get(header::PRIOR_DELIVERIES),
            Some(AMQPValue::LongLongInt(5))
        );
        assert_eq!(get(header::MODEL_VERSION), Some(long_string("7")));
        assert_eq!(get("keep"), Some(long_string("me")));
        assert_eq!(moved.message_id().as_ref().map(|m| m.as_str()), Some("j"));
        let first = moved_properties(&BasicProperties::default(), false, None);
        let headers = first.headers().as_ref().expect("headers");
        assert_eq!(
            headers.inner().get(header::PRIOR_DELIVERIES),
            Some(&AMQPValue::LongLongInt(0))
        );
        assert!(headers.inner().get(header::MODEL_VERSION).is_none());
    }

    #[test]
    fn names_follow_the_documented_pattern() {
        assert_eq!(jobs_queue("m"), "ember.jobs.m");
        assert_eq!(version_queue("m", "2.1"), "ember.jobs.m@2.1");
        assert_eq!(version_routing_key("m", "2.1"), "m@2.1");
        assert_eq!(dead_letter_queue("m"), "ember.dead.m");
        assert_eq!(
            result_routing_key("m", crate::protocol::Status::Error),
            "m.error"
        );
    }
}
