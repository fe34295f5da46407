//! The tiny test guest: a distribution kernel and a busybox initramfs built
//! by `scripts/build-test-guest` (cached by package versions), booted under
//! TCG, and driven over its serial console.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kvm_agent_proto::v1 as pb;

/// What the guest's /init prints once its drivers are loaded.
pub const READY_MARKER: &str = "KVM-AGENT-GUEST-READY";

/// The guest shell's prompt (in /, where it stays).
const PROMPT: &str = "/ # ";

/// Kernel and initrd of the test guest, built on first use.
pub struct GuestImage {
    /// The kernel.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// A CD-ROM image that boots the same guest (isolinux); its
    /// `medium.txt` says `KVM-AGENT-MEDIUM boot`.
    pub boot_iso: PathBuf,
    /// A CD-ROM image with only a `medium.txt` that says
    /// `KVM-AGENT-MEDIUM data`.
    pub data_iso: PathBuf,
}

/// Builds (or finds in the cache) the test guest. Panics with the build
/// script's output when that fails.
pub fn guest_image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-test-guest");
        let out = Command::new(&script)
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "building the test guest failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        GuestImage {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.gz"),
            boot_iso: dir.join("boot.iso"),
            data_iso: dir.join("data.iso"),
        }
    })
}

/// Turns a spec into one that boots the test guest: direct kernel boot,
/// a serial console and TCG (a Linux guest doesn't boot under the nested
/// KVM these tests run on, while TCG works everywhere).
pub fn boot_guest(spec: &mut pb::InstanceSpec) {
    let image = guest_image();
    spec.boot = Some(pb::BootSpec {
        kernel: image.kernel.display().to_string(),
        initrd: image.initrd.display().to_string(),
        cmdline: "console=ttyS0 quiet panic=-1".into(),
        ..Default::default()
    });
    spec.serial_console = true;
    spec.accelerator = pb::Accelerator::Tcg as i32;
}

/// A shell on the guest's serial console.
pub struct GuestConsole {
    stream: UnixStream,
    seen: String,
    counter: u32,
}

impl GuestConsole {
    /// Connects to the console socket and waits for the ready marker.
    pub fn connect(socket: &Path, timeout: Duration) -> GuestConsole {
        let mut console = Self::open(socket);
        console.read_until(READY_MARKER, timeout);
        // The shell's banner ends with its first prompt.
        console.read_until(PROMPT, timeout);
        console
    }

    /// Connects to the console of a guest that is already up (after a
    /// migration or a restore) and waits for a fresh prompt.
    pub fn attach(socket: &Path, timeout: Duration) -> GuestConsole {
        let mut console = Self::open(socket);
        writeln!(console.stream).expect("write to guest console");
        console.read_until(PROMPT, timeout);
        console
    }

    fn open(socket: &Path) -> GuestConsole {
        let stream = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        GuestConsole {
            stream,
            seen: String::new(),
            counter: 0,
        }
    }

    fn read_until(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.seen.find(needle) {
                let before = self.seen[..at].to_owned();
                self.seen.drain(..at + needle.len());
                return before;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "guest console: {needle:?} not seen within {timeout:?}; got so far:\n{}",
                self.seen
            );
            self.stream
                .set_read_timeout(Some(left))
                .expect("read timeout");
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("guest console closed; got so far:\n{}", self.seen),
                Ok(n) => self.seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("guest console: {e}"),
            }
        }
    }

    /// Runs a shell command and returns what it printed (the prompt removed).
    pub fn run(&mut self, command: &str) -> String {
        self.counter += 1;
        // The marker is printed by printf, so the command text itself (should
        // the shell echo it) can't match it.
        let marker = format!("@@E{}@@", self.counter);
        writeln!(
            self.stream,
            "{command}; printf '@@E%s@@\\n' {}",
            self.counter
        )
        .expect("write to guest console");
        let out = self.read_until(&marker, Duration::from_secs(60));
        out.replace("\r\n", "\n")
            .trim()
            .trim_start_matches(PROMPT)
            .trim()
            .to_owned()
    }

    /// Runs `command` until `check` accepts its output or `timeout` passes.
    pub fn run_until(
        &mut self,
        command: &str,
        timeout: Duration,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.run(command);
            if check(&out) {
                return out;
            }
            assert!(
                Instant::now() < deadline,
                "guest: `{command}` never gave the expected output; last:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Sends a command without waiting for an answer (e.g. `poweroff -f`).
    pub fn send(&mut self, command: &str) {
        writeln!(self.stream, "{command}").expect("write to guest console");
    }
}

/// Runs blocking console work off the async runtime, and gives the
/// console back with what the work returned.
pub async fn in_guest<T: Send + 'static>(
    console: GuestConsole,
    work: impl FnOnce(&mut GuestConsole) -> T + Send + 'static,
) -> (GuestConsole, T) {
    tokio::task::spawn_blocking(move || {
        let mut console = console;
        let out = work(&mut console);
        (console, out)
    })
    .await
    .expect("console work panicked")
}

/// How long the test guest takes to its shell, under TCG.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// Starts the test guest as `name`, its spec changed by `edit`, and waits
/// for its shell. Panics with the agent's log when the start fails.
pub async fn start_guest_with(
    agent: &crate::TestAgent,
    name: &str,
    edit: impl FnOnce(&mut pb::InstanceSpec),
) -> (pb::InstanceInfo, GuestConsole) {
    let mut spec = agent.spec(name, 256);
    boot_guest(&mut spec);
    edit(&mut spec);
    let info = agent.start_spec(spec).await;
    let socket = agent.run_dir(name).join("serial.sock");
    let console = tokio::task::spawn_blocking(move || GuestConsole::connect(&socket, BOOT_TIMEOUT))
        .await
        .unwrap();
    (info, console)
}

/// Writes a fresh marker into the running test guest `name`'s memory (its
/// /tmp is the initramfs's) and returns it.
pub async fn leave_marker(agent: &crate::TestAgent, name: &str) -> String {
    let marker = format!("MARK-{}", uuid::Uuid::new_v4().simple());
    let socket = agent.run_dir(name).join("serial.sock");
    let line = marker.clone();
    tokio::task::spawn_blocking(move || {
        GuestConsole::attach(&socket, BOOT_TIMEOUT).run(&format!("echo {line} > /tmp/marker"));
    })
    .await
    .unwrap();
    marker
}

/// What the test guest `name` says from inside: the marker it holds
/// ([`leave_marker`]) and the PCI devices it sees.
pub async fn marker_and_pci_devices(agent: &crate::TestAgent, name: &str) -> (String, String) {
    let socket = agent.run_dir(name).join("serial.sock");
    tokio::task::spawn_blocking(move || {
        let mut console = GuestConsole::attach(&socket, BOOT_TIMEOUT);
        (
            console.run("cat /tmp/marker"),
            console.run("ls /sys/bus/pci/devices"),
        )
    })
    .await
    .unwrap()
}

/// The guest's name for a slot on bus 0 in /sys/bus/pci/devices.
pub fn pci_address(slot: u32) -> String {
    format!("0000:00:{slot:02x}.0")
}
