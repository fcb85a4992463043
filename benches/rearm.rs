//! What a new memory table costs a queue: every ring is made at startup, so a table change
//! unregisters the guest RAM of the queue's ring and registers the new table on it
//! (`ring::RingSet::arm`, the control thread's work while the queue waits). Measured on a real
//! ring made by the daemon's own code, over guest RAM in a shared memfd (as QEMU's
//! `memory-backend-memfd,share=on`), for each size asked:
//! - the first arm of a table whose pages were never touched (the kernel populates and pins
//!   every page: what a fresh VM's first table costs);
//! - re-arming the same, now populated, RAM (what each later table change costs: unpin, pin).
//!
//! Pinning counts against RLIMIT_MEMLOCK without CAP_IPC_LOCK (run as root, or raise it), and
//! populates the memfd: the machine needs the RAM.
//!
//! `cargo bench --bench rearm [-- --gib 1,16] [--rounds 5]`

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringfence::guest_map::FixedBufferMap;
use ringfence::ring::{RingPolicy, RingSet};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size the guest RAM");
    f
}

fn args() -> (Vec<u64>, usize) {
    let mut gib = vec![1, 16];
    let mut rounds = 5;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--gib" => {
                gib = it
                    .next()
                    .expect("--gib N[,N...]")
                    .split(',')
                    .map(|v| v.parse().expect("--gib N[,N...]"))
                    .collect()
            }
            "--rounds" => rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            // cargo bench passes --bench.
            _ => {}
        }
    }
    (gib, rounds)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let (sizes, rounds) = args();
    let image = tempfile::tempfile().expect("image");
    image.set_len(1 << 20).expect("size the image");
    let policy = RingPolicy::for_device(true, true, true);
    let files = [(image.as_raw_fd(), "bench image".to_string())];
    let mut set = RingSet::build(0, 1024, &files, std::slice::from_ref(&policy))
        .expect("a ring (is io_uring enabled?)");
    println!("size  first arm (populate + pin)  re-arm (unpin + pin), median of {rounds}  per GiB");
    for gib in sizes {
        let len = gib << 30;
        let ram = memfd(len);
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges_with_files([(
                GuestAddress(0),
                len as usize,
                Some(FileOffset::new(ram, 0)),
            )])
            .expect("map the guest RAM"),
        );
        let map = FixedBufferMap::from_guest_memory(&*mem).expect("fixed buffers");
        let t = Instant::now();
        set.arm(&policy, map.clone(), mem.clone())
            .expect("register the guest RAM (RLIMIT_MEMLOCK?)");
        let first = t.elapsed();
        let again: Vec<Duration> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                set.arm(&policy, map.clone(), mem.clone()).expect("re-arm");
                t.elapsed()
            })
            .collect();
        let m = median(again);
        println!(
            "{gib:>3} GiB  {first:>24.1?}  {m:>37.1?}  {:>7.1?}",
            m / gib as u32
        );
        set.disarm().expect("unregister");
    }
}
