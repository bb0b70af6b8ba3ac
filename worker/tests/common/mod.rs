//! Helpers for the worker's end-to-end tests: a real RabbitMQ on 127.0.0.1:5672, the real
//! `ember-worker` binary, the real SSD model.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::ops::{Deref, DerefMut};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ember_core::protocol::{JobResult, header};
use ember_core::topology::{self, QueueSettings};
use ember_testkit::amqp::{self, AMQP_URL, connect};
use ember_testkit::process::Process;
use ember_testkit::{PATIENCE, free_port, root};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, Consumer};

pub fn sample(name: &str) -> Vec<u8> {
    std::fs::read(root().join("tests/samples").join(name)).unwrap()
}

/// `GET path` on 127.0.0.1:port: (status, body), or None if nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((status, body))
}

/// A running `ember-worker` process (its [`Process`]: log, signals, exit); killed on drop.
pub struct Worker {
    process: Process,
    pub admin_port: u16,
}

impl Deref for Worker {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

impl Worker {
    /// Starts a worker for `model` (the bundled SSD model served under that name) and waits
    /// until /readyz says it is consuming.
    pub fn start(model: &str, extra: &[&str]) -> Self {
        let worker = Self::spawn(model, extra);
        worker.wait_ready();
        worker
    }

    pub fn spawn(model: &str, extra: &[&str]) -> Self {
        Self::spawn_with_env(model, extra, &[])
    }

    /// [`Worker::spawn`] with extra environment variables (e.g. the chaos crash marker).
    pub fn spawn_with_env(model: &str, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let admin_port = free_port();
        let log = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{model}-{}.log", uuid::Uuid::new_v4().simple()));
        let process = Process::spawn(
            Command::new(env!("CARGO_BIN_EXE_ember-worker"))
                .current_dir(root())
                .args(["--model-name", model, "--intra-threads", "1"])
                .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")])
                .args(["--amqp-url", AMQP_URL])
                .args(extra)
                .envs(env.iter().copied())
                .env("EMBER_LOG", "info,ort=warn"),
            log,
        );
        Self {
            process,
            admin_port,
        }
    }

    pub fn wait_ready(&self) {
        let started = Instant::now();
        while started.elapsed() < PATIENCE {
            if let Some((200, _)) = http_get(self.admin_port, "/readyz") {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("worker not ready in time; log:\n{}", self.log_text());
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }
}

/// A test client: publishes jobs with confirms and collects results from its own reply queue.
pub struct Client {
    pub connection: Connection,
    pub channel: Channel,
    pub model: String,
    pub reply_queue: String,
    replies: Consumer,
    pub results: HashMap<String, Vec<JobResult>>,
}

/// Properties of a job message.
#[derive(Default, Clone)]
pub struct JobOptions<'a> {
    pub content_type: Option<&'a str>,
    pub deadline_ms: Option<u64>,
    /// The binary tensor extension's JSON header length (`inference-header-content-length`).
    pub header_length: Option<usize>,
    /// `ember-model-version`: only this version may answer.
    pub pin: Option<&'a str>,
    /// Publish with routing key `<model>@<version>` (straight to that version's queue).
    pub to_version: Option<&'a str>,
}

impl Client {
    pub async fn new(model: &str) -> Self {
        let connection = connect().await;
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        topology::declare_model(&channel, model, QueueSettings::default())
            .await
            .unwrap();
        let (reply_queue, replies) = amqp::reply_queue(&channel).await;
        Self {
            connection,
            channel,
            model: model.to_string(),
            reply_queue,
            replies,
            results: HashMap::new(),
        }
    }

    /// Publishes one job (persistent, confirmed) and returns its id (= correlation id).
    pub async fn submit(&self, body: &[u8], options: JobOptions<'_>) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut headers = FieldTable::default();
        headers.insert(
            ShortString::from(header::SUBMITTED_AT),
            AMQPValue::LongLongInt(ember_core::amqp::unix_ms() as i64),
        );
        if let Some(length) = options.header_length {
            headers.insert(
                ShortString::from(header::INFERENCE_HEADER_LENGTH),
                AMQPValue::LongLongInt(length as i64),
            );
        }
        if let Some(deadline) = options.deadline_ms {
            headers.insert(
                ShortString::from(header::DEADLINE),
                AMQPValue::LongLongInt(deadline as i64),
            );
        }
        if let Some(version) = options.pin {
            headers.insert(
                ShortString::from(header::MODEL_VERSION),
                long_string(version),
            );
        }
        let routing_key = match options.to_version {
            Some(version) => topology::version_routing_key(&self.model, version),
            None => self.model.clone(),
        };
        let mut properties = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_correlation_id(id.as_str().into())
            .with_reply_to(self.reply_queue.as_str().into())
            .with_delivery_mode(2)
            .with_headers(headers);
        if let Some(content_type) = options.content_type {
            properties = properties.with_content_type(content_type.into());
        }
        let confirmation = self
            .channel
            .basic_publish(
                topology::JOBS_EXCHANGE.into(),
                routing_key.as_str().into(),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirmation.is_ack(), "job publish not confirmed");
        id
    }

    pub async fn submit_png(&self, name: &str) -> String {
        self.submit(
            &sample(name),
            JobOptions {
                content_type: Some("image/png"),
                ..JobOptions::default()
            },
        )
        .await
    }

    /// Collects replies until every id in `ids` has at least one result (bounded by PATIENCE).
    pub async fn collect(&mut self, ids: &[String]) {
        let deadline = Instant::now() + PATIENCE;
        while !ids.iter().all(|id| self.results.contains_key(id)) {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(remaining, self.replies.next()).await;
            match next {
                Ok(Some(Ok(delivery))) => self.record(&delivery.data, &delivery.properties),
                Ok(other) => panic!("reply consumer ended: {other:?}"),
                Err(_) => panic!(
                    "only {} of {} jobs answered in time",
                    ids.iter()
                        .filter(|id| self.results.contains_key(*id))
                        .count(),
                    ids.len()
                ),
            }
        }
    }

    /// Takes whatever replies arrive within `quiet`.
    pub async fn drain_for(&mut self, quiet: Duration) {
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, self.replies.next()).await {
            self.record(&delivery.data, &delivery.properties);
        }
    }

    fn record(&mut self, data: &[u8], properties: &BasicProperties) {
        let result: JobResult = serde_json::from_slice(data).unwrap();
        let correlation = properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
            .unwrap();
        assert_eq!(correlation, result.job_id, "correlation id echoes the job");
        self.results.entry(correlation).or_default().push(result);
    }

    pub fn result(&self, id: &str) -> &JobResult {
        &self.results[id][0]
    }

    /// Deletes the model's queues.
    pub async fn cleanup(self) {
        for queue in topology::model_queues(&self.model) {
            let _ = self
                .channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Consumes one message from `queue` with a manual ack, bounded by PATIENCE.
/// A consumer of `model`'s heartbeats (an exclusive queue bound to `ember.telemetry`).
pub async fn heartbeats(channel: &Channel, model: &str) -> Consumer {
    topology::heartbeat_consumer(channel, &format!("{model}.*"))
        .await
        .unwrap()
}

pub async fn get_one(channel: &Channel, queue: &str) -> lapin::message::Delivery {
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let delivery = tokio::time::timeout(PATIENCE, consumer.next())
        .await
        .expect("a message in time")
        .unwrap()
        .unwrap();
    delivery.ack(BasicAckOptions::default()).await.unwrap();
    channel
        .basic_cancel(
            consumer.tag(),
            lapin::options::BasicCancelOptions::default(),
        )
        .await
        .unwrap();
    delivery
}

pub fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}
