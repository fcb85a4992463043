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
//! Cases of one shape are a table (`cases!`): one function builds the shape, each row says
//! what varies and is a `#[test]` of its own, named as before.
//!
//! `RINGFENCE_HOSTILE_TARGET=qsd` runs the same cases against qemu-storage-daemon.

use ringfence_guest_tests::blk::*;
use ringfence_guest_tests::rig::*;
use ringfence_guest_tests::virtq::{Desc, SplitQueue, F_INDIRECT, F_NEXT, F_WRITE};

/// The sector most hostile requests name (byte offset 4096).
const S0: u64 = 8;
const OFF0: u64 = S0 * SECTOR;

fn wsum(segs: &[Desc]) -> u64 {
    segs.iter()
        .filter(|d| d.is_write())
        .map(|d| u64::from(d.len))
        .sum()
}

/// `d` with NEXT set, linking on to descriptor `next`.
fn linked(d: Desc, next: u16) -> Desc {
    Desc {
        flags: d.flags | F_NEXT,
        next,
        ..d
    }
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

/// A request of type `t` (IN or OUT) at `sector` whose data descriptor `data` does not
/// translate to guest RAM: it must fail and, whatever the backend answers, no byte of the
/// image may change (there is nothing it could write). `unseen`: why the status byte may
/// stay unwritten, if it may.
fn untranslatable(
    s: &mut Session,
    t: u32,
    sector: u64,
    data: Desc,
    unseen: Option<&'static str>,
    what: &str,
) -> Plan {
    let hdr = s.put(&header(t, sector));
    let st = s.status();
    let mut sub = submit(
        s,
        &[Desc::r(hdr, 16), data, Desc::w(st, 1)],
        Some(st),
        Expect::Error,
        what,
    );
    sub.status_unseen = unseen;
    Plan::one(sub)
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

/// A table of the cases of one shape: each row `name: (args...)` is a `#[test]` of its own
/// that runs `rig::run_case` on the plan `build(s, args...)` lays out, so that every case
/// runs on a backend of its own and a failure names its case (the test's name, and the
/// `what` its requests carry).
macro_rules! cases {
    (build = $build:ident; $($name:ident: ($($arg:expr),+ $(,)?),)+) => {
        $(
            #[test]
            fn $name() {
                run_case(|s| $build(s, $($arg),+));
            }
        )+
    };
}

/// Table values: whether a request must fail, or may be served or refused.
const REFUSED: bool = true;
const EITHER: bool = false;
/// Table values: whether a request names a range of the image it may write if served (an
/// offset that wraps or overflows names none).
const OWN_RANGE: bool = true;
const NO_RANGE: bool = false;

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

const A_END: u64 = RAM_A.0 + RAM_A.1;

/// Why a status byte after a 4 GiB descriptor may stay unwritten: a chain longer than
/// 2^32 bytes is illegal (virtio 1.2, 2.7.5.2), and a device may stop walking it there.
const PAST_4GIB: &str = "it lies past the first 2^32 bytes of the chain";

cases! {
    build = untranslatable;
    read_into_buffer_outside_guest_memory:
        (T_IN, S0, Desc::w(0xdead_0000_0000, 4096), None, "IN into 0xdead00000000"),
    write_from_buffer_outside_guest_memory:
        (T_OUT, S0, Desc::r(0xdead_0000_0000, 4096), None, "OUT from 0xdead00000000"),
    read_into_buffer_below_guest_memory:
        (T_IN, S0, Desc::w(0, 4096), None, "IN into GPA 0 (no RAM there)"),
    read_into_gap_between_regions:
        (T_IN, S0, Desc::w(GAP.0 + 0x1000, 4096), None, "IN into the gap"),
    read_into_buffer_straddling_region_end_and_gap:
        (T_IN, S0, Desc::w(A_END - 2048, 4096), None, "IN into region end + gap"),
    write_from_buffer_straddling_region_end_and_gap:
        (T_OUT, S0, Desc::r(A_END - 2048, 4096), None, "OUT from region end + gap"),
    read_into_buffer_whose_end_overflows_u64:
        (T_IN, S0, Desc::w(u64::MAX - 1023, 4096), None, "IN, addr+len overflows"),
    write_from_buffer_whose_end_overflows_u64:
        (T_OUT, S0, Desc::r(u64::MAX - 1023, 4096), None, "OUT, addr+len overflows"),
    // Starts in RAM (4 KiB before the end of region A), 4 GiB - 1 long: runs past it.
    read_into_4gib_buffer:
        (T_IN, 0, Desc::w(A_END - 4096, u32::MAX), Some(PAST_4GIB), "IN of 4 GiB - 1"),
    write_from_4gib_buffer: (
        T_OUT,
        CAPACITY - 8,
        Desc::r(A_END - 4096, u32::MAX),
        Some(PAST_4GIB),
        "OUT of 4 GiB - 1",
    ),
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

fn raw_chain_at(s: &mut Session, first: u16, descs: &[(Desc, Option<u16>)]) {
    for (i, &(d, link)) in descs.iter().enumerate() {
        let d = link.map_or(d, |n| linked(d, n));
        s.queues[0].write_desc(&s.mem, first + i as u16, d);
    }
}

/// A descriptor of a raw chain: the header, a 512-byte writable buffer, the status byte.
#[derive(Clone, Copy, PartialEq)]
enum Part {
    Hdr,
    Data,
    Status,
}

/// Where a descriptor of a raw chain links to.
#[derive(Clone, Copy)]
enum Link {
    /// The chain's own descriptor `i` (0: its head).
    To(u16),
    /// Index = the queue size (one past the table).
    QueueSize,
    /// This index.
    Index(u16),
}

/// An IN chain at `sector` on queue 0 made of `parts`, each linking on as it says (with
/// NEXT set). With a status byte in the chain it must fail; without, anything goes.
fn raw_chain(s: &mut Session, sector: u64, parts: &[(Part, Link)], what: &str) -> Plan {
    let has = |p: Part| parts.iter().any(|&(q, _)| q == p);
    let hdr = s.put(&header(T_IN, sector));
    let d = has(Part::Data).then(|| s.alloc(512, 512));
    let st = has(Part::Status).then(|| s.status());
    let size = s.queues[0].size;
    let f = s.queues[0].alloc(parts.len() as u16);
    let descs: Vec<(Desc, Option<u16>)> = parts
        .iter()
        .map(|&(p, link)| {
            let desc = match p {
                Part::Hdr => Desc::r(hdr, 16),
                Part::Data => Desc::w(d.unwrap(), 512),
                Part::Status => Desc::w(st.unwrap(), 1),
            };
            let next = match link {
                Link::To(i) => f + i,
                Link::QueueSize => size,
                Link::Index(i) => i,
            };
            (desc, Some(next))
        })
        .collect();
    raw_chain_at(s, f, &descs);
    s.queues[0].push(&s.mem, f);
    let expect = if st.is_some() {
        Expect::Error
    } else {
        Expect::Any
    };
    Plan::one(Sub::new(f, st, expect, what))
}

use Link::*;
use Part::*;

cases! {
    build = raw_chain;
    chain_loops_back_to_head:
        (S0, &[(Hdr, To(1)), (Data, To(0))], "chain hdr -> data -> hdr ..."),
    chain_head_points_to_itself: (S0, &[(Hdr, To(0))], "self-looping head"),
    chain_loops_through_status_descriptor: (
        S0,
        &[(Hdr, To(1)), (Data, To(2)), (Status, To(0))],
        "chain hdr -> data -> status -> hdr ...",
    ),
    // A loop of writable 512-byte buffers: a device that follows it writes "forever".
    chain_of_writable_descriptors_looping_forever:
        (0, &[(Hdr, To(1)), (Data, To(2)), (Data, To(1))], "loop of writable buffers"),
    chain_next_index_equals_queue_size: (S0, &[(Hdr, QueueSize)], "next = queue size"),
    chain_next_index_0xffff: (S0, &[(Hdr, To(1)), (Data, Index(0xffff))], "next = 0xffff"),
}

/// Queue 0's avail ring names `head(queue)`, which is out of range: no valid request was
/// made, so any used element is a finding.
fn avail_head_out_of_range(s: &mut Session, head: fn(&SplitQueue) -> u16) -> Plan {
    let h = head(&s.queues[0]);
    s.queues[0].push(&s.mem, h);
    Plan::default()
}

cases! {
    build = avail_head_out_of_range;
    avail_ring_head_equals_queue_size: (|q| q.size),
    avail_ring_head_0xffff: (|_| 0xffff),
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
        linked(Desc::r(hdr, 16), 1),
        linked(Desc::w(d, 512), 2),
        Desc::w(st, 1),
    ];
    s.queues[0].write_table(&s.mem, table, &descs);
    (d, st)
}

#[test]
fn indirect_table_straddles_region_end() {
    let a_end = RAM_A.0 + RAM_A.1;
    run_case(|s| {
        // The first entry is valid and in RAM; the other two would lie in the gap.
        let hdr = s.put(&header(T_IN, S0));
        s.queues[0].write_table(&s.mem, a_end - 16, &[linked(Desc::r(hdr, 16), 1)]);
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
fn indirect_descriptor_after_a_direct_one() {
    run_case(|s| {
        let hdr = s.put(&header(T_IN, S0));
        let d = s.alloc(512, 512);
        let st = s.status();
        let t = s.alloc(32, 16);
        s.queues[0].write_table(&s.mem, t, &[linked(Desc::w(d, 512), 1), Desc::w(st, 1)]);
        let f = s.queues[0].alloc(2);
        s.queues[0].write_desc(&s.mem, f, linked(Desc::r(hdr, 16), f + 1));
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

/// An indirect descriptor for a table at `at(s)` `(address, length)` where no valid table
/// is (or the queue's own descriptor table): anything goes, as long as nothing else breaks.
fn indirect_nowhere(s: &mut Session, at: fn(&Session) -> (u64, u32), what: &str) -> Plan {
    let (addr, len) = at(s);
    let head = indirect_head(s, addr, len, 0);
    Plan::one(Sub::new(head, None, Expect::Any, what))
}

cases! {
    build = indirect_nowhere;
    indirect_table_outside_guest_memory:
        (|_| (0xdead_0000_0000, 48), "indirect table at 0xdead00000000"),
    indirect_table_in_gap: (|_| (GAP.0, 48), "indirect table in the gap"),
    indirect_table_end_overflows_u64:
        (|_| (u64::MAX - 15, 48), "indirect table addr+len overflows"),
    indirect_table_is_the_descriptor_table: (
        |s| {
            let (desc, len) = s.queues[0].desc_range();
            (desc, len as u32)
        },
        "indirect table = the queue's descriptor table",
    ),
}

/// How a case with a valid table may be answered.
#[derive(Clone, Copy)]
enum Answer {
    /// It must fail; its status byte may go unseen, because of the reason given.
    Refused(&'static str),
    /// Anything goes.
    Any,
    /// Serving it (with the right data) and refusing it are both fine.
    Served,
}

/// A valid 3-entry IN table (see `valid_table`) `misalign` bytes past a 16-byte boundary,
/// referred to by an indirect descriptor of `len` bytes with the extra `flags`.
fn valid_table_case(
    s: &mut Session,
    misalign: u64,
    len: u32,
    flags: u16,
    answer: Answer,
    what: &str,
) -> Plan {
    let t = if misalign == 0 {
        s.alloc(48, 16)
    } else {
        s.alloc(64, 16) + misalign
    };
    let (d, st) = valid_table(s, t);
    let head = indirect_head(s, t, len, flags);
    let sub = match answer {
        Answer::Refused(why) => Sub::new(head, Some(st), Expect::Error, what).status_unseen(why),
        Answer::Any => Sub::new(head, Some(st), Expect::Any, what),
        Answer::Served => {
            let expect = Expect::Read {
                offset: OFF0,
                pieces: vec![(d, 512)],
            };
            Sub::new(head, Some(st), expect, what)
        }
    };
    Plan::one(sub)
}

cases! {
    build = valid_table_case;
    indirect_table_empty: (
        0,
        0,
        0,
        Answer::Refused("a table of length 0 holds no descriptor"),
        "indirect table of length 0",
    ),
    indirect_table_length_not_multiple_of_16:
        (0, 40, 0, Answer::Any, "indirect table of length 40"),
    // The table itself is fine, at an odd address.
    indirect_table_misaligned: (1, 48, 0, Answer::Served, "indirect table at an odd address"),
    indirect_table_huge_length:
        (0, 0xffff_fff0, 0, Answer::Any, "indirect table of length 0xfffffff0"),
    // "The device MUST ignore the write-only flag in the descriptor that refers to an
    // indirect table": serving this is expected, refusing it is tolerated.
    indirect_descriptor_with_write_flag: (0, 48, F_WRITE, Answer::Served, "INDIRECT|WRITE head"),
}

/// A two-entry indirect table (the header, then 512 writable bytes) whose second entry
/// links on to entry `next`: past the table's end, or back into it.
fn linked_table(s: &mut Session, next: u16, what: &str) -> Plan {
    let hdr = s.put(&header(T_IN, S0));
    let d = s.alloc(512, 512);
    let t = s.alloc(32, 16);
    s.queues[0].write_table(
        &s.mem,
        t,
        &[linked(Desc::r(hdr, 16), 1), linked(Desc::w(d, 512), next)],
    );
    let head = indirect_head(s, t, 32, 0);
    Plan::one(Sub::new(head, None, Expect::Any, what))
}

cases! {
    build = linked_table;
    indirect_table_next_past_its_end: (7, "indirect next = 7 in a table of 2"),
    indirect_table_loops: (0, "indirect table 0 -> 1 -> 0"),
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
        valid_table_case(
            s,
            0,
            48,
            0,
            Answer::Served,
            "indirect descriptor, INDIRECT_DESC not negotiated",
        )
    });
}

// ---------------------------------------------------------------------------------------
// Requests of up to three descriptors (header, data, status byte), each in either
// direction, of any length, or missing: short, missing and misdirected headers, data and
// status bytes, for every request type.

/// A descriptor of a [`Direct`] request: device-readable or device-writable, of `n` bytes;
/// or none.
#[derive(Clone, Copy)]
enum Seg {
    No,
    R(u32),
    W(u32),
}

/// A request of up to three descriptors: its header (the first bytes of it), a data buffer
/// (zeroed, or filled with `fill`; 512-aligned from 512 bytes on, else 4-aligned) and a
/// status byte (watched when it is device-writable and not empty).
#[derive(Clone, Copy)]
struct Direct {
    t: u32,
    sector: u64,
    hdr: Seg,
    data: Seg,
    fill: Option<u8>,
    status: Seg,
    /// It must fail (else anything goes).
    refused: bool,
    /// The image range it writes if served.
    writes: Option<(u64, u64)>,
}

/// A well-formed 512-byte IN request at sector `S0`, which rows change.
const IN: Direct = Direct {
    t: T_IN,
    sector: S0,
    hdr: Seg::R(16),
    data: Seg::W(512),
    fill: None,
    status: Seg::W(1),
    refused: EITHER,
    writes: None,
};

const GET_ID: Direct = Direct {
    t: T_GET_ID,
    sector: 0,
    ..IN
};

fn direct(s: &mut Session, r: Direct, what: &str) -> Plan {
    let h = header(r.t, r.sector);
    let hdr = match r.hdr {
        Seg::No => None,
        Seg::R(n) | Seg::W(n) => Some(s.put(&h[..n as usize])),
    };
    let data = match r.data {
        Seg::No => None,
        Seg::R(n) | Seg::W(n) => {
            let d = s.alloc(u64::from(n), if n >= 512 { 512 } else { 4 });
            if let Some(b) = r.fill {
                s.mem.fill(d, n as usize, b);
            }
            Some(d)
        }
    };
    let st = match r.status {
        Seg::No => None,
        Seg::R(_) | Seg::W(_) => Some(s.status()),
    };
    let segs: Vec<Desc> = [(r.hdr, hdr), (r.data, data), (r.status, st)]
        .into_iter()
        .filter_map(|(seg, addr)| match (seg, addr) {
            (Seg::R(n), Some(a)) => Some(Desc::r(a, n)),
            (Seg::W(n), Some(a)) => Some(Desc::w(a, n)),
            _ => None,
        })
        .collect();
    // A status byte the device cannot legally write is not watched: the memory check
    // catches a write to it.
    let watched = match r.status {
        Seg::W(n) if n > 0 => st,
        _ => None,
    };
    let expect = if r.refused {
        Expect::Error
    } else {
        Expect::Any
    };
    let mut sub = submit(s, &segs, watched, expect, what);
    if let Some((off, len)) = r.writes {
        sub = sub.writes_image(off, len);
    }
    Plan::one(sub)
}

use Seg::{R, W};

cases! {
    build = direct;
    header_of_8_bytes: (Direct { hdr: R(8), refused: REFUSED, ..IN }, "8-byte header"),
    header_of_15_bytes: (Direct { hdr: R(15), refused: REFUSED, ..IN }, "15-byte header"),
    header_missing: (
        Direct { hdr: Seg::No, refused: REFUSED, ..IN },
        "no device-readable header",
    ),
    header_alone: (
        Direct { data: Seg::No, status: Seg::No, ..IN },
        "header only, no status",
    ),
    header_device_writable: (
        Direct { hdr: W(16), refused: REFUSED, ..IN },
        "header in a device-writable descriptor",
    ),
    status_in_device_readable_descriptor: (
        Direct { status: R(1), ..IN },
        "status in a device-readable descriptor",
    ),
    status_descriptor_of_length_zero: (
        Direct { status: W(0), ..IN },
        "zero-length status descriptor",
    ),
    in_request_with_device_readable_data: (
        Direct { data: R(4096), fill: Some(0xa5), refused: REFUSED, ..IN },
        "IN into a device-readable buffer",
    ),
    out_request_with_device_writable_data: (
        Direct { t: T_OUT, data: W(4096), writes: Some((OFF0, 4096)), ..IN },
        "OUT from a device-writable buffer",
    ),
    get_id_with_short_buffer: (Direct { data: W(4), ..GET_ID }, "GET_ID into 4 bytes"),
    get_id_without_buffer: (Direct { data: Seg::No, ..GET_ID }, "GET_ID without a buffer"),
    get_id_into_device_readable_buffer: (
        Direct { data: R(20), ..GET_ID },
        "GET_ID into a device-readable buffer",
    ),
    flush_carrying_data_and_a_sector: (
        Direct { t: T_FLUSH, sector: 12345, ..IN },
        "FLUSH with a data buffer and sector 12345",
    ),
}

// ---------------------------------------------------------------------------------------
// Headers: across a region's end, split, sharing a descriptor with data or status.

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
// Status byte and data: missing, in the wrong direction, many, aliased.

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

/// A one-segment IN request of `len` bytes at `sector` (see `legal_read`): `REFUSED`, it
/// must fail; `EITHER`, serving it (with the right data) or refusing it are both fine.
fn read_at(s: &mut Session, sector: u64, len: u32, refused: bool, what: &str) -> Plan {
    let p = Plan::one(legal_read(s, sector, &[len], what));
    if refused {
        p.expect_error()
    } else {
        p
    }
}

/// An OUT request of `len` bytes of 0x77 at `sector`, which must fail (see `write_with`).
fn write_at(s: &mut Session, sector: u64, len: usize, range: bool, what: &str) -> Plan {
    let d = s.put(&vec![0x77; len]);
    let mut p = write_with(s, sector, Desc::r(d, len as u32), what);
    if range == NO_RANGE {
        p.subs[0].image.clear();
    }
    p
}

cases! {
    build = read_at;
    read_of_length_not_multiple_of_sector: (S0, 100, EITHER, "IN of 100 bytes"),
    read_segment_larger_than_size_max: (0, 2 << 20, EITHER, "IN with one 2 MiB segment"),
    read_at_capacity: (CAPACITY, 512, REFUSED, "IN at sector = capacity"),
    read_straddling_capacity: (CAPACITY - 1, 1024, REFUSED, "IN across the end"),
    read_at_sector_u64_max: (u64::MAX, 512, REFUSED, "IN at sector u64::MAX"),
    read_at_sector_whose_offset_wraps: (
        (1 << 55) + S0,
        4096,
        REFUSED,
        "IN at sector 2^55+8 (offset wraps to 4096)",
    ),
}

cases! {
    build = write_at;
    write_at_capacity: (CAPACITY, 512, OWN_RANGE, "OUT at sector = capacity"),
    write_straddling_capacity: (CAPACITY - 1, 1024, OWN_RANGE, "OUT across the end"),
    // 2^55 sectors * 512 = 2^64: a backend multiplying without a check writes at offset 0.
    write_at_sector_whose_offset_wraps_to_zero:
        (1 << 55, 4096, NO_RANGE, "OUT at sector 2^55 (offset wraps to 0)"),
    write_whose_end_overflows_u64:
        (u64::MAX / SECTOR - 1, 4096, NO_RANGE, "OUT, offset+len overflows"),
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

/// A DISCARD or WRITE_ZEROES request with the range segments `segs` (see `range_request`):
/// `REFUSED`, it must fail; `NO_RANGE`, its segments name no range of the image.
fn range_case(
    s: &mut Session,
    t: u32,
    segs: &[[u8; 16]],
    refused: bool,
    range: bool,
    what: &str,
) -> Plan {
    let expect = if refused { Expect::Error } else { Expect::Any };
    let mut p = range_request(s, t, segs, expect, what);
    if range == NO_RANGE {
        p.subs[0].image.clear();
    }
    p
}

cases! {
    build = range_case;
    discard_past_capacity: (
        T_DISCARD,
        &[range_seg(CAPACITY - 1, 8, 0)],
        REFUSED,
        OWN_RANGE,
        "DISCARD across the end",
    ),
    discard_at_sector_whose_offset_wraps_to_zero: (
        T_DISCARD,
        &[range_seg(1 << 55, 8, 0)],
        REFUSED,
        NO_RANGE,
        "DISCARD at 2^55",
    ),
    discard_range_overflows_u64: (
        T_DISCARD,
        &[range_seg(u64::MAX - 1, 8, 0)],
        REFUSED,
        NO_RANGE,
        "DISCARD at u64::MAX-1",
    ),
    discard_of_u32_max_sectors: (
        T_DISCARD,
        &[range_seg(S0, u32::MAX, 0)],
        REFUSED,
        OWN_RANGE,
        "DISCARD of 2^32-1 sectors",
    ),
    discard_without_segments: (T_DISCARD, &[], EITHER, OWN_RANGE, "DISCARD with no segment"),
    discard_with_too_many_segments: (
        T_DISCARD,
        &(0..33).map(|i| range_seg(S0 + 16 * i, 8, 0)).collect::<Vec<_>>(),
        EITHER,
        OWN_RANGE,
        "DISCARD with 33 segments (max 32)",
    ),
    write_zeroes_past_capacity: (
        T_WRITE_ZEROES,
        &[range_seg(CAPACITY - 4, 8, 0)],
        REFUSED,
        OWN_RANGE,
        "WRITE_ZEROES across the end",
    ),
    write_zeroes_at_sector_whose_offset_wraps_to_zero: (
        T_WRITE_ZEROES,
        &[range_seg(1 << 55, 8, WZ_UNMAP)],
        REFUSED,
        NO_RANGE,
        "WRITE_ZEROES at 2^55",
    ),
    write_zeroes_with_unknown_flags: (
        T_WRITE_ZEROES,
        &[range_seg(S0, 8, 0xffff_fffe)],
        EITHER,
        OWN_RANGE,
        "WRITE_ZEROES flags 0xfffffffe",
    ),
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

/// Publish queue 0's avail index moved by `by(queue)` from where it is, with no request
/// behind it: nothing may be answered.
fn avail_index_moved(s: &mut Session, by: fn(&SplitQueue) -> u16) -> Plan {
    let q = &s.queues[0];
    let idx = q.avail_idx.wrapping_add(by(q));
    Plan {
        avail_override: vec![(0, idx)],
        ..Plan::default()
    }
}

cases! {
    build = avail_index_moved;
    avail_index_jumps_past_queue_size: (|q| q.size + 1),
    avail_index_moves_backwards: (|_| 0u16.wrapping_sub(1)),
    avail_index_jumps_by_0x8000: (|_| 0x8000),
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

cases! {
    build = read_into_ring;
    read_into_the_descriptor_table: ("desc"),
    read_into_the_avail_ring: ("avail"),
    read_into_the_used_ring: ("used"),
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
        s.queues[1].write_desc(&s.mem, f, linked(Desc::r(hdr, 16), f));
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
            linked(Desc::r(hdr, 16), f + 1),
            linked(Desc::w(d, 512), f + 2),
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
        let mut p = untranslatable(
            s,
            T_OUT,
            S0,
            Desc::r(d, 4096),
            None,
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
