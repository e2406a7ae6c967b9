//! The demo's upstream service: a loopback HTTP/1.1 server that responds to
//! every request with 200 and the customer and tier the filter set.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::error::XtaskError;

/// A running upstream; dropping it stops accepting connections.
pub struct Upstream {
    /// Address the server listens on.
    pub address: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the upstream on a free loopback port.
pub async fn start() -> Result<Upstream, XtaskError> {
    let io_error = |source| XtaskError::Io {
        action: "bind the upstream service to",
        path: "127.0.0.1:0".into(),
        source,
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(io_error)?;
    let address = listener.local_addr().map_err(io_error)?;
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(answer);
                // A client that resets its connection ends only that connection.
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Upstream { address, task })
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let body = serde_json::json!({
        "customer": header("x-veo-customer"),
        "tier": header("x-veo-tier"),
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
