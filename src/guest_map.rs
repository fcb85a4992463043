//! Guest-memory translation: guest physical ranges to io_uring fixed buffers.
//!
//! Every guest RAM region the VMM shares is registered with each ring as one or more fixed
//! buffers of at most 1 GiB (the kernel's limit). A data segment of a request is translated to
//! pieces `(buffer index, host address, length)` here, bounds-checked, *before* any SQE exists;
//! a segment that crosses a buffer boundary becomes several pieces. The kernel's own check of
//! fixed-buffer ranges is the second wall, not the first.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::error::RingError;

/// Largest fixed buffer the kernel accepts.
pub const MAX_FIXED_BUFFER: u64 = 1 << 30;
/// Most fixed buffers one ring may register (the kernel's IORING_MAX_REG_BUFFERS).
pub const MAX_FIXED_BUFFERS: usize = 1 << 14;

/// One registered fixed buffer: a slice of one guest RAM region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedBuffer {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    pub len: u64,
    /// Address of the first byte in this process.
    pub host: u64,
}

/// A translated piece of a guest range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub buf_index: u16,
    pub host: u64,
    pub len: u32,
}

/// Why a guest range cannot be used for I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TranslateError {
    #[error("guest range {gpa:#x}+{len:#x} overflows")]
    Overflow { gpa: u64, len: u64 },
    #[error("guest address {0:#x} is not in guest RAM")]
    NotMapped(u64),
}

/// The fixed buffers of one memory layout, sorted by guest address, non-overlapping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FixedBufferMap {
    buffers: Vec<FixedBuffer>,
}

impl FixedBufferMap {
    /// Split guest regions `(gpa, len, host)` into fixed buffers of at most `max_buffer`
    /// bytes. Regions must not overlap (vm-memory guarantees it for a `GuestMemoryMmap`).
    pub fn from_regions(
        regions: impl IntoIterator<Item = (u64, u64, u64)>,
        max_buffer: u64,
    ) -> Result<Self, RingError> {
        if max_buffer == 0 {
            return Err(RingError::Layout(
                "fixed buffer size must not be zero".into(),
            ));
        }
        let mut buffers = Vec::new();
        for (gpa, len, host) in regions {
            gpa.checked_add(len)
                .and_then(|_| host.checked_add(len))
                .ok_or_else(|| RingError::Layout(format!("region {gpa:#x}+{len:#x} overflows")))?;
            let needed = len.div_ceil(max_buffer);
            if buffers.len() as u64 + needed > MAX_FIXED_BUFFERS as u64 {
                return Err(RingError::Layout(format!(
                    "guest RAM needs more than the {MAX_FIXED_BUFFERS} fixed buffers the kernel allows"
                )));
            }
            let mut off = 0;
            while off < len {
                let n = (len - off).min(max_buffer);
                buffers.push(FixedBuffer {
                    gpa: gpa + off,
                    len: n,
                    host: host + off,
                });
                off += n;
            }
        }
        buffers.sort_by_key(|b| b.gpa);
        if buffers.windows(2).any(|w| w[0].gpa + w[0].len > w[1].gpa) {
            return Err(RingError::Layout("guest RAM regions overlap".into()));
        }
        if buffers.len() > MAX_FIXED_BUFFERS {
            return Err(RingError::Layout(format!(
                "guest RAM needs {} fixed buffers; the kernel allows {MAX_FIXED_BUFFERS}",
                buffers.len()
            )));
        }
        Ok(FixedBufferMap { buffers })
    }

    /// The fixed buffers of a vm-memory guest memory object.
    pub fn from_guest_memory<M: GuestMemoryBackend>(mem: &M) -> Result<Self, RingError> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let host = r
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| RingError::Layout(format!("region without host mapping: {e}")))?;
            regions.push((r.start_addr().0, r.len(), host as u64));
        }
        Self::from_regions(regions, MAX_FIXED_BUFFER)
    }

    pub fn buffers(&self) -> &[FixedBuffer] {
        &self.buffers
    }

    /// Total bytes covered.
    pub fn total_len(&self) -> u64 {
        self.buffers.iter().map(|b| b.len).sum()
    }

    /// Translate `[gpa, gpa+len)` into pieces, each inside one fixed buffer, and pass them to
    /// `out` in order. Fails, without calling `out` at all, unless every byte is covered.
    pub fn translate(
        &self,
        gpa: u64,
        len: u32,
        mut out: impl FnMut(Piece),
    ) -> Result<(), TranslateError> {
        self.walk(gpa, len, |_| {})?;
        self.walk(gpa, len, &mut out)
    }

    /// Number of pieces `[gpa, gpa+len)` translates to.
    pub fn piece_count(&self, gpa: u64, len: u32) -> Result<usize, TranslateError> {
        let mut n = 0;
        self.walk(gpa, len, |_| n += 1)?;
        Ok(n)
    }

    fn walk(&self, gpa: u64, len: u32, mut out: impl FnMut(Piece)) -> Result<(), TranslateError> {
        let len64 = u64::from(len);
        let end = gpa
            .checked_add(len64)
            .ok_or(TranslateError::Overflow { gpa, len: len64 })?;
        let mut cur = gpa;
        // First buffer whose end lies beyond `cur`.
        let mut i = self.buffers.partition_point(|b| b.gpa + b.len <= cur);
        while cur < end {
            let b = self
                .buffers
                .get(i)
                .filter(|b| b.gpa <= cur)
                .ok_or(TranslateError::NotMapped(cur))?;
            let n = (b.gpa + b.len).min(end) - cur;
            out(Piece {
                // from_regions caps the count at MAX_FIXED_BUFFERS, which fits in u16.
                buf_index: i as u16,
                host: b.host + (cur - b.gpa),
                // n <= len, which is a u32.
                len: n as u32,
            });
            cur += n;
            i += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map() -> FixedBufferMap {
        // Two regions with a gap: [0, 3 KiB) and [8 KiB, 16 KiB), buffers of at most 2 KiB.
        FixedBufferMap::from_regions([(8192, 8192, 0x10_0000), (0, 3072, 0x20_0000)], 2048).unwrap()
    }

    fn pieces(m: &FixedBufferMap, gpa: u64, len: u32) -> Result<Vec<Piece>, TranslateError> {
        let mut v = Vec::new();
        m.translate(gpa, len, |p| v.push(p)).map(|_| v)
    }

    #[test]
    fn regions_are_split_and_sorted() {
        let m = map();
        let b = m.buffers();
        assert_eq!(b.len(), 6);
        assert_eq!(
            b[0],
            FixedBuffer {
                gpa: 0,
                len: 2048,
                host: 0x20_0000
            }
        );
        assert_eq!(
            b[1],
            FixedBuffer {
                gpa: 2048,
                len: 1024,
                host: 0x20_0800
            }
        );
        assert_eq!(b[2].gpa, 8192);
        assert_eq!(m.total_len(), 3072 + 8192);
    }

    #[test]
    fn range_inside_one_buffer_is_one_piece() {
        let p = pieces(&map(), 100, 200).unwrap();
        assert_eq!(
            p,
            vec![Piece {
                buf_index: 0,
                host: 0x20_0000 + 100,
                len: 200
            }]
        );
    }

    #[test]
    fn range_crossing_buffers_is_split() {
        let p = pieces(&map(), 2000, 100).unwrap();
        assert_eq!(
            p,
            vec![
                Piece {
                    buf_index: 0,
                    host: 0x20_0000 + 2000,
                    len: 48
                },
                Piece {
                    buf_index: 1,
                    host: 0x20_0800,
                    len: 52
                },
            ]
        );
        let p = pieces(&map(), 8192, 8192).unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(p.iter().map(|p| p.len).sum::<u32>(), 8192);
    }

    #[test]
    fn ranges_touching_unmapped_bytes_are_refused() {
        let m = map();
        // Straddles the gap.
        assert_eq!(pieces(&m, 3000, 200), Err(TranslateError::NotMapped(3072)));
        // Entirely in the gap, past the end, or wrapping around.
        assert_eq!(pieces(&m, 4096, 1), Err(TranslateError::NotMapped(4096)));
        assert_eq!(pieces(&m, 16384, 1), Err(TranslateError::NotMapped(16384)));
        assert_eq!(pieces(&m, 16383, 2), Err(TranslateError::NotMapped(16384)));
        assert!(matches!(
            pieces(&m, u64::MAX - 10, 100),
            Err(TranslateError::Overflow { .. })
        ));
        assert_eq!(
            pieces(&m, u64::MAX, u32::MAX).unwrap_err(),
            TranslateError::Overflow {
                gpa: u64::MAX,
                len: u64::from(u32::MAX)
            }
        );
    }

    #[test]
    fn failed_translation_emits_nothing() {
        let mut called = false;
        assert!(map().translate(3000, 200, |_| called = true).is_err());
        assert!(!called);
    }

    #[test]
    fn zero_length_is_empty() {
        assert_eq!(pieces(&map(), 0, 0).unwrap(), vec![]);
    }

    #[test]
    fn overlapping_regions_are_refused() {
        assert!(
            FixedBufferMap::from_regions([(0, 4096, 0), (2048, 4096, 0x10000)], 1 << 30).is_err()
        );
        assert!(FixedBufferMap::from_regions([(u64::MAX - 1, 4096, 0)], 1 << 30).is_err());
    }

    #[test]
    fn real_guest_memory_is_split_at_one_gib() {
        use vm_memory::{GuestAddress, GuestMemoryMmap};
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x10_0000), 0x2000),
        ])
        .unwrap();
        let m = FixedBufferMap::from_guest_memory(&mem).unwrap();
        assert_eq!(m.buffers().len(), 2);
        assert_eq!(m.total_len(), 0x3000);
    }
}
