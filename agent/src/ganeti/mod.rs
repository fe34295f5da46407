//! What Ganeti's own KVM driver (`hv_kvm`) leaves on a node, read so the
//! agent can take over the QEMUs it started without stopping them. Pure.

pub mod command_line;
pub mod execution;
pub mod runtime_file;

pub use command_line::{LiveFacts, translate};
pub use runtime_file::GanetiRuntime;

/// Where Ganeti's KVM driver keeps its files.
pub const DEFAULT_DIR: &str = "/var/run/ganeti/kvm-hypervisor";
