//! Process shutdown: the first SIGTERM or SIGINT cancels a token that long work watches; a
//! second one exits at once (the broker requeues whatever was unacked).

use tokio_util::sync::CancellationToken;

/// Exit status used when a second signal cuts the drain short.
pub const FORCED_EXIT_CODE: i32 = 130;

/// A token cancelled by the first SIGTERM/SIGINT. Must be called inside a tokio runtime.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        if wait_for_signal().await.is_err() {
            tracing::error!("cannot install signal handlers; shutdown only by the process ending");
            return;
        }
        tracing::info!("shutdown signal received; draining (send another to exit now)");
        trigger.cancel();
        if wait_for_signal().await.is_ok() {
            tracing::warn!("second shutdown signal; exiting now");
            std::process::exit(FORCED_EXIT_CODE);
        }
    });
    token
}

async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
