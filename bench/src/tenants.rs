//! `ember-bench tenants`: fair share under load (issue 18). Two tenants of one dispatcher share a
//! saturated SSD worker: `small` sends photos at a steady rate, `big` at `ratio` times that rate,
//! both open loop over HTTP (`POST /v1/models/{m}/jobs?wait=`), every answer classified. Phases,
//! in one run on one fleet: `small` alone (its unloaded latency); both, `big` with no share; both,
//! `big` held to `max_outstanding` = each of `--shares` (the tenants file rewritten between
//! phases: the dispatcher reloads it). The figure of merit: `small`'s p95 under load over its
//! unloaded p95.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::fleet::{self, Proc};
use crate::stats::{across, summarise};

#[derive(Debug, Clone, clap::Args)]
pub struct TenantsArgs {
    /// `small`'s offered load, jobs/s.
    #[arg(long, default_value_t = 5.0)]
    pub small_rate: f64,
    /// `big`'s offered load as a multiple of `small`'s.
    #[arg(long, default_value_t = 10.0)]
    pub ratio: f64,
    /// Length of each phase.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// `big`'s `max_outstanding` in the shared phases (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "2,4")]
    pub shares: Vec<u32>,
}

/// What one tenant's requests of a phase came to.
#[derive(Debug, Default)]
struct Outcomes {
    /// Latency of each job answered `done`, seconds.
    done: Vec<f64>,
    /// Every request by outcome: done, failed, still queued when the wait ended, refusals by
    /// code, transport errors.
    counts: BTreeMap<String, u64>,
}

fn tenants_file(path: &Path, big_share: Option<u32>) -> anyhow::Result<()> {
    let share = big_share
        .map(|s| format!("max_outstanding = {s}\n"))
        .unwrap_or_default();
    let text = format!(
        "[tenants.small]\ntoken_sha256 = [\"{}\"]\nmodels = [\"*\"]\n\n[tenants.big]\ntoken_sha256 = [\"{}\"]\nmodels = [\"*\"]\n{share}",
        SMALL_SHA256, BIG_SHA256
    );
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// `printf %s small | sha256sum`, and of `big`: the tenants' tokens are their names.
const SMALL_SHA256: &str = "81db8ebbbbc69c6c6ad4a6aa92b76e0c08af547da236b9e2c9dbe1d8285a8130";
const BIG_SHA256: &str = "2a21fe6d592a19b7de898b50eb53c429608de1a66f3e9f62da19714a770553d1";

/// Sends `rate` jobs/s as `token` for `duration`, open loop; classifies every answer.
async fn send(
    http: reqwest::Client,
    url: String,
    token: &'static str,
    image: Arc<Vec<u8>>,
    rate: f64,
    duration: Duration,
) -> Outcomes {
    let outcomes = Arc::new(Mutex::new(Outcomes::default()));
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    while started.elapsed() < duration {
        ticker.tick().await;
        let request = http
            .post(&url)
            .bearer_auth(token)
            .header("content-type", "image/png")
            .body(image.as_ref().clone());
        let outcomes = outcomes.clone();
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let outcome = match request.send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.unwrap_or(Value::Null);
                    match (status, body["status"].as_str()) {
                        (200, Some("done")) => "done".to_string(),
                        (202, _) => "queued_at_wait_end".to_string(),
                        (429, _) => format!(
                            "refused_{}",
                            body["error"]["code"].as_str().unwrap_or("429")
                        ),
                        (_, Some(status)) => status.to_string(),
                        (status, None) => format!("http_{status}"),
                    }
                }
                Err(_) => "transport_error".to_string(),
            };
            let mut outcomes = outcomes.lock().unwrap_or_else(|e| e.into_inner());
            if outcome == "done" {
                outcomes.done.push(sent.elapsed().as_secs_f64());
            }
            *outcomes.counts.entry(outcome).or_default() += 1;
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    Arc::try_unwrap(outcomes)
        .map(|m| m.into_inner().unwrap_or_else(|e| e.into_inner()))
        .unwrap_or_default()
}

fn report(name: &str, outcomes: &Outcomes) -> Value {
    let s = summarise(&outcomes.done);
    println!(
        "  {name}: {:?}; done p50 {:.0} ms, p95 {:.0} ms",
        outcomes.counts,
        s.p50 * 1e3,
        s.p95 * 1e3
    );
    json!({"outcomes": outcomes.counts, "done_latency_s": s})
}

/// One phase: `small` at its rate, and `big` at `ratio` times it when `with_big`.
async fn phase(
    api: u16,
    model: &str,
    image: &Arc<Vec<u8>>,
    args: &TenantsArgs,
    with_big: bool,
) -> (Outcomes, Option<Outcomes>) {
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{api}/v1/models/{model}/jobs?wait=60s");
    let small = tokio::spawn(send(
        http.clone(),
        url.clone(),
        "small",
        image.clone(),
        args.small_rate,
        args.duration,
    ));
    let big = with_big.then(|| {
        tokio::spawn(send(
            http,
            url,
            "big",
            image.clone(),
            args.small_rate * args.ratio,
            args.duration,
        ))
    });
    let small = small.await.unwrap_or_default();
    let big = match big {
        Some(big) => Some(big.await.unwrap_or_default()),
        None => None,
    };
    (small, big)
}

/// Waits until the model's queue holds nothing (ready or unacked), then a moment more.
async fn drain(model: &str) -> anyhow::Result<()> {
    let connection =
        lapin::Connection::connect(crate::client::URL, lapin::ConnectionProperties::default())
            .await?;
    let channel = connection.create_channel().await?;
    let queue = ember_core::topology::jobs_queue(model);
    let started = Instant::now();
    loop {
        // Ready messages; the in-flight ones finish within a batch.
        if fleet::ready_messages(&channel, &queue).await? == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the queue of {model} did not drain"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(())
}

pub async fn run(out: &Path, rounds: usize, args: &TenantsArgs) -> anyhow::Result<()> {
    let image = Arc::new(std::fs::read(
        fleet::root().join("tests/samples/astronaut.png"),
    )?);
    let dir = fleet::root().join("models/ssdlite-person");
    let mut phases: Vec<(String, Option<Option<u32>>)> = vec![
        ("small_alone".into(), None),
        ("big_unlimited".into(), Some(None)),
    ];
    for share in &args.shares {
        phases.push((format!("big_share_{share}"), Some(Some(*share))));
    }
    let mut doc = json!({
        "small_rate_jobs_s": args.small_rate,
        "big_rate_jobs_s": args.small_rate * args.ratio,
        "phase_s": args.duration.as_secs_f64(),
        "model": "ssdlite-person, tests/samples/astronaut.png, image/png over HTTP ?wait=60s",
        "counts": "every request by outcome: done (200, answered ok), queued_at_wait_end (202: the wait ended first), refused_<code> (429), failed, http_<status>, transport_error",
        "rounds": [],
    });
    let mut ratios: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        let model = format!(
            "bench-tenants-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let tmp = std::env::temp_dir().join(format!("{model}-tenants.toml"));
        tenants_file(&tmp, None)?;
        let worker = fleet::worker(&model, &dir, &[])?;
        worker.wait_http(worker.admin, "/readyz").await?;
        let (dispatcher, api): (Proc, u16) = fleet::dispatcher_with(
            &model,
            &dir,
            &[
                "--tenants-file",
                tmp.to_str().unwrap_or_default(),
                "--tenants-reload-interval",
                "200ms",
                // No callbacks in this benchmark; a secret is required with tokens.
                "--callback-secret",
                "whsec_YmVuY2gtdGVuYW50cy1ub3QtYS1zZWNyZXQ=",
            ],
        )?;
        dispatcher.wait_http(api, "/v2/health/ready").await?;
        println!("tenants round {round}");
        let mut unloaded_p95 = f64::NAN;
        let mut round_doc = json!({});
        for (name, big) in &phases {
            if let Some(share) = big {
                tenants_file(&tmp, *share)?;
                // The dispatcher re-reads the file every 200 ms.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let (small, big) = phase(api, &model, &image, args, big.is_some()).await;
            println!(" {name}");
            let p95 = summarise(&small.done).p95;
            if name == "small_alone" {
                unloaded_p95 = p95;
            } else {
                ratios
                    .entry(name.clone())
                    .or_default()
                    .push(p95 / unloaded_p95);
            }
            round_doc[name] = json!({
                "small": report("small", &small),
                "big": big.as_ref().map(|b| report("big", b)),
                "small_p95_over_unloaded_p95": p95 / unloaded_p95,
            });
            // Jobs whose wait ended are still queued: let the queue drain before the next
            // phase.
            drain(&model).await?;
        }
        if let Some(rounds) = doc["rounds"].as_array_mut() {
            rounds.push(round_doc);
        }
        drop(dispatcher);
        drop(worker);
        let _ = std::fs::remove_file(&tmp);
    }
    doc["small_p95_over_unloaded_p95"] = json!(
        ratios
            .into_iter()
            .map(|(phase, r)| (phase, across(r)))
            .collect::<BTreeMap<_, _>>()
    );
    println!(
        "small's p95 over its unloaded p95, median of rounds: {}",
        doc["small_p95_over_unloaded_p95"]
    );
    crate::save(&out.to_path_buf(), "tenants", doc)
}
