//! SIGBUS on guest RAM. Guest RAM is a file the VMM shares with us (a memfd, or a file on
//! hugetlbfs); if the VMM shrinks that file after handing it over, touching the vanished part
//! raises SIGBUS. The mappings are registered with [`track_guest_ram`] when a memory table
//! arrives, each with the size of its pages, and the handler replaces the whole faulting page
//! with zeroes; any other SIGBUS ends the process with a message.
//!
//! The handler runs in signal context: it reads the table through atomics only (a sequence
//! lock, never a mutex) and makes raw syscalls only (mmap, write, _exit).

use std::sync::atomic::{fence, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use log::warn;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::SandboxError;
/// Faults on guest RAM that the SIGBUS handler absorbed.
pub static GUEST_MEMORY_FAULTS: AtomicU64 = AtomicU64::new(0);

/// Most guest-RAM mappings the SIGBUS handler knows at once: a memory table has at most 509
/// regions (the slots vhost-user-backend offers), and the mappings of an older table stay
/// until its last requests complete. Mappings past this are not absorbed (the process ends
/// on a fault there, as on any other unknown address), and the log says so.
const GUEST_RAM_SLOTS: usize = 1024;

/// The guest-RAM mappings, for the SIGBUS handler: `[start, end)` host addresses and the size
/// of the pages backing each (4 KiB, or the huge-page size of a hugetlbfs file), published
/// with a sequence lock (odd while being rewritten) so that the handler reads them without
/// taking any lock. Written only under `TRACKED`.
struct GuestRam {
    seq: AtomicU64,
    len: AtomicUsize,
    start: [AtomicUsize; GUEST_RAM_SLOTS],
    end: [AtomicUsize; GUEST_RAM_SLOTS],
    page: [AtomicUsize; GUEST_RAM_SLOTS],
}

static GUEST_RAM: GuestRam = GuestRam {
    seq: AtomicU64::new(0),
    len: AtomicUsize::new(0),
    start: [const { AtomicUsize::new(0) }; GUEST_RAM_SLOTS],
    end: [const { AtomicUsize::new(0) }; GUEST_RAM_SLOTS],
    page: [const { AtomicUsize::new(0) }; GUEST_RAM_SLOTS],
};

/// One guest-RAM mapping as the SIGBUS handler sees it: `[start, end)`, both multiples of
/// `page`, the size of the pages backing it (a power of two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRamRange {
    pub start: usize,
    pub end: usize,
    pub page: usize,
}

/// A memory table handed to [`track_guest_ram`]: its mappings last as long as the table.
struct Tracked {
    mem: Weak<GuestMemoryMmap>,
    ranges: Vec<GuestRamRange>,
}

static TRACKED: Mutex<Vec<Tracked>> = Mutex::new(Vec::new());

/// The normal page size.
fn base_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if page > 0 && (page as usize).is_power_of_two() {
        page as usize
    } else {
        4096
    }
}

/// The size of the pages backing a guest-RAM region: the huge-page size if its file is on
/// hugetlbfs, else the normal page size (also for a region without a file). Not for signal
/// context (fstatfs through the libc wrapper, and logging).
fn region_page_size(r: &GuestRegionMmap) -> usize {
    use std::os::fd::AsRawFd;
    let base = base_page_size();
    let Some(fo) = r.file_offset() else {
        return base;
    };
    // SAFETY: an all-zero statfs is a valid value of this plain C struct; fstatfs fills it in
    // from an fd the region owns (open for as long as `r`).
    let st = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::fstatfs(fo.file().as_raw_fd(), &mut st) != 0 {
            warn!(
                "cannot fstatfs a guest RAM fd ({}): its mapping is tracked with {base}-byte \
                 pages",
                std::io::Error::last_os_error()
            );
            return base;
        }
        st
    };
    // A hugetlb memfd, or a file under a hugetlbfs mount (QEMU's `-mem-path`). Compared as
    // u32: `f_type`'s width and sign differ between architectures.
    if st.f_type as u32 != libc::HUGETLBFS_MAGIC as u32 {
        return base;
    }
    match usize::try_from(st.f_bsize) {
        Ok(huge) if huge.is_power_of_two() && huge >= base => huge,
        _ => {
            warn!(
                "hugetlbfs guest RAM with an unusable block size {}: its mapping is tracked \
                 with {base}-byte pages",
                st.f_bsize
            );
            base
        }
    }
}

/// The range the SIGBUS handler may replace page by page in a mapping `[start, start + len)`
/// backed by `page`-byte pages: the whole pages inside it. A hugetlb mapping starts and ends
/// on huge-page boundaries, so nothing is lost; if one does not, the log says which part a
/// fault there ends the process on.
fn whole_pages(start: usize, len: usize, page: usize) -> Option<GuestRamRange> {
    let end = start.checked_add(len)?;
    let first = start.checked_add(page - 1)? & !(page - 1);
    let last = end & !(page - 1);
    if first != start || last != end {
        warn!(
            "guest RAM mapping {start:#x}..{end:#x} is not aligned to its {page}-byte pages: \
             a fault outside {first:#x}..{last:#x} (the VMM shrinking its memory file) ends \
             the process"
        );
    }
    (first < last).then_some(GuestRamRange {
        start: first,
        end: last,
        page,
    })
}

/// Tell the SIGBUS handler about the guest-RAM mappings of a new memory table (call with the
/// table before anything reads it: `Queues::set_memory` tracks the table the VMM sent
/// before it checks and publishes it, then the published table). Each mapping is recorded
/// with the size of the pages backing it (`fstatfs` of its file: huge pages on hugetlbfs).
/// Tables no longer alive (their mappings are gone) are forgotten at the same time; tables
/// still alive (requests of an older table in flight) stay known.
pub fn track_guest_ram(mem: &Arc<GuestMemoryMmap>) {
    let mut tracked = TRACKED.lock().unwrap_or_else(|p| p.into_inner());
    tracked.retain(|t| t.mem.strong_count() > 0);
    if !tracked
        .iter()
        .any(|t| std::ptr::eq(t.mem.as_ptr(), Arc::as_ptr(mem)))
    {
        tracked.push(Tracked {
            mem: Arc::downgrade(mem),
            ranges: mem
                .iter()
                .filter_map(|r| {
                    whole_pages(r.as_ptr() as usize, r.len() as usize, region_page_size(r))
                })
                .collect(),
        });
    }
    let ranges: Vec<GuestRamRange> = tracked
        .iter()
        .flat_map(|t| t.ranges.iter().copied())
        .collect();
    if ranges.len() > GUEST_RAM_SLOTS {
        warn!(
            "{} guest RAM mappings, of which the SIGBUS handler knows the first \
             {GUEST_RAM_SLOTS}: a fault on the others (the VMM shrinking their memory file) \
             ends the process",
            ranges.len()
        );
    }
    publish_guest_ram(&ranges);
}

/// The ranges the SIGBUS handler absorbs faults in (for tests and the log).
pub fn guest_ram_ranges() -> Vec<GuestRamRange> {
    let g = &GUEST_RAM;
    loop {
        let s1 = g.seq.load(Ordering::Acquire);
        let n = g.len.load(Ordering::Relaxed).min(GUEST_RAM_SLOTS);
        let v: Vec<GuestRamRange> = (0..n)
            .map(|i| GuestRamRange {
                start: g.start[i].load(Ordering::Relaxed),
                end: g.end[i].load(Ordering::Relaxed),
                page: g.page[i].load(Ordering::Relaxed),
            })
            .collect();
        fence(Ordering::Acquire);
        if s1 & 1 == 0 && g.seq.load(Ordering::Relaxed) == s1 {
            return v;
        }
        std::hint::spin_loop();
    }
}

/// Rewrite the table (the caller holds `TRACKED`).
fn publish_guest_ram(ranges: &[GuestRamRange]) {
    let g = &GUEST_RAM;
    let s = g.seq.load(Ordering::Relaxed);
    g.seq.store(s.wrapping_add(1), Ordering::Relaxed);
    fence(Ordering::Release);
    let n = ranges.len().min(GUEST_RAM_SLOTS);
    for (i, r) in ranges.iter().take(n).enumerate() {
        g.start[i].store(r.start, Ordering::Relaxed);
        g.end[i].store(r.end, Ordering::Relaxed);
        g.page[i].store(r.page, Ordering::Relaxed);
    }
    g.len.store(n, Ordering::Relaxed);
    g.seq.store(s.wrapping_add(2), Ordering::Release);
}

/// The size of the page holding `addr` if that page lies wholly inside one guest-RAM mapping
/// (it is then `addr` rounded down to that size, plus that size), else `None`.
/// Async-signal-safe: atomic loads only, a bounded number of tries (a writer is never
/// interrupted by this handler on its own thread: writers do not touch guest RAM).
fn guest_ram_page(addr: usize) -> Option<usize> {
    let g = &GUEST_RAM;
    for _ in 0..1_000_000 {
        let s1 = g.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            std::hint::spin_loop();
            continue;
        }
        let n = g.len.load(Ordering::Relaxed).min(GUEST_RAM_SLOTS);
        let hit = (0..n).find_map(|i| {
            let (start, end) = (
                g.start[i].load(Ordering::Relaxed),
                g.end[i].load(Ordering::Relaxed),
            );
            let page = g.page[i].load(Ordering::Relaxed);
            if !(start <= addr && addr < end && page.is_power_of_two()) {
                return None;
            }
            let first = addr & !(page - 1);
            let inside = start <= first && first.checked_add(page).is_some_and(|e| e <= end);
            inside.then_some(page)
        });
        fence(Ordering::Acquire);
        if g.seq.load(Ordering::Relaxed) == s1 {
            return hit;
        }
    }
    None
}

/// Guest RAM is a file the VMM shares with us (a memfd, or a file on hugetlbfs). If the VMM
/// shrinks that file after handing it over, touching the vanished part raises SIGBUS. The
/// handler replaces the faulting page (the whole huge page in hugetlbfs guest RAM) with a
/// private zero-filled anonymous mapping and lets the access complete, but only if the page
/// lies in a guest-RAM mapping the daemon made ([`track_guest_ram`]): the guest sees zeroes
/// where its memory vanished, the daemon survives, and the worker logs what happened. Any
/// other SIGBUS ends the process with a message naming the address.
pub fn install_sigbus_handler() -> Result<(), SandboxError> {
    // SAFETY: an all-zero sigaction is a valid value of this plain C struct; we fill in the
    // handler and flags, and sigaction copies it.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::SigbusHandler(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe calls (atomic loads, mmap, write, _exit) follow. The mmap replaces
    // a page of a guest-RAM mapping the daemon made (nothing else lives there) with one of the
    // same size: a hugetlb mapping can only be replaced a whole huge page at a time (MAP_FIXED
    // over part of one fails with EINVAL). The replacement is a plain anonymous mapping, not
    // MAP_HUGETLB: it needs no reserved huge page, so it cannot fail for the lack of one.
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; the calls are the
    // async-signal-safe ones above, on a page of our own guest-RAM mapping.
    unsafe {
        let code = (*info).si_code;
        let addr = (*info).si_addr() as usize;
        if code == libc::BUS_ADRERR {
            if let Some(page) = guest_ram_page(addr) {
                let start = addr & !(page - 1);
                let p = libc::mmap(
                    start as *mut libc::c_void,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                if p != libc::MAP_FAILED {
                    GUEST_MEMORY_FAULTS.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        let mut msg = [0u8; 128];
        let n = fatal_sigbus_message(&mut msg, addr, code);
        libc::write(2, msg.as_ptr().cast(), n);
        libc::_exit(70);
    }
}

/// "ringfence: fatal: SIGBUS at 0x..., outside guest RAM (si_code N)\n" into `buf`, without
/// allocating (signal context). Returns the length.
fn fatal_sigbus_message(buf: &mut [u8; 128], addr: usize, code: i32) -> usize {
    let mut n = 0;
    let mut put = |bytes: &[u8]| {
        for &b in bytes {
            if n < buf.len() {
                buf[n] = b;
                n += 1;
            }
        }
    };
    put(b"ringfence: fatal: SIGBUS at 0x");
    let mut hex = [0u8; 16];
    for (i, h) in hex.iter_mut().enumerate() {
        let nib = (addr >> ((15 - i) * 4)) & 0xf;
        *h = b"0123456789abcdef"[nib];
    }
    put(&hex);
    put(b", outside guest RAM (si_code ");
    let mut dec = [0u8; 11];
    let mut i = dec.len();
    let neg = code < 0;
    let mut v = code.unsigned_abs();
    loop {
        i -= 1;
        dec[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    if neg {
        put(b"-");
    }
    put(&dec[i..]);
    put(b")\n");
    n
}

#[cfg(test)]
mod tests;
