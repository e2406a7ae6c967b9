//! The HTTP context: hands each callback of one stream to the core
//! [`Stream`].

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host::ProxyHost;
use crate::filter::{Filter, Stream};

/// One request.
pub struct Http {
    stream: Stream,
}

impl Http {
    /// Creates the context for one request.
    pub fn new(filter: Rc<Filter>) -> Self {
        Self {
            stream: Stream::new(filter),
        }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if self.stream.on_request_headers(&ProxyHost) {
            Action::Continue
        } else {
            Action::Pause
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.stream.on_response_headers(&ProxyHost);
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, _end_of_stream: bool) -> Action {
        // Continuing without buffering makes `body_size` the size of this
        // chunk alone.
        self.stream.on_response_body(body_size);
        Action::Continue
    }

    fn on_log(&mut self) {
        self.stream.on_log(&ProxyHost);
    }
}
