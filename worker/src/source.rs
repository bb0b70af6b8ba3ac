//! Model sources: `--model-uri` (a path, `file://`, `https://`, `s3://`) resolved into a model
//! directory once at startup; artifacts downloaded once into a cache and verified by digest.
//!
//! An artifact is a `.tar.gz`/`.tgz`/`.tar` of a model directory (its files at the top, or in
//! exactly one top-level directory) or a single `.onnx` file. It is streamed to a temporary file
//! in the cache directory while hashed (SHA-256 of the artifact's bytes), checked against
//! `--model-sha256`, unpacked into a temporary directory and renamed into `<cache>/sha256-<hex>/`
//! in one step, so that a cache entry is either whole or absent. With a digest given, a cache
//! entry that exists is used without any network call. A local model directory is used in place.
//!
//! Every error names the source with its secrets removed ([`redact`]): userinfo and query string
//! (a presigned URL's signature) never reach a log line.

use std::fmt;
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use object_store::ObjectStoreExt;
use reqwest::Url;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::config::SourceArgs;

/// Tries of one download: transient failures (connection errors, timeouts, 5xx, 408, 429, a body
/// cut short) are tried again up to this many times in all, with exponential backoff.
pub const MAX_TRIES: u32 = 4;
/// The first backoff; each next one doubles, up to [`MAX_BACKOFF`], with jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(4);
/// Most bytes an archive may unpack to (a bound on a decompression bomb).
pub const MAX_UNPACKED_BYTES: u64 = 64 << 30;
/// Most entries an archive may hold.
pub const MAX_ENTRIES: usize = 100_000;

/// What went wrong with a model source, and whether trying again may help.
#[derive(Debug, thiserror::Error)]
pub enum Problem {
    /// The URI or the flags do not make a usable source.
    #[error("{0}")]
    Invalid(String),
    /// 404 / NoSuchKey / no such file.
    #[error("not found: {0}")]
    NotFound(String),
    /// 401 / 403: a wrong or missing credential, or no permission.
    #[error("access denied: {0}")]
    Denied(String),
    /// Nothing answers at the address (connection refused, DNS, TLS handshake cut).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The server's certificate is not trusted (give its CA with --model-ca-file).
    #[error("TLS: {0}")]
    Tls(String),
    /// 5xx, 408, 429: the server may answer later.
    #[error("server error: {0}")]
    Server(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// Fewer bytes than the server announced.
    #[error("truncated download: got {got} of {expected} bytes")]
    Truncated { got: u64, expected: u64 },
    /// The body stopped with an error before its end.
    #[error("download interrupted: {0}")]
    Interrupted(String),
    /// Another refusal (4xx) or store error that trying again will not fix.
    #[error("refused: {0}")]
    Refused(String),
    #[error("digest mismatch: expected sha256 {expected}, got {got}")]
    DigestMismatch { expected: String, got: String },
    /// The artifact is not a model archive or breaks the unpacking rules.
    #[error("bad artifact: {0}")]
    Artifact(String),
    /// The cache directory could not be written.
    #[error("cache: {0}")]
    Cache(String),
    /// A transient problem that lasted through every try.
    #[error("{last} (gave up after {tries} tries)")]
    GaveUp { tries: u32, last: Box<Problem> },
}

impl Problem {
    /// Whether another try may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Problem::Unreachable(_)
                | Problem::Server(_)
                | Problem::Timeout(_)
                | Problem::Truncated { .. }
                | Problem::Interrupted(_)
        )
    }
}

/// A model source that could not be resolved: the source (redacted) and what went wrong.
#[derive(Debug)]
pub struct SourceError {
    /// The URI with userinfo and query string removed.
    pub uri: String,
    pub problem: Problem,
}

impl fmt::Display for SourceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "model source {}: {}", self.uri, self.problem)
    }
}

impl std::error::Error for SourceError {}

/// `uri` without its secrets: userinfo (`user:password@`) becomes `***@`, a query string (a
/// presigned URL's signature) `?***`, a fragment is dropped. Works on text that is not a valid
/// URL too.
pub fn redact(uri: &str) -> String {
    let (base, query) = match uri.find(['?', '#']) {
        Some(i) => (&uri[..i], uri[i..].starts_with('?')),
        None => (uri, false),
    };
    let mut out = match base.find("://") {
        Some(i) => {
            let (scheme, rest) = (&base[..i + 3], &base[i + 3..]);
            let authority_end = rest.find('/').unwrap_or(rest.len());
            let (authority, path) = rest.split_at(authority_end);
            match authority.rfind('@') {
                Some(at) => format!("{scheme}***@{}{path}", &authority[at + 1..]),
                None => base.to_string(),
            }
        }
        None => base.to_string(),
    };
    if query {
        out.push_str("?***");
    }
    out
}

/// A `--model-sha256` value as 64 lowercase hex digits (an `sha256:` prefix is accepted).
pub fn parse_digest(text: &str) -> Result<String, Problem> {
    let hex = text.trim();
    let hex = hex.strip_prefix("sha256:").unwrap_or(hex);
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex.to_ascii_lowercase())
    } else {
        Err(Problem::Invalid(format!(
            "--model-sha256 `{text}` is not a SHA-256 digest (64 hex digits)"
        )))
    }
}

/// The cache entry of an artifact with this digest: `sha256-<hex>`.
pub fn cache_key(hex: &str) -> String {
    format!("sha256-{hex}")
}

/// The model directory of a complete cache entry: its one subdirectory. `None` when the entry is
/// absent (entries are renamed into place whole, so one that exists is complete).
pub fn cached_model_dir(entry: &Path) -> Option<PathBuf> {
    let mut dirs = std::fs::read_dir(entry)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()));
    let dir = dirs.next()?;
    dirs.next().is_none().then(|| dir.path())
}

/// An archive member's path made safe to join under the unpacking directory: relative, no `..`,
/// no root or prefix; `.` components dropped. `Ok(None)` for the archive's own `./`.
pub fn safe_relative(path: &Path) -> Result<Option<PathBuf>, String> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` is not allowed".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("absolute paths are not allowed".into());
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A local model directory (used in place) or artifact file.
    Local(PathBuf),
    /// `https://`, or `http://` to this machine.
    Http(Url),
    S3 {
        bucket: String,
        key: String,
    },
}

impl Location {
    /// Reads a `--model-uri`: a plain path, `file://`, `https://`, `http://` (loopback only),
    /// `s3://bucket/key`.
    pub fn parse(uri: &str) -> Result<Self, Problem> {
        let Some((scheme, rest)) = uri.split_once("://") else {
            return Ok(Location::Local(PathBuf::from(uri)));
        };
        let url = || Url::parse(uri).map_err(|e| Problem::Invalid(format!("not a URL: {e}")));
        match scheme.to_ascii_lowercase().as_str() {
            "file" => url()?.to_file_path().map(Location::Local).map_err(|()| {
                Problem::Invalid(
                    "a file:// URI takes an absolute path: file:///models/m.tar.gz".into(),
                )
            }),
            "https" => Ok(Location::Http(url()?)),
            "http" => {
                let url = url()?;
                let host = url.host_str().unwrap_or_default().trim_matches(['[', ']']);
                let loopback = host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if loopback {
                    Ok(Location::Http(url))
                } else {
                    Err(Problem::Invalid(
                        "http:// is only for 127.0.0.1 and localhost; use https://".into(),
                    ))
                }
            }
            "s3" => {
                if rest.contains(['?', '#', '@']) {
                    return Err(Problem::Invalid(
                        "an s3:// URI is s3://bucket/key, without credentials or query".into(),
                    ));
                }
                match rest.split_once('/') {
                    Some((bucket, key)) if !bucket.is_empty() && !key.is_empty() => {
                        Ok(Location::S3 {
                            bucket: bucket.to_string(),
                            key: key.to_string(),
                        })
                    }
                    _ => Err(Problem::Invalid(
                        "an s3:// URI needs a bucket and a key: s3://bucket/path/model.tar.gz"
                            .into(),
                    )),
                }
            }
            other => Err(Problem::Invalid(format!(
                "unsupported scheme `{other}://`: use a path, file://, https:// or s3://"
            ))),
        }
    }

    /// The artifact's file name (the last path segment), which names a model that an archive
    /// does not name by its one top-level directory.
    fn file_name(&self) -> String {
        match self {
            Location::Local(path) => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Location::Http(url) => url
                .path_segments()
                .and_then(|mut s| s.next_back())
                .unwrap_or_default()
                .to_string(),
            Location::S3 { key, .. } => key.rsplit('/').next().unwrap_or_default().to_string(),
        }
    }
}

/// The model name an artifact file gives: its name without `.tar.gz`, `.tgz`, `.tar` or
/// `.onnx`; `model` when that is not a valid model name.
pub fn name_from_file(file_name: &str) -> String {
    let stem = [".tar.gz", ".tgz", ".tar", ".onnx"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))
        .unwrap_or(file_name);
    if ember_core::model::check_name(stem).is_ok() {
        stem.to_string()
    } else {
        "model".to_string()
    }
}

/// What an artifact file holds, from its first bytes (and its name for a bare graph).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArtifactKind {
    TarGz,
    Tar,
    Onnx,
}

/// Tells a gzip stream (magic `1f 8b`), a tar archive (`ustar` at byte 257) and an `.onnx` file
/// apart.
pub fn sniff(head: &[u8], file_name: &str) -> Result<ArtifactKind, Problem> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(ArtifactKind::TarGz)
    } else if head.get(257..262) == Some(b"ustar") {
        Ok(ArtifactKind::Tar)
    } else if file_name.ends_with(".onnx") {
        Ok(ArtifactKind::Onnx)
    } else {
        Err(Problem::Artifact(
            "neither a .tar.gz/.tgz/.tar archive nor an .onnx file".into(),
        ))
    }
}

/// Resolves `uri` into a model directory: a local directory as it is; an artifact from the
/// cache, or downloaded, verified and unpacked into it.
pub async fn resolve(uri: &str, args: &SourceArgs) -> Result<PathBuf, SourceError> {
    let redacted = redact(uri);
    let fail = |problem| SourceError {
        uri: redacted.clone(),
        problem,
    };
    let location = Location::parse(uri).map_err(fail)?;
    let digest = args
        .model_sha256
        .as_deref()
        .map(parse_digest)
        .transpose()
        .map_err(fail)?;
    match &location {
        Location::Http(_) if digest.is_none() && !args.allow_unverified_model => {
            return Err(fail(Problem::Invalid(
                "an https source needs --model-sha256 (or --allow-unverified-model to load it \
                 unverified)"
                    .into(),
            )));
        }
        Location::Local(path) if path.is_dir() => {
            if digest.is_some() {
                return Err(fail(Problem::Invalid(
                    "--model-sha256 checks an artifact file; a directory is used in place, \
                     unverified"
                        .into(),
                )));
            }
            tracing::info!(dir = %path.display(), "model directory used in place");
            return Ok(path.clone());
        }
        Location::Local(path) if !path.exists() => {
            return Err(fail(Problem::NotFound("no such file or directory".into())));
        }
        _ => {}
    }
    let cache = args.cache_dir().map_err(fail)?;
    let source = Source {
        uri: redacted.clone(),
        location,
        digest,
        cache,
        ca_file: args.model_ca_file.clone(),
    };
    source.fetch().await.map_err(fail)
}

struct Source {
    uri: String,
    location: Location,
    digest: Option<String>,
    cache: PathBuf,
    ca_file: Option<PathBuf>,
}

impl Source {
    async fn fetch(self) -> Result<PathBuf, Problem> {
        if let Some(hex) = &self.digest
            && let Some(dir) = cached_model_dir(&self.cache.join(cache_key(hex)))
        {
            tracing::info!(uri = %self.uri, sha256 = %hex, dir = %dir.display(), "model from the cache");
            return Ok(dir);
        }
        std::fs::create_dir_all(&self.cache)
            .map_err(|e| Problem::Cache(format!("{}: {e}", self.cache.display())))?;
        let staging = Staging::new(&self.cache);
        let (artifact, got) = match &self.location {
            Location::Local(path) => {
                let file = path.clone();
                let got = blocking(move || hash_file(&file)).await?;
                (path.clone(), got)
            }
            Location::Http(url) => {
                let client = http_client(self.ca_file.as_deref())?;
                let got =
                    with_retries(&self.uri, || download_http(&client, url, &staging.part)).await?;
                (staging.part.clone(), got)
            }
            Location::S3 { bucket, key } => {
                let store = s3_store(bucket, self.ca_file.as_deref())?;
                let path = object_store::path::Path::parse(key)
                    .map_err(|e| Problem::Invalid(format!("s3 key: {e}")))?;
                let got =
                    with_retries(&self.uri, || download_s3(&store, &path, &staging.part)).await?;
                (staging.part.clone(), got)
            }
        };
        if let Some(expected) = &self.digest
            && *expected != got
        {
            return Err(Problem::DigestMismatch {
                expected: expected.clone(),
                got,
            });
        }
        let entry = self.cache.join(cache_key(&got));
        if let Some(dir) = cached_model_dir(&entry) {
            tracing::info!(uri = %self.uri, sha256 = %got, dir = %dir.display(), "model from the cache (same digest)");
            return Ok(dir);
        }
        let file_name = self.location.file_name();
        let dir = blocking(move || install(&artifact, &file_name, &staging, &entry)).await?;
        tracing::info!(uri = %self.uri, sha256 = %got, dir = %dir.display(), "model artifact verified and unpacked into the cache");
        Ok(dir)
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Problem> + Send + 'static,
) -> Result<T, Problem> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Problem::Cache(format!("unpacking panicked: {e}")))?
}

/// Temporary paths of one resolution in the cache directory, removed on drop (whatever is left
/// of them: after a successful install, only the downloaded file).
struct Staging {
    /// The download.
    part: PathBuf,
    /// Where an archive is unpacked.
    unpack: PathBuf,
    /// The entry being built, renamed to `sha256-<hex>` when complete.
    root: PathBuf,
}

impl Staging {
    fn new(cache: &Path) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            part: cache.join(format!(".tmp-{id}.part")),
            unpack: cache.join(format!(".tmp-{id}.unpack")),
            root: cache.join(format!(".tmp-{id}")),
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.part);
        let _ = std::fs::remove_dir_all(&self.unpack);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn hash_file(path: &Path) -> Result<String, Problem> {
    let mut file = std::fs::File::open(path)
        .map_err(|e| Problem::NotFound(format!("{}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; 1 << 16];
    loop {
        let n = file
            .read(&mut buffer)
            .map_err(|e| Problem::Artifact(format!("{}: {e}", path.display())))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The backoff before try `tries + 1`: 250 ms doubling up to 4 s, each between half and all
/// of that (jitter, so that a fleet starting together does not retry in step).
pub fn backoff(tries: u32, jitter: f64) -> Duration {
    ember_core::retry::jittered_backoff(FIRST_BACKOFF, MAX_BACKOFF, tries, jitter)
}

/// Runs `attempt` until it succeeds, fails for good, or [`MAX_TRIES`] transient failures.
async fn with_retries<T, F, Fut>(uri: &str, mut attempt: F) -> Result<T, Problem>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Problem>>,
{
    let mut tries = 0;
    loop {
        tries += 1;
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(problem) if problem.is_transient() && tries < MAX_TRIES => {
                let delay = backoff(tries, rand::random());
                tracing::warn!(uri, tries, delay_ms = delay.as_millis() as u64, error = %problem, "model download failed; trying again");
                tokio::time::sleep(delay).await;
            }
            Err(problem) if problem.is_transient() => {
                return Err(Problem::GaveUp {
                    tries,
                    last: Box::new(problem),
                });
            }
            Err(problem) => return Err(problem),
        }
    }
}

/// An error and its causes in one line (`a: b: c`), each said once.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

fn http_client(ca_file: Option<&Path>) -> Result<reqwest::Client, Problem> {
    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("ember-worker/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .retry(reqwest::retry::never());
    if let Some(path) = ca_file {
        builder = builder.tls_certs_merge(read_ca(path)?);
    }
    builder
        .build()
        .map_err(|e| Problem::Invalid(format!("HTTP client: {}", chain(&e))))
}

fn read_ca(path: &Path) -> Result<Vec<reqwest::Certificate>, Problem> {
    let pem = std::fs::read(path)
        .map_err(|e| Problem::Invalid(format!("--model-ca-file {}: {e}", path.display())))?;
    let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
        Problem::Invalid(format!("--model-ca-file {}: {}", path.display(), chain(&e)))
    })?;
    if certificates.is_empty() {
        return Err(Problem::Invalid(format!(
            "--model-ca-file {}: no certificate in it",
            path.display()
        )));
    }
    Ok(certificates)
}

/// A request error, without its URL (which may carry secrets), sorted by whether to try again.
fn http_problem(error: reqwest::Error) -> Problem {
    let (timeout, connect, body) = (error.is_timeout(), error.is_connect(), error.is_body());
    let text = chain(&error.without_url());
    if text.contains("certificate") {
        Problem::Tls(format!(
            "{text} (give the server's CA with --model-ca-file)"
        ))
    } else if timeout {
        Problem::Timeout(text)
    } else if connect {
        Problem::Unreachable(text)
    } else if body {
        Problem::Interrupted(text)
    } else {
        Problem::Unreachable(text)
    }
}

fn status_problem(status: reqwest::StatusCode) -> Problem {
    let text = format!("HTTP {status}");
    match status.as_u16() {
        404 | 410 => Problem::NotFound(text),
        401 | 403 => Problem::Denied(text),
        408 | 429 | 500..=599 => Problem::Server(text),
        _ => Problem::Refused(text),
    }
}

/// One try: GET `url` into `dest`, hashing as it goes; the digest (hex) of what came.
async fn download_http(
    client: &reqwest::Client,
    url: &Url,
    dest: &Path,
) -> Result<String, Problem> {
    let mut response = client.get(url.clone()).send().await.map_err(http_problem)?;
    let status = response.status();
    if !status.is_success() {
        return Err(status_problem(status));
    }
    let expected = response.content_length();
    let mut sink = Sink::create(dest).await?;
    loop {
        match response.chunk().await {
            Ok(Some(bytes)) => sink.write(&bytes).await?,
            Ok(None) => break,
            Err(error) => {
                return Err(match expected {
                    Some(expected) if sink.len < expected => Problem::Truncated {
                        got: sink.len,
                        expected,
                    },
                    _ => http_problem(error),
                });
            }
        }
    }
    sink.finish(expected).await
}

/// A download's file and running digest.
struct Sink {
    file: tokio::fs::File,
    hasher: Sha256,
    len: u64,
}

impl Sink {
    async fn create(path: &Path) -> Result<Self, Problem> {
        let file = tokio::fs::File::create(path)
            .await
            .map_err(|e| Problem::Cache(format!("{}: {e}", path.display())))?;
        Ok(Self {
            file,
            hasher: Sha256::new(),
            len: 0,
        })
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), Problem> {
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .await
            .map_err(|e| Problem::Cache(format!("writing the download: {e}")))
    }

    /// The digest, once the length is what the server announced.
    async fn finish(mut self, expected: Option<u64>) -> Result<String, Problem> {
        if let Some(expected) = expected
            && self.len != expected
        {
            return Err(Problem::Truncated {
                got: self.len,
                expected,
            });
        }
        self.file
            .flush()
            .await
            .map_err(|e| Problem::Cache(format!("writing the download: {e}")))?;
        Ok(hex(&self.hasher.finalize()))
    }
}

/// An S3 client for `bucket` with the usual credential sources (`AmazonS3Builder::from_env`:
/// `AWS_*` variables, web identity, ECS/EKS container credentials, instance metadata) and
/// `AWS_ENDPOINT` for S3-compatible stores. Its own retries (5xx, connection errors, timeouts)
/// are bounded like ours.
fn s3_store(bucket: &str, ca_file: Option<&Path>) -> Result<object_store::aws::AmazonS3, Problem> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    use object_store::{BackoffConfig, ClientOptions, RetryConfig};
    // No overall request timeout (a model can take minutes to arrive); a stalled read still ends.
    let mut options = ClientOptions::new()
        .with_timeout_disabled()
        .with_connect_timeout(Duration::from_secs(10));
    options = options.with_config(object_store::ClientConfigKey::ReadTimeout, "60s");
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| Problem::Invalid(format!("--model-ca-file {}: {e}", path.display())))?;
        for certificate in object_store::Certificate::from_pem_bundle(&pem)
            .map_err(|e| Problem::Invalid(format!("--model-ca-file {}: {e}", path.display())))?
        {
            options = options.with_root_certificate(certificate);
        }
    }
    // `with_client_options` replaces what `from_env` read into the client options
    // (AWS_ALLOW_HTTP, AWS_PROXY_URL, ...): apply those variables again, over our defaults.
    for (key, value) in std::env::vars() {
        if key.starts_with("AWS_")
            && let Ok(AmazonS3ConfigKey::Client(key)) = key.to_ascii_lowercase().parse()
        {
            options = options.with_config(key, value);
        }
    }
    let retry = RetryConfig {
        backoff: BackoffConfig {
            init_backoff: FIRST_BACKOFF,
            max_backoff: MAX_BACKOFF,
            base: 2.0,
        },
        max_retries: (MAX_TRIES - 1) as usize,
        retry_timeout: Duration::from_secs(60),
    };
    AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(options)
        .with_retry(retry)
        .build()
        .map_err(|e| Problem::Invalid(format!("S3 client: {}", chain(&e))))
}

/// `Code: Message` of an S3 error response found in an error's text, if there is one.
pub fn s3_error_code(text: &str) -> Option<String> {
    let field = |name: &str| {
        let start = text.find(&format!("<{name}>"))? + name.len() + 2;
        let end = text[start..].find(&format!("</{name}>"))? + start;
        Some(text[start..end].to_string())
    };
    let code = field("Code")?;
    Some(match field("Message") {
        Some(message) => format!("{code}: {message}"),
        None => code,
    })
}

/// An object store error sorted like an HTTP one. Its own retries are spent by now, so a
/// connection error is final here.
fn s3_problem(error: object_store::Error) -> Problem {
    let text = chain(&error);
    let said = s3_error_code(&text);
    match error {
        object_store::Error::NotFound { .. } => {
            Problem::NotFound(said.unwrap_or_else(|| "no such object".into()))
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => Problem::Denied(format!(
            "{} (check the S3 credentials: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, web \
                 identity or instance role)",
            said.unwrap_or_else(|| "403".into())
        )),
        error => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&error);
            while let Some(e) = source {
                if let Some(http) = e.downcast_ref::<object_store::client::HttpError>() {
                    let root = root_cause(http);
                    if root.contains("certificate") {
                        return Problem::Tls(format!(
                            "{root} (give the store's CA with --model-ca-file)"
                        ));
                    }
                    return match http.kind() {
                        object_store::client::HttpErrorKind::Connect => Problem::Unreachable(root),
                        object_store::client::HttpErrorKind::Timeout => Problem::Timeout(root),
                        _ => Problem::Interrupted(root),
                    };
                }
                source = e.source();
            }
            Problem::Refused(said.unwrap_or(text))
        }
    }
}

fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut last = error;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

/// One try: GET the object into `dest`, hashing as it goes.
async fn download_s3(
    store: &object_store::aws::AmazonS3,
    path: &object_store::path::Path,
    dest: &Path,
) -> Result<String, Problem> {
    let result = store.get(path).await.map_err(|e| match s3_problem(e) {
        // The store already tried again; what is left of a transient failure is final.
        problem if problem.is_transient() => Problem::GaveUp {
            tries: MAX_TRIES,
            last: Box::new(problem),
        },
        problem => problem,
    })?;
    let expected = result.meta.size;
    let mut stream = result.into_stream();
    let mut sink = Sink::create(dest).await?;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => sink.write(&bytes).await?,
            Err(_) if sink.len < expected => {
                return Err(Problem::Truncated {
                    got: sink.len,
                    expected,
                });
            }
            Err(error) => return Err(Problem::Interrupted(chain(&error))),
        }
    }
    sink.finish(Some(expected)).await
}

/// Unpacks (or places) a verified artifact into `staging.root/<name>/` and renames
/// `staging.root` to the cache entry; the model directory in it.
fn install(
    artifact: &Path,
    file_name: &str,
    staging: &Staging,
    entry: &Path,
) -> Result<PathBuf, Problem> {
    let io = |what: &Path, e: std::io::Error| Problem::Cache(format!("{}: {e}", what.display()));
    let mut head = Vec::with_capacity(512);
    std::fs::File::open(artifact)
        .and_then(|f| f.take(512).read_to_end(&mut head))
        .map_err(|e| io(artifact, e))?;
    let kind = sniff(&head, file_name)?;
    std::fs::create_dir(&staging.root).map_err(|e| io(&staging.root, e))?;
    let name = match kind {
        ArtifactKind::Onnx => {
            let name = name_from_file(file_name);
            let dir = staging.root.join(&name);
            std::fs::create_dir(&dir).map_err(|e| io(&dir, e))?;
            std::fs::copy(artifact, dir.join("model.onnx")).map_err(|e| io(&dir, e))?;
            name
        }
        ArtifactKind::Tar | ArtifactKind::TarGz => {
            let file = std::fs::File::open(artifact).map_err(|e| io(artifact, e))?;
            let reader: Box<dyn Read> = if kind == ArtifactKind::TarGz {
                Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
            } else {
                Box::new(std::io::BufReader::new(file))
            };
            unpack(reader, &staging.unpack)?;
            let top: Vec<_> = std::fs::read_dir(&staging.unpack)
                .and_then(|d| d.collect::<Result<Vec<_>, _>>())
                .map_err(|e| io(&staging.unpack, e))?;
            match top.as_slice() {
                [only] if only.file_type().is_ok_and(|t| t.is_dir()) => {
                    let name = only.file_name().to_string_lossy().into_owned();
                    let to = staging.root.join(&name);
                    std::fs::rename(only.path(), &to).map_err(|e| io(&to, e))?;
                    name
                }
                _ => {
                    let name = name_from_file(file_name);
                    let to = staging.root.join(&name);
                    std::fs::rename(&staging.unpack, &to).map_err(|e| io(&to, e))?;
                    name
                }
            }
        }
    };
    let model_dir = staging.root.join(&name);
    if !model_dir.join("model.onnx").is_file() && !model_dir.join("model.toml").is_file() {
        return Err(Problem::Artifact(
            "no model.onnx or model.toml at the archive's top or in its one top-level directory"
                .into(),
        ));
    }
    match std::fs::rename(&staging.root, entry) {
        Ok(()) => Ok(entry.join(name)),
        // Another worker sharing the cache got there first: its entry is the same bytes.
        Err(error) => cached_model_dir(entry).ok_or_else(|| io(entry, error)),
    }
}

/// Unpacks a tar stream into `dest` (created), allowing only regular files and directories at
/// safe relative paths, within [`MAX_UNPACKED_BYTES`] and [`MAX_ENTRIES`]. Modes, owners and
/// times are not kept; every file is synced before the entry is renamed into place.
pub fn unpack(reader: impl Read, dest: &Path) -> Result<(), Problem> {
    unpack_within(reader, dest, MAX_UNPACKED_BYTES)
}

fn unpack_within(reader: impl Read, dest: &Path, max_bytes: u64) -> Result<(), Problem> {
    let bad = |e: std::io::Error| Problem::Artifact(format!("not a readable tar archive: {e}"));
    let io = |what: &Path, e: std::io::Error| Problem::Cache(format!("{}: {e}", what.display()));
    std::fs::create_dir(dest).map_err(|e| io(dest, e))?;
    let mut archive = tar::Archive::new(reader);
    let (mut total, mut count) = (0u64, 0usize);
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        count += 1;
        if count > MAX_ENTRIES {
            return Err(Problem::Artifact(format!(
                "more than {MAX_ENTRIES} entries"
            )));
        }
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() {
            continue; // `git archive`'s comment header: no file
        }
        let raw = entry.path().map_err(bad)?.into_owned();
        let Some(relative) = safe_relative(&raw)
            .map_err(|why| Problem::Artifact(format!("{}: {why}", raw.display())))?
        else {
            continue;
        };
        let path = dest.join(&relative);
        if kind.is_dir() {
            std::fs::create_dir_all(&path).map_err(|e| io(&path, e))?;
        } else if kind.is_file() || kind.is_contiguous() {
            let size = entry.size();
            total = total.saturating_add(size);
            if total > max_bytes {
                return Err(Problem::Artifact(format!(
                    "unpacks to more than {max_bytes} bytes"
                )));
            }
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
            }
            let mut out = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
            let copied = std::io::copy(&mut (&mut entry).take(size), &mut out).map_err(bad)?;
            if copied != size {
                return Err(Problem::Artifact(format!(
                    "{}: the archive ends inside this file",
                    raw.display()
                )));
            }
            out.flush()
                .and_then(|()| out.sync_all())
                .map_err(|e| io(&path, e))?;
        } else if kind.is_symlink() || kind.is_hard_link() {
            return Err(Problem::Artifact(format!(
                "{}: links are not allowed in a model archive",
                raw.display()
            )));
        } else {
            return Err(Problem::Artifact(format!(
                "{}: only regular files and directories are allowed ({kind:?})",
                raw.display()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn redaction_removes_userinfo_and_query_and_keeps_the_rest() {
        assert_eq!(
            redact("https://user:hunter2@models.example.com/a/m.tar.gz?X-Amz-Signature=abc#f"),
            "https://***@models.example.com/a/m.tar.gz?***"
        );
        assert_eq!(
            redact("https://h.example/m.tar.gz#frag"),
            "https://h.example/m.tar.gz"
        );
        assert_eq!(redact("s3://bucket/key.tar.gz"), "s3://bucket/key.tar.gz");
        assert_eq!(redact("/models/iris"), "/models/iris");
        // An `@` in the path is not userinfo; one in a broken URL's authority is.
        assert_eq!(redact("https://h/a@b"), "https://h/a@b");
        assert_eq!(redact("https://tok@en@h:1/x"), "https://***@h:1/x");
        assert_eq!(redact("not a url?token=1"), "not a url?***");
    }

    #[test]
    fn digests_are_64_hex_digits_lowercased_with_an_optional_prefix() {
        let hex = "AB".repeat(32);
        assert_eq!(parse_digest(&hex).unwrap(), "ab".repeat(32));
        assert_eq!(
            parse_digest(&format!(" sha256:{hex} ")).unwrap(),
            "ab".repeat(32)
        );
        assert!(parse_digest(&"ab".repeat(31)).is_err());
        assert!(parse_digest(&"zz".repeat(32)).is_err());
        assert!(parse_digest("").is_err());
    }

    #[test]
    fn the_cache_key_is_the_digest_and_only_a_whole_entry_is_found() {
        assert_eq!(cache_key("00ff"), "sha256-00ff");
        let root = std::env::temp_dir().join(format!("ember-cache-{}", uuid::Uuid::new_v4()));
        let entry = root.join(cache_key("00ff"));
        assert_eq!(cached_model_dir(&entry), None, "absent");
        std::fs::create_dir_all(entry.join("iris")).unwrap();
        assert_eq!(cached_model_dir(&entry), Some(entry.join("iris")));
        std::fs::create_dir_all(entry.join("other")).unwrap();
        assert_eq!(cached_model_dir(&entry), None, "two directories: not ours");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn archive_paths_must_stay_inside() {
        let ok = |p: &str| safe_relative(Path::new(p)).unwrap();
        assert_eq!(
            ok("iris/model.onnx"),
            Some(PathBuf::from("iris/model.onnx"))
        );
        assert_eq!(
            ok("./iris/./model.onnx"),
            Some(PathBuf::from("iris/model.onnx"))
        );
        assert_eq!(ok("./"), None);
        assert!(safe_relative(Path::new("../x")).is_err());
        assert!(safe_relative(Path::new("iris/../../x")).is_err());
        assert!(safe_relative(Path::new("/etc/passwd")).is_err());
    }

    #[test]
    fn uris_parse_into_locations_and_bad_ones_say_why() {
        assert_eq!(
            Location::parse("models/iris").unwrap(),
            Location::Local(PathBuf::from("models/iris"))
        );
        assert_eq!(
            Location::parse("file:///srv/m%20x.tar.gz").unwrap(),
            Location::Local(PathBuf::from("/srv/m x.tar.gz"))
        );
        assert_eq!(
            Location::parse("s3://bucket/a/b/m.tar.gz").unwrap(),
            Location::S3 {
                bucket: "bucket".into(),
                key: "a/b/m.tar.gz".into()
            }
        );
        assert!(matches!(
            Location::parse("https://example.com/m.tar.gz").unwrap(),
            Location::Http(_)
        ));
        for local in [
            "http://127.0.0.1:8000/m.onnx",
            "http://localhost/m.onnx",
            "http://[::1]/m.onnx",
        ] {
            assert!(
                matches!(Location::parse(local).unwrap(), Location::Http(_)),
                "{local}"
            );
        }
        for bad in [
            "http://example.com/m.tar.gz",
            "http://10.0.0.1/m.tar.gz",
            "s3://bucket",
            "s3://bucket/",
            "s3:///key",
            "s3://bucket/key?versionId=1",
            "gs://bucket/key",
            "file://host/relative",
        ] {
            assert!(
                matches!(Location::parse(bad), Err(Problem::Invalid(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_flat_artifact_is_named_by_its_file() {
        assert_eq!(name_from_file("iris-classifier.tar.gz"), "iris-classifier");
        assert_eq!(name_from_file("iris.tgz"), "iris");
        assert_eq!(name_from_file("iris.tar"), "iris");
        assert_eq!(name_from_file("detector.onnx"), "detector");
        assert_eq!(name_from_file("v1.2.tar.gz"), "model", "not a model name");
        assert_eq!(name_from_file(""), "model");
    }

    #[test]
    fn artifacts_are_told_apart_by_their_first_bytes() {
        assert_eq!(sniff(&[0x1f, 0x8b, 8], "x").unwrap(), ArtifactKind::TarGz);
        let mut tar = vec![0u8; 512];
        tar[257..262].copy_from_slice(b"ustar");
        assert_eq!(sniff(&tar, "x.bin").unwrap(), ArtifactKind::Tar);
        assert_eq!(sniff(&[8, 7], "m.onnx").unwrap(), ArtifactKind::Onnx);
        assert!(matches!(sniff(&[8, 7], "m.zip"), Err(Problem::Artifact(_))));
    }

    #[test]
    fn backoff_doubles_within_bounds_with_jitter() {
        assert_eq!(backoff(1, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(1, 0.0), Duration::from_millis(125));
        assert_eq!(backoff(2, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(10, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(u32::MAX, 1.0), MAX_BACKOFF);
    }

    #[test]
    fn only_transient_problems_are_tried_again() {
        assert!(status_problem(reqwest::StatusCode::SERVICE_UNAVAILABLE).is_transient());
        assert!(status_problem(reqwest::StatusCode::TOO_MANY_REQUESTS).is_transient());
        assert!(matches!(
            status_problem(reqwest::StatusCode::NOT_FOUND),
            Problem::NotFound(_)
        ));
        assert!(matches!(
            status_problem(reqwest::StatusCode::FORBIDDEN),
            Problem::Denied(_)
        ));
        assert!(!status_problem(reqwest::StatusCode::BAD_REQUEST).is_transient());
        assert!(
            Problem::Truncated {
                got: 1,
                expected: 2
            }
            .is_transient()
        );
        assert!(
            !Problem::DigestMismatch {
                expected: "a".into(),
                got: "b".into()
            }
            .is_transient()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_bound_and_at_a_permanent_failure() {
        let mut calls = 0;
        let result: Result<(), _> = with_retries("u", || {
            calls += 1;
            async { Err(Problem::Server("HTTP 503".into())) }
        })
        .await;
        assert_eq!(calls, MAX_TRIES);
        assert!(matches!(result, Err(Problem::GaveUp { tries, .. }) if tries == MAX_TRIES));

        let mut calls = 0;
        let result: Result<(), _> = with_retries("u", || {
            calls += 1;
            async { Err(Problem::NotFound("HTTP 404".into())) }
        })
        .await;
        assert_eq!(calls, 1);
        assert!(matches!(result, Err(Problem::NotFound(_))));

        let mut calls = 0;
        let result = with_retries("u", || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(Problem::Unreachable("refused".into()))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), 3);
    }

    #[test]
    fn s3_error_bodies_give_their_code_and_message() {
        let text = "Server returned non-2xx status code: 403 Forbidden: <?xml version=\"1.0\"?>\
                    <Error><Code>SignatureDoesNotMatch</Code><Message>The request signature \
                    ...</Message></Error>";
        assert_eq!(
            s3_error_code(text).unwrap(),
            "SignatureDoesNotMatch: The request signature ..."
        );
        assert_eq!(
            s3_error_code("<Code>NoSuchKey</Code>").unwrap(),
            "NoSuchKey"
        );
        assert_eq!(s3_error_code("connection refused"), None);
    }

    fn tar_with(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        build(&mut builder);
        builder.into_inner().unwrap()
    }

    fn file_header(path: &str, size: usize, kind: tar::EntryType) -> tar::Header {
        let mut header = tar::Header::new_gnu();
        // Written byte by byte: `set_path` itself refuses `..` and absolute paths.
        let name = &mut header.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        header.set_size(size as u64);
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_cksum();
        header
    }

    fn scratch() -> PathBuf {
        std::env::temp_dir().join(format!("ember-unpack-{}", uuid::Uuid::new_v4()))
    }

    #[test]
    fn unpacking_keeps_files_and_directories() {
        let archive = tar_with(|b| {
            b.append(&file_header("m/", 0, tar::EntryType::Directory), &[][..])
                .unwrap();
            b.append(
                &file_header("m/model.onnx", 3, tar::EntryType::Regular),
                &b"abc"[..],
            )
            .unwrap();
            b.append(
                &file_header("m/sub/x.txt", 1, tar::EntryType::Regular),
                &b"x"[..],
            )
            .unwrap();
        });
        let dest = scratch();
        unpack(&archive[..], &dest).unwrap();
        assert_eq!(std::fs::read(dest.join("m/model.onnx")).unwrap(), b"abc");
        assert_eq!(std::fs::read(dest.join("m/sub/x.txt")).unwrap(), b"x");
        std::fs::remove_dir_all(&dest).unwrap();
    }

    #[test]
    fn unpacking_refuses_escapes_links_devices_and_too_much() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "`..`",
                tar_with(|b| {
                    b.append(
                        &file_header("../evil", 1, tar::EntryType::Regular),
                        &b"x"[..],
                    )
                    .unwrap();
                }),
            ),
            (
                "absolute",
                tar_with(|b| {
                    b.append(
                        &file_header("/tmp/evil", 1, tar::EntryType::Regular),
                        &b"x"[..],
                    )
                    .unwrap();
                }),
            ),
            (
                "links",
                tar_with(|b| {
                    let mut h = file_header("m/link", 0, tar::EntryType::Symlink);
                    h.set_link_name("/etc/passwd").unwrap();
                    h.set_cksum();
                    b.append(&h, &[][..]).unwrap();
                }),
            ),
            (
                "links",
                tar_with(|b| {
                    let mut h = file_header("m/hard", 0, tar::EntryType::Link);
                    h.set_link_name("m/model.onnx").unwrap();
                    h.set_cksum();
                    b.append(&h, &[][..]).unwrap();
                }),
            ),
            (
                "only regular files",
                tar_with(|b| {
                    b.append(&file_header("m/fifo", 0, tar::EntryType::Fifo), &[][..])
                        .unwrap();
                }),
            ),
        ];
        for (why, archive) in cases {
            let dest = scratch();
            let error = unpack(&archive[..], &dest).unwrap_err();
            assert!(
                matches!(&error, Problem::Artifact(text) if text.contains(why)),
                "{why}: {error}"
            );
            assert!(!dest.parent().unwrap().join("evil").exists());
            std::fs::remove_dir_all(&dest).unwrap();
        }
        let big = tar_with(|b| {
            b.append(
                &file_header("m/a", 600, tar::EntryType::Regular),
                &[0u8; 600][..],
            )
            .unwrap();
            b.append(
                &file_header("m/b", 600, tar::EntryType::Regular),
                &[0u8; 600][..],
            )
            .unwrap();
        });
        let dest = scratch();
        let error = unpack_within(&big[..], &dest, 1000).unwrap_err();
        assert!(
            error.to_string().contains("more than 1000 bytes"),
            "{error}"
        );
        std::fs::remove_dir_all(&dest).unwrap();
    }
}
