//! The `signal` backend: decides for each `--signal-model` like the others (same signals, same
//! policy, same decisions log) and scales nothing. Its decisions are for someone else to carry
//! out: KEDA, through the external scaler of [`crate::keda`]. It needs no Kubernetes API and
//! no Lease; the replicas it counts are the workers heard from.

use std::convert::Infallible;

use crate::backend::{Backend, Context, Observed, Scaled, Target};
use crate::policy::{self, PolicyState, Settings, Signals};
use crate::{Config, Error};

#[derive(Debug)]
pub struct SignalBackend {
    settings: Settings,
    /// Each model and the replicas last decided for it (logged when they change).
    models: Vec<(String, Option<u32>)>,
}

impl SignalBackend {
    pub fn new(config: &Config) -> Result<Self, Error> {
        let mut models: Vec<(String, Option<u32>)> = Vec::new();
        for model in &config.signal_models {
            let model = model.trim();
            if model.is_empty() {
                return Err(Error::Config("--signal-model: an empty model name".into()));
            }
            if !models.iter().any(|(m, _)| m == model) {
                models.push((model.to_string(), None));
            }
        }
        if models.is_empty() {
            return Err(Error::Config(
                "the signal backend needs the models to decide for: --signal-model <name> (repeat or comma-separate)".into(),
            ));
        }
        Ok(Self {
            settings: config.settings(),
            models,
        })
    }

    /// The models it decides for.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.models.iter().map(|(m, _)| m.as_str())
    }
}

impl Backend for SignalBackend {
    /// The model's index in `models`.
    type Spec = usize;
    type Error = Infallible;

    async fn observe(&mut self, _ctx: &Context) -> Vec<Target<usize>> {
        self.models
            .iter()
            .enumerate()
            .map(|(index, (model, _))| Target {
                key: model.clone(),
                model: model.clone(),
                spec: index,
                versions: Vec::new(),
            })
            .collect()
    }

    async fn scale(
        &mut self,
        ctx: &Context,
        target: &Target<usize>,
        observed: &Observed,
        policy: &mut PolicyState,
    ) -> Result<Scaled, Infallible> {
        let view = &observed.view;
        // Whoever scales (KEDA and the HPA) is not asked: the replicas are the workers heard
        // from, serving or loading their model; draining ones are on their way out.
        let signals = Signals {
            ready: observed.ready,
            in_flight: view.in_flight,
            arrival_rate: observed.arrival_rate,
            service_rate_per_replica: view.service_rate,
            replicas_ready: view.ready,
            replicas_starting: view.starting,
            gpu_utilisation: view.gpu_utilisation,
            backlog_growing: observed.backlog_growing,
        };
        let decision = policy::decide(&self.settings, policy, &signals, ctx.started.elapsed());
        let (model, last) = &mut self.models[target.spec];
        let scaled = Scaled { signals, decision };
        if *last != Some(scaled.decision.replicas) {
            report(ctx, model, *last, &scaled, view.service_rate);
        }
        *last = Some(scaled.decision.replicas);
        Ok(scaled)
    }

    async fn stop(&mut self) {}
}

/// Logs a changed decision (the local backend's "scaling decision" line, less the workers it
/// started and stopped) and counts it by direction and first reason.
fn report(ctx: &Context, model: &str, last: Option<u32>, scaled: &Scaled, service: Option<f64>) {
    let Scaled { signals, decision } = scaled;
    tracing::info!(
        model = %model,
        replicas = decision.replicas,
        recommended = decision.recommended,
        reasons = ?decision.reasons.iter().map(|r| r.as_str()).collect::<Vec<_>>(),
        ready_jobs = signals.ready,
        in_flight = signals.in_flight,
        arrival_rate = format!("{:.1}", signals.arrival_rate),
        service_rate = ?service.map(|r| format!("{r:.1}")),
        replicas_ready = signals.replicas_ready,
        replicas_starting = signals.replicas_starting,
        "scaling decision"
    );
    ctx.metrics.count_decision(model, last, decision);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::Backend as Kind;

    #[test]
    fn the_signal_backend_takes_its_models_from_the_flag_and_refuses_none() {
        let config = Config::try_parse_from([
            "ember-autoscaler",
            "--backend",
            "signal",
            "--signal-model",
            "iris,ssdlite-person",
            "--signal-model",
            "iris",
            "--keda-listen",
            "0.0.0.0:9400",
        ])
        .unwrap();
        assert_eq!(config.backend, Kind::Signal);
        assert_eq!(config.keda_listen, Some("0.0.0.0:9400".parse().unwrap()));
        let backend = SignalBackend::new(&config).unwrap();
        assert_eq!(
            backend.models().collect::<Vec<_>>(),
            ["iris", "ssdlite-person"]
        );

        let none = Config::try_parse_from(["ember-autoscaler", "--backend", "signal"]).unwrap();
        let error = SignalBackend::new(&none).unwrap_err().to_string();
        assert!(error.contains("--signal-model"), "{error}");
        let off = Config::try_parse_from(["ember-autoscaler"]).unwrap();
        assert_eq!(off.keda_listen, None, "the KEDA server is off by default");
        assert!(Config::try_parse_from(["ember-autoscaler", "--keda-listen", "nine"]).is_err());
    }
}
