//! What an installed QEMU binary offers: its version and machine types.
//!
//! Parsing is pure; [`probe`] runs the binary. The agent caches the result
//! per binary, because running `qemu -help` style commands on every
//! operation is what makes some drivers slow.

use std::path::{Path, PathBuf};
use std::process::Stdio;

// What a probe finds, so its callers need only this module.
pub use crate::qemu_info::{MachineType, QemuInfo, QemuVersion};

/// Why a QEMU binary couldn't be probed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The binary isn't there.
    #[error(
        "QEMU binary {} not found; install the qemu-system-x86 package or set --qemu-binary",
        .0.display()
    )]
    Missing(PathBuf),
    /// The binary couldn't be run.
    #[error("QEMU binary {} can't be run", binary.display())]
    Exec {
        /// The binary.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// It ran but said something unexpected.
    #[error("QEMU binary {} gave unexpected output for {what}: {detail}", binary.display())]
    Output {
        /// The binary.
        binary: PathBuf,
        /// Which query.
        what: &'static str,
        /// What it printed, shortened.
        detail: String,
    },
}

/// Parses `QEMU emulator version 7.2.22 (Debian ...)`.
pub fn parse_version(text: &str) -> Option<QemuVersion> {
    let line = text.lines().next()?;
    let rest = line.split("version ").nth(1)?;
    let triple = rest.split_whitespace().next()?;
    let mut parts = triple.split('.').map(|p| p.parse::<u32>().ok());
    Some(QemuVersion {
        major: parts.next()??,
        minor: parts.next()??,
        micro: parts.next().unwrap_or(Some(0))?,
    })
}

/// Parses the output of `-machine help`.
pub fn parse_machine_help(text: &str) -> Vec<MachineType> {
    text.lines()
        .skip_while(|l| !l.starts_with("Supported machines"))
        .skip(1)
        .filter_map(|line| {
            let name = line.split_whitespace().next()?;
            let alias_of = line
                .split("(alias of ")
                .nth(1)
                .and_then(|rest| rest.split(')').next())
                .map(str::to_owned);
            Some(MachineType {
                name: name.to_owned(),
                alias_of,
            })
        })
        .collect()
}

/// Finds `binary` on PATH unless it already contains a slash.
pub fn resolve_binary(binary: &Path) -> Result<PathBuf, ProbeError> {
    if binary.components().count() > 1 {
        return if binary.is_file() {
            Ok(binary.to_owned())
        } else {
            Err(ProbeError::Missing(binary.to_owned()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
        .ok_or_else(|| ProbeError::Missing(binary.to_owned()))
}

/// Runs the binary four times (`-version`, `-machine help`, `-L help` and
/// the sandbox check), concurrently.
pub async fn probe(binary: &Path) -> Result<QemuInfo, ProbeError> {
    let binary = resolve_binary(binary)?;
    let (version_out, machine_out, data_dirs_out, sandbox) = tokio::join!(
        run(&binary, &["-version"]),
        run(&binary, &["-machine", "help"]),
        run(&binary, &["-L", "help"]),
        takes_sandbox(&binary)
    );
    let (version_out, machine_out) = (version_out?, machine_out?);
    let version = parse_version(&version_out).ok_or_else(|| ProbeError::Output {
        binary: binary.clone(),
        what: "-version",
        detail: version_out.chars().take(200).collect(),
    })?;
    let machines = parse_machine_help(&machine_out);
    if machines.is_empty() {
        return Err(ProbeError::Output {
            binary,
            what: "-machine help",
            detail: machine_out.chars().take(200).collect(),
        });
    }
    let mut data_dirs = parse_data_dirs(&data_dirs_out?);
    let firmware_dir = own_firmware_dir(&binary, &data_dirs);
    data_dirs.splice(0..0, firmware_dir.clone());
    let module_dir = firmware_dir.as_deref().and_then(own_module_dir);
    // With the modules of its own build: QEMU lists none of another's.
    let env: Vec<(&str, &std::ffi::OsStr)> = module_dir
        .iter()
        .map(|dir| ("QEMU_MODULE_DIR", dir.as_os_str()))
        .collect();
    let devices = parse_device_help(&run_with(&binary, &["-device", "help"], &env).await?);
    Ok(QemuInfo {
        binary,
        version,
        version_text: version_out.lines().next().unwrap_or_default().to_owned(),
        machines,
        sandbox,
        data_dirs,
        firmware_dir,
        module_dir,
        devices: Some(devices),
        qmp_commands: Default::default(),
    })
}

/// The names and aliases of `-device help`'s lines, such as
/// `name "lsi53c895a", bus PCI, alias "lsi"`. Pure.
pub fn parse_device_help(text: &str) -> std::collections::BTreeSet<String> {
    let quoted = |line: &str, key: &str| {
        let rest = line.split(&format!("{key} \"")).nth(1)?;
        Some(rest.split('"').next()?.to_owned())
    };
    text.lines()
        .filter(|l| l.starts_with("name \""))
        .flat_map(|l| [quoted(l, "name"), quoted(l, "alias")])
        .flatten()
        .collect()
}

/// The `share/qemu` of the installation `binary` belongs to
/// (`<prefix>/bin/qemu-system-x86_64`), where QEMU doesn't search it
/// already: a distribution's QEMU looks in its configured directory only,
/// so one unpacked under another prefix would take the system QEMU's
/// option ROMs, of another version and size.
fn own_firmware_dir(binary: &Path, searched: &[PathBuf]) -> Option<PathBuf> {
    let prefix = binary.canonicalize().ok()?.parent()?.parent()?.to_owned();
    let dir = prefix.join("share/qemu");
    let same = |d: &PathBuf| d.canonicalize().is_ok_and(|d| d == dir);
    (dir.is_dir() && !searched.iter().any(same)).then_some(dir)
}

/// The module directory beside an installation's own `share/qemu`: the
/// `lib/<multiarch>/qemu` (as distributions lay it out) or `lib/qemu`
/// that holds shared objects.
fn own_module_dir(firmware_dir: &Path) -> Option<PathBuf> {
    let lib = firmware_dir.parent()?.parent()?.join("lib");
    let multiarch = std::fs::read_dir(&lib)
        .ok()?
        .flatten()
        .map(|entry| entry.path().join("qemu"));
    let holds_modules = |dir: &PathBuf| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "so"))
        })
    };
    multiarch
        .chain(std::iter::once(lib.join("qemu")))
        .find(holds_modules)
}

/// The directories `-L help` lists, one per line. Pure.
pub fn parse_data_dirs(output: &str) -> Vec<PathBuf> {
    output
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with('/'))
        .map(PathBuf::from)
        .collect()
}

/// QEMU parses every option before `-version` exits, so an unknown
/// `-sandbox` (QEMU without seccomp) or sub-option fails this.
async fn takes_sandbox(binary: &Path) -> bool {
    tokio::process::Command::new(binary)
        .args(["-sandbox", crate::runtime::argv::SANDBOX, "-version"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

async fn run(binary: &Path, args: &[&str]) -> Result<String, ProbeError> {
    run_with(binary, args, &[]).await
}

async fn run_with(
    binary: &Path,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<String, ProbeError> {
    let out = tokio::process::Command::new(binary)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| ProbeError::Exec {
            binary: binary.to_owned(),
            source,
        })?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether KVM can be used: `/dev/kvm` opens read-write. The error says why not.
pub fn kvm_usable() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("/dev/kvm can't be opened read-write: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MACHINE_HELP: &str = "Supported machines are:
microvm              microvm (i386)
pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)
pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)
pc-i440fx-7.1        Standard PC (i440FX + PIIX, 1996)
q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)
pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)
none                 empty machine
";

    #[test]
    fn parses_debian_version_line() {
        let v = parse_version(
            "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)\nCopyright",
        );

        assert_eq!(
            v,
            Some(QemuVersion {
                major: 7,
                minor: 2,
                micro: 22
            })
        );
    }

    #[test]
    fn data_dirs_are_the_listed_paths_as_printed() {
        let out = "/usr/bin/../share/qemu\n/usr/bin/../share/seabios\n/usr/bin/../lib/ipxe/qemu\n";
        assert_eq!(
            parse_data_dirs(out),
            vec![
                PathBuf::from("/usr/bin/../share/qemu"),
                PathBuf::from("/usr/bin/../share/seabios"),
                PathBuf::from("/usr/bin/../lib/ipxe/qemu"),
            ]
        );
        assert!(parse_data_dirs("qemu-system-x86_64: -L: bad\n").is_empty());
    }

    #[test]
    fn a_binary_unpacked_under_a_prefix_of_its_own_uses_that_prefixs_firmware() {
        let system = tempfile::tempdir().unwrap();
        let unpacked = tempfile::tempdir().unwrap();
        for root in [&system, &unpacked] {
            std::fs::create_dir_all(root.path().join("usr/bin")).unwrap();
            std::fs::create_dir_all(root.path().join("usr/share/qemu")).unwrap();
            std::fs::write(root.path().join("usr/bin/qemu-system-x86_64"), "").unwrap();
        }
        let searched = [system.path().join("usr/share/qemu")];
        let binary = |root: &tempfile::TempDir| root.path().join("usr/bin/qemu-system-x86_64");

        assert_eq!(own_firmware_dir(&binary(&system), &searched), None);
        let own = unpacked
            .path()
            .canonicalize()
            .unwrap()
            .join("usr/share/qemu");
        assert_eq!(
            own_firmware_dir(&binary(&unpacked), &searched),
            Some(own.clone())
        );
        // A helper's directory is no module directory.
        std::fs::create_dir_all(unpacked.path().join("usr/lib/qemu")).unwrap();
        std::fs::write(unpacked.path().join("usr/lib/qemu/qemu-bridge-helper"), "").unwrap();
        assert_eq!(own_module_dir(&own), None);
        let modules = unpacked.path().join("usr/lib/x86_64-linux-gnu/qemu");
        std::fs::create_dir_all(&modules).unwrap();
        std::fs::write(modules.join("ui-spice-core.so"), "").unwrap();
        assert_eq!(
            own_module_dir(&own),
            Some(
                own.parent()
                    .unwrap()
                    .parent()
                    .unwrap()
                    .join("lib/x86_64-linux-gnu/qemu")
            )
        );
        std::fs::remove_dir(unpacked.path().join("usr/share/qemu")).unwrap();
        assert_eq!(own_firmware_dir(&binary(&unpacked), &searched), None);
    }

    #[test]
    fn device_help_gives_each_drivers_name_and_alias() {
        let help = "Controller/Bridge/Hub devices:\nname \"pcie-root-port\", bus PCI, desc \"PCI Express Root Port\"\n\nStorage devices:\nname \"lsi53c895a\", bus PCI, alias \"lsi\"\nname \"scsi-hd\", bus SCSI, desc \"virtual SCSI disk\"\n";
        let devices: Vec<String> = parse_device_help(help).into_iter().collect();
        assert_eq!(devices, ["lsi", "lsi53c895a", "pcie-root-port", "scsi-hd"]);
    }

    #[test]
    fn parses_two_part_version() {
        assert_eq!(
            parse_version("QEMU emulator version 8.0"),
            Some(QemuVersion {
                major: 8,
                minor: 0,
                micro: 0
            })
        );
        assert_eq!(parse_version("garbage"), None);
    }

    #[test]
    fn aliases_resolve_to_versioned_types() {
        let info = QemuInfo {
            binary: "/usr/bin/qemu-system-x86_64".into(),
            version: QemuVersion {
                major: 7,
                minor: 2,
                micro: 22,
            },
            version_text: String::new(),
            machines: parse_machine_help(MACHINE_HELP),
            sandbox: true,
            data_dirs: Vec::new(),
            firmware_dir: None,
            module_dir: None,
            devices: None,
            qmp_commands: Default::default(),
        };

        assert_eq!(info.resolve_machine("pc").as_deref(), Some("pc-i440fx-7.2"));
        assert_eq!(info.resolve_machine("q35").as_deref(), Some("pc-q35-7.2"));
        assert_eq!(
            info.resolve_machine("pc-i440fx-7.1").as_deref(),
            Some("pc-i440fx-7.1")
        );
        assert_eq!(info.resolve_machine("virt"), None);
    }
}
