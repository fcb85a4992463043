//! What dirty logging (`VHOST_F_LOG_ALL`, `src/dirty_log.rs`) costs a request while a live
//! migration runs: for each 4k read the worker marks the page its data landed in and the page of
//! its status byte, and once per pass the used ring; all on a real sealed memfd log mapped the
//! way the VMM shares it. Timed over many requests at queue depth 32 (reads landing on pages
//! spread over 512 MiB of guest RAM, as random reads do), and printed next to the backend CPU
//! per I/O that `blkbench` measures at 4k QD32, so that the share is plain. With logging off the
//! data path pays a branch per completion and the remembered range of each read.
//!
//! The end-to-end bench (`blkbench`) cannot switch logging on: its client, the `blkio` crate,
//! does not negotiate LOG_ALL (QEMU does, while it migrates).
//!
//! `cargo bench --bench log_cost [-- --requests N]`

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::Instant;

use ringfence::dirty_log::{bytes_for, DirtyLog};

const DEPTH: u64 = 32;
const GUEST_RAM: u64 = 512 << 20;

fn sealed_log(len: u64) -> File {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"vhost-log".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size the log");
    // SAFETY: fcntl F_ADD_SEALS on our own fd.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(rc, 0, "seal the log");
    f
}

fn main() {
    let mut requests: u64 = 20_000_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--requests" {
            requests = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--requests N");
        }
    }
    let len = bytes_for(GUEST_RAM);
    let file = sealed_log(len);
    let log = DirtyLog::adopt(&file, 0, len).expect("map the log");
    let used_ring = 0x1000u64;
    let used_len = 6 + 8 * 256;

    // Five timed passes, the best kept (the machine may be shared).
    let mut best = f64::MAX;
    let mut page: u64 = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let mut done = 0u64;
        while done < requests {
            for _ in 0..DEPTH {
                // A pseudo-random data page and the status byte beside the request header.
                page = (page
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407))
                    % (GUEST_RAM / 4096);
                log.mark(page * 4096, 4096);
                log.mark(0x10_0000 + (page % 256) * 16 + 15, 1);
            }
            log.mark(used_ring, used_len);
            done += DEPTH;
        }
        let ns = t.elapsed().as_nanos() as f64 / done as f64;
        best = best.min(ns);
    }
    // Backend CPU per I/O at 4k QD32 from benches/README.md (ringfence, latest results).
    const CPU_PER_IO_NS: f64 = 5_800.0;
    println!(
        "dirty logging: {best:.1} ns per 4k read (data page, status byte, 1/32 of the used ring), \
         {:.2}% of the {:.1} µs of backend CPU per 4k I/O at QD32 (benches/README.md)",
        100.0 * best / CPU_PER_IO_NS,
        CPU_PER_IO_NS / 1000.0
    );
}
