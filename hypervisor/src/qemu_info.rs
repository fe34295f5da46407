//! What a QEMU binary is: its version, machine types and what it takes.
//! Data only; the `probe` module finds it out by running the binary (its
//! first launch adds the QMP commands), and a runtime, its command line
//! and QMP's greeting use it without I/O.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

/// The commands a QEMU offers, as `query-commands` lists them. One binary
/// lists the same whatever its machine and options.
pub type CommandSet = HashSet<String>;

/// A QEMU version triple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// One line of `-machine help`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineType {
    /// Name, e.g. `pc-i440fx-7.2` or `pc`.
    pub name: String,
    /// For an alias such as `pc`, the versioned type it stands for.
    pub alias_of: Option<String>,
}

/// Facts about one QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuInfo {
    /// The binary as resolved.
    pub binary: PathBuf,
    /// Its version.
    pub version: QemuVersion,
    /// The first line of `-version`.
    pub version_text: String,
    /// Every machine type.
    pub machines: Vec<MachineType>,
    /// Whether it was built with seccomp and takes the `-sandbox` options
    /// runtimes give it (`argv::SANDBOX`).
    pub sandbox: bool,
    /// Where it looks for firmware and option ROMs (`-L help`), as it
    /// prints them, with its own firmware directory first.
    pub data_dirs: Vec<PathBuf>,
    /// The data directory of the binary's own installation, where QEMU
    /// wouldn't look by itself (one unpacked beside the system's): given
    /// with `-L` at every launch, so it never runs on another version's
    /// option ROMs.
    pub firmware_dir: Option<PathBuf>,
    /// The loadable modules (SPICE, OpenGL) of that installation, given
    /// as `QEMU_MODULE_DIR`: QEMU refuses modules of another build.
    pub module_dir: Option<PathBuf>,
    /// The device drivers it offers (`-device help`), by name and alias;
    /// `None` where they weren't asked.
    pub devices: Option<BTreeSet<String>>,
    /// Its QMP commands, as the first QEMU launched from it listed them:
    /// later launches skip asking, on the way to a ready monitor.
    pub qmp_commands: OnceLock<Arc<CommandSet>>,
}

impl QemuInfo {
    /// Resolves a machine type or alias to its versioned name, so a guest's
    /// ABI stays fixed across QEMU upgrades and migrations.
    pub fn resolve_machine(&self, requested: &str) -> Option<String> {
        let m = self.machines.iter().find(|m| m.name == requested)?;
        Some(m.alias_of.clone().unwrap_or_else(|| m.name.clone()))
    }

    /// Whether it offers the versioned machine type `machine_type`.
    pub fn offers_machine(&self, machine_type: &str) -> bool {
        self.machines
            .iter()
            .any(|m| m.name == machine_type && m.alias_of.is_none())
    }
}
