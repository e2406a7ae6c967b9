//! Command-line flags; each flag overrides the config file key of the same
//! name.

use std::path::PathBuf;

use clap::Parser;

/// Flags of `veo-sidecar`.
#[derive(Debug, Default, Parser)]
#[command(
    name = "veo-sidecar",
    version,
    about = "Usage ledger sidecar of Veo Edge"
)]
pub struct Flags {
    /// TOML config file; the flags below override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to serve gRPC on, as IP:PORT; port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Directory of the SQLite usage store, created when missing.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// File that receives the bound address once the server is serving.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,

    /// Check the configuration, then exit: 0 when valid, 1 with the error.
    #[arg(long)]
    pub validate: bool,
}
