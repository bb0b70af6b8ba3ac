//! `ember-offline`: the worker's model path on files, no broker (see `ember_worker::offline`).

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ember_worker::offline::OfflineConfig::parse();
    let telemetry = ember_core::telemetry::init(&config.log, "ember-offline")
        .map_err(|e| anyhow::anyhow!(e))?;
    let out = config.out.clone();
    let report = ember_worker::offline::run(config).await;
    telemetry.shutdown();
    let report = report?;
    ember_worker::offline::print(&report);
    if let Some(path) = out {
        ember_worker::offline::save(&report, &path)?;
    }
    Ok(())
}
