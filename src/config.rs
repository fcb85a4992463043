//! The virtio-blk device model: feature bits, limits and the config space. Everything the
//! guest is told lives here, so that the data path can enforce the very same numbers. Also the
//! daemon's sandbox choice ([`SandboxMode`]), free of the command line's parser.

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

/// Which sandbox the data-plane threads run under (`--sandbox`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxMode {
    /// No seccomp filter (the rings are still restricted).
    None,
    /// Seccomp allowlists: a process-wide deny list, and a strict allowlist on worker threads.
    Seccomp,
}

/// Bytes of the GET_ID answer.
pub const SERIAL_LEN: usize = 20;
/// virtio-blk sector size (the unit of every sector number, regardless of `blk_size`).
pub const SECTOR_SIZE: u64 = 512;
/// Largest single data segment the guest may use (config `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most segments of one discard / write-zeroes request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Most sectors in one discard / write-zeroes segment (1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;
/// Bytes of the config space we serve: the whole virtio 1.2 `virtio_blk_config`. The
/// secure-erase and zoned fields stay zero (those features are not offered), so a driver that
/// reads the full structure gets it.
pub const CONFIG_LEN: usize = 96;
/// Offset of the `writeback` byte in the config space.
pub const CONFIG_WRITEBACK_OFFSET: usize = 32;

const VHOST_USER_F_PROTOCOL_FEATURES: u32 = 30;
/// vhost's "log every page the device writes" feature bit (live migration).
pub const VHOST_F_LOG_ALL: u32 = 26;

/// The write-cache mode a guest chose through the config space (CONFIG_WCE). It belongs to the
/// device, not to one connection: a VMM that reconnects finds the mode its guest set.
#[derive(Debug, Default)]
pub struct WriteCacheChoice(std::sync::atomic::AtomicU8);

impl WriteCacheChoice {
    const WRITETHROUGH: u8 = 1;
    const WRITEBACK: u8 = 2;

    pub fn set(&self, writeback: bool) {
        let v = if writeback {
            Self::WRITEBACK
        } else {
            Self::WRITETHROUGH
        };
        self.0.store(v, std::sync::atomic::Ordering::Release);
    }

    /// `Some(writeback)` once a guest chose.
    pub fn get(&self) -> Option<bool> {
        match self.0.load(std::sync::atomic::Ordering::Acquire) {
            Self::WRITETHROUGH => Some(false),
            Self::WRITEBACK => Some(true),
            _ => None,
        }
    }
}

/// The write cache the device serves (virtio 1.2 §5.2.6): without FLUSH the driver cannot
/// make writes durable, so every write is (writethrough); with FLUSH it is writeback, unless
/// the driver negotiated CONFIG_WCE and chose writethrough.
pub fn serves_writeback(flush: bool, config_wce: bool, choice: Option<bool>) -> bool {
    flush && (!config_wce || choice.unwrap_or(true))
}

/// What the operator asked for; everything the guest sees is derived from this.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Image size in bytes (a multiple of 512).
    pub size_bytes: u64,
    pub read_only: bool,
    pub num_queues: u16,
    pub queue_size: u16,
    pub serial: [u8; SERIAL_LEN],
    /// log2 of (physical block size / 512), from the host's direct-I/O alignment.
    pub physical_block_exp: u8,
}

impl DeviceSpec {
    pub fn capacity_sectors(&self) -> u64 {
        self.size_bytes / SECTOR_SIZE
    }

    /// Most data segments in one request (config `seg_max`): what fits in one descriptor
    /// chain beside the header and the status byte.
    pub fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }

    /// The virtio feature bits we offer.
    pub fn features(&self) -> u64 {
        let mut bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_RING_F_EVENT_IDX,
            VHOST_USER_F_PROTOCOL_FEATURES,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_MQ,
            // Dirty-page logging for live migration (src/dirty_log.rs).
            VHOST_F_LOG_ALL,
        ]
        .iter()
        .fold(0u64, |acc, b| acc | 1 << b);
        if self.read_only {
            bits |= 1 << VIRTIO_BLK_F_RO;
        } else {
            for b in [
                VIRTIO_BLK_F_FLUSH,
                VIRTIO_BLK_F_CONFIG_WCE,
                VIRTIO_BLK_F_DISCARD,
                VIRTIO_BLK_F_WRITE_ZEROES,
            ] {
                bits |= 1 << b;
            }
        }
        bits
    }

    /// The config space, as the guest reads it, for the given `writeback` setting.
    pub fn config_space(&self, writeback: bool) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
        put(0, &self.capacity_sectors().to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &self.seg_max().to_le_bytes());
        // geometry (16..20) stays zero: meaningless for a virtual disk.
        put(20, &(SECTOR_SIZE as u32).to_le_bytes());
        // topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
        put(24, &[self.physical_block_exp, 0]);
        put(26, &1u16.to_le_bytes());
        put(28, &0u32.to_le_bytes());
        put(CONFIG_WRITEBACK_OFFSET, &[u8::from(writeback)]);
        put(34, &self.num_queues.to_le_bytes());
        if !self.read_only {
            put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(40, &MAX_DISCARD_SEG.to_le_bytes());
            put(44, &1u32.to_le_bytes()); // discard_sector_alignment
            put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
            put(52, &MAX_DISCARD_SEG.to_le_bytes());
            put(56, &[1]); // write_zeroes_may_unmap
        }
        c
    }
}

/// Read `size` bytes at `offset` of the config space; `None` if any byte lies outside it.
pub fn config_read(space: &[u8; CONFIG_LEN], offset: u32, size: u32) -> Option<Vec<u8>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(usize::try_from(size).ok()?)?;
    space.get(start..end).map(<[u8]>::to_vec)
}

/// The serial as GET_ID reports it: the string's bytes, NUL-padded to 20.
pub fn serial_bytes(serial: Option<&str>, fallback: &str) -> [u8; SERIAL_LEN] {
    let mut out = [0u8; SERIAL_LEN];
    let s = serial.unwrap_or(fallback).as_bytes();
    let n = s.len().min(SERIAL_LEN);
    out[..n].copy_from_slice(&s[..n]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(read_only: bool) -> DeviceSpec {
        DeviceSpec {
            size_bytes: 1 << 30,
            read_only,
            num_queues: 2,
            queue_size: 256,
            serial: serial_bytes(Some("abc"), "x"),
            physical_block_exp: 3,
        }
    }

    #[test]
    fn config_space_layout_matches_virtio_1_2() {
        let c = spec(false).config_space(true);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[8..12].try_into().unwrap()), SIZE_MAX);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 3);
        assert_eq!(c[32], 1);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(
            u32::from_le_bytes(c[40..44].try_into().unwrap()),
            MAX_DISCARD_SEG
        );
        assert_eq!(c[56], 1);
        assert_eq!(spec(false).config_space(false)[32], 0);
    }

    #[test]
    fn read_only_offers_no_write_features() {
        let ro = spec(true).features();
        assert_ne!(ro & 1 << VIRTIO_BLK_F_RO, 0);
        for b in [
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_eq!(ro & 1 << b, 0);
        }
        let rw = spec(false).features();
        assert_eq!(rw & 1 << VIRTIO_BLK_F_RO, 0);
        assert_ne!(rw & 1 << VIRTIO_BLK_F_DISCARD, 0);
    }

    #[test]
    fn config_reads_outside_the_space_are_refused() {
        let c = spec(false).config_space(true);
        assert_eq!(config_read(&c, 0, 8).unwrap(), c[0..8].to_vec());
        assert_eq!(
            config_read(&c, 0, CONFIG_LEN as u32).unwrap().len(),
            CONFIG_LEN
        );
        assert_eq!(config_read(&c, 56, 8).unwrap(), c[56..64].to_vec());
        assert!(config_read(&c, 90, 8).is_none());
        assert!(config_read(&c, 96, 1).is_none());
        assert!(config_read(&c, u32::MAX, 2).is_none());
        assert!(config_read(&c, 4, u32::MAX).is_none());
    }

    #[test]
    fn serial_is_padded_and_truncated() {
        assert_eq!(&serial_bytes(Some("ab"), "x")[..3], b"ab\0");
        assert_eq!(
            serial_bytes(None, "0123456789012345678901234"),
            *b"01234567890123456789"
        );
    }

    #[test]
    fn write_cache_follows_virtio_5_2_6() {
        // No FLUSH: writethrough, whatever was chosen.
        assert!(!serves_writeback(false, true, Some(true)));
        assert!(!serves_writeback(false, false, None));
        // FLUSH without CONFIG_WCE: writeback.
        assert!(serves_writeback(true, false, Some(false)));
        // FLUSH with CONFIG_WCE: writeback until the driver chooses.
        assert!(serves_writeback(true, true, None));
        assert!(!serves_writeback(true, true, Some(false)));
        let c = WriteCacheChoice::default();
        assert_eq!(c.get(), None);
        c.set(false);
        assert_eq!(c.get(), Some(false));
        c.set(true);
        assert_eq!(c.get(), Some(true));
    }
}
