//! A callback receiver on 127.0.0.1 that answers by a script (then 200) and records every delivery.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;

use crate::PATIENCE;

/// What a callback receiver does with one request.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// Status with a Retry-After header (seconds).
    RetryAfter(u16, u64),
    /// Never answers.
    Hang,
}

#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: String,
    pub at: Instant,
}

#[derive(Debug, Default)]
struct ReceiverState {
    plan: Vec<Reply>,
    default: Option<Reply>,
    deliveries: Vec<Delivery>,
}

/// A callback receiver on 127.0.0.1 that answers by a script (then 200) and records everything.
#[derive(Debug, Clone)]
pub struct Receiver {
    state: Arc<Mutex<ReceiverState>>,
    pub addr: SocketAddr,
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let reply = {
        let mut state = state.lock().unwrap();
        state.deliveries.push(Delivery {
            headers,
            body,
            at: Instant::now(),
        });
        if state.plan.is_empty() {
            state.default.unwrap_or(Reply::Status(200))
        } else {
            state.plan.remove(0)
        }
    };
    match reply {
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::RetryAfter(code, seconds) => (
            StatusCode::from_u16(code).unwrap(),
            [("retry-after", seconds.to_string())],
        )
            .into_response(),
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::OK.into_response()
        }
    }
}

impl Receiver {
    pub async fn start(plan: Vec<Reply>, default: Option<Reply>) -> Self {
        Self::start_on("127.0.0.1", plan, default).await
    }

    /// On another loopback address (all of 127/8 is loopback on Linux).
    pub async fn start_on(ip: &str, plan: Vec<Reply>, default: Option<Reply>) -> Self {
        let state = Arc::new(Mutex::new(ReceiverState {
            plan,
            default,
            deliveries: Vec::new(),
        }));
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { state, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn set_default(&self, reply: Reply) {
        self.state.lock().unwrap().default = Some(reply);
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.lock().unwrap().deliveries.clone()
    }

    /// Deliveries whose body is the result of `job_id`.
    pub fn for_job(&self, job_id: &str) -> Vec<Delivery> {
        self.deliveries()
            .into_iter()
            .filter(|d| {
                serde_json::from_str::<serde_json::Value>(&d.body)
                    .map(|v| v["job_id"] == job_id)
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Waits until `done(deliveries)` holds.
    pub async fn wait_until(&self, what: &str, done: impl Fn(&[Delivery]) -> bool) {
        let started = Instant::now();
        while !done(&self.deliveries()) {
            assert!(started.elapsed() < PATIENCE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
