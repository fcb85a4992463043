//! virtio-blk request format (virtio 1.2, 5.2.6): a 16-byte header, data, one status byte.

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_GET_LIFETIME: u32 = 10;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;
pub const T_SECURE_ERASE: u32 = 14;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

pub const SECTOR: u64 = 512;
/// Bytes of the GET_ID answer.
pub const ID_LEN: usize = 20;
/// Write-zeroes flag: the device may unmap.
pub const WZ_UNMAP: u32 = 1;

/// The request header: type, reserved, sector.
pub fn header(t: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// One discard / write-zeroes segment: sector, num_sectors, flags.
pub fn range_seg(sector: u64, num_sectors: u32, flags: u32) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..8].copy_from_slice(&sector.to_le_bytes());
    s[8..12].copy_from_slice(&num_sectors.to_le_bytes());
    s[12..16].copy_from_slice(&flags.to_le_bytes());
    s
}

pub fn status_name(s: u8) -> String {
    match s {
        S_OK => "OK".into(),
        S_IOERR => "IOERR".into(),
        S_UNSUPP => "UNSUPP".into(),
        0xff => "unwritten".into(),
        x => format!("invalid status {x:#x}"),
    }
}
