//! The chaos suite's clients and the ledger they fill: a callback receiver, an AMQP RPC client
//! that survives broker restarts, and an HTTP client that retries with the same Idempotency-Key.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::routing::post;
use ember_core::amqp::Headers;
use ember_core::protocol::{JobResult, header};
use ember_core::topology::{self, QueueSettings};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::Value;

use super::Harness;
use crate::fleet;

/// How a job is submitted; one job in three of each (`kind_of`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// POST /v1/models/{m}/jobs with a callback URL, then GET /v1/jobs/{id}.
    HttpAsync,
    /// The same with ?wait=10s: the result inline.
    HttpSync,
    /// AMQP RPC: reply_to a durable queue, correlation id = job id.
    Amqp,
}

#[derive(Debug, Clone)]
/// One answer a client saw: the job id and status it carried, and when it came.
pub(super) struct Answer {
    pub(super) job_id: String,
    pub(super) status: String,
    /// The error code of an `error` answer.
    pub(super) code: Option<String>,
    pub(super) at: Instant,
}

impl Answer {
    /// From a worker's result body.
    pub(super) fn of(result: &JobResult) -> Self {
        Self {
            job_id: result.job_id.clone(),
            status: result.status.as_str().to_string(),
            code: result.error.as_ref().map(|e| e.code.as_str().to_string()),
            at: Instant::now(),
        }
    }

    /// `ok`, or `error:<code>`.
    pub(super) fn outcome(&self) -> String {
        match (self.status.as_str(), &self.code) {
            ("ok", _) => "ok".into(),
            (status, Some(code)) => format!("{status}:{code}"),
            (status, None) => status.to_string(),
        }
    }
}

#[derive(Debug)]
/// One job as its client saw it, by the phase (fault) it was sent in.
pub(super) struct Job {
    pub(super) kind: Kind,
    pub(super) phase: usize,
    pub(super) poison: bool,
    /// The job id it was accepted under (AMQP: its key).
    pub(super) accepted: Option<String>,
    /// Why it was refused.
    pub(super) rejected: Option<String>,
    /// The result returned inline (sync HTTP).
    pub(super) inline: Option<Answer>,
    /// Callback deliveries (HTTP) or replies (AMQP), raw.
    pub(super) deliveries: Vec<Answer>,
    /// GET /v1/jobs/{id} once final, as an outcome: `ok`, `error:<code>`, `expired`,
    /// `cancelled`.
    pub(super) visible: Option<String>,
}

/// Every job of the run, by its client-side key.
pub(super) type Ledger = Arc<Mutex<HashMap<String, Job>>>;

/// The guard even if a panicking task poisoned the lock: the ledger stays readable.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- the callback receiver

/// The HTTP callbacks' receiver: records each delivery in the ledger; can refuse connections
/// (`down`) or answer slowly (`slow`).
pub(super) struct CallbackReceiver {
    port: u16,
    /// While set, each callback is answered after `delay`.
    pub(super) slow: Arc<AtomicBool>,
    pub(super) delay: Duration,
    ledger: Ledger,
    stop: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
}

#[derive(Clone)]
struct ReceiverState {
    slow: Arc<AtomicBool>,
    delay: Duration,
    ledger: Ledger,
}

/// POST /cb/{key}: one callback delivery for the job `key`.
async fn callback(
    State(state): State<ReceiverState>,
    UrlPath(key): UrlPath<String>,
    body: axum::body::Bytes,
) -> &'static str {
    if let Ok(result) = serde_json::from_slice::<JobResult>(&body) {
        let mut ledger = lock(&state.ledger);
        if let Some(job) = ledger.get_mut(&key) {
            job.deliveries.push(Answer::of(&result));
        }
    }
    if state.slow.load(Ordering::Relaxed) {
        tokio::time::sleep(state.delay).await;
    }
    "ok"
}

impl CallbackReceiver {
    pub(super) fn new(ledger: Ledger, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            port: fleet::free_port(),
            slow: Arc::default(),
            delay,
            ledger,
            stop: Mutex::new(None),
        })
    }

    /// Serves on its port (binding again after `down`).
    pub(super) async fn up(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(l) => break l,
                Err(_) if started.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => anyhow::bail!("callback receiver cannot bind {}: {e}", self.port),
            }
        };
        let router = Router::new()
            .route("/cb/{key}", post(callback))
            .with_state(ReceiverState {
                slow: self.slow.clone(),
                delay: self.delay,
                ledger: self.ledger.clone(),
            });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        *lock(&self.stop) = Some(tx);
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(())
    }

    /// Stops listening: connections are refused until `up`.
    pub(super) fn down(&self) {
        if let Some(tx) = lock(&self.stop).take() {
            let _ = tx.send(());
        }
    }

    fn url(&self, key: &str) -> String {
        format!("http://127.0.0.1:{}/cb/{key}", self.port)
    }
}

// ---------------------------------------------------------------- the AMQP RPC client

/// An RPC client that survives broker restarts: replies go to a durable queue of its own, and
/// a supervisor reconnects and re-consumes.
pub(super) struct AmqpClient {
    /// The broker's nodes: each session tries the next.
    urls: Vec<String>,
    model: String,
    settings: QueueSettings,
    reply_queue: String,
    publisher: Mutex<Option<Channel>>,
    ledger: Ledger,
}

impl AmqpClient {
    pub(super) fn start(
        urls: Vec<String>,
        model: &str,
        settings: QueueSettings,
        ledger: Ledger,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            urls,
            model: model.to_string(),
            settings,
            reply_queue: format!("{model}.replies"),
            publisher: Mutex::new(None),
            ledger,
        });
        let supervisor = me.clone();
        tokio::spawn(async move {
            let mut last = String::new();
            let mut attempt = 0usize;
            loop {
                let url = supervisor.urls[attempt % supervisor.urls.len().max(1)].clone();
                attempt += 1;
                if let Err(error) = supervisor.session(&url).await {
                    let error = error.to_string();
                    if error != last {
                        eprintln!("chaos: AMQP client: {error}; reconnecting");
                    }
                    last = error;
                }
                *lock(&supervisor.publisher) = None;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        me
    }

    async fn session(&self, url: &str) -> anyhow::Result<()> {
        let connection = tokio::time::timeout(
            Duration::from_secs(5),
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer in 5 s"))??;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        topology::declare_model(&publisher, &self.model, self.settings).await?;
        // A quorum queue: on a cluster, a classic queue lives on one node and is gone with it
        // (its replies with it).
        let mut quorum = Headers::new();
        quorum.text("x-queue-type", "quorum");
        publisher
            .queue_declare(
                self.reply_queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                quorum.into_table(),
            )
            .await?;
        let consumer_channel = connection.create_channel().await?;
        let mut replies = consumer_channel
            .basic_consume(
                self.reply_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        *lock(&self.publisher) = Some(publisher);
        while let Some(delivery) = replies.next().await {
            let delivery = delivery?;
            let key = delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string());
            if let (Some(key), Ok(result)) =
                (key, serde_json::from_slice::<JobResult>(&delivery.data))
                && let Some(job) = lock(&self.ledger).get_mut(&key)
            {
                job.deliveries.push(Answer::of(&result));
            }
            delivery.ack(BasicAckOptions::default()).await?;
        }
        anyhow::bail!("the reply consumer ended")
    }

    /// Publishes with a confirm. Waits (up to 30 s) for a connection, but never publishes twice:
    /// a publish whose confirm is lost is an error (the job may still be answered).
    pub(super) async fn send(&self, key: &str, body: &[u8]) -> Result<(), String> {
        let started = Instant::now();
        let channel = loop {
            if let Some(c) = lock(&self.publisher).clone()
                && c.status().connected()
            {
                break c;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err("broker unavailable".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let mut headers = Headers::new();
        headers.uint(header::SUBMITTED_AT, ember_core::amqp::unix_ms());
        let props = BasicProperties::default()
            .with_message_id(key.into())
            .with_correlation_id(key.into())
            .with_reply_to(self.reply_queue.as_str().into())
            .with_content_type("image/png".into())
            .with_delivery_mode(2)
            .with_headers(headers.into_table());
        let publish = async {
            channel
                .basic_publish(
                    topology::JOBS_EXCHANGE.into(),
                    self.model.as_str().into(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await?
                .await
        };
        match tokio::time::timeout(Duration::from_secs(30), publish).await {
            Ok(Ok(confirm)) if confirm.is_ack() => Ok(()),
            // A nack says no more: the queue at its bound, or (on a cluster) a leader election.
            Ok(Ok(_)) => Err("nacked".into()),
            Ok(Err(e)) => Err(format!("unconfirmed: {e}")),
            Err(_) => Err("unconfirmed: no confirm in 30 s".into()),
        }
    }
}

// ---------------------------------------------------------------- the HTTP client

/// The HTTP client: jobs with a callback to the receiver, asynchronous or `?wait`.
pub(super) struct HttpClient {
    client: reqwest::Client,
    base: String,
    model: String,
    ledger: Ledger,
    receiver: Arc<CallbackReceiver>,
    /// 429s, and those carrying Retry-After.
    pub(super) too_many: AtomicU64,
    pub(super) too_many_retry_after: AtomicU64,
}

impl HttpClient {
    /// A client of the dispatcher's API at `base`.
    pub(super) fn new(
        base: String,
        model: &str,
        ledger: Ledger,
        receiver: Arc<CallbackReceiver>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()?,
            base,
            model: model.to_string(),
            ledger,
            receiver,
            too_many: AtomicU64::new(0),
            too_many_retry_after: AtomicU64::new(0),
        })
    }

    /// Submits with an Idempotency-Key (the job's key) and retries transport errors and 503s
    /// with the same key for up to 30 s; a 429 is final (rejected at the door).
    async fn send(&self, key: &str, body: &[u8], sync: bool) {
        let url = format!(
            "{}/v1/models/{}/jobs{}",
            self.base,
            self.model,
            if sync { "?wait=10s" } else { "" }
        );
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < Duration::from_secs(30) {
            let response = self
                .client
                .post(&url)
                .timeout(Duration::from_secs(20))
                .header("content-type", "image/png")
                .header("idempotency-key", key)
                .header("x-callback-url", self.receiver.url(key))
                .body(body.to_vec())
                .send()
                .await;
            let response = match response {
                Ok(r) => r,
                Err(e) => {
                    last = format!("transport: {e}");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
            };
            let status = response.status().as_u16();
            let retry_after = response.headers().contains_key("retry-after");
            let doc: Value = response.json().await.unwrap_or(Value::Null);
            if status == 429 {
                self.too_many.fetch_add(1, Ordering::Relaxed);
                if retry_after {
                    self.too_many_retry_after.fetch_add(1, Ordering::Relaxed);
                }
                self.reject(key, format!("429 {}", error_code(&doc)));
                return;
            }
            if status == 503 {
                last = format!("503 {}", error_code(&doc));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if let Some(job_id) = doc["job_id"].as_str() {
                let mut ledger = lock(&self.ledger);
                if let Some(job) = ledger.get_mut(key) {
                    job.accepted = Some(job_id.to_string());
                    if let Ok(result) = serde_json::from_value::<JobResult>(doc["result"].clone()) {
                        job.inline = Some(Answer::of(&result));
                    }
                }
                return;
            }
            self.reject(key, format!("{status} {}", error_code(&doc)));
            return;
        }
        self.reject(key, format!("gave up after 30 s: {last}"));
    }

    fn reject(&self, key: &str, why: String) {
        if let Some(job) = lock(&self.ledger).get_mut(key) {
            job.rejected = Some(why);
        }
    }

    /// GET /v1/jobs/{id} for the accepted jobs of `phase` not yet seen done.
    pub(super) async fn poll_visible(&self, phase: usize) {
        let wanted: Vec<(String, String)> = lock(&self.ledger)
            .iter()
            .filter(|(_, j)| j.phase == phase && j.kind != Kind::Amqp && j.visible.is_none())
            .filter_map(|(k, j)| Some((k.clone(), j.accepted.clone()?)))
            .collect();
        let tasks = futures_util::stream::iter(wanted.into_iter().map(|(key, id)| async move {
            let doc: Option<Value> = match self
                .client
                .get(format!("{}/v1/jobs/{id}", self.base))
                .timeout(Duration::from_secs(5))
                .send()
                .await
            {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
            (key, doc)
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
        let mut ledger = lock(&self.ledger);
        for (key, doc) in tasks {
            let Some(doc) = doc else { continue };
            let outcome = match doc["status"].as_str() {
                Some("done") => "ok".to_string(),
                Some("failed") => format!(
                    "error:{}",
                    doc["result"]["error"]["code"].as_str().unwrap_or("")
                ),
                Some(s @ ("expired" | "cancelled")) => s.to_string(),
                _ => continue,
            };
            if let Some(job) = ledger.get_mut(&key) {
                job.visible = Some(outcome);
            }
        }
    }
}

/// The error code of an API error body.
fn error_code(doc: &Value) -> String {
    doc["error"]["code"]
        .as_str()
        .or(doc["code"].as_str())
        .unwrap_or("")
        .to_string()
}

fn new_job(harness: &Harness, phase: usize, kind: Kind, poison: bool) -> String {
    let key = uuid::Uuid::new_v4().to_string();
    lock(&harness.ledger).insert(
        key.clone(),
        Job {
            kind,
            phase,
            poison,
            accepted: None,
            rejected: None,
            inline: None,
            deliveries: Vec::new(),
            visible: None,
        },
    );
    key
}

/// Sends one job in the background, its outcome recorded in the ledger.
pub(super) fn send(
    harness: &Arc<Harness>,
    phase: usize,
    kind: Kind,
    poison: bool,
) -> tokio::task::JoinHandle<()> {
    let key = new_job(harness, phase, kind, poison);
    let harness = harness.clone();
    tokio::spawn(async move {
        let body = if poison {
            &harness.poison
        } else {
            &harness.image
        };
        match kind {
            Kind::HttpAsync => harness.http.send(&key, body, false).await,
            Kind::HttpSync => harness.http.send(&key, body, true).await,
            Kind::Amqp => {
                let outcome = harness.amqp.send(&key, body).await;
                if let Some(job) = lock(&harness.ledger).get_mut(&key) {
                    match outcome {
                        Ok(()) => job.accepted = Some(key.clone()),
                        Err(e) => job.rejected = Some(e),
                    }
                }
            }
        }
    })
}

/// The `i`th job's kind: one in three of each.
pub(super) fn kind_of(i: usize) -> Kind {
    match i % 3 {
        0 => Kind::HttpAsync,
        1 => Kind::HttpSync,
        _ => Kind::Amqp,
    }
}
