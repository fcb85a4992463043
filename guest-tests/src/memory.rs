//! Guest RAM as a VMM would hand it out: memfds, mapped shared in this process, each with a
//! guest physical address. The backend maps the same memfds, so what it writes shows up here.
//!
//! Everything is addressed by guest physical address (GPA). Besides plain reads and writes
//! there are snapshots: take one before a request, and [`GuestMemory::stray_writes`] lists
//! every byte that changed outside the ranges the request was allowed to write. A memfd
//! starts out all zeroes and every write of ours is logged, so
//! [`GuestMemory::stray_writes_since_creation`] needs no snapshot at all.
//!
//! Memory handed to a backend must be compared before it goes away: a [`MemFd`] whose fd
//! was taken ([`MemFd::fd`]) and whose contents were never compared panics when dropped
//! (outside of an unwinding test), so that no test can forget the guest-RAM check on some
//! path (a refused message, an early return).

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, Ordering};

use crate::frontend::MemRegion;

/// A memfd and a shared mapping of all of it in this process.
pub struct MemFd {
    fd: OwnedFd,
    ptr: *mut u8,
    len: usize,
    map_len: usize,
    /// The fd was taken (to be handed to a backend).
    handed_out: Cell<bool>,
    /// The contents were compared with what they should be.
    compared: Cell<bool>,
}

impl MemFd {
    /// Create a memfd of `len` bytes (zero-filled) and map it.
    pub fn new(name: &str, len: usize) -> io::Result<MemFd> {
        MemFd::with_flags(name, len, libc::MFD_CLOEXEC)
    }

    /// Like [`MemFd::new`], created with `MFD_ALLOW_SEALING` (see [`MemFd::seal`]).
    pub fn new_sealable(name: &str, len: usize) -> io::Result<MemFd> {
        MemFd::with_flags(name, len, libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
    }

    /// Add `seals` (`F_SEAL_*`) to a memfd made with [`MemFd::new_sealable`].
    pub fn seal(&self, seals: libc::c_int) -> io::Result<()> {
        // SAFETY: F_ADD_SEALS on our own memfd.
        if unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn with_flags(name: &str, len: usize, flags: libc::c_uint) -> io::Result<MemFd> {
        let cname = std::ffi::CString::new(name).expect("memfd name without NUL");
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh shared mapping of a file of exactly `len` bytes; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MemFd {
            fd,
            ptr: ptr.cast(),
            len,
            map_len: len,
            handed_out: Cell::new(false),
            compared: Cell::new(false),
        })
    }

    /// The fd, to hand to a backend: from now on, the contents must be compared before the
    /// memfd is dropped (see the module documentation).
    pub fn fd(&self) -> RawFd {
        self.handed_out.set(true);
        self.fd.as_raw_fd()
    }

    /// Size when created (what a snapshot at creation covers).
    pub fn created_len(&self) -> usize {
        self.map_len
    }

    /// Declare the contents irrelevant (the memfd was never mapped by anyone but us, or the
    /// test checks it some other way). Say why at the call site.
    pub fn waive_comparison(&self) {
        self.compared.set(true);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the mapping in this process (what a VMM reports as `userspace_addr`).
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// Shrink (or grow) the memfd itself, under the backend's feet. Bytes of our own mapping
    /// past the new size must not be touched afterwards (they raise SIGBUS here, too):
    /// [`MemFd::len`] reports the new size from now on.
    pub fn truncate(&mut self, len: usize) -> io::Result<()> {
        // SAFETY: ftruncate on our own memfd; `len` shrinks what we access from now on.
        if unsafe { libc::ftruncate(self.fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.len = self.len.min(len);
        Ok(())
    }
}

impl Drop for MemFd {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping we created.
        unsafe { libc::munmap(self.ptr.cast(), self.map_len) };
        if self.handed_out.get() && !self.compared.get() && !std::thread::panicking() {
            panic!(
                "test bug: a memfd of {} bytes was handed to the backend and dropped without \
                 comparing its contents (keep it with Rig::keep_memory)",
                self.map_len
            );
        }
    }
}

/// One region of guest RAM.
pub struct Region {
    pub gpa: u64,
    pub mem: MemFd,
}

impl Region {
    pub fn end(&self) -> u64 {
        self.gpa + self.mem.len() as u64
    }

    /// The SET_MEM_TABLE entry describing this region truthfully.
    pub fn table_entry(&self) -> MemRegion {
        MemRegion {
            gpa: self.gpa,
            size: self.mem.len() as u64,
            uaddr: self.mem.addr(),
            mmap_offset: 0,
        }
    }
}

/// Guest RAM: a set of non-overlapping regions.
///
/// Every write the test makes through it is logged, so that comparing with a snapshot
/// reports only what the device wrote: the test's own later writes are replayed onto the
/// snapshot first.
pub struct GuestMemory {
    pub regions: Vec<Region>,
    log: RefCell<Vec<(u64, Vec<u8>)>>,
}

/// A copy of all of guest RAM at one moment.
pub struct Snapshot {
    regions: Vec<(u64, Vec<u8>)>,
    /// Length of the write log when the snapshot was taken.
    mark: usize,
}

impl Snapshot {
    /// Record a write we made ourselves after taking the snapshot (so it is not reported).
    pub fn note_write(&mut self, gpa: u64, data: &[u8]) {
        for (base, bytes) in &mut self.regions {
            let end = *base + bytes.len() as u64;
            if gpa >= *base && gpa + data.len() as u64 <= end {
                let off = (gpa - *base) as usize;
                bytes[off..off + data.len()].copy_from_slice(data);
                return;
            }
        }
    }
}

impl GuestMemory {
    /// Guest RAM made of one fresh memfd per `(gpa, size)`.
    pub fn new(layout: &[(u64, u64)]) -> GuestMemory {
        GuestMemory::named("guest-ram", layout)
    }

    /// Like [`GuestMemory::new`], the memfds named `name-0`, `name-1`, ... (as the backend's
    /// /proc/PID/fd shows them).
    pub fn named(name: &str, layout: &[(u64, u64)]) -> GuestMemory {
        let regions = layout
            .iter()
            .enumerate()
            .map(|(i, &(gpa, size))| Region {
                gpa,
                mem: MemFd::new(&format!("{name}-{i}"), size as usize)
                    .expect("memfd for guest RAM"),
            })
            .collect();
        GuestMemory {
            regions,
            log: RefCell::new(Vec::new()),
        }
    }

    /// [`MemFd::waive_comparison`] for every region (say why at the call site).
    pub fn waive_comparison(&self) {
        for r in &self.regions {
            r.mem.waive_comparison();
        }
    }

    /// The fd of region `i` (to hand to a backend).
    pub fn fd(&self, i: usize) -> RawFd {
        self.regions[i].mem.fd()
    }

    /// The honest memory table and its fds, one per region.
    pub fn table(&self) -> (Vec<MemRegion>, Vec<RawFd>) {
        self.regions
            .iter()
            .map(|r| (r.table_entry(), r.mem.fd()))
            .unzip()
    }

    /// Whether `[gpa, gpa+len)` lies inside one region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.host(gpa, len).is_some()
    }

    fn host(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let end = gpa.checked_add(len)?;
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && end <= r.end())
            // SAFETY: the offset is inside the region's mapping (checked just above).
            .map(|r| unsafe { r.mem.ptr.add((gpa - r.gpa) as usize) })
    }

    fn host_or_panic(&self, gpa: u64, len: u64) -> *mut u8 {
        self.host(gpa, len)
            .unwrap_or_else(|| panic!("test bug: {gpa:#x}+{len:#x} is not in guest RAM"))
    }

    /// The VMM's (our) address of guest address `gpa`.
    pub fn uaddr(&self, gpa: u64) -> u64 {
        self.host_or_panic(gpa, 0) as u64
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let p = self.host_or_panic(gpa, data.len() as u64);
        self.log.borrow_mut().push((gpa, data.to_vec()));
        // SAFETY: `p..p+len` lies in a live shared mapping of ours (checked by host()); the
        // backend may write the same memory concurrently, which only makes the bytes racy.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        let p = self.host_or_panic(gpa, len as u64);
        let mut out = vec![0u8; len];
        fence(Ordering::Acquire);
        // SAFETY: as in write().
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), len) };
        out
    }

    pub fn fill(&self, gpa: u64, len: usize, byte: u8) {
        let p = self.host_or_panic(gpa, len as u64);
        self.log.borrow_mut().push((gpa, vec![byte; len]));
        // SAFETY: as in write().
        unsafe { std::ptr::write_bytes(p, byte, len) };
    }

    pub fn read_u8(&self, gpa: u64) -> u8 {
        self.read(gpa, 1)[0]
    }

    /// A volatile 16-bit load (ring indices the backend updates concurrently).
    pub fn load_u16(&self, gpa: u64) -> u16 {
        assert_eq!(gpa % 2, 0, "test bug: unaligned ring index");
        let p = self.host_or_panic(gpa, 2);
        // SAFETY: aligned, inside our mapping; volatile because another process writes it.
        let v = unsafe { std::ptr::read_volatile(p as *const u16) };
        fence(Ordering::Acquire);
        u16::from_le(v)
    }

    /// A volatile 16-bit store after a release fence (publishing a ring index).
    pub fn store_u16(&self, gpa: u64, v: u16) {
        assert_eq!(gpa % 2, 0, "test bug: unaligned ring index");
        let p = self.host_or_panic(gpa, 2);
        self.log.borrow_mut().push((gpa, v.to_le_bytes().to_vec()));
        fence(Ordering::SeqCst);
        // SAFETY: aligned, inside our mapping; volatile because another process reads it.
        unsafe { std::ptr::write_volatile(p as *mut u16, v.to_le()) };
        fence(Ordering::SeqCst);
    }

    pub fn write_u16(&self, gpa: u64, v: u16) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn write_u32(&self, gpa: u64, v: u32) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn write_u64(&self, gpa: u64, v: u64) {
        self.write(gpa, &v.to_le_bytes());
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        u32::from_le_bytes(self.read(gpa, 4).try_into().unwrap())
    }

    /// Copy all of guest RAM.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            regions: self
                .regions
                .iter()
                .map(|r| (r.gpa, self.read(r.gpa, r.mem.len())))
                .collect(),
            mark: self.log.borrow().len(),
        }
    }

    /// What guest RAM held when it was created (zeroes), before any write of ours.
    pub fn creation_snapshot(&self) -> Snapshot {
        Snapshot {
            regions: self
                .regions
                .iter()
                .map(|r| (r.gpa, vec![0u8; r.mem.created_len()]))
                .collect(),
            mark: 0,
        }
    }

    /// [`GuestMemory::stray_writes`] against the memory as it was created: every byte the
    /// backend ever wrote outside `allowed`.
    pub fn stray_writes_since_creation(&self, allowed: &[(u64, u64)]) -> Vec<String> {
        self.stray_writes(&self.creation_snapshot(), allowed)
    }

    /// Every 4 KiB guest page (GPA / 4096) holding a byte that differs from `snap`, our own
    /// writes since the snapshot replayed onto it first: the pages the device wrote (with a
    /// value other than the one there before).
    pub fn changed_pages(&self, snap: &Snapshot) -> std::collections::BTreeSet<u64> {
        for r in &self.regions {
            r.mem.compared.set(true);
        }
        let mut expected = Snapshot {
            regions: snap.regions.clone(),
            mark: snap.mark,
        };
        for (gpa, data) in &self.log.borrow()[snap.mark..] {
            expected.note_write(*gpa, data);
        }
        let mut out = std::collections::BTreeSet::new();
        for (base, old) in &expected.regions {
            let Some(region) = self.regions.iter().find(|r| r.gpa == *base) else {
                continue;
            };
            let len = old.len().min(region.mem.len());
            let now = self.read(*base, len);
            let mut i = 0;
            while i < len {
                let page_end = ((base + i as u64) / LOG_PAGE + 1) * LOG_PAGE;
                let j = ((page_end - base) as usize).min(len);
                if now[i..j] != old[i..j] {
                    out.insert((base + i as u64) / LOG_PAGE);
                }
                i = j;
            }
        }
        out
    }

    /// Describe every run of bytes that differs from `snap` outside the `allowed`
    /// `(gpa, len)` ranges. Empty if nothing strayed.
    pub fn stray_writes(&self, snap: &Snapshot, allowed: &[(u64, u64)]) -> Vec<String> {
        for r in &self.regions {
            r.mem.compared.set(true);
        }
        let mut out = Vec::new();
        let ok = Ranges::new(allowed);
        // What memory should hold if only we wrote to it since the snapshot.
        let mut expected = Snapshot {
            regions: snap.regions.clone(),
            mark: snap.mark,
        };
        for (gpa, data) in &self.log.borrow()[snap.mark..] {
            expected.note_write(*gpa, data);
        }
        for (base, old) in &expected.regions {
            let Some(region) = self.regions.iter().find(|r| r.gpa == *base) else {
                continue;
            };
            // After a truncate, only the part still backed by the memfd can be read.
            let len = old.len().min(region.mem.len());
            let now = self.read(*base, len);
            let mut runs = RunBuilder::default();
            let mut i = 0;
            while i < len {
                // Skip equal 4 KiB blocks with one comparison each (fast even unoptimized).
                if i % 4096 == 0 && i + 4096 <= len && now[i..i + 4096] == old[i..i + 4096] {
                    i += 4096;
                    continue;
                }
                if now[i] == old[i] {
                    i += 1;
                    continue;
                }
                let gpa = *base + i as u64;
                if let Some(end) = ok.covering(gpa) {
                    i = (end.min(*base + len as u64) - *base) as usize;
                    continue;
                }
                runs.add(gpa);
                i += 1;
            }
            for (rs, re) in runs.finish() {
                let off = (rs - *base) as usize;
                let n = ((re - rs) as usize).min(16);
                out.push(format!(
                    "guest memory {rs:#x}..{re:#x} ({} bytes) changed outside the buffers the \
                     request may write: was {:02x?} now {:02x?}{}",
                    re - rs,
                    &old[off..off + n],
                    &now[off..off + n],
                    if re - rs > 16 { " ..." } else { "" }
                ));
            }
        }
        out
    }
}

/// Size of a page of the dirty log (vhost-user.rst, "Migration": `VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 4096;

/// Bytes of log a frontend needs for guest RAM ending at `gpa_end` (one bit per 4 KiB page).
pub fn log_bytes_for(gpa_end: u64) -> u64 {
    gpa_end.div_ceil(LOG_PAGE).div_ceil(8)
}

/// The seals QEMU puts on its "vhost-log" memfd.
pub const QEMU_LOG_SEALS: libc::c_int = libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;

/// A dirty log as a frontend hands it over with SET_LOG_BASE (protocol feature LOG_SHMFD): a
/// memfd of `file_len` bytes whose log is the `size` bytes at `offset`. Every byte outside the
/// log is a guard, filled with a position-dependent pattern at creation: a backend may write
/// log bits and nothing else, so [`DirtyLog::guard_changes`] lists every stray write.
/// Bit `p % 8` of log byte `p / 8` says page `p` (guest-physical address `p * 4096`) is dirty.
pub struct DirtyLog {
    pub mem: MemFd,
    pub offset: u64,
    pub size: u64,
}

/// The guard byte at position `i` of a log's file.
fn guard_byte(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9).rotate_right(13) as u8) | 0x81
}

impl DirtyLog {
    /// A log of `size` bytes at `offset` in a memfd of `file_len` bytes, guards around it,
    /// sealed with `seals` (0: unsealed).
    pub fn new(name: &str, file_len: u64, offset: u64, size: u64, seals: libc::c_int) -> DirtyLog {
        let mem = MemFd::new_sealable(name, file_len as usize).expect("memfd for a dirty log");
        for i in 0..file_len {
            let v = if i >= offset && i < offset.saturating_add(size) {
                0
            } else {
                guard_byte(i)
            };
            // SAFETY: `i` is inside our mapping of `file_len` bytes.
            unsafe { mem.ptr.add(i as usize).write(v) };
        }
        if seals != 0 {
            mem.seal(seals).expect("seal the log memfd");
        }
        DirtyLog { mem, offset, size }
    }

    /// A log as QEMU makes it, with guard pages: one page of guards, `size` bytes of log
    /// (covering guest RAM up to `gpa_end` if `size` is `None`), then a page of guards.
    pub fn guarded(name: &str, gpa_end: u64, size: Option<u64>) -> DirtyLog {
        let size = size.unwrap_or_else(|| log_bytes_for(gpa_end));
        DirtyLog::new(name, 4096 + size + 4096, 4096, size, QEMU_LOG_SEALS)
    }

    /// The fd, to hand to a backend (its contents must then be checked before it is
    /// dropped: [`DirtyLog::guard_changes`] does).
    pub fn fd(&self) -> RawFd {
        self.mem.fd()
    }

    fn byte(&self, i: u64) -> u8 {
        assert!(i < self.mem.map_len as u64, "test bug: past the log's file");
        // SAFETY: inside our live mapping; an atomic load because the backend sets bits
        // concurrently (with atomic read-modify-writes).
        let a = unsafe { &*(self.mem.ptr.add(i as usize) as *const std::sync::atomic::AtomicU8) };
        a.load(Ordering::Acquire)
    }

    /// Whether page `page`'s bit is set (false for pages past the log).
    pub fn is_set(&self, page: u64) -> bool {
        page / 8 < self.size && self.byte(self.offset + page / 8) & (1 << (page % 8)) != 0
    }

    /// Every page whose bit is set, in order.
    pub fn pages(&self) -> std::collections::BTreeSet<u64> {
        let mut out = std::collections::BTreeSet::new();
        for b in 0..self.size {
            let v = self.byte(self.offset + b);
            for bit in 0..8 {
                if v & (1 << bit) != 0 {
                    out.insert(b * 8 + bit);
                }
            }
        }
        out
    }

    /// Take every set bit and clear it, byte by byte with atomic exchanges (what QEMU's log
    /// sync does while the backend keeps marking): no bit set concurrently is lost.
    pub fn take(&self) -> std::collections::BTreeSet<u64> {
        let mut out = std::collections::BTreeSet::new();
        for b in 0..self.size {
            // SAFETY: inside our live mapping (the log lies inside the file); atomic because
            // the backend sets bits concurrently.
            let a = unsafe {
                &*(self.mem.ptr.add((self.offset + b) as usize)
                    as *const std::sync::atomic::AtomicU8)
            };
            let v = a.swap(0, Ordering::AcqRel);
            for bit in 0..8 {
                if v & (1 << bit) != 0 {
                    out.insert(b * 8 + bit);
                }
            }
        }
        out
    }

    /// Every run of guard bytes (outside `[offset, offset + size)`) that changed; empty if
    /// the backend wrote nothing outside the log. Counts as the memfd's comparison.
    pub fn guard_changes(&self) -> Vec<String> {
        self.mem.compared.set(true);
        let mut runs = RunBuilder::default();
        let end = self.offset.saturating_add(self.size);
        for i in 0..self.mem.map_len as u64 {
            if (i < self.offset || i >= end) && self.byte(i) != guard_byte(i) {
                runs.add(i);
            }
        }
        runs.finish()
            .into_iter()
            .map(|(a, b)| {
                format!(
                    "log memfd bytes {a:#x}..{b:#x} changed, outside the log at {:#x}+{:#x} \
                     (was {:02x?}, now {:02x?})",
                    self.offset,
                    self.size,
                    (a..b.min(a + 8)).map(guard_byte).collect::<Vec<_>>(),
                    (a..b.min(a + 8)).map(|i| self.byte(i)).collect::<Vec<_>>()
                )
            })
            .collect()
    }

    /// Whether any byte of the whole file differs from what it was created with (a log the
    /// backend refused or must not use).
    pub fn untouched(&self) -> bool {
        self.guard_changes().is_empty() && self.pages().is_empty()
    }
}

/// The 4 KiB pages `[gpa, gpa + len)` touches (none for `len` 0).
pub fn pages_of(gpa: u64, len: u64) -> std::ops::Range<u64> {
    if len == 0 {
        return 0..0;
    }
    gpa / LOG_PAGE..(gpa + len - 1) / LOG_PAGE + 1
}

/// Sorted, disjoint `[start, end)` ranges, for "is this address allowed" in O(log n).
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// From `(start, len)` pairs (any order, overlaps fine; ends saturate at 2^64 - 1).
    pub fn new(ranges: &[(u64, u64)]) -> Ranges {
        let mut v: Vec<(u64, u64)> = ranges
            .iter()
            .filter(|r| r.1 > 0)
            .map(|&(a, l)| (a, a.saturating_add(l)))
            .collect();
        v.sort();
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (a, b) in v {
            match out.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Ranges(out)
    }

    /// The end of the range covering `x`, if any.
    pub fn covering(&self, x: u64) -> Option<u64> {
        let i = self.0.partition_point(|r| r.1 <= x);
        self.0.get(i).filter(|r| r.0 <= x).map(|r| r.1)
    }
}

/// Groups differing positions (given in increasing order) into runs; a run ends after 64
/// equal bytes, so coincidentally equal bytes don't split one change into many.
#[derive(Default)]
pub struct RunBuilder {
    runs: Vec<(u64, u64)>,
}

impl RunBuilder {
    pub fn add(&mut self, pos: u64) {
        match self.runs.last_mut() {
            Some(last) if pos - last.1 <= 64 => last.1 = pos + 1,
            _ => self.runs.push((pos, pos + 1)),
        }
    }

    pub fn finish(self) -> Vec<(u64, u64)> {
        self.runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_log_bits_guards_and_take() {
        assert_eq!(log_bytes_for(8 << 20), 256);
        assert_eq!(log_bytes_for(4097), 1);
        assert_eq!(pages_of(4095, 2), 0..2);
        assert_eq!(pages_of(4096, 4096), 1..2);
        assert_eq!(pages_of(5, 0), 0..0);
        let log = DirtyLog::new("test-log", 4096 + 100, 4000, 10, QEMU_LOG_SEALS);
        assert!(log.untouched());
        // The "backend": bit 3 of byte 2 (page 19), through the fd.
        // SAFETY: pwrite from a valid buffer into our own memfd, inside its size.
        unsafe { libc::pwrite(log.fd(), [1u8 << 3].as_ptr().cast(), 1, 4002) };
        assert!(log.is_set(19) && !log.is_set(18) && !log.is_set(80));
        assert_eq!(log.pages().into_iter().collect::<Vec<_>>(), vec![19]);
        assert!(log.guard_changes().is_empty());
        assert_eq!(log.take().into_iter().collect::<Vec<_>>(), vec![19]);
        assert!(log.pages().is_empty());
        // A byte just past the log and one just before it are guards.
        let g = [0u8];
        // SAFETY: as above.
        unsafe { libc::pwrite(log.fd(), g.as_ptr().cast(), 1, 4010) };
        // SAFETY: as above.
        unsafe { libc::pwrite(log.fd(), g.as_ptr().cast(), 1, 3999) };
        let c = log.guard_changes();
        assert_eq!(c.len(), 1, "{c:?}");
        assert!(c[0].contains("0xf9f..0xfab"), "{c:?}");
        // Sealed against shrinking, as QEMU's log.
        // SAFETY: ftruncate on our own memfd.
        assert_ne!(unsafe { libc::ftruncate(log.fd(), 10) }, 0);
    }

    #[test]
    fn changed_pages_are_the_devices_only() {
        let m = GuestMemory::new(&[(0x10000, 0x4000)]);
        let snap = m.snapshot();
        m.write(0x10010, &[1, 2]);
        // SAFETY: pwrite from a valid buffer into our own memfd, inside its size.
        unsafe { libc::pwrite(m.fd(0), [9u8].as_ptr().cast(), 1, 0x2fff) };
        assert_eq!(
            m.changed_pages(&snap).into_iter().collect::<Vec<_>>(),
            vec![0x12]
        );
    }

    #[test]
    fn ranges_and_runs() {
        let r = Ranges::new(&[(10, 5), (12, 10), (100, 1), (200, 0)]);
        assert_eq!(r.covering(9), None);
        assert_eq!(r.covering(10), Some(22));
        assert_eq!(r.covering(21), Some(22));
        assert_eq!(r.covering(22), None);
        assert_eq!(r.covering(100), Some(101));
        assert_eq!(r.covering(200), None);
        let mut b = RunBuilder::default();
        for p in [1, 2, 50, 200] {
            b.add(p);
        }
        assert_eq!(b.finish(), vec![(1, 51), (200, 201)]);
    }

    #[test]
    fn allowed_bytes_do_not_glue_a_false_run() {
        let m = GuestMemory::new(&[(0, 0x1000)]);
        let snap = m.snapshot();
        // SAFETY: pwrite from valid buffers into our own memfd, inside its size.
        unsafe {
            libc::pwrite(m.regions[0].mem.fd(), [1u8].as_ptr().cast(), 1, 0x10);
            libc::pwrite(m.regions[0].mem.fd(), [1u8].as_ptr().cast(), 1, 0x30);
        }
        assert!(m.stray_writes(&snap, &[(0x10, 1), (0x30, 1)]).is_empty());
    }

    #[test]
    fn creation_baseline_sees_device_writes_but_not_ours() {
        let m = GuestMemory::new(&[(0x1000, 0x1000)]);
        m.write(0x1100, &[5; 16]);
        // SAFETY: pwrite from a valid buffer into our own memfd, inside its size.
        unsafe { libc::pwrite(m.fd(0), [9u8].as_ptr().cast(), 1, 0x800) };
        let s = m.stray_writes_since_creation(&[]);
        assert_eq!(s.len(), 1, "{s:?}");
        assert!(s[0].contains("0x1800..0x1801"), "{s:?}");
        assert!(m.stray_writes_since_creation(&[(0x1800, 1)]).is_empty());
    }

    #[test]
    #[should_panic(expected = "dropped without comparing its contents")]
    fn a_memfd_handed_out_must_be_compared() {
        let m = MemFd::new("handed-out", 4096).unwrap();
        let _ = m.fd();
    }

    #[test]
    fn a_memfd_never_handed_out_needs_no_comparison() {
        let m = GuestMemory::new(&[(0, 4096)]);
        m.write(0, &[1]);
    }

    #[test]
    fn snapshot_finds_stray_writes_only_outside_allowed() {
        let m = GuestMemory::new(&[(0x1000, 0x1000), (0x4000, 0x1000)]);
        // The "device": writes through the memfd, not through our mapping's logged API.
        let dev = |gpa: u64, data: &[u8]| {
            let r = m
                .regions
                .iter()
                .find(|r| gpa >= r.gpa && gpa < r.end())
                .unwrap();
            // SAFETY: pwrite from a valid buffer into our own memfd, inside its size.
            let n = unsafe {
                libc::pwrite(
                    r.mem.fd(),
                    data.as_ptr().cast(),
                    data.len(),
                    (gpa - r.gpa) as i64,
                )
            };
            assert_eq!(n, data.len() as isize);
        };
        let snap = m.snapshot();
        dev(0x1010, &[1, 2, 3]);
        dev(0x4ff0, &[9]);
        assert!(m
            .stray_writes(&snap, &[(0x1010, 3), (0x4ff0, 1)])
            .is_empty());
        let s = m.stray_writes(&snap, &[(0x1010, 1)]);
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].contains("0x1011..0x1013"), "{s:?}");
        assert!(!m.contains(0x1ff0, 0x20));
        // Our own writes after the snapshot are not the device's.
        let snap2 = m.snapshot();
        m.write(0x1100, &[7; 8]);
        m.store_u16(0x1200, 9);
        assert!(m.stray_writes(&snap2, &[]).is_empty());
        assert!(m.contains(0x4000, 0x1000));
    }
}
