//! The disk image: opening (or creating) it, checking it, locking it against a second server,
//! and learning the host's direct-I/O alignment.
//!
//! **The image lock.** A process serves the image only while it holds an open-file-description
//! lock on it (exclusive for a writable export, shared for a read-only one), so two servers
//! never write it at once. A daemon takes the lock at startup (or, started with `--incoming` as
//! a migration's destination, when its VMM first starts the device), gives it up when its
//! device is stopped and drained (the source of a migration, after GET_VRING_BASE on every
//! queue), and takes it back when the device starts again (a cancelled migration). The rings
//! hold the image's open file description, so a killed daemon's lock outlives it until its
//! last I/O has completed.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use log::info;

use crate::error::StartupError;

/// Host cache mode for the disk image (`--cache`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheMode {
    /// Bypass the host page cache (O_DIRECT) wherever the request's alignment allows it.
    None,
    /// Go through the host page cache.
    Writeback,
}

/// An open, locked image.
#[derive(Debug)]
pub struct Image {
    pub path: PathBuf,
    /// Opened with O_DIRECT when `direct`; fixed file 0 of every ring.
    pub primary: File,
    /// Page-cache access to the same image, for requests whose buffers do not meet the
    /// direct-I/O alignment (only with `--cache none`); fixed file 1. Also holds the lock.
    pub buffered: File,
    /// The capacity served, in bytes (a multiple of 512): the size at startup, then whatever a
    /// resize ([`Image::current_size`], on SIGHUP or the stats socket's `resize`) found.
    size: AtomicU64,
    pub read_only: bool,
    pub direct: bool,
    /// Alignment of memory buffers for O_DIRECT.
    pub dio_mem_align: u32,
    /// Alignment of file offsets and lengths for O_DIRECT.
    pub dio_offset_align: u32,
    /// The guest's write-cache choice, kept across VMM connections.
    pub write_cache: crate::config::WriteCacheChoice,
    /// How long to wait for the lock when another process holds it (`--lock-wait`).
    lock_wait: std::time::Duration,
    /// Whether we hold the image lock, so may serve the image (see [`Image::take_over`]).
    held: Mutex<bool>,
}

impl Image {
    /// Open `path` per the options, creating a sparse image of `create_size` bytes when it
    /// does not exist and a size was given.
    pub fn open(
        path: &Path,
        create_size: Option<u64>,
        read_only: bool,
        cache: Option<CacheMode>,
        lock_wait: std::time::Duration,
        incoming: bool,
    ) -> Result<Image, StartupError> {
        let p = path.to_path_buf();
        match (path.try_exists(), create_size) {
            (Ok(false), Some(size)) => create_sparse(path, size)?,
            (Ok(false), None) => return Err(StartupError::ImageMissing { path: p }),
            (Err(e), _) => return Err(StartupError::ImageOpen { path: p, source: e }),
            (Ok(true), _) => {}
        }

        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let buffered = open(false).map_err(|e| StartupError::ImageOpen {
            path: p.clone(),
            source: e,
        })?;
        let meta = buffered.metadata().map_err(|e| StartupError::ImageOpen {
            path: p.clone(),
            source: e,
        })?;
        let ft = meta.file_type();
        if !ft.is_file() && !ft.is_block_device() {
            return Err(StartupError::ImageKind { path: p });
        }
        let size = size_of(&buffered).map_err(|e| StartupError::ImageOpen {
            path: p.clone(),
            source: e,
        })?;
        if size == 0 {
            return Err(StartupError::ImageEmpty { path: p });
        }
        if size % 512 != 0 {
            return Err(StartupError::ImageSize { path: p, size });
        }
        // A migration's destination (`--incoming`) takes the lock only when its VMM starts the
        // device, after the source gave it up.
        if !incoming {
            lock(&buffered, read_only, &p, lock_wait)?;
        }

        let direct_file = open_direct(&p, cache, || open(true))?;
        let direct = direct_file.is_some();
        let primary = match direct_file {
            // Opened by path again, after the checks and the lock: the path must still name the
            // file that was checked and locked, else the rings would serve another file.
            Some(f) => {
                same_file(&buffered, &f).map_err(|e| match e {
                    SameFile::Differs => StartupError::ImageReplaced { path: p.clone() },
                    SameFile::Stat(source) => StartupError::ImageOpen {
                        path: p.clone(),
                        source,
                    },
                })?;
                f
            }
            None => buffered.try_clone().map_err(|e| StartupError::ImageOpen {
                path: p.clone(),
                source: e,
            })?,
        };
        let (dio_mem_align, dio_offset_align) = dio_alignment(&primary);
        Ok(Image {
            path: p,
            primary,
            buffered,
            size: AtomicU64::new(size),
            read_only,
            direct,
            dio_mem_align,
            dio_offset_align,
            write_cache: Default::default(),
            lock_wait,
            held: Mutex::new(!incoming),
        })
    }

    /// Whether this process holds the image lock (it may serve the image).
    pub fn held(&self) -> bool {
        *self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hold the image lock before serving it: at once if we hold it already, else waiting up
    /// to `--lock-wait` for the process that holds it (the source of a migration gives it up
    /// when its device stopped and drained). Returns whether it was taken now.
    pub fn take_over(&self) -> Result<bool, StartupError> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if *held {
            return Ok(false);
        }
        lock(&self.buffered, self.read_only, &self.path, self.lock_wait)?;
        *held = true;
        // Another host may have written the image since this one last cached any of it
        // (shared storage): drop what the page cache holds. Dirty pages are not dropped.
        // SAFETY: posix_fadvise on an fd we own reads no memory of ours.
        unsafe { libc::posix_fadvise(self.buffered.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        Ok(true)
    }

    /// Give the image up (the device stopped and nothing is in flight): make what was written
    /// durable, then release the lock, so that a migration's destination may serve it.
    /// Returns whether it was held.
    pub fn give_up(&self) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if !*held {
            return false;
        }
        if !self.read_only {
            if let Err(e) = self.buffered.sync_data() {
                log::warn!(
                    "image {}: fdatasync before giving it up failed: {e}",
                    self.path.display()
                );
            }
        }
        self.unlock();
        *held = false;
        true
    }

    /// The capacity served, in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Serve `bytes` from now on (a multiple of 512, checked by the caller).
    pub fn set_size(&self, bytes: u64) {
        self.size.store(bytes, Ordering::Release);
    }

    /// The image's size on the host now (it may have grown or shrunk since startup): the
    /// file's length, or a block device's size. Needs no open or path lookup, so it works
    /// under the sandbox.
    pub fn current_size(&self) -> io::Result<u64> {
        size_of(&self.buffered)
    }

    /// Release the image lock (before exiting).
    pub fn unlock(&self) {
        // SAFETY: an all-zero flock is a valid value of this plain C struct.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = libc::F_UNLCK as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: F_OFD_SETLK reads the flock struct we pass.
        unsafe { libc::fcntl(self.buffered.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    }

    /// log2 of the physical block size in 512-byte sectors, for the topology config.
    pub fn physical_block_exp(&self) -> u8 {
        let sectors = (self.dio_offset_align / 512).max(1);
        sectors.trailing_zeros() as u8
    }
}

/// Why two descriptors are not known to be one file.
#[derive(Debug)]
pub enum SameFile {
    /// They name different files (device and inode differ).
    Differs,
    /// One of them cannot be examined.
    Stat(io::Error),
}

/// The image opened with O_DIRECT, unless writeback was asked for. A filesystem that refuses
/// it (tmpfs before Linux 6.6, some FUSE and network filesystems) fails an explicit
/// `--cache none`; by default the image is then served through the page cache, and the log
/// says so.
fn open_direct(
    p: &Path,
    cache: Option<CacheMode>,
    open: impl FnOnce() -> io::Result<File>,
) -> Result<Option<File>, StartupError> {
    Ok(match cache {
        Some(CacheMode::Writeback) => None,
        _ => match open() {
            Ok(f) => Some(f),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && cache.is_none() => {
                info!(
                    "image {}: the filesystem refuses O_DIRECT ({e}): serving it through \
                     the page cache (--cache writeback); --cache none would refuse to start",
                    p.display()
                );
                None
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Err(StartupError::DirectIoRefused {
                    path: p.to_path_buf(),
                    source: e,
                })
            }
            Err(e) => {
                return Err(StartupError::ImageOpen {
                    path: p.to_path_buf(),
                    source: e,
                })
            }
        },
    })
}

/// Whether `a` and `b` are open on the same file (same device and inode): a path opened twice
/// may name another file the second time, if someone renamed or replaced it in between.
pub fn same_file(a: &File, b: &File) -> Result<(), SameFile> {
    use std::os::unix::fs::MetadataExt;
    let (ma, mb) = (
        a.metadata().map_err(SameFile::Stat)?,
        b.metadata().map_err(SameFile::Stat)?,
    );
    if (ma.dev(), ma.ino()) == (mb.dev(), mb.ino()) {
        Ok(())
    } else {
        Err(SameFile::Differs)
    }
}

fn create_sparse(path: &Path, size: u64) -> Result<(), StartupError> {
    let err = |e| StartupError::ImageCreate {
        path: path.to_path_buf(),
        source: e,
    };
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    f.set_len(size).map_err(err)?;
    info!(
        "created sparse image {} of {} bytes ({} MiB)",
        path.display(),
        size,
        size >> 20
    );
    Ok(())
}

/// The size of an open regular file or block device.
fn size_of(f: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let meta = f.metadata()?;
    if meta.file_type().is_block_device() {
        // Seeking to the end of a block device yields its size; `&File` seeks the shared
        // file offset, which nothing else uses (all I/O is positioned).
        let mut f = f;
        f.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

/// Take an open-file-description lock on the whole image: exclusive for a writable export,
/// shared for a read-only one, so that two servers (or a server and a writer) never share it.
/// A lock held by someone else is waited for, up to `wait` (see `--lock-wait`).
fn lock(
    f: &File,
    read_only: bool,
    path: &Path,
    wait: std::time::Duration,
) -> Result<(), StartupError> {
    let deadline = std::time::Instant::now() + wait;
    let mut said = false;
    loop {
        match try_lock(f, read_only, path) {
            Err(StartupError::ImageLocked { .. }) if std::time::Instant::now() < deadline => {
                if !said {
                    info!(
                        "image {}: locked by another process; waiting up to {wait:?} (a daemon \
                         that was killed keeps it until its last I/O has completed)",
                        path.display()
                    );
                    said = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn try_lock(f: &File, read_only: bool, path: &Path) -> Result<(), StartupError> {
    // SAFETY: an all-zero flock is a valid value of this plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    // SAFETY: F_OFD_SETLK reads the flock struct we pass and owns nothing of it.
    let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(StartupError::ImageLocked {
            path: path.to_path_buf(),
        }),
        _ => Err(StartupError::ImageLock {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// The direct-I/O alignment (memory, offset) from statx(STATX_DIOALIGN), 512 when unknown.
fn dio_alignment(f: &File) -> (u32, u32) {
    const STATX_DIOALIGN: u32 = 0x2000;
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx with AT_EMPTY_PATH on our fd writes into the struct we own; the path is a
    // valid NUL-terminated empty string.
    let rc = unsafe {
        libc::statx(
            f.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            STATX_DIOALIGN,
            &mut stx,
        )
    };
    if rc == 0 && stx.stx_mask & STATX_DIOALIGN != 0 && stx.stx_dio_offset_align != 0 {
        (
            stx.stx_dio_mem_align.max(1),
            stx.stx_dio_offset_align.max(512),
        )
    } else {
        (512, 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_opens_of_one_file_are_the_same_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.img");
        std::fs::write(&path, [0u8; 512]).expect("write");
        let a = File::open(&path).expect("open a");
        let b = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open b");
        assert!(same_file(&a, &b).is_ok());
        assert!(same_file(&a, &a.try_clone().expect("dup")).is_ok());
    }

    /// The path swapped between the two opens: the second open finds another file, even one
    /// with the same name, size and contents.
    #[test]
    fn a_path_replaced_between_the_opens_is_another_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.img");
        std::fs::write(&path, [7u8; 512]).expect("write");
        let locked = File::open(&path).expect("open");
        let other = dir.path().join("b.img");
        std::fs::write(&other, [7u8; 512]).expect("write");
        std::fs::rename(&other, &path).expect("replace");
        let reopened = File::open(&path).expect("reopen");
        assert!(matches!(
            same_file(&locked, &reopened),
            Err(SameFile::Differs)
        ));
    }
}
