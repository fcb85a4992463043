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
mod tests;
