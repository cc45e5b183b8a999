//! Errors that stop the daemon, each printed as one line by `main`.

use std::path::PathBuf;

use crate::block::OpenError;
use crate::config::ConfigError;
use crate::io::EngineError;

/// A fatal error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid command line.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The image cannot be served.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// No usable I/O engine.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The socket cannot be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `--fd` is not a listening Unix socket.
    #[error("--fd {fd}: {reason}")]
    InheritedFd {
        /// The descriptor.
        fd: i32,
        /// What is wrong with it.
        reason: String,
    },
    /// Setting up signals or the event loop failed.
    #[error("event loop: {0}")]
    EventLoop(std::io::Error),
    /// vhost-user-backend could not set up a connection.
    #[error("vhost-user: {0}")]
    VhostUser(String),
    /// Writing the image back at exit failed.
    #[error("final flush failed: {0}")]
    Flush(crate::block::BlockError),
}

impl Error {
    /// Process exit status: 2 for usage errors, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Config(_) => 2,
            _ => 1,
        }
    }
}
