//! The worker through real restricted rings (the kernel completes its SQEs).
use super::*;
use crate::guest_map::FixedBufferMap;
use crate::guest_map::MAX_FIXED_BUFFER;
use crate::ring::{RingPolicy, RingSet};
use crate::stats::{ErrorKind, OpKind};
use vhost_user_backend::VringT;
use vm_memory::GuestMemoryAtomic;

/// Queue 0's ring set over `image`: one ring, for `policy`, made by the daemon's builder.
fn test_set(image: &std::fs::File, policy: &RingPolicy) -> RingSet {
    let files = [(image.as_raw_fd(), "test image".to_string())];
    RingSet::build(0, 8, &files, std::slice::from_ref(policy))
        .expect("build a restricted ring (is io_uring enabled?)")
}

/// A queue of 8 that does not poll, for a disk of 64 KiB, served by a ring for `policy` armed
/// with `map` (whose memory `mem` holds, or the caller keeps alive as long as the queue).
fn queue_with(
    image: &std::fs::File,
    policy: &RingPolicy,
    map: FixedBufferMap,
    mem: GuestMemoryMmap,
    read_only: bool,
) -> QueueState {
    let tuning = Tuning {
        max_poll: Duration::ZERO,
        submit_batch: 8,
    };
    let counters = Arc::new(QueueCounters::default());
    let mut st = QueueState::new(0, 8, tuning, counters, test_set(image, policy)).unwrap();
    let limits = Limits {
        capacity_sectors: 128,
        seg_max: 6,
        size_max: 1 << 20,
        max_discard_seg: 1,
        max_discard_sectors: 1,
        read_only,
        flush: false,
        discard: false,
        write_zeroes: false,
    };
    st.arm(policy, map, Arc::new(mem), limits)
        .expect("register the buffers");
    st
}

/// A refused SQE, for real: a FLUSH's fdatasync submitted on a ring built (by the daemon's
/// builder) for a read-only disk, whose allowlist holds READ_FIXED alone. The kernel
/// completes it with -EACCES; the worker must fail the request, count a kernel refusal and
/// a `refused` error, and spend its security warning on it.
#[test]
fn a_refused_sqe_is_counted_and_fails_its_request() {
    let image = tempfile::tempfile().unwrap();
    image.set_len(1 << 16).unwrap();
    let buf = vec![0u8; 4096];
    let map =
        FixedBufferMap::from_regions([(0, 4096, buf.as_ptr() as u64)], MAX_FIXED_BUFFER).unwrap();
    let policy = RingPolicy::for_device(false, false, false);
    // `buf` outlives the ring (dropped at the end of the test, after `st`), and no SQE of this
    // test names it.
    let mut st = queue_with(&image, &policy, map, GuestMemoryMmap::new(), true);
    let counters = st.counters.clone();
    let vring = Vring::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 8).unwrap();
    let mut vs = vring.get_mut();
    let mem = GuestMemoryMmap::new();

    // A FLUSH as intake starts it.
    st.start_flush(0, None);
    st.engine.submit();
    st.engine.wait_for_completion();
    st.reap(&mut vs, &mem);

    let s = counters.snapshot();
    assert_eq!(s.kernel_refusals, 1);
    assert_eq!(s.errors[ErrorKind::Refused as usize], 1);
    assert_eq!(s.ops[OpKind::Flush as usize].requests, 1);
    assert_eq!(s.sqes, 1);
    assert_eq!(st.inflight_requests(), 0);
    assert_eq!(st.security_limit.in_window, 1, "the incident was logged");
    drop(vs);
    drop(st);
    drop(buf);
}

/// An SQE that cannot be queued (here: no armed ring) comes back from the engine as a
/// -ECANCELED completion, and its request fails to the guest at the next reap instead of
/// waiting forever.
#[test]
fn an_sqe_that_cannot_be_queued_fails_its_request() {
    let tuning = Tuning {
        max_poll: Duration::ZERO,
        submit_batch: 8,
    };
    let counters = Arc::new(QueueCounters::default());
    let image = tempfile::tempfile().unwrap();
    let set = test_set(&image, &RingPolicy::for_device(true, true, false));
    let mut st = QueueState::new(0, 8, tuning, counters.clone(), set).unwrap();
    let vring = Vring::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 8).unwrap();
    let mut vs = vring.get_mut();
    let mem = GuestMemoryMmap::new();

    st.start_flush(0, None);
    assert_eq!(st.inflight_requests(), 1);
    assert_eq!(
        st.engine.unfinished(),
        1,
        "the lost SQE waits as a completion"
    );
    st.reap(&mut vs, &mem);
    assert_eq!(st.inflight_requests(), 0);
    assert_eq!(st.engine.unfinished(), 0);
    let s = counters.snapshot();
    assert_eq!(s.errors[ErrorKind::Io as usize], 1);
    assert_eq!(s.ops[OpKind::Flush as usize].requests, 1);
    assert_eq!(s.sqes, 0);
}

/// A sealed memfd of `len` bytes and the dirty log over all of it.
fn log_of(len: u64) -> (std::fs::File, Arc<DirtyLog>) {
    use std::os::fd::FromRawFd;
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe { libc::memfd_create(c"log".as_ptr(), flags) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd we own.
    let f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    // SAFETY: fcntl F_ADD_SEALS on our own fd.
    assert_eq!(
        unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) },
        0
    );
    let log = Arc::new(DirtyLog::adopt(&f, 0, len).unwrap());
    (f, log)
}

/// Dirty logging through the real data path: a read submitted on a real restricted ring
/// before logging is switched on, completed by the kernel after, lands in guest RAM across
/// three pages and two memory regions. Its pages, its status byte and the used ring must be logged; the pages the
/// device only reads (descriptor table, avail ring) must not be, nor a write's data.
#[test]
fn completed_requests_log_their_data_status_and_used_ring() {
    use std::os::unix::fs::FileExt;
    use vm_memory::{Bytes, GuestAddress};
    const PAGE: u64 = crate::dirty_log::LOG_PAGE;
    let image = tempfile::tempfile().unwrap();
    image.write_all_at(&[0xab; 1 << 16], 0).unwrap();
    // Two regions: the read below lands across the boundary between them.
    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 0x6000),
        (GuestAddress(0x6000), 0xf_a000),
    ])
    .unwrap();
    let map = FixedBufferMap::from_guest_memory(&mem).unwrap();
    let policy = RingPolicy::for_device(true, false, false);
    // `mem` (whose RAM the buffers describe) is kept alive by the ring set.
    let mut st = queue_with(&image, &policy, map, mem.clone(), false);
    let shared = Shared {
        serial: [0; SERIAL_LEN],
        direct: false,
        dio_mem_align: 512,
        dio_offset_align: 512,
        vectored: false,
        writeback: AtomicBool::new(true),
        throttle: Arc::new(crate::throttle::Throttle::new(Default::default())),
    };
    // Descriptor table on page 1, avail ring on page 2, used ring on page 3.
    let vring = Vring::new(GuestMemoryAtomic::new(mem.clone()), 8).unwrap();
    vring.set_queue_size(8);
    vring.set_queue_info(PAGE, 2 * PAGE, 3 * PAGE).unwrap();
    vring.set_queue_ready(true);
    let mut vs = vring.get_mut();
    let (_f, log) = log_of(64);

    // Read 8 KiB into [0x5800, 0x7800): pages 5, 6 and 7, in both regions; status on page 9.
    st.segs = vec![Segment {
        addr: 0x5800,
        len: 0x2000,
    }];
    st.start_rw(0, Some(9 * PAGE), 0, 0x2000, false, &mut vs, &mem, &shared);
    // Write 4 KiB from page 12; status on page 13.
    st.segs = vec![Segment {
        addr: 12 * PAGE,
        len: 0x1000,
    }];
    st.start_rw(
        1,
        Some(13 * PAGE),
        0x4000,
        0x1000,
        true,
        &mut vs,
        &mem,
        &shared,
    );
    st.engine.submit();
    // Logging goes on while both are in flight.
    st.set_dirty_log(Some(log.clone()));
    while st.inflight_requests() > 0 {
        st.engine.wait_for_completion();
        st.reap(&mut vs, &mem);
    }
    st.notify(&mut vs);

    let mut data = [0u8; 0x2000];
    mem.read_slice(&mut data, GuestAddress(0x5800)).unwrap();
    assert!(data.iter().all(|&b| b == 0xab), "the read landed");
    let marked: Vec<u64> = (0..16).filter(|&p| log.is_marked(p * PAGE)).collect();
    assert_eq!(
        marked,
        [3, 5, 6, 7, 9, 13],
        "used ring, read data, both status bytes"
    );

    // Logging off: nothing more is marked, and the queue no longer holds the log.
    st.set_dirty_log(None);
    assert_eq!(Arc::strong_count(&log), 1, "the worker dropped the log");
    drop(vs);
    drop(st);
}

#[test]
fn guest_triggered_warnings_are_rate_limited_and_counted() {
    let mut l = WarnLimit::new();
    let t = Instant::now();
    let logged = (0..1000).filter(|_| l.allow(t).is_some()).count();
    assert_eq!(logged, WarnLimit::BURST as usize);
    // The next window logs again and reports what was suppressed.
    assert_eq!(l.allow(t + WarnLimit::WINDOW), Some(1000 - 5));
    assert_eq!(l.allow(t + WarnLimit::WINDOW), Some(0));
    assert_eq!(suppressed_note(0), "");
    assert!(suppressed_note(3).contains("3 similar"));
}
