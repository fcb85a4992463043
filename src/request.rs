//! virtio-blk request parsing: a pure function of a descriptor chain, guest memory (read
//! only: the 16-byte header and discard segments) and the device's limits. No I/O happens
//! here and nothing is written; the worker executes what this returns.
//!
//! Framing follows virtio 1.2 §5.2.6 without assuming the driver's message framing: the
//! device-readable bytes of the chain form one stream (header, then OUT data or discard
//! segments), the device-writable bytes another (IN data or GET_ID answer, then the status
//! byte, always the very last writable byte).

use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::config::{SECTOR_SIZE, SERIAL_LEN};

/// One descriptor of a chain, as the parser sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub writable: bool,
}

/// A guest-memory data segment of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub len: u32,
}

/// What to do with a range of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZeroMode {
    /// DISCARD: deallocate if the host can; a hint, contents afterwards unspecified.
    Discard,
    /// WRITE_ZEROES with UNMAP: must read back as zeroes; may deallocate.
    Unmap,
    /// WRITE_ZEROES without UNMAP: must read back as zeroes; stays allocated.
    InPlace,
}

/// One range of a discard or write-zeroes request, in bytes of the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZeroRange {
    pub offset: u64,
    pub len: u64,
    pub mode: ZeroMode,
}

/// What the device enforces: the same numbers the config space announces, and the
/// negotiated features.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub capacity_sectors: u64,
    pub seg_max: u32,
    pub size_max: u32,
    pub max_discard_seg: u32,
    pub max_discard_sectors: u32,
    pub read_only: bool,
    pub flush: bool,
    pub discard: bool,
    pub write_zeroes: bool,
}

/// A request that passed every check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes at image offset `offset` into the segments.
    Read {
        offset: u64,
        len: u64,
    },
    /// Write the segments' `len` bytes at image offset `offset`.
    Write {
        offset: u64,
        len: u64,
    },
    Flush,
    /// Nothing to do: answer OK (a FLUSH on a read-only disk, where nothing was written).
    Nop,
    /// Copy the serial into the segments (at most 20 bytes).
    GetId,
    /// Deallocate or zero the ranges.
    Zero,
}

/// The parser's verdict on one chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Execute `op`; data segments / ranges are in the caller's vectors.
    Op(Op),
    /// Answer at once with this status (`VIRTIO_BLK_S_*`).
    Fail(u8, Reason),
}

/// Why a request was refused (for logs and tests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    ShortHeader,
    Unreadable,
    ReadableAfterWritable,
    ReadableData,
    NoData,
    Unaligned,
    TooManySegments,
    SegmentTooLarge,
    OutOfRange,
    ReadOnly,
    NotNegotiated,
    UnknownType(u32),
    BadFlags,
    BadDiscardPayload,
}

/// A parsed chain: where the status byte goes, and the verdict.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Guest address of the status byte; `None` when the chain has no writable byte.
    pub status: Option<u64>,
    pub parsed: Parsed,
}

const HEADER_LEN: u64 = 16;
const DISCARD_SEG_LEN: u64 = 16;

/// Parse one chain. `segs` receives the data segments (Read, Write, GetId), `ranges` the
/// ranges (Zero); both are cleared first, so callers can reuse them without allocating.
pub fn parse<M: GuestMemory>(
    descs: &[Desc],
    mem: &M,
    limits: &Limits,
    segs: &mut Vec<Segment>,
    ranges: &mut Vec<ZeroRange>,
) -> Request {
    segs.clear();
    ranges.clear();
    let status = status_addr(descs);
    let parsed = parse_body(descs, mem, limits, segs, ranges).unwrap_or_else(|(s, r)| {
        segs.clear();
        ranges.clear();
        Parsed::Fail(s, r)
    });
    Request { status, parsed }
}

fn status_addr(descs: &[Desc]) -> Option<u64> {
    let last = descs.iter().rev().find(|d| d.writable && d.len > 0)?;
    last.addr.checked_add(u64::from(last.len) - 1)
}

type Failure = (u8, Reason);
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

fn parse_body<M: GuestMemory>(
    descs: &[Desc],
    mem: &M,
    limits: &Limits,
    segs: &mut Vec<Segment>,
    ranges: &mut Vec<ZeroRange>,
) -> Result<Parsed, Failure> {
    // All readable descriptors come first (virtio 1.2 §2.7.4.2).
    let split = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
    let (readable, writable) = descs.split_at(split);
    if writable.iter().any(|d| !d.writable) {
        return Err((IOERR, Reason::ReadableAfterWritable));
    }
    let r_total: u64 = readable.iter().map(|d| u64::from(d.len)).sum();
    let w_total: u64 = writable.iter().map(|d| u64::from(d.len)).sum();

    if r_total < HEADER_LEN {
        return Err((IOERR, Reason::ShortHeader));
    }
    let mut hdr = [0u8; HEADER_LEN as usize];
    gather(readable, 0, &mut hdr, mem)?;
    let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
    let sector = u64::from_le_bytes([
        hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
    ]);
    // The writable bytes before the status byte.
    let w_data = w_total.saturating_sub(1);

    match req_type {
        VIRTIO_BLK_T_IN => {
            if r_total != HEADER_LEN {
                return Err((IOERR, Reason::ReadableData));
            }
            let len = extract(writable, 0, w_data, segs);
            let offset = check_rw(sector, len, segs, limits)?;
            Ok(Parsed::Op(Op::Read { offset, len }))
        }
        VIRTIO_BLK_T_OUT => {
            if limits.read_only {
                return Err((IOERR, Reason::ReadOnly));
            }
            let len = extract(readable, HEADER_LEN, r_total - HEADER_LEN, segs);
            let offset = check_rw(sector, len, segs, limits)?;
            Ok(Parsed::Op(Op::Write { offset, len }))
        }
        VIRTIO_BLK_T_FLUSH => {
            if limits.read_only {
                return Ok(Parsed::Op(Op::Nop));
            }
            if !limits.flush {
                return Err((UNSUPP, Reason::NotNegotiated));
            }
            Ok(Parsed::Op(Op::Flush))
        }
        VIRTIO_BLK_T_GET_ID => {
            if w_data == 0 {
                return Err((IOERR, Reason::NoData));
            }
            extract(writable, 0, w_data.min(SERIAL_LEN as u64), segs);
            Ok(Parsed::Op(Op::GetId))
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = req_type == VIRTIO_BLK_T_DISCARD;
            if limits.read_only {
                return Err((IOERR, Reason::ReadOnly));
            }
            if (discard && !limits.discard) || (!discard && !limits.write_zeroes) {
                return Err((UNSUPP, Reason::NotNegotiated));
            }
            let payload = r_total - HEADER_LEN;
            if payload == 0 || !payload.is_multiple_of(DISCARD_SEG_LEN) {
                return Err((IOERR, Reason::BadDiscardPayload));
            }
            let n = payload / DISCARD_SEG_LEN;
            if n > u64::from(limits.max_discard_seg) {
                return Err((IOERR, Reason::TooManySegments));
            }
            for i in 0..n {
                let mut raw = [0u8; DISCARD_SEG_LEN as usize];
                gather(readable, HEADER_LEN + i * DISCARD_SEG_LEN, &mut raw, mem)?;
                ranges.push(check_zero_segment(&raw, discard, limits)?);
            }
            Ok(Parsed::Op(Op::Zero))
        }
        t => Err((UNSUPP, Reason::UnknownType(t))),
    }
}

/// Check a read or write: whole sectors, within the segment limits and the capacity.
/// Returns the byte offset in the image.
fn check_rw(sector: u64, len: u64, segs: &[Segment], limits: &Limits) -> Result<u64, Failure> {
    if !len.is_multiple_of(SECTOR_SIZE) {
        return Err((IOERR, Reason::Unaligned));
    }
    if segs.len() > limits.seg_max as usize {
        return Err((IOERR, Reason::TooManySegments));
    }
    if segs.iter().any(|s| s.len > limits.size_max) {
        return Err((IOERR, Reason::SegmentTooLarge));
    }
    let end_sector = sector.checked_add(len / SECTOR_SIZE);
    match end_sector {
        Some(e) if e <= limits.capacity_sectors => sector
            .checked_mul(SECTOR_SIZE)
            .ok_or((IOERR, Reason::OutOfRange)),
        _ => Err((IOERR, Reason::OutOfRange)),
    }
}

fn check_zero_segment(
    raw: &[u8; 16],
    discard: bool,
    limits: &Limits,
) -> Result<ZeroRange, Failure> {
    let sector = u64::from_le_bytes([
        raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
    ]);
    let num = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    // Unknown flags, or UNMAP on a discard, are unsupported (virtio 1.2 §5.2.6.2).
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (discard && unmap) {
        return Err((UNSUPP, Reason::BadFlags));
    }
    if num > limits.max_discard_sectors {
        return Err((IOERR, Reason::SegmentTooLarge));
    }
    match sector.checked_add(u64::from(num)) {
        Some(e) if e <= limits.capacity_sectors && sector.checked_mul(SECTOR_SIZE).is_some() => {
            Ok(ZeroRange {
                offset: sector * SECTOR_SIZE,
                len: u64::from(num) * SECTOR_SIZE,
                mode: if discard {
                    ZeroMode::Discard
                } else if unmap {
                    ZeroMode::Unmap
                } else {
                    ZeroMode::InPlace
                },
            })
        }
        _ => Err((IOERR, Reason::OutOfRange)),
    }
}

/// Append the segments covering bytes `[start, start+len)` of the stream formed by `descs`;
/// returns the number of bytes covered (less than `len` if the stream is shorter).
fn extract(descs: &[Desc], start: u64, len: u64, segs: &mut Vec<Segment>) -> u64 {
    let end = start.saturating_add(len);
    let mut pos = 0u64;
    let mut covered = 0;
    for d in descs {
        let d_end = pos + u64::from(d.len);
        let lo = pos.max(start);
        let hi = d_end.min(end);
        if lo < hi {
            // Addresses may be garbage; translation checks them. Wrapping keeps this pure.
            segs.push(Segment {
                addr: d.addr.wrapping_add(lo - pos),
                // hi - lo <= d.len, a u32.
                len: (hi - lo) as u32,
            });
            covered += hi - lo;
        }
        pos = d_end;
        if pos >= end {
            break;
        }
    }
    covered
}

/// Read `buf.len()` bytes at offset `start` of the stream formed by `descs`.
fn gather<M: GuestMemory>(
    descs: &[Desc],
    start: u64,
    buf: &mut [u8],
    mem: &M,
) -> Result<(), Failure> {
    let mut pieces = Vec::with_capacity(2);
    let got = extract(descs, start, buf.len() as u64, &mut pieces);
    if got != buf.len() as u64 {
        return Err((IOERR, Reason::ShortHeader));
    }
    let mut off = 0;
    for p in pieces {
        let n = p.len as usize;
        mem.read_slice(&mut buf[off..off + n], GuestAddress(p.addr))
            .map_err(|_| (IOERR, Reason::Unreadable))?;
        off += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 0x10000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn limits() -> Limits {
        Limits {
            capacity_sectors: 1000,
            seg_max: 4,
            size_max: 4096,
            max_discard_seg: 2,
            max_discard_sectors: 100,
            read_only: false,
            flush: true,
            discard: true,
            write_zeroes: true,
        }
    }

    fn header(m: &GuestMemoryMmap, at: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&t.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: false,
        }
    }
    fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            writable: true,
        }
    }

    fn run(
        descs: &[Desc],
        m: &GuestMemoryMmap,
        l: &Limits,
    ) -> (Request, Vec<Segment>, Vec<ZeroRange>) {
        let (mut s, mut z) = (Vec::new(), Vec::new());
        let req = parse(descs, m, l, &mut s, &mut z);
        (req, s, z)
    }

    fn fail(req: &Request) -> Option<(u8, Reason)> {
        match req.parsed {
            Parsed::Fail(s, r) => Some((s, r)),
            _ => None,
        }
    }

    #[test]
    fn linux_style_read() {
        let m = mem();
        header(&m, 0, VIRTIO_BLK_T_IN, 8);
        let (req, segs, _) = run(&[r(0, 16), w(0x1000, 4096), w(0x3000, 1)], &m, &limits());
        assert_eq!(req.status, Some(0x3000));
        assert_eq!(
            req.parsed,
            Parsed::Op(Op::Read {
                offset: 4096,
                len: 4096
            })
        );
        assert_eq!(
            segs,
            vec![Segment {
                addr: 0x1000,
                len: 4096
            }]
        );
    }

    #[test]
    fn write_with_header_data_and_status_in_odd_framing() {
        let m = mem();
        // Header split 10+6, the second descriptor also holding the first data bytes;
        // status byte glued to the end of a writable descriptor.
        header(&m, 0x100, VIRTIO_BLK_T_OUT, 2);
        let hdr: [u8; 16] = m.read_obj(GuestAddress(0x100)).unwrap();
        m.write_slice(&hdr[..10], GuestAddress(0x200)).unwrap();
        m.write_slice(&hdr[10..], GuestAddress(0x300)).unwrap();
        let (req, segs, _) = run(
            &[r(0x200, 10), r(0x300, 6 + 500), r(0x2000, 12), w(0x5000, 8)],
            &m,
            &limits(),
        );
        assert_eq!(req.status, Some(0x5007));
        assert_eq!(
            req.parsed,
            Parsed::Op(Op::Write {
                offset: 1024,
                len: 512
            })
        );
        assert_eq!(
            segs,
            vec![
                Segment {
                    addr: 0x306,
                    len: 500
                },
                Segment {
                    addr: 0x2000,
                    len: 12
                }
            ]
        );
    }

    #[test]
    fn malformed_shapes_fail_without_segments() {
        let m = mem();
        let l = limits();
        header(&m, 0, VIRTIO_BLK_T_IN, 0);
        // Header shorter than 16 bytes.
        let (req, s, _) = run(&[r(0, 8), w(0x1000, 513)], &m, &l);
        assert_eq!(fail(&req), Some((IOERR, Reason::ShortHeader)));
        assert!(s.is_empty());
        // Header outside guest memory.
        let (req, _, _) = run(&[r(MEM - 8, 16), w(0x1000, 513)], &m, &l);
        assert_eq!(fail(&req), Some((IOERR, Reason::Unreadable)));
        // Readable after writable.
        let (req, _, _) = run(&[r(0, 16), w(0x1000, 512), r(0x2000, 1)], &m, &l);
        assert_eq!(fail(&req), Some((IOERR, Reason::ReadableAfterWritable)));
        // IN whose data buffer is device-readable.
        let (req, _, _) = run(&[r(0, 16), r(0x1000, 512), w(0x2000, 1)], &m, &l);
        assert_eq!(fail(&req), Some((IOERR, Reason::ReadableData)));
        // Data not a whole number of sectors.
        let (req, _, _) = run(&[r(0, 16), w(0x1000, 100), w(0x2000, 1)], &m, &l);
        assert_eq!(fail(&req), Some((IOERR, Reason::Unaligned)));
        // Too many segments, a segment over size_max.
        let many: Vec<Desc> = std::iter::once(r(0, 16))
            .chain((0..5).map(|i| w(0x1000 + i * 512, 512)))
            .chain(std::iter::once(w(0x8000, 1)))
            .collect();
        assert_eq!(
            fail(&run(&many, &m, &l).0),
            Some((IOERR, Reason::TooManySegments))
        );
        let (req, _, _) = run(&[r(0, 16), w(0x1000, 8192), w(0x4000, 1)], &m, &l);
        assert_eq!(fail(&req), Some((IOERR, Reason::SegmentTooLarge)));
    }

    #[test]
    fn no_writable_byte_means_no_status() {
        let m = mem();
        header(&m, 0, VIRTIO_BLK_T_IN, 0);
        let (req, _, _) = run(&[r(0, 16), r(0x1000, 1)], &m, &limits());
        assert_eq!(req.status, None);
        let (req, _, _) = run(&[], &m, &limits());
        assert_eq!(req.status, None);
        assert_eq!(fail(&req), Some((IOERR, Reason::ShortHeader)));
        // A status descriptor whose address would wrap.
        let (req, _, _) = run(&[r(0, 16), w(u64::MAX, 2)], &m, &limits());
        assert_eq!(req.status, None);
    }

    #[test]
    fn sectors_past_capacity_or_overflowing_are_refused() {
        let m = mem();
        let l = limits();
        for sector in [999, 1000, u64::MAX, u64::MAX / 512 + 1, u64::MAX - 1] {
            header(&m, 0, VIRTIO_BLK_T_IN, sector);
            let (req, _, _) = run(&[r(0, 16), w(0x1000, 1024), w(0x2000, 1)], &m, &l);
            assert_eq!(
                fail(&req),
                Some((IOERR, Reason::OutOfRange)),
                "sector {sector}"
            );
        }
        header(&m, 0, VIRTIO_BLK_T_IN, 998);
        let (req, _, _) = run(&[r(0, 16), w(0x1000, 1024), w(0x2000, 1)], &m, &l);
        assert!(matches!(req.parsed, Parsed::Op(Op::Read { .. })));
    }

    #[test]
    fn read_only_refuses_writes_and_zeroing() {
        let m = mem();
        let l = Limits {
            read_only: true,
            ..limits()
        };
        header(&m, 0, VIRTIO_BLK_T_OUT, 0);
        let (req, _, _) = run(&[r(0, 16), r(0x1000, 512), w(0x2000, 1)], &m, &l);
        assert_eq!(fail(&req), Some((IOERR, Reason::ReadOnly)));
    }

    #[test]
    fn unknown_and_unnegotiated_types_are_unsupported() {
        let m = mem();
        header(&m, 0, 0x1234, 0);
        let (req, _, _) = run(&[r(0, 16), w(0x2000, 1)], &m, &limits());
        assert_eq!(fail(&req), Some((UNSUPP, Reason::UnknownType(0x1234))));
        header(&m, 0, VIRTIO_BLK_T_FLUSH, 0);
        let l = Limits {
            flush: false,
            ..limits()
        };
        assert_eq!(
            fail(&run(&[r(0, 16), w(0x2000, 1)], &m, &l).0),
            Some((UNSUPP, Reason::NotNegotiated))
        );
        let (req, _, _) = run(&[r(0, 16), w(0x2000, 1)], &m, &limits());
        assert_eq!(req.parsed, Parsed::Op(Op::Flush));
    }

    #[test]
    fn get_id_fills_at_most_twenty_bytes() {
        let m = mem();
        header(&m, 0, VIRTIO_BLK_T_GET_ID, 0);
        let (req, segs, _) = run(&[r(0, 16), w(0x1000, 64), w(0x2000, 1)], &m, &limits());
        assert_eq!(req.parsed, Parsed::Op(Op::GetId));
        assert_eq!(
            segs,
            vec![Segment {
                addr: 0x1000,
                len: 20
            }]
        );
        // Short buffer: what fits.
        let (_, segs, _) = run(&[r(0, 16), w(0x1000, 5)], &m, &limits());
        assert_eq!(
            segs,
            vec![Segment {
                addr: 0x1000,
                len: 4
            }]
        );
        let (req, _, _) = run(&[r(0, 16), w(0x1000, 1)], &m, &limits());
        assert_eq!(fail(&req), Some((IOERR, Reason::NoData)));
    }

    fn zero_seg(m: &GuestMemoryMmap, at: u64, sector: u64, num: u32, flags: u32) {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&s, GuestAddress(at)).unwrap();
    }

    #[test]
    fn discard_and_write_zeroes() {
        let m = mem();
        let l = limits();
        header(&m, 0, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        zero_seg(&m, 16, 10, 20, 0);
        zero_seg(&m, 32, 100, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let (req, _, z) = run(&[r(0, 48), w(0x2000, 1)], &m, &l);
        assert_eq!(req.parsed, Parsed::Op(Op::Zero));
        assert_eq!(
            z,
            vec![
                ZeroRange {
                    offset: 5120,
                    len: 10240,
                    mode: ZeroMode::InPlace
                },
                ZeroRange {
                    offset: 51200,
                    len: 512,
                    mode: ZeroMode::Unmap
                },
            ]
        );
        // Discard with UNMAP, unknown flags: unsupported.
        header(&m, 0, VIRTIO_BLK_T_DISCARD, 0);
        let (req, _, z) = run(&[r(0, 48), w(0x2000, 1)], &m, &l);
        assert_eq!(fail(&req), Some((UNSUPP, Reason::BadFlags)));
        assert!(z.is_empty());
        zero_seg(&m, 32, 100, 1, 0);
        let (req, _, z) = run(&[r(0, 48), w(0x2000, 1)], &m, &l);
        assert_eq!(req.parsed, Parsed::Op(Op::Zero));
        assert!(z.iter().all(|r| r.mode == ZeroMode::Discard));
        zero_seg(&m, 16, 10, 20, 4);
        assert_eq!(
            fail(&run(&[r(0, 48), w(0x2000, 1)], &m, &l).0),
            Some((UNSUPP, Reason::BadFlags))
        );
        // Out of range, too long, too many, ragged payload.
        zero_seg(&m, 16, 990, 20, 0);
        assert_eq!(
            fail(&run(&[r(0, 32), w(0x2000, 1)], &m, &l).0),
            Some((IOERR, Reason::OutOfRange))
        );
        zero_seg(&m, 16, u64::MAX - 5, 20, 0);
        assert_eq!(
            fail(&run(&[r(0, 32), w(0x2000, 1)], &m, &l).0),
            Some((IOERR, Reason::OutOfRange))
        );
        zero_seg(&m, 16, 0, 101, 0);
        assert_eq!(
            fail(&run(&[r(0, 32), w(0x2000, 1)], &m, &l).0),
            Some((IOERR, Reason::SegmentTooLarge))
        );
        assert_eq!(
            fail(&run(&[r(0, 64), w(0x2000, 1)], &m, &l).0),
            Some((IOERR, Reason::TooManySegments))
        );
        assert_eq!(
            fail(&run(&[r(0, 40), w(0x2000, 1)], &m, &l).0),
            Some((IOERR, Reason::BadDiscardPayload))
        );
        assert_eq!(
            fail(&run(&[r(0, 16), w(0x2000, 1)], &m, &l).0),
            Some((IOERR, Reason::BadDiscardPayload))
        );
        let nl = Limits {
            discard: false,
            ..l
        };
        assert_eq!(
            fail(&run(&[r(0, 32), w(0x2000, 1)], &m, &nl).0),
            Some((UNSUPP, Reason::NotNegotiated))
        );
    }

    #[test]
    fn huge_and_wrapping_descriptors_stay_pure() {
        let m = mem();
        header(&m, 0, VIRTIO_BLK_T_IN, 0);
        // Lengths of 4 GiB - 1 and addresses near u64::MAX produce segments (rejected later by
        // translation or here by the limits), never a panic.
        let (req, _, _) = run(
            &[r(0, 16), w(u64::MAX - 10, u32::MAX), w(0x2000, 1)],
            &m,
            &limits(),
        );
        assert_eq!(fail(&req), Some((IOERR, Reason::Unaligned)));
        let (req, _, _) = run(
            &[r(0, 16), w(u64::MAX - 10, 4096), w(0x2000, 1)],
            &m,
            &limits(),
        );
        assert!(matches!(req.parsed, Parsed::Op(Op::Read { .. })));
    }
}
