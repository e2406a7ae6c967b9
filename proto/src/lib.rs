//! Protobuf messages of Veo Edge's APIs, and with the `grpc` feature the
//! tonic clients and servers.
//!
//! `sync` is the filter-to-sidecar usage sync; `usage` is the public usage
//! query API; `admin` contains operator actions such as billing
//! reconciliation.

#![allow(missing_docs)]

/// Filter-to-sidecar usage sync, package `veo.sync.v1`.
pub mod sync {
    include!(concat!(env!("OUT_DIR"), "/veo.sync.v1.rs"));
}

/// Limits of one `UsageRecord` that the sidecar accepts, which the filter
/// keeps to when it merges records.
pub mod sync_limits {
    /// Maximum admitted or refused requests in one record. One Envoy
    /// instance cannot decide 2^32 requests for one customer within a
    /// minute.
    pub const MAX_REQUESTS_PER_RECORD: u64 = 4_294_967_295;
    /// Maximum response body bytes in one record: 2^50 bytes (1 PiB), far
    /// more than one Envoy instance sends one customer within a minute.
    pub const MAX_EGRESS_BYTES_PER_RECORD: u64 = 1 << 50;
}

/// Usage queries over the sidecar's ledger, package `veo.usage.v1`.
pub mod usage {
    include!(concat!(env!("OUT_DIR"), "/veo.usage.v1.rs"));
}

/// Operator actions on the sidecar, package `veo.admin.v1`.
pub mod admin {
    include!(concat!(env!("OUT_DIR"), "/veo.admin.v1.rs"));
}

/// Encoded `FileDescriptorSet` of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/veo_descriptor.bin"));
