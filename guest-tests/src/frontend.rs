//! A small vhost-user frontend: the VMM's side of the socket, written from the vhost-user
//! specification, with every message built by hand so that tests can also send what no
//! honest VMM would (see [`Frontend::send_raw`] and [`Frontend::send`]).
//!
//! Every wait is bounded: a reply that does not come within [`Frontend::timeout`] is
//! [`FeError::Timeout`], which the hostile tests treat as a hang.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Bytes of a message header: request, flags, size (all u32, native endian).
pub const HDR_LEN: usize = 12;
/// Protocol version in the low two bits of the flags.
pub const VERSION: u32 = 0x1;
pub const FLAG_REPLY: u32 = 0x4;
pub const FLAG_NEED_REPLY: u32 = 0x8;
/// Largest payload we accept in a reply (the backend's replies are tiny).
const MAX_REPLY_PAYLOAD: u32 = 1 << 16;
/// Most fds we accept with one received message.
const MAX_RECV_FDS: usize = 32;

/// Frontend request codes.
pub mod code {
    pub const GET_FEATURES: u32 = 1;
    pub const SET_FEATURES: u32 = 2;
    pub const SET_OWNER: u32 = 3;
    pub const RESET_OWNER: u32 = 4;
    pub const SET_MEM_TABLE: u32 = 5;
    pub const SET_LOG_BASE: u32 = 6;
    pub const SET_LOG_FD: u32 = 7;
    pub const SET_VRING_NUM: u32 = 8;
    pub const SET_VRING_ADDR: u32 = 9;
    pub const SET_VRING_BASE: u32 = 10;
    pub const GET_VRING_BASE: u32 = 11;
    pub const SET_VRING_KICK: u32 = 12;
    pub const SET_VRING_CALL: u32 = 13;
    pub const SET_VRING_ERR: u32 = 14;
    pub const GET_PROTOCOL_FEATURES: u32 = 15;
    pub const SET_PROTOCOL_FEATURES: u32 = 16;
    pub const GET_QUEUE_NUM: u32 = 17;
    pub const SET_VRING_ENABLE: u32 = 18;
    pub const SEND_RARP: u32 = 19;
    pub const NET_SET_MTU: u32 = 20;
    pub const SET_BACKEND_REQ_FD: u32 = 21;
    pub const IOTLB_MSG: u32 = 22;
    pub const SET_VRING_ENDIAN: u32 = 23;
    pub const GET_CONFIG: u32 = 24;
    pub const SET_CONFIG: u32 = 25;
    pub const GET_INFLIGHT_FD: u32 = 31;
    pub const SET_INFLIGHT_FD: u32 = 32;
    pub const RESET_DEVICE: u32 = 34;
    pub const VRING_KICK: u32 = 35;
    pub const GET_MAX_MEM_SLOTS: u32 = 36;
    pub const ADD_MEM_REG: u32 = 37;
    pub const REM_MEM_REG: u32 = 38;
    pub const SET_STATUS: u32 = 39;
    pub const GET_STATUS: u32 = 40;
    pub const SET_DEVICE_STATE_FD: u32 = 42;
    pub const CHECK_DEVICE_STATE: u32 = 43;
}

/// Virtio (and vhost-user transport) feature bits.
pub mod vfeat {
    pub const BLK_SIZE_MAX: u64 = 1 << 1;
    pub const BLK_SEG_MAX: u64 = 1 << 2;
    pub const BLK_GEOMETRY: u64 = 1 << 4;
    pub const BLK_RO: u64 = 1 << 5;
    pub const BLK_BLK_SIZE: u64 = 1 << 6;
    pub const BLK_FLUSH: u64 = 1 << 9;
    pub const BLK_TOPOLOGY: u64 = 1 << 10;
    pub const BLK_CONFIG_WCE: u64 = 1 << 11;
    pub const BLK_MQ: u64 = 1 << 12;
    pub const BLK_DISCARD: u64 = 1 << 13;
    pub const BLK_WRITE_ZEROES: u64 = 1 << 14;
    pub const LOG_ALL: u64 = 1 << 26;
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    pub const PROTOCOL_FEATURES: u64 = 1 << 30;
    pub const VERSION_1: u64 = 1 << 32;
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
    pub const RING_PACKED: u64 = 1 << 34;
    pub const IN_ORDER: u64 = 1 << 35;
    pub const RING_RESET: u64 = 1 << 40;
}

/// vhost-user protocol feature bits.
pub mod pfeat {
    pub const MQ: u64 = 1 << 0;
    pub const LOG_SHMFD: u64 = 1 << 1;
    pub const REPLY_ACK: u64 = 1 << 3;
    pub const BACKEND_REQ: u64 = 1 << 5;
    pub const CONFIG: u64 = 1 << 9;
    pub const BACKEND_SEND_FD: u64 = 1 << 10;
    pub const INFLIGHT_SHMFD: u64 = 1 << 12;
    pub const RESET_DEVICE: u64 = 1 << 13;
    pub const INBAND_NOTIFICATIONS: u64 = 1 << 14;
    pub const CONFIGURE_MEM_SLOTS: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// Bit 8 of the SET_VRING_KICK/CALL/ERR payload: no fd is attached.
pub const VRING_NOFD: u64 = 1 << 8;

/// SET_VRING_ADDR flag `VHOST_VRING_F_LOG`: the used ring's writes are also logged at the
/// payload's `log_guest_addr` (a guest-physical address).
pub const VRING_F_LOG: u32 = 1 << 0;

/// Payload of SET_LOG_BASE (`VhostUserLog`): `{u64 mmap_size, u64 mmap_offset}`.
pub fn log_base_payload(mmap_size: u64, mmap_offset: u64) -> Vec<u8> {
    let mut p = mmap_size.to_ne_bytes().to_vec();
    p.extend_from_slice(&mmap_offset.to_ne_bytes());
    p
}

/// How an exchange with the backend ended, when it did not end well.
#[derive(Debug)]
pub enum FeError {
    /// The backend closed the connection (EOF, ECONNRESET, EPIPE).
    Closed,
    /// No (complete) reply within the timeout: a hang, as far as the tests are concerned.
    Timeout,
    /// REPLY_ACK answered with a non-zero value: the backend refused the request.
    Nack(u64),
    /// A reply that breaks the protocol (wrong code, size, ...).
    Protocol(String),
    Io(io::Error),
}

impl std::fmt::Display for FeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FeError::Closed => write!(f, "the backend closed the connection"),
            FeError::Timeout => write!(f, "no reply in time"),
            FeError::Nack(v) => write!(f, "refused (ack value {v:#x})"),
            FeError::Protocol(s) => write!(f, "protocol violation: {s}"),
            FeError::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for FeError {}

impl FeError {
    /// The backend said no, one way or another (not a hang, not a broken reply).
    pub fn is_refusal(&self) -> bool {
        matches!(self, FeError::Closed | FeError::Nack(_))
    }
}

fn io_err(e: io::Error) -> FeError {
    match e.raw_os_error() {
        Some(libc::ECONNRESET) | Some(libc::EPIPE) | Some(libc::ENOTCONN) => FeError::Closed,
        _ => FeError::Io(e),
    }
}

pub type FeResult<T> = Result<T, FeError>;

/// A received message.
#[derive(Debug)]
pub struct Msg {
    pub code: u32,
    pub flags: u32,
    pub payload: Vec<u8>,
    pub fds: Vec<OwnedFd>,
}

impl Msg {
    pub fn u64(&self) -> FeResult<u64> {
        let b: [u8; 8] = self.payload.as_slice().try_into().map_err(|_| {
            FeError::Protocol(format!(
                "reply to request {} carries {} bytes, expected a u64",
                self.code,
                self.payload.len()
            ))
        })?;
        Ok(u64::from_ne_bytes(b))
    }
}

/// One entry of a memory table (SET_MEM_TABLE) or the region of ADD_MEM_REG / REM_MEM_REG.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRegion {
    pub gpa: u64,
    pub size: u64,
    pub uaddr: u64,
    pub mmap_offset: u64,
}

impl MemRegion {
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, v) in [self.gpa, self.size, self.uaddr, self.mmap_offset]
            .iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_ne_bytes());
        }
        b
    }
}

/// Payload of SET_MEM_TABLE for `regions` (the count field says `regions.len()`).
pub fn mem_table_payload(regions: &[MemRegion]) -> Vec<u8> {
    let mut p = Vec::with_capacity(8 + 32 * regions.len());
    p.extend_from_slice(&(regions.len() as u32).to_ne_bytes());
    p.extend_from_slice(&0u32.to_ne_bytes());
    for r in regions {
        p.extend_from_slice(&r.to_bytes());
    }
    p
}

/// Payload of ADD_MEM_REG / REM_MEM_REG.
pub fn single_region_payload(r: &MemRegion) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    p.extend_from_slice(&r.to_bytes());
    p
}

/// Payload of a vring state message (SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE).
pub fn vring_state(index: u32, num: u32) -> Vec<u8> {
    let mut p = index.to_ne_bytes().to_vec();
    p.extend_from_slice(&num.to_ne_bytes());
    p
}

/// Payload of SET_VRING_ADDR (all addresses in the frontend's address space).
pub fn vring_addr(index: u32, flags: u32, desc: u64, used: u64, avail: u64, log: u64) -> Vec<u8> {
    let mut p = index.to_ne_bytes().to_vec();
    p.extend_from_slice(&flags.to_ne_bytes());
    for v in [desc, used, avail, log] {
        p.extend_from_slice(&v.to_ne_bytes());
    }
    p
}

/// Payload of GET_CONFIG / SET_CONFIG: offset, size, flags, then `data`.
pub fn config_payload(offset: u32, size: u32, flags: u32, data: &[u8]) -> Vec<u8> {
    let mut p = offset.to_ne_bytes().to_vec();
    p.extend_from_slice(&size.to_ne_bytes());
    p.extend_from_slice(&flags.to_ne_bytes());
    p.extend_from_slice(data);
    p
}

/// A header with `code`, `flags`, `size`, followed by `payload`.
pub fn message(code: u32, flags: u32, size: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HDR_LEN + payload.len());
    m.extend_from_slice(&code.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&size.to_ne_bytes());
    m.extend_from_slice(payload);
    m
}

/// Payload of GET_INFLIGHT_FD / SET_INFLIGHT_FD (`VhostUserInflight`): the size of the
/// shared inflight region and where it starts in its fd, for `num_queues` queues of
/// `queue_size` entries. 24 bytes: two u64, two u16 and the C padding after them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inflight {
    pub mmap_size: u64,
    pub mmap_offset: u64,
    pub num_queues: u16,
    pub queue_size: u16,
}

impl Inflight {
    /// Bytes on the wire (with the trailing padding).
    pub const LEN: usize = 24;

    pub fn to_bytes(&self) -> [u8; Inflight::LEN] {
        let mut b = [0u8; Inflight::LEN];
        b[0..8].copy_from_slice(&self.mmap_size.to_ne_bytes());
        b[8..16].copy_from_slice(&self.mmap_offset.to_ne_bytes());
        b[16..18].copy_from_slice(&self.num_queues.to_ne_bytes());
        b[18..20].copy_from_slice(&self.queue_size.to_ne_bytes());
        b
    }

    /// Parse a payload of exactly [`Inflight::LEN`] bytes.
    pub fn from_bytes(b: &[u8]) -> Option<Inflight> {
        if b.len() != Inflight::LEN {
            return None;
        }
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap());
        let u16_at = |i: usize| u16::from_ne_bytes(b[i..i + 2].try_into().unwrap());
        Some(Inflight {
            mmap_size: u64_at(0),
            mmap_offset: u64_at(8),
            num_queues: u16_at(16),
            queue_size: u16_at(18),
        })
    }
}

/// Bytes one queue takes in a split-ring inflight region (vhost-user.rst, "Inflight I/O
/// tracking"; the layout of libvhost-user): a 16-byte header and one 16-byte `DescStateSplit`
/// per entry, rounded up to 64 bytes. Queue `i` starts at `i` times this.
pub fn inflight_queue_region_size(queue_size: u16) -> u64 {
    (16 + 16 * u64::from(queue_size)).next_multiple_of(64)
}

/// A GET_CONFIG answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigReply {
    pub offset: u32,
    pub size: u32,
    pub flags: u32,
    pub data: Vec<u8>,
}

/// The frontend end of a vhost-user connection.
pub struct Frontend {
    sock: UnixStream,
    /// How long to wait for a reply (or for the socket to take our bytes).
    pub timeout: Duration,
    /// REPLY_ACK is negotiated: messages without a reply of their own carry NEED_REPLY and
    /// wait for the backend's ack.
    pub reply_ack: bool,
}

impl AsRawFd for Frontend {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// Wait until `fd` has `events` or the deadline passes. Returns the revents (0 on timeout).
pub fn poll_fd(fd: RawFd, events: i16, deadline: Instant) -> i16 {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            panic!("poll: {}", io::Error::last_os_error());
        }
        return p.revents;
    }
}

impl Frontend {
    /// Connect to a backend's socket. The reply timeout defaults to 5 s.
    pub fn connect(path: &Path) -> io::Result<Frontend> {
        let sock = UnixStream::connect(path)?;
        sock.set_nonblocking(true)?;
        Ok(Frontend {
            sock,
            timeout: Duration::from_secs(5),
            reply_ack: false,
        })
    }

    /// Send exactly `bytes`, with `fds` attached (SCM_RIGHTS) to the first byte. Nothing is
    /// checked: this is the escape hatch for lies. Blocks at most [`Frontend::timeout`] if
    /// the backend stops reading.
    pub fn send_raw(&self, bytes: &[u8], fds: &[RawFd]) -> FeResult<()> {
        let deadline = Instant::now() + self.timeout;
        let mut sent = 0;
        let mut fds_pending = !fds.is_empty();
        while sent < bytes.len() {
            let chunk = &bytes[sent..];
            let mut iov = libc::iovec {
                iov_base: chunk.as_ptr() as *mut libc::c_void,
                iov_len: chunk.len(),
            };
            // SAFETY: an all-zero msghdr is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            // Control buffer as u64s for cmsghdr alignment.
            let mut cbuf: Vec<u64>;
            if fds_pending {
                let payload = std::mem::size_of_val(fds) as u32;
                // SAFETY: CMSG_SPACE is a pure size computation.
                let space = unsafe { libc::CMSG_SPACE(payload) } as usize;
                cbuf = vec![0u64; space.div_ceil(8)];
                msg.msg_control = cbuf.as_mut_ptr().cast();
                msg.msg_controllen = space as _;
                // SAFETY: msg_control points at `space` zeroed, aligned bytes, enough for one
                // cmsghdr carrying `fds`; CMSG_FIRSTHDR/CMSG_DATA stay inside that buffer.
                unsafe {
                    let c = libc::CMSG_FIRSTHDR(&msg);
                    (*c).cmsg_level = libc::SOL_SOCKET;
                    (*c).cmsg_type = libc::SCM_RIGHTS;
                    (*c).cmsg_len = libc::CMSG_LEN(payload) as _;
                    std::ptr::copy_nonoverlapping(
                        fds.as_ptr().cast::<u8>(),
                        libc::CMSG_DATA(c),
                        payload as usize,
                    );
                }
            }
            // SAFETY: msg, iov and the control buffer are valid for the duration of the call.
            let n = unsafe { libc::sendmsg(self.sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        if poll_fd(self.sock.as_raw_fd(), libc::POLLOUT, deadline) == 0 {
                            return Err(FeError::Timeout);
                        }
                        continue;
                    }
                    _ => return Err(io_err(e)),
                }
            }
            fds_pending = false;
            sent += n as usize;
        }
        Ok(())
    }

    /// Send a message: header (`code`, version 1 | `flags`, payload size) and payload.
    pub fn send(&self, code: u32, flags: u32, payload: &[u8], fds: &[RawFd]) -> FeResult<()> {
        self.send_raw(
            &message(code, VERSION | flags, payload.len() as u32, payload),
            fds,
        )
    }

    fn read_some(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        deadline: Instant,
    ) -> FeResult<usize> {
        loop {
            let ev = poll_fd(self.sock.as_raw_fd(), libc::POLLIN, deadline);
            if ev == 0 {
                return Err(FeError::Timeout);
            }
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: CMSG_SPACE is a pure size computation.
            let space = unsafe { libc::CMSG_SPACE((MAX_RECV_FDS * 4) as u32) } as usize;
            let mut cbuf = vec![0u64; space.div_ceil(8)];
            // SAFETY: an all-zero msghdr is a valid empty header.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space as _;
            // SAFETY: msg, iov and cbuf are valid and writable for the call.
            let n =
                unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) | Some(libc::EAGAIN) => continue,
                    _ => return Err(io_err(e)),
                }
            }
            // SAFETY: walking the control messages the kernel filled in, within msg_controllen.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                        let data = libc::CMSG_DATA(c);
                        let bytes = (*c).cmsg_len as usize - (data as usize - c as usize);
                        for i in 0..bytes / 4 {
                            let fd = std::ptr::read_unaligned(data.add(i * 4).cast::<RawFd>());
                            fds.push(OwnedFd::from_raw_fd(fd));
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            if n == 0 {
                return Err(FeError::Closed);
            }
            return Ok(n as usize);
        }
    }

    /// Receive one message, waiting at most `timeout`.
    pub fn recv(&self, timeout: Duration) -> FeResult<Msg> {
        let deadline = Instant::now() + timeout;
        let mut fds = Vec::new();
        let mut hdr = [0u8; HDR_LEN];
        let mut got = 0;
        while got < HDR_LEN {
            got += self.read_some(&mut hdr[got..], &mut fds, deadline)?;
        }
        let field = |i: usize| u32::from_ne_bytes(hdr[i * 4..i * 4 + 4].try_into().unwrap());
        let (code, flags, size) = (field(0), field(1), field(2));
        if size > MAX_REPLY_PAYLOAD {
            return Err(FeError::Protocol(format!(
                "message {code} announces a payload of {size} bytes"
            )));
        }
        let mut payload = vec![0u8; size as usize];
        let mut got = 0;
        while got < payload.len() {
            got += self.read_some(&mut payload[got..], &mut fds, deadline)?;
        }
        Ok(Msg {
            code,
            flags,
            payload,
            fds,
        })
    }

    /// Send a request with `extra_flags` and wait for its reply; checks the reply's code,
    /// REPLY flag and version.
    pub fn call_flags(
        &self,
        code: u32,
        extra_flags: u32,
        payload: &[u8],
        fds: &[RawFd],
    ) -> FeResult<Msg> {
        self.send(code, extra_flags, payload, fds)?;
        let reply = self.recv(self.timeout)?;
        if reply.code != code {
            return Err(FeError::Protocol(format!(
                "reply carries request code {} for request {code}",
                reply.code
            )));
        }
        if reply.flags & FLAG_REPLY == 0 || reply.flags & 0x3 != VERSION {
            return Err(FeError::Protocol(format!(
                "reply to {code} has flags {:#x}",
                reply.flags
            )));
        }
        Ok(reply)
    }

    /// A request that has a reply of its own (GET_*).
    pub fn call(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> FeResult<Msg> {
        self.call_flags(code, 0, payload, fds)
    }

    /// A request without a reply of its own: with REPLY_ACK negotiated, asks for the ack and
    /// turns a non-zero one into [`FeError::Nack`].
    pub fn set(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> FeResult<()> {
        if self.reply_ack {
            self.set_acked(code, payload, fds)
        } else {
            self.send(code, 0, payload, fds)
        }
    }

    /// Like [`Frontend::set`] but always with NEED_REPLY (whether or not REPLY_ACK was
    /// negotiated): the backend must ack.
    pub fn set_acked(&self, code: u32, payload: &[u8], fds: &[RawFd]) -> FeResult<()> {
        let v = self
            .call_flags(code, FLAG_NEED_REPLY, payload, fds)?
            .u64()?;
        if v != 0 {
            return Err(FeError::Nack(v));
        }
        Ok(())
    }

    /// A bounded liveness probe: GET_FEATURES must be answered within the timeout. Replies
    /// to earlier (hostile) messages still in the socket are skipped.
    pub fn ping(&self) -> FeResult<u64> {
        self.send(code::GET_FEATURES, 0, &[], &[])?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.recv(left)?;
            if m.code == code::GET_FEATURES && m.flags & FLAG_REPLY != 0 && m.payload.len() == 8 {
                return m.u64();
            }
        }
    }

    /// Whether the backend closed the connection, waiting at most `timeout` for it.
    /// Any bytes it sends meanwhile are read and dropped.
    pub fn wait_closed(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 256];
        let mut fds = Vec::new();
        loop {
            match self.read_some(&mut buf, &mut fds, deadline) {
                Ok(_) => continue,
                Err(FeError::Timeout) => return false,
                Err(_) => return true,
            }
        }
    }

    /// Whether the backend has closed its end already (non-blocking check).
    pub fn peer_hung_up(&self) -> bool {
        let ev = poll_fd(self.sock.as_raw_fd(), libc::POLLRDHUP, Instant::now());
        ev & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// The pid of the process at the other end of the socket (SO_PEERCRED: the process
    /// that listens on the backend's socket).
    pub fn peer_pid(&self) -> io::Result<i32> {
        // SAFETY: an all-zero ucred is a valid value of this plain C struct.
        let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
        let r = unsafe {
            libc::getsockopt(
                self.sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(cred.pid)
    }

    /// Close our sending direction (the backend sees EOF).
    pub fn shutdown_write(&self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
    }

    // ---- typed helpers ----

    pub fn get_features(&self) -> FeResult<u64> {
        self.call(code::GET_FEATURES, &[], &[])?.u64()
    }

    pub fn set_features(&self, f: u64) -> FeResult<()> {
        self.set(code::SET_FEATURES, &f.to_ne_bytes(), &[])
    }

    pub fn get_protocol_features(&self) -> FeResult<u64> {
        self.call(code::GET_PROTOCOL_FEATURES, &[], &[])?.u64()
    }

    /// Set the protocol features; REPLY_ACK applies to this very message only if it had
    /// been negotiated before, so `reply_ack` is updated afterwards.
    pub fn set_protocol_features(&mut self, f: u64) -> FeResult<()> {
        self.set(code::SET_PROTOCOL_FEATURES, &f.to_ne_bytes(), &[])?;
        self.reply_ack = f & pfeat::REPLY_ACK != 0;
        Ok(())
    }

    pub fn set_owner(&self) -> FeResult<()> {
        self.set(code::SET_OWNER, &[], &[])
    }

    pub fn get_queue_num(&self) -> FeResult<u64> {
        self.call(code::GET_QUEUE_NUM, &[], &[])?.u64()
    }

    pub fn get_max_mem_slots(&self) -> FeResult<u64> {
        self.call(code::GET_MAX_MEM_SLOTS, &[], &[])?.u64()
    }

    pub fn set_mem_table(&self, regions: &[MemRegion], fds: &[RawFd]) -> FeResult<()> {
        self.set(code::SET_MEM_TABLE, &mem_table_payload(regions), fds)
    }

    pub fn add_mem_reg(&self, r: &MemRegion, fd: RawFd) -> FeResult<()> {
        self.set(code::ADD_MEM_REG, &single_region_payload(r), &[fd])
    }

    pub fn rem_mem_reg(&self, r: &MemRegion) -> FeResult<()> {
        self.set(code::REM_MEM_REG, &single_region_payload(r), &[])
    }

    pub fn set_vring_num(&self, index: u32, num: u32) -> FeResult<()> {
        self.set(code::SET_VRING_NUM, &vring_state(index, num), &[])
    }

    pub fn set_vring_base(&self, index: u32, base: u32) -> FeResult<()> {
        self.set(code::SET_VRING_BASE, &vring_state(index, base), &[])
    }

    pub fn get_vring_base(&self, index: u32) -> FeResult<u32> {
        let r = self.call(code::GET_VRING_BASE, &vring_state(index, 0), &[])?;
        if r.payload.len() != 8 {
            return Err(FeError::Protocol(format!(
                "GET_VRING_BASE reply of {} bytes",
                r.payload.len()
            )));
        }
        Ok(u32::from_ne_bytes(r.payload[4..8].try_into().unwrap()))
    }

    pub fn set_vring_addr(&self, index: u32, desc: u64, used: u64, avail: u64) -> FeResult<()> {
        self.set(
            code::SET_VRING_ADDR,
            &vring_addr(index, 0, desc, used, avail, 0),
            &[],
        )
    }

    /// SET_VRING_ADDR with `flags` (e.g. [`VRING_F_LOG`]) and a `log` guest address, as QEMU
    /// sends it when it switches dirty logging on or off for a running ring.
    #[allow(clippy::too_many_arguments)]
    pub fn set_vring_addr_log(
        &self,
        index: u32,
        flags: u32,
        desc: u64,
        used: u64,
        avail: u64,
        log: u64,
    ) -> FeResult<()> {
        self.set(
            code::SET_VRING_ADDR,
            &vring_addr(index, flags, desc, used, avail, log),
            &[],
        )
    }

    /// SET_LOG_BASE as QEMU sends it with LOG_SHMFD negotiated: no NEED_REPLY flag (even with
    /// REPLY_ACK), one fd, and then a wait for the backend's reply, a SET_LOG_BASE message of
    /// its own. Returns that reply (its payload is the backend's business: the `vhost` crate
    /// echoes the 16 bytes, libvhost-user sends 8). `fds` may be empty or hold several (the
    /// hostile tests lie).
    pub fn set_log_base(&self, mmap_size: u64, mmap_offset: u64, fds: &[RawFd]) -> FeResult<Msg> {
        self.call(
            code::SET_LOG_BASE,
            &log_base_payload(mmap_size, mmap_offset),
            fds,
        )
    }

    /// Send GET_VRING_BASE for ring `index` without waiting for the answer (a backend waits
    /// for the ring's requests in flight before it answers); [`Frontend::recv_vring_base`]
    /// takes the answer.
    pub fn send_get_vring_base(&self, index: u32) -> FeResult<()> {
        self.send(code::GET_VRING_BASE, 0, &vring_state(index, 0), &[])
    }

    /// The answer to a GET_VRING_BASE sent with [`Frontend::send_get_vring_base`], waiting at
    /// most `timeout`: the ring's base (next avail index).
    pub fn recv_vring_base(&self, timeout: Duration) -> FeResult<u32> {
        let r = self.recv(timeout)?;
        if r.code != code::GET_VRING_BASE || r.flags & FLAG_REPLY == 0 || r.payload.len() != 8 {
            return Err(FeError::Protocol(format!(
                "expected the GET_VRING_BASE reply, got request {} flags {:#x} with {} bytes",
                r.code,
                r.flags,
                r.payload.len()
            )));
        }
        Ok(u32::from_ne_bytes(r.payload[4..8].try_into().unwrap()))
    }

    /// SET_VRING_KICK / CALL / ERR (`code`) for ring `index` with `fd`, or none.
    pub fn set_vring_fd(&self, code: u32, index: u32, fd: Option<RawFd>) -> FeResult<()> {
        let v = u64::from(index) | if fd.is_none() { VRING_NOFD } else { 0 };
        let fds: Vec<RawFd> = fd.into_iter().collect();
        self.set(code, &v.to_ne_bytes(), &fds)
    }

    pub fn set_vring_enable(&self, index: u32, enable: bool) -> FeResult<()> {
        self.set(
            code::SET_VRING_ENABLE,
            &vring_state(index, u32::from(enable)),
            &[],
        )
    }

    /// GET_INFLIGHT_FD for `num_queues` queues of `queue_size` entries: the backend's answer
    /// (where the region is in the fd, and how large) and the fd it attached.
    pub fn get_inflight_fd(
        &self,
        num_queues: u16,
        queue_size: u16,
    ) -> FeResult<(Inflight, OwnedFd)> {
        let ask = Inflight {
            num_queues,
            queue_size,
            ..Inflight::default()
        };
        let mut r = self.call(code::GET_INFLIGHT_FD, &ask.to_bytes(), &[])?;
        let info = Inflight::from_bytes(&r.payload).ok_or_else(|| {
            FeError::Protocol(format!(
                "GET_INFLIGHT_FD reply of {} bytes, expected {}",
                r.payload.len(),
                Inflight::LEN
            ))
        })?;
        if r.fds.len() != 1 {
            return Err(FeError::Protocol(format!(
                "GET_INFLIGHT_FD reply with {} fds, expected 1",
                r.fds.len()
            )));
        }
        Ok((info, r.fds.remove(0)))
    }

    /// SET_INFLIGHT_FD: hand the backend the inflight region `info` describes, in `fd` (what
    /// QEMU sends before it starts the rings, on every connection, with the same fd).
    pub fn set_inflight_fd(&self, info: &Inflight, fd: RawFd) -> FeResult<()> {
        self.set(code::SET_INFLIGHT_FD, &info.to_bytes(), &[fd])
    }

    /// Start ring `index` the way QEMU does (SET_VRING_NUM, BASE, ADDR, KICK, CALL), with the
    /// addresses in the frontend's address space; after a reconnect `base` is whatever the
    /// frontend believes, e.g. the used index QEMU rewinds to when the backend died.
    #[allow(clippy::too_many_arguments)]
    pub fn start_vring(
        &self,
        index: u32,
        num: u16,
        base: u16,
        desc: u64,
        used: u64,
        avail: u64,
        kick: RawFd,
        call: RawFd,
    ) -> FeResult<()> {
        self.set_vring_num(index, u32::from(num))?;
        self.set_vring_base(index, u32::from(base))?;
        self.set_vring_addr(index, desc, used, avail)?;
        self.set_vring_fd(code::SET_VRING_KICK, index, Some(kick))?;
        self.set_vring_fd(code::SET_VRING_CALL, index, Some(call))
    }

    /// GET_CONFIG of `size` bytes at `offset` (the request carries `size` zero bytes, as
    /// QEMU sends it).
    pub fn get_config(&self, offset: u32, size: u32) -> FeResult<ConfigReply> {
        let data = vec![0u8; size.min(4096) as usize];
        self.get_config_raw(&config_payload(offset, size, 0, &data))
    }

    /// GET_CONFIG with an arbitrary payload; parses the reply.
    pub fn get_config_raw(&self, payload: &[u8]) -> FeResult<ConfigReply> {
        let r = self.call(code::GET_CONFIG, payload, &[])?;
        if r.payload.is_empty() {
            // libvhost-user's way of saying no: a reply without any payload.
            return Ok(ConfigReply {
                offset: 0,
                size: 0,
                flags: 0,
                data: Vec::new(),
            });
        }
        if r.payload.len() < 12 {
            return Err(FeError::Protocol(format!(
                "GET_CONFIG reply of {} bytes",
                r.payload.len()
            )));
        }
        let f = |i: usize| u32::from_ne_bytes(r.payload[i * 4..i * 4 + 4].try_into().unwrap());
        Ok(ConfigReply {
            offset: f(0),
            size: f(1),
            flags: f(2),
            data: r.payload[12..].to_vec(),
        })
    }
}

/// An eventfd (kick or call), non-blocking.
pub fn eventfd() -> OwnedFd {
    // SAFETY: eventfd with valid flags; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Signal an eventfd.
pub fn eventfd_signal(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writing 8 bytes from a valid buffer.
    let _ = unsafe { libc::write(fd, one.as_ptr().cast(), 8) };
}

/// Drain a (non-blocking) eventfd; returns whether it was signalled.
pub fn eventfd_drain(fd: RawFd) -> bool {
    let mut b = [0u8; 8];
    // SAFETY: reading at most 8 bytes into a valid buffer.
    unsafe { libc::read(fd, b.as_mut_ptr().cast(), 8) == 8 }
}

/// A pipe: (read end, write end).
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds into a valid array.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(r, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: two fresh fds nobody else owns.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}
