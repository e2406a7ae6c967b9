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
