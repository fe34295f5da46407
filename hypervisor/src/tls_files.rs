//! The TLS files a display (VNC or SPICE) hands QEMU: which of the node's
//! files, under which names QEMU looks for them. Pure; `host_files`
//! copies them.

use std::path::PathBuf;

/// A TLS file for QEMU: where it is, the name QEMU looks for, and whether
/// it must be there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFile<'a> {
    /// The node's file.
    pub source: PathBuf,
    /// Its name in the copy.
    pub name: &'a str,
    /// Whether a missing file is an error.
    pub required: bool,
}
