use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ember_dispatcher::Config::parse();
    let telemetry = ember_core::telemetry::init(&config.log, "ember-dispatcher")
        .map_err(|e| anyhow::anyhow!(e))?;
    let shutdown = ember_core::shutdown::on_signal();
    let outcome = ember_dispatcher::run(config, shutdown).await;
    telemetry.shutdown();
    Ok(outcome?)
}
