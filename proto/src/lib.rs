//! Generated protobuf types and tonic service stubs for the `kvmagent.v1` API.
//!
//! The source of truth is `proto/kvmagent/v1/agent.proto`; nothing here is
//! written by hand apart from this re-export.
#![allow(missing_docs)]

/// The `kvmagent.v1` package.
pub mod v1 {
    tonic::include_proto!("kvmagent.v1");

    /// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/kvmagent_descriptor.bin"));
}
