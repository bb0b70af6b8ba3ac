//! The machine's broker (127.0.0.1:5672): its URL, a connection that waits for it, a reply queue.

use std::time::Instant;

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

/// A queue of the test's own for its jobs' results (`topology::private_queue`: server-named,
/// exclusive, deleted with its channel, consumed without acks): its name (the jobs' `reply_to`)
/// and its consumer.
pub async fn reply_queue(channel: &Channel) -> (String, Consumer) {
    ember_core::topology::private_queue(channel).await.unwrap()
}
