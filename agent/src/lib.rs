//! The kvm-agent node agent: wires the hypervisor and the record store to
//! the gRPC API, runs per-instance operations, and provides the command
//! line client.
//!
//! This is the only crate that knows about gRPC.
#![deny(missing_docs)]

pub mod certs;
pub mod cli;
pub mod config;
pub mod convert;
pub mod error;
pub mod events;
pub mod ganeti;
pub mod instances;
pub mod listing;
pub mod model;
pub mod peer;
pub mod server;
pub mod service;
pub mod settings;
pub mod telemetry;
pub mod tls;
