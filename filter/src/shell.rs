//! The proxy-wasm shell: registers the root context and adapts proxy-wasm
//! callbacks to the core. It contains no decision logic.

mod host;
mod http;
mod root;
mod status;

proxy_wasm::main! {{
    proxy_wasm::set_root_context(|_| Box::new(root::Root::default()));
}}
