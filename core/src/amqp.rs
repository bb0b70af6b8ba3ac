//! Connecting to RabbitMQ with backoff, and small helpers for message headers.
//!
//! Recovery is done by the caller's loop, not inside lapin: when a connection fails, every
//! channel, consumer and unconfirmed publish on it is gone, and the broker requeues what was
//! unacked. The caller reconnects with [`connect`], re-declares its topology, re-enables confirms
//! and re-consumes; the jobs in hand are redelivered, so nothing is lost, only repeated.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use tokio_util::sync::CancellationToken;

/// Broker connection settings shared by all parts.
#[derive(Debug, Clone, clap::Args)]
pub struct AmqpConfig {
    /// AMQP URL of the broker.
    #[arg(
        long = "amqp-url",
        env = "EMBER_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub url: String,
    /// First reconnect delay; doubles per failed attempt up to --amqp-max-backoff.
    #[arg(long = "amqp-min-backoff", env = "EMBER_AMQP_MIN_BACKOFF", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub min_backoff: Duration,
    /// Longest delay between reconnect attempts.
    #[arg(long = "amqp-max-backoff", env = "EMBER_AMQP_MAX_BACKOFF", default_value = "5s", value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,
}

/// Connects, retrying with exponential backoff (one log line per attempt) until it succeeds or
/// `shutdown` fires (then `None`).
pub async fn connect(
    config: &AmqpConfig,
    client_name: &str,
    shutdown: &CancellationToken,
) -> Option<Connection> {
    let mut delay = config.min_backoff;
    let mut attempt: u32 = 1;
    loop {
        let props = ConnectionProperties::default().with_connection_name(client_name.into());
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return None,
            outcome = Connection::connect(&config.url, props) => outcome,
        };
        match outcome {
            Ok(connection) => {
                tracing::info!(attempt, "connected to the broker");
                return Some(connection);
            }
            Err(error) => {
                tracing::warn!(attempt, %error, retry_in = ?delay, "broker connection failed");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(config.max_backoff);
        attempt += 1;
    }
}

/// The header `name` as a string, if present and a string.
pub fn header_str<'a>(headers: Option<&'a FieldTable>, name: &str) -> Option<&'a str> {
    match headers?.inner().get(name)? {
        AMQPValue::LongString(value) => std::str::from_utf8(value.as_bytes()).ok(),
        AMQPValue::ShortString(value) => Some(value.as_str()),
        _ => None,
    }
}

/// The header `name` as an unsigned integer, accepting every integer width clients send (and
/// decimal strings, which some clients produce for large numbers).
pub fn header_u64(headers: Option<&FieldTable>, name: &str) -> Option<u64> {
    match headers?.inner().get(name)? {
        AMQPValue::LongLongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongInt(v) => u64::try_from(*v).ok(),
        AMQPValue::LongUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::ShortShortInt(v) => u64::try_from(*v).ok(),
        AMQPValue::ShortShortUInt(v) => Some(u64::from(*v)),
        AMQPValue::Timestamp(v) => Some(*v),
        AMQPValue::LongString(v) => std::str::from_utf8(v.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(v) => v.as_str().trim().parse().ok(),
        _ => None,
    }
}

/// Now as unix milliseconds.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{LongString, ShortString};

    #[test]
    fn integer_headers_of_any_width_and_decimal_strings_are_read() {
        let mut table = FieldTable::default();
        table.insert(ShortString::from("a"), AMQPValue::LongLongInt(17));
        table.insert(ShortString::from("b"), AMQPValue::LongInt(-1));
        table.insert(
            ShortString::from("c"),
            AMQPValue::LongString(LongString::from("42")),
        );
        table.insert(ShortString::from("d"), AMQPValue::Boolean(true));
        assert_eq!(header_u64(Some(&table), "a"), Some(17));
        assert_eq!(header_u64(Some(&table), "b"), None);
        assert_eq!(header_u64(Some(&table), "c"), Some(42));
        assert_eq!(header_u64(Some(&table), "d"), None);
        assert_eq!(header_u64(Some(&table), "missing"), None);
        assert_eq!(header_u64(None, "a"), None);
        assert_eq!(header_str(Some(&table), "c"), Some("42"));
    }
}
