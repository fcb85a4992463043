//! The backend request channel (vhost-user `VHOST_USER_PROTOCOL_F_BACKEND_REQ`): the socket
//! the VMM hands over with `VHOST_USER_SET_BACKEND_REQ_FD`, on which the backend sends
//! requests to the VMM. ringfence sends one: `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`, after a
//! live resize, so that the VMM reads the config space again and raises a config interrupt
//! in the guest.
//!
//! The `vhost` crate (0.18) receives the channel and wraps it in `vhost_user::Backend`, whose
//! public API can send shared-object and shmem requests but not a config change, and which does
//! not expose its socket. Rather than carry a patched copy of the crate, ringfence finds the
//! socket by what only it can be: **the socket that closes when the crate's `Backend` is
//! dropped**. The handler gets the `Backend` by value, and the crate keeps no other copy, so it
//! holds the only descriptor of that socket in the process. [`VmmChannel::adopt`] takes a
//! duplicate of every unix stream socket descriptor of the process (noting each one's socket
//! inode), drops the `Backend`, and keeps the duplicate of the one descriptor that was closed.
//! No other socket can be taken for it: neither stdout/stderr on journald's stream sockets
//! (systemd), nor anything a parent left open, nor a socket a VMM passed with another message,
//! nor a channel that has a name of its own. If not exactly one descriptor closed (another
//! thread closed a socket in the same instant, or something else still holds the channel),
//! ringfence does not guess: a resize then reaches the guest when the VMM next reads the config
//! space, and the log says so.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use vhost::vhost_user::Backend;

use crate::error::ChannelError;

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

/// The channel of one VMM connection: our own descriptor of its socket.
pub struct VmmChannel {
    sock: OwnedFd,
}

impl VmmChannel {
    /// Adopt the channel the crate just received (see the module comment). `owner` must be the
    /// only holder of the channel's descriptor: it is dropped here.
    pub fn adopt(owner: Backend) -> Result<VmmChannel, ChannelError> {
        let before: Vec<Candidate> = stream_sockets()
            .into_iter()
            .filter_map(|fd| {
                let id = socket_id(fd).ok()?;
                let dup = dup_cloexec(fd).ok()?;
                Some(Candidate { fd, id, dup })
            })
            .collect();
        drop(owner);
        let mut closed = closed_candidates(before, |fd| socket_id(fd).ok());
        match closed.len() {
            1 => Ok(VmmChannel {
                sock: closed.remove(0).dup,
            }),
            0 => Err(ChannelError::NothingClosed),
            _ => Err(ChannelError::Ambiguous {
                fds: closed.iter().map(|c| c.fd).collect(),
            }),
        }
    }

    /// A channel on our own descriptor `sock` of the channel's socket (tests).
    pub fn from_owned(sock: OwnedFd) -> VmmChannel {
        VmmChannel { sock }
    }

    /// Send `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG`. Never blocks: a VMM that does not read its
    /// channel gets an error here, not a stuck daemon thread.
    pub fn notify_config_change(&self) -> io::Result<()> {
        let m = config_change_message();
        // SAFETY: send(2) reads `m.len()` bytes from `m`, which lives across the call; the fd
        // is our own descriptor of the channel, open as long as `self`.
        let n = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
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

/// A socket descriptor seen before the crate's `Backend` was dropped, with our duplicate.
struct Candidate {
    fd: RawFd,
    /// (st_dev, st_ino) of its socket.
    id: (u64, u64),
    dup: OwnedFd,
}

/// The candidates whose descriptor no longer refers to the same socket (`now` gives the
/// socket at a descriptor now, None if it is closed or no socket). Pure but for `now`.
fn closed_candidates(
    before: Vec<Candidate>,
    now: impl Fn(RawFd) -> Option<(u64, u64)>,
) -> Vec<Candidate> {
    before
        .into_iter()
        .filter(|c| now(c.fd) != Some(c.id))
        .collect()
}

fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor of an open fd and reads no memory.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
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

/// Fds of the process that are AF_UNIX SOCK_STREAM sockets and not listening.
fn stream_sockets() -> Vec<RawFd> {
    // The channel's fd was the lowest free number when it arrived, so it is below the
    // open-file limit.
    // SAFETY: an all-zero rlimit is a valid value; getrlimit writes into it.
    let mut rl: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: getrlimit writes into the struct we own.
    let limit = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0 {
        rl.rlim_cur.min(1 << 16) as RawFd
    } else {
        4096
    };
    (0..limit).filter(|&fd| is_stream_socket(fd)).collect()
}

fn is_stream_socket(fd: RawFd) -> bool {
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
    opt(libc::SO_DOMAIN) == Some(libc::AF_UNIX)
        && opt(libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && opt(libc::SO_ACCEPTCONN) == Some(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn the_message_is_a_bare_version_1_header() {
        assert_eq!(
            config_change_message(),
            [2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn a_channel_carries_the_message() {
        let (ours, mut vmm) = UnixStream::pair().unwrap();
        assert!(is_stream_socket(ours.as_raw_fd()));
        assert!(stream_sockets().contains(&ours.as_raw_fd()));
        let ch = VmmChannel::from_owned(ours.into());
        ch.notify_config_change().unwrap();
        let mut got = [0u8; 12];
        vmm.read_exact(&mut got).unwrap();
        assert_eq!(got, config_change_message());
    }

    #[test]
    fn listening_sockets_and_files_are_not_candidates() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        assert!(!is_stream_socket(l.as_raw_fd()));
        let f = tempfile::tempfile().unwrap();
        assert!(!is_stream_socket(f.as_raw_fd()));
        assert!(!is_stream_socket(-1));
    }

    fn candidate(fd: RawFd, id: (u64, u64)) -> Candidate {
        Candidate {
            fd,
            id,
            dup: std::fs::File::open("/dev/null").unwrap().into(),
        }
    }

    /// Only the descriptor that closed (or now names another socket) is the channel; the
    /// others (stdout and stderr on journald's sockets, a socket a VMM passed) stay as they
    /// were.
    #[test]
    fn the_channel_is_the_descriptor_that_closed() {
        let before = || {
            vec![
                candidate(1, (9, 100)),
                candidate(2, (9, 101)),
                candidate(7, (9, 102)),
            ]
        };
        let closed = closed_candidates(before(), |fd| match fd {
            1 => Some((9, 100)),
            2 => Some((9, 101)),
            _ => None,
        });
        assert_eq!(closed.iter().map(|c| c.fd).collect::<Vec<_>>(), [7]);
        // Its number taken at once by another socket: still the one that changed.
        let closed = closed_candidates(before(), |fd| match fd {
            7 => Some((9, 555)),
            1 => Some((9, 100)),
            2 => Some((9, 101)),
            _ => None,
        });
        assert_eq!(closed.iter().map(|c| c.fd).collect::<Vec<_>>(), [7]);
        // Nothing closed (the channel is held elsewhere): no candidate.
        let closed = closed_candidates(before(), |fd| {
            Some(
                [(9, 100), (9, 101), (9, 102)][match fd {
                    1 => 0,
                    2 => 1,
                    _ => 2,
                }],
            )
        });
        assert!(closed.is_empty());
    }

    /// The real thing: the crate's `Backend` around one socket of a pair, among other
    /// connected sockets of the process, named or not.
    #[test]
    fn adopt_finds_the_crates_socket_among_others() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        let _client = UnixStream::connect(dir.path().join("s")).unwrap();
        let (named, _) = l.accept().unwrap();
        let (decoy, mut decoy_peer) = UnixStream::pair().unwrap();
        // Other tests of this process open and close sockets on their threads meanwhile: a
        // socket of theirs that closes at the same moment makes the look ambiguous, and adopt
        // rightly refuses to guess. Such a race is the test harness's, so look again.
        let (vmm_client, ch) = (0..50)
            .find_map(|_| {
                // The channel itself is a named socket here: an accepted connection.
                let vmm_client = UnixStream::connect(dir.path().join("s")).unwrap();
                let (channel, _) = l.accept().unwrap();
                match VmmChannel::adopt(Backend::from_stream(channel)) {
                    Ok(ch) => Some((vmm_client, ch)),
                    Err(ChannelError::Ambiguous { .. }) => None,
                    Err(e) => panic!("adopt: {e:?}"),
                }
            })
            .expect("adopt: ambiguous 50 times in a row");
        ch.notify_config_change().unwrap();
        let mut got = [0u8; 12];
        (&vmm_client).read_exact(&mut got).unwrap();
        assert_eq!(got, config_change_message());
        decoy_peer.set_nonblocking(true).unwrap();
        assert!(
            decoy_peer.read(&mut [0u8; 1]).is_err(),
            "the decoy got bytes"
        );
        drop((named, decoy));
    }
}
