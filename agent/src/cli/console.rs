//! `kvm-agent console`: the serial console of an instance, relayed to
//! this terminal.

use anyhow::{Context, bail};
use clap::Args;
use kvm_agent_proto::v1 as pb;
use kvm_agent_proto::v1::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

use super::Printer;
use super::wire::to_json;

#[derive(Debug, Args)]
pub(super) struct ConsoleArgs {
    /// Instance name.
    name: String,
    /// Resume a paused guest once attached, so a guest started paused
    /// runs with someone watching its first lines.
    #[arg(long)]
    resume: bool,
}

/// The byte that detaches from a console: Ctrl-], as telnet and virsh use.
const CONSOLE_ESCAPE: u8 = 0x1d;

/// Runs `kvm-agent console`.
pub(super) async fn run(
    mut client: NodeAgentClient<Channel>,
    ConsoleArgs { name, resume }: ConsoleArgs,
    out: Printer,
) -> anyhow::Result<()> {
    let info = client
        .get_console_info(pb::GetConsoleInfoRequest { name: name.clone() })
        .await?
        .into_inner();
    if out.json {
        // Where the console is, for a script that attaches by itself.
        println!("{}", to_json(&info));
        return Ok(());
    }
    if info.serial_socket.is_empty() {
        bail!("instance {name:?} has no serial console; start it with one (--serial)");
    }
    let socket =
        std::os::unix::net::UnixStream::connect(&info.serial_socket).with_context(|| {
            format!(
                "can't open {} (run this on the instance's node, as root)",
                info.serial_socket
            )
        })?;
    eprintln!("attached to the serial console of {name}; press Ctrl-] to detach\r");
    if resume {
        resume_if_paused(&mut client, &name).await?;
    }
    tokio::task::spawn_blocking(move || relay_console(socket)).await??;
    eprintln!("\r\ndetached from {name}");
    Ok(())
}

/// Lets a paused guest run; a guest in any other state is left alone.
async fn resume_if_paused(client: &mut NodeAgentClient<Channel>, name: &str) -> anyhow::Result<()> {
    let info = client
        .get_instance(pb::GetInstanceRequest { name: name.into() })
        .await?
        .into_inner();
    if info.state == pb::InstanceState::Paused as i32 {
        client
            .resume_instance(pb::ResumeInstanceRequest { name: name.into() })
            .await?;
        eprintln!("resumed {name}, which was paused\r");
    }
    Ok(())
}

/// Restores the terminal's settings when dropped.
struct RawTerminal(Option<nix::sys::termios::Termios>);

impl RawTerminal {
    fn enter() -> RawTerminal {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let Ok(saved) = tcgetattr(&stdin) else {
            return RawTerminal(None); // not a terminal: relay bytes as they come
        };
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        let _ = tcsetattr(&stdin, SetArg::TCSANOW, &raw);
        RawTerminal(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// Copies the console to stdout and stdin to the console until the escape
/// byte, end of input, or the console closing.
fn relay_console(socket: std::os::unix::net::UnixStream) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let _raw = RawTerminal::enter();
    let mut from_guest = socket.try_clone()?;
    let output = std::thread::spawn(move || {
        let mut stdout = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_guest.read(&mut buf) {
            if n == 0
                || stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .is_err()
            {
                break;
            }
        }
    });
    let mut to_guest = socket;
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        let n = stdin.read(&mut buf)?;
        if n == 0 {
            break;
        }
        match buf[..n].iter().position(|&b| b == CONSOLE_ESCAPE) {
            Some(at) => {
                to_guest.write_all(&buf[..at])?;
                break;
            }
            None => to_guest.write_all(&buf[..n])?,
        }
    }
    let _ = to_guest.shutdown(std::net::Shutdown::Both);
    let _ = output.join();
    Ok(())
}
