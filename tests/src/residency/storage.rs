//! Storage site for the residency tests: an HTTP/1.1 server inside the test
//! process that responds to every request with its own name, serves a
//! health endpoint for Envoy's active health check, and can fail or stop on
//! command.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

use crate::HarnessError;

/// Path of the health endpoint that `envoy/residency.yaml` checks.
pub const HEALTH_PATH: &str = "/healthz";

/// Response header that names the site that served a request.
pub const SITE_HEADER: &str = "x-storage-site";

/// A storage site on a loopback port. Dropping it stops the server and
/// closes every open connection.
#[derive(Debug)]
pub struct StorageServer {
    name: String,
    address: SocketAddr,
    state: Arc<SiteState>,
    task: Option<JoinHandle<()>>,
}

/// What the server tasks share with the handle.
#[derive(Debug, Default)]
struct SiteState {
    failing: AtomicBool,
    requests: AtomicU64,
}

impl StorageServer {
    /// Starts the site `name` on a free loopback port.
    pub async fn start(name: &str) -> Result<Self, HarnessError> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let address = listener.local_addr().map_err(|source| HarnessError::Io {
            action: "read the address of the storage site",
            path: name.into(),
            source,
        })?;
        let state = Arc::new(SiteState::default());
        let task = tokio::spawn(serve(listener, name.to_owned(), Arc::clone(&state)));
        Ok(Self {
            name: name.to_owned(),
            address,
            state,
            task: Some(task),
        })
    }

    /// Returns the site's name, which is the body of every data response.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Returns the address the site listens on, also after [`Self::stop`].
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Makes the health endpoint and every data request return 503 while
    /// `failing` is true, as a site whose store is broken does.
    pub fn set_failing(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Returns the data requests received so far, failed ones included and
    /// health checks excluded.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Returns true while the site accepts connections.
    pub fn is_running(&self) -> bool {
        self.task.is_some()
    }

    /// Stops accepting connections and closes the open ones, so that Envoy
    /// gets refused connections, as from a site that went down.
    pub async fn stop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // The listener closes when the aborted task is dropped, which
            // awaiting the handle waits for.
            let _ = task.await;
        }
    }

    /// Starts serving again on the same port after [`Self::stop`], healthy.
    pub async fn restart(&mut self) -> Result<(), HarnessError> {
        if self.task.is_some() {
            return Ok(());
        }
        let listener = bind(self.address).await?;
        self.set_failing(false);
        self.task = Some(tokio::spawn(serve(
            listener,
            self.name.clone(),
            Arc::clone(&self.state),
        )));
        Ok(())
    }
}

impl Drop for StorageServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn bind(address: SocketAddr) -> Result<TcpListener, HarnessError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| HarnessError::Io {
            action: "bind a storage site to",
            path: address.to_string().into(),
            source,
        })
}

/// Accepts connections until the task is aborted. The connections live in
/// a `JoinSet` owned by this task, so aborting it closes them too.
async fn serve(listener: TcpListener, name: String, state: Arc<SiteState>) {
    let mut connections = JoinSet::new();
    while let Ok((stream, _)) = listener.accept().await {
        let name = name.clone();
        let state = Arc::clone(&state);
        connections.spawn(async move {
            let service =
                service_fn(move |request| respond(request, name.clone(), Arc::clone(&state)));
            // A client that resets its connection ends only that connection.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
        // Reap finished connections so the set does not grow without bound.
        while connections.try_join_next().is_some() {}
    }
}

async fn respond(
    request: Request<Incoming>,
    name: String,
    state: Arc<SiteState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let failing = state.failing.load(Ordering::SeqCst);
    let health_check = request.uri().path() == HEALTH_PATH;
    if !health_check {
        state.requests.fetch_add(1, Ordering::SeqCst);
    }

    let (status, body) = match (health_check, failing) {
        (_, true) => (StatusCode::SERVICE_UNAVAILABLE, format!("{name} failing")),
        (true, false) => (StatusCode::OK, "ok".to_owned()),
        (false, false) => (StatusCode::OK, name.clone()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(&name) {
        response.headers_mut().insert(SITE_HEADER, value);
    }
    Ok(response)
}
