//! The hostile driver, descriptor and virtqueue level (issue 4, "Survive every malformed
//! request"; issue 15, oracles that can fail). Each test starts a backend on a
//! pattern-filled image, sets up an honest session (checked with a valid read), then makes
//! malformed requests available and checks (see `rig::run_case_with`): the answer carries
//! an error status (or, for odd but legal layouts, the right data); against ringfence
//! every request whose head is in range is answered, and each queue the case touched
//! serves a valid read afterwards; the connection still answers; the backend is alive and
//! serves a fresh connection; no byte of guest RAM outside the device-writable buffers and
//! the used ring changed; no byte of the image changed outside the ranges of requests
//! answered OK (none at all for a buffer that does not translate to guest RAM); nothing
//! hangs or spins. The `control_*` tests break a backend on purpose and expect the
//! oracles to say so.
//!
//! `RINGFENCE_HOSTILE_TARGET=qsd` runs the same cases against qemu-storage-daemon.

use ringfence_guest_tests::blk::*;
use ringfence_guest_tests::rig::*;
use ringfence_guest_tests::virtq::{Desc, F_INDIRECT, F_NEXT, F_WRITE};

/// The sector most hostile requests name (byte offset 4096).
const S0: u64 = 8;
const OFF0: u64 = S0 * SECTOR;

fn wsum(segs: &[Desc]) -> u64 {
    segs.iter()
        .filter(|d| d.is_write())
        .map(|d| u64::from(d.len))
        .sum()
}

/// Push `segs` as a direct chain on queue 0.
fn submit(s: &mut Session, segs: &[Desc], st: Option<u64>, expect: Expect, what: &str) -> Sub {
    let head = s.chain(0, segs);
    Sub::new(head, st, expect, what).max_len(wsum(segs))
}

/// Push `segs` through an indirect table on queue 0.
fn submit_indirect(
    s: &mut Session,
    segs: &[Desc],
    st: Option<u64>,
    expect: Expect,
    what: &str,
) -> Sub {
    let head = s.indirect(0, segs);
    Sub::new(head, st, expect, what).max_len(wsum(segs))
}

/// An IN request at `sector` whose data descriptor is `data`.
fn read_with(s: &mut Session, sector: u64, data: Desc, what: &str) -> Plan {
    let hdr = s.put(&header(T_IN, sector));
    let st = s.status();
    Plan::one(submit(
        s,
        &[Desc::r(hdr, 16), data, Desc::w(st, 1)],
        Some(st),
        Expect::Error,
        what,
    ))
}

/// An OUT request at `sector` whose data descriptor is `data`, expected to fail; its own
/// range of the image may change only if it is served anyway (and, against qsd, if it
/// fails: see `rig::Sub::image`).
fn write_with(s: &mut Session, sector: u64, data: Desc, what: &str) -> Plan {
    let hdr = s.put(&header(T_OUT, sector));
    let st = s.status();
    let (off, len) = own_range(sector, u64::from(data.len));
    Plan::one(
        submit(
            s,
            &[Desc::r(hdr, 16), data, Desc::w(st, 1)],
            Some(st),
            Expect::Error,
            what,
        )
        .writes_image(off, len),
    )
}

/// An OUT request at `sector` whose data buffer does not translate to guest RAM: whatever
/// the backend answers, no byte of the image may change (there is nothing it could write).
fn write_untranslatable(s: &mut Session, sector: u64, data: Desc, what: &str) -> Plan {
    let hdr = s.put(&header(T_OUT, sector));
    let st = s.status();
    Plan::one(submit(
        s,
        &[Desc::r(hdr, 16), data, Desc::w(st, 1)],
        Some(st),
        Expect::Error,
        what,
    ))
}

/// The part of the image a request at `sector` of `len` bytes covers (saturating).
fn own_range(sector: u64, len: u64) -> (u64, u64) {
    let start = sector.saturating_mul(SECTOR);
    (start, len)
}

/// A valid IN request of `len` bytes at `sector` with the data split as `split` (lengths).
fn legal_read(s: &mut Session, sector: u64, split: &[u32], what: &str) -> Sub {
    let hdr = s.put(&header(T_IN, sector));
    let mut segs = vec![Desc::r(hdr, 16)];
    let mut pieces = Vec::new();
    for &l in split {
        let d = s.alloc(u64::from(l), 8);
        segs.push(Desc::w(d, l));
        pieces.push((d, u64::from(l)));
    }
    let st = s.status();
    segs.push(Desc::w(st, 1));
    let expect = Expect::Read {
        offset: sector.wrapping_mul(SECTOR),
        pieces,
    };
    submit(s, &segs, Some(st), expect, what)
}

#[test]
fn honest_write_read_round_trip() {
    let mut rig = Rig::start(RigOpts::default());
    let mut s = rig.session(&SessionCfg::default());
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
    s.write(0, OFF0, &data).unwrap();
    assert_eq!(s.read(0, OFF0, 8192).unwrap(), data);
    rig.image_writes.push((OFF0, 8192));
    rig.keep_session("the honest session", s, &[]);
    rig.finish();
}

// ---------------------------------------------------------------------------------------
// Buffers outside guest RAM, across regions and gaps, overflowing, 4 GiB long.

#[test]
fn read_into_buffer_outside_guest_memory() {
    run_case(|s| {
        read_with(
            s,
            S0,
            Desc::w(0xdead_0000_0000, 4096),
            "IN into 0xdead00000000",
        )
    });
}

#[test]
fn write_from_buffer_outside_guest_memory() {
    run_case(|s| {
        write_untranslatable(
            s,
            S0,
            Desc::r(0xdead_0000_0000, 4096),
            "OUT from 0xdead00000000",
        )
    });
}

#[test]
fn read_into_buffer_below_guest_memory() {
    run_case(|s| read_with(s, S0, Desc::w(0, 4096), "IN into GPA 0 (no RAM there)"));
}

#[test]
fn read_into_gap_between_regions() {
    run_case(|s| read_with(s, S0, Desc::w(GAP.0 + 0x1000, 4096), "IN into the gap"));
}

#[test]
fn read_into_buffer_straddling_region_end_and_gap() {
    let end = RAM_A.0 + RAM_A.1;
    run_case(|s| read_with(s, S0, Desc::w(end - 2048, 4096), "IN into region end + gap"));
}

#[test]
fn write_from_buffer_straddling_region_end_and_gap() {
    let end = RAM_A.0 + RAM_A.1;
    run_case(|s| {
        write_untranslatable(
            s,
            S0,
            Desc::r(end - 2048, 4096),
            "OUT from region end + gap",
        )
    });
}

#[test]
fn read_into_buffer_straddling_two_adjacent_regions() {
    // Regions B and C are adjacent in guest-physical space: a buffer across them is
    // contiguous guest RAM. Serving it is fine (with the right data), so is refusing.
    let b_end = RAM_B.0 + RAM_B.1;
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let st = s.status();
        let segs = [
            Desc::r(hdr, 16),
            Desc::w(b_end - 2048, 4096),
            Desc::w(st, 1),
        ];
        let expect = Expect::Read {
            offset: OFF0,
            pieces: vec![(b_end - 2048, 2048), (RAM_C.0, 2048)],
        };
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            expect,
            "IN across adjacent regions B|C",
        ))
    });
}

#[test]
fn write_from_buffer_straddling_two_adjacent_regions() {
    let b_end = RAM_B.0 + RAM_B.1;
    run_case(|s| {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        s.mem.write(b_end - 2048, &data[..2048]);
        s.mem.write(RAM_C.0, &data[2048..]);
        let hdr = s.put(&header(T_OUT, S0));
        let st = s.status();
        let segs = [
            Desc::r(hdr, 16),
            Desc::r(b_end - 2048, 4096),
            Desc::w(st, 1),
        ];
        Plan::one(
            submit(
                s,
                &segs,
                Some(st),
                Expect::Write { offset: OFF0, data },
                "OUT across B|C",
            )
            .writes_image(OFF0, 4096),
        )
    });
}

#[test]
fn read_into_buffer_whose_end_overflows_u64() {
    run_case(|s| {
        read_with(
            s,
            S0,
            Desc::w(u64::MAX - 1023, 4096),
            "IN, addr+len overflows",
        )
    });
}

#[test]
fn write_from_buffer_whose_end_overflows_u64() {
    run_case(|s| {
        write_untranslatable(
            s,
            S0,
            Desc::r(u64::MAX - 1023, 4096),
            "OUT, addr+len overflows",
        )
    });
}

#[test]
fn read_into_4gib_buffer() {
    // Starts in RAM (4 KiB before the end of region A), 4 GiB - 1 long.
    let a_end = RAM_A.0 + RAM_A.1;
    run_case(|s| {
        let mut p = read_with(s, 0, Desc::w(a_end - 4096, u32::MAX), "IN of 4 GiB - 1");
        p.subs[0].status_unseen = Some(PAST_4GIB);
        p
    });
}

/// Why a status byte after a 4 GiB descriptor may stay unwritten: a chain longer than
/// 2^32 bytes is illegal (virtio 1.2, 2.7.5.2), and a device may stop walking it there.
const PAST_4GIB: &str = "it lies past the first 2^32 bytes of the chain";

#[test]
fn write_from_4gib_buffer() {
    // Starts in RAM, runs 4 GiB past it: it does not translate.
    let a_end = RAM_A.0 + RAM_A.1;
    run_case(|s| {
        let mut p = write_untranslatable(
            s,
            CAPACITY - 8,
            Desc::r(a_end - 4096, u32::MAX),
            "OUT of 4 GiB - 1",
        );
        p.subs[0].status_unseen = Some(PAST_4GIB);
        p
    });
}

#[test]
fn read_with_three_4gib_segments() {
    // The total length (12 GiB) does not even fit in 32 bits.
    run_case(|s| {
        let hdr = s.put(&header(T_IN, 0));
        let st = s.status();
        let b = s.alloc(4096, 4096);
        let segs = [
            Desc::r(hdr, 16),
            Desc::w(b, u32::MAX),
            Desc::w(b, u32::MAX),
            Desc::w(b, u32::MAX),
            Desc::w(st, 1),
        ];
        Plan::one(
            submit(s, &segs, Some(st), Expect::Error, "IN of 3 x 4 GiB").status_unseen(PAST_4GIB),
        )
    });
}

// ---------------------------------------------------------------------------------------
// Chains that loop, run past the table, exceed the queue size.

#[test]
fn chain_loops_back_to_head() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let first = s.queues[0].alloc(2);
        raw_chain_at(
            s,
            first,
            &[
                (Desc::r(hdr, 16), Some(first + 1)),
                (Desc::w(d, 512), Some(first)),
            ],
        );
        s.queues[0].push(&s.mem, first);
        Plan::one(Sub::new(
            first,
            None,
            Expect::Any,
            "chain hdr -> data -> hdr ...",
        ))
    });
}

fn raw_chain_at(s: &mut Session, first: u16, descs: &[(Desc, Option<u16>)]) {
    for (i, (d, link)) in descs.iter().enumerate() {
        let mut d = *d;
        if let Some(n) = link {
            d.flags |= F_NEXT;
            d.next = *n;
        }
        s.queues[0].write_desc(&s.mem, first + i as u16, d);
    }
}

#[test]
fn chain_head_points_to_itself() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let first = s.queues[0].alloc(1);
        raw_chain_at(s, first, &[(Desc::r(hdr, 16), Some(first))]);
        s.queues[0].push(&s.mem, first);
        Plan::one(Sub::new(first, None, Expect::Any, "self-looping head"))
    });
}

#[test]
fn chain_loops_through_status_descriptor() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let st = s.status();
        let f = s.queues[0].alloc(3);
        raw_chain_at(
            s,
            f,
            &[
                (Desc::r(hdr, 16), Some(f + 1)),
                (Desc::w(d, 512), Some(f + 2)),
                (Desc::w(st, 1), Some(f)),
            ],
        );
        s.queues[0].push(&s.mem, f);
        Plan::one(Sub::new(
            f,
            Some(st),
            Expect::Error,
            "chain hdr -> data -> status -> hdr ...",
        ))
    });
}

#[test]
fn chain_of_writable_descriptors_looping_forever() {
    // A loop of writable 512-byte buffers: a device that follows it writes "forever".
    run_case(|s| {
        let hdr = s.put(&header(T_IN, 0));
        let d = s.alloc(512, 512);
        let f = s.queues[0].alloc(3);
        raw_chain_at(
            s,
            f,
            &[
                (Desc::r(hdr, 16), Some(f + 1)),
                (Desc::w(d, 512), Some(f + 2)),
                (Desc::w(d, 512), Some(f + 1)),
            ],
        );
        s.queues[0].push(&s.mem, f);
        Plan::one(Sub::new(f, None, Expect::Any, "loop of writable buffers"))
    });
}

#[test]
fn chain_next_index_equals_queue_size() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let size = s.queues[0].size;
        let f = s.queues[0].alloc(1);
        raw_chain_at(s, f, &[(Desc::r(hdr, 16), Some(size))]);
        s.queues[0].push(&s.mem, f);
        Plan::one(Sub::new(f, None, Expect::Any, "next = queue size"))
    });
}

#[test]
fn chain_next_index_0xffff() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let f = s.queues[0].alloc(2);
        raw_chain_at(
            s,
            f,
            &[
                (Desc::r(hdr, 16), Some(f + 1)),
                (Desc::w(d, 512), Some(0xffff)),
            ],
        );
        s.queues[0].push(&s.mem, f);
        Plan::one(Sub::new(f, None, Expect::Any, "next = 0xffff"))
    });
}

#[test]
fn avail_ring_head_equals_queue_size() {
    run_case(|s| {
        let size = s.queues[0].size;
        s.queues[0].push(&s.mem, size);
        // No valid request was made: any used element is a finding.
        Plan::default()
    });
}

#[test]
fn avail_ring_head_0xffff() {
    run_case(|s| {
        s.queues[0].push(&s.mem, 0xffff);
        Plan::default()
    });
}

#[test]
fn chain_longer_than_queue_size_via_indirect() {
    // hdr + 255 data segments + status = 257 descriptors > queue size 256.
    run_case(|s| {
        let hdr = s.put(&header(T_IN, 0));
        let mut segs = vec![Desc::r(hdr, 16)];
        let mut pieces = Vec::new();
        for _ in 0..255 {
            let d = s.alloc(512, 512);
            segs.push(Desc::w(d, 512));
            pieces.push((d, 512));
        }
        let st = s.status();
        segs.push(Desc::w(st, 1));
        Plan::one(submit_indirect(
            s,
            &segs,
            Some(st),
            Expect::Read { offset: 0, pieces },
            "indirect chain of 257",
        ))
    });
}

#[test]
fn legal_chain_using_every_descriptor() {
    // hdr + 254 data segments (seg_max) + status = exactly the queue size: legal.
    run_case(|s| {
        let split = vec![512u32; 254];
        Plan::one(legal_read(s, 0, &split, "chain of 256 descriptors").must_succeed())
    });
}

// ---------------------------------------------------------------------------------------
// Indirect tables: out of bounds, empty, misaligned, nested, looping.

fn indirect_head(s: &mut Session, addr: u64, len: u32, extra_flags: u16) -> u16 {
    let head = s.queues[0].alloc(1);
    let d = Desc {
        addr,
        len,
        flags: F_INDIRECT | extra_flags,
        next: 0,
    };
    s.queues[0].write_desc(&s.mem, head, d);
    s.queues[0].push(&s.mem, head);
    head
}

/// A valid 3-entry IN table (hdr, 512 data, status) at `table`; returns the status address.
fn valid_table(s: &mut Session, table: u64) -> (u64, u64) {
    let hdr = s.put(&header(T_IN, S0));
    let d = s.alloc(512, 512);
    let st = s.status();
    let descs = [
        Desc {
            flags: F_NEXT,
            next: 1,
            ..Desc::r(hdr, 16)
        },
        Desc {
            flags: F_NEXT | F_WRITE,
            next: 2,
            ..Desc::w(d, 512)
        },
        Desc::w(st, 1),
    ];
    s.queues[0].write_table(&s.mem, table, &descs);
    (d, st)
}

#[test]
fn indirect_table_outside_guest_memory() {
    run_case(|s| {
        let head = indirect_head(s, 0xdead_0000_0000, 48, 0);
        Plan::one(Sub::new(
            head,
            None,
            Expect::Any,
            "indirect table at 0xdead00000000",
        ))
    });
}

#[test]
fn indirect_table_in_gap() {
    run_case(|s| {
        let head = indirect_head(s, GAP.0, 48, 0);
        Plan::one(Sub::new(
            head,
            None,
            Expect::Any,
            "indirect table in the gap",
        ))
    });
}

#[test]
fn indirect_table_straddles_region_end() {
    let a_end = RAM_A.0 + RAM_A.1;
    run_case(|s| {
        // The first entry is valid and in RAM; the other two would lie in the gap.
        let hdr = s.put(&header(T_IN, S0));
        s.queues[0].write_table(
            &s.mem,
            a_end - 16,
            &[Desc {
                flags: F_NEXT,
                next: 1,
                ..Desc::r(hdr, 16)
            }],
        );
        let head = indirect_head(s, a_end - 16, 48, 0);
        Plan::one(Sub::new(
            head,
            None,
            Expect::Any,
            "indirect table across region end",
        ))
    });
}

#[test]
fn indirect_table_end_overflows_u64() {
    run_case(|s| {
        let head = indirect_head(s, u64::MAX - 15, 48, 0);
        Plan::one(Sub::new(
            head,
            None,
            Expect::Any,
            "indirect table addr+len overflows",
        ))
    });
}

#[test]
fn indirect_table_empty() {
    run_case(|s| {
        let t = s.alloc(48, 16);
        let (_, st) = valid_table(s, t);
        let head = indirect_head(s, t, 0, 0);
        Plan::one(
            Sub::new(head, Some(st), Expect::Error, "indirect table of length 0")
                .status_unseen("a table of length 0 holds no descriptor"),
        )
    });
}

#[test]
fn indirect_table_length_not_multiple_of_16() {
    run_case(|s| {
        let t = s.alloc(48, 16);
        let (_, st) = valid_table(s, t);
        let head = indirect_head(s, t, 40, 0);
        Plan::one(Sub::new(
            head,
            Some(st),
            Expect::Any,
            "indirect table of length 40",
        ))
    });
}

#[test]
fn indirect_table_misaligned() {
    // The table itself is fine, at an odd address. Serving or refusing are both fine.
    run_case(|s| {
        let t = s.alloc(64, 16) + 1;
        let (d, st) = valid_table(s, t);
        let head = indirect_head(s, t, 48, 0);
        let expect = Expect::Read {
            offset: OFF0,
            pieces: vec![(d, 512)],
        };
        Plan::one(Sub::new(
            head,
            Some(st),
            expect,
            "indirect table at an odd address",
        ))
    });
}

#[test]
fn indirect_table_huge_length() {
    run_case(|s| {
        let t = s.alloc(48, 16);
        let (_, st) = valid_table(s, t);
        let head = indirect_head(s, t, 0xffff_fff0, 0);
        Plan::one(Sub::new(
            head,
            Some(st),
            Expect::Any,
            "indirect table of length 0xfffffff0",
        ))
    });
}

#[test]
fn indirect_table_nested() {
    run_case(|s| {
        let inner = s.alloc(48, 16);
        let (_, st) = valid_table(s, inner);
        let outer = s.alloc(16, 16);
        s.queues[0].write_table(
            &s.mem,
            outer,
            &[Desc {
                addr: inner,
                len: 48,
                flags: F_INDIRECT,
                next: 0,
            }],
        );
        let head = indirect_head(s, outer, 16, 0);
        Plan::one(
            Sub::new(
                head,
                Some(st),
                Expect::Error,
                "indirect table inside an indirect table",
            )
            .status_unseen("a device refuses to follow a nested table (virtio 1.2, 2.7.5.3.1)"),
        )
    });
}

#[test]
fn indirect_descriptor_with_next_flag() {
    run_case(|s| {
        let t = s.alloc(48, 16);
        let (_, _) = valid_table(s, t);
        let st2 = s.status();
        let f = s.queues[0].alloc(2);
        s.queues[0].write_desc(
            &s.mem,
            f,
            Desc {
                addr: t,
                len: 48,
                flags: F_INDIRECT | F_NEXT,
                next: f + 1,
            },
        );
        s.queues[0].write_desc(&s.mem, f + 1, Desc::w(st2, 1));
        s.queues[0].push(&s.mem, f);
        Plan::one(Sub::new(f, None, Expect::Any, "INDIRECT|NEXT head"))
    });
}

#[test]
fn indirect_descriptor_with_write_flag() {
    // "The device MUST ignore the write-only flag in the descriptor that refers to an
    // indirect table": serving this is expected, refusing it is tolerated.
    run_case(|s| {
        let t = s.alloc(48, 16);
        let (d, st) = valid_table(s, t);
        let head = indirect_head(s, t, 48, F_WRITE);
        let expect = Expect::Read {
            offset: OFF0,
            pieces: vec![(d, 512)],
        };
        Plan::one(Sub::new(head, Some(st), expect, "INDIRECT|WRITE head"))
    });
}

#[test]
fn indirect_descriptor_after_a_direct_one() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let st = s.status();
        let t = s.alloc(32, 16);
        s.queues[0].write_table(
            &s.mem,
            t,
            &[
                Desc {
                    flags: F_NEXT | F_WRITE,
                    next: 1,
                    ..Desc::w(d, 512)
                },
                Desc::w(st, 1),
            ],
        );
        let f = s.queues[0].alloc(2);
        s.queues[0].write_desc(
            &s.mem,
            f,
            Desc {
                flags: F_NEXT,
                next: f + 1,
                ..Desc::r(hdr, 16)
            },
        );
        s.queues[0].write_desc(
            &s.mem,
            f + 1,
            Desc {
                addr: t,
                len: 32,
                flags: F_INDIRECT,
                next: 0,
            },
        );
        s.queues[0].push(&s.mem, f);
        let expect = Expect::Read {
            offset: OFF0,
            pieces: vec![(d, 512)],
        };
        Plan::one(Sub::new(
            f,
            Some(st),
            expect,
            "direct hdr, then an indirect table",
        ))
    });
}

#[test]
fn indirect_table_next_past_its_end() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let t = s.alloc(32, 16);
        s.queues[0].write_table(
            &s.mem,
            t,
            &[
                Desc {
                    flags: F_NEXT,
                    next: 1,
                    ..Desc::r(hdr, 16)
                },
                Desc {
                    flags: F_NEXT | F_WRITE,
                    next: 7,
                    ..Desc::w(d, 512)
                },
            ],
        );
        let head = indirect_head(s, t, 32, 0);
        Plan::one(Sub::new(
            head,
            None,
            Expect::Any,
            "indirect next = 7 in a table of 2",
        ))
    });
}

#[test]
fn indirect_table_loops() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let t = s.alloc(32, 16);
        s.queues[0].write_table(
            &s.mem,
            t,
            &[
                Desc {
                    flags: F_NEXT,
                    next: 1,
                    ..Desc::r(hdr, 16)
                },
                Desc {
                    flags: F_NEXT | F_WRITE,
                    next: 0,
                    ..Desc::w(d, 512)
                },
            ],
        );
        let head = indirect_head(s, t, 32, 0);
        Plan::one(Sub::new(
            head,
            None,
            Expect::Any,
            "indirect table 0 -> 1 -> 0",
        ))
    });
}

#[test]
fn indirect_table_is_the_descriptor_table() {
    run_case(|s| {
        let (desc, len) = s.queues[0].desc_range();
        let head = indirect_head(s, desc, len as u32, 0);
        Plan::one(Sub::new(
            head,
            None,
            Expect::Any,
            "indirect table = the queue's descriptor table",
        ))
    });
}

#[test]
fn indirect_without_the_feature() {
    let opts = CaseOpts {
        session: SessionCfg {
            features: WANTED_FEATURES & !ringfence_guest_tests::frontend::vfeat::RING_INDIRECT_DESC,
            ..SessionCfg::default()
        },
        ..CaseOpts::default()
    };
    run_case_with(opts, |s| {
        let t = s.alloc(48, 16);
        let (d, st) = valid_table(s, t);
        let head = indirect_head(s, t, 48, 0);
        let expect = Expect::Read {
            offset: OFF0,
            pieces: vec![(d, 512)],
        };
        Plan::one(Sub::new(
            head,
            Some(st),
            expect,
            "indirect descriptor, INDIRECT_DESC not negotiated",
        ))
    });
}

// ---------------------------------------------------------------------------------------
// Headers: short, missing, split, in the wrong direction.

#[test]
fn header_of_8_bytes() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0)[..8]);
        let d = s.alloc(512, 512);
        let st = s.status();
        let segs = [Desc::r(hdr, 8), Desc::w(d, 512), Desc::w(st, 1)];
        Plan::one(submit(s, &segs, Some(st), Expect::Error, "8-byte header"))
    });
}

#[test]
fn header_of_15_bytes() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0)[..15]);
        let d = s.alloc(512, 512);
        let st = s.status();
        let segs = [Desc::r(hdr, 15), Desc::w(d, 512), Desc::w(st, 1)];
        Plan::one(submit(s, &segs, Some(st), Expect::Error, "15-byte header"))
    });
}

#[test]
fn header_missing() {
    run_case(|s| {
        let d = s.alloc(512, 512);
        let st = s.status();
        let segs = [Desc::w(d, 512), Desc::w(st, 1)];
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Error,
            "no device-readable header",
        ))
    });
}

#[test]
fn header_alone() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        Plan::one(submit(
            s,
            &[Desc::r(hdr, 16)],
            None,
            Expect::Any,
            "header only, no status",
        ))
    });
}

#[test]
fn header_device_writable() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let st = s.status();
        let segs = [Desc::w(hdr, 16), Desc::w(d, 512), Desc::w(st, 1)];
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Error,
            "header in a device-writable descriptor",
        ))
    });
}

#[test]
fn header_straddles_region_end() {
    let a_end = RAM_A.0 + RAM_A.1;
    run_case(|s| {
        s.mem.write(a_end - 8, &header(T_IN, S0)[..8]);
        let d = s.alloc(512, 512);
        let st = s.status();
        let segs = [Desc::r(a_end - 8, 16), Desc::w(d, 512), Desc::w(st, 1)];
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Error,
            "header across region end and gap",
        ))
    });
}

#[test]
fn legal_header_split_4_12() {
    run_case(|s| {
        let h = header(T_IN, S0);
        let a = s.put(&h[..4]);
        let b = s.put(&h[4..]);
        let d = s.alloc(1024, 512);
        let st = s.status();
        let segs = [
            Desc::r(a, 4),
            Desc::r(b, 12),
            Desc::w(d, 1024),
            Desc::w(st, 1),
        ];
        let expect = Expect::Read {
            offset: OFF0,
            pieces: vec![(d, 1024)],
        };
        Plan::one(submit(s, &segs, Some(st), expect, "header split 4+12").must_succeed())
    });
}

#[test]
fn legal_header_split_into_single_bytes() {
    run_case(|s| {
        let h = header(T_IN, S0);
        let mut segs = Vec::new();
        for b in h {
            let a = s.put(&[b]);
            segs.push(Desc::r(a, 1));
        }
        let d = s.alloc(512, 512);
        let st = s.status();
        segs.push(Desc::w(d, 512));
        segs.push(Desc::w(st, 1));
        let expect = Expect::Read {
            offset: OFF0,
            pieces: vec![(d, 512)],
        };
        Plan::one(
            submit(
                s,
                &segs,
                Some(st),
                expect,
                "header in 16 one-byte descriptors",
            )
            .must_succeed(),
        )
    });
}

#[test]
fn legal_header_and_data_in_one_descriptor() {
    run_case(|s| {
        let data: Vec<u8> = (0..1024u32).map(|i| (i * 3 + 1) as u8).collect();
        let mut buf = header(T_OUT, S0).to_vec();
        buf.extend_from_slice(&data);
        let a = s.put(&buf);
        let st = s.status();
        let segs = [Desc::r(a, buf.len() as u32), Desc::w(st, 1)];
        Plan::one(
            submit(
                s,
                &segs,
                Some(st),
                Expect::Write { offset: OFF0, data },
                "OUT header+data in one descriptor",
            )
            .must_succeed()
            .writes_image(OFF0, 1024),
        )
    });
}

#[test]
fn legal_data_and_status_in_one_descriptor() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(513, 512);
        s.mem.write(d + 512, &[0xff]);
        let segs = [Desc::r(hdr, 16), Desc::w(d, 513)];
        let expect = Expect::Read {
            offset: OFF0,
            pieces: vec![(d, 512)],
        };
        Plan::one(
            submit(
                s,
                &segs,
                Some(d + 512),
                expect,
                "IN data+status in one descriptor",
            )
            .must_succeed(),
        )
    });
}

// ---------------------------------------------------------------------------------------
// Status byte and data in the wrong direction.

#[test]
fn status_in_device_readable_descriptor() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let st = s.status();
        let segs = [Desc::r(hdr, 16), Desc::w(d, 512), Desc::r(st, 1)];
        // The status cannot legally be written: the memory check catches a write to it.
        Plan::one(submit(
            s,
            &segs,
            None,
            Expect::Any,
            "status in a device-readable descriptor",
        ))
    });
}

#[test]
fn status_descriptor_of_length_zero() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let st = s.status();
        let segs = [Desc::r(hdr, 16), Desc::w(d, 512), Desc::w(st, 0)];
        Plan::one(submit(
            s,
            &segs,
            None,
            Expect::Any,
            "zero-length status descriptor",
        ))
    });
}

#[test]
fn out_request_without_status() {
    run_case(|s| {
        let hdr = s.put(&header(T_OUT, S0));
        let d = s.put(&[0x5a; 512]);
        let segs = [Desc::r(hdr, 16), Desc::r(d, 512)];
        Plan::one(
            submit(
                s,
                &segs,
                None,
                Expect::Any,
                "OUT without a status descriptor",
            )
            .writes_image(OFF0, 512),
        )
    });
}

#[test]
fn in_request_with_device_readable_data() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(4096, 512);
        s.mem.fill(d, 4096, 0xa5);
        let st = s.status();
        let segs = [Desc::r(hdr, 16), Desc::r(d, 4096), Desc::w(st, 1)];
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Error,
            "IN into a device-readable buffer",
        ))
    });
}

#[test]
fn out_request_with_device_writable_data() {
    run_case(|s| {
        let hdr = s.put(&header(T_OUT, S0));
        let d = s.alloc(4096, 512);
        let st = s.status();
        let segs = [Desc::r(hdr, 16), Desc::w(d, 4096), Desc::w(st, 1)];
        Plan::one(
            submit(
                s,
                &segs,
                Some(st),
                Expect::Any,
                "OUT from a device-writable buffer",
            )
            .writes_image(OFF0, 4096),
        )
    });
}

#[test]
fn readable_descriptor_after_writable_ones() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let extra = s.put(&[0x11; 512]);
        let st = s.status();
        let segs = [
            Desc::r(hdr, 16),
            Desc::w(d, 512),
            Desc::r(extra, 512),
            Desc::w(st, 1),
        ];
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Any,
            "readable descriptor after a writable one",
        ))
    });
}

#[test]
fn many_zero_length_descriptors() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let st = s.status();
        let mut segs = vec![Desc::r(hdr, 16)];
        segs.extend(std::iter::repeat_n(Desc::w(d, 0), 200));
        segs.push(Desc::w(d, 512));
        segs.push(Desc::w(st, 1));
        let expect = Expect::Read {
            offset: OFF0,
            pieces: vec![(d, 512)],
        };
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            expect,
            "200 zero-length descriptors",
        ))
    });
}

#[test]
fn read_of_length_not_multiple_of_sector() {
    run_case(|s| Plan::one(legal_read(s, S0, &[100], "IN of 100 bytes")));
}

#[test]
fn read_segment_larger_than_size_max() {
    run_case(|s| Plan::one(legal_read(s, 0, &[2 << 20], "IN with one 2 MiB segment")));
}

#[test]
fn writable_buffers_alias_each_other() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, 0));
        let d = s.alloc(65536, 4096);
        let st = s.status();
        let mut segs = vec![Desc::r(hdr, 16)];
        segs.extend(std::iter::repeat_n(Desc::w(d, 65536), 64));
        segs.push(Desc::w(st, 1));
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Any,
            "64 segments, one buffer",
        ))
    });
}

// ---------------------------------------------------------------------------------------
// Sectors past the capacity, ranges that overflow.

#[test]
fn read_at_capacity() {
    run_case(|s| {
        Plan::one(legal_read(s, CAPACITY, &[512], "IN at sector = capacity")).expect_error()
    });
}

#[test]
fn read_straddling_capacity() {
    run_case(|s| {
        Plan::one(legal_read(s, CAPACITY - 1, &[1024], "IN across the end")).expect_error()
    });
}

#[test]
fn write_at_capacity() {
    run_case(|s| {
        let d = s.put(&[0x77; 512]);
        write_with(s, CAPACITY, Desc::r(d, 512), "OUT at sector = capacity")
    });
}

#[test]
fn write_straddling_capacity() {
    run_case(|s| {
        let d = s.put(&[0x77; 1024]);
        write_with(s, CAPACITY - 1, Desc::r(d, 1024), "OUT across the end")
    });
}

#[test]
fn read_at_sector_u64_max() {
    run_case(|s| {
        Plan::one(legal_read(s, u64::MAX, &[512], "IN at sector u64::MAX")).expect_error()
    });
}

#[test]
fn write_at_sector_whose_offset_wraps_to_zero() {
    // 2^55 sectors * 512 = 2^64: a backend multiplying without a check writes at offset 0.
    run_case(|s| {
        let d = s.put(&[0x77; 4096]);
        let mut p = write_with(
            s,
            1 << 55,
            Desc::r(d, 4096),
            "OUT at sector 2^55 (offset wraps to 0)",
        );
        // Its "own range" would be wherever the offset wraps to: none.
        p.subs[0].image.clear();
        p
    });
}

#[test]
fn read_at_sector_whose_offset_wraps() {
    run_case(|s| {
        Plan::one(legal_read(
            s,
            (1 << 55) + S0,
            &[4096],
            "IN at sector 2^55+8 (offset wraps to 4096)",
        ))
        .expect_error()
    });
}

#[test]
fn write_whose_end_overflows_u64() {
    run_case(|s| {
        let d = s.put(&[0x77; 4096]);
        let mut p = write_with(
            s,
            u64::MAX / SECTOR - 1,
            Desc::r(d, 4096),
            "OUT, offset+len overflows",
        );
        p.subs[0].image.clear();
        p
    });
}

// ---------------------------------------------------------------------------------------
// Request types.

#[test]
fn unknown_request_types() {
    run_case(|s| {
        let mut p = Plan::default();
        for t in [2u32, 3, 5, 6, 7, 9, 12, 15, 16, 0x8000_0000, u32::MAX] {
            let hdr = s.put(&header(t, S0));
            let d = s.alloc(512, 512);
            let st = s.status();
            let segs = [Desc::r(hdr, 16), Desc::w(d, 512), Desc::w(st, 1)];
            p.subs.push(submit(
                s,
                &segs,
                Some(st),
                Expect::Error,
                &format!("request type {t:#x}"),
            ));
        }
        p
    });
}

#[test]
fn unknown_request_types_carrying_data() {
    run_case(|s| {
        let mut p = Plan::default();
        for t in [2u32, 3, 5, 7, 0x8000_0001] {
            let hdr = s.put(&header(t, S0));
            let d = s.put(&[0x33; 512]);
            let st = s.status();
            let segs = [Desc::r(hdr, 16), Desc::r(d, 512), Desc::w(st, 1)];
            p.subs.push(submit(
                s,
                &segs,
                Some(st),
                Expect::Error,
                &format!("request type {t:#x} with OUT data"),
            ));
        }
        p
    });
}

#[test]
fn get_id_with_short_buffer() {
    run_case(|s| {
        let hdr = s.put(&header(T_GET_ID, 0));
        let d = s.alloc(4, 4);
        let st = s.status();
        let segs = [Desc::r(hdr, 16), Desc::w(d, 4), Desc::w(st, 1)];
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Any,
            "GET_ID into 4 bytes",
        ))
    });
}

#[test]
fn get_id_without_buffer() {
    run_case(|s| {
        let hdr = s.put(&header(T_GET_ID, 0));
        let st = s.status();
        let segs = [Desc::r(hdr, 16), Desc::w(st, 1)];
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Any,
            "GET_ID without a buffer",
        ))
    });
}

#[test]
fn get_id_into_device_readable_buffer() {
    run_case(|s| {
        let hdr = s.put(&header(T_GET_ID, 0));
        let d = s.alloc(20, 4);
        let st = s.status();
        let segs = [Desc::r(hdr, 16), Desc::r(d, 20), Desc::w(st, 1)];
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Any,
            "GET_ID into a device-readable buffer",
        ))
    });
}

#[test]
fn legal_get_id_split_buffer() {
    run_case(|s| {
        let reference = match s.io(0, T_GET_ID, 0, &[], ID_LEN) {
            Ok((S_OK, id)) => id,
            other => panic!("a plain GET_ID failed: {other:?}"),
        };
        let hdr = s.put(&header(T_GET_ID, 0));
        let a = s.alloc(7, 1);
        let b = s.alloc(13, 1);
        let st = s.status();
        let segs = [
            Desc::r(hdr, 16),
            Desc::w(a, 7),
            Desc::w(b, 13),
            Desc::w(st, 1),
        ];
        let check: MemCheck = Box::new(move |m| {
            let mut got = m.read(a, 7);
            got.extend(m.read(b, 13));
            if got == reference {
                Ok(())
            } else {
                Err(format!(
                    "split GET_ID returned {got:02x?}, plain GET_ID {reference:02x?}"
                ))
            }
        });
        Plan::one(
            submit(
                s,
                &segs,
                Some(st),
                Expect::Check(check),
                "GET_ID into 7+13 bytes",
            )
            .must_succeed(),
        )
    });
}

#[test]
fn flush_carrying_data_and_a_sector() {
    run_case(|s| {
        let hdr = s.put(&header(T_FLUSH, 12345));
        let d = s.alloc(512, 512);
        let st = s.status();
        let segs = [Desc::r(hdr, 16), Desc::w(d, 512), Desc::w(st, 1)];
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Any,
            "FLUSH with a data buffer and sector 12345",
        ))
    });
}

/// A DISCARD or WRITE_ZEROES request with `segs` as its (device-readable) payload.
fn range_request(s: &mut Session, t: u32, segs: &[[u8; 16]], expect: Expect, what: &str) -> Plan {
    let hdr = s.put(&header(t, 0));
    let payload: Vec<u8> = segs.iter().flatten().copied().collect();
    let d = if payload.is_empty() {
        s.alloc(16, 16)
    } else {
        s.put(&payload)
    };
    let st = s.status();
    let descs = [
        Desc::r(hdr, 16),
        Desc::r(d, payload.len() as u32),
        Desc::w(st, 1),
    ];
    let mut sub = submit(s, &descs, Some(st), expect, what);
    for seg in segs {
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
        let n = u32::from_le_bytes(seg[8..12].try_into().unwrap());
        let (off, len) = own_range(sector, u64::from(n) * SECTOR);
        sub = sub.writes_image(off, len);
    }
    Plan::one(sub)
}

#[test]
fn discard_past_capacity() {
    run_case(|s| {
        range_request(
            s,
            T_DISCARD,
            &[range_seg(CAPACITY - 1, 8, 0)],
            Expect::Error,
            "DISCARD across the end",
        )
    });
}

#[test]
fn discard_at_sector_whose_offset_wraps_to_zero() {
    run_case(|s| {
        let mut p = range_request(
            s,
            T_DISCARD,
            &[range_seg(1 << 55, 8, 0)],
            Expect::Error,
            "DISCARD at 2^55",
        );
        p.subs[0].image.clear();
        p
    });
}

#[test]
fn discard_range_overflows_u64() {
    run_case(|s| {
        let mut p = range_request(
            s,
            T_DISCARD,
            &[range_seg(u64::MAX - 1, 8, 0)],
            Expect::Error,
            "DISCARD at u64::MAX-1",
        );
        p.subs[0].image.clear();
        p
    });
}

#[test]
fn discard_of_u32_max_sectors() {
    run_case(|s| {
        range_request(
            s,
            T_DISCARD,
            &[range_seg(S0, u32::MAX, 0)],
            Expect::Error,
            "DISCARD of 2^32-1 sectors",
        )
    });
}

#[test]
fn discard_without_segments() {
    run_case(|s| range_request(s, T_DISCARD, &[], Expect::Any, "DISCARD with no segment"));
}

#[test]
fn discard_with_partial_segment() {
    run_case(|s| {
        let hdr = s.put(&header(T_DISCARD, 0));
        let mut payload = range_seg(S0, 8, 0).to_vec();
        payload.extend_from_slice(&range_seg(S0 + 64, 8, 0)[..8]);
        let d = s.put(&payload);
        let st = s.status();
        let descs = [Desc::r(hdr, 16), Desc::r(d, 24), Desc::w(st, 1)];
        Plan::one(
            submit(
                s,
                &descs,
                Some(st),
                Expect::Any,
                "DISCARD payload of 24 bytes",
            )
            .writes_image(OFF0, 8 * SECTOR)
            .writes_image((S0 + 64) * SECTOR, 8 * SECTOR),
        )
    });
}

#[test]
fn discard_with_too_many_segments() {
    run_case(|s| {
        let segs: Vec<[u8; 16]> = (0..33).map(|i| range_seg(S0 + 16 * i, 8, 0)).collect();
        range_request(
            s,
            T_DISCARD,
            &segs,
            Expect::Any,
            "DISCARD with 33 segments (max 32)",
        )
    });
}

#[test]
fn discard_segments_in_device_writable_buffer() {
    run_case(|s| {
        let hdr = s.put(&header(T_DISCARD, 0));
        let d = s.put(&range_seg(S0, 8, 0));
        let st = s.status();
        let descs = [Desc::r(hdr, 16), Desc::w(d, 16), Desc::w(st, 1)];
        Plan::one(
            submit(
                s,
                &descs,
                Some(st),
                Expect::Any,
                "DISCARD segment in a writable buffer",
            )
            .writes_image(OFF0, 8 * SECTOR),
        )
    });
}

#[test]
fn write_zeroes_past_capacity() {
    run_case(|s| {
        range_request(
            s,
            T_WRITE_ZEROES,
            &[range_seg(CAPACITY - 4, 8, 0)],
            Expect::Error,
            "WRITE_ZEROES across the end",
        )
    });
}

#[test]
fn write_zeroes_at_sector_whose_offset_wraps_to_zero() {
    run_case(|s| {
        let mut p = range_request(
            s,
            T_WRITE_ZEROES,
            &[range_seg(1 << 55, 8, WZ_UNMAP)],
            Expect::Error,
            "WRITE_ZEROES at 2^55",
        );
        p.subs[0].image.clear();
        p
    });
}

#[test]
fn write_zeroes_with_unknown_flags() {
    run_case(|s| {
        range_request(
            s,
            T_WRITE_ZEROES,
            &[range_seg(S0, 8, 0xffff_fffe)],
            Expect::Any,
            "WRITE_ZEROES flags 0xfffffffe",
        )
    });
}

#[test]
fn write_on_read_only_device() {
    let opts = CaseOpts {
        rig: RigOpts {
            read_only: true,
            ..RigOpts::default()
        },
        ..CaseOpts::default()
    };
    run_case_with(opts, |s| {
        let d = s.put(&[0x42; 4096]);
        let mut p = write_with(s, S0, Desc::r(d, 4096), "OUT on a read-only device");
        let mut dz = range_request(
            s,
            T_DISCARD,
            &[range_seg(S0, 8, 0)],
            Expect::Error,
            "DISCARD on a read-only device",
        );
        let mut wz = range_request(
            s,
            T_WRITE_ZEROES,
            &[range_seg(S0, 8, 0)],
            Expect::Error,
            "WRITE_ZEROES on a read-only device",
        );
        p.subs.append(&mut dz.subs);
        p.subs.append(&mut wz.subs);
        // Nothing may change on a read-only disk, whatever the answers.
        for sub in &mut p.subs {
            sub.image.clear();
        }
        p
    });
}

// ---------------------------------------------------------------------------------------
// The rings themselves: avail index jumps, buffers pointing into the rings, reuse.

#[test]
fn avail_index_jumps_past_queue_size() {
    run_case(|s| {
        let q = &s.queues[0];
        let idx = q.avail_idx.wrapping_add(q.size + 1);
        Plan {
            avail_override: vec![(0, idx)],
            ..Plan::default()
        }
    });
}

#[test]
fn avail_index_moves_backwards() {
    run_case(|s| {
        let idx = s.queues[0].avail_idx.wrapping_sub(1);
        Plan {
            avail_override: vec![(0, idx)],
            ..Plan::default()
        }
    });
}

#[test]
fn avail_index_jumps_by_0x8000() {
    run_case(|s| {
        let idx = s.queues[0].avail_idx.wrapping_add(0x8000);
        Plan {
            avail_override: vec![(0, idx)],
            ..Plan::default()
        }
    });
}

fn read_into_ring(s: &mut Session, part: &str) -> Plan {
    let (gpa, len) = match part {
        "desc" => s.queues[0].desc_range(),
        "avail" => s.queues[0].avail_range(),
        _ => s.queues[0].used_range(),
    };
    let hdr = s.put(&header(T_IN, S0));
    let st = s.status();
    let segs = [Desc::r(hdr, 16), Desc::w(gpa, len as u32), Desc::w(st, 1)];
    Plan::one(submit(
        s,
        &segs,
        Some(st),
        Expect::Any,
        &format!("IN into the {part} ring"),
    ))
}

#[test]
fn read_into_the_descriptor_table() {
    run_case(|s| read_into_ring(s, "desc"));
}

#[test]
fn read_into_the_avail_ring() {
    run_case(|s| read_into_ring(s, "avail"));
}

#[test]
fn read_into_the_used_ring() {
    run_case(|s| read_into_ring(s, "used"));
}

#[test]
fn header_is_its_own_descriptor() {
    run_case(|s| {
        let f = s.queues[0].alloc(3);
        let d = s.alloc(512, 512);
        let st = s.status();
        let self_addr = s.queues[0].desc + 16 * u64::from(f);
        raw_chain_at(
            s,
            f,
            &[
                (Desc::r(self_addr, 16), Some(f + 1)),
                (Desc::w(d, 512), Some(f + 2)),
                (Desc::w(st, 1), None),
            ],
        );
        s.queues[0].push(&s.mem, f);
        Plan::one(Sub::new(
            f,
            Some(st),
            Expect::Any,
            "header = the head descriptor's own bytes",
        ))
    });
}

#[test]
fn write_from_the_rings() {
    run_case(|s| {
        let (gpa, _) = s.queues[0].desc_range();
        let mut p = write_with(s, S0, Desc::r(gpa, 4096), "OUT from the descriptor table");
        p.subs[0].expect = Expect::Any;
        p
    });
}

/// Why a copy of a head may go unanswered: while the first copy is in flight, a used
/// element for the head would answer that one (virtio 1.2, 2.7.13: the driver must not make
/// a buffer available again before it is used). The first copy must be answered.
const DUPLICATE: &str = "the same head is in flight already";

#[test]
fn same_head_made_available_twice() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(4096, 512);
        let st = s.status();
        let head = s.chain(0, &[Desc::r(hdr, 16), Desc::w(d, 4096), Desc::w(st, 1)]);
        s.queues[0].push(&s.mem, head);
        let mut p = Plan::default();
        for i in 0..2 {
            let mut sub = Sub::new(
                head,
                Some(st),
                Expect::Any,
                format!("head {head}, copy {i}"),
            );
            if i > 0 {
                sub = sub.may_go_unanswered(DUPLICATE);
            }
            p.subs.push(sub);
        }
        p
    });
}

#[test]
fn same_head_fills_the_whole_avail_ring() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(4096, 512);
        let st = s.status();
        let head = s.chain(0, &[Desc::r(hdr, 16), Desc::w(d, 4096), Desc::w(st, 1)]);
        let size = s.queues[0].size;
        for _ in 1..size {
            s.queues[0].push(&s.mem, head);
        }
        let mut p = Plan::default();
        for i in 0..size {
            let mut sub = Sub::new(head, None, Expect::Any, format!("head {head}, copy {i}"));
            if i > 0 {
                sub = sub.may_go_unanswered(DUPLICATE);
            }
            p.subs.push(sub);
        }
        p
    });
}

// ---------------------------------------------------------------------------------------
// Isolation: a hostile queue does not take the other queues down.

#[test]
fn looping_chain_on_one_queue_does_not_stop_another() {
    let opts = CaseOpts {
        rig: RigOpts {
            num_queues: 2,
            ..RigOpts::default()
        },
        session: SessionCfg {
            queues: 2,
            ..SessionCfg::default()
        },
    };
    run_case_with(opts, |s| {
        // Queue 1: a self loop.
        let hdr = s.put(&header(T_IN, S0));
        let f = s.queues[1].alloc(1);
        s.queues[1].write_desc(
            &s.mem,
            f,
            Desc {
                flags: F_NEXT,
                next: f,
                ..Desc::r(hdr, 16)
            },
        );
        s.queues[1].push(&s.mem, f);
        // Queue 0: a valid read, which must be served.
        let good = legal_read(
            s,
            S0,
            &[4096],
            "valid IN on queue 0 beside a looping queue 1",
        )
        .must_succeed();
        let mut p = Plan::one(Sub::new(f, None, Expect::Any, "self loop on queue 1").on_queue(1));
        p.subs.push(good);
        p
    });
}

#[test]
fn event_idx_with_garbage_used_event() {
    let opts = CaseOpts {
        session: SessionCfg {
            features: WANTED_FEATURES | ringfence_guest_tests::frontend::vfeat::RING_EVENT_IDX,
            ..SessionCfg::default()
        },
        ..CaseOpts::default()
    };
    run_case_with(opts, |s| {
        // used_event lives after the avail ring entries.
        let q = &s.queues[0];
        let used_event = q.avail + 4 + 2 * u64::from(q.size);
        s.mem.write_u16(used_event, 0xfff0);
        Plan::one(legal_read(s, S0, &[4096], "valid IN with used_event = 0xfff0").must_succeed())
    });
}

/// A Plan whose single request must not be answered OK.
trait ExpectError {
    fn expect_error(self) -> Self;
}

impl ExpectError for Plan {
    fn expect_error(mut self) -> Plan {
        for s in &mut self.subs {
            s.expect = Expect::Error;
        }
        self
    }
}

// ---------------------------------------------------------------------------------------
// Controls: the oracles themselves must fire. These make a valid request whose effects the
// checks were not told about, and expect the case to fail.

#[test]
#[should_panic(expected = "changed outside the buffers the request may write")]
fn control_untracked_guest_write_is_caught() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let st = s.status();
        let f = s.queues[0].alloc(3);
        // Written behind the tracker's back: the device's legitimate write to `d` looks stray.
        let q = &s.queues[0];
        let descs = [
            Desc {
                flags: F_NEXT,
                next: f + 1,
                ..Desc::r(hdr, 16)
            },
            Desc {
                flags: F_NEXT | F_WRITE,
                next: f + 2,
                ..Desc::w(d, 512)
            },
            Desc::w(st, 1),
        ];
        for (i, d) in descs.iter().enumerate() {
            s.mem
                .write(q.desc + 16 * (u64::from(f) + i as u64), &d.bytes());
        }
        s.queues[0].push(&s.mem, f);
        Plan::one(Sub::new(
            f,
            Some(st),
            Expect::Any,
            "valid IN, buffer not declared",
        ))
    });
}

#[test]
#[should_panic(expected = "changed outside the ranges the requests may write")]
fn control_undeclared_image_write_is_caught() {
    run_case(|s| {
        let hdr = s.put(&header(T_OUT, 100));
        let d = s.put(&[0xee; 512]);
        let st = s.status();
        let segs = [Desc::r(hdr, 16), Desc::r(d, 512), Desc::w(st, 1)];
        Plan::one(submit(
            s,
            &segs,
            Some(st),
            Expect::Any,
            "valid OUT, range not declared",
        ))
    });
}

#[test]
#[should_panic(expected = "invalid request answered with status OK")]
fn control_ok_status_for_an_invalid_request_is_caught() {
    run_case(|s| Plan::one(legal_read(s, S0, &[512], "valid IN, declared invalid")).expect_error());
}

#[test]
#[should_panic(expected = "changed outside the ranges the requests may write")]
fn control_image_change_by_an_untranslatable_write_is_caught() {
    // A backend that writes although the buffer does not translate: played by a buffer that
    // does, declared like the untranslatable ones.
    run_case(|s| {
        let d = s.put(&[0x5e; 4096]);
        let mut p = write_untranslatable(
            s,
            S0,
            Desc::r(d, 4096),
            "valid OUT, declared untranslatable",
        );
        p.subs[0].expect = Expect::Any;
        p
    });
}

// Controls of the liveness, fresh-connection and must-answer oracles: a backend broken on
// purpose (killed, stopped, kept busy, a queue switched off behind the test's back).

/// Run `case`, which must fail with a message containing one of `expected`.
fn expect_failure(expected: &[&str], case: impl FnOnce()) {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(case));
    let Err(e) = r else {
        panic!("the control case passed: the oracle did not fire (expected one of {expected:?})");
    };
    let msg = e
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    assert!(
        expected.iter().any(|x| msg.contains(x)),
        "the control case failed, but not with any of {expected:?}:\n{msg}"
    );
}

/// Rig options for controls: the backend is broken on purpose, so honest waits are short.
fn control_rig() -> RigOpts {
    RigOpts {
        honest_timeout: std::time::Duration::from_secs(2),
        ..RigOpts::default()
    }
}

/// Switch queue 0 off behind the case's back: the backend still runs and still answers on
/// the connection, but this queue is served no more.
fn stall_queue_0(s: &mut Session) {
    s.fe.set_vring_enable(0, false)
        .expect("SET_VRING_ENABLE 0 on an honest connection");
}

#[test]
fn control_request_left_unanswered_is_caught() {
    if target() != Target::Ringfence {
        // The must-answer oracle is ringfence's promise (see rig::run_case_with).
        eprintln!("control applies to ringfence only");
        return;
    }
    expect_failure(
        &["ringfence answers every request whose head is in range"],
        || {
            let opts = CaseOpts {
                rig: control_rig(),
                ..CaseOpts::default()
            };
            run_case_with(opts, |s| {
                stall_queue_0(s);
                let hdr = s.put(&header(T_IN, S0)[..8]);
                let d = s.alloc(512, 512);
                let st = s.status();
                let segs = [Desc::r(hdr, 8), Desc::w(d, 512), Desc::w(st, 1)];
                Plan::one(submit(
                    s,
                    &segs,
                    Some(st),
                    Expect::Error,
                    "8-byte header, queue off",
                ))
            })
        },
    );
}

#[test]
fn control_queue_that_no_longer_serves_is_caught() {
    if target() != Target::Ringfence {
        eprintln!("control applies to ringfence only");
        return;
    }
    // Nothing to answer (a head out of range): only the follow-up request can tell.
    expect_failure(&["queue 0 no longer serves"], || {
        let opts = CaseOpts {
            rig: control_rig(),
            ..CaseOpts::default()
        };
        run_case_with(opts, |s| {
            stall_queue_0(s);
            s.queues[0].push(&s.mem, 0xffff);
            Plan::default()
        })
    });
}

#[test]
fn control_dead_backend_is_caught() {
    // qsd is daemonized: once killed it may linger as a zombie nobody reaps, which looks
    // alive; then the fresh connection is what fails.
    expect_failure(
        &[
            "the backend process died",
            "health check: connecting failed",
        ],
        || {
            run_case_with(
                CaseOpts {
                    rig: control_rig(),
                    ..CaseOpts::default()
                },
                |s| {
                    let pid = s.fe.peer_pid().expect("SO_PEERCRED");
                    // SAFETY: killing the backend this test started (the socket's peer).
                    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
                    Plan::one(
                        legal_read(s, S0, &[4096], "valid IN to a killed backend").must_succeed(),
                    )
                },
            )
        },
    );
}

#[test]
fn control_hanging_connection_is_caught() {
    expect_failure(&["the connection hangs"], || {
        let mut rig = Rig::start(control_rig());
        let mut s = rig.session(&SessionCfg::default());
        s.fe.timeout = std::time::Duration::from_secs(1);
        assert!(
            rig.daemon.stop(std::time::Duration::from_secs(5)),
            "the backend did not stop"
        );
        rig.responsive(&s.fe, "a stopped backend");
        rig.daemon.resume();
        rig.keep_session("the session", s, &[]);
        rig.finish();
    });
}

#[test]
fn control_backend_that_serves_no_fresh_connection_is_caught() {
    expect_failure(&["health check: a fresh connection's setup failed"], || {
        let mut rig = Rig::start(control_rig());
        // The backend serves one connection at a time: while this one stays open, a fresh
        // connection is not served.
        let s = rig.session(&SessionCfg::default());
        rig.health_check();
        rig.keep_session("the session held open", s, &[]);
        rig.finish();
    });
}
