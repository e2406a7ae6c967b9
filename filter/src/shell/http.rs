//! The HTTP context: hands each request's headers to the core filter and
//! adds the rate-limit fields to the response of an admitted request.

use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::Action;

use super::host::ProxyHost;
use crate::filter::{Filter, RequestOutcome, ResponseFields};

/// One request.
pub struct Http {
    filter: Rc<Filter>,
    response: Option<ResponseFields>,
}

impl Http {
    /// Creates the context for one request.
    pub fn new(filter: Rc<Filter>) -> Self {
        Self {
            filter,
            response: None,
        }
    }
}

impl Context for Http {}

impl HttpContext for Http {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        match self.filter.on_request_headers(&ProxyHost) {
            RequestOutcome::Replied => Action::Pause,
            RequestOutcome::Forward(fields) => {
                self.response = fields;
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // Local replies already carry their headers; `response` is set
        // only for admitted requests.
        if let Some(fields) = self.response.take() {
            self.filter.on_response_headers(&ProxyHost, &fields);
        }
        Action::Continue
    }
}
