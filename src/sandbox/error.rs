//! What can go wrong while the sandbox is set up.

use std::io;

use thiserror::Error;

/// Why a seccomp filter or the SIGBUS handler could not be installed. Each ends startup (the
/// worker filter: the connection) with one line.
#[derive(Debug, Error)]
pub enum SandboxError {
    /// One of our own rules was refused by seccompiler: a bug, never the system's doing.
    #[error("{0}")]
    Rule(seccompiler::BackendError),
    #[error("cannot compile seccomp filter: {0}")]
    Compile(seccompiler::BackendError),
    #[error("cannot install seccomp filter: {0}")]
    Install(seccompiler::Error),
    #[error("cannot install the SIGBUS handler: {0}")]
    SigbusHandler(io::Error),
}
