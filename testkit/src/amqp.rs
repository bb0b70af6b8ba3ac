//! The machine's broker (127.0.0.1:5672): its URL, a connection that waits for it, a reply queue.

use std::time::Instant;

use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

use crate::PATIENCE;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A connection to [`AMQP_URL`], retried until the broker answers (bounded by [`PATIENCE`]).
pub async fn connect() -> Connection {
    let started = Instant::now();
    loop {
        match Connection::connect(AMQP_URL, ConnectionProperties::default()).await {
            Ok(connection) => return connection,
            Err(error) if started.elapsed() < PATIENCE => {
                eprintln!("broker not reachable yet: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            Err(error) => panic!("broker not reachable: {error}"),
        }
    }
}

/// A queue of the test's own for its jobs' results (server-named, exclusive, deleted with its
/// channel), consumed without acks: its name (the jobs' `reply_to`) and its consumer.
pub async fn reply_queue(channel: &Channel) -> (String, Consumer) {
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
        .await
        .unwrap();
    let consumer = channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    (queue.name().to_string(), consumer)
}
