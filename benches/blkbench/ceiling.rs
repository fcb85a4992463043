//! The software ceiling (issue 24): the 4k rows again on memory-backed storage, so that what
//! ringfence adds per request is measured without the disk's noise. Two media: `tmpfs`, a fully
//! written image in /dev/shm (O_DIRECT on tmpfs needs Linux >= 6.6), and `loop`, a loop device
//! over that file (`--direct-io=off`), served as a block device like a fast disk (a
//! null_blk-like device that holds data).

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::engine::Workload;

/// Where the ceiling image lives.
pub const SHM: &str = "/dev/shm";

/// The ceiling image is the disk image's size, at most this.
pub const MAX_SIZE: u64 = 1 << 30;

/// The rows run again on each ceiling medium (the ones of them that the matrix has; all three
/// under `--no-matrix`).
pub const JOBS: [Workload; 3] = [
    Workload::new(true, 100, 4096, 32),
    Workload::new(true, 0, 4096, 32),
    Workload::new(true, 100, 4096, 1),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Medium {
    /// A fully written image file in /dev/shm.
    Tmpfs,
    /// A loop device over that file.
    Loop,
}

impl Medium {
    pub fn name(self) -> &'static str {
        match self {
            Medium::Tmpfs => "tmpfs",
            Medium::Loop => "loop",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Medium::Tmpfs => {
                "a fully written image file in /dev/shm (tmpfs, O_DIRECT): every target as on \
                 the disk image"
            }
            Medium::Loop => {
                "a loop device (`losetup --direct-io=off`) over that file, served as a block \
                 device: native and fio open /dev/loopN with O_DIRECT, ringfence `--blk-file \
                 /dev/loopN`, qemu-storage-daemon `driver=host_device`"
            }
        }
    }
}

/// `--ceiling`: `none`, or a comma-separated list of `tmpfs` and `loop`.
pub fn parse(s: &str) -> Result<Vec<Medium>, String> {
    let s = s.trim();
    if s.is_empty() || s == "none" {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let m = match part {
            "tmpfs" => Medium::Tmpfs,
            "loop" => Medium::Loop,
            _ => {
                return Err(format!(
                    "--ceiling: unknown medium '{part}' (tmpfs, loop, or none)"
                ))
            }
        };
        if !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// Whether `w` (any client pattern) is one of the ceiling rows.
pub fn is_ceiling_row(w: &Workload) -> bool {
    JOBS.contains(&w.base())
}

const TMPFS_MAGIC: libc::c_long = 0x0102_1994;

/// A directory in /dev/shm for the ceiling image, removed on drop. Its name carries our pid, so
/// that a later run can remove what a killed run left behind (memory, not disk).
pub struct ShmDir {
    pub path: PathBuf,
}

impl ShmDir {
    pub fn create(size: u64) -> Result<ShmDir, String> {
        let shm = Path::new(SHM);
        let c = std::ffi::CString::new(SHM).expect("no NUL");
        // SAFETY: an all-zero statfs is a valid value of this plain C struct.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: statfs reads the NUL-terminated path and writes only into `st`.
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
            return Err(format!("{SHM}: {}", std::io::Error::last_os_error()));
        }
        if st.f_type as libc::c_long != TMPFS_MAGIC {
            return Err(format!("{SHM} is not a tmpfs"));
        }
        remove_stale(shm);
        let free = st.f_bavail as u64 * st.f_bsize as u64;
        let want = size + (256 << 20);
        if free < want {
            return Err(format!(
                "{SHM} has {} MiB free, the ceiling image needs {} MiB (and 256 MiB to spare)",
                free >> 20,
                size >> 20
            ));
        }
        let path = shm.join(format!(
            "blkbench-ceiling-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(ShmDir { path })
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Remove the ceiling directories of blkbench runs that are gone (killed before their cleanup).
fn remove_stale(shm: &Path) {
    let Ok(dir) = std::fs::read_dir(shm) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(rest) = name
            .to_str()
            .and_then(|n| n.strip_prefix("blkbench-ceiling-"))
        else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if pid > 0 && !Path::new(&format!("/proc/{pid}")).exists() {
            eprintln!(
                "blkbench: removing {} (left by a run that is gone)",
                e.path().display()
            );
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

// <linux/loop.h>
const LOOP_SET_STATUS64: libc::c_ulong = 0x4C04;
const LOOP_GET_STATUS64: libc::c_ulong = 0x4C05;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

/// `struct loop_info64`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// A loop device over a file, detached on drop (`losetup -d`). blkbench also holds it open
/// with `LO_FLAGS_AUTOCLEAR` set, so that the kernel detaches it when blkbench dies without
/// cleaning up (a second Ctrl-C, SIGKILL): the last close of an autoclear device detaches it.
pub struct LoopDev {
    pub path: PathBuf,
    holder: Option<File>,
}

impl LoopDev {
    /// `losetup --find --show --direct-io=off FILE`.
    pub fn attach(file: &Path) -> Result<LoopDev, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=off"])
            .arg(file)
            .output()
            .map_err(|e| format!("running losetup: {e} (apt-get install mount)"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup --find --show --direct-io=off {} failed ({}): {}",
                file.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dev.starts_with("/dev/") {
            return Err(format!("losetup printed '{dev}', not a device"));
        }
        let mut d = LoopDev {
            path: PathBuf::from(dev),
            holder: None,
        };
        // From here on, drop detaches it.
        let holder = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&d.path)
            .map_err(|e| format!("opening {}: {e}", d.path.display()))?;
        if let Err(e) = set_autoclear(&holder) {
            eprintln!(
                "blkbench: {}: could not set autoclear ({e}); it is detached at the end of the run",
                d.path.display()
            );
        }
        d.holder = Some(holder);
        Ok(d)
    }

    /// The device's size in bytes.
    pub fn size(&self) -> Result<u64, String> {
        let f = File::open(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        let mut f = &f;
        std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
            .map_err(|e| format!("size of {}: {e}", self.path.display()))
    }
}

fn set_autoclear(f: &File) -> std::io::Result<()> {
    // SAFETY: an all-zero loop_info64 is a valid value of this plain C struct.
    let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
    // SAFETY: LOOP_GET_STATUS64 on a loop device we hold open writes one loop_info64 into
    // `info`, which is exactly that struct.
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_GET_STATUS64, &mut info) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    info.lo_flags |= LO_FLAGS_AUTOCLEAR;
    // SAFETY: LOOP_SET_STATUS64 reads one loop_info64, the one just read back with the
    // autoclear flag added (the kernel changes only the settable flags and keeps the rest).
    if unsafe { libc::ioctl(f.as_raw_fd(), LOOP_SET_STATUS64, &info) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        // With our descriptor still open, the kernel defers the detach to the last close (it
        // sets autoclear); closing ours then detaches it.
        match Command::new("losetup").arg("-d").arg(&self.path).output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "blkbench: losetup -d {}: {}",
                self.path.display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("blkbench: losetup -d {}: {e}", self.path.display()),
        }
        drop(self.holder.take());
        // The detach may finish a moment after the last close.
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        let bound = Path::new("/sys/block").join(&*name).join("loop");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while bound.exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        if bound.exists() {
            eprintln!(
                "blkbench: {} is still attached; detach it with losetup -d {}",
                self.path.display(),
                self.path.display()
            );
        } else {
            eprintln!("blkbench: detached {}", self.path.display());
        }
    }
}

/// Parsing self-check for test mode.
pub fn self_check() -> Result<(), String> {
    let cases: [(&str, &[Medium]); 6] = [
        ("none", &[]),
        ("", &[]),
        ("tmpfs", &[Medium::Tmpfs]),
        ("loop", &[Medium::Loop]),
        ("tmpfs,loop", &[Medium::Tmpfs, Medium::Loop]),
        (" loop , tmpfs,loop", &[Medium::Loop, Medium::Tmpfs]),
    ];
    for (s, want) in cases {
        if parse(s)? != want {
            return Err(format!("--ceiling {s:?}: {:?}", parse(s)));
        }
    }
    for bad in ["disk", "tmpfs,nvme", "none,tmpfs"] {
        if parse(bad).is_ok() {
            return Err(format!("--ceiling {bad:?} should not parse"));
        }
    }
    let w = Workload::parse("rw=randwrite,bs=4k,qd=32,batch=1")?;
    if !is_ceiling_row(&w)
        || is_ceiling_row(&Workload::parse("rw=randread,bs=4k,qd=1,hipri=1")?)
        || is_ceiling_row(&Workload::parse("rw=randread,bs=4k,qd=16,queues=2")?)
    {
        return Err("ceiling rows".into());
    }
    if std::mem::size_of::<LoopInfo64>() != 232 {
        return Err("struct loop_info64 is 232 bytes".into());
    }
    Ok(())
}
