//! The problem ringfence exists for, as a runnable demonstration.
//!
//! A process that forbids itself `socket(2)`, `connect(2)` and `open*(2)` with a seccomp filter
//! can still connect to a listener and create files through an ordinary io_uring: the ring's
//! operations run inside the kernel, where seccomp never looks. A ring built by ringfence's own
//! ring builder (`ringfence::ring::build_ring`, with the broadest policy the daemon ever uses)
//! refuses the very same submissions with -EACCES.
//!
//! `--ring process` shows the wall Linux 7.0+ adds behind seccomp: the daemon's seccomp filter
//! forbids `io_uring_setup` once its rings are made, and were a ring made anyway (say under
//! `--sandbox none`), it would carry the daemon's process-wide io_uring allowlist
//! (`ringfence::sandbox::restrict_process_rings`, installed before the daemon spawns any
//! thread): here, a fresh, plain ring created on a thread spawned after it. Before 7.0 the
//! kernel has no such allowlist and the demo says so; that ring then behaves like a plain one.
//!
//! Usage:
//!   ringfence-seccomp-gap connect --ring plain|ringfence|process --port PORT [--host 127.0.0.1]
//!   ringfence-seccomp-gap openat  --ring plain|ringfence|process --path PATH
//!
//! Each run installs the seccomp filter, shows that the syscalls themselves are refused (EPERM),
//! then submits the equivalent SQEs to the chosen ring and prints each result on a line of the
//! form `ring=<kind> op=<NAME> res=<i32>`. It exits 0 whatever the ring did (it is a
//! demonstration); it exits 1 only when it cannot set the demonstration up.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use io_uring::{opcode, squeue, types, IoUring};
use seccompiler::{apply_filter, BpfProgram, SeccompAction, SeccompFilter, TargetArch};

use ringfence::guest_map::{FixedBufferMap, MAX_FIXED_BUFFER};
use ringfence::ring::{build_ring, register_buffers, RingPolicy, RingSetup};

/// Size of the scratch image (fixed file 0) and of the fixed buffer of the ringfence ring.
const IMAGE_LEN: usize = 64 << 10;
/// Bytes the plain ring writes into the file it creates.
const PAYLOAD: &[u8] = b"written through io_uring despite seccomp\n";
/// Longest wait for one completion.
const CQE_TIMEOUT_SECS: u64 = 10;

#[derive(Parser, Debug)]
#[command(
    name = "ringfence-seccomp-gap",
    about = "Show that seccomp does not stop io_uring operations, and that a ring built by \
             ringfence refuses them"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Block socket(2)/connect(2), then connect to HOST:PORT through the ring.
    Connect {
        #[arg(long, value_enum)]
        ring: RingKind,
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = Ipv4Addr::LOCALHOST)]
        host: Ipv4Addr,
    },
    /// Block open(2)/openat(2)/openat2(2), then create PATH through the ring.
    Openat {
        #[arg(long, value_enum)]
        ring: RingKind,
        #[arg(long)]
        path: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RingKind {
    /// An ordinary io_uring, as any process may create.
    Plain,
    /// A ring from ringfence's ring builder: restricted before it is enabled.
    Ringfence,
    /// A plain ring made by a thread of a process that installed ringfence's process-wide
    /// allowlist first (Linux 7.0+).
    Process,
}

impl RingKind {
    fn name(self) -> &'static str {
        match self {
            RingKind::Plain => "plain",
            RingKind::Ringfence => "ringfence",
            RingKind::Process => "process",
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringfence-seccomp-gap: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A ring plus what a ringfence ring's registrations point at (kept alive with it).
struct Demo {
    kind: RingKind,
    ring: IoUring,
    /// The ringfence ring's fixed buffer, and the scratch image registered as fixed file 0.
    fixed: Option<(Vec<u8>, File)>,
}

fn run(cmd: Cmd) -> Result<(), String> {
    let kind = match &cmd {
        Cmd::Connect { ring, .. } | Cmd::Openat { ring, .. } => *ring,
    };
    // Everything the rings need is created before the filter goes in, the way the daemon
    // builds its rings before its threads are sandboxed.
    let mut demo = Demo::new(kind)?;
    // For the restricted ring, the attacker's best case: a TCP socket the process already
    // holds, made before socket(2) was forbidden.
    let held = match (&cmd, kind) {
        (Cmd::Connect { .. }, RingKind::Ringfence) => Some(tcp_socket()?),
        _ => None,
    };
    let status = File::open("/proc/self/status")
        .map_err(|e| format!("cannot open /proc/self/status: {e}"))?;

    install_filter()?;
    println!("seccomp: filter installed (socket, connect, open, openat, openat2, creat -> EPERM)");
    println!("seccomp: /proc/self/status {}", seccomp_mode(&status));

    match cmd {
        Cmd::Connect { port, host, .. } => connect(&mut demo, held, host, port),
        Cmd::Openat { path, .. } => openat(&mut demo, &path),
    }
}

impl Demo {
    fn new(kind: RingKind) -> Result<Demo, String> {
        match kind {
            RingKind::Plain => {
                let ring = IoUring::new(8).map_err(|e| {
                    format!("io_uring_setup failed ({e}); is io_uring enabled on this kernel?")
                })?;
                Ok(Demo {
                    kind,
                    ring,
                    fixed: None,
                })
            }
            RingKind::Process => {
                match ringfence::sandbox::restrict_process_rings(false) {
                    Ok(Some(p)) => println!("process allowlist: installed: {p}"),
                    Ok(None) => println!(
                        "process allowlist: none on this kernel ({})",
                        ringfence::kernel::Kernel::get()
                    ),
                    Err(e) => return Err(format!("process allowlist: {e}")),
                }
                // Created on a thread spawned after the allowlist, as any thread of the daemon
                // would create one if seccomp let it.
                let ring = std::thread::spawn(|| IoUring::new(8))
                    .join()
                    .map_err(|_| "ring thread panicked".to_string())?
                    .map_err(|e| format!("io_uring_setup failed ({e})"))?;
                Ok(Demo {
                    kind,
                    ring,
                    fixed: None,
                })
            }
            RingKind::Ringfence => {
                let image = scratch_image()?;
                let buf = vec![0u8; IMAGE_LEN];
                let map = FixedBufferMap::from_regions(
                    [(0, IMAGE_LEN as u64, buf.as_ptr() as u64)],
                    MAX_FIXED_BUFFER,
                )
                .map_err(|e| format!("fixed buffer map: {e}"))?;
                let files = [(image.as_raw_fd(), "scratch image".to_string())];
                // A writable disk with FLUSH and DISCARD/WRITE_ZEROES negotiated, plus the
                // vectored fixed-buffer opcodes where the kernel has them: the broadest policy
                // the daemon ever builds a ring with.
                let mut policy = RingPolicy::for_device(true, true, true);
                if ringfence::kernel::Kernel::get().vectored_fixed {
                    policy = policy.with_vectored();
                }
                let ring = build_ring(&RingSetup {
                    label: "demo",
                    entries: 8,
                    files: &files,
                    eventfd: None,
                    policy: &policy,
                })
                .map_err(|e| format!("ringfence's ring builder failed: {e}"))?;
                // SAFETY: `buf` moves into the Demo beside the ring (a Vec's heap block does not
                // move) and is only read back after the READ_FIXED that fills it has completed.
                unsafe { register_buffers(&ring, &map) }
                    .map_err(|e| format!("registering the fixed buffer failed: {e}"))?;
                println!("ringfence ring policy: {policy}");
                Ok(Demo {
                    kind,
                    ring,
                    fixed: Some((buf, image)),
                })
            }
        }
    }

    /// Submit one SQE, wait (bounded) for its completion, print and return the result.
    fn submit(&mut self, op: &str, sqe: squeue::Entry) -> Result<i32, String> {
        // SAFETY: every pointer in the SQEs this program builds (socket address, path, data)
        // refers to memory owned by the caller's stack frame or by `self`, which outlive this
        // call; the call does not return before the completion has been reaped.
        unsafe { self.ring.submission().push(&sqe.user_data(0x5eed)) }
            .map_err(|_| "submission queue full".to_string())?;
        let ts = types::Timespec::new().sec(CQE_TIMEOUT_SECS);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ETIME) => {}
            Err(e) => return Err(format!("io_uring_enter failed: {e}")),
        }
        let cqe = self.ring.completion().next().ok_or_else(|| {
            format!("{op}: no completion within {CQE_TIMEOUT_SECS} s (timed out)")
        })?;
        let res = cqe.result();
        println!(
            "ring={} op={op} res={res} ({})",
            self.kind.name(),
            describe(res)
        );
        Ok(res)
    }

    /// On a ringfence ring: show that the ring still does the one thing it is for.
    fn read_fixed_still_works(&mut self) -> Result<(), String> {
        let Some((buf, _)) = self.fixed.as_mut() else {
            return Ok(());
        };
        let ptr = buf.as_mut_ptr();
        let sqe = opcode::ReadFixed::new(types::Fixed(0), ptr, 4096, 0)
            .offset(0)
            .build();
        let res = self.submit("READ_FIXED", sqe)?;
        if res == 4096 {
            let ok = self
                .fixed
                .as_ref()
                .is_some_and(|(b, _)| b[..4096].iter().enumerate().all(|(i, &x)| x == pat(i)));
            println!(
                "ringfence ring: READ_FIXED on the image {}",
                if ok {
                    "returned the image's bytes"
                } else {
                    "returned WRONG bytes"
                }
            );
        }
        Ok(())
    }
}

/// Byte `i` of the scratch image.
fn pat(i: usize) -> u8 {
    (i % 251) as u8
}

/// A 64 KiB scratch image, already unlinked: the ring holds the only reference.
fn scratch_image() -> Result<File, String> {
    let dir = std::env::temp_dir();
    let path = dir.join(format!("ringfence-seccomp-gap-{}.img", std::process::id()));
    let f = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| format!("cannot create the scratch image {}: {e}", path.display()))?;
    let removed = std::fs::remove_file(&path);
    let data: Vec<u8> = (0..IMAGE_LEN).map(pat).collect();
    f.write_all_at(&data, 0)
        .map_err(|e| format!("cannot write the scratch image: {e}"))?;
    removed.map_err(|e| format!("cannot unlink the scratch image {}: {e}", path.display()))?;
    Ok(f)
}

fn install_filter() -> Result<(), String> {
    let mut denied = vec![
        libc::SYS_socket,
        libc::SYS_connect,
        libc::SYS_openat,
        libc::SYS_openat2,
    ];
    #[cfg(target_arch = "x86_64")]
    denied.extend([libc::SYS_open, libc::SYS_creat]);
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        denied.into_iter().map(|s| (s, vec![])).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("seccomp: unsupported architecture: {e}"))?;
    let prog: BpfProgram = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .and_then(|f| f.try_into())
    .map_err(|e| format!("seccomp: cannot compile the filter: {e}"))?;
    apply_filter(&prog).map_err(|e| format!("seccomp: cannot install the filter: {e}"))
}

/// The `Seccomp:` line of /proc/self/status, read through an fd opened before the filter.
fn seccomp_mode(status: &File) -> String {
    let mut buf = vec![0u8; 8192];
    let n = status.read_at(&mut buf, 0).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .find(|l| l.starts_with("Seccomp:"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "has no Seccomp: line".into())
}

/// Print what a direct syscall returned; `rc` is its return value.
fn report_syscall(name: &str, rc: libc::c_long) {
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        let blocked = e.raw_os_error() == Some(libc::EPERM);
        println!(
            "syscall {name}: -1 errno={} ({e}){}",
            e.raw_os_error().unwrap_or(0),
            if blocked {
                " -- blocked by seccomp"
            } else {
                ""
            }
        );
    } else {
        println!("syscall {name}: {rc} -- NOT blocked");
        if let Ok(fd) = RawFd::try_from(rc) {
            // SAFETY: the syscall just returned this fd to us; nothing else owns it.
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

fn describe(res: i32) -> String {
    if res < 0 {
        let e = std::io::Error::from_raw_os_error(-res);
        let name = match -res {
            libc::EACCES => "EACCES",
            libc::EPERM => "EPERM",
            libc::ECONNREFUSED => "ECONNREFUSED",
            libc::EBADF => "EBADF",
            libc::EINVAL => "EINVAL",
            libc::ENOENT => "ENOENT",
            _ => "error",
        };
        format!("{name}: {e}")
    } else {
        "ok".into()
    }
}

fn sockaddr(host: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(host).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// A TCP socket made with socket(2) (before the filter).
fn tcp_socket() -> Result<OwnedFd, String> {
    // SAFETY: socket(2) takes no pointers.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(format!(
            "socket(2) failed before the filter: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: socket(2) just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn connect(
    demo: &mut Demo,
    held: Option<OwnedFd>,
    host: Ipv4Addr,
    port: u16,
) -> Result<(), String> {
    let addr = sockaddr(host, port);
    let addr_ptr = &addr as *const libc::sockaddr_in as *const libc::sockaddr;
    let addr_len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    println!("target: {}:{port}", IpAddr::V4(host));

    // The syscalls themselves are refused.
    // SAFETY: socket(2) takes no pointers.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_socket,
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        )
    };
    report_syscall("socket(2)", rc);
    // fd -1: a filter that let connect(2) through would yield EBADF, not EPERM.
    // SAFETY: `addr` is a valid sockaddr_in of `addr_len` bytes.
    let rc = unsafe { libc::syscall(libc::SYS_connect, -1, addr_ptr, addr_len) };
    report_syscall("connect(2) on fd -1", rc);

    // Through the ring: create a socket, connect it.
    let sock =
        opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0).build();
    let res = demo.submit("SOCKET", sock)?;
    let ring_sock = (res >= 0).then(|| {
        // SAFETY: a successful IORING_OP_SOCKET returns a new fd that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(res) }
    });

    match (&ring_sock, demo.kind) {
        (Some(s), _) => {
            let sqe = opcode::Connect::new(types::Fd(s.as_raw_fd()), addr_ptr, addr_len).build();
            let res = demo.submit("CONNECT", sqe)?;
            if res == 0 {
                println!(
                    "verdict: connected to {}:{port} although seccomp blocks socket(2) and \
                     connect(2)",
                    IpAddr::V4(host)
                );
            }
        }
        (None, RingKind::Ringfence) => {
            // The ring made no socket. Give the attacker the best cases anyway: a real TCP
            // socket made before the filter, and fixed file 0 (so that IOSQE_FIXED_FILE is set,
            // as the restrictions require). The kernel refuses both for their opcode.
            if let Some(h) = &held {
                let sqe =
                    opcode::Connect::new(types::Fd(h.as_raw_fd()), addr_ptr, addr_len).build();
                demo.submit("CONNECT", sqe)?;
            }
            let sqe = opcode::Connect::new(types::Fixed(0), addr_ptr, addr_len).build();
            demo.submit("CONNECT+FIXED_FILE", sqe)?;
            demo.read_fixed_still_works()?;
            println!(
                "verdict: no socket, no connection: the restricted ring refused every attempt"
            );
        }
        (None, RingKind::Process) => {
            let sqe = opcode::Connect::new(types::Fixed(0), addr_ptr, addr_len).build();
            demo.submit("CONNECT+FIXED_FILE", sqe)?;
            println!("verdict: no socket, no connection: the process allowlist refused it");
        }
        (None, RingKind::Plain) => {
            println!("verdict: the plain ring could not create a socket either");
        }
    }
    drop(ring_sock);
    drop(held);
    Ok(())
}

fn openat(demo: &mut Demo, path: &std::path::Path) -> Result<(), String> {
    let cpath = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| format!("path {} contains a NUL byte", path.display()))?;
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC;
    let mode: libc::mode_t = 0o644;
    println!("target: {}", path.display());

    // The syscalls themselves are refused.
    // SAFETY: `cpath` is a valid NUL-terminated string.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            cpath.as_ptr(),
            flags,
            mode,
        )
    };
    report_syscall("openat(2)", rc);
    let std_open = File::create(path);
    println!(
        "std::fs::File::create: {}",
        match &std_open {
            Ok(_) => "succeeded -- NOT blocked".to_string(),
            Err(e) => format!("{e}"),
        }
    );
    drop(std_open);

    // Through the ring.
    let sqe = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), cpath.as_ptr())
        .flags(flags)
        .mode(mode)
        .build();
    let res = demo.submit("OPENAT", sqe)?;
    if res >= 0 {
        // SAFETY: a successful IORING_OP_OPENAT returns a new fd that nothing else owns.
        let file = unsafe { OwnedFd::from_raw_fd(res) };
        let sqe = opcode::Write::new(
            types::Fd(file.as_raw_fd()),
            PAYLOAD.as_ptr(),
            PAYLOAD.len() as u32,
        )
        .offset(0)
        .build();
        let res = demo.submit("WRITE", sqe)?;
        if usize::try_from(res).ok() == Some(PAYLOAD.len()) {
            println!(
                "verdict: created and wrote {} although seccomp blocks open(2)/openat(2)",
                path.display()
            );
        }
    } else if demo.kind != RingKind::Plain {
        // The flag the restrictions require does not help either: refused for its opcode.
        let sqe = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), cpath.as_ptr())
            .flags(flags)
            .mode(mode)
            .build()
            .flags(squeue::Flags::FIXED_FILE);
        demo.submit("OPENAT+FIXED_FILE", sqe)?;
        demo.read_fixed_still_works()?;
        println!(
            "verdict: {} was not opened: the kernel refused it",
            path.display()
        );
    }
    std::io::stdout()
        .flush()
        .map_err(|e| format!("stdout: {e}"))
}
