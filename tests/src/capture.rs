//! A packet tap: every frame that crosses the interfaces of a network
//! namespace, searched for a pattern as it arrives, as `tcpdump` would
//! capture them (an `AF_PACKET` socket, which needs root).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use nix::sched::{CloneFlags, setns};

/// What a capture saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Captured {
    /// Frames read.
    pub frames: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Frames that hold the pattern.
    pub matching_frames: u64,
}

/// A capture under way in a thread of its own.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Captured, String>>,
}

/// The largest frame read: a veth hands up segments as large as 64 KiB.
const FRAME_BUFFER: usize = 256 << 10;

impl Capture {
    /// Starts capturing in the network namespace `netns` (a name under
    /// /run/netns), counting the frames that hold `pattern`.
    pub fn start(netns: &str, pattern: &[u8]) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let path = format!("/run/netns/{netns}");
        let pattern = pattern.to_vec();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            let socket = match open_in(&path) {
                Ok(socket) => socket,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.clone()));
                    return Err(e);
                }
            };
            let _ = ready_tx.send(Ok(()));
            Ok(search(&read_until(&socket, &stopping), &pattern))
        });
        if let Ok(Err(e)) = ready.recv() {
            panic!("can't capture packets in {netns}: {e}");
        }
        Capture { stop, thread }
    }

    /// Stops and tells what was seen.
    pub fn finish(self) -> Captured {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .join()
            .expect("the capture thread")
            .expect("the capture")
    }
}

/// A packet socket for every protocol, opened inside `netns` by this
/// thread, which stays there.
fn open_in(netns: &str) -> Result<OwnedFd, String> {
    let namespace = std::fs::File::open(netns).map_err(|e| format!("{netns}: {e}"))?;
    setns(namespace, CloneFlags::CLONE_NEWNET).map_err(|e| format!("setns {netns}: {e}"))?;
    let protocol = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol) };
    if fd < 0 {
        return Err(format!(
            "AF_PACKET socket (needs root): {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: fd was just returned by socket(2) and nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // A big queue and a short timeout: nothing lost while the pattern is
    // searched, and the stop flag is seen.
    let queue: libc::c_int = 64 << 20;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    set_option(&socket, libc::SO_RCVBUFFORCE, &queue)?;
    set_option(&socket, libc::SO_RCVTIMEO, &timeout)?;
    Ok(socket)
}

fn set_option<T>(socket: &OwnedFd, option: libc::c_int, value: &T) -> Result<(), String> {
    // SAFETY: value points at a T of the size given.
    let done = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if done == 0 {
        Ok(())
    } else {
        Err(format!(
            "setsockopt {option}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// Reads frames until told to stop, keeping them: searching them here
/// would be slower than the link, and the socket's queue would overflow.
fn read_until(socket: &OwnedFd, stop: &AtomicBool) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    let mut frame = vec![0u8; FRAME_BUFFER];
    while !stop.load(Ordering::SeqCst) {
        // SAFETY: frame is a writable buffer of the length given.
        let n = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                frame.as_mut_ptr().cast(),
                frame.len(),
                0,
            )
        };
        if let Ok(n) = usize::try_from(n) {
            frames.push(frame[..n].to_vec());
        }
    }
    frames
}

/// What `frames` hold of `pattern`.
fn search(frames: &[Vec<u8>], pattern: &[u8]) -> Captured {
    let first = pattern[0];
    let holds = |frame: &[u8]| {
        frame
            .iter()
            .enumerate()
            .filter(|&(_, &b)| b == first)
            .any(|(at, _)| frame[at..].starts_with(pattern))
    };
    Captured {
        frames: frames.len() as u64,
        bytes: frames.iter().map(|f| f.len() as u64).sum(),
        matching_frames: frames.iter().filter(|f| holds(f)).count() as u64,
    }
}
