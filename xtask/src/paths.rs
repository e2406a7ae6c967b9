//! Locations inside the workspace: the tools folder and the build artifacts,
//! the same ones the end-to-end harness looks for.

use std::path::PathBuf;

pub use veo_tests::artifacts::{
    built_filter_wasm as filter_wasm, bundled_envoy, envoy_tools_dir, release_binary,
    workspace_root,
};

/// Returns the cargo that runs this task, so nested builds use the same
/// toolchain.
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}
