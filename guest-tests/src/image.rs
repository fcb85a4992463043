//! Disk images with a deterministic pattern: every 8-byte word is a hash of its offset, so
//! any byte of the image can be checked without keeping a copy, and a stray write is found
//! (and located) by comparing the file with the pattern.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use crate::memory::{Ranges, RunBuilder};

const SEED: u64 = 0x5eed_f00d_0000_0001;

fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pattern's bytes for image offsets `offset..offset + buf.len()`.
pub fn pattern_into(offset: u64, buf: &mut [u8]) {
    let mut i = 0usize;
    while i < buf.len() {
        let off = offset + i as u64;
        let word = splitmix((off / 8) ^ SEED).to_le_bytes();
        let k = (off % 8) as usize;
        let n = (8 - k).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[k..k + n]);
        i += n;
    }
}

pub fn pattern(offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    pattern_into(offset, &mut v);
    v
}

/// The pattern from offset 0, computed once per process, for images of up to `len` bytes.
fn cached(len: u64) -> Option<&'static [u8]> {
    static CACHE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    const CACHED: u64 = 64 << 20;
    if len > CACHED {
        return None;
    }
    let v = CACHE.get_or_init(|| {
        let mut v = vec![0u8; CACHED as usize];
        for (i, w) in v.chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&splitmix(i as u64 ^ SEED).to_le_bytes());
        }
        v
    });
    Some(&v[..len as usize])
}

/// Create `path` holding `size` bytes of the pattern.
pub fn create(path: &Path, size: u64) {
    let mut f = File::create(path).expect("create image");
    if let Some(p) = cached(size) {
        f.write_all(p).expect("write image");
        return;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        pattern_into(off, &mut buf[..n]);
        f.write_all(&buf[..n]).expect("write image");
        off += n as u64;
    }
}

/// Compare the image with the pattern outside the `allowed` `(offset, len)` ranges; one
/// line per differing run (at most 20). Also reports a changed file size.
pub fn verify(path: &Path, size: u64, allowed: &[(u64, u64)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut f = File::open(path).expect("open image");
    let actual = f.metadata().expect("stat image").len();
    if actual != size {
        out.push(format!("image size changed from {size} to {actual} bytes"));
    }
    let chunk = 1usize << 20;
    let mut buf = vec![0u8; chunk];
    let mut want = vec![0u8; chunk];
    let mut off = 0u64;
    let ok = Ranges::new(allowed);
    let mut runs = RunBuilder::default();
    while off < size.min(actual) {
        let n = (size.min(actual) - off).min(chunk as u64) as usize;
        f.read_exact(&mut buf[..n]).expect("read image");
        match cached(off + n as u64) {
            Some(p) => want[..n].copy_from_slice(&p[off as usize..off as usize + n]),
            None => pattern_into(off, &mut want[..n]),
        }
        if buf[..n] != want[..n] {
            let mut i = 0;
            while i < n {
                let pos = off + i as u64;
                if buf[i] == want[i] {
                    i += 1;
                } else if let Some(end) = ok.covering(pos) {
                    i = (end.min(off + n as u64) - off) as usize;
                } else {
                    runs.add(pos);
                    i += 1;
                }
            }
        }
        off += n as u64;
    }
    for (rs, re) in runs.finish().into_iter().take(20) {
        out.push(format!(
            "image bytes {rs:#x}..{re:#x} ({} bytes, sector {}) changed outside the ranges the requests may write",
            re - rs,
            rs / 512
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_position_dependent_and_consistent() {
        let whole = pattern(0, 64);
        assert_eq!(pattern(13, 20), whole[13..33].to_vec());
        assert_ne!(whole[0..8], whole[8..16]);
    }

    #[test]
    fn verify_reports_changes_outside_allowed_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        create(&p, 3 << 20);
        assert!(verify(&p, 3 << 20, &[]).is_empty());
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        use std::io::{Seek, SeekFrom};
        f.seek(SeekFrom::Start(0x100010)).unwrap();
        f.write_all(&[0xAA ^ pattern(0x100010, 1)[0]; 1]).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&vec![0; 512]).unwrap();
        drop(f);
        let v = verify(&p, 3 << 20, &[(4096, 512)]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("0x100010..0x100011"), "{v:?}");
    }
}
