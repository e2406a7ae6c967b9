//! Runs external programs to completion and turns failures into errors with
//! a next step.

use std::ffi::OsStr;
use std::process::{Command, Output};

use crate::error::XtaskError;

/// Runs `command` with inherited output and fails unless it exits with 0.
///
/// `hint` is the next step that the error suggests.
pub fn status(command: &mut Command, hint: &str) -> Result<(), XtaskError> {
    println!("xtask: running {}", describe(command));
    let status = command
        .status()
        .map_err(|source| spawn_error(command, source))?;
    if status.success() {
        Ok(())
    } else {
        Err(XtaskError::CommandFailed {
            command: describe(command),
            status,
            hint: hint.to_owned(),
        })
    }
}

/// Runs `command` with captured output and returns it whatever the exit status.
pub fn output(command: &mut Command) -> Result<Output, XtaskError> {
    command
        .output()
        .map_err(|source| spawn_error(command, source))
}

/// Formats a command line the way a shell user would type it.
pub fn describe(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(
        command
            .get_args()
            .map(|arg| arg.to_string_lossy().into_owned()),
    );
    words.join(" ")
}

fn spawn_error(command: &Command, source: std::io::Error) -> XtaskError {
    let program = command.get_program();
    XtaskError::Spawn {
        program: program.to_string_lossy().into_owned(),
        hint: install_hint(program).to_owned(),
        source,
    }
}

/// Suggests how to get a program that could not be started.
fn install_hint(program: &OsStr) -> &'static str {
    match program.to_str() {
        Some("rustup") => "install rustup from your distribution or rust-lang.org, then retry",
        Some("python3") => "install python3 with pip (apt-get install -y python3-pip), then retry",
        Some("apt-get") => {
            "this task installs packages with apt-get on Debian; install them by hand"
        }
        _ => "check that the program exists and is executable",
    }
}
