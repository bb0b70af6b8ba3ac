//! Connecting to RabbitMQ (plain or TLS) with backoff, and message headers: readers
//! ([`header_str`], [`header_u64`]) and the [`Headers`] writer.
//!
//! Recovery is done by the caller's loop, not inside lapin: when a connection fails, every
//! channel, consumer and unconfirmed publish on it is gone, and the broker requeues what was
//! unacked. The caller reconnects with [`connect`], re-declares its topology, re-enables confirms
//! and re-consumes; the jobs in hand are redelivered, so nothing is lost, only repeated.
//!
//! Credentials: the URL may come from a flag, an environment variable or a file (a mounted
//! Secret), the password alone from a file; files are read again at every connection attempt, so
//! a rotated Secret is picked up on the next reconnect. The password is never logged: the URL is
//! only ever shown through [`RedactedUrl`], and connection errors are scrubbed of it.
//!
//! TLS: an `amqps://` URL connects through rustls with the ring provider. The server is
//! verified against the bundled Mozilla roots plus the CAs of `--amqp-ca-file`, by the URL's
//! host name (or IP address); `--amqp-cert-file`/`--amqp-key-file` present a client certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_util::sync::CancellationToken;

/// The URL used when none is configured.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Broker connection settings shared by all parts.
#[derive(Clone, clap::Args)]
pub struct AmqpConfig {
    /// AMQP URL of the broker, `amqp://` or `amqps://` (TLS). Its password is never logged.
    /// Several, comma-separated (a cluster's nodes): each connection attempt takes the next, so
    /// a part whose node goes reconnects to another.
    #[arg(
        long = "amqp-url",
        env = "EMBER_AMQP_URL",
        default_value = DEFAULT_URL,
        hide_env_values = true
    )]
    pub url: String,
    /// File holding the AMQP URL (a mounted Secret; several, comma- or line-separated, as for
    /// --amqp-url), used instead of --amqp-url; read at every connection attempt.
    #[arg(
        long = "amqp-url-file",
        env = "EMBER_AMQP_URL_FILE",
        value_name = "PATH",
        conflicts_with = "url"
    )]
    pub url_file: Option<PathBuf>,
    /// File holding the broker password, which replaces the URL's; taken as it is (no URL
    /// escaping; a trailing newline is dropped), read at every connection attempt.
    #[arg(
        long = "amqp-password-file",
        env = "EMBER_AMQP_PASSWORD_FILE",
        value_name = "PATH"
    )]
    pub password_file: Option<PathBuf>,
    /// PEM file of CA certificates trusted for amqps, besides the bundled public roots (for a
    /// broker whose certificate a private CA signed).
    #[arg(long = "amqp-ca-file", env = "EMBER_AMQP_CA_FILE", value_name = "PATH")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate (chain) presented over amqps; needs --amqp-key-file.
    #[arg(
        long = "amqp-cert-file",
        env = "EMBER_AMQP_CERT_FILE",
        value_name = "PATH",
        requires = "key_file"
    )]
    pub cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1, unencrypted) of --amqp-cert-file.
    #[arg(
        long = "amqp-key-file",
        env = "EMBER_AMQP_KEY_FILE",
        value_name = "PATH",
        requires = "cert_file"
    )]
    pub key_file: Option<PathBuf>,
    /// Longest one connection attempt (TCP, TLS and AMQP handshakes) may take.
    #[arg(long = "amqp-connect-timeout", env = "EMBER_AMQP_CONNECT_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles per failed attempt up to --amqp-max-backoff.
    #[arg(long = "amqp-min-backoff", env = "EMBER_AMQP_MIN_BACKOFF", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub min_backoff: Duration,
    /// Longest delay between reconnect attempts.
    #[arg(long = "amqp-max-backoff", env = "EMBER_AMQP_MAX_BACKOFF", default_value = "5s", value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: DEFAULT_URL.into(),
            url_file: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            connect_timeout: Duration::from_secs(30),
            min_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

// By hand, so that printing a part's configuration never prints the password.
impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &format_args!("{}", RedactedUrl(&self.url)))
            .field("url_file", &self.url_file)
            .field("password_file", &self.password_file)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("min_backoff", &self.min_backoff)
            .field("max_backoff", &self.max_backoff)
            .finish()
    }
}

/// Shows a URL with its password replaced by `***` (user, host, port, vhost and query kept).
/// Text that is not a `scheme://` URL is not shown at all.
#[derive(Debug, Clone, Copy)]
pub struct RedactedUrl<'a>(pub &'a str);

impl fmt::Display for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return f.write_str("<not a URL>");
        };
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        write!(f, "{scheme}://")?;
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _password)) => write!(f, "{user}:***@{host}")?,
                None => write!(f, "{userinfo}@{host}")?,
            },
            None => f.write_str(authority)?,
        }
        f.write_str(tail)
    }
}

/// Why a connection attempt failed. No variant's text holds the password.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A configured file could not be read.
    #[error("cannot read {flag} {}: {reason}", path.display())]
    File {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The URL does not parse.
    #[error("invalid AMQP URL {url}: {reason}")]
    Url { url: String, reason: String },
    /// A certificate or key file holds nothing usable.
    #[error("{flag} {}: {reason}", path.display())]
    Pem {
        flag: &'static str,
        path: PathBuf,
        reason: String,
    },
    /// The attempt took longer than --amqp-connect-timeout.
    #[error("connecting to {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// TCP, TLS or the AMQP handshake failed (refused, certificate not trusted, login refused…).
    #[error("connecting to {url} failed: {reason}")]
    Broker { url: String, reason: String },
}

impl ConnectError {
    /// Whether the configuration itself is wrong (a file, the URL), rather than the broker or the
    /// way to it.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            ConnectError::File { .. } | ConnectError::Url { .. } | ConnectError::Pem { .. }
        )
    }
}

/// Everything one attempt needs, read from the configuration and its files.
struct Target {
    uri: AMQPUri,
    tls: OwnedTLSConfig,
    /// The URL as it may be logged.
    shown: String,
    /// Secrets to scrub from error text (the password, raw and as written in the URL).
    secrets: Vec<String>,
}

fn read_file(flag: &'static str, path: &Path) -> Result<Vec<u8>, ConnectError> {
    std::fs::read(path).map_err(|e| ConnectError::File {
        flag,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

fn read_text(flag: &'static str, path: &Path) -> Result<String, ConnectError> {
    let bytes = read_file(flag, path)?;
    String::from_utf8(bytes).map_err(|_| ConnectError::File {
        flag,
        path: path.to_path_buf(),
        reason: "not UTF-8 text".into(),
    })
}

/// Replaces every secret in `text` by `***`.
fn scrub(mut text: String, secrets: &[String]) -> String {
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        text = text.replace(secret.as_str(), "***");
    }
    text
}

/// The password as written in a URL's authority (possibly percent-encoded), if any.
fn url_password(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let userinfo = authority.rsplit_once('@')?.0;
    Some(userinfo.split_once(':')?.1)
}

fn pem_certificates(flag: &'static str, path: &Path) -> Result<String, ConnectError> {
    let text = read_text(flag, path)?;
    let count = CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnectError::Pem {
            flag,
            path: path.to_path_buf(),
            reason: format!("not valid PEM: {e}"),
        })?
        .len();
    if count == 0 {
        return Err(ConnectError::Pem {
            flag,
            path: path.to_path_buf(),
            reason: "holds no PEM certificate".into(),
        });
    }
    Ok(text)
}

/// Which of several broker URLs the next connection attempt of this process takes.
fn next_url() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The URLs of a `--amqp-url` value: comma- or line-separated, blanks dropped.
pub fn broker_urls(text: &str) -> Vec<&str> {
    text.split([',', '\n'])
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

impl AmqpConfig {
    /// Reads the URL, password and TLS files; of several URLs, the `attempt`th (round robin).
    fn target(&self, attempt: usize) -> Result<Target, ConnectError> {
        let text = match &self.url_file {
            Some(path) => read_text("--amqp-url-file", path)?,
            None => self.url.clone(),
        };
        let urls = broker_urls(&text);
        let url = match urls.len() {
            0 => String::new(),
            n => urls[attempt % n].to_string(),
        };
        let mut secrets = Vec::new();
        if let Some(password) = url_password(&url) {
            secrets.push(password.to_string());
        }
        let shown = RedactedUrl(&url).to_string();
        let mut uri = AMQPUri::from_str(&url).map_err(|reason| ConnectError::Url {
            url: shown.clone(),
            reason: scrub(reason.replace(&url, &shown), &secrets),
        })?;
        if !uri.authority.userinfo.password.is_empty() {
            secrets.push(uri.authority.userinfo.password.clone());
        }
        if let Some(path) = &self.password_file {
            let text = read_text("--amqp-password-file", path)?;
            let password = text.strip_suffix('\n').unwrap_or(&text);
            let password = password.strip_suffix('\r').unwrap_or(password);
            secrets.push(password.to_string());
            uri.authority.userinfo.password = password.to_string();
        }
        let mut tls = OwnedTLSConfig::default();
        if let Some(path) = &self.ca_file {
            tls.cert_chain = Some(pem_certificates("--amqp-ca-file", path)?);
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            let pem = pem_certificates("--amqp-cert-file", cert)?.into_bytes();
            let key_pem = read_file("--amqp-key-file", key)?;
            PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| ConnectError::Pem {
                flag: "--amqp-key-file",
                path: key.clone(),
                reason: format!("no usable private key: {e}"),
            })?;
            tls.identity = Some(OwnedIdentity::PKCS8 { pem, key: key_pem });
        }
        Ok(Target {
            uri,
            tls,
            shown,
            secrets,
        })
    }
}

/// One connection attempt, bounded by --amqp-connect-timeout.
pub async fn connect_once(
    config: &AmqpConfig,
    client_name: &str,
) -> Result<Connection, ConnectError> {
    open(config, client_name, next_url())
        .await
        .map(|(connection, _)| connection)
}

/// One attempt; on success also the URL as it may be logged.
async fn open(
    config: &AmqpConfig,
    client_name: &str,
    attempt: usize,
) -> Result<(Connection, String), ConnectError> {
    let target = config.target(attempt)?;
    let tls = target.uri.scheme == AMQPScheme::AMQPS;
    if !tls && (config.ca_file.is_some() || config.cert_file.is_some()) {
        tracing::warn!(broker = %target.shown, "TLS files are set but the URL is amqp://, not amqps://: connecting without TLS");
    }
    if tls {
        install_crypto_provider();
    }
    let broker_error = |reason: String| ConnectError::Broker {
        url: target.shown.clone(),
        reason: scrub(reason, &target.secrets),
    };
    let runtime = lapin::runtime::default_runtime().map_err(|e| broker_error(e.to_string()))?;
    let props = ConnectionProperties::default().with_connection_name(client_name.into());
    let attempt = Connection::connect_uri_with_config(target.uri, props, target.tls, runtime);
    match tokio::time::timeout(config.connect_timeout, attempt).await {
        Ok(Ok(connection)) => Ok((connection, target.shown)),
        Ok(Err(error)) => Err(broker_error(error.to_string())),
        Err(_) => Err(ConnectError::Timeout {
            url: target.shown.clone(),
            timeout: config.connect_timeout,
        }),
    }
}

/// Makes ring the process's rustls provider unless one is installed already. Every part builds
/// rustls with ring, and some also with aws-lc-rs (reqwest), and then rustls cannot choose by
/// itself ("no process-level CryptoProvider"): choosing here keeps amqps from ever panicking.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
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
        let outcome = tokio::select! {
            () = shutdown.cancelled() => return None,
            // Of several URLs, each attempt takes the next (round robin across the process):
            // a node that is gone is passed over at the next attempt.
            outcome = open(config, client_name, next_url()) => outcome,
        };
        match outcome {
            Ok((connection, broker)) => {
                tracing::info!(attempt, %broker, "connected to the broker");
                return Some(connection);
            }
            Err(error) if error.is_config() => {
                tracing::error!(attempt, %error, retry_in = ?delay, "broker connection settings are unusable");
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

/// Whether the header `name` is set true: a boolean `true`, a positive integer, or the text
/// `true` / `1` (any case, surrounding spaces ignored). Absent or anything else is false.
pub fn header_flag(headers: Option<&FieldTable>, name: &str) -> bool {
    match headers.and_then(|h| h.inner().get(name)) {
        Some(AMQPValue::Boolean(v)) => *v,
        Some(AMQPValue::LongString(_) | AMQPValue::ShortString(_)) => header_str(headers, name)
            .map(str::trim)
            .is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
        Some(_) => header_u64(headers, name).is_some_and(|v| v != 0),
        None => false,
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

/// Writes message headers (or queue arguments) in the types the readers above take back: text as
/// `LongString`, unsigned integers as `LongLongInt`.
///
/// ```
/// use ember_core::amqp::{Headers, header_str, header_u64};
///
/// let mut headers = Headers::new();
/// headers.text("ember-model", "ssd").uint("ember-submitted-at", 17);
/// let table = headers.into_table();
/// assert_eq!(header_str(Some(&table), "ember-model"), Some("ssd"));
/// assert_eq!(header_u64(Some(&table), "ember-submitted-at"), Some(17));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Headers(FieldTable);

impl Headers {
    /// No headers yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `name` to the text `value` (a `LongString`).
    pub fn text(&mut self, name: &str, value: impl Into<LongString>) -> &mut Self {
        self.0
            .insert(ShortString::from(name), AMQPValue::LongString(value.into()));
        self
    }

    /// Sets `name` to `value` as a `LongLongInt` (signed 64 bits: beyond `i64::MAX`, that).
    pub fn uint(&mut self, name: &str, value: u64) -> &mut Self {
        let value = i64::try_from(value).unwrap_or(i64::MAX);
        self.0
            .insert(ShortString::from(name), AMQPValue::LongLongInt(value));
        self
    }

    /// Sets `name` to `value` as a `LongInt` (32 bits, which some broker arguments require).
    pub fn int32(&mut self, name: &str, value: i32) -> &mut Self {
        self.0
            .insert(ShortString::from(name), AMQPValue::LongInt(value));
        self
    }

    /// Sets `name` to `value` as a boolean ([`header_flag`] reads it back).
    pub fn bool(&mut self, name: &str, value: bool) -> &mut Self {
        self.0
            .insert(ShortString::from(name), AMQPValue::Boolean(value));
        self
    }

    /// The table, for `BasicProperties::with_headers` or a declaration's arguments.
    pub fn into_table(self) -> FieldTable {
        self.0
    }
}

/// Adds to (or overwrites in) existing headers, such as a delivery's.
impl From<FieldTable> for Headers {
    fn from(table: FieldTable) -> Self {
        Self(table)
    }
}

impl From<Headers> for FieldTable {
    fn from(headers: Headers) -> Self {
        headers.0
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        amqp: AmqpConfig,
    }

    fn parse(args: &[&str]) -> Result<AmqpConfig, clap::Error> {
        use clap::Parser;
        Cli::try_parse_from(std::iter::once("test").chain(args.iter().copied())).map(|c| c.amqp)
    }

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ember-amqp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn a_flag_header_is_true_only_when_it_says_so() {
        let with = |value: AMQPValue| {
            let mut table = FieldTable::default();
            table.insert("f".into(), value);
            header_flag(Some(&table), "f")
        };
        assert!(with(AMQPValue::Boolean(true)));
        assert!(with(AMQPValue::LongString(" TRUE ".into())));
        assert!(with(AMQPValue::ShortString("1".into())));
        assert!(with(AMQPValue::LongLongInt(1)));
        assert!(with(AMQPValue::ShortShortUInt(7)));
        for no in [
            AMQPValue::Boolean(false),
            AMQPValue::LongString("yes please".into()),
            AMQPValue::LongString("0".into()),
            AMQPValue::LongInt(0),
            AMQPValue::LongInt(-1),
            AMQPValue::Void,
        ] {
            assert!(!with(no.clone()), "{no:?}");
        }
        assert!(!header_flag(None, "f"));
        assert!(!header_flag(Some(&FieldTable::default()), "f"));
        let mut headers = Headers::new();
        headers.bool("f", true);
        assert!(header_flag(Some(&headers.into_table()), "f"));
    }

    #[test]
    fn several_urls_are_taken_in_turn() {
        assert_eq!(
            broker_urls(" amqp://a/%2f, amqp://b/%2f,\namqp://c/%2f\n,"),
            ["amqp://a/%2f", "amqp://b/%2f", "amqp://c/%2f"]
        );
        let config = AmqpConfig {
            url: "amqp://u:pw1@a:5672/%2f,amqp://u:pw2@b:5673/%2f".into(),
            ..AmqpConfig::default()
        };
        let hosts: Vec<(String, u16)> = (0..3)
            .map(|attempt| {
                let target = config.target(attempt).unwrap();
                (target.uri.authority.host, target.uri.authority.port)
            })
            .collect();
        assert_eq!(
            hosts,
            [("a".into(), 5672), ("b".into(), 5673), ("a".into(), 5672)]
        );
        // Each URL's password is scrubbed from what is shown.
        let second = config.target(1).unwrap();
        assert!(!second.shown.contains("pw2"), "{}", second.shown);
        assert!(second.secrets.iter().any(|s| s == "pw2"));
    }

    #[test]
    fn urls_are_shown_without_their_password() {
        let cases = [
            (
                "amqps://ember:s3cr%40t@rabbit:5671/%2f?heartbeat=10",
                "amqps://ember:***@rabbit:5671/%2f?heartbeat=10",
            ),
            ("amqp://ember:pw@host", "amqp://ember:***@host"),
            ("amqp://a:b:c@d@host/v", "amqp://a:***@host/v"),
            ("amqp://ember@host/v", "amqp://ember@host/v"),
            ("amqp://host:5672", "amqp://host:5672"),
            ("amqp:user:pw@host", "<not a URL>"),
        ];
        for (url, shown) in cases {
            assert_eq!(RedactedUrl(url).to_string(), shown, "{url}");
        }
        let config = AmqpConfig {
            url: "amqp://ember:hunter2hunter2@host/%2f".into(),
            ..AmqpConfig::default()
        };
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("amqp://ember:***@host/%2f"), "{debug}");
    }

    #[test]
    fn an_invalid_url_is_reported_without_its_password() {
        for url in [
            "amqp:ember:Pa55wordXYZ@host",
            "amqp://ember:Pa55wordXYZ@host:notaport/",
        ] {
            let config = parse(&["--amqp-url", url]).unwrap();
            let error = config.target(0).err().unwrap();
            assert!(error.is_config());
            let text = error.to_string();
            assert!(text.starts_with("invalid AMQP URL"), "{text}");
            assert!(!text.contains("Pa55wordXYZ"), "{text}");
        }
    }

    #[test]
    fn the_url_and_password_come_from_files() {
        let url = temp_file("url", "amqps://ember:old@broker:5671/prod\n");
        let password = temp_file("password", "n3w p@ss/word\n");
        let config = parse(&[
            "--amqp-url-file",
            url.to_str().unwrap(),
            "--amqp-password-file",
            password.to_str().unwrap(),
        ])
        .unwrap();
        let target = config.target(0).unwrap();
        assert_eq!(target.uri.scheme, AMQPScheme::AMQPS);
        assert_eq!(target.uri.authority.host, "broker");
        assert_eq!(target.uri.authority.userinfo.username, "ember");
        // Verbatim, not URL-decoded, trailing newline dropped.
        assert_eq!(target.uri.authority.userinfo.password, "n3w p@ss/word");
        assert_eq!(target.uri.vhost, "prod");
        assert_eq!(target.shown, "amqps://ember:***@broker:5671/prod");
        let scrubbed = scrub(
            "login n3w p@ss/word and old refused".into(),
            &target.secrets,
        );
        assert_eq!(scrubbed, "login *** and *** refused");

        let missing = parse(&["--amqp-url-file", "/nonexistent/ember-url"]).unwrap();
        let text = missing.target(0).err().unwrap().to_string();
        assert!(
            text.starts_with("cannot read --amqp-url-file /nonexistent/ember-url"),
            "{text}"
        );
        // A URL and a URL file are one too many.
        assert!(parse(&["--amqp-url", "amqp://h", "--amqp-url-file", "/x"]).is_err());
    }

    #[test]
    fn tls_files_are_checked_before_connecting() {
        let not_pem = temp_file("not-a-ca.pem", "just text\n");
        let config = parse(&["--amqp-ca-file", not_pem.to_str().unwrap()]).unwrap();
        let text = config.target(0).err().unwrap().to_string();
        assert!(
            text.contains("--amqp-ca-file") && text.contains("no PEM certificate"),
            "{text}"
        );
        // A client certificate needs its key, and the other way round.
        assert!(parse(&["--amqp-cert-file", "/c.pem"]).is_err());
        assert!(parse(&["--amqp-key-file", "/k.pem"]).is_err());
    }

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
