//! A proxy-wasm HTTP filter that does nothing.
//!
//! Every callback keeps the SDK's default, which returns `Continue` without a host call, and
//! the root context is the SDK's own empty one. `veo-bench` loads this module with the same
//! runtime settings as the Veo Edge filter, so the gap between Envoy without a filter and
//! Envoy with this one is the cost of the wasm runtime alone.
//!
//! Only the `wasm32` build has code. On other targets the crate is empty, so workspace-wide
//! builds and lints on the host still pass.

#[cfg(target_arch = "wasm32")]
mod filter {
    use proxy_wasm::traits::{Context, HttpContext};

    /// Per-request context whose methods all keep their defaults.
    struct EmptyFilter;

    impl Context for EmptyFilter {}
    impl HttpContext for EmptyFilter {}

    proxy_wasm::main! {{
        proxy_wasm::set_http_context(|_, _| Box::new(EmptyFilter));
    }}
}
