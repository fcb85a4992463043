//! The backend request channel (vhost-user `VHOST_USER_PROTOCOL_F_BACKEND_REQ`): the socket
//! the VMM hands over with `VHOST_USER_SET_BACKEND_REQ_FD`, on which the backend sends
//! requests to the VMM. ringfence sends one: `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, after a
//! live resize, so that the VMM reads the config space again and raises a config interrupt
//! in the guest.
//!
//! The `vhost` crate (0.18) receives the channel and wraps it in `vhost_user::Backend`, whose
//! public API can send shared-object and shmem requests but not a config change, and which does
//! not expose its socket. Rather than carry a patched copy of the crate, ringfence keeps the
//! crate's `Backend` (which owns the socket and keeps it open) and writes the 12 bytes of the
//! message itself, on that same socket. It finds the socket by what only it can be: the one
//! unix stream socket in the process without a local address. ringfence creates no such
//! socket (and once the process sandbox is on, no thread can: `socket` and `socketpair` are
//! denied), and every socket it accepts (the VMM's connection, stats clients) carries the
//! address of the listener it came from; sockets a VMM passes in any other message are
//! closed once refused. If there is not exactly one, ringfence does not guess: a resize then
//! reaches the guest on its next connection only, and the log says so. The socket's inode is
//! kept and checked again before every write.

use std::io;
use std::os::fd::RawFd;

use vhost::vhost_user::Backend;

/// `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`.
const CONFIG_CHANGE_MSG: u32 = 2;
/// Header flags: protocol version 1, no reply wanted (a config change needs no answer, and
/// the thread that sends it must not wait on the VMM).
const VERSION_1: u32 = 0x1;

/// The message: a header (request, flags, payload size) and no payload.
pub fn config_change_message() -> [u8; 12] {
    let mut m = [0u8; 12];
    m[0..4].copy_from_slice(&CONFIG_CHANGE_MSG.to_le_bytes());
    m[4..8].copy_from_slice(&VERSION_1.to_le_bytes());
    m[8..12].copy_from_slice(&0u32.to_le_bytes());
    m
}

/// The channel of one VMM connection.
pub struct BackendChannel {
    /// Owns the socket (the crate's wrapper around it): the fd stays open while this lives.
    _owner: Option<Backend>,
    fd: RawFd,
    /// (st_dev, st_ino) of the socket when it was adopted.
    id: (u64, u64),
}

impl BackendChannel {
    /// Adopt the channel the crate just received, finding its fd (see the module comment).
    pub fn adopt(owner: Backend) -> Result<BackendChannel, String> {
        let found = unnamed_stream_sockets();
        match found.as_slice() {
            [fd] => {
                let id = socket_id(*fd).map_err(|e| format!("fstat of fd {fd}: {e}"))?;
                Ok(BackendChannel {
                    _owner: Some(owner),
                    fd: *fd,
                    id,
                })
            }
            [] => Err("no unnamed unix stream socket in the process".into()),
            many => Err(format!(
                "{} unnamed unix stream sockets in the process (fds {many:?}); cannot tell \
                 which is the channel",
                many.len()
            )),
        }
    }

    /// A channel on `fd`, which the caller keeps open as long as the channel is used (tests).
    pub fn on_fd(fd: RawFd) -> io::Result<BackendChannel> {
        Ok(BackendChannel {
            _owner: None,
            fd,
            id: socket_id(fd)?,
        })
    }

    /// Send `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`. Never blocks: a VMM that does not read its
    /// channel gets an error here, not a stuck daemon thread.
    pub fn notify_config_change(&self) -> io::Result<()> {
        if socket_id(self.fd)? != self.id {
            return Err(io::Error::other(
                "the channel's fd no longer refers to the channel's socket",
            ));
        }
        let m = config_change_message();
        // SAFETY: send(2) reads `m.len()` bytes from `m`, which lives across the call; the fd is
        // the channel socket, kept open by `_owner` (checked by inode above).
        let n = unsafe {
            libc::send(
                self.fd,
                m.as_ptr().cast(),
                m.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != m.len() {
            return Err(io::Error::other(format!(
                "only {n} of {} bytes of the message were sent",
                m.len()
            )));
        }
        Ok(())
    }
}

fn socket_id(fd: RawFd) -> io::Result<(u64, u64)> {
    // SAFETY: an all-zero stat is a valid value of this plain C struct; fstat writes into it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on an fd number with a pointer to our struct; an fd that is not open fails
    // with EBADF.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::other("not a socket"));
    }
    Ok((st.st_dev, st.st_ino))
}

/// Fds of the process that are AF_UNIX SOCK_STREAM sockets, not listening, with no local
/// address (one end of a socketpair).
fn unnamed_stream_sockets() -> Vec<RawFd> {
    // The fd was the lowest free number when it arrived, so it is below the open-file limit.
    // SAFETY: an all-zero rlimit is a valid value; getrlimit writes into it.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes into the struct we own.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
        rl.rlim_cur.min(1 << 16) as RawFd
    } else {
        4096
    };
    (0..limit).filter(|&fd| is_unnamed_stream(fd)).collect()
}

fn is_unnamed_stream(fd: RawFd) -> bool {
    let opt = |name: libc::c_int| -> Option<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `v`, which we own; a closed fd or
        // one that is no socket fails (EBADF, ENOTSOCK).
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut v as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(v)
    };
    if opt(libc::SO_DOMAIN) != Some(libc::AF_UNIX)
        || opt(libc::SO_TYPE) != Some(libc::SOCK_STREAM)
        || opt(libc::SO_ACCEPTCONN) != Some(0)
    {
        return false;
    }
    // SAFETY: an all-zero sockaddr_un is a valid value; getsockname writes at most `len` bytes.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: as above: the pointer and length describe `addr`.
    let rc =
        unsafe { libc::getsockname(fd, (&mut addr as *mut libc::sockaddr_un).cast(), &mut len) };
    // An unnamed socket's address is the family alone.
    rc == 0 && len as usize <= std::mem::size_of::<libc::sa_family_t>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_message_is_a_bare_version_1_header() {
        assert_eq!(
            config_change_message(),
            [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn a_socketpair_end_is_found_and_carries_the_message() {
        let (ours, mut vmm) = UnixStream::pair().unwrap();
        assert!(is_unnamed_stream(ours.as_raw_fd()));
        assert!(unnamed_stream_sockets().contains(&ours.as_raw_fd()));
        let ch = BackendChannel::on_fd(ours.as_raw_fd()).unwrap();
        ch.notify_config_change().unwrap();
        let mut got = [0u8; 12];
        vmm.read_exact(&mut got).unwrap();
        assert_eq!(got, config_change_message());
    }

    #[test]
    fn bound_and_listening_sockets_are_not_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(!is_unnamed_stream(l.as_raw_fd()));
        let c = UnixStream::connect(&path).unwrap();
        let (accepted, _) = l.accept().unwrap();
        // The accepted end carries the listener's address.
        assert!(!is_unnamed_stream(accepted.as_raw_fd()));
        // The connecting end is unnamed, but it is the VMM's side, never in our process.
        assert!(is_unnamed_stream(c.as_raw_fd()));
        let f = tempfile::tempfile().unwrap();
        assert!(!is_unnamed_stream(f.as_raw_fd()));
        assert!(!is_unnamed_stream(-1));
    }

    #[test]
    fn a_channel_whose_fd_was_reused_refuses_to_send() {
        let (ours, _vmm) = UnixStream::pair().unwrap();
        let ch = BackendChannel::on_fd(ours.as_raw_fd()).unwrap();
        let fd = ours.as_raw_fd();
        drop(ours);
        // Something else takes the number.
        let f = tempfile::tempfile().unwrap();
        if f.as_raw_fd() == fd {
            assert!(ch.notify_config_change().is_err());
        }
        let (_other, _peer) = UnixStream::pair().unwrap();
        // Whatever now holds `fd` (or nothing), it is not the adopted socket.
        assert!(ch.notify_config_change().is_err());
    }
}
