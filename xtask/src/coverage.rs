//! Line coverage of the erasure, identity, audit and key modules, measured
//! with cargo-llvm-cov over their unit tests and printed per file.
//! A single line that no unit test runs fails the task.
//!
//! llvm counts a closure's lines in both the closure and the enclosing
//! function. A line that ends a closure and also contains a `?` of the
//! enclosing function counts as not run when that `?` never fails, though
//! `--show-missing-lines` does not list it. Named functions in place of
//! such closures keep the count exact.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

use crate::error::XtaskError;
use crate::{paths, run};

/// Version of cargo-llvm-cov installed into `.tools/cargo`.
const LLVM_COV_VERSION: &str = "0.9.1";

/// Source files whose every line the unit tests must run, relative to
/// `sidecar/src/`. A folder covers every file in it.
const MEASURED: [&str; 6] = [
    "erasure.rs",
    "erasure/",
    "identity.rs",
    "audit.rs",
    "audit/",
    "keys/",
];

/// Installs cargo-llvm-cov when missing, runs the sidecar's unit tests
/// under it and prints the line coverage of the measured files.
pub fn run() -> Result<(), XtaskError> {
    let llvm_cov = ensure_llvm_cov()?;
    let root = paths::workspace_root();
    let mut command = Command::new(paths::cargo());
    command
        .current_dir(&root)
        .env("CARGO_LLVM_COV", &llvm_cov)
        .arg("llvm-cov")
        .args([
            "--package",
            "veo-sidecar",
            "--lib",
            "--json",
            "--summary-only",
        ])
        .args(["--", "audit", "erasure", "identity", "keys"])
        .env(
            "PATH",
            prepend_path(llvm_cov.parent().unwrap_or(&root).to_path_buf()),
        );
    println!("xtask: running {}", run::describe(&command));
    let output = run::output(&mut command)?;
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        return Err(XtaskError::CommandFailed {
            command: run::describe(&command),
            status: output.status,
            hint: "the failing unit tests are listed above".into(),
        });
    }
    let report: Value = serde_json::from_slice(&output.stdout).map_err(|err| {
        XtaskError::Tool(format!(
            "cargo llvm-cov printed a report that is not JSON ({err}); check its version"
        ))
    })?;
    let rows = measured_rows(&report, &root.join("sidecar/src"));
    if rows.is_empty() {
        return Err(XtaskError::Tool(
            "the coverage report names none of the measured files; check MEASURED in \
             xtask/src/coverage.rs"
                .into(),
        ));
    }
    println!(
        "\nline coverage of the erasure, identity, audit and key modules (cargo llvm-cov, unit tests):"
    );
    let (mut covered, mut count) = (0, 0);
    for (file, file_covered, file_count) in &rows {
        println!(
            "  {file:<32} {file_covered:>5}/{file_count:<5} {:>7.2}%",
            percent(*file_covered, *file_count)
        );
        covered += file_covered;
        count += file_count;
    }
    println!(
        "  {:<32} {covered:>5}/{count:<5} {:>7.2}%\n",
        "total",
        percent(covered, count)
    );
    if covered < count {
        return Err(XtaskError::Tool(format!(
            "{} of {count} lines of the erasure, identity, audit and key modules are not run by \
             any unit test; run `cargo llvm-cov --package veo-sidecar --lib \
             --show-missing-lines -- audit erasure identity keys` and cover them",
            count - covered
        )));
    }
    Ok(())
}

fn percent(covered: u64, count: u64) -> f64 {
    if count == 0 {
        100.0
    } else {
        covered as f64 * 100.0 / count as f64
    }
}

/// Returns (file, covered lines, lines) of every measured file in the
/// report, sorted by file.
fn measured_rows(report: &Value, source_root: &std::path::Path) -> Vec<(String, u64, u64)> {
    let files = report["data"][0]["files"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut rows: Vec<(String, u64, u64)> = files
        .iter()
        .filter_map(|file| {
            let name = PathBuf::from(file["filename"].as_str()?);
            let relative = name
                .strip_prefix(source_root)
                .ok()?
                .to_string_lossy()
                .into_owned();
            let measured = MEASURED.iter().any(|entry| {
                if entry.ends_with('/') {
                    relative.starts_with(entry)
                } else {
                    relative == *entry
                }
            });
            if !measured {
                return None;
            }
            let lines = &file["summary"]["lines"];
            Some((
                relative,
                lines["covered"].as_u64()?,
                lines["count"].as_u64()?,
            ))
        })
        .collect();
    rows.sort();
    rows
}

/// Returns `dir` followed by the current `PATH`.
fn prepend_path(dir: PathBuf) -> std::ffi::OsString {
    let mut dirs = vec![dir];
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

/// Returns the cargo-llvm-cov binary, installing it into `.tools/cargo`
/// from the package registry when missing.
fn ensure_llvm_cov() -> Result<PathBuf, XtaskError> {
    let root = paths::workspace_root().join(".tools/cargo");
    let bin = root.join("bin/cargo-llvm-cov");
    if bin.exists() {
        return Ok(bin);
    }
    run::status(
        Command::new(paths::cargo())
            .args(["install", "cargo-llvm-cov", "--locked", "--version"])
            .arg(LLVM_COV_VERSION)
            .arg("--root")
            .arg(&root),
        "cargo-llvm-cov could not be installed; check access to the crates.io registry",
    )?;
    Ok(bin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_measured_files_are_reported() {
        let root = std::path::Path::new("/w/sidecar/src");
        let file = |name: &str, covered: u64, count: u64| {
            serde_json::json!({
                "filename": format!("/w/sidecar/src/{name}"),
                "summary": {"lines": {"covered": covered, "count": count}}
            })
        };
        let report = serde_json::json!({"data": [{"files": [
            file("erasure.rs", 10, 10),
            file("audit/chain.rs", 4, 5),
            file("store.rs", 1, 9),
            file("erasure_extra.rs", 1, 1),
        ]}]});

        let rows = measured_rows(&report, root);

        assert_eq!(
            rows,
            [
                ("audit/chain.rs".to_owned(), 4, 5),
                ("erasure.rs".to_owned(), 10, 10)
            ]
        );
        assert!((percent(4, 5) - 80.0).abs() < 1e-9);
        assert!((percent(0, 0) - 100.0).abs() < 1e-9);
    }
}
