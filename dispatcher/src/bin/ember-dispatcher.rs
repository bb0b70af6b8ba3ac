use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ember_dispatcher::Config::parse();
    ember_core::telemetry::init(&config.log).map_err(|e| anyhow::anyhow!(e))?;
    let shutdown = ember_core::shutdown::on_signal();
    ember_dispatcher::run(config, shutdown).await?;
    Ok(())
}
