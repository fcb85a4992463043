//! Inflight tracking: regions refused and accepted, requests marked and resubmitted across
//! a restart.

use super::*;
use vm_memory::GuestMemoryMmap;

#[test]
fn layout_matches_the_spec_offsets() {
    // 16-byte header, 16-byte descriptor states, queue regions on 64-byte boundaries
    // (libvhost-user's ALIGN_UP(16 * size + 2, 64) gives the same numbers).
    assert_eq!(queue_region_len(1), 64);
    assert_eq!(queue_region_len(4), 128);
    assert_eq!(queue_region_len(128), 2112);
    assert_eq!(queue_region_len(256), 4160);
    for qs in 1..=1024u16 {
        let libvhost = (16 * usize::from(qs) + 2).next_multiple_of(64);
        assert_eq!(queue_region_len(qs), libvhost, "queue size {qs}");
    }
    assert_eq!(region_len(2, 128), 4224);
}

fn read_u16(buf: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([buf[off], buf[off + 1]])
}

fn region_bytes(file: &File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut b = vec![0u8; file.metadata().unwrap().len() as usize];
    file.read_exact_at(&mut b, 0).unwrap();
    b
}

#[test]
fn a_new_region_is_sealed_and_says_its_queue_size() {
    let (file, len) = create_region(2, 8).unwrap();
    assert_eq!(len, 2 * 192);
    // SAFETY: fcntl on our fd.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    assert_ne!(seals & libc::F_SEAL_SHRINK, 0);
    assert_ne!(seals & libc::F_SEAL_GROW, 0);
    assert!(file.set_len(0).is_err(), "a sealed region cannot shrink");
    let b = region_bytes(&file);
    for q in 0..2 {
        let base = q * 192;
        assert_eq!(read_u16(&b, base + 8), 0, "version: fresh");
        assert_eq!(read_u16(&b, base + 10), 8, "desc_num");
    }
}

#[test]
fn an_unsealed_or_short_fd_is_refused() {
    let file = tempfile::tempfile().unwrap();
    file.set_len(4096).unwrap();
    let e = InflightMap::adopt(&file, 0, 4096, 1, 8).err().unwrap();
    assert!(e.to_string().contains("sealed"), "{e}");
    let (file, len) = create_region(1, 8).unwrap();
    let e = InflightMap::adopt(&file, 0, len, 2, 8).err().unwrap();
    assert!(e.to_string().contains("cannot hold"), "{e}");
    let e = InflightMap::adopt(&file, 64, len, 1, 8).err().unwrap();
    assert!(e.to_string().contains("past the end"), "{e}");
    assert!(InflightMap::adopt(&file, 0, len, 1, 8).is_ok());
}

#[test]
fn tracking_writes_the_spec_fields_and_a_restart_resubmits_oldest_first() {
    let (file, len) = create_region(2, 8).unwrap();
    let map = InflightMap::adopt(&file, 0, len, 2, 8).unwrap();
    let mut q1 = map.queue(1).unwrap();
    assert_eq!(q1.start(8, 0), Recovery::default());
    let b = region_bytes(&file);
    assert_eq!(read_u16(&b, 192 + 8), VERSION);
    // Heads 5, 2, 7 taken in that order; 2 completes (used index 1).
    for h in [5, 2, 7] {
        q1.mark(h);
    }
    q1.before_publish(2);
    q1.after_publish(2, 1);
    let b = region_bytes(&file);
    let desc = |h: usize| 192 + 16 + 16 * h;
    assert_eq!(b[desc(5)], 1);
    assert_eq!(b[desc(2)], 0);
    assert_eq!(b[desc(7)], 1);
    assert_eq!(read_u16(&b, 192 + 12), 2, "last_batch_head");
    assert_eq!(read_u16(&b, 192 + 14), 1, "used_idx");
    assert_eq!(
        &b[desc(7) + 8..desc(7) + 16],
        &2u64.to_le_bytes(),
        "counter"
    );
    let touched: Vec<usize> = (0..192).filter(|&i| b[i] != 0).collect();
    assert_eq!(touched, vec![10], "queue 0: only its desc_num is set");
    drop(q1);
    drop(map);

    // A new process adopts the region: the ring's used index is 1.
    let map = InflightMap::adopt(&file, 0, len, 2, 8).unwrap();
    let mut q1 = map.queue(1).unwrap();
    let r = q1.start(8, 1);
    assert_eq!(
        r,
        Recovery {
            next_avail: Some(3),
            resubmit: vec![5, 7]
        }
    );
    // New marks continue after the newest counter.
    q1.mark(0);
    let b = region_bytes(&file);
    assert_eq!(&b[desc(0) + 8..desc(0) + 16], &3u64.to_le_bytes());
}

#[test]
fn a_crash_between_publishing_and_unmarking_is_reconciled() {
    let (file, len) = create_region(1, 4).unwrap();
    let map = InflightMap::adopt(&file, 0, len, 1, 4).unwrap();
    let mut q = map.queue(0).unwrap();
    q.start(4, 10);
    q.mark(1);
    q.mark(3);
    // Head 3's used entry went out (the ring's used index is now 11), then the process died.
    q.before_publish(3);
    drop(q);
    let mut q = map.queue(0).unwrap();
    assert_eq!(
        q.start(4, 11),
        Recovery {
            next_avail: Some(12),
            resubmit: vec![1]
        }
    );
    let b = region_bytes(&file);
    assert_eq!(read_u16(&b, 14), 11);
}

#[test]
fn values_the_vmm_scribbled_are_bounded() {
    use std::os::unix::fs::FileExt;
    let (file, len) = create_region(1, 4).unwrap();
    // Version 1, last_batch_head far out of range, used_idx off, every byte of the states 1.
    let mut b = vec![1u8; len as usize];
    b[8..10].copy_from_slice(&1u16.to_le_bytes());
    b[12..14].copy_from_slice(&u16::MAX.to_le_bytes());
    file.write_all_at(&b, 0).unwrap();
    let map = InflightMap::adopt(&file, 0, len, 1, 4).unwrap();
    let mut q = map.queue(0).unwrap();
    // The ring has 2 entries: heads beyond it are not resubmitted.
    let r = q.start(2, 0);
    assert_eq!(r.resubmit, vec![0, 1]);
    assert_eq!(r.next_avail, Some(2));
    q.mark(u16::MAX);
    q.after_publish(u16::MAX, 1);
}

fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

#[test]
fn chains_are_read_through_links_and_one_indirect_table() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
    let table = 0x1000u64;
    let put = |i: u64, d: [u8; 16]| mem.write_obj(d, GuestAddress(table + 16 * i)).unwrap();
    put(3, desc_bytes(0x100, 16, 1, 5));
    put(5, desc_bytes(0x200, 512, 1 | 2, 6));
    put(6, desc_bytes(0x300, 1, 2, 0));
    let mut out = Vec::new();
    read_chain(&mem, table, 8, 3, &mut out);
    assert_eq!(
        out,
        vec![
            Desc {
                addr: 0x100,
                len: 16,
                writable: false
            },
            Desc {
                addr: 0x200,
                len: 512,
                writable: true
            },
            Desc {
                addr: 0x300,
                len: 1,
                writable: true
            },
        ]
    );
    // Indirect: head 0 points at a 3-entry table at 0x2000.
    put(0, desc_bytes(0x2000, 48, 4, 0));
    for (i, d) in [
        desc_bytes(0x400, 16, 1, 1),
        desc_bytes(0x500, 4096, 1 | 2, 2),
        desc_bytes(0x600, 1, 2, 0),
    ]
    .into_iter()
    .enumerate()
    {
        mem.write_obj(d, GuestAddress(0x2000 + 16 * i as u64))
            .unwrap();
    }
    read_chain(&mem, table, 8, 0, &mut out);
    assert_eq!(out.len(), 3);
    assert_eq!(out[1].addr, 0x500);
    // A loop stops after one pass; a head beyond the ring reads nothing.
    put(1, desc_bytes(0x700, 1, 1, 1));
    read_chain(&mem, table, 8, 1, &mut out);
    assert_eq!(out.len(), 8);
    read_chain(&mem, table, 8, 8, &mut out);
    assert!(out.is_empty());
    // A nested indirect table is refused (nothing beyond it is read).
    mem.write_obj(desc_bytes(0x2000, 48, 4, 0), GuestAddress(0x2000))
        .unwrap();
    read_chain(&mem, table, 8, 0, &mut out);
    assert!(out.is_empty());
}
