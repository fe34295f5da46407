//! A unix-socket proxy in front of an agent's API, which treats each new
//! connection as the test says: forward it, close it at once, hold it
//! without an answer, or wait for the test before forwarding. A migration's
//! source opens a fresh connection for each step of the hand-over, so
//! these stand in for a network that fails at a chosen step.

use std::path::{Path, PathBuf};

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// What the proxy does with one connection.
pub enum Connection {
    /// Passes bytes both ways.
    Forward,
    /// Keeps it open, reads nothing and never answers.
    Hold,
    /// Says it arrived, then waits until `open` fires before forwarding.
    Gate {
        /// Fired when the connection is accepted.
        arrived: oneshot::Sender<()>,
        /// Forwarding starts when this fires.
        open: oneshot::Receiver<()>,
    },
}

/// What the proxy does once the listed connections are used up.
#[derive(Debug, Clone, Copy)]
pub enum Then {
    /// Forward every further connection.
    Forward,
    /// Hold every further connection.
    Hold,
}

/// A running proxy; it stops on drop.
pub struct ApiProxy {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    task: JoinHandle<()>,
}

impl ApiProxy {
    /// Proxies to the agent socket `target`: the n-th connection follows
    /// `plan[n]`, later ones `then`.
    pub fn start(target: &Path, plan: Vec<Connection>, then: Then) -> ApiProxy {
        let dir = tempfile::Builder::new()
            .prefix("kap")
            .tempdir()
            .expect("proxy dir");
        let socket = dir.path().join("proxy.sock");
        let listener = UnixListener::bind(&socket).expect("bind proxy");
        let target = target.to_owned();
        let task = tokio::spawn(async move {
            let mut plan = plan.into_iter();
            let mut held = Vec::new();
            while let Ok((client, _)) = listener.accept().await {
                let step = plan.next().unwrap_or(match then {
                    Then::Forward => Connection::Forward,
                    Then::Hold => Connection::Hold,
                });
                match step {
                    Connection::Forward => {
                        tokio::spawn(forward(client, target.clone()));
                    }
                    Connection::Hold => held.push(client),
                    Connection::Gate { arrived, open } => {
                        let _ = arrived.send(());
                        let target = target.clone();
                        tokio::spawn(async move {
                            if open.await.is_ok() {
                                forward(client, target).await;
                            }
                        });
                    }
                }
            }
        });
        ApiProxy {
            _dir: dir,
            socket,
            task,
        }
    }

    /// The proxy's address for a migration's `target`.
    pub fn address(&self) -> String {
        format!("unix:{}", self.socket.display())
    }
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn forward(mut client: UnixStream, target: PathBuf) {
    if let Ok(mut agent) = UnixStream::connect(&target).await {
        let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
    }
}
