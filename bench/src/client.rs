//! A benchmark client: publishes jobs with confirms and receives results by Direct Reply-to on
//! the same channel, matching them to their senders by correlation id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ember_core::amqp::{Headers, unix_ms};
use ember_core::protocol::{JobResult, header};
use ember_core::topology::{self, QueueSettings};
use futures_util::StreamExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::sync::oneshot;

pub const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Vec<u8>>>>>;

/// One connection, one channel for publishing and Direct Reply-to.
#[derive(Clone)]
pub struct RpcClient {
    pub channel: Channel,
    /// Marks each job `ember-store-result` (its result kept for polling, as over HTTP).
    pub store_results: bool,
    pending: Pending,
    _connection: Arc<Connection>,
}

impl RpcClient {
    pub async fn connect(model: &str) -> anyhow::Result<Self> {
        let client = Self::connect_plain().await?;
        topology::declare_model(&client.channel, model, QueueSettings::default()).await?;
        Ok(client)
    }

    /// A client that declares nothing.
    pub async fn connect_plain() -> anyhow::Result<Self> {
        let connection = Connection::connect(URL, ConnectionProperties::default()).await?;
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let mut replies = topology::direct_reply_consumer(&channel).await?;
        let pending: Pending = Arc::default();
        let routes = pending.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = replies.next().await {
                let id = delivery
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|c| c.to_string());
                if let Some(id) = id {
                    let waiter = routes.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(delivery.data);
                    }
                }
            }
        });
        Ok(Self {
            channel,
            store_results: false,
            pending,
            _connection: Arc::new(connection),
        })
    }

    /// Publishes a job to the model (confirmed) and returns the receiver of its result.
    pub async fn send(
        &self,
        model: &str,
        body: &[u8],
        content_type: &str,
    ) -> anyhow::Result<oneshot::Receiver<Vec<u8>>> {
        self.send_to(topology::JOBS_EXCHANGE, model, body, content_type)
            .await
    }

    /// Publishes to any exchange and routing key (confirmed); the reply comes by Direct Reply-to.
    pub async fn send_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        content_type: &str,
    ) -> anyhow::Result<oneshot::Receiver<Vec<u8>>> {
        self.send_with(exchange, routing_key, body, content_type, None)
            .await
    }

    /// [`RpcClient::send_to`], with the binary tensor extension's header length when given.
    pub async fn send_with(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        content_type: &str,
        header_length: Option<usize>,
    ) -> anyhow::Result<oneshot::Receiver<Vec<u8>>> {
        let id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), tx);
        let mut headers = Headers::new();
        headers.uint(header::SUBMITTED_AT, unix_ms());
        if self.store_results {
            headers.bool(header::STORE_RESULT, true);
        }
        if let Some(length) = header_length {
            headers.uint(header::INFERENCE_HEADER_LENGTH, length as u64);
        }
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default()
                    .with_message_id(id.as_str().into())
                    .with_correlation_id(id.as_str().into())
                    .with_reply_to(topology::DIRECT_REPLY_TO.into())
                    .with_content_type(content_type.into())
                    .with_delivery_mode(2)
                    .with_headers(headers.into_table()),
            )
            .await?
            .await?;
        anyhow::ensure!(confirm.is_ack(), "job publish nacked");
        Ok(rx)
    }

    /// One job, start to result: (round trip seconds, the result).
    pub async fn call(
        &self,
        model: &str,
        body: &[u8],
        content_type: &str,
    ) -> anyhow::Result<(f64, JobResult)> {
        let started = Instant::now();
        let rx = self.send(model, body, content_type).await?;
        let bytes = rx.await?;
        Ok((
            started.elapsed().as_secs_f64(),
            serde_json::from_slice(&bytes)?,
        ))
    }
}
