use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = ember_worker::Config::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.runtime_threads > 0 {
        runtime.worker_threads(config.runtime_threads);
    }
    runtime.enable_all().build()?.block_on(serve(config))
}

async fn serve(config: ember_worker::Config) -> anyhow::Result<()> {
    let telemetry =
        ember_core::telemetry::init(&config.log, "ember-worker").map_err(|e| anyhow::anyhow!(e))?;
    if config.check {
        // Load, validate against the graph, warm up once, print the verdict, exit.
        let checked = ember_worker::check(&config).await;
        telemetry.shutdown();
        match checked {
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
    let outcome = ember_worker::run(config, shutdown).await;
    telemetry.shutdown();
    Ok(outcome?)
}
