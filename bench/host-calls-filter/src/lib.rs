//! A proxy-wasm HTTP filter that makes the host calls the Veo Edge filter makes for a request
//! with a cached token, and does no other work.
//!
//! On the request it reads the clock and the `authorization` header, reads a record of the
//! limiter record's size from shared data and writes it back with its compare-and-swap
//! token, and sets two request headers. On the response it adds two headers. The record's key
//! is picked from the token's last byte, so each customer of the benchmark mostly keeps to one
//! key, as with the filter's slot table. Decisions, token checks and usage counting are left
//! out. `veo-bench` runs it between the empty filter and the Veo Edge filter, so the table
//! shows what the calls cost and what the filter's own work adds.
//!
//! Only the `wasm32` build has code. On other targets the crate is empty, so workspace-wide
//! builds and lints on the host still pass.

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::hostcalls;
    use proxy_wasm::traits::{Context, HttpContext};
    use proxy_wasm::types::{Action, MapType};

    /// Shared-data keys: `veo.hc.0` to `veo.hc.15`.
    const KEYS: [&str; 16] = [
        "veo.hc.0",
        "veo.hc.1",
        "veo.hc.2",
        "veo.hc.3",
        "veo.hc.4",
        "veo.hc.5",
        "veo.hc.6",
        "veo.hc.7",
        "veo.hc.8",
        "veo.hc.9",
        "veo.hc.10",
        "veo.hc.11",
        "veo.hc.12",
        "veo.hc.13",
        "veo.hc.14",
        "veo.hc.15",
    ];

    /// The record written back: 69 bytes, the size of the filter's limiter record for a
    /// benchmark customer (`bench-0007`) with a token bucket and one minute of pending usage.
    const RECORD: [u8; 69] = [1; 69];

    /// Per-request context.
    struct HostCalls;

    impl Context for HostCalls {}

    impl HttpContext for HostCalls {
        fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
            let _ = hostcalls::get_current_time();
            let token =
                hostcalls::get_map_value_bytes(MapType::HttpRequestHeaders, "authorization")
                    .ok()
                    .flatten()
                    .unwrap_or_default();
            let index = token
                .last()
                .map_or(0, |byte| usize::from(*byte) % KEYS.len());
            let key = KEYS[index];
            let cas = hostcalls::get_shared_data(key)
                .ok()
                .and_then(|(_, cas)| cas);
            let _ = hostcalls::set_shared_data(key, Some(&RECORD), cas);
            let _ = hostcalls::set_map_value_bytes(
                MapType::HttpRequestHeaders,
                "x-veo-customer",
                Some(b"bench-0007"),
            );
            let _ = hostcalls::set_map_value_bytes(
                MapType::HttpRequestHeaders,
                "x-veo-tier",
                Some(b"enterprise"),
            );
            Action::Continue
        }

        fn on_http_response_headers(
            &mut self,
            _num_headers: usize,
            _end_of_stream: bool,
        ) -> Action {
            let _ = hostcalls::add_map_value(
                MapType::HttpResponseHeaders,
                "ratelimit-policy",
                "\"enterprise\";q=1000000;w=1",
            );
            let _ = hostcalls::add_map_value(
                MapType::HttpResponseHeaders,
                "ratelimit",
                "\"enterprise\";r=999999;t=0",
            );
            Action::Continue
        }
    }

    proxy_wasm::main! {{
        proxy_wasm::set_http_context(|_, _| Box::new(HostCalls));
    }}
}
