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

    /// Share counters with other sidecars through the Redis server at this
    /// URL, such as redis://127.0.0.1:6379/; sets `counters.backend` to
    /// "redis".
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,

    /// Check the configuration, then exit: 0 when valid, 1 with the error.
    #[arg(long)]
    pub validate: bool,
}
