//! Heartbeats: every interval, what the worker is doing (state, jobs in flight and done, busy
//! time, device, GPU readings, the model as the graph declares it) on `ember.telemetry`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use ember_core::amqp::unix_ms;
use ember_core::protocol::{self, Heartbeat, WorkerState};
use ember_core::topology;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use tokio_util::sync::CancellationToken;

use super::Context;

/// Counters shared with heartbeats.
#[derive(Debug, Default)]
pub struct Stats {
    pub in_flight: AtomicU64,
    /// Jobs accepted and still being prepared (not yet handed to the batcher).
    pub preparing: AtomicU64,
    pub completed: AtomicU64,
    pub busy_nanos: AtomicU64,
    state: AtomicU8,
    /// Redelivered jobs being moved to the retry lane right now.
    pub moving: AtomicU64,
}

impl Stats {
    pub fn set_state(&self, state: WorkerState) {
        let v = match state {
            WorkerState::Starting => 0,
            WorkerState::Ready => 1,
            WorkerState::Draining => 2,
        };
        self.state.store(v, Ordering::Relaxed);
    }
    fn state(&self) -> WorkerState {
        match self.state.load(Ordering::Relaxed) {
            1 => WorkerState::Ready,
            2 => WorkerState::Draining,
            _ => WorkerState::Starting,
        }
    }
}

fn heartbeat(ctx: &Context) -> Heartbeat {
    let gpu = ctx.gpu.as_ref().and_then(crate::gpu::Latest::get);
    Heartbeat {
        worker: ctx.worker_id.clone(),
        model: ctx.model.clone(),
        state: ctx.stats.state(),
        in_flight: ctx.stats.in_flight.load(Ordering::Relaxed),
        completed: ctx.stats.completed.load(Ordering::Relaxed),
        busy_seconds: ctx.stats.busy_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        model_load_seconds: ctx.model_load_seconds,
        at_ms: unix_ms(),
        device: Some(ctx.device.clone()),
        device_fallback: ctx.device_fallback,
        gpu,
        model_info: Some(ctx.model_info.clone()),
    }
}

pub async fn publish_heartbeat(ctx: &Context, channel: &Channel) {
    let Ok(body) = serde_json::to_vec(&heartbeat(ctx)) else {
        return;
    };
    let routing_key = format!("{}.{}", ctx.model, ctx.worker_id);
    let published = channel
        .basic_publish(
            topology::TELEMETRY_EXCHANGE.into(),
            routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default()
                .with_content_type(protocol::content_type::JSON.into())
                .with_expiration("10000".into()),
        )
        .await;
    if let Err(error) = published {
        tracing::debug!(%error, "heartbeat not published");
    }
}

pub async fn heartbeat_loop(ctx: Arc<Context>, channel: Channel, done: CancellationToken) {
    let mut ticker = tokio::time::interval(ctx.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            _ = ticker.tick() => publish_heartbeat(&ctx, &channel).await,
        }
    }
}
