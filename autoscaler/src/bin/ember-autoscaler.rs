use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ember_autoscaler::Config::parse();
    if config.print_crd {
        print!("{}", ember_autoscaler::kubernetes::crd_yaml());
        return Ok(());
    }
    let telemetry = ember_core::telemetry::init(&config.log, "ember-autoscaler")
        .map_err(|e| anyhow::anyhow!(e))?;
    let shutdown = ember_core::shutdown::on_signal();
    let outcome = ember_autoscaler::run(config, shutdown).await;
    telemetry.shutdown();
    Ok(outcome?)
}
