//! Echo upstream: an HTTP/1.1 server inside the test process that responds to
//! every request with 200 and the request it received as JSON, so tests can
//! check what reached the upstream behind Envoy.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::HarnessError;

/// A running echo upstream; dropping it stops accepting connections.
#[derive(Debug)]
pub struct EchoUpstream {
    address: SocketAddr,
    requests: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl EchoUpstream {
    /// Starts the upstream on a free loopback port.
    pub async fn start() -> Result<Self, HarnessError> {
        let io_error = |source| HarnessError::Io {
            action: "bind the echo upstream to",
            path: "127.0.0.1:0".into(),
            source,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.map_err(io_error)?;
        let address = listener.local_addr().map_err(io_error)?;
        let requests = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        echo(request)
                    });
                    // A client that resets its connection ends only that connection.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self {
            address,
            requests,
            task,
        })
    }

    /// Returns the address the upstream listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Returns the number of requests the upstream has responded to so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Responds with `{"method", "path", "headers": {name: [values]}}`.
async fn echo(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in request.headers() {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let body = serde_json::json!({
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "headers": headers,
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
