//! Every ring is made at startup (issue 23): a new memory table re-registers guest RAM on the
//! queues' existing rings, once each queue has drained, and never makes a ring. Seen from
//! outside: the daemon's io_uring file descriptors (`anon_inode:[io_uring]` in /proc/PID/fd),
//! numbers and inodes, are the same after 50 memory tables sent under I/O on two queues, and
//! after another connection; every request in flight across a table change completes and its
//! data is on the disk. The kernel matrix runs this on 6.1, 6.12 and 7.x.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

use blkio::ReqFlags;
use common::{pattern, Backend, BackendOpts, Client, ClientOpts, Target, MIB};

/// (fd, inode) of every io_uring the process holds.
fn rings(pid: i32) -> BTreeSet<(u32, u64)> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("fd dir") {
        let e = e.expect("fd entry");
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if target.to_string_lossy() == "anon_inode:[io_uring]" {
            let fd = e.file_name().to_string_lossy().parse().expect("fd number");
            let ino = std::fs::metadata(e.path()).expect("stat the ring").ino();
            out.insert((fd, ino));
        }
    }
    out
}

fn start() -> Backend {
    Backend::start_on(
        Target::Ringfence,
        BackendOpts {
            num_queues: 2,
            fill_seed: Some(5),
            ..BackendOpts::default()
        },
    )
}

fn connect(b: &Backend) -> Client {
    b.connect(ClientOpts {
        num_queues: 2,
        ..ClientOpts::default()
    })
}

const DEPTH: usize = 16;

/// Round `round`'s writes on both queues: put them in flight, change the memory table while
/// they are (map a new region: ADD_MEM_REG, or unmap it again: REM_MEM_REG), then collect
/// them: every one OK.
fn writes_across_a_table_change(
    c: &mut Client,
    round: u64,
    extra: &mut Option<blkio::MemoryRegion>,
) {
    for (qi, q) in c.queues.iter_mut().enumerate() {
        for i in 0..DEPTH {
            let off = offset(round, qi, i);
            let data = pattern(round, off, 4096);
            q.buf()[i * 4096..(i + 1) * 4096].copy_from_slice(&data);
            q.q.write(off, q.buf_ptr(i * 4096), 4096, i, ReqFlags::empty());
        }
        // Submitted (kicked), not waited for.
        q.q.do_io(&mut [], 0, None, None).expect("submit");
    }
    match extra.take() {
        None => {
            let r = c.blkio.alloc_mem_region(2 * MIB as usize).expect("alloc");
            c.blkio
                .map_mem_region(&r)
                .expect("a new memory table under I/O");
            *extra = Some(r);
        }
        Some(r) => {
            c.blkio.unmap_mem_region(&r);
            c.blkio.free_mem_region(&r);
        }
    }
    for q in &mut c.queues {
        for d in q.wait(DEPTH) {
            assert_eq!(
                d.ret, 0,
                "round {round}: a write across the table change failed"
            );
        }
    }
}

fn offset(round: u64, queue: usize, i: usize) -> u64 {
    ((round * 2 + queue as u64) * DEPTH as u64 + i as u64) * 8192
}

#[test]
fn memory_tables_replaced_50_times_under_io_keep_the_same_rings() {
    let mut b = start();
    let pid = b.daemon().pid();
    let before = rings(pid);
    // One ring per opcode set per queue, all made at startup (a writable disk: three sets).
    assert_eq!(before.len(), 2 * 3, "rings at startup: {before:?}");
    let mut c = connect(&b);
    let mut extra = None;
    for round in 0..50 {
        writes_across_a_table_change(&mut c, round, &mut extra);
    }
    let after = rings(pid);
    assert_eq!(after, before, "ring fds before {before:?} after {after:?}");
    let log = b.stderr();
    let tables = log.matches("memory table: ").count();
    assert!(tables > 50, "the daemon saw {tables} memory tables:\n{log}");
    // Every write is on the disk, next to the image's fill.
    for round in 0..50 {
        for qi in 0..2 {
            let off = offset(round, qi, 0);
            let span = b.read_image(off, DEPTH * 8192);
            for i in 0..DEPTH {
                let at = i * 8192;
                let want = pattern(round, off + at as u64, 4096);
                common::assert_same("written", off + at as u64, &span[at..at + 4096], &want);
                let fill = pattern(5, off + at as u64 + 4096, 4096);
                common::assert_same("beside it", off, &span[at + 4096..at + 8192], &fill);
            }
        }
    }
}

#[test]
fn the_next_connection_is_served_by_the_same_rings() {
    let mut b = start();
    let pid = b.daemon().pid();
    let before = rings(pid);
    let mut c = connect(&b);
    c.q().write(0, &pattern(9, 0, 4096)).expect("write");
    drop(c);
    let mut c = connect(&b);
    let back = c.q().read(0, 4096).expect("read on the next connection");
    common::assert_same("read back", 0, &back, &pattern(9, 0, 4096));
    assert_eq!(rings(pid), before, "the next connection got other rings");
    assert!(
        b.stderr().matches("serving from its ring").count() >= 4,
        "both connections' queues were armed:\n{}",
        b.stderr()
    );
}
