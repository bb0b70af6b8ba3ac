//! Tenants: who a bearer token belongs to, which models it may use, its request rate and its
//! share of a model's queue. Read from a TOML file (a mounted Secret) holding only SHA-256
//! digests of the tokens, and read again when its content changes, so tokens are added, rotated
//! and revoked without a restart.
//!
//! ```toml
//! [tenants.team-a]
//! token_sha256 = ["<64 hex digits>"]   # printf %s "$TOKEN" | sha256sum; several: rotation
//! models = ["ssdlite-person"]          # or ["*"]
//! rate_limit = "50/s"                  # optional (else --rate-limit, if any)
//! rate_limit_burst = 100               # optional
//! max_outstanding = 64                 # optional: per model, jobs submitted and not answered
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use crate::limits::{Rate, RateLimiter};

/// One tenant, as configured.
#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    /// `None`: every model.
    models: Option<Vec<String>>,
    /// This tenant's request bucket (its own rate, or the dispatcher's `--rate-limit`).
    pub rate: Option<RateLimiter>,
    /// Most jobs of this tenant submitted to one model and not yet answered.
    pub max_outstanding: Option<u32>,
    /// What the limiter was built from (a reload that leaves the tenant keeps its bucket).
    rate_spec: Option<(Rate, Option<u32>)>,
}

impl Tenant {
    /// Whether this tenant may use `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.models
            .as_ref()
            .is_none_or(|models| models.iter().any(|m| m == model))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    token_sha256: Vec<String>,
    models: Vec<String>,
    rate_limit: Option<String>,
    rate_limit_burst: Option<u32>,
    max_outstanding: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantsFile {
    #[serde(default)]
    tenants: BTreeMap<String, TenantEntry>,
}

/// Every tenant and the digests of its tokens.
#[derive(Debug, Default)]
pub struct Directory {
    /// (digest, index into `tenants`).
    digests: Vec<([u8; 32], usize)>,
    tenants: Vec<Arc<Tenant>>,
}

/// The dispatcher-wide defaults a tenant without its own settings gets.
#[derive(Debug, Clone, Copy, Default)]
pub struct Defaults {
    pub rate: Option<Rate>,
    pub burst: Option<u32>,
}

fn parse_digest(text: &str) -> Option<[u8; 32]> {
    let text = text.trim();
    if text.len() != 64 {
        return None;
    }
    let mut digest = [0u8; 32];
    for (i, byte) in digest.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(digest)
}

/// A tenant name fit for a metrics label and a Redis key: 1–64 of `[A-Za-z0-9._-]`.
fn check_tenant_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(format!(
            "tenant `{name}`: a name is 1 to 64 letters, digits, `.`, `_` or `-`"
        ));
    }
    Ok(())
}

impl Directory {
    /// Parses a tenants file. `previous`: the directory it replaces, whose rate buckets are kept
    /// for tenants whose rate did not change (a reload does not refill anyone's bucket).
    pub fn parse(
        text: &str,
        defaults: Defaults,
        previous: Option<&Directory>,
    ) -> Result<Self, String> {
        let file: TenantsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut directory = Directory::default();
        for (name, entry) in file.tenants {
            check_tenant_name(&name)?;
            if entry.token_sha256.is_empty() {
                return Err(format!("tenant `{name}`: token_sha256 lists no digest"));
            }
            if entry.models.is_empty() {
                return Err(format!(
                    "tenant `{name}`: models is empty (\"*\" allows every model)"
                ));
            }
            let rate = match &entry.rate_limit {
                Some(text) => Some(
                    text.parse::<Rate>()
                        .map_err(|e| format!("tenant `{name}`: rate_limit {e}"))?,
                ),
                None => defaults.rate,
            };
            let burst = entry.rate_limit_burst.or(defaults.burst);
            let rate_spec = rate.map(|rate| (rate, burst));
            let models = (!entry.models.iter().any(|m| m == "*")).then_some(entry.models);
            // A tenant the reload leaves as it was keeps its rate bucket.
            let kept = previous.and_then(|p| p.by_name(&name)).filter(|t| {
                t.rate_spec == rate_spec
                    && t.models == models
                    && t.max_outstanding == entry.max_outstanding
            });
            let tenant = match kept {
                Some(kept) => kept.clone(),
                None => Arc::new(Tenant {
                    name: name.clone(),
                    models,
                    rate: rate_spec.map(|(rate, burst)| RateLimiter::new(rate, burst)),
                    max_outstanding: entry.max_outstanding,
                    rate_spec,
                }),
            };
            let index = directory.tenants.len();
            directory.tenants.push(tenant);
            for digest in &entry.token_sha256 {
                let digest = parse_digest(digest).ok_or_else(|| {
                    format!("tenant `{name}`: `{digest}` is not a SHA-256 digest (64 hex digits)")
                })?;
                if directory.digests.iter().any(|(d, _)| *d == digest) {
                    return Err(format!(
                        "tenant `{name}`: a token digest is listed twice (a token belongs to one tenant)"
                    ));
                }
                directory.digests.push((digest, index));
            }
        }
        Ok(directory)
    }

    /// The plain `--auth-token` list as one tenant, `default`, allowed every model.
    pub fn from_tokens(tokens: &[String], defaults: Defaults) -> Self {
        let mut directory = Directory::default();
        let digests: Vec<[u8; 32]> = tokens
            .iter()
            .filter(|t| !t.is_empty())
            .map(|t| Sha256::digest(t.as_bytes()).into())
            .collect();
        if digests.is_empty() {
            return directory;
        }
        let rate_spec = defaults.rate.map(|rate| (rate, defaults.burst));
        directory.tenants.push(Arc::new(Tenant {
            name: "default".into(),
            models: None,
            rate: rate_spec.map(|(rate, burst)| RateLimiter::new(rate, burst)),
            max_outstanding: None,
            rate_spec,
        }));
        directory.digests = digests.into_iter().map(|d| (d, 0)).collect();
        directory
    }

    fn by_name(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.iter().find(|t| t.name == name)
    }

    pub fn len(&self) -> usize {
        self.tenants.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    /// The tenant whose token was presented. The presented token is hashed and compared with
    /// every digest in constant time, so neither its bytes nor its length, nor which digest
    /// matched, shows in the time taken.
    pub fn find(&self, presented: &str) -> Option<Arc<Tenant>> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (candidate, tenant) in &self.digests {
            let equal = candidate.ct_eq(&digest);
            index = u64::conditional_select(&index, &(*tenant as u64), equal);
            found |= equal;
        }
        bool::from(found).then(|| self.tenants[index as usize].clone())
    }
}

/// The tenants in force: swapped whole on a reload.
#[derive(Debug)]
pub struct Tenants {
    current: RwLock<Arc<Directory>>,
    /// Whether tokens are required at all (false only with `--insecure-no-auth`).
    pub required: bool,
    file: Option<PathBuf>,
    defaults: Defaults,
}

impl Tenants {
    pub fn new(
        directory: Directory,
        required: bool,
        file: Option<PathBuf>,
        defaults: Defaults,
    ) -> Self {
        Self {
            current: RwLock::new(Arc::new(directory)),
            required,
            file,
            defaults,
        }
    }

    /// Reads `path` at startup: an error if it cannot be read or does not parse.
    pub fn load(path: &Path, defaults: Defaults) -> Result<Directory, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--tenants-file {}: {e}", path.display()))?;
        Directory::parse(&text, defaults, None)
            .map_err(|e| format!("--tenants-file {}: {e}", path.display()))
    }

    pub fn current(&self) -> Arc<Directory> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the file when its content differs from `seen`; the new content on a change.
    /// A file that cannot be read or does not parse leaves the tenants as they are (logged).
    pub fn reload(&self, seen: &str) -> Result<Option<String>, String> {
        let Some(path) = &self.file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--tenants-file {}: {e}", path.display()))?;
        if text == seen {
            return Ok(None);
        }
        let previous = self.current();
        let directory = Directory::parse(&text, self.defaults, Some(&previous))
            .map_err(|e| format!("--tenants-file {}: {e}", path.display()))?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(directory);
        Ok(Some(text))
    }

    /// Re-reads the file every `interval` until `done`.
    pub async fn watch(
        self: Arc<Self>,
        interval: Duration,
        metrics: crate::metrics::Metrics,
        done: tokio_util::sync::CancellationToken,
    ) {
        let Some(path) = self.file.clone() else {
            return;
        };
        let mut seen = std::fs::read_to_string(&path).unwrap_or_default();
        loop {
            tokio::select! {
                () = done.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
            match self.reload(&seen) {
                Ok(Some(text)) => {
                    seen = text;
                    let tenants = self.current();
                    metrics.tenants.set(tenants.len() as i64);
                    metrics.tenant_reloads.with_label_values(&["ok"]).inc();
                    tracing::info!(tenants = tenants.len(), "tenants reloaded");
                }
                Ok(None) => {}
                Err(error) => {
                    metrics.tenant_reloads.with_label_values(&["error"]).inc();
                    tracing::error!(%error, "tenants file not reloaded; the previous tenants stay in force");
                    // Do not log the same broken content every interval.
                    if let Ok(text) = std::fs::read_to_string(&path) {
                        seen = text;
                    }
                }
            }
        }
    }
}

/// What a request was let in as: a tenant, or nobody (auth off).
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<Arc<Tenant>>);

impl Caller {
    /// The tenant's name, for records, keys and labels; `""` without auth.
    pub fn name(&self) -> &str {
        self.0.as_ref().map_or("", |t| t.name.as_str())
    }

    /// The tenant's name as a metrics label: `none` without auth.
    pub fn label(&self) -> &str {
        self.0.as_ref().map_or("none", |t| t.name.as_str())
    }

    pub fn may_use(&self, model: &str) -> bool {
        self.0.as_ref().is_none_or(|t| t.may_use(model))
    }

    /// Whether this caller may see a job recorded for `owner` (`None`: a job with no tenant,
    /// e.g. published straight to the queue). Without auth, every job; with auth, only the
    /// tenant's own.
    pub fn owns(&self, owner: Option<&str>) -> bool {
        match &self.0 {
            None => true,
            Some(tenant) => owner == Some(tenant.name.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(token: &str) -> String {
        Sha256::digest(token.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn file() -> String {
        format!(
            r#"
[tenants.team-a]
token_sha256 = ["{}", "{}"]
models = ["iris"]
rate_limit = "5/s"
max_outstanding = 3

[tenants.team-b]
token_sha256 = ["{}"]
models = ["*"]
"#,
            hex("alpha"),
            hex("alpha-next"),
            hex("bravo")
        )
    }

    #[test]
    fn tokens_find_their_tenant_and_its_models() {
        let directory = Directory::parse(&file(), Defaults::default(), None).expect("parses");
        let a = directory.find("alpha").expect("alpha");
        assert_eq!(a.name, "team-a");
        assert_eq!(
            directory.find("alpha-next").map(|t| t.name.clone()),
            Some("team-a".into())
        );
        assert!(a.may_use("iris"));
        assert!(!a.may_use("ssdlite-person"));
        assert_eq!(a.max_outstanding, Some(3));
        assert!(a.rate.is_some());
        let b = directory.find("bravo").expect("bravo");
        assert!(b.may_use("anything"));
        assert!(b.rate.is_none());
        for wrong in ["", "alph", "alpha ", "ALPHA", &hex("alpha")] {
            assert!(directory.find(wrong).is_none(), "{wrong:?}");
        }
    }

    #[test]
    fn callers_see_only_their_own_jobs_and_models() {
        let directory = Directory::parse(&file(), Defaults::default(), None).expect("parses");
        let a = Caller(directory.find("alpha"));
        let b = Caller(directory.find("bravo"));
        assert!(a.owns(Some("team-a")));
        assert!(!a.owns(Some("team-b")));
        assert!(
            !a.owns(None),
            "a job without a tenant is nobody's when auth is on"
        );
        assert!(!b.owns(Some("team-a")));
        assert!(!a.may_use("other"));
        let anonymous = Caller(None);
        assert!(anonymous.owns(Some("team-a")) && anonymous.owns(None));
        assert!(anonymous.may_use("other"));
        assert_eq!(anonymous.name(), "");
        assert_eq!(a.name(), "team-a");
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let table = [
            (
                "[tenants.a]\ntoken_sha256 = [\"abc\"]\nmodels = [\"*\"]",
                "not a SHA-256",
            ),
            (
                "[tenants.a]\ntoken_sha256 = []\nmodels = [\"*\"]",
                "lists no digest",
            ),
            (
                &format!(
                    "[tenants.a]\ntoken_sha256 = [\"{}\"]\nmodels = []",
                    hex("x")
                ),
                "models is empty",
            ),
            (
                &format!(
                    "[tenants.\"a b\"]\ntoken_sha256 = [\"{}\"]\nmodels = [\"*\"]",
                    hex("x")
                ),
                "a name is",
            ),
            (
                &format!(
                    "[tenants.a]\ntoken_sha256 = [\"{0}\"]\nmodels = [\"*\"]\n[tenants.b]\ntoken_sha256 = [\"{0}\"]\nmodels = [\"*\"]",
                    hex("x")
                ),
                "listed twice",
            ),
            (
                &format!(
                    "[tenants.a]\ntoken_sha256 = [\"{}\"]\nmodels = [\"*\"]\nrate_limit = \"fast\"",
                    hex("x")
                ),
                "rate_limit",
            ),
            (
                &format!(
                    "[tenants.a]\ntoken_sha256 = [\"{}\"]\nmodels = [\"*\"]\ntoken = \"plain\"",
                    hex("x")
                ),
                "unknown field",
            ),
        ];
        for (text, why) in table {
            let error =
                Directory::parse(text, Defaults::default(), None).expect_err("must be refused");
            assert!(error.contains(why), "{text}: {error}");
        }
    }

    #[test]
    fn a_reload_keeps_the_buckets_of_unchanged_tenants() {
        let first = Directory::parse(&file(), Defaults::default(), None).expect("parses");
        let before = first.find("alpha").expect("alpha");
        let same = Directory::parse(&file(), Defaults::default(), Some(&first)).expect("parses");
        assert!(Arc::ptr_eq(&before, &same.find("alpha").expect("alpha")));
        let changed = file().replace("5/s", "6/s");
        let after = Directory::parse(&changed, Defaults::default(), Some(&first)).expect("parses");
        assert!(!Arc::ptr_eq(&before, &after.find("alpha").expect("alpha")));
    }

    #[test]
    fn plain_tokens_are_one_default_tenant() {
        let directory = Directory::from_tokens(&["s3cret".into()], Defaults::default());
        assert_eq!(
            directory.find("s3cret").map(|t| t.name.clone()),
            Some("default".into())
        );
        assert!(directory.find("other").is_none());
        assert!(Directory::from_tokens(&[], Defaults::default()).is_empty());
    }
}
