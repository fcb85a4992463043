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

fn run(descs: &[Desc], m: &GuestMemoryMmap, l: &Limits) -> (Request, Vec<Segment>, Vec<ZeroRange>) {
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
