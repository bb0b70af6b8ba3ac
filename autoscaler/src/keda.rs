//! KEDA's external scaler protocol (`externalscaler.ExternalScaler`) served from the
//! autoscaler's own decisions, so that a `ScaledObject` of type `external-push` (or `external`)
//! scales a worker Deployment with Ember's judgement while KEDA and the HPA do the patching.
//!
//! One metric per model, `ember-<model>-replicas`: its value is the replica count the
//! autoscaler decided (the `replicas` of its "scaling decision" log line and of
//! `ember_autoscaler_desired_replicas`) and its target is 1. KEDA hands external metrics to the
//! HPA as `AverageValue` targets, for which the HPA's desired count is
//! `ceil(value / target)`: the decided count itself. Active means a decision above zero, which
//! counts in-flight work as well as ready jobs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ember_grpc::externalscaler::external_scaler_server::{ExternalScaler, ExternalScalerServer};
use ember_grpc::externalscaler::{
    GetMetricSpecResponse, GetMetricsRequest, GetMetricsResponse, IsActiveResponse, MetricSpec,
    MetricValue, ScaledObjectRef,
};
use futures_util::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::codegen::tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::policy::Decision;

/// The `scalerMetadata` key that names the model.
pub const MODEL_KEY: &str = "model";

/// The HPA target of every Ember metric: one replica's worth.
pub const TARGET: f64 = 1.0;

/// The metric a model's answers are under.
pub fn metric_name(model: &str) -> String {
    format!("ember-{model}-replicas")
}

/// A decision as KEDA is told it: the metric's value and whether the model is active.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Answer {
    /// Replicas decided: the metric's value, against a target of [`TARGET`].
    pub value: f64,
    /// Whether any replica is wanted (KEDA scales from and to zero on this).
    pub active: bool,
}

impl Answer {
    pub fn of(decision: &Decision) -> Self {
        Self {
            value: f64::from(decision.replicas),
            active: decision.replicas > 0,
        }
    }
}

/// A model's latest decision and when it was made.
#[derive(Debug, Clone, Copy)]
struct Posted {
    answer: Answer,
    at: Instant,
}

/// The decisions the control loop posts and the gRPC service reads: per model, the latest one
/// (a `watch`, so that `StreamIsActive` hears of changes). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Board {
    models: Arc<RwLock<HashMap<String, watch::Sender<Option<Posted>>>>>,
    /// A decision older than this is not answered with (the loop has lost the broker): KEDA is
    /// told UNAVAILABLE and the HPA keeps the replicas it has.
    stale_after: Duration,
}

impl Board {
    pub fn new(stale_after: Duration) -> Self {
        Self {
            models: Arc::default(),
            stale_after,
        }
    }

    /// Makes `model` known before its first decision (asked about, it is not yet decided rather
    /// than unknown).
    pub fn expect(&self, model: &str) {
        self.sender(model);
    }

    /// Posts `model`'s decision of this tick.
    pub fn post(&self, model: &str, decision: &Decision) {
        let posted = Posted {
            answer: Answer::of(decision),
            at: Instant::now(),
        };
        self.sender(model).send_replace(Some(posted));
    }

    fn sender(&self, model: &str) -> watch::Sender<Option<Posted>> {
        if let Some(sender) = self.read().get(model) {
            return sender.clone();
        }
        let mut models = self.models.write().unwrap_or_else(|e| e.into_inner());
        models
            .entry(model.to_string())
            .or_insert_with(|| watch::channel(None).0)
            .clone()
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<String, watch::Sender<Option<Posted>>>> {
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    fn subscribe(&self, model: &str) -> Result<watch::Receiver<Option<Posted>>, Status> {
        self.read()
            .get(model)
            .map(watch::Sender::subscribe)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "model {model:?} is not one this autoscaler decides for (--signal-model, or an InferencePool this replica leads)"
                ))
            })
    }

    /// `model`'s current answer, or why there is none.
    pub fn answer(&self, model: &str) -> Result<Answer, Status> {
        let posted = *self.subscribe(model)?.borrow();
        fresh(model, posted, Instant::now(), self.stale_after)
    }
}

/// The answer in `posted` if there is one and it is no older than `stale_after` at `now`.
fn fresh(
    model: &str,
    posted: Option<Posted>,
    now: Instant,
    stale_after: Duration,
) -> Result<Answer, Status> {
    match posted {
        None => Err(Status::unavailable(format!(
            "no decision for model {model:?} yet (the autoscaler decides every tick once connected to the broker)"
        ))),
        Some(posted) if now.saturating_duration_since(posted.at) > stale_after => {
            Err(Status::unavailable(format!(
                "the last decision for model {model:?} is {:.0?} old (over {stale_after:?}): the autoscaler has lost the broker",
                now.saturating_duration_since(posted.at)
            )))
        }
        Some(posted) => Ok(posted.answer),
    }
}

/// The model a `ScaledObjectRef` names in its metadata.
fn model_of(scaled_object: Option<&ScaledObjectRef>) -> Result<&str, Status> {
    let scaled_object = scaled_object
        .ok_or_else(|| Status::invalid_argument("no scaledObjectRef in the request"))?;
    match scaled_object.scaler_metadata.get(MODEL_KEY) {
        Some(model) if !model.trim().is_empty() => Ok(model.trim()),
        _ => Err(Status::invalid_argument(format!(
            "ScaledObject {}/{}: the trigger's metadata names no model (metadata: {{{MODEL_KEY}: <model>}})",
            scaled_object.namespace, scaled_object.name
        ))),
    }
}

/// The gRPC service over a [`Board`].
#[derive(Debug, Clone)]
pub struct Scaler {
    board: Board,
    shutdown: CancellationToken,
}

type ActiveStream = Pin<Box<dyn Stream<Item = Result<IsActiveResponse, Status>> + Send>>;
type SpecStream = Pin<Box<dyn Stream<Item = Result<GetMetricSpecResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalScaler for Scaler {
    async fn is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<IsActiveResponse>, Status> {
        let model = model_of(Some(request.get_ref()))?;
        let answer = self.board.answer(model)?;
        Ok(Response::new(IsActiveResponse {
            result: answer.active,
        }))
    }

    type StreamIsActiveStream = ActiveStream;

    /// The current activity as soon as there is a decision, then each change of it; ends when
    /// the autoscaler shuts down.
    async fn stream_is_active(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<ActiveStream>, Status> {
        let model = model_of(Some(request.get_ref()))?;
        let receiver = self.board.subscribe(model)?;
        let state = (receiver, None::<bool>, self.shutdown.clone());
        let stream =
            futures_util::stream::unfold(state, |(mut receiver, last, shutdown)| async move {
                loop {
                    let active = receiver.borrow_and_update().map(|p| p.answer.active);
                    if let Some(active) = active
                        && Some(active) != last
                    {
                        let item = Ok(IsActiveResponse { result: active });
                        return Some((item, (receiver, Some(active), shutdown)));
                    }
                    tokio::select! {
                        changed = receiver.changed() => changed.ok()?,
                        () = shutdown.cancelled() => return None,
                    }
                }
            });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metric_spec(
        &self,
        request: Request<ScaledObjectRef>,
    ) -> Result<Response<GetMetricSpecResponse>, Status> {
        let model = model_of(Some(request.get_ref()))?;
        self.board.subscribe(model)?;
        Ok(Response::new(GetMetricSpecResponse {
            metric_specs: vec![MetricSpec {
                metric_name: metric_name(model),
                target_size: TARGET as i64,
                target_size_float: TARGET,
            }],
        }))
    }

    async fn get_metrics(
        &self,
        request: Request<GetMetricsRequest>,
    ) -> Result<Response<GetMetricsResponse>, Status> {
        let request = request.get_ref();
        let model = model_of(request.scaled_object_ref.as_ref())?;
        let name = metric_name(model);
        if !request.metric_name.is_empty() && request.metric_name != name {
            return Err(Status::not_found(format!(
                "metric {:?}: model {model:?} has one metric, {name:?}",
                request.metric_name
            )));
        }
        let answer = self.board.answer(model)?;
        Ok(Response::new(GetMetricsResponse {
            metric_values: vec![MetricValue {
                metric_name: name,
                metric_value: answer.value as i64,
                metric_value_float: answer.value,
            }],
        }))
    }

    type StreamMetricSpecStream = SpecStream;

    /// The spec never changes (the target is always 1): KEDA falls back to `GetMetricSpec`.
    async fn stream_metric_spec(
        &self,
        _request: Request<ScaledObjectRef>,
    ) -> Result<Response<SpecStream>, Status> {
        Err(Status::unimplemented(
            "the metric spec is constant; use GetMetricSpec",
        ))
    }
}

/// The external scaler, serving until `shutdown`.
#[derive(Debug)]
pub struct Server {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Binds `addr` (an error here is a configuration error: the port is taken) and serves
    /// `board` on it until `shutdown`.
    pub async fn start(
        addr: SocketAddr,
        board: Board,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "serving KEDA's external scaler protocol");
        let scaler = Scaler {
            board,
            shutdown: shutdown.clone(),
        };
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(ExternalScalerServer::new(scaler))
                .serve_with_incoming_shutdown(
                    TcpListenerStream::new(listener),
                    shutdown.cancelled_owned(),
                )
                .await;
            if let Err(error) = served {
                tracing::warn!(%error, "the KEDA external scaler stopped");
            }
        });
        Ok(Self { addr, task })
    }

    /// Waits (briefly) for the server to finish once shutdown is signalled.
    pub async fn stop(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::Reason;

    fn decision(replicas: u32, recommended: u32, reasons: &[Reason]) -> Decision {
        Decision {
            replicas,
            recommended,
            reasons: reasons.to_vec(),
        }
    }

    /// What the HPA does with an `AverageValue` target (what KEDA makes of an external
    /// metric): `ceil(value / target)`, whatever the current count.
    fn hpa_desired(answer: Answer) -> u32 {
        (answer.value / TARGET).ceil() as u32
    }

    #[test]
    fn the_answer_is_the_decided_replica_count_not_the_raw_recommendation() {
        // (decision, value, active)
        let cases = [
            (decision(0, 0, &[Reason::IdleToZero]), 0.0, false),
            (decision(0, 0, &[Reason::Steady]), 0.0, false),
            (decision(1, 1, &[Reason::Wake]), 1.0, true),
            // Stabilising: the formula says 1, Ember keeps 3 for the window.
            (decision(3, 1, &[Reason::Stabilising]), 3.0, true),
            // Idle but not for long enough: one stays warm.
            (decision(1, 0, &[Reason::Stabilising]), 1.0, true),
            (decision(4, 9, &[Reason::Demand, Reason::AtMax]), 4.0, true),
            (decision(2, 0, &[Reason::AtMin]), 2.0, true),
            (decision(5, 5, &[Reason::GpuHot]), 5.0, true),
        ];
        for (decision, value, active) in cases {
            let answer = Answer::of(&decision);
            assert_eq!(answer, Answer { value, active }, "{decision:?}");
            assert_eq!(hpa_desired(answer), decision.replicas, "{decision:?}");
        }
    }

    #[test]
    fn a_missing_stale_or_unknown_decision_is_not_answered() {
        let now = Instant::now();
        let stale_after = Duration::from_secs(5);
        let posted = |age: u64, replicas: u32| {
            Some(Posted {
                answer: Answer::of(&decision(replicas, replicas, &[])),
                at: now - Duration::from_secs(age),
            })
        };
        assert_eq!(
            fresh("m", posted(5, 2), now, stale_after).unwrap().value,
            2.0
        );
        let old = fresh("m", posted(6, 2), now, stale_after).unwrap_err();
        assert_eq!(old.code(), tonic::Code::Unavailable);
        assert!(
            old.message().contains("lost the broker"),
            "{}",
            old.message()
        );
        let none = fresh("m", None, now, stale_after).unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unavailable);

        let board = Board::new(stale_after);
        assert_eq!(board.answer("m").unwrap_err().code(), tonic::Code::NotFound);
        board.expect("m");
        assert_eq!(
            board.answer("m").unwrap_err().code(),
            tonic::Code::Unavailable
        );
        board.post("m", &decision(3, 1, &[Reason::Stabilising]));
        assert_eq!(
            board.answer("m").unwrap(),
            Answer {
                value: 3.0,
                active: true
            }
        );
    }

    #[test]
    fn the_model_comes_from_the_scaled_objects_metadata() {
        let scaled = |metadata: &[(&str, &str)]| ScaledObjectRef {
            name: "pool".into(),
            namespace: "ember".into(),
            scaler_metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert_eq!(
            model_of(Some(&scaled(&[("model", "iris")]))).unwrap(),
            "iris"
        );
        for bad in [
            scaled(&[]),
            scaled(&[("model", " ")]),
            scaled(&[("modle", "iris")]),
        ] {
            let error = model_of(Some(&bad)).unwrap_err();
            assert_eq!(error.code(), tonic::Code::InvalidArgument);
            assert!(
                error.message().contains("ember/pool"),
                "{}",
                error.message()
            );
        }
        assert_eq!(
            model_of(None).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
