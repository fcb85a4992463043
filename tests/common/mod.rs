//! Shared pieces of the integration tests: backends to test (ringfence, or qemu-storage-daemon
//! as the reference peer), a blkio `virtio-blk-vhost-user` client with buffers in shared memory,
//! a raw virtio-blk driver for the requests blkio cannot express (GET_ID, writes to a read-only
//! disk), deterministic data patterns, and bounded waits on real events (completions, process
//! exit, the ready line) that fail loudly instead of hanging.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use ringfence_guest_tests::daemon::{Daemon, READY_MARKER};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
/// Hang detector for one batch of requests: a healthy backend answers in milliseconds.
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Hang detector for a process that should exit (an error at startup, a signal).
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------
// Which backend the I/O tests drive
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Ringfence,
    /// qemu-storage-daemon's vhost-user-blk export: the reference peer, to validate the tests.
    Qsd,
}

/// `RINGFENCE_IT_TARGET=qsd` points the I/O tests at qemu-storage-daemon; the default is ringfence.
pub fn target() -> Target {
    match std::env::var("RINGFENCE_IT_TARGET").as_deref() {
        Err(_) | Ok("") | Ok("ringfence") => Target::Ringfence,
        Ok("qsd") => Target::Qsd,
        Ok(other) => panic!("RINGFENCE_IT_TARGET={other}: expected 'ringfence' or 'qsd'"),
    }
}

/// The ringfence binary cargo built for these tests.
pub fn ringfence_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ringfence"))
}

// ------------------------------------------------------------------------------------------
// Data patterns
// ------------------------------------------------------------------------------------------

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `len` bytes of the pattern `seed` as it lies at disk offset `offset`: every 8-byte word
/// depends on the seed and its absolute position, so misplaced data never matches.
pub fn pattern(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let skip = (offset % 8) as usize;
    let words = (skip + len).div_ceil(8);
    let key = seed.wrapping_mul(0x1000_0000_01b3);
    let first = offset / 8;
    let mut out = vec![0u8; words * 8];
    for (i, chunk) in out.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&splitmix64(key ^ (first + i as u64)).to_le_bytes());
    }
    out.drain(..skip);
    out.truncate(len);
    out
}

/// Describe the first difference between two buffers that should be equal.
pub fn first_diff(what: &str, base: u64, got: &[u8], want: &[u8]) -> Option<String> {
    if got == want {
        return None;
    }
    if got.len() != want.len() {
        return Some(format!(
            "{what}: got {} bytes, expected {}",
            got.len(),
            want.len()
        ));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let mismatched = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some(format!(
        "{what}: first difference at disk offset {} (byte {i} of the buffer): got {:#04x}, \
         expected {:#04x}; {mismatched} of {} bytes differ",
        base + i as u64,
        got[i],
        want[i],
        got.len()
    ))
}

#[track_caller]
pub fn assert_same(what: &str, base: u64, got: &[u8], want: &[u8]) {
    if let Some(msg) = first_diff(what, base, got, want) {
        panic!("{msg}");
    }
}

/// Create `path` with `size` bytes: the pattern `seed`, or a sparse file of zeroes.
pub fn create_image(path: &Path, size: u64, seed: Option<u64>) {
    let f = File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    if let Some(seed) = seed {
        let chunk = MIB;
        let mut off = 0;
        while off < size {
            let n = chunk.min(size - off);
            f.write_all_at(&pattern(seed, off, n as usize), off)
                .expect("fill image");
            off += n;
        }
        f.sync_all().expect("sync image");
    }
}

/// Read bytes of an image file directly on the host.
pub fn read_file_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(path).expect("open image on the host");
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, off)
        .expect("read image on the host");
    buf
}

// ------------------------------------------------------------------------------------------
// Processes: bounded waits on exit
// ------------------------------------------------------------------------------------------

/// A pidfd: becomes readable when the process exits (child or not, reaped or not).
pub fn pidfd_open(pid: i32) -> OwnedFd {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        fd >= 0,
        "pidfd_open({pid}): {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the syscall just returned this fd to us; nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd as RawFd) }
}

/// Wait until `fd` is readable or `timeout` passes; true if readable.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is a valid pollfd for the duration of the call; nfds is 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return true;
        }
        if r == 0 {
            return false;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.kind(), std::io::ErrorKind::Interrupted, "poll: {e}");
    }
}

/// Wait (bounded) for process `pid` to exit; true if it did.
pub fn wait_pid_exit(pid: i32, timeout: Duration) -> bool {
    let fd = match pidfd_open_checked(pid) {
        Some(fd) => fd,
        None => return true, // already gone (and reaped)
    };
    wait_readable(fd.as_raw_fd(), timeout)
}

fn pidfd_open_checked(pid: i32) -> Option<OwnedFd> {
    // SAFETY: as in pidfd_open.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::ESRCH),
            "pidfd_open({pid}): {e}"
        );
        return None;
    }
    // SAFETY: the syscall just returned this fd to us; nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Send `sig` to `pid`.
pub fn send_signal(pid: i32, sig: i32) {
    // SAFETY: kill only sends a signal to a process we started; no memory is involved.
    let r = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        r,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// The result of running a process to its end.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

fn drain<R: Read + Send + 'static>(r: R) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = Vec::new();
        let mut r = r;
        let _ = r.read_to_end(&mut s);
        let _ = tx.send(String::from_utf8_lossy(&s).into_owned());
    });
    rx
}

/// Run `cmd` (stdin null, stdout and stderr captured) and wait at most `EXIT_TIMEOUT` for it to
/// exit; a process still running then is killed and the test fails.
pub fn run_to_exit(cmd: &mut Command) -> Finished {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    finish(&mut child, cmd)
}

fn finish(child: &mut Child, cmd: &Command) -> Finished {
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));
    let pidfd = pidfd_open(child.id() as i32);
    if !wait_readable(pidfd.as_raw_fd(), EXIT_TIMEOUT) {
        let _ = child.kill();
        let _ = child.wait();
        let stderr = err.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        panic!("{cmd:?} did not exit within {EXIT_TIMEOUT:?}; it was killed. stderr:\n{stderr}");
    }
    let status = child.wait().expect("wait");
    let stdout = out.recv_timeout(EXIT_TIMEOUT).unwrap_or_default();
    let stderr = err.recv_timeout(EXIT_TIMEOUT).unwrap_or_default();
    Finished {
        status,
        stdout,
        stderr,
    }
}

/// A ringfence process started by the test itself (for what `Daemon` cannot express, e.g.
/// `--fd`). Killed on drop.
pub struct Proc {
    pub child: Child,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    /// Spawn `cmd` with stderr captured and wait for the ready line (bounded).
    pub fn spawn_until_ready(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringfence");
        let pipe = child.stderr.take().expect("piped stderr");
        let stderr = Arc::new(Mutex::new(String::new()));
        let log = stderr.clone();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if line.contains(READY_MARKER) {
                    let _ = tx.send(());
                }
                let mut l = log.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut p = Proc { child, stderr };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let status = p.child.try_wait().ok().flatten();
            panic!(
                "ringfence did not become ready (exit status {status:?}); stderr:\n{}",
                p.stderr()
            );
        }
        p
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- ringfence stderr ---\n{}", self.stderr());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------------------
// Backends
// ------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
pub struct BackendOpts {
    pub size: u64,
    pub read_only: bool,
    pub num_queues: u16,
    /// Fill the image with `pattern(seed, ..)` before starting; `None`: a sparse zero image.
    pub fill_seed: Option<u64>,
    /// Extra ringfence options (ignored for qemu-storage-daemon).
    pub extra: Vec<String>,
    /// Where the image's temporary directory is made (default: the system temp dir).
    pub image_dir: Option<PathBuf>,
}

impl Default for BackendOpts {
    fn default() -> Self {
        BackendOpts {
            size: 32 * MIB,
            read_only: false,
            num_queues: 1,
            fill_seed: None,
            extra: Vec::new(),
            image_dir: None,
        }
    }
}

/// A backend serving an image in a temporary directory, on a socket next to it.
pub struct Backend {
    pub target: Target,
    pub opts: BackendOpts,
    pub image: PathBuf,
    pub socket: PathBuf,
    daemon: Option<Daemon>,
    last_stderr: String,
    // Last: the directory outlives the daemon using it.
    pub dir: tempfile::TempDir,
}

impl Backend {
    /// Create the image and start the backend selected by `RINGFENCE_IT_TARGET`.
    pub fn start(opts: BackendOpts) -> Backend {
        Self::start_on(target(), opts)
    }

    pub fn start_on(target: Target, opts: BackendOpts) -> Backend {
        let mut builder = tempfile::Builder::new();
        builder.prefix("ringfence-it");
        let dir = match &opts.image_dir {
            Some(root) => builder.tempdir_in(root),
            None => builder.tempdir(),
        }
        .expect("tempdir");
        let image = dir.path().join("disk.img");
        let socket = dir.path().join("vhost.sock");
        create_image(&image, opts.size, opts.fill_seed);
        let mut b = Backend {
            target,
            opts,
            image,
            socket,
            daemon: None,
            last_stderr: String::new(),
            dir,
        };
        b.launch();
        b
    }

    /// Start the backend again after `stop`.
    pub fn relaunch(&mut self) {
        self.launch();
    }

    fn launch(&mut self) {
        assert!(self.daemon.is_none());
        let d = match self.target {
            Target::Ringfence => {
                let mut args: Vec<String> = vec![
                    "--blk-file".into(),
                    self.image.display().to_string(),
                    "--num-queues".into(),
                    self.opts.num_queues.to_string(),
                ];
                if self.opts.read_only {
                    args.push("--read-only".into());
                }
                args.extend(self.opts.extra.iter().cloned());
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Daemon::ringfence_at(ringfence_bin(), &self.socket, &args)
            }
            Target::Qsd => Daemon::qemu_storage_daemon(
                &self.socket,
                &self.image,
                self.opts.read_only,
                self.opts.num_queues,
            ),
        };
        self.daemon = Some(d);
    }

    pub fn daemon(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("backend is running")
    }

    /// What the daemon wrote to stderr (ringfence only), including a previous run.
    pub fn stderr(&self) -> String {
        match &self.daemon {
            Some(d) => format!("{}{}", self.last_stderr, d.stderr()),
            None => self.last_stderr.clone(),
        }
    }

    /// SIGTERM, then wait (bounded) for the process to be gone. Returns the exit code
    /// (ringfence only; qemu-storage-daemon is not our child).
    pub fn stop(&mut self) -> Option<i32> {
        let d = self.daemon.take().expect("backend is running");
        let pid = d.pid();
        // The pidfd keeps naming this process even once it is gone and its pid reused.
        let pidfd = pidfd_open(pid);
        self.last_stderr.push_str(&d.stderr());
        match self.target {
            // Our child: it stays a zombie until reaped, so its pid cannot be reused; signal
            // it, wait (bounded), then terminate() only reaps it.
            Target::Ringfence => {
                send_signal(pid, libc::SIGTERM);
                self.wait_gone(&pidfd);
                d.terminate()
            }
            // Daemonized: terminate() sends the one SIGTERM and forgets the pid, so nothing
            // signals it again once it may have been reused.
            Target::Qsd => {
                let code = d.terminate();
                self.wait_gone(&pidfd);
                code
            }
        }
    }

    fn wait_gone(&self, pidfd: &OwnedFd) {
        assert!(
            wait_readable(pidfd.as_raw_fd(), EXIT_TIMEOUT),
            "{:?} backend did not exit within {EXIT_TIMEOUT:?} of SIGTERM; stderr:\n{}",
            self.target,
            self.last_stderr
        );
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn is_alive(&mut self) -> bool {
        self.daemon().is_alive()
    }

    pub fn connect(&self, opts: ClientOpts) -> Client {
        Client::connect(&self.socket, opts).unwrap_or_else(|e| {
            panic!(
                "connecting to the {:?} backend failed: {e} ({:?}); stderr:\n{}",
                self.target,
                e.errno(),
                self.stderr()
            )
        })
    }

    pub fn read_image(&self, off: u64, len: usize) -> Vec<u8> {
        read_file_at(&self.image, off, len)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if std::thread::panicking() && self.target == Target::Ringfence {
            eprintln!("--- ringfence stderr ---\n{}", self.stderr());
        }
    }
}

// ------------------------------------------------------------------------------------------
// blkio client
// ------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
pub struct ClientOpts {
    pub num_queues: usize,
    pub read_only: bool,
    /// Bytes of shared buffer memory per queue.
    pub buf_len: usize,
    /// Virtqueue size (blkio's default, 256, if `None`).
    pub queue_size: Option<i32>,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            num_queues: 1,
            read_only: false,
            buf_len: 4 * MIB as usize,
            queue_size: None,
        }
    }
}

/// A connected, started `virtio-blk-vhost-user` client with a buffer per queue in memory the
/// backend shares (a memfd mapped through the vhost-user memory table).
pub struct Client {
    // Queues first: dropped before the connection.
    pub queues: Vec<Queue>,
    pub blkio: Blkio,
}

impl Client {
    pub fn connect(socket: &Path, opts: ClientOpts) -> blkio::Result<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().expect("utf-8 socket path"))?;
        b.set_bool("read-only", opts.read_only)?;
        b.connect()?;
        b.set_i32("num-queues", opts.num_queues as i32)?;
        if let Some(n) = opts.queue_size {
            b.set_i32("queue-size", n)?;
        }
        let started = b.start()?;
        let region = b.alloc_mem_region(opts.num_queues * opts.buf_len)?;
        b.map_mem_region(&region)?;
        let queues = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| Queue {
                q,
                buf: (region.addr + i * opts.buf_len) as *mut u8,
                buf_len: opts.buf_len,
            })
            .collect();
        Ok(Client { queues, blkio: b })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").expect("capacity property")
    }

    pub fn q(&mut self) -> &mut Queue {
        &mut self.queues[0]
    }
}

/// One finished request: its user_data and return value (0 or a negative errno).
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub user_data: usize,
    pub ret: i32,
}

/// One queue and its buffer.
pub struct Queue {
    pub q: Blkioq,
    buf: *mut u8,
    buf_len: usize,
}

// SAFETY: the buffer is a private slice of the client's mapped region, used by this queue only;
// Blkioq is Send. Moving the pair to another thread is what a multi-queue application does.
unsafe impl Send for Queue {}

/// Where one segment of a vectored request lies in the queue's buffer.
fn iov_layout(segs: &[usize], buf_len: usize) -> Vec<usize> {
    // Start at an odd address and leave odd gaps, so no segment is aligned to anything.
    let mut pos = 1;
    let mut out = Vec::with_capacity(segs.len());
    for (i, &s) in segs.iter().enumerate() {
        out.push(pos);
        pos += s + 1 + 2 * (i % 3);
    }
    assert!(
        pos <= buf_len,
        "vectored request does not fit the test buffer"
    );
    out
}

impl Queue {
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: buf..buf+buf_len lies in a region this client mapped and keeps alive, and only
        // this queue uses it; &mut self prevents aliasing through this handle.
        unsafe { std::slice::from_raw_parts_mut(self.buf, self.buf_len) }
    }

    pub fn buf_ptr(&self, off: usize) -> *mut u8 {
        assert!(off <= self.buf_len);
        // SAFETY: off is within the buffer (checked above).
        unsafe { self.buf.add(off) }
    }

    pub fn buf_len(&self) -> usize {
        self.buf_len
    }

    /// Wait for `n` completions (bounded by `IO_TIMEOUT`: a hang fails the test).
    #[track_caller]
    pub fn wait(&mut self, n: usize) -> Vec<Done> {
        let mut out = Vec::with_capacity(n);
        let mut timeout = IO_TIMEOUT;
        while out.len() < n {
            let want = n - out.len();
            let mut c: Vec<MaybeUninit<Completion>> =
                (0..want).map(|_| MaybeUninit::uninit()).collect();
            match self.q.do_io(&mut c, want, Some(&mut timeout), None) {
                Ok(got) => {
                    for slot in &c[..got] {
                        // SAFETY: do_io initialised the first `got` entries.
                        let done = unsafe { slot.assume_init_ref() };
                        out.push(Done {
                            user_data: done.user_data,
                            ret: done.ret,
                        });
                    }
                }
                Err(e) if e.errno() == blkio::Errno::TIME => panic!(
                    "{} of {n} requests did not complete within {IO_TIMEOUT:?}: the backend hangs",
                    n - out.len()
                ),
                Err(e) => panic!("do_io failed: {e} ({:?})", e.errno()),
            }
        }
        out
    }

    #[track_caller]
    fn one(&mut self) -> Result<(), i32> {
        let d = self.wait(1);
        match d[0].ret {
            0 => Ok(()),
            e => Err(e),
        }
    }

    /// Write `data` at disk offset `off` from the start of the buffer.
    #[track_caller]
    pub fn write(&mut self, off: u64, data: &[u8]) -> Result<(), i32> {
        self.write_flags(off, data, ReqFlags::empty())
    }

    #[track_caller]
    pub fn write_flags(&mut self, off: u64, data: &[u8], flags: ReqFlags) -> Result<(), i32> {
        self.buf()[..data.len()].copy_from_slice(data);
        self.q.write(off, self.buf, data.len(), 0, flags);
        self.one()
    }

    #[track_caller]
    pub fn read(&mut self, off: u64, len: usize) -> Result<Vec<u8>, i32> {
        assert!(len <= self.buf_len);
        self.buf()[..len].fill(0xa5);
        self.q.read(off, self.buf, len, 0, ReqFlags::empty());
        self.one()?;
        Ok(self.buf()[..len].to_vec())
    }

    /// Vectored write of `data` split into segments of the given lengths, each at an odd,
    /// unaligned place in the buffer.
    #[track_caller]
    pub fn writev(&mut self, off: u64, segs: &[usize], data: &[u8]) -> Result<(), i32> {
        assert_eq!(segs.iter().sum::<usize>(), data.len());
        let at = iov_layout(segs, self.buf_len);
        let mut iov = Vec::with_capacity(segs.len());
        let mut d = 0;
        for (&s, &p) in segs.iter().zip(&at) {
            self.buf()[p..p + s].copy_from_slice(&data[d..d + s]);
            d += s;
            iov.push(libc::iovec {
                iov_base: self.buf_ptr(p).cast(),
                iov_len: s,
            });
        }
        self.q
            .writev(off, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
        let r = self.one();
        drop(iov); // the iovec array must outlive the request
        r
    }

    /// Vectored read into segments of the given lengths; returns the bytes in disk order.
    #[track_caller]
    pub fn readv(&mut self, off: u64, segs: &[usize]) -> Result<Vec<u8>, i32> {
        let at = iov_layout(segs, self.buf_len);
        let end = at.last().map_or(0, |p| p + segs[segs.len() - 1]);
        self.buf()[..end].fill(0x5a);
        let iov: Vec<libc::iovec> = segs
            .iter()
            .zip(&at)
            .map(|(&s, &p)| libc::iovec {
                iov_base: self.buf_ptr(p).cast(),
                iov_len: s,
            })
            .collect();
        self.q
            .readv(off, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
        let r = self.one();
        drop(iov);
        r?;
        let mut out = Vec::with_capacity(segs.iter().sum());
        for (&s, &p) in segs.iter().zip(&at) {
            out.extend_from_slice(&self.buf()[p..p + s]);
        }
        Ok(out)
    }

    #[track_caller]
    pub fn flush(&mut self) -> Result<(), i32> {
        self.q.flush(0, ReqFlags::empty());
        self.one()
    }

    #[track_caller]
    pub fn discard(&mut self, off: u64, len: u64) -> Result<(), i32> {
        self.q.discard(off, len, 0, ReqFlags::empty());
        self.one()
    }

    /// Write zeroes; `unmap` lets the device deallocate (no `BLKIO_REQ_NO_UNMAP`).
    #[track_caller]
    pub fn write_zeroes(&mut self, off: u64, len: u64, unmap: bool) -> Result<(), i32> {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        self.q.write_zeroes(off, len, 0, flags);
        self.one()
    }

    /// Submit all `(disk offset, buffer offset, len)` writes at once (blkio queues what does not
    /// fit the ring), then wait for all; returns each request's return value, in order.
    #[track_caller]
    pub fn write_many(&mut self, reqs: &[(u64, usize, usize)]) -> Vec<i32> {
        for (i, &(off, b, len)) in reqs.iter().enumerate() {
            assert!(b + len <= self.buf_len);
            self.q
                .write(off, self.buf_ptr(b), len, i, ReqFlags::empty());
        }
        self.collect(reqs.len())
    }

    /// Like `write_many`, for reads into the buffer.
    #[track_caller]
    pub fn read_many(&mut self, reqs: &[(u64, usize, usize)]) -> Vec<i32> {
        for (i, &(off, b, len)) in reqs.iter().enumerate() {
            assert!(b + len <= self.buf_len);
            self.q.read(off, self.buf_ptr(b), len, i, ReqFlags::empty());
        }
        self.collect(reqs.len())
    }

    #[track_caller]
    fn collect(&mut self, n: usize) -> Vec<i32> {
        let mut rets = vec![i32::MIN; n];
        for d in self.wait(n) {
            assert_eq!(
                rets[d.user_data],
                i32::MIN,
                "request {} completed twice",
                d.user_data
            );
            rets[d.user_data] = d.ret;
        }
        rets
    }
}

// ------------------------------------------------------------------------------------------
// Raw virtio-blk driver (virtio-driver's vhost-user transport and virtqueue, our own requests)
// ------------------------------------------------------------------------------------------

pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// Request header and status byte, in the queue memory the device can see.
#[derive(Clone, Copy)]
#[repr(C)]
struct RawReq {
    header: [u8; 16],
    status: u8,
}

type RawTransport = virtio_driver::VhostUser<virtio_driver::VirtioBlkConfig, RawReq>;

const RAW_QUEUE_SIZE: u16 = 16;
const RAW_BUF_LEN: usize = 1 << 20;

/// A minimal virtio-blk driver on one queue, for requests blkio will not send.
pub struct RawClient {
    // Field order matters: the virtqueue lives in memory owned by the transport.
    vq: virtio_driver::virtqueue::Virtqueue<'static, RawReq>,
    transport: RawTransport,
    buf: *mut u8,
    _buf_fd: OwnedFd,
}

impl RawClient {
    pub fn connect(socket: &Path) -> std::io::Result<RawClient> {
        Self::connect_without(socket, 0)
    }

    /// Connect, accepting every feature the driver knows but those in `unwanted` (bits).
    pub fn connect_without(socket: &Path, unwanted: u64) -> std::io::Result<RawClient> {
        use virtio_driver::{
            virtqueue::{Virtqueue, VirtqueueLayout},
            VirtioBlkFeatureFlags as B, VirtioFeatureFlags as V, VirtioTransport,
        };
        let want = V::VERSION_1.bits()
            | (B::SIZE_MAX
                | B::SEG_MAX
                | B::RO
                | B::BLK_SIZE
                | B::FLUSH
                | B::TOPOLOGY
                | B::CONFIG_WCE
                | B::MQ
                | B::DISCARD
                | B::WRITE_ZEROES)
                .bits();
        let want = want & !unwanted;
        let mut transport = RawTransport::new(socket.to_str().expect("utf-8 path"), want)?;
        let feats = V::from_bits_truncate(transport.get_features());
        let layout = VirtqueueLayout::new::<RawReq>(1, RAW_QUEUE_SIZE.into(), feats)?;
        let mem = transport.alloc_queue_mem(&layout)?;
        let (ptr, len) = (mem.as_mut_ptr(), mem.len());
        // SAFETY: the queue memory is an mmap owned by `transport`, which lives in the same
        // RawClient and is dropped after the virtqueue (field order); the mapping never moves.
        let mem: &'static mut [u8] = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
        let mut vq = Virtqueue::new(transport.iova_translator(), mem, RAW_QUEUE_SIZE, feats)?;
        vq.set_used_notif_enabled(true);
        transport.setup_queues(std::slice::from_ref(&vq))?;

        let name = CString::new("ringfence-it-raw").unwrap();
        // SAFETY: name is a valid C string; memfd_create returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        File::from(fd.try_clone()?).set_len(RAW_BUF_LEN as u64)?;
        // SAFETY: a fresh shared mapping of our own memfd; no existing memory is affected.
        let buf = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RAW_BUF_LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if buf == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        transport.map_mem_region(buf as usize, RAW_BUF_LEN, fd.as_raw_fd(), 0)?;
        Ok(RawClient {
            vq,
            transport,
            buf: buf.cast(),
            _buf_fd: fd,
        })
    }

    /// Features the device offered and we accepted.
    pub fn features(&self) -> u64 {
        use virtio_driver::VirtioTransport;
        self.transport.get_features()
    }

    /// The device's config space.
    pub fn config(&self) -> virtio_driver::VirtioBlkConfig {
        use virtio_driver::VirtioTransport;
        self.transport.get_config().expect("GET_CONFIG")
    }

    /// Send one request: `out` is the device-readable payload, `in_len` bytes come back.
    /// Returns the status byte and the bytes the device wrote.
    pub fn request(
        &mut self,
        req_type: u32,
        sector: u64,
        out: &[u8],
        in_len: usize,
    ) -> (u8, Vec<u8>) {
        use virtio_driver::VirtioTransport;
        assert!(out.len() + in_len <= RAW_BUF_LEN);
        // SAFETY: buf is our RAW_BUF_LEN-byte mapping, alive as long as self.
        let buf = unsafe { std::slice::from_raw_parts_mut(self.buf, RAW_BUF_LEN) };
        buf[..out.len()].copy_from_slice(out);
        buf[out.len()..out.len() + in_len].fill(0xee);
        let out_ptr = self.buf;
        // SAFETY: out.len() <= RAW_BUF_LEN (asserted above).
        let in_ptr = unsafe { self.buf.add(out.len()) };
        self.vq
            .add_request(|req, add| {
                req.header[..4].copy_from_slice(&req_type.to_le_bytes());
                req.header[4..8].fill(0);
                req.header[8..].copy_from_slice(&sector.to_le_bytes());
                req.status = 0xff;
                add(
                    libc::iovec {
                        iov_base: req.header.as_mut_ptr().cast(),
                        iov_len: 16,
                    },
                    false,
                )?;
                if !out.is_empty() {
                    add(
                        libc::iovec {
                            iov_base: out_ptr.cast(),
                            iov_len: out.len(),
                        },
                        false,
                    )?;
                }
                if in_len > 0 {
                    add(
                        libc::iovec {
                            iov_base: in_ptr.cast(),
                            iov_len: in_len,
                        },
                        true,
                    )?;
                }
                add(
                    libc::iovec {
                        iov_base: (&mut req.status as *mut u8).cast(),
                        iov_len: 1,
                    },
                    true,
                )
            })
            .expect("add request");
        self.transport
            .get_submission_notifier(0)
            .notify()
            .expect("kick");
        let call = self.transport.get_completion_fd(0);
        let deadline = Instant::now() + IO_TIMEOUT;
        loop {
            if let Some(c) = self.vq.completions().next() {
                let data = buf[out.len()..out.len() + in_len].to_vec();
                return (c.req.status, data);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                wait_readable(call.as_raw_fd(), left),
                "request type {req_type} did not complete within {IO_TIMEOUT:?}: the backend hangs"
            );
            let _ = call.read();
        }
    }
}

impl Drop for RawClient {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping; the device has its own mapping of the memfd.
        unsafe { libc::munmap(self.buf.cast(), RAW_BUF_LEN) };
    }
}

/// A discard / write-zeroes segment: sector, number of sectors, flags.
pub fn dwz_segment(sector: u64, num_sectors: u32, flags: u32) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&sector.to_le_bytes());
    v.extend_from_slice(&num_sectors.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// Print a line on the test's stdout (for helper processes).
pub fn say(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{line}");
    let _ = o.flush();
}

/// Run `f` on a thread of its own and wait at most `IO_TIMEOUT` for it: for clients whose own
/// waits are unbounded (the `vhost` crate's frontend retries a timed-out read forever). A hang
/// fails the test (the stuck thread is left behind).
#[track_caller]
pub fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(IO_TIMEOUT)
        .unwrap_or_else(|_| panic!("{what}: no answer within {IO_TIMEOUT:?}"))
}
