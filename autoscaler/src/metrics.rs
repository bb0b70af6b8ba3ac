//! The autoscaler's metrics: per model, the signals it saw and the decisions it made.

use ember_core::telemetry::register;
use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

#[derive(Debug, Clone)]
pub struct Metrics {
    pub desired: IntGaugeVec,
    pub ready: IntGaugeVec,
    pub starting: IntGaugeVec,
    pub backlog: IntGaugeVec,
    pub queue_ready: IntGaugeVec,
    pub arrival_rate: GaugeVec,
    pub service_rate: GaugeVec,
    pub busy_ratio: GaugeVec,
    pub gpu_utilisation: GaugeVec,
    pub model_load_seconds: GaugeVec,
    pub decisions: IntCounterVec,
}

impl Metrics {
    /// Counts one decision in `ember_autoscaler_decisions_total`: its direction from the last
    /// decided count (`None`: the first), its reason the first of the decision's.
    pub fn count_decision(
        &self,
        model: &str,
        last: Option<u32>,
        decision: &crate::policy::Decision,
    ) {
        let direction = match last {
            Some(last) if decision.replicas > last => "up",
            Some(last) if decision.replicas < last => "down",
            None if decision.replicas > 0 => "up",
            _ => "hold",
        };
        let reason = decision
            .reasons
            .first()
            .map(|r| r.as_str())
            .unwrap_or("steady");
        self.decisions
            .with_label_values(&[model, direction, reason])
            .inc();
    }

    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let int = |name: &str, help: &str| IntGaugeVec::new(Opts::new(name, help), &["model"]);
        let float = |name: &str, help: &str| GaugeVec::new(Opts::new(name, help), &["model"]);
        Ok(Self {
            desired: register(
                registry,
                int("ember_autoscaler_desired_replicas", "Replicas decided")?,
            )?,
            ready: register(
                registry,
                int("ember_autoscaler_ready_replicas", "Replicas serving")?,
            )?,
            starting: register(
                registry,
                int(
                    "ember_autoscaler_starting_replicas",
                    "Replicas loading the model",
                )?,
            )?,
            backlog: register(
                registry,
                int("ember_autoscaler_backlog_jobs", "Ready plus in-flight jobs")?,
            )?,
            queue_ready: register(
                registry,
                int(
                    "ember_autoscaler_queue_ready_jobs",
                    "Ready jobs in the queue",
                )?,
            )?,
            arrival_rate: register(
                registry,
                float("ember_autoscaler_arrival_rate", "Jobs arriving per second")?,
            )?,
            service_rate: register(
                registry,
                float(
                    "ember_autoscaler_service_rate_per_replica",
                    "Jobs per second one saturated replica serves (measured)",
                )?,
            )?,
            busy_ratio: register(
                registry,
                float(
                    "ember_autoscaler_busy_ratio",
                    "Mean fraction of time replicas spend in inference",
                )?,
            )?,
            gpu_utilisation: register(
                registry,
                float(
                    "ember_autoscaler_gpu_utilization_ratio",
                    "Mean GPU utilisation of replicas",
                )?,
            )?,
            model_load_seconds: register(
                registry,
                float(
                    "ember_autoscaler_model_load_seconds",
                    "Measured model load time of replicas",
                )?,
            )?,
            decisions: register(
                registry,
                IntCounterVec::new(
                    Opts::new(
                        "ember_autoscaler_decisions_total",
                        "Scaling decisions by direction and reason",
                    ),
                    &["model", "direction", "reason"],
                )?,
            )?,
        })
    }
}
