//! amqps against a private RabbitMQ node (scripts/rabbitmq-node) with a TLS listener on
//! 127.0.0.1, its certificates made here: the right CA connects and carries messages, a wrong CA,
//! no CA or a client certificate from another CA is refused quickly with a clear error.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_core::amqp::{AmqpConfig, ConnectError, connect_once};
use ember_testkit::rabbitmq::Node;
use ember_testkit::tls::{ExtendedKeyUsagePurpose, ca, leaf};
use lapin::BasicProperties;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;

const NODE: &str = "ember-amqp-tls";
const AMQP_PORT: u16 = 5691;
const TLS_PORT: u16 = 5692;

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

fn config(url: String) -> AmqpConfig {
    AmqpConfig {
        url,
        connect_timeout: Duration::from_secs(15),
        ..AmqpConfig::default()
    }
}

/// Connects, publishes a message with confirms and gets it back from a fresh queue.
async fn round_trip(config: &AmqpConfig, body: &[u8]) {
    let connection = connect_once(config, "amqp-tls-test").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
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
    let confirm = channel
        .basic_publish(
            "".into(),
            queue.name().clone(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "publish not confirmed: {confirm:?}");
    let mut got = None;
    for _ in 0..50 {
        got = channel
            .basic_get(queue.name().clone(), BasicGetOptions { no_ack: true })
            .await
            .unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let message = got.expect("the published message never came back");
    assert_eq!(message.delivery.data, body);
    connection.close(200, "done".into()).await.unwrap();
}

/// The attempt fails by itself, well before its timeout, and says why.
async fn refused(config: &AmqpConfig) -> String {
    let started = std::time::Instant::now();
    let error = match connect_once(config, "amqp-tls-test").await {
        Ok(_) => panic!("connected, but should have been refused"),
        Err(error) => error,
    };
    assert!(
        matches!(error, ConnectError::Broker { .. }),
        "not refused by the TLS handshake but {error:?}"
    );
    assert!(
        started.elapsed() < config.connect_timeout,
        "took the whole timeout"
    );
    error.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_connects_only_with_the_right_ca() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("amqp-tls");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let good_ca = ca("ember test CA");
    let other_ca = ca("someone else's CA");
    let (server_pem, server_key) = leaf(
        &good_ca,
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let ca_file = write(&dir, "ca.pem", &good_ca.pem);
    write(&dir, "server.pem", &server_pem);
    write(&dir, "server.key", &server_key);
    let other_ca_file = write(&dir, "other-ca.pem", &other_ca.pem);
    let (client_pem, client_key) = leaf(
        &good_ca,
        &["ember-worker"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let client_cert = write(&dir, "client.pem", &client_pem);
    let client_key = write(&dir, "client.key", &client_key);
    let (stray_pem, stray_key) = leaf(
        &other_ca,
        &["intruder"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let stray_cert = write(&dir, "stray.pem", &stray_pem);
    let stray_key = write(&dir, "stray.key", &stray_key);

    let _node = Node::with_tls(NODE, AMQP_PORT, TLS_PORT, &dir);
    let amqps = |host: &str| format!("amqps://guest:guest@{host}:{TLS_PORT}/%2f");

    // The right CA, by IP address and by host name: connects, and messages go through.
    let mut trusted = config(amqps("127.0.0.1"));
    trusted.ca_file = Some(ca_file.clone());
    round_trip(&trusted, b"over TLS by address").await;
    let mut by_name = config(amqps("localhost"));
    by_name.ca_file = Some(ca_file.clone());
    round_trip(&by_name, b"over TLS by name").await;

    // With a client certificate from the same CA too.
    let mut with_client_cert = trusted.clone();
    with_client_cert.cert_file = Some(client_cert);
    with_client_cert.key_file = Some(client_key);
    round_trip(&with_client_cert, b"over mutual TLS").await;

    // Another CA, or only the bundled public roots: the server's certificate is not trusted.
    let mut wrong_ca = config(amqps("127.0.0.1"));
    wrong_ca.ca_file = Some(other_ca_file);
    let text = refused(&wrong_ca).await;
    assert!(text.contains("invalid peer certificate"), "{text}");
    assert!(text.contains("UnknownIssuer"), "{text}");
    assert!(text.contains("amqps://guest:***@127.0.0.1"), "{text}");
    let text = refused(&config(amqps("127.0.0.1"))).await;
    assert!(text.contains("UnknownIssuer"), "{text}");

    // A client certificate the server does not trust.
    let mut stray = trusted.clone();
    stray.cert_file = Some(stray_cert);
    stray.key_file = Some(stray_key);
    // With TLS 1.3 the client finishes its side of the handshake before the server checks the
    // certificate: the server's `unknown_ca` alert and its closing the connection race, so the
    // client sees either (seen both ways on this machine).
    let text = refused(&stray).await;
    assert!(
        text.contains("UnknownCA") || text.contains("Connection reset by peer"),
        "{text}"
    );

    // amqps to the plain AMQP port fails the handshake instead of hanging.
    let mut plain_port = config(format!("amqps://guest:guest@127.0.0.1:{AMQP_PORT}/%2f"));
    plain_port.ca_file = Some(ca_file);
    let text = refused(&plain_port).await;
    assert!(text.contains("corrupt message"), "{text}");
}
