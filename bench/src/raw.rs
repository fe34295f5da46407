//! The raw baseline: QEMU spawned and QMP spoken directly, with no agent,
//! done the way a competent direct driver would (the monitor socket passed
//! as a listening fd, one connection kept open).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hypervisor::tap::Tap;
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::unistd::setsid;
use sendfd::SendWithFd;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::{Child, Command};

/// The distribution's QEMU, found on PATH.
pub const SYSTEM_QEMU: &str = "qemu-system-x86_64";

/// A QEMU started without the agent.
pub struct RawQemu {
    child: Child,
    reader: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    writer: OwnedWriteHalf,
    next_id: u64,
    /// How long each step took, QMP commands by name, until taken.
    steps: Vec<(String, Duration)>,
}

/// The machine part of the argv, the same options the agent renders:
/// QEMU's seccomp sandbox, and the memory balloon every instance has, in
/// slot 3 when the instance starts without devices.
pub fn machine_args(name: &str, uuid: &str, accel: &str, memory_mib: u64) -> Vec<String> {
    machine_args_with(name, uuid, accel, memory_mib, None)
}

/// The machine part of the argv with guest RAM mapped privately from a
/// file, as the agent renders a `memory_backing` of kind `file`.
pub fn machine_args_with(
    name: &str,
    uuid: &str,
    accel: &str,
    memory_mib: u64,
    ram_file: Option<&Path>,
) -> Vec<String> {
    let backend = if ram_file.is_some() {
        ",memory-backend=guest-ram"
    } else {
        ""
    };
    let mut args: Vec<String> = [
        "-name",
        &format!("guest={name},debug-threads=on"),
        "-uuid",
        uuid,
        "-machine",
        &format!("pc-i440fx-7.2,accel={accel}{backend}"),
        "-cpu",
        "qemu64",
        "-m",
        &format!("size={memory_mib}M"),
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-msg",
        "timestamp=on",
        "-sandbox",
        hypervisor::argv::SANDBOX,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if let Some(file) = ram_file {
        args.extend([
            "-object".into(),
            format!(
                "memory-backend-file,id=guest-ram,size={memory_mib}M,mem-path={},share=off,prealloc=off",
                file.display()
            ),
        ]);
    }
    args.extend([
        "-display".into(),
        "none".into(),
        "-device".into(),
        "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x3".into(),
    ]);
    args
}

impl RawQemu {
    /// Spawns QEMU and waits until QMP is ready (greeting + capabilities).
    pub async fn start(dir: &Path, args: &[String]) -> anyhow::Result<RawQemu> {
        Self::start_binary(Path::new(SYSTEM_QEMU), dir, args).await
    }

    /// [`RawQemu::start`] with another QEMU binary.
    pub async fn start_binary(
        binary: &Path,
        dir: &Path,
        args: &[String],
    ) -> anyhow::Result<RawQemu> {
        let sock = dir.join("raw-qmp.sock");
        let _ = std::fs::remove_file(&sock);
        let listener = UnixListener::bind(&sock)?;
        let fd = listener.as_raw_fd();
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .arg("-chardev")
            .arg(format!("socket,id=qmp,fd={fd},server=on,wait=off"))
            .args(["-mon", "chardev=qmp,mode=control"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: between fork and exec the closure makes two system calls,
        // on the listener's fd, which stays open until `spawn` returns.
        unsafe {
            cmd.pre_exec(move || {
                let _ = setsid();
                fcntl(
                    BorrowedFd::borrow_raw(fd),
                    FcntlArg::F_SETFD(FdFlag::empty()),
                )?;
                Ok(())
            });
        }
        let spawned = Instant::now();
        let child = cmd.spawn().context("spawn qemu")?;
        drop(listener);
        let spawn = spawned.elapsed();
        let greeted = Instant::now();
        let (read, writer) = UnixStream::connect(&sock).await?.into_split();
        let mut raw = RawQemu {
            child,
            reader: BufReader::new(read).lines(),
            writer,
            next_id: 0,
            steps: vec![("spawn".into(), spawn)],
        };
        let greeting = raw.reader.next_line().await?.context("no greeting")?;
        if !greeting.contains("\"QMP\"") {
            bail!("unexpected greeting {greeting}");
        }
        raw.steps.push(("QMP greeting".into(), greeted.elapsed()));
        raw.execute("qmp_capabilities").await?;
        Ok(raw)
    }

    /// QEMU's pid.
    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("QEMU has been reaped")
    }

    /// The steps timed since the last call, in order.
    pub fn take_steps(&mut self) -> Vec<(String, Duration)> {
        std::mem::take(&mut self.steps)
    }

    /// Runs a command and waits for its reply, skipping events.
    pub async fn execute(&mut self, command: &str) -> anyhow::Result<Value> {
        self.execute_args(command, Value::Null, None).await
    }

    /// Runs a command with arguments, and an fd sent in the same sendmsg
    /// when given. Fails on an error reply.
    pub async fn execute_args(
        &mut self,
        command: &str,
        arguments: Value,
        fd: Option<BorrowedFd<'_>>,
    ) -> anyhow::Result<Value> {
        let started = Instant::now();
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": self.next_id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let line = format!("{msg}\n");
        match fd {
            None => self.writer.write_all(line.as_bytes()).await?,
            Some(fd) => {
                let stream: &UnixStream = self.writer.as_ref();
                let sent = loop {
                    stream.writable().await?;
                    match stream.send_with_fd(line.as_bytes(), &[fd.as_raw_fd()]) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e.into()),
                    }
                };
                self.writer.write_all(&line.as_bytes()[sent..]).await?;
            }
        }
        let reply = self.reply().await?;
        if let Some(e) = reply.get("error") {
            bail!("{command} failed: {e}");
        }
        self.steps.push((command.to_owned(), started.elapsed()));
        Ok(reply)
    }

    async fn reply(&mut self) -> anyhow::Result<Value> {
        loop {
            let line = self.reader.next_line().await?.context("QMP closed")?;
            let v: Value = serde_json::from_str(&line)?;
            if v.get("id").and_then(Value::as_u64) == Some(self.next_id) {
                return Ok(v);
            }
        }
    }

    /// Runs a command and waits for both its reply and an event, in
    /// whatever order QEMU sends them.
    pub async fn execute_until_event(&mut self, command: &str, event: &str) -> anyhow::Result<()> {
        self.next_id += 1;
        let line = format!("{}\n", json!({ "execute": command, "id": self.next_id }));
        self.writer.write_all(line.as_bytes()).await?;
        let (mut replied, mut seen) = (false, false);
        while !(replied && seen) {
            let line = self.reader.next_line().await?.context("QMP closed")?;
            let v: Value = serde_json::from_str(&line)?;
            replied |= v.get("id").and_then(Value::as_u64) == Some(self.next_id);
            seen |= v.get("event").and_then(Value::as_str) == Some(event);
        }
        Ok(())
    }

    /// Hot-adds a NIC the way a direct driver would: tap, getfd,
    /// netdev_add, query-pci (to pick the slot), device_add.
    pub async fn add_nic(&mut self, index: u32, slot: u8) -> anyhow::Result<Tap> {
        let started = Instant::now();
        let tap = Tap::create("kbraw%d", 1)?;
        tap.set_up()?;
        self.steps.push(("tap".into(), started.elapsed()));
        let netdev = format!("rawnet{index}");
        self.execute_args("getfd", json!({ "fdname": netdev }), tap.queue_fds().next())
            .await?;
        self.execute_args(
            "netdev_add",
            json!({ "type": "tap", "id": netdev, "fd": netdev }),
            None,
        )
        .await?;
        self.execute("query-pci").await?;
        let device = json!({
            "driver": "virtio-net-pci", "id": format!("rawnic{index}"), "netdev": netdev,
            "mac": format!("52:54:00:99:00:{index:02x}"), "bus": "pci.0", "addr": format!("{slot:#x}"),
        });
        self.execute_args("device_add", device, None).await?;
        Ok(tap)
    }

    /// Hot-adds a raw disk: open, add-fd, two blockdev-adds, query-pci,
    /// device_add, remove-fd.
    pub async fn add_disk(&mut self, index: u32, slot: u8, path: &Path) -> anyhow::Result<()> {
        let started = Instant::now();
        let image = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        self.steps.push(("open".into(), started.elapsed()));
        let reply = self
            .execute_args("add-fd", Value::Null, Some(image.as_fd()))
            .await?;
        let fdset = reply["return"]["fdset-id"].as_u64().context("fdset-id")?;
        let file = format!("rawfile{index}");
        let format = format!("rawfmt{index}");
        let file_node = json!({
            "driver": "file", "node-name": file, "filename": format!("/dev/fdset/{fdset}"),
            "cache": { "direct": false, "no-flush": false },
        });
        self.execute_args("blockdev-add", file_node, None).await?;
        self.execute_args(
            "blockdev-add",
            json!({ "driver": "raw", "node-name": format, "file": file }),
            None,
        )
        .await?;
        self.execute("query-pci").await?;
        let device = json!({
            "driver": "virtio-blk-pci", "id": format!("rawdisk{index}"), "drive": format,
            "bus": "pci.0", "addr": format!("{slot:#x}"),
        });
        self.execute_args("device_add", device, None).await?;
        self.execute_args("remove-fd", json!({ "fdset-id": fdset }), None)
            .await?;
        Ok(())
    }

    /// Removes a disk added by `add_disk`: device_del, wait for the
    /// guest to release it (DEVICE_DELETED), then delete both block nodes.
    pub async fn remove_disk(&mut self, index: u32) -> anyhow::Result<()> {
        let id = format!("rawdisk{index}");
        self.next_id += 1;
        let line = format!(
            "{}\n",
            json!({ "execute": "device_del", "arguments": { "id": id }, "id": self.next_id })
        );
        let started = Instant::now();
        self.writer.write_all(line.as_bytes()).await?;
        // The event may come before or after the reply.
        let (mut replied, mut deleted) = (false, false);
        while !(replied && deleted) {
            let line = self.reader.next_line().await?.context("QMP closed")?;
            let v: Value = serde_json::from_str(&line)?;
            if v.get("id").and_then(Value::as_u64) == Some(self.next_id) {
                if let Some(e) = v.get("error") {
                    bail!("device_del failed: {e}");
                }
                replied = true;
            }
            deleted |= v.get("event").and_then(Value::as_str) == Some("DEVICE_DELETED")
                && v["data"]["device"].as_str() == Some(id.as_str());
        }
        self.steps
            .push(("device_del and release".into(), started.elapsed()));
        for node in [format!("rawfmt{index}"), format!("rawfile{index}")] {
            self.execute_args("blockdev-del", json!({ "node-name": node }), None)
                .await?;
        }
        Ok(())
    }

    /// Polls `query-migrate` until the migration ends; returns the
    /// downtime QEMU reports. Fails unless it completed.
    pub async fn wait_migration(&mut self) -> anyhow::Result<Duration> {
        loop {
            let reply = self.execute("query-migrate").await?;
            let info = &reply["return"];
            match info["status"].as_str() {
                Some("completed") => {
                    return Ok(Duration::from_millis(
                        info["downtime"].as_u64().unwrap_or(0),
                    ));
                }
                Some("failed" | "cancelled") => bail!("migration ended: {info}"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Lifts the bandwidth cap, as the agent does for saves and migrations.
    pub async fn uncap(&mut self) -> anyhow::Result<()> {
        self.execute_args(
            "migrate-set-parameters",
            json!({ "max-bandwidth": hypervisor::migration::UNCAPPED_BANDWIDTH }),
            None,
        )
        .await
        .map(drop)
    }

    /// Saves the paused guest into `file` with `migrate fd:`, then
    /// fsyncs it and quits: a direct driver's save.
    pub async fn save_to(mut self, file: &Path) -> anyhow::Result<()> {
        let out = std::fs::File::create(file)?;
        self.execute("stop").await?;
        self.uncap().await?;
        self.execute_args("getfd", json!({ "fdname": "save" }), Some(out.as_fd()))
            .await?;
        self.execute_args("migrate", json!({ "uri": "fd:save" }), None)
            .await?;
        self.wait_migration().await?;
        out.sync_all()?;
        self.quit().await
    }

    /// Loads a stream from `file` into a QEMU started with `-S -incoming
    /// defer`, then resumes the guest.
    pub async fn restore_from(&mut self, file: &Path) -> anyhow::Result<()> {
        let input = std::fs::File::open(file)?;
        self.execute_args("getfd", json!({ "fdname": "restore" }), Some(input.as_fd()))
            .await?;
        self.execute_args("migrate-incoming", json!({ "uri": "fd:restore" }), None)
            .await?;
        self.wait_migration().await?;
        self.execute("cont").await.map(drop)
    }

    /// QMP `quit`, then reap.
    pub async fn quit(mut self) -> anyhow::Result<()> {
        self.next_id += 1;
        let line = format!("{}\n", json!({ "execute": "quit", "id": self.next_id }));
        self.writer.write_all(line.as_bytes()).await?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGKILL and reap.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// powerdown, wait `powerdown_wait` for an exit, then quit and reap:
    /// the same escalation the agent runs.
    pub async fn stop_graceful(mut self, powerdown_wait: Duration) -> anyhow::Result<()> {
        self.execute("system_powerdown").await?;
        if tokio::time::timeout(powerdown_wait, self.child.wait())
            .await
            .is_ok()
        {
            return Ok(());
        }
        let id = self.next_id + 1;
        self.next_id = id;
        let line = format!("{}\n", json!({ "execute": "quit", "id": id }));
        self.writer.write_all(line.as_bytes()).await?;
        self.child.wait().await?;
        Ok(())
    }
}
