//! The shared job store, in Redis, so that every dispatcher replica answers for every job:
//! job records (with their tenant), results (first one wins: a redelivered job's second result
//! is not visible), idempotency keys (per tenant and model), each tenant's outstanding jobs per
//! model, and delivered-callback marks, each with a TTL.

use std::time::Duration;

use ember_core::protocol::JobResult;
use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// A job as submitted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    pub model: String,
    pub submitted_at_ms: u64,
    #[serde(default)]
    pub cancelled: bool,
    /// Its result was dropped from `ember.results.store` before a dispatcher stored it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub expired: bool,
    /// Who submitted it (none without auth): only this tenant sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Counted among its tenant's outstanding jobs (the tenant has a `max_outstanding`): its
    /// result releases it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub counted: bool,
}

/// A job as the store knows it: its state, and whose it is.
#[derive(Debug, Clone)]
pub struct Job {
    /// The tenant of its record; none for a job submitted without auth, straight to the queue,
    /// or whose record is gone.
    pub owner: Option<String>,
    pub state: JobState,
}

/// What `GET /v1/jobs/{id}` reports.
#[derive(Debug, Clone)]
pub enum JobState {
    Queued(JobRecord),
    Cancelled(JobRecord),
    /// Its result was dropped before it was stored (see [`JobRecord::expired`]).
    Expired(JobRecord),
    Finished(Box<JobResult>),
    /// A result is stored but does not parse (why not): the job is over, its answer unreadable.
    Unreadable(String),
}

/// Who holds an idempotency key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody did: it is now this request's, pending.
    New,
    /// A request took it for this job and has not seen its publish confirmed — still in flight,
    /// or its dispatcher died. The job must be published (again) under the same id: a duplicate
    /// run is absorbed downstream (one stored result and one callback per job id).
    Pending(String),
    /// This job was published.
    Committed(String),
}

const PENDING: &str = "pending:";

/// Handle to the store; cheap to clone (one multiplexed, self-reconnecting connection).
#[derive(Clone)]
pub struct Store {
    redis: ConnectionManager,
    ttl_seconds: u64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("ttl_seconds", &self.ttl_seconds)
            .finish()
    }
}

fn job_key(id: &str) -> String {
    format!("ember:job:{id}")
}
fn result_key(id: &str) -> String {
    format!("ember:result:{id}")
}
fn idempotency_key(tenant: &str, model: &str, key: &str) -> String {
    format!("ember:idem:{tenant}:{model}:{key}")
}
fn outstanding_key(tenant: &str, model: &str) -> String {
    format!("ember:outstanding:{tenant}:{model}")
}
fn callback_key(id: &str) -> String {
    format!("ember:callback-done:{id}")
}

impl Store {
    /// Connects to `url` (`redis://` or `rediss://`, TLS trusting `ca_pem` when given, else the
    /// system's roots).
    pub async fn connect(
        url: &str,
        ca_pem: Option<Vec<u8>>,
        ttl: Duration,
    ) -> redis::RedisResult<Self> {
        let client = match ca_pem {
            Some(root_cert) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )?,
            None => redis::Client::open(url)?,
        };
        let redis = ConnectionManager::new(client).await?;
        Ok(Self {
            redis,
            ttl_seconds: ttl.as_secs().max(1),
        })
    }

    pub async fn ping(&self) -> bool {
        let mut redis = self.redis.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut redis)
            .await
            .is_ok()
    }

    /// Claims `key` for `job_id` as pending (until [`Store::commit_idempotency_key`]); says who
    /// holds it otherwise.
    pub async fn claim_idempotency_key(
        &self,
        tenant: &str,
        model: &str,
        key: &str,
        job_id: &str,
    ) -> redis::RedisResult<Claim> {
        let mut redis = self.redis.clone();
        let k = idempotency_key(tenant, model, key);
        let set: Option<String> = redis::cmd("SET")
            .arg(&k)
            .arg(format!("{PENDING}{job_id}"))
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_seconds)
            .query_async(&mut redis)
            .await?;
        if set.is_some() {
            return Ok(Claim::New);
        }
        let held: Option<String> = redis.get(&k).await?;
        Ok(match held {
            Some(value) => match value.strip_prefix(PENDING) {
                Some(job_id) => Claim::Pending(job_id.to_string()),
                None => Claim::Committed(value),
            },
            // Expired between the two calls: nobody holds it now.
            None => Claim::New,
        })
    }

    /// Marks the key's job published (its publish was confirmed).
    pub async fn commit_idempotency_key(
        &self,
        tenant: &str,
        model: &str,
        key: &str,
        job_id: &str,
    ) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        redis
            .set_ex(
                idempotency_key(tenant, model, key),
                job_id,
                self.ttl_seconds,
            )
            .await
    }

    /// Releases a key claimed for a job that could not be published.
    pub async fn release_idempotency_key(&self, tenant: &str, model: &str, key: &str) {
        let mut redis = self.redis.clone();
        let _: redis::RedisResult<()> = redis.del(idempotency_key(tenant, model, key)).await;
    }

    /// Counts `job_id` among `tenant`'s outstanding jobs of `model` unless that makes more than
    /// `cap`: true when admitted. One sorted set per tenant and model, scored by submit time;
    /// members older than the result TTL are dropped first (a job whose result never came, e.g.
    /// its dispatcher and result both lost, stops counting then). Added, then counted, in one
    /// transaction, so replicas admitting at once can only refuse too many, never let in too
    /// many.
    pub async fn admit(
        &self,
        tenant: &str,
        model: &str,
        job_id: &str,
        cap: u32,
    ) -> redis::RedisResult<bool> {
        let mut redis = self.redis.clone();
        let key = outstanding_key(tenant, model);
        let now = ember_core::amqp::unix_ms();
        let stale = now.saturating_sub(self.ttl_seconds * 1000);
        let (count,): (u64,) = redis::pipe()
            .atomic()
            .cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(stale)
            .ignore()
            .zadd(&key, job_id, now)
            .ignore()
            .zcard(&key)
            .expire(&key, self.ttl_seconds as i64)
            .ignore()
            .query_async(&mut redis)
            .await?;
        if count > u64::from(cap) {
            self.release(tenant, model, job_id).await;
            return Ok(false);
        }
        Ok(true)
    }

    /// No longer counts `job_id` among its tenant's outstanding jobs (answered, or not
    /// published).
    pub async fn release(&self, tenant: &str, model: &str, job_id: &str) {
        let mut redis = self.redis.clone();
        let _: redis::RedisResult<()> = redis.zrem(outstanding_key(tenant, model), job_id).await;
    }

    pub async fn put_job(&self, record: &JobRecord) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        let body = serde_json::to_string(record).unwrap_or_default();
        redis
            .set_ex(job_key(&record.job_id), body, self.ttl_seconds)
            .await
    }

    /// Stores a result unless one is already there (true when this one was stored), keeps the
    /// job's record as long as the result (it says whose the result is), and returns the record.
    pub async fn put_result(
        &self,
        job_id: &str,
        body: &[u8],
    ) -> redis::RedisResult<(bool, Option<JobRecord>)> {
        let mut redis = self.redis.clone();
        let (set, record): (Option<String>, Option<String>) = redis::pipe()
            .cmd("SET")
            .arg(result_key(job_id))
            .arg(body)
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_seconds)
            .expire(job_key(job_id), self.ttl_seconds as i64)
            .ignore()
            .get(job_key(job_id))
            .query_async(&mut redis)
            .await?;
        let record = record.and_then(|r| serde_json::from_str::<JobRecord>(&r).ok());
        Ok((set.is_some(), record))
    }

    /// Marks a job whose result was dropped before it was stored: its record (if it still has
    /// one, and no result came meanwhile) reads `expired`. Returns the record marked.
    pub async fn mark_expired(&self, job_id: &str) -> redis::RedisResult<Option<JobRecord>> {
        let mut redis = self.redis.clone();
        let (result, record): (bool, Option<String>) = redis::pipe()
            .exists(result_key(job_id))
            .get(job_key(job_id))
            .query_async(&mut redis)
            .await?;
        let Some(mut record) = record.and_then(|r| serde_json::from_str::<JobRecord>(&r).ok())
        else {
            return Ok(None);
        };
        if result {
            return Ok(None);
        }
        record.expired = true;
        let body = serde_json::to_string(&record).unwrap_or_default();
        let _: Option<String> = redis::cmd("SET")
            .arg(job_key(job_id))
            .arg(body)
            .arg("XX")
            .arg("KEEPTTL")
            .query_async(&mut redis)
            .await?;
        Ok(Some(record))
    }

    pub async fn job(&self, job_id: &str) -> redis::RedisResult<Option<Job>> {
        let mut redis = self.redis.clone();
        let (result, record): (Option<Vec<u8>>, Option<String>) = redis::pipe()
            .get(result_key(job_id))
            .get(job_key(job_id))
            .query_async(&mut redis)
            .await?;
        let record = record.and_then(|r| serde_json::from_str::<JobRecord>(&r).ok());
        let owner = record.as_ref().and_then(|r| r.tenant.clone());
        if let Some(result) = result {
            let state = match serde_json::from_slice::<JobResult>(&result) {
                Ok(result) => JobState::Finished(Box::new(result)),
                Err(error) => JobState::Unreadable(error.to_string()),
            };
            return Ok(Some(Job { owner, state }));
        }
        Ok(record.map(|record| Job {
            owner,
            state: if record.cancelled {
                JobState::Cancelled(record)
            } else if record.expired {
                JobState::Expired(record)
            } else {
                JobState::Queued(record)
            },
        }))
    }

    /// Marks a job's callback delivered; false if it already was (a duplicate result).
    pub async fn mark_callback_delivered(&self, job_id: &str) -> redis::RedisResult<bool> {
        let mut redis = self.redis.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(callback_key(job_id))
            .arg("1")
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_seconds)
            .query_async(&mut redis)
            .await?;
        Ok(set.is_some())
    }

    pub async fn callback_delivered(&self, job_id: &str) -> redis::RedisResult<bool> {
        let mut redis = self.redis.clone();
        redis.exists(callback_key(job_id)).await
    }
}
