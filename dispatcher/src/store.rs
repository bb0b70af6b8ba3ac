//! The shared job store, in Redis, so that every dispatcher replica answers for every job:
//! job records, results (first one wins: a redelivered job's second result is not visible),
//! idempotency keys and delivered-callback marks, each with a TTL.

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
}

/// What `GET /v1/jobs/{id}` reports.
#[derive(Debug, Clone)]
pub enum JobState {
    Queued(JobRecord),
    Cancelled(JobRecord),
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
fn idempotency_key(model: &str, key: &str) -> String {
    format!("ember:idem:{model}:{key}")
}
fn callback_key(id: &str) -> String {
    format!("ember:callback-done:{id}")
}

impl Store {
    pub async fn connect(url: &str, ttl: Duration) -> redis::RedisResult<Self> {
        let client = redis::Client::open(url)?;
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
        model: &str,
        key: &str,
        job_id: &str,
    ) -> redis::RedisResult<Claim> {
        let mut redis = self.redis.clone();
        let k = idempotency_key(model, key);
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
        model: &str,
        key: &str,
        job_id: &str,
    ) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        redis
            .set_ex(idempotency_key(model, key), job_id, self.ttl_seconds)
            .await
    }

    /// Releases a key claimed for a job that could not be published.
    pub async fn release_idempotency_key(&self, model: &str, key: &str) {
        let mut redis = self.redis.clone();
        let _: redis::RedisResult<()> = redis.del(idempotency_key(model, key)).await;
    }

    pub async fn put_job(&self, record: &JobRecord) -> redis::RedisResult<()> {
        let mut redis = self.redis.clone();
        let body = serde_json::to_string(record).unwrap_or_default();
        redis
            .set_ex(job_key(&record.job_id), body, self.ttl_seconds)
            .await
    }

    /// Stores a result unless one is already there; true when this one was stored.
    pub async fn put_result(&self, job_id: &str, body: &[u8]) -> redis::RedisResult<bool> {
        let mut redis = self.redis.clone();
        let set: Option<String> = redis::cmd("SET")
            .arg(result_key(job_id))
            .arg(body)
            .arg("NX")
            .arg("EX")
            .arg(self.ttl_seconds)
            .query_async(&mut redis)
            .await?;
        Ok(set.is_some())
    }

    pub async fn job(&self, job_id: &str) -> redis::RedisResult<Option<JobState>> {
        let mut redis = self.redis.clone();
        let (result, record): (Option<Vec<u8>>, Option<String>) = redis::pipe()
            .get(result_key(job_id))
            .get(job_key(job_id))
            .query_async(&mut redis)
            .await?;
        if let Some(result) = result {
            return Ok(Some(match serde_json::from_slice::<JobResult>(&result) {
                Ok(result) => JobState::Finished(Box::new(result)),
                Err(error) => JobState::Unreadable(error.to_string()),
            }));
        }
        Ok(record
            .and_then(|r| serde_json::from_str::<JobRecord>(&r).ok())
            .map(|record| {
                if record.cancelled {
                    JobState::Cancelled(record)
                } else {
                    JobState::Queued(record)
                }
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
