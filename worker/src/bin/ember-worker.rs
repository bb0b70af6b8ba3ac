use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = ember_worker::Config::parse();
    ember_core::telemetry::init(&config.log).map_err(|e| anyhow::anyhow!(e))?;
    if config.check {
        // Load, validate against the graph, warm up once, print the verdict, exit.
        match ember_worker::check(&config).await {
            Ok(verdict) => println!("{verdict:#}"),
            Err(error) => {
                println!(
                    "{:#}",
                    serde_json::json!({"verdict": "error", "error": error.to_string()})
                );
                std::process::exit(1);
            }
        }
        return Ok(());
    }
    let shutdown = ember_core::shutdown::on_signal();
    ember_worker::run(config, shutdown).await?;
    Ok(())
}
