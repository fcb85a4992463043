//! The dirty-page log of a live migration (vhost-user "Migration", `VHOST_F_LOG_ALL` with
//! `VHOST_USER_PROTOCOL_F_LOG_SHMFD`): a bitmap the VMM shares with us, one bit per 4 KiB
//! guest-physical page, which the device sets for every page it writes. The VMM reads it to
//! resend those pages to the destination; a page written and not logged reaches the
//! destination stale.
//!
//! The log is the VMM's memory. What a VMM can do to it, and what stops each:
//! - **shrink the file under our mapping** (a write would raise SIGBUS): only a memfd sealed
//!   against shrinking (`F_SEAL_SHRINK`, as QEMU seals its "vhost-log") is accepted;
//! - **a log too small for guest RAM**, or a later memory table past its end: every mark is
//!   bounds-checked; marks past the end are dropped and counted, never written;
//! - **an offset or size past its file, or absurd**: refused before anything is mapped.
//!
//! Marks are atomic byte ORs, as the VMM clears the bits it has read with atomic exchanges.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use log::warn;

use crate::error::DirtyLogError;

/// Guest bytes one bit of the log stands for.
pub const LOG_PAGE: u64 = 4096;

/// Largest log accepted: one that covers 32 TiB of guest-physical address space.
pub const MAX_LOG_BYTES: u64 = 1 << 30;

/// Log bytes needed for guest-physical addresses `[0, end)`.
pub fn bytes_for(end: u64) -> u64 {
    end.div_ceil(LOG_PAGE * 8)
}

/// A mapped dirty log. Unmapped when the last holder drops it.
pub struct DirtyLog {
    /// The mapping, from the page-aligned file offset below the log's start.
    map: NonNull<u8>,
    map_len: usize,
    /// Where the log starts within the mapping.
    start: usize,
    /// Log bytes.
    len: usize,
    /// Pages that could not be marked: past the end of the log.
    dropped: AtomicU64,
    warned: AtomicBool,
}

// SAFETY: the mapping is shared memory that is only reached through atomic byte operations;
// the pointer is never handed out.
unsafe impl Send for DirtyLog {}
// SAFETY: as above: `mark` and `is_marked` use atomics only.
unsafe impl Sync for DirtyLog {}

impl DirtyLog {
    /// Map `size` bytes of `file` at `offset` as the log (SET_LOG_BASE).
    pub fn adopt(file: &File, offset: u64, size: u64) -> Result<DirtyLog, DirtyLogError> {
        if size == 0 || size > MAX_LOG_BYTES {
            return Err(DirtyLogError::Size { size });
        }
        // SAFETY: fcntl F_GET_SEALS on an fd we own; it reads no memory of ours.
        let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
            return Err(DirtyLogError::NotSealed);
        }
        let flen = file.metadata().map_err(DirtyLogError::Stat)?.len();
        if offset.checked_add(size).is_none_or(|end| end > flen) {
            return Err(DirtyLogError::PastEnd {
                offset,
                size,
                file_len: flen,
            });
        }
        let page = page_size();
        let map_off = offset - offset % page;
        let start = (offset - map_off) as usize;
        // Both fit: size <= 1 GiB and start < one page.
        let len = size as usize;
        let map_len = start + len;
        let off = libc::off_t::try_from(map_off).map_err(|_| DirtyLogError::PastEnd {
            offset,
            size,
            file_len: flen,
        })?;
        // SAFETY: a new shared mapping of a file we hold; the kernel picks the address, so no
        // existing mapping is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(DirtyLogError::Map(std::io::Error::last_os_error()));
        }
        let map = NonNull::new(p.cast::<u8>()).ok_or(DirtyLogError::Map(std::io::Error::other(
            "mmap returned NULL",
        )))?;
        Ok(DirtyLog {
            map,
            map_len,
            start,
            len,
            dropped: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        })
    }

    /// Log bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the log has no byte (never: `adopt` refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the log has a bit for every page below guest-physical address `end`.
    pub fn covers(&self, end: u64) -> bool {
        bytes_for(end) <= self.len as u64
    }

    /// Pages that were written but could not be logged (past the end of the log).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn byte(&self, index: usize) -> &AtomicU8 {
        debug_assert!(index < self.len);
        // SAFETY: callers check `index < self.len`, so the byte lies inside the mapping, which
        // lives as long as `self`; AtomicU8 has the size and alignment of u8.
        unsafe { &*self.map.as_ptr().add(self.start + index).cast::<AtomicU8>() }
    }

    /// Set the bits of every page that `[gpa, gpa + len)` touches.
    #[inline]
    pub fn mark(&self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / LOG_PAGE;
        let last = gpa.saturating_add(len - 1) / LOG_PAGE;
        let mut page = first;
        while page <= last {
            let index = page / 8;
            if index >= self.len as u64 {
                self.beyond(last - page + 1);
                return;
            }
            let bit = (page % 8) as u32;
            // A whole byte's worth of pages at once where the range allows.
            let (mask, next) = if bit == 0 && last - page >= 7 {
                (0xffu8, page + 8)
            } else {
                (1u8 << bit, page + 1)
            };
            self.byte(index as usize).fetch_or(mask, Ordering::Release);
            page = next;
        }
    }

    #[cold]
    fn beyond(&self, pages: u64) {
        self.dropped.fetch_add(pages, Ordering::Relaxed);
        if !self.warned.swap(true, Ordering::Relaxed) {
            warn!(
                "dirty log: the device wrote guest RAM past the end of the VMM's log \
                 ({} bytes, guest-physical addresses below {:#x}): those pages cannot be \
                 logged, and a migration running now may carry them stale",
                self.len,
                self.len as u64 * 8 * LOG_PAGE
            );
        }
    }

    /// Whether the bit of the page holding `gpa` is set.
    pub fn is_marked(&self, gpa: u64) -> bool {
        let page = gpa / LOG_PAGE;
        let index = page / 8;
        index < self.len as u64
            && self.byte(index as usize).load(Ordering::Acquire) & (1 << (page % 8)) != 0
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `adopt`, unmapped once; nothing refers to it any more.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    fn memfd(len: u64, seal: bool) -> File {
        let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
        // SAFETY: memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"test-log".as_ptr(), flags) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd we own.
        let f = unsafe { File::from_raw_fd(fd) };
        f.set_len(len).expect("size the memfd");
        if seal {
            // SAFETY: fcntl F_ADD_SEALS on our own fd.
            let rc = unsafe {
                libc::fcntl(
                    f.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
                )
            };
            assert_eq!(rc, 0);
        }
        f
    }

    fn bytes(f: &File, off: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut b = vec![0; len];
        f.read_exact_at(&mut b, off).expect("read the log file");
        b
    }

    #[test]
    fn bits_follow_the_spec_layout() {
        let f = memfd(4096, true);
        let log = DirtyLog::adopt(&f, 0, 64).expect("adopt");
        // Page 0: byte 0 bit 0; page 9: byte 1 bit 1; page 8*63+7: the last bit.
        log.mark(0, 1);
        log.mark(9 * LOG_PAGE + 100, 1);
        log.mark((8 * 63 + 7) * LOG_PAGE + 4095, 1);
        let b = bytes(&f, 0, 64);
        assert_eq!(b[0], 0b1);
        assert_eq!(b[1], 0b10);
        assert_eq!(b[63], 0b1000_0000);
        assert!(b[2..63].iter().all(|&x| x == 0));
    }

    #[test]
    fn a_buffer_crossing_pages_marks_each_page_it_touches() {
        let f = memfd(4096, true);
        let log = DirtyLog::adopt(&f, 0, 16).expect("adopt");
        // Last byte of page 2 and first byte of page 3.
        log.mark(3 * LOG_PAGE - 1, 2);
        assert_eq!(bytes(&f, 0, 1)[0], 0b1100);
        // A range ending exactly at a page boundary does not touch the next page.
        log.mark(5 * LOG_PAGE, LOG_PAGE);
        assert_eq!(bytes(&f, 0, 1)[0], 0b10_1100);
        // Pages 7..=25: a partial byte, two whole bytes, a partial byte.
        log.mark(7 * LOG_PAGE + 1, 18 * LOG_PAGE);
        let b = bytes(&f, 0, 4);
        assert_eq!(b, [0b1010_1100, 0xff, 0xff, 0b11]);
        assert!(log.is_marked(25 * LOG_PAGE));
        assert!(!log.is_marked(26 * LOG_PAGE));
    }

    #[test]
    fn marks_past_the_log_are_dropped_and_counted() {
        let f = memfd(8192, true);
        // Guard bytes around a 2-byte log at offset 4100 (not page aligned).
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0x5a; 8192], 0).expect("fill");
        let log = DirtyLog::adopt(&f, 4100, 2).expect("adopt");
        assert!(log.covers(16 * LOG_PAGE));
        assert!(!log.covers(16 * LOG_PAGE + 1));
        // Pages 14..=17: two in the log, two past it.
        log.mark(14 * LOG_PAGE, 4 * LOG_PAGE);
        log.mark(u64::MAX - 10, 100);
        assert_eq!(log.dropped(), 2 + 1);
        let b = bytes(&f, 0, 8192);
        assert_eq!(b[4100], 0x5a);
        assert_eq!(b[4101], 0x5a | 0b1100_0000);
        assert!(b[..4100].iter().all(|&x| x == 0x5a));
        assert!(b[4102..].iter().all(|&x| x == 0x5a));
    }

    #[test]
    fn bad_logs_are_refused() {
        let sealed = memfd(4096, true);
        let unsealed = memfd(4096, false);
        assert!(matches!(
            DirtyLog::adopt(&unsealed, 0, 64),
            Err(DirtyLogError::NotSealed)
        ));
        assert!(matches!(
            DirtyLog::adopt(&sealed, 4000, 200),
            Err(DirtyLogError::PastEnd { .. })
        ));
        assert!(matches!(
            DirtyLog::adopt(&sealed, u64::MAX, 2),
            Err(DirtyLogError::PastEnd { .. })
        ));
        assert!(matches!(
            DirtyLog::adopt(&sealed, 0, 0),
            Err(DirtyLogError::Size { .. })
        ));
        assert!(matches!(
            DirtyLog::adopt(&sealed, 0, MAX_LOG_BYTES + 1),
            Err(DirtyLogError::Size { .. })
        ));
        // A regular file has no seals.
        let file = tempfile::tempfile().expect("tempfile");
        file.set_len(4096).expect("size");
        assert!(matches!(
            DirtyLog::adopt(&file, 0, 64),
            Err(DirtyLogError::NotSealed)
        ));
    }

    #[test]
    fn log_size_for_guest_ram() {
        assert_eq!(bytes_for(0), 0);
        assert_eq!(bytes_for(1), 1);
        assert_eq!(bytes_for(8 * LOG_PAGE), 1);
        assert_eq!(bytes_for(8 * LOG_PAGE + 1), 2);
        assert_eq!(bytes_for(512 << 20), 16 << 10);
    }
}
