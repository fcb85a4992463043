//! SET_LOG_FD, which the `vhost` crate (0.18) does not dispatch: it answers the message
//! "invalid" and ends the connection. The message carries an eventfd that the backend signals
//! after it has written the dirty log (the vhost kernel interface's `VHOST_SET_LOG_FD`). So the
//! request loop looks at the next message's header before the crate reads it (`MSG_PEEK`) and
//! takes a SET_LOG_FD off the socket itself: header, payload and fds, exactly one message, so
//! the stream stays where the crate expects it.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;

/// `VHOST_USER_SET_LOG_FD`.
const SET_LOG_FD: u32 = 7;
const HEADER_LEN: usize = 12;
/// Its payload is empty; some frontends send a u64. More is not a SET_LOG_FD.
const MAX_PAYLOAD: usize = 8;
/// Header flags.
const VERSION: u32 = 0x1;
const REPLY: u32 = 0x4;
const NEED_REPLY: u32 = 0x8;
/// Most fds one message may carry (the vhost crate's limit).
const MAX_FDS: usize = 32;

/// A SET_LOG_FD taken off the socket.
pub(super) struct SetLogFd {
    pub flags: u32,
    pub fds: Vec<File>,
}

impl SetLogFd {
    /// Whether the frontend asked for an answer (REPLY_ACK).
    pub fn needs_reply(&self) -> bool {
        self.flags & NEED_REPLY != 0
    }
}

/// If the next message is a SET_LOG_FD, take it (with its fds) and return it. Any other
/// message, or the end of the stream, is left for the `vhost` crate. Waits for the next
/// message, as the crate would.
pub(super) fn take(stream: &UnixStream) -> io::Result<Option<SetLogFd>> {
    let mut hdr = [0u8; HEADER_LEN];
    // SAFETY: recv into a buffer of ours of HEADER_LEN bytes; MSG_PEEK leaves the bytes (and
    // any fds) in the socket.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            hdr.as_mut_ptr().cast(),
            HEADER_LEN,
            libc::MSG_PEEK | libc::MSG_WAITALL,
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(None)
        } else {
            Err(e)
        };
    }
    if (n as usize) < HEADER_LEN {
        // The end of the stream, or a message cut short: the crate says which.
        return Ok(None);
    }
    let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
    let (code, flags, size) = (word(0), word(4), word(8) as usize);
    if code != SET_LOG_FD || size > MAX_PAYLOAD {
        // A SET_LOG_FD with a larger payload is left to the crate, which refuses it.
        return Ok(None);
    }
    let fds = receive(stream, HEADER_LEN + size)?;
    Ok(Some(SetLogFd { flags, fds }))
}

/// Read exactly `len` bytes (one message) and the fds that came with them.
fn receive(stream: &UnixStream, len: usize) -> io::Result<Vec<File>> {
    let mut buf = [0u8; HEADER_LEN + MAX_PAYLOAD];
    let mut got = 0;
    let mut fds = Vec::new();
    // Room for MAX_FDS ints of SCM_RIGHTS.
    let mut cmsg = [0u64; (MAX_FDS * 4 + 64) / 8];
    while got < len {
        let mut iov = libc::iovec {
            iov_base: buf[got..].as_mut_ptr().cast(),
            iov_len: len - got,
        };
        // SAFETY: an all-zero msghdr is a valid value of this plain C struct.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if got == 0 {
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cmsg);
        }
        // SAFETY: recvmsg into our buffer (at most `len - got` bytes) and control buffer, both
        // alive for the call; MSG_CMSG_CLOEXEC so that received fds are never inherited.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "SET_LOG_FD cut short",
            ));
        }
        if got == 0 {
            fds = control_fds(&msg);
        }
        got += n as usize;
    }
    Ok(fds)
}

/// The fds of the SCM_RIGHTS messages of `msg`, now ours.
fn control_fds(msg: &libc::msghdr) -> Vec<File> {
    let mut fds = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/NXTHDR walk the control buffer the kernel filled for `msg`, within
    // msg_controllen; each SCM_RIGHTS payload holds (len - CMSG_LEN(0)) / 4 fds that the kernel
    // installed in this process, so each is ours to own exactly once.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c).cast::<libc::c_int>();
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<libc::c_int>();
                for i in 0..n {
                    fds.push(File::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    fds
}

/// Answer a SET_LOG_FD that asked for it (REPLY_ACK): 0 done, 1 refused.
pub(super) fn reply(stream: &UnixStream, ok: bool) -> io::Result<()> {
    let mut m = [0u8; HEADER_LEN + 8];
    m[0..4].copy_from_slice(&SET_LOG_FD.to_le_bytes());
    m[4..8].copy_from_slice(&(VERSION | REPLY).to_le_bytes());
    m[8..12].copy_from_slice(&8u32.to_le_bytes());
    m[12..20].copy_from_slice(&u64::from(!ok).to_le_bytes());
    (&mut &*stream).write_all(&m)
}
