//! Batching: a kick that brings 32 requests makes one `io_uring_enter` per `--submit-batch`
//! SQEs, not 32. Read from the per-queue counters ringfence logs when a connection ends (with
//! `--once`, the process then exits, so reading its stderr to the end is the
//! synchronisation).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};

use blkio::ReqFlags;
use common::{Client, ClientOpts};

const READY: &str = "ringfence: ready, listening on";

/// Serve one connection that reads 32 blocks in one kick; return the queue's counters line.
fn counters_after_a_kick_of_32(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    let socket = dir.path().join("vhost.sock");
    let mut child = Command::new(common::ringfence_bin())
        .arg("--socket-path")
        .arg(&socket)
        .arg("--blk-file")
        .arg(&image)
        .args(["--create-size", "16M", "--once", "--poll-us", "0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ringfence");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "ringfence exited early:\n{log}"
        );
        log.push_str(&line);
        if line.contains(READY) {
            break;
        }
    }

    {
        let mut client = Client::connect(&socket, ClientOpts::default()).expect("connect");
        let q = client.q();
        for i in 0..32u64 {
            let buf = q.buf_ptr(i as usize * 4096);
            q.q.read(i * 4096, buf, 4096, i as usize, ReqFlags::empty());
        }
        // One do_io: blkio puts all 32 on the ring, then kicks once.
        let done = q.wait(32);
        assert!(done.iter().all(|d| d.ret == 0), "{done:?}");
    }

    stderr.read_to_string(&mut log).unwrap();
    assert!(child.wait().unwrap().success(), "{log}");
    log.lines()
        .find(|l| l.contains("queue 0:") && l.contains("io_uring_enter"))
        .unwrap_or_else(|| panic!("no queue counters in the log:\n{log}"))
        .to_string()
}

#[test]
fn a_kick_with_32_requests_makes_one_io_uring_enter_per_submit_batch() {
    // Default --submit-batch 2: sixteen enters of two.
    let stats = counters_after_a_kick_of_32(&[]);
    assert!(
        stats.contains("32 requests, 32 SQEs in 16 io_uring_enter calls"),
        "expected sixteen io_uring_enter calls of 2 SQEs: {stats}"
    );
    let stats = counters_after_a_kick_of_32(&["--submit-batch", "8"]);
    assert!(
        stats.contains("32 requests, 32 SQEs in 4 io_uring_enter calls"),
        "expected four io_uring_enter calls of 8 SQEs: {stats}"
    );
    let stats = counters_after_a_kick_of_32(&["--submit-batch", "32"]);
    assert!(
        stats.contains("32 requests, 32 SQEs in 1 io_uring_enter calls"),
        "expected one io_uring_enter for the batch of 32: {stats}"
    );
}
