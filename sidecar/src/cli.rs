//! Command-line flags; each flag overrides the config file key of the same
//! name.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Flags of `veo-sidecar`.
#[derive(Debug, Default, Parser)]
#[command(
    name = "veo-sidecar",
    version,
    about = "Usage ledger sidecar of Veo Edge"
)]
pub struct Flags {
    /// Operator command against a running sidecar; without one, the sidecar
    /// runs.
    #[command(subcommand)]
    pub command: Option<Command>,

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

    /// Address to serve HTTP on (Stripe webhooks at /stripe/webhook,
    /// Prometheus metrics at /metrics), as IP:PORT; port 0 picks a free
    /// port.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<String>,

    /// File that receives the bound HTTP address once it is serving.
    #[arg(long, value_name = "FILE")]
    pub http_ready_file: Option<PathBuf>,

    /// Stripe secret key; without one, meter events go to the outbox file
    /// in the data directory instead of Stripe.
    #[arg(
        long,
        env = "STRIPE_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub stripe_api_key: Option<String>,

    /// Base URL of the Stripe API, such as http://127.0.0.1:12111/ for a
    /// local Stripe mock; Stripe's own by default.
    #[arg(
        long,
        env = "STRIPE_API_BASE",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub stripe_api_base: Option<String>,

    /// Stripe webhook signing secrets (whsec_...), comma-separated; give
    /// two while rotating. Overrides `billing.webhook_secrets`.
    #[arg(
        long,
        env = "STRIPE_WEBHOOK_SECRET",
        hide_env_values = true,
        value_name = "SECRETS"
    )]
    pub stripe_webhook_secret: Option<String>,

    /// Check the configuration, then exit: 0 when valid, 1 with the error.
    #[arg(long)]
    pub validate: bool,
}

/// Default gRPC address of the sidecar that commands connect to.
pub const DEFAULT_SIDECAR_URL: &str = "http://127.0.0.1:50051";

/// Operator commands, sent to a running sidecar over its admin gRPC service.
#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Compares the ledger, the events sent and Stripe's meter event
    /// summaries per customer and meter, and prints the drift.
    Reconcile {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Start of the range, in seconds since the Unix epoch (a multiple
        /// of 60); 24 hours before the end by default.
        #[arg(long, value_name = "UNIX_S")]
        start: Option<i64>,
        /// End of the range, exclusive, in seconds since the Unix epoch (a
        /// multiple of 60); the start of the minute ten minutes ago by
        /// default. Usage of the last minutes may still wait in the queue.
        #[arg(long, value_name = "UNIX_S")]
        end: Option<i64>,
        /// Send corrective meter events for usage Stripe is missing.
        #[arg(long)]
        correct: bool,
    },
    /// Sets the Stripe customer (cus_...) that a customer's usage is billed
    /// to.
    SetStripeCustomer {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Customer id, as in the token's customer claim.
        customer: String,
        /// Stripe customer id.
        stripe_customer_id: String,
    },
    /// Prints the Stripe customer a customer's usage is billed to, and the
    /// tier billing gave it.
    StripeCustomer {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Customer id, as in the token's customer claim.
        customer: String,
    },
    /// Prints one customer's admitted and refused requests and response
    /// bytes per bucket, with the totals.
    Usage {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Time range of the query.
        #[command(flatten)]
        range: RangeArgs,
        /// Bucket size: minute, hour or day.
        #[arg(long, default_value = "hour", value_parser = ["minute", "hour", "day"])]
        granularity: String,
        /// Customer id, as in the token's customer claim.
        customer: String,
    },
    /// Prints the customers with the most admitted requests in a range.
    TopCustomers {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Time range of the query.
        #[command(flatten)]
        range: RangeArgs,
        /// Customers listed at most; 0 means 10, and above 1000 means 1000.
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
    /// Lists meter events that Stripe rejected for good, with the reason.
    ParkedEvents {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Maximum number of events listed.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Sets the regions an asset may be requested from and the region that
    /// stores it; every Envoy applies it within one sync interval.
    SetAssetRegions {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Author of the change, recorded in the audit log; `cli:$USER` by
        /// default.
        #[arg(long)]
        actor: Option<String>,
        /// Asset id, as taken from the request path.
        asset: String,
        /// Regions every tier may request the asset from, comma-separated.
        #[arg(long, value_delimiter = ',', value_name = "REGION,...")]
        allow: Vec<String>,
        /// Regions open to one tier only, as TIER=REGION,REGION; repeat
        /// for several tiers.
        #[arg(long = "tier", value_name = "TIER=REGION,...")]
        tiers: Vec<String>,
        /// Region whose storage contains the asset.
        #[arg(long, value_name = "REGION", default_value = "")]
        storage: String,
    },
    /// Prints the registered regions of one asset, or of every asset.
    AssetRegions {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Asset id; every asset when absent.
        asset: Option<String>,
    },
    /// Removes an asset from the registry; its configured rule applies
    /// again.
    DeleteAssetRegions {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Author of the change, recorded in the audit log.
        #[arg(long)]
        actor: Option<String>,
        /// Asset id.
        asset: String,
    },
    /// Erases a customer's personal data and prints the receipt. Running it
    /// again prints the same erasure.
    EraseCustomer {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Author of the erasure request, recorded in the audit log.
        #[arg(long)]
        actor: Option<String>,
        /// Customer id, as in the token's customer claim.
        customer: String,
    },
    /// Prints the progress of an erasure.
    Erasure {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Erasure id, as printed by erase-customer.
        erasure_id: String,
    },
    /// Writes a new random key for sealing erasure notices in Redis
    /// (`counters.notice_key_file`), with mode 0600.
    NewNoticeKey {
        /// File to write; it must not exist yet.
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
    /// Adds a key-encryption key, re-wraps every data key with it and
    /// retires the old keys. It also replaces the index key and renames
    /// every row under it, so that the rows of erased customers in a backup
    /// can no longer be linked to them. Runs on a stopped sidecar's data
    /// directory. Only the encrypted customer and Stripe customer ids are
    /// encrypted again, under new data keys.
    RotateKeys {
        /// Data directory of the stopped sidecar.
        #[arg(long, value_name = "DIR")]
        data_dir: std::path::PathBuf,
        /// Key file; `DATA_DIR/keys.json` by default, as `privacy.key_file`.
        #[arg(long, value_name = "FILE")]
        key_file: Option<std::path::PathBuf>,
        /// Keep the old keys in the file instead of retiring them.
        #[arg(long)]
        keep_old: bool,
        /// Keep the index key, so rows keep their pseudonyms and rows in a
        /// backup stay linkable to customer ids.
        #[arg(long)]
        keep_index_key: bool,
    },
    /// Hands the erasures waiting to be passed on to a peer sidecar that is
    /// gone for good to its successor (`--to`), or drops them, and records
    /// it in the audit log. Runs on a stopped sidecar's data directory.
    DropErasurePeer {
        /// Data directory of the stopped sidecar.
        #[arg(long, value_name = "DIR")]
        data_dir: std::path::PathBuf,
        /// Key file; `DATA_DIR/keys.json` by default, as `privacy.key_file`.
        #[arg(long, value_name = "FILE")]
        key_file: Option<std::path::PathBuf>,
        /// Name recorded in the audit log; `cli:$USER` by default.
        #[arg(long, value_name = "NAME")]
        actor: Option<String>,
        /// Peer sidecar to pass the erasures on to instead, as
        /// `http://HOST:PORT`; list it in `privacy.erasure_peers` too.
        #[arg(long, value_name = "PEER")]
        to: Option<String>,
        /// Address of the peer, as `GetErasure` lists it.
        #[arg(value_name = "PEER")]
        peer: String,
    },
    /// Checks the audit log's hash chain, of a running sidecar or of the
    /// store in a data directory.
    VerifyAuditLog {
        /// gRPC URL of the sidecar.
        #[arg(long, default_value = DEFAULT_SIDECAR_URL, value_name = "URL")]
        sidecar: String,
        /// Check the store file in this data directory instead, without a
        /// running sidecar.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<std::path::PathBuf>,
    },
}

/// A time range of a usage command.
#[derive(Debug, Clone, clap::Args)]
pub struct RangeArgs {
    /// Start of the range, in seconds since the Unix epoch; 24 hours before
    /// the end by default.
    #[arg(long, value_name = "UNIX_S")]
    pub start: Option<i64>,
    /// End of the range, exclusive, in seconds since the Unix epoch; now by
    /// default.
    #[arg(long, value_name = "UNIX_S")]
    pub end: Option<i64>,
}

impl RangeArgs {
    /// Returns the start and end, with the defaults applied at `now_s`.
    pub fn resolve(&self, now_s: i64) -> (i64, i64) {
        let end = self.end.unwrap_or(now_s);
        (self.start.unwrap_or(end - 86_400), end)
    }
}
