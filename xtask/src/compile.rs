//! Release builds of the wasm filters and the native binaries.

use std::process::Command;

use crate::error::XtaskError;
use crate::{paths, run, tools};

/// Native binaries that the demo, the tests and the benchmark start.
pub const BINARIES: [(&str, &str); 3] = [
    ("veo-sidecar", "veo-sidecar"),
    ("veo-bench", "veo-replay"),
    ("veo-bench", "veo-bench"),
];

/// Builds the filter and the benchmark's empty filter for `wasm32-wasip1`
/// and every binary in [`BINARIES`], all in release mode, after adding the
/// wasm target if it is missing.
pub fn build_all() -> Result<(), XtaskError> {
    tools::ensure_wasm_target()?;
    let root = paths::workspace_root();
    run::status(
        Command::new(paths::cargo())
            .args([
                "build",
                "--release",
                // Fat LTO in one codegen unit: the module is small, so the
                // link is quick, and the filter runs on every request.
                "--config",
                "profile.release.lto=true",
                "--config",
                "profile.release.codegen-units=1",
                "-p",
                "veo-filter",
                "-p",
                "veo-noop-filter",
                "-p",
                "veo-host-calls-filter",
                "--target",
                "wasm32-wasip1",
            ])
            .current_dir(&root),
        "fix the filter's build errors above, then retry",
    )?;

    let mut native = Command::new(paths::cargo());
    native.args(["build", "--release"]).current_dir(&root);
    for (package, binary) in BINARIES {
        native.args(["-p", package, "--bin", binary]);
    }
    run::status(&mut native, "fix the build errors above, then retry")?;

    let wasm = paths::filter_wasm();
    if !wasm.is_file() {
        return Err(XtaskError::Tool(format!(
            "the filter built, but {} is missing; check that veo-filter is a cdylib named \
             veo_filter",
            wasm.display()
        )));
    }
    Ok(())
}
