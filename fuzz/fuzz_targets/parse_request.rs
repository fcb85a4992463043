//! Descriptor-chain parsing and guest-memory translation.
//!
//! From the input: a guest memory of 1-3 small regions (with gaps, optionally at the very top
//! of the address space) whose contents come from the input, the device limits and negotiated
//! features, a fixed-buffer size small enough that segments get split, and a descriptor chain.
//! The chain goes through `request::parse`; every data segment of the verdict goes through
//! `FixedBufferMap::translate`. Invariants are checked against the chain itself and against
//! vm-memory's own view of guest memory.
//!
//! Input layout (little-endian; reading past the end yields zeroes), see `seeds.py`:
//!   u8  flags: bit0 read_only, bit1 flush, bit2 discard, bit3 write_zeroes,
//!              bit4 place the regions at the top of the address space
//!   u8  region count: 1 + b % 3
//!   per region: u8 gap (pages before it, b % 16), u8 size (pages, 1 + b % 4)
//!   u64 capacity_sectors (at most u64::MAX / 512), u16 seg_max, u32 size_max, u8 max_discard_seg,
//!   u32 max_discard_sectors
//!   u8  fixed-buffer size: 512 * (1 + b % 16)
//!   u8  descriptor count: b % 17
//!   per descriptor: u8 sel (bit7 writable, bit6 raw u64 address else region sel%n + u16
//!       offset, bit5 raw u32 length else u16 length), then the address, then the length
//!   the rest: guest memory contents, region after region from the first byte of region 0.

#![no_main]

use libfuzzer_sys::fuzz_target;
use ringfence::config::SECTOR_SIZE;
use ringfence::guest_map::{FixedBufferMap, Piece, TranslateError};
use ringfence::request::{self, Desc, Limits, Op, Parsed, Segment, ZeroMode, ZeroRange};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const PAGE: u64 = 4096;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
}

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    let mut inp = Input(data);
    let flags = inp.u8();
    let nregions = 1 + usize::from(inp.u8() % 3);
    // (gap, len) in bytes, laid out one after the other.
    let shape: Vec<(u64, u64)> = (0..nregions)
        .map(|_| {
            let gap = u64::from(inp.u8() % 16) * PAGE;
            let len = (1 + u64::from(inp.u8() % 4)) * PAGE;
            (gap, len)
        })
        .collect();
    let span: u64 = shape.iter().map(|(g, l)| g + l).sum();
    let mut at = if flags & 0x10 != 0 {
        // The last region ends one page below 2^64.
        (u64::MAX - span - PAGE + 1) & !(PAGE - 1)
    } else {
        0
    };
    let mut ranges = Vec::new();
    for (gap, len) in &shape {
        at += gap;
        ranges.push((GuestAddress(at), *len as usize));
        at += len;
    }
    let mem: GuestMemoryMmap = match GuestMemoryMmap::from_ranges(&ranges) {
        Ok(m) => m,
        Err(_) => return,
    };

    let limits = Limits {
        // The device derives it from a byte size: at most u64::MAX / 512.
        capacity_sectors: inp.u64().min(u64::MAX / SECTOR_SIZE),
        seg_max: u32::from(inp.u16()),
        size_max: inp.u32(),
        max_discard_seg: u32::from(inp.u8()),
        max_discard_sectors: inp.u32(),
        read_only: flags & 1 != 0,
        flush: flags & 2 != 0,
        discard: flags & 4 != 0,
        write_zeroes: flags & 8 != 0,
    };
    let max_buffer = 512 * (1 + u64::from(inp.u8() % 16));

    let ndesc = inp.u8() % 17;
    let descs: Vec<Desc> = (0..ndesc)
        .map(|_| {
            let sel = inp.u8();
            let addr = if sel & 0x40 != 0 {
                inp.u64()
            } else {
                let (base, _) = ranges[usize::from(sel & 3) % ranges.len()];
                base.0.wrapping_add(u64::from(inp.u16()))
            };
            let len = if sel & 0x20 != 0 {
                inp.u32()
            } else {
                u32::from(inp.u16())
            };
            Desc {
                addr,
                len,
                writable: sel & 0x80 != 0,
            }
        })
        .collect();

    // Guest memory contents.
    let mut rest = inp.0;
    for (base, len) in &ranges {
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(*len);
        mem.write_slice(&rest[..n], *base)
            .expect("write inside a region");
        rest = &rest[n..];
    }

    // Parse twice: once into vectors holding stale junk, once into empty ones. The result must
    // not depend on what the vectors held.
    let junk_seg = Segment { addr: 1, len: 1 };
    let junk_range = ZeroRange {
        offset: 0,
        len: 512,
        mode: ZeroMode::Discard,
    };
    let (mut segs, mut zr) = (vec![junk_seg; 3], vec![junk_range; 2]);
    let req = request::parse(&descs, &mem, &limits, &mut segs, &mut zr);
    let (mut segs2, mut zr2) = (Vec::new(), Vec::new());
    let req2 = request::parse(&descs, &mem, &limits, &mut segs2, &mut zr2);
    assert_eq!(req, req2);
    assert_eq!(segs, segs2);
    assert_eq!(zr, zr2);

    check_status(&descs, req.status);
    check_verdict(&descs, &limits, req.parsed, &segs, &zr);

    // Translate every data segment with fixed buffers over the same regions.
    let regions: Vec<(u64, u64, u64)> = mem
        .iter()
        .map(|r| {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("host address of a region");
            (r.start_addr().0, r.len(), host as u64)
        })
        .collect();
    let map = FixedBufferMap::from_regions(regions, max_buffer).expect("a valid layout");
    assert_eq!(map.total_len(), mem.iter().map(|r| r.len()).sum::<u64>());
    for b in map.buffers() {
        assert!(b.len > 0 && b.len <= max_buffer, "{b:?}");
    }
    for s in &segs {
        check_translation(&map, &mem, s.addr, s.len);
    }
    // And the raw descriptors, whatever the verdict: translation must hold for any range.
    for d in &descs {
        check_translation(&map, &mem, d.addr, d.len);
    }
}

/// The status byte is the last byte of the last writable descriptor with bytes in it.
fn check_status(descs: &[Desc], status: Option<u64>) {
    let expected = descs
        .iter()
        .rev()
        .find(|d| d.writable && d.len > 0)
        .and_then(|d| d.addr.checked_add(u64::from(d.len) - 1));
    assert_eq!(status, expected);
}

/// Whether `s` lies inside one descriptor of the given direction (addresses may wrap, as the
/// parser computes them with wrapping arithmetic).
fn inside_a_descriptor(descs: &[Desc], s: &Segment, writable: bool) -> bool {
    descs.iter().any(|d| {
        d.writable == writable && {
            let off = s.addr.wrapping_sub(d.addr);
            off.checked_add(u64::from(s.len))
                .is_some_and(|end| end <= u64::from(d.len))
        }
    })
}

fn check_verdict(descs: &[Desc], l: &Limits, parsed: Parsed, segs: &[Segment], zr: &[ZeroRange]) {
    let r_total: u64 = descs
        .iter()
        .filter(|d| !d.writable)
        .map(|d| u64::from(d.len))
        .sum();
    let w_total: u64 = descs
        .iter()
        .filter(|d| d.writable)
        .map(|d| u64::from(d.len))
        .sum();
    let seg_total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    assert!(segs.iter().all(|s| s.len > 0), "empty segment in {segs:?}");
    let cap_bytes = u128::from(l.capacity_sectors) * u128::from(SECTOR_SIZE);
    match parsed {
        Parsed::Fail(status, _) => {
            assert!(status == 1 || status == 2, "status {status}");
            assert!(segs.is_empty() && zr.is_empty());
        }
        Parsed::Op(op) => {
            // A successful parse needs a readable 16-byte header before any writable byte.
            assert!(r_total >= 16);
            let first_w = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
            assert!(descs[first_w..].iter().all(|d| d.writable));
            match op {
                Op::Read { offset, len } | Op::Write { offset, len } => {
                    let write = matches!(op, Op::Write { .. });
                    assert!(!(write && l.read_only));
                    assert_eq!(seg_total, len, "{op:?} {segs:?}");
                    assert_eq!(len % SECTOR_SIZE, 0);
                    assert_eq!(offset % SECTOR_SIZE, 0);
                    assert!(u128::from(offset) + u128::from(len) <= cap_bytes);
                    assert!(segs.len() <= l.seg_max as usize);
                    assert!(segs.iter().all(|s| s.len <= l.size_max));
                    if write {
                        assert_eq!(len, r_total - 16);
                    } else {
                        assert_eq!(r_total, 16);
                        assert_eq!(len, w_total.saturating_sub(1));
                    }
                    // Data of a read goes to device-writable memory, of a write comes from
                    // device-readable memory.
                    assert!(
                        segs.iter().all(|s| inside_a_descriptor(descs, s, !write)),
                        "{op:?} {segs:?} {descs:?}"
                    );
                    assert!(zr.is_empty());
                }
                Op::Flush => {
                    assert!(l.flush && !l.read_only);
                    assert!(segs.is_empty() && zr.is_empty());
                }
                // A FLUSH on a read-only disk: nothing was written, nothing to do.
                Op::Nop => {
                    assert!(l.read_only);
                    assert!(segs.is_empty() && zr.is_empty());
                }
                Op::GetId => {
                    assert!(seg_total > 0 && seg_total <= 20);
                    assert_eq!(seg_total, w_total.saturating_sub(1).min(20));
                    assert!(segs.iter().all(|s| inside_a_descriptor(descs, s, true)));
                    assert!(zr.is_empty());
                }
                Op::Zero => {
                    assert!(!l.read_only);
                    assert!(segs.is_empty());
                    assert!(!zr.is_empty() && zr.len() <= l.max_discard_seg as usize);
                    assert_eq!((r_total - 16) % 16, 0);
                    assert_eq!(zr.len() as u64, (r_total - 16) / 16);
                    for r in zr {
                        assert_eq!(r.offset % SECTOR_SIZE, 0);
                        assert_eq!(r.len % SECTOR_SIZE, 0);
                        assert!(r.len <= u64::from(l.max_discard_sectors) * SECTOR_SIZE);
                        assert!(u128::from(r.offset) + u128::from(r.len) <= cap_bytes);
                        match r.mode {
                            ZeroMode::Discard => assert!(l.discard),
                            ZeroMode::Unmap | ZeroMode::InPlace => assert!(l.write_zeroes),
                        }
                    }
                    // One request is all discard or all write-zeroes.
                    let discard = zr[0].mode == ZeroMode::Discard;
                    assert!(zr.iter().all(|r| (r.mode == ZeroMode::Discard) == discard));
                }
            }
        }
    }
}

/// Translate `[gpa, gpa+len)` and check the pieces against vm-memory's view of the same memory.
fn check_translation(map: &FixedBufferMap, mem: &GuestMemoryMmap, gpa: u64, len: u32) {
    let mut pieces: Vec<Piece> = Vec::new();
    let res = map.translate(gpa, len, |p| pieces.push(p));
    match res {
        Ok(()) => {
            assert_eq!(map.piece_count(gpa, len), Ok(pieces.len()));
            let mut cur = gpa;
            for p in &pieces {
                assert!(p.len > 0);
                let b = map.buffers()[usize::from(p.buf_index)];
                // Inside its buffer.
                assert!(p.host >= b.host && p.host + u64::from(p.len) <= b.host + b.len);
                // Contiguous in guest addresses, and where vm-memory maps them.
                assert_eq!(b.gpa + (p.host - b.host), cur);
                let first = mem.get_host_address(GuestAddress(cur)).expect("mapped");
                assert_eq!(first as u64, p.host);
                let last_gpa = cur + u64::from(p.len) - 1;
                let last = mem
                    .get_host_address(GuestAddress(last_gpa))
                    .expect("mapped");
                assert_eq!(last as u64, p.host + u64::from(p.len) - 1);
                cur += u64::from(p.len);
            }
            assert_eq!(cur - gpa, u64::from(len), "pieces cover the range exactly");
            assert!(mem.check_range(GuestAddress(gpa), len as usize));
        }
        Err(TranslateError::Overflow { .. }) => {
            assert!(pieces.is_empty());
            assert!(gpa.checked_add(u64::from(len)).is_none());
        }
        Err(TranslateError::NotMapped(a)) => {
            assert!(pieces.is_empty(), "a failed translation emitted pieces");
            assert!(a >= gpa && a < gpa + u64::from(len));
            assert!(
                mem.find_region(GuestAddress(a)).is_none(),
                "{a:#x} is mapped"
            );
            assert!(mem.check_range(GuestAddress(gpa), (a - gpa) as usize));
            assert_eq!(map.piece_count(gpa, len), Err(TranslateError::NotMapped(a)));
        }
    }
}
