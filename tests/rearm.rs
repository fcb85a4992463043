//! Every ring is made at startup (issue 23): a new memory table re-registers guest RAM on the
//! queues' existing rings, once each queue has drained, and never makes a ring. Seen from
//! outside: the daemon's io_uring file descriptors (`anon_inode:[io_uring]` in /proc/PID/fd),
//! numbers and inodes (a ring made again may get its fd number back, never its inode), are
//! the same after 50 memory tables sent under I/O on two queues (ADD_MEM_REG and REM_MEM_REG,
//! as `blkio` sends them), and after another connection; every request in flight across a
//! table change completes and its data is on the disk, and a region added under I/O is served.
//! The kernel matrix runs this on 6.1, 6.12 and 7.x.

mod common;

use std::collections::BTreeSet;
use std::mem::MaybeUninit;
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
/// them: every one OK. A new region is then read into (its fixed buffers serve). Returns how
/// many writes had not completed when the change was sent.
fn writes_across_a_table_change(
    c: &mut Client,
    round: u64,
    extra: &mut Option<blkio::MemoryRegion>,
) -> usize {
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
    // What completed already (taken now, counted below).
    let mut done = Vec::new();
    for q in &mut c.queues {
        let mut cq: Vec<MaybeUninit<blkio::Completion>> =
            (0..DEPTH).map(|_| MaybeUninit::uninit()).collect();
        let n = q.q.do_io(&mut cq, 0, None, None).expect("poll");
        done.push(n);
        for slot in &cq[..n] {
            // SAFETY: do_io initialised the first `n` entries.
            assert_eq!(
                unsafe { slot.assume_init_ref() }.ret,
                0,
                "round {round}: a write failed"
            );
        }
    }
    let outstanding = 2 * DEPTH - done.iter().sum::<usize>();
    let added = match extra.take() {
        None => {
            let r = c.blkio.alloc_mem_region(2 * MIB as usize).expect("alloc");
            c.blkio
                .map_mem_region(&r)
                .expect("a new memory table under I/O");
            Some(r)
        }
        Some(r) => {
            c.blkio.unmap_mem_region(&r);
            c.blkio.free_mem_region(&r);
            None
        }
    };
    for (q, n) in c.queues.iter_mut().zip(done) {
        for d in q.wait(DEPTH - n) {
            assert_eq!(
                d.ret, 0,
                "round {round}: a write across the table change failed"
            );
        }
    }
    if let Some(r) = &added {
        // A read that lands in the new region: its guest RAM is registered on the rings.
        let off = offset(round, 0, 0);
        let q = &mut c.queues[0];
        q.q.read(off, r.addr as *mut u8, 4096, 0, ReqFlags::empty());
        assert_eq!(
            q.wait(1)[0].ret,
            0,
            "round {round}: a read into the new region"
        );
        // SAFETY: the region is mapped (by this client) and the read has completed.
        let got = unsafe { std::slice::from_raw_parts(r.addr as *const u8, 4096) };
        common::assert_same(
            "read into the new region",
            off,
            got,
            &pattern(round, off, 4096),
        );
    }
    *extra = added;
    outstanding
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
    let mut outstanding = 0;
    for round in 0..50 {
        outstanding += writes_across_a_table_change(&mut c, round, &mut extra);
    }
    println!(
        "writes not completed when the table changed: {outstanding} of {}",
        50 * 2 * DEPTH
    );
    assert!(outstanding > 0, "no table change happened under I/O");
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
