//! QEMU knowledge for kvm-agent: turns an instance spec into a runtime and a
//! runtime into a running QEMU, and speaks QMP to it.
//!
//! The pure core is [`spec`] (validation), [`disk`] (disks, their buses
//! and the SCSI controller), [`extra`] (the extra QEMU options a node
//! allows), [`vnc`] (how VNC lets viewers in: TLS and a password),
//! [`spice`] (the SPICE display: TLS, compression, its agent's channel),
//! [`tls_files`] (the TLS files a display hands QEMU), [`runtime`] (spec → runtime,
//! with [`runtime::argv`] rendering it as a command line, re-exported as
//! [`argv`]), [`media`] (CD-ROM and floppy drives), [`pcie`] (where a
//! device sits on PCI: the root bus, or a q35's root ports), [`peripherals`]
//! (display adapter, USB input devices, sound card), [`pinning`] (vCPU masks, parsed and checked), [`qemu_info`]
//! (what a QEMU binary is) and [`identity`] (the user a confined QEMU runs
//! as, and its access to `/dev/kvm`, decided purely). The I/O shell around it is [`probe`]
//! (runs the binary to fill in a [`qemu_info::QemuInfo`]), [`tap`],
//! [`process`] (pidfile, liveness, pidfd), [`spawn`] (QEMU started
//! confined, without a fork), [`qmp`], [`lifecycle`]
//! (launch and stop), [`affinity`] (pinning applied to QEMU's vCPU
//! threads), [`balloon`] (the guest's memory target), [`migration`]
//! (QEMU's side of migration, save and restore), [`guest_agent`] (the
//! QEMU guest agent inside a guest), [`cgroup`] and
//! [`host_files`] (disks, boot and RAM files, opened for QEMU).
//! Nothing here knows about gRPC or about how records are stored.
#![deny(missing_docs)]

pub mod affinity;
pub mod balloon;
pub mod bridge_vlan;
pub mod cgroup;
pub mod disk;
pub mod extra;
pub mod guest_agent;
pub mod host_files;
pub mod identity;
pub mod lifecycle;
pub mod media;
pub mod migration;
pub mod pcie;
pub mod peripherals;
pub mod pinning;
pub mod probe;
pub mod process;
pub mod qemu_info;
pub mod qmp;
pub mod runtime;
pub mod spawn;
pub mod spec;
pub mod spice;
pub mod tap;
pub mod tls_files;
pub mod vnc;

pub use runtime::Runtime;
pub use runtime::argv;
pub use spec::InstanceSpec;

/// Settings of the fuzzing properties: `default` cases, or as many as
/// `KVM_AGENT_FUZZ_CASES` asks for in a longer run.
#[cfg(test)]
pub(crate) fn fuzz_config(default: u32) -> proptest::test_runner::Config {
    let cases = std::env::var("KVM_AGENT_FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(default);
    proptest::test_runner::Config::with_cases(cases)
}
