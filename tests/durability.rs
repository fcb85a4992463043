//! Durability as the worker carries it out, counted per queue (the `RWF_DSYNC writes` and
//! `fdatasyncs` of the line each queue logs when its connection ends): FLUSH runs fdatasync, a
//! writethrough cache (no FLUSH negotiated, virtio 1.2 §5.2.6) makes every write RWF_DSYNC and
//! every discard or write-zeroes end with an fdatasync, and a writeback cache does neither.
//! Reading data back cannot tell these apart (the page cache answers); the counters can.

mod common;

use std::time::Duration;

use common::*;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};

/// (RWF_DSYNC writes, fdatasyncs) that queue 0 logged when its connection ended.
fn durability_counts(b: &mut Backend) -> (u64, u64) {
    assert!(
        b.daemon()
            .wait_for_log("fdatasyncs", Duration::from_secs(20)),
        "no per-queue counters logged:\n{}",
        b.stderr()
    );
    let log = b.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("queue 0:") && l.contains("fdatasyncs"))
        .expect("queue 0 counters");
    let num_before = |word: &str| -> u64 {
        let head = line.split(word).next().expect("counter");
        head.split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number before {word:?} in {line}"))
    };
    (num_before(" RWF_DSYNC writes"), num_before(" fdatasyncs"))
}

fn start() -> Backend {
    Backend::start_on(
        Target::Ringfence,
        BackendOpts {
            size: 8 * MIB,
            ..BackendOpts::default()
        },
    )
}

#[test]
fn writeback_cache_flush_runs_fdatasync_and_writes_carry_no_dsync() {
    let mut b = start();
    let mut c = b.connect(ClientOpts::default());
    let data = pattern(3, 0, 64 << 10);
    c.q().write(0, &data).unwrap();
    c.q().write(1 << 20, &data).unwrap();
    c.q().flush().unwrap();
    c.q().flush().unwrap();
    drop(c);
    let (dsync, fsyncs) = durability_counts(&mut b);
    assert_eq!(dsync, 0, "writes under a writeback cache");
    assert_eq!(fsyncs, 2, "one fdatasync per FLUSH");
}

#[test]
fn without_flush_the_cache_is_writethrough() {
    let mut b = start();
    let mut raw =
        RawClient::connect_without(&b.socket, 1 << VIRTIO_BLK_F_FLUSH).expect("raw driver");
    assert_eq!(raw.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(
        raw.config().writeback,
        0,
        "the config space says writethrough"
    );
    let data = pattern(4, 4096, 8192);
    let (st, _) = raw.request(VIRTIO_BLK_T_OUT, 8, &data, 0);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    let (st, _) = raw.request(VIRTIO_BLK_T_OUT, 64, &data, 0);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    // Write-zeroes is made durable too, by an fdatasync before it completes.
    let (st, _) = raw.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &dwz_segment(128, 8, 0), 0);
    assert_eq!(st, VIRTIO_BLK_S_OK as u8);
    // FLUSH was not negotiated: the device refuses it (and it needs no sync anyway).
    let (st, _) = raw.request(VIRTIO_BLK_T_FLUSH, 0, &[], 0);
    assert_ne!(st, VIRTIO_BLK_S_OK as u8);
    drop(raw);
    let (dsync, fsyncs) = durability_counts(&mut b);
    assert_eq!(dsync, 2, "every write carries RWF_DSYNC");
    assert_eq!(fsyncs, 1, "write-zeroes ends with one fdatasync");
    assert_same(
        "image",
        4096,
        &read_file_at(&b.image, 4096, data.len()),
        &data,
    );
}
