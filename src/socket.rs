//! The daemon's listening sockets: `--socket-path` (bound with exactly `--socket-mode`, a
//! stale file claimed, a path a live process listens on refused) or `--fd` (checked to be a
//! listening unix socket), and the stats socket's path.

use std::os::fd::FromRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use vhost::vhost_user::Listener;

use crate::cli::Options;
use crate::error::StartupError;

/// Bind `--socket-path` (refusing one a live process listens on) or adopt `--fd`.
pub fn listen(opts: &Options) -> Result<(Listener, Option<PathBuf>), StartupError> {
    match (&opts.socket_path, opts.fd) {
        (Some(path), _) => {
            claim_socket_path(path)?;
            let l =
                bind_with_mode(path, opts.socket_mode).map_err(|e| StartupError::SocketBind {
                    path: path.clone(),
                    source: e,
                })?;
            // The signal thread removes the socket file on exit.
            Ok((Listener::from(l), Some(path.clone())))
        }
        (None, Some(fd)) => {
            check_listening_fd(fd)?;
            // SAFETY: `fd` is an open, listening unix socket handed to us by our parent
            // (checked above); from here on the Listener owns it.
            let l = unsafe { Listener::from_raw_fd(fd) };
            // SAFETY: setting FD_CLOEXEC on the fd we now own.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
            Ok((l, None))
        }
        (None, None) => Err(StartupError::NoSocket),
    }
}

/// Bind a listening unix socket at `path` whose file has exactly the permission bits `mode`
/// (`--socket-mode`), whatever the umask: the file is created with them, so there is no
/// moment at which it is more open (a chmod after bind would leave one). The umask is the
/// process's: call while no other thread creates files (startup, before the daemon's threads).
pub fn bind_with_mode(path: &Path, mode: u32) -> std::io::Result<std::os::unix::net::UnixListener> {
    // bind(2) creates the socket file with 0777 & ~umask.
    let mask = !(mode & 0o777) & 0o777;
    // SAFETY: umask takes a plain mask and only changes the process's file-creation mask,
    // which is restored right after the bind.
    let old = unsafe { libc::umask(mask as libc::mode_t) };
    let bound = std::os::unix::net::UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    bound
}

/// Remove a stale socket file; refuse a path a live process listens on, or a non-socket.
pub fn claim_socket_path(path: &Path) -> Result<(), StartupError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(StartupError::SocketBind {
            path: path.to_path_buf(),
            source: std::io::Error::other("exists and is not a socket"),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(StartupError::SocketInUse {
            path: path.to_path_buf(),
        });
    }
    std::fs::remove_file(path).map_err(|e| StartupError::SocketBind {
        path: path.to_path_buf(),
        source: e,
    })
}

fn check_listening_fd(fd: i32) -> Result<(), StartupError> {
    let bad = |reason: &str| StartupError::BadFd {
        fd,
        reason: reason.into(),
    };
    if fd < 0 {
        return Err(bad("negative"));
    }
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `val`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut val as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 {
        return Err(bad(&std::io::Error::last_os_error().to_string()));
    }
    if val == 0 {
        return Err(bad("not listening"));
    }
    let mut dom: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_DOMAIN,
            &mut dom as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    if rc != 0 || dom != libc::AF_UNIX {
        return Err(bad("not a unix socket"));
    }
    Ok(())
}
