//! Inflight I/O tracking (vhost-user `INFLIGHT_SHMFD`): which descriptor heads a queue has
//! taken from the guest and not yet given back, recorded in shared memory that the VMM keeps
//! across backend restarts, so that a restarted backend resubmits exactly those requests.
//!
//! **The region** (QEMU `docs/interop/vhost-user.rst`, "Inflight I/O tracking", split rings).
//! The backend creates it (GET_INFLIGHT_FD), the VMM keeps the fd and hands it back on every
//! start (SET_INFLIGHT_FD), also to a new backend process after a crash. Queue `i` starts at
//! `i * queue_region_len(queue_size)` (16 + 16 × queue_size bytes, rounded up to 64, as
//! libvhost-user lays it out) and holds:
//!
//! ```text
//! offset  0  u64 features         (0)
//!         8  u16 version          (0: fresh or reset by the VMM; 1: in use)
//!        10  u16 desc_num         (queue size)
//!        12  u16 last_batch_head  (the head whose used entry is being published)
//!        14  u16 used_idx         (the used index once that publication is complete)
//!        16  desc_num × DescStateSplit, 16 bytes each:
//!            +0 u8 inflight, +1 u8 padding[5], +6 u16 next, +8 u64 counter
//! ```
//!
//! (The `vhost` crate's `QueueRegionSplit` is 24 bytes, not this 16-byte header: it is not
//! used here.)
//!
//! **On the data path** a head is marked in flight (with the next value of a counter) when it
//! is taken; completing it sets `last_batch_head`, publishes the used entry (used ring entry,
//! then used index), clears the mark and stores the new used index, in that order. A crash at
//! any point leaves the region telling exactly which heads the guest has not had back: if it
//! died after the used index moved but before the mark was cleared, `used_idx` in the region
//! differs from the used ring's and `last_batch_head` names the one head to unmark.
//!
//! **On a queue start** with a region in use, [`QueueInflight::start`] reconciles `used_idx`
//! with the used ring, collects the heads still marked, oldest counter first, and says where
//! the next avail index is: the used index plus the number in flight (the VMM rewound it to
//! the used index, as QEMU does when GET_VRING_BASE fails on a dead backend). The worker
//! resubmits those heads before it takes anything new.
//!
//! The region is shared with the VMM, which may write anything into it at any time: every
//! value read from it is checked before use (a head beyond the queue is ignored), and every
//! access is an atomic load or store of naturally aligned fields of a mapping we own. The memfd
//! this backend creates is sealed against shrinking and growing, and a region the VMM hands
//! over must carry the shrink seal: a VMM cannot make our accesses fault.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::error::InflightError;
use crate::request::Desc;

/// Bytes of a queue's header.
pub const HEADER_LEN: usize = 16;
/// Bytes of one `DescStateSplit`.
pub const DESC_LEN: usize = 16;
/// Queue regions start on this boundary.
pub const QUEUE_ALIGN: usize = 64;
/// The region version this backend writes.
pub const VERSION: u16 = 1;

// Header fields.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
// DescStateSplit fields.
const D_INFLIGHT: usize = 0;
const D_COUNTER: usize = 8;

/// The name of the memfd (shown in /proc/PID/fd of the VMM as `/memfd:vhost-inflight`).
const MEMFD_NAME: &std::ffi::CStr = c"vhost-inflight";

/// Bytes one queue's region takes.
pub fn queue_region_len(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).next_multiple_of(QUEUE_ALIGN)
}

/// Bytes the whole region takes.
pub fn region_len(num_queues: u16, queue_size: u16) -> usize {
    usize::from(num_queues) * queue_region_len(queue_size)
}

/// Create a zeroed region for `num_queues` queues of `queue_size` (GET_INFLIGHT_FD): a memfd
/// sealed against growing and shrinking, each queue's `desc_num` filled in and its version 0
/// (fresh). Returns the fd and its size.
pub fn create_region(num_queues: u16, queue_size: u16) -> io::Result<(File, u64)> {
    if num_queues == 0 || queue_size == 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an inflight region needs at least one queue of at least one entry",
        ));
    }
    let len = region_len(num_queues, queue_size);
    // SAFETY: memfd_create with a NUL-terminated name and flags; it returns a new fd or -1.
    let fd = unsafe {
        libc::memfd_create(
            MEMFD_NAME.as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new fd that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len as u64)?;
    let map = InflightMap::map_file(&file, 0, len, num_queues, queue_size)?;
    for q in 0..num_queues {
        let base = usize::from(q) * queue_region_len(queue_size);
        map.u16_at(base + OFF_DESC_NUM)
            .store(queue_size, Ordering::Relaxed);
    }
    drop(map);
    let seals = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on the fd we own.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((file, len as u64))
}

/// A mapped inflight region (SET_INFLIGHT_FD).
pub struct InflightMap {
    ptr: NonNull<u8>,
    len: usize,
    num_queues: u16,
    queue_size: u16,
}

// SAFETY: the mapping is shared memory reached only through atomic accessors; the pointer is
// valid for the life of the value (unmapped in Drop).
unsafe impl Send for InflightMap {}
// SAFETY: as above: concurrent access goes through atomics only.
unsafe impl Sync for InflightMap {}

impl InflightMap {
    /// Map the region the VMM hands over: `size` bytes at `offset` of `file`, for
    /// `num_queues` queues of `queue_size`. Refused unless the file is sealed against
    /// shrinking (else the VMM could make every later access fault) and large enough.
    pub fn adopt(
        file: &File,
        offset: u64,
        size: u64,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Arc<InflightMap>, InflightError> {
        if num_queues == 0 || queue_size == 0 {
            return Err(InflightError::NoQueues);
        }
        let need = region_len(num_queues, queue_size) as u64;
        if size < need {
            return Err(InflightError::TooSmall {
                size,
                num_queues,
                queue_size,
                need,
            });
        }
        // SAFETY: fcntl F_GET_SEALS on an fd we own; it reads no memory of ours.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(InflightError::NotSealed);
        }
        let flen = file.metadata().map_err(InflightError::Stat)?.len();
        if offset.checked_add(need).is_none_or(|end| end > flen) {
            return Err(InflightError::PastEnd {
                need,
                offset,
                file_len: flen,
            });
        }
        let len = usize::try_from(need).map_err(|_| InflightError::TooLarge)?;
        Self::map_file(file, offset, len, num_queues, queue_size)
            .map(Arc::new)
            .map_err(InflightError::Map)
    }

    fn map_file(
        file: &File,
        offset: u64,
        len: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> io::Result<InflightMap> {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: a new shared mapping of `len` bytes of a file we hold; the kernel picks the
        // address, so no existing mapping is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave NULL"))?;
        Ok(InflightMap {
            ptr,
            len,
            num_queues,
            queue_size,
        })
    }

    /// The tracking state of queue `index`, if the region has one for it.
    pub fn queue(self: &Arc<Self>, index: u16) -> Option<QueueInflight> {
        (index < self.num_queues).then(|| QueueInflight {
            base: usize::from(index) * queue_region_len(self.queue_size),
            desc_num: self.queue_size,
            counter: 0,
            map: self.clone(),
        })
    }

    /// The queue size the region was laid out for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    fn u8_at(&self, off: usize) -> &AtomicU8 {
        assert!(off < self.len);
        // SAFETY: `off` is inside the mapping (checked), which lives as long as `self`; any
        // byte is a valid AtomicU8.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU8>() }
    }

    fn u16_at(&self, off: usize) -> &AtomicU16 {
        assert!(off + 2 <= self.len && off.is_multiple_of(2));
        // SAFETY: inside the mapping (checked) and 2-aligned (the mapping is page-aligned and
        // `off` even); any bit pattern is a valid AtomicU16.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU16>() }
    }

    fn u64_at(&self, off: usize) -> &AtomicU64 {
        assert!(off + 8 <= self.len && off.is_multiple_of(8));
        // SAFETY: inside the mapping (checked) and 8-aligned; any bit pattern is valid.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU64>() }
    }
}

impl Drop for InflightMap {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map_file`; no reference into it
        // outlives `self` (every accessor borrows `self`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Where a queue starts after a restart.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// The next avail index: the used index plus the heads in flight. `None` for a fresh
    /// region (the VMM's SET_VRING_BASE stands).
    pub next_avail: Option<u16>,
    /// Heads to resubmit before any new request, oldest first.
    pub resubmit: Vec<u16>,
}

/// One queue's part of the region, owned by the queue's worker.
pub struct QueueInflight {
    map: Arc<InflightMap>,
    base: usize,
    desc_num: u16,
    /// The counter the next head is marked with.
    counter: u64,
}

impl QueueInflight {
    fn desc(&self, head: u16) -> usize {
        self.base + HEADER_LEN + usize::from(head) * DESC_LEN
    }

    /// Start the queue, whose ring has `size` entries and whose used ring says `ring_used_idx`:
    /// set up a fresh region, or reconcile one in use and say what to resubmit.
    pub fn start(&mut self, size: u16, ring_used_idx: u16) -> Recovery {
        let m = &self.map;
        let version = m.u16_at(self.base + OFF_VERSION).load(Ordering::Acquire);
        if version == 0 {
            // Fresh (just created, or the VMM reset the device and zeroed it).
            for i in 0..self.desc_num {
                m.u8_at(self.desc(i) + D_INFLIGHT)
                    .store(0, Ordering::Relaxed);
            }
            m.u16_at(self.base + OFF_DESC_NUM)
                .store(self.desc_num, Ordering::Relaxed);
            m.u16_at(self.base + OFF_USED_IDX)
                .store(ring_used_idx, Ordering::Relaxed);
            m.u16_at(self.base + OFF_VERSION)
                .store(VERSION, Ordering::Release);
            self.counter = 0;
            return Recovery::default();
        }
        let region_used = m.u16_at(self.base + OFF_USED_IDX).load(Ordering::Acquire);
        if region_used != ring_used_idx {
            // Died after publishing `last_batch_head` and before unmarking it.
            let last = m
                .u16_at(self.base + OFF_LAST_BATCH_HEAD)
                .load(Ordering::Acquire);
            if last < self.desc_num {
                m.u8_at(self.desc(last) + D_INFLIGHT)
                    .store(0, Ordering::Release);
            }
            fence(Ordering::SeqCst);
            m.u16_at(self.base + OFF_USED_IDX)
                .store(ring_used_idx, Ordering::Release);
        }
        let mut marked: Vec<(u64, u16)> = Vec::new();
        for head in 0..self.desc_num.min(size) {
            if m.u8_at(self.desc(head) + D_INFLIGHT)
                .load(Ordering::Acquire)
                == 1
            {
                let c = m
                    .u64_at(self.desc(head) + D_COUNTER)
                    .load(Ordering::Acquire);
                marked.push((c, head));
            }
        }
        marked.sort_unstable();
        self.counter = marked.last().map_or(0, |&(c, _)| c.wrapping_add(1));
        Recovery {
            next_avail: Some(ring_used_idx.wrapping_add(marked.len() as u16)),
            resubmit: marked.into_iter().map(|(_, h)| h).collect(),
        }
    }

    /// `head` was taken from the guest.
    pub fn mark(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let d = self.desc(head);
        self.map
            .u64_at(d + D_COUNTER)
            .store(self.counter, Ordering::Relaxed);
        self.counter = self.counter.wrapping_add(1);
        self.map.u8_at(d + D_INFLIGHT).store(1, Ordering::Release);
    }

    /// `head`'s used entry is about to be published.
    pub fn before_publish(&self, head: u16) {
        self.map
            .u16_at(self.base + OFF_LAST_BATCH_HEAD)
            .store(head, Ordering::Release);
        fence(Ordering::SeqCst);
    }

    /// `head`'s used entry is published and the used index is now `used_idx`.
    pub fn after_publish(&self, head: u16, used_idx: u16) {
        fence(Ordering::SeqCst);
        if head < self.desc_num {
            self.map
                .u8_at(self.desc(head) + D_INFLIGHT)
                .store(0, Ordering::Release);
        }
        fence(Ordering::SeqCst);
        self.map
            .u16_at(self.base + OFF_USED_IDX)
            .store(used_idx, Ordering::Release);
    }
}

/// Read the descriptor chain that starts at `head` of the split-ring descriptor table at
/// `desc_table` (`queue_size` entries), following NEXT links and one level of INDIRECT table,
/// into `out`. For resubmitting a head after a restart (the avail ring is not read again).
/// Stops at the first descriptor that cannot be read or breaks the rules (a loop, a link out
/// of the table, a nested or misaligned indirect table): what was read so far is in `out`, and
/// request parsing then refuses the request as it would any malformed chain.
pub fn read_chain<M: GuestMemory>(
    mem: &M,
    desc_table: u64,
    queue_size: u16,
    head: u16,
    out: &mut Vec<Desc>,
) {
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;
    out.clear();
    let (mut table, mut size, mut idx) = (desc_table, queue_size, head);
    let mut indirect = false;
    // At most one pass over each table: a loop ends here.
    let mut ttl = usize::from(queue_size);
    while idx < size && ttl > 0 {
        let Some(addr) = table.checked_add(u64::from(idx) * 16) else {
            return;
        };
        let Ok(raw) = mem.read_obj::<[u8; 16]>(GuestAddress(addr)) else {
            return;
        };
        let d_addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
        let d_len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
        let flags = u16::from_le_bytes([raw[12], raw[13]]);
        let next = u16::from_le_bytes([raw[14], raw[15]]);
        if flags & F_INDIRECT != 0 {
            let n = d_len / 16;
            if indirect || d_len % 16 != 0 || n == 0 || n > u32::from(u16::MAX) {
                return;
            }
            (table, size, idx) = (d_addr, n as u16, 0);
            ttl = usize::from(size);
            indirect = true;
            continue;
        }
        out.push(Desc {
            addr: d_addr,
            len: d_len,
            writable: flags & F_WRITE != 0,
        });
        ttl -= 1;
        if flags & F_NEXT == 0 {
            return;
        }
        idx = next;
    }
}

#[cfg(test)]
mod tests;
