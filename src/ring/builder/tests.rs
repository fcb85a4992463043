use super::*;
use crate::ring::policy::{RegisterOp, RingPolicy};
use io_uring::{opcode, types};
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};

const IMAGE_LEN: usize = 64 << 10;

pub(crate) struct Fixture {
    pub ring: IoUring,
    _image: tempfile::NamedTempFile,
    pub image_fd: i32,
    pub buf: Vec<u8>,
    pub map: FixedBufferMap,
}

/// A ring built by `build_ring` over a 64 KiB image (byte i holds i % 253), then given one
/// fixed buffer over the first half of `buf` (after enabling, as the daemon does).
pub(crate) fn fixture(policy: &RingPolicy) -> Fixture {
    let mut image = tempfile::NamedTempFile::new().unwrap();
    let data: Vec<u8> = (0..IMAGE_LEN).map(|i| (i % 253) as u8).collect();
    image.write_all(&data).unwrap();
    image.flush().unwrap();
    let image_fd = image.as_file().as_raw_fd();
    // One fixed buffer over the first half of a heap allocation; the second half is
    // ordinary, unregistered memory.
    let buf = vec![0u8; 2 * IMAGE_LEN];
    let map = FixedBufferMap::from_regions(
        [(0, IMAGE_LEN as u64, buf.as_ptr() as u64)],
        crate::guest_map::MAX_FIXED_BUFFER,
    )
    .unwrap();
    let files = [(image_fd, "test image".to_string())];
    let ring = build_ring(&RingSetup {
        label: "test",
        entries: 8,
        files: &files,
        eventfd: None,
        policy,
    })
    .expect("build a restricted ring (is io_uring enabled?)");
    // SAFETY: `buf` lives in the returned Fixture beside the ring (and is dropped after it:
    // field order), and the tests touch it only while no SQE that names it is in flight.
    unsafe { register_buffers(&ring, &map) }.expect("register the buffer");
    Fixture {
        ring,
        _image: image,
        image_fd,
        buf,
        map,
    }
}

/// Submit one SQE and return its result.
pub(crate) fn run(ring: &mut IoUring, e: io_uring::squeue::Entry) -> i32 {
    // SAFETY: every SQE in these tests points at memory that outlives the wait below.
    unsafe { ring.submission().push(&e.user_data(7)).unwrap() };
    ring.submit_and_wait(1).unwrap();
    let cqe = ring.completion().next().expect("a completion");
    assert_eq!(cqe.user_data(), 7);
    cqe.result()
}

fn read_fixed(f: &Fixture, len: u32) -> io_uring::squeue::Entry {
    opcode::ReadFixed::new(types::Fixed(0), f.map.buffers()[0].host as *mut u8, len, 0)
        .offset(512)
        .build()
}

#[test]
fn allowed_read_fixed_works() {
    let mut f = fixture(&RingPolicy::for_device(false, false, false));
    let e = read_fixed(&f, 4096);
    assert_eq!(run(&mut f.ring, e), 4096);
    assert!(f.buf[..4096]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((i + 512) % 253) as u8));
}

#[test]
fn opcodes_outside_the_allowlist_complete_with_eacces() {
    let mut f = fixture(&RingPolicy::for_device(true, true, true));
    let buf = f.buf.as_mut_ptr();
    let path = c"/etc/hostname";
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 1u16.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    };
    let cases: Vec<(&str, io_uring::squeue::Entry)> = vec![
        ("READ", opcode::Read::new(types::Fixed(0), buf, 512).build()),
        (
            "WRITE",
            opcode::Write::new(types::Fixed(0), buf, 512).build(),
        ),
        (
            "READV",
            opcode::Readv::new(types::Fixed(0), std::ptr::null(), 0).build(),
        ),
        (
            "OPENAT",
            opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr()).build(),
        ),
        (
            "CONNECT",
            opcode::Connect::new(
                types::Fixed(0),
                &addr as *const _ as *const libc::sockaddr,
                std::mem::size_of_val(&addr) as u32,
            )
            .build(),
        ),
        (
            "SOCKET",
            opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0).build(),
        ),
        ("NOP", opcode::Nop::new().build()),
    ];
    // Each with IOSQE_FIXED_FILE, the flag the allowlist requires: the refusal must come
    // from the opcode allowlist itself, not from the missing flag.
    for (name, e) in cases {
        let e = e.flags(io_uring::squeue::Flags::FIXED_FILE);
        assert_eq!(run(&mut f.ring, e), -libc::EACCES, "{name} must be refused");
    }
    // The ring keeps working after refusals.
    let e = read_fixed(&f, 512);
    assert_eq!(run(&mut f.ring, e), 512);
}

#[test]
fn sqe_without_fixed_file_completes_with_eacces() {
    let mut f = fixture(&RingPolicy::for_device(true, true, true));
    let host = f.map.buffers()[0].host as *mut u8;
    let e = opcode::ReadFixed::new(types::Fd(f.image_fd), host, 512, 0).build();
    assert_eq!(run(&mut f.ring, e), -libc::EACCES);
    // Extra flags are refused too, even with FIXED_FILE.
    let e = read_fixed(&f, 512).flags(io_uring::squeue::Flags::IO_LINK);
    assert_eq!(run(&mut f.ring, e), -libc::EACCES);
}

#[test]
fn write_fixed_on_a_read_only_ring_completes_with_eacces() {
    let mut f = fixture(&RingPolicy::for_device(false, true, true));
    let host = f.map.buffers()[0].host as *const u8;
    let e = opcode::WriteFixed::new(types::Fixed(0), host, 512, 0).build();
    assert_eq!(run(&mut f.ring, e), -libc::EACCES);
    let e = opcode::Fsync::new(types::Fixed(0)).build();
    assert_eq!(run(&mut f.ring, e), -libc::EACCES);
    let e = opcode::Fallocate::new(types::Fixed(0), 512).build();
    assert_eq!(run(&mut f.ring, e), -libc::EACCES);
}

#[test]
fn read_fixed_outside_the_registered_buffers_fails_with_efault() {
    let mut f = fixture(&RingPolicy::for_device(false, false, false));
    // Unregistered memory just past the buffer, and a range straddling its end.
    // SAFETY: in bounds of `buf` (2 * IMAGE_LEN bytes).
    let past = unsafe { f.buf.as_mut_ptr().add(IMAGE_LEN) };
    let e = opcode::ReadFixed::new(types::Fixed(0), past, 512, 0).build();
    assert_eq!(run(&mut f.ring, e), -libc::EFAULT);
    // SAFETY: in bounds of `buf`.
    let straddle = unsafe { f.buf.as_mut_ptr().add(IMAGE_LEN - 256) };
    let e = opcode::ReadFixed::new(types::Fixed(0), straddle, 512, 0).build();
    assert_eq!(run(&mut f.ring, e), -libc::EFAULT);
    // A buffer index that does not exist, and a file index that does not exist.
    let host = f.map.buffers()[0].host as *mut u8;
    let e = opcode::ReadFixed::new(types::Fixed(0), host, 512, 1).build();
    assert_eq!(run(&mut f.ring, e), -libc::EFAULT);
    let e = opcode::ReadFixed::new(types::Fixed(1), host, 512, 0).build();
    assert_eq!(run(&mut f.ring, e), -libc::EBADF);
}

#[test]
fn vectored_fixed_reads_stay_inside_their_buffer() {
    if !crate::kernel::Kernel::get().vectored_fixed {
        eprintln!("kernel without READV_FIXED: nothing to test");
        return;
    }
    let mut f = fixture(&RingPolicy::for_device(true, false, false).with_vectored());
    let base = f.map.buffers()[0].host;
    let iov = [
        libc::iovec {
            iov_base: (base + 4096) as *mut libc::c_void,
            iov_len: 512,
        },
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: 1024,
        },
    ];
    let e = opcode::ReadvFixed::new(types::Fixed(0), iov.as_ptr(), 2, 0)
        .offset(0)
        .build();
    assert_eq!(run(&mut f.ring, e), 1536);
    assert!(f.buf[4096..4608]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == (i % 253) as u8));
    assert!(f.buf[..1024]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((i + 512) % 253) as u8));
    // One iovec past the registered buffer: the kernel refuses the whole request.
    let bad = [
        libc::iovec {
            iov_base: base as *mut libc::c_void,
            iov_len: 512,
        },
        libc::iovec {
            iov_base: (base + IMAGE_LEN as u64) as *mut libc::c_void,
            iov_len: 512,
        },
    ];
    let e = opcode::ReadvFixed::new(types::Fixed(0), bad.as_ptr(), 2, 0).build();
    assert_eq!(run(&mut f.ring, e), -libc::EFAULT);
    // Without the vectored opcodes in the policy they are refused.
    let mut g = fixture(&RingPolicy::for_device(false, false, false));
    let e = opcode::ReadvFixed::new(types::Fixed(0), iov.as_ptr(), 2, 0).build();
    assert_eq!(run(&mut g.ring, e), -libc::EACCES);
}

/// `io_uring_register(ring, op, NULL, 0)` for every opcode 0..64 but `allowed`: the errno
/// of each. The restriction check comes before any argument is looked at, so a refused
/// opcode answers EACCES and an opcode past the kernel's last answers EINVAL.
pub(crate) fn register_errnos(ring: &IoUring, allowed: &[u8]) -> Vec<(u32, i32)> {
    (0u32..64)
        .filter(|op| !allowed.contains(&(*op as u8)))
        .map(|op| {
            // SAFETY: a null argument with a zero count: the kernel reads and writes
            // nothing when it refuses the opcode.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_register,
                    ring.as_raw_fd(),
                    op,
                    std::ptr::null_mut::<libc::c_void>(),
                    0,
                )
            };
            let errno = if rc < 0 {
                io::Error::last_os_error().raw_os_error().unwrap_or(0)
            } else {
                0
            };
            (op, errno)
        })
        .collect()
}

/// Every register opcode the kernel knows is refused with EACCES (opcodes past its last
/// with EINVAL): a run of EACCES, then only EINVAL. Linux 6.1 already knows 26 opcodes, 7.2
/// knows 38; each kernel of the matrix must refuse all of its own.
pub(crate) fn assert_every_register_opcode_refused(ring: &IoUring, allowed: &[u8]) {
    let got = register_errnos(ring, allowed);
    let known = got.iter().filter(|(_, e)| *e == libc::EACCES).count();
    eprintln!(
        "register opcodes refused with EACCES: {known}; past the kernel's last (EINVAL): {}",
        got.len() - known
    );
    let first_unknown = got
        .iter()
        .position(|(_, e)| *e != libc::EACCES)
        .unwrap_or(got.len());
    assert!(
        known >= 24 && got[first_unknown..].iter().all(|(_, e)| *e == libc::EINVAL),
        "register opcodes not refused (opcode, errno): {:?}",
        got.iter()
            .filter(|(_, e)| *e != libc::EACCES && *e != libc::EINVAL)
            .chain(
                got[first_unknown..]
                    .iter()
                    .filter(|(_, e)| *e != libc::EINVAL)
            )
            .collect::<Vec<_>>()
    );
}

#[test]
fn every_register_opcode_but_the_buffer_swap_is_refused_after_enabling() {
    let f = fixture(&RingPolicy::for_device(true, true, true));
    let swap = [
        RegisterOp::Buffers.code(),
        RegisterOp::UnregisterBuffers.code(),
    ];
    assert_every_register_opcode_refused(&f.ring, &swap);
}

/// An enabled ring swaps its guest RAM (as for a new memory table) and can do nothing else:
/// no file, eventfd, personality, restrictions or enabling. After the swap, reads land in the
/// new buffer and the old one is out of reach.
#[test]
fn an_enabled_ring_swaps_its_buffers_and_registers_nothing_else() {
    let mut f = fixture(&RingPolicy::for_device(true, true, true));
    let s = f.ring.submitter();
    let refused = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{what}: {e}");
    };
    refused(s.unregister_files(), "UNREGISTER_FILES");
    refused(s.register_files(&[0]), "REGISTER_FILES");
    refused(
        s.register_files_update(0, &[0]).map(drop),
        "REGISTER_FILES_UPDATE",
    );
    refused(s.register_eventfd(0), "REGISTER_EVENTFD");
    refused(s.register_personality().map(drop), "REGISTER_PERSONALITY");
    refused(s.register_enable_rings(), "ENABLE_RINGS");
    refused(
        s.register_restrictions(&mut RingPolicy::for_device(true, true, true).restrictions()),
        "REGISTER_RESTRICTIONS",
    );
    let mut probe = io_uring::Probe::new();
    refused(s.register_probe(&mut probe), "REGISTER_PROBE");

    // While buffers are registered, a second set is refused (EBUSY), never added.
    let extra = vec![0u8; 2 * IMAGE_LEN];
    let map = FixedBufferMap::from_regions(
        [(0, IMAGE_LEN as u64, extra.as_ptr() as u64)],
        crate::guest_map::MAX_FIXED_BUFFER,
    )
    .unwrap();
    // SAFETY: `extra` outlives the ring (dropped after `f` at the end of the test).
    let busy = unsafe { register_buffers(&f.ring, &map) }.expect_err("a second set");
    assert!(
        busy.to_string().contains("Device or resource busy"),
        "{busy}"
    );
    unregister_buffers(&f.ring).expect("UNREGISTER_BUFFERS");
    unregister_buffers(&f.ring).expect("nothing registered: nothing to do");
    // SAFETY: as above.
    unsafe { register_buffers(&f.ring, &map) }.expect("REGISTER_BUFFERS after enabling");
    let host = extra.as_ptr() as *mut u8;
    let e = opcode::ReadFixed::new(types::Fixed(0), host, 4096, 0)
        .offset(512)
        .build();
    assert_eq!(run(&mut f.ring, e), 4096, "a read into the new buffer");
    assert!(extra[..4096]
        .iter()
        .enumerate()
        .all(|(i, &b)| b == ((i + 512) % 253) as u8));
    // The old buffer is no longer registered: the kernel refuses an SQE that names it.
    let old = opcode::ReadFixed::new(types::Fixed(0), f.buf.as_mut_ptr(), 4096, 0).build();
    assert_eq!(run(&mut f.ring, old), -libc::EFAULT, "the old buffer");
    drop(f);
    drop(extra);
}

/// The image as the daemon opens it: O_DIRECT where the filesystem allows it, and through
/// the page cache. Returns (the image, which must outlive both, O_DIRECT, page cache).
fn image_opened_twice(data: &[u8]) -> (tempfile::NamedTempFile, std::fs::File, std::fs::File) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut image = tempfile::NamedTempFile::new().unwrap();
    image.write_all(data).unwrap();
    image.flush().unwrap();
    let path = image.path().to_path_buf();
    let direct = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path);
    // tmpfs before 6.6 refuses O_DIRECT: the daemon then uses the page cache for both.
    let primary = direct.unwrap_or_else(|_| {
        std::fs::File::options()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap()
    });
    let buffered = std::fs::File::options()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    (image, primary, buffered)
}

/// A shared mapping of a fresh memfd of `len` bytes, like guest RAM (the caller unmaps it).
fn shared_ram(len: usize) -> *mut libc::c_void {
    // SAFETY: memfd_create with a valid name; the fd is owned from here on.
    let memfd = unsafe {
        std::os::fd::OwnedFd::from_raw_fd(libc::memfd_create(c"rf-ram".as_ptr(), libc::MFD_CLOEXEC))
    };
    let ram = std::fs::File::from(memfd);
    ram.set_len(len as u64).unwrap();
    // SAFETY: a fresh shared mapping of our own memfd (it stays after the fd is closed).
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            ram.as_raw_fd(),
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED);
    host
}

/// What the daemon registers, as it registers it: the default policy of a writable disk
/// with every feature (plus the vectored opcodes where the kernel has them), the image
/// twice (O_DIRECT and page cache), and buffers in a shared memfd mapping like guest RAM.
#[test]
fn the_daemons_default_ring_serves_both_files_from_shared_memory_and_nothing_else() {
    let data: Vec<u8> = (0..IMAGE_LEN).map(|i| (i % 253) as u8).collect();
    let (_image, primary, buffered) = image_opened_twice(&data);
    let host = shared_ram(2 * IMAGE_LEN);
    let map = FixedBufferMap::from_regions(
        [(0, 2 * IMAGE_LEN as u64, host as u64)],
        crate::guest_map::MAX_FIXED_BUFFER,
    )
    .unwrap();
    let mut policy = RingPolicy::for_device(true, true, true);
    if crate::kernel::Kernel::get().vectored_fixed {
        policy = policy.with_vectored();
    }
    let files = [
        (primary.as_raw_fd(), "image (O_DIRECT)".to_string()),
        (buffered.as_raw_fd(), "image (page cache)".to_string()),
    ];
    let mut ring = build_ring(&RingSetup {
        label: "default",
        entries: 8,
        files: &files,
        eventfd: None,
        policy: &policy,
    })
    .expect("the daemon's default ring");
    // SAFETY: the mapping stays until the munmap below, after the ring is dropped.
    unsafe { register_buffers(&ring, &map) }.expect("guest RAM");
    let base = host as *mut u8;
    for file in [0, 1] {
        let e = opcode::ReadFixed::new(types::Fixed(file), base, 4096, 0)
            .offset(4096)
            .build()
            .flags(io_uring::squeue::Flags::FIXED_FILE);
        assert_eq!(run(&mut ring, e), 4096, "READ_FIXED from fixed file {file}");
        // SAFETY: inside the mapping; the read has completed.
        let got = unsafe { std::slice::from_raw_parts(base, 4096) };
        assert_eq!(got, &data[4096..8192]);
    }
    let e = opcode::WriteFixed::new(types::Fixed(1), base, 4096, 0)
        .offset(0)
        .build()
        .flags(io_uring::squeue::Flags::FIXED_FILE);
    assert_eq!(run(&mut ring, e), 4096, "WRITE_FIXED");
    let e = opcode::Fsync::new(types::Fixed(0))
        .build()
        .flags(io_uring::squeue::Flags::FIXED_FILE);
    assert_eq!(run(&mut ring, e), 0, "FSYNC");
    // A third file does not exist; other opcodes are refused even with FIXED_FILE.
    let e = opcode::ReadFixed::new(types::Fixed(2), base, 512, 0)
        .build()
        .flags(io_uring::squeue::Flags::FIXED_FILE);
    assert_eq!(run(&mut ring, e), -libc::EBADF);
    let e = opcode::Read::new(types::Fixed(0), base, 512)
        .build()
        .flags(io_uring::squeue::Flags::FIXED_FILE);
    assert_eq!(run(&mut ring, e), -libc::EACCES);
    let e = opcode::Nop::new()
        .build()
        .flags(io_uring::squeue::Flags::FIXED_FILE);
    assert_eq!(run(&mut ring, e), -libc::EACCES);
    drop(ring);
    // SAFETY: unmapping our own mapping; the ring that used it is gone.
    unsafe { libc::munmap(host, 2 * IMAGE_LEN) };
}

#[test]
fn restrictions_cannot_be_installed_on_an_enabled_or_plain_ring() {
    let mut r = RingPolicy::for_device(false, false, false).restrictions();
    // A ring created without R_DISABLED: the kernel refuses restrictions (EBADFD).
    let plain = IoUring::new(4).unwrap();
    let e = plain
        .submitter()
        .register_restrictions(&mut r)
        .expect_err("restrictions on a plain ring");
    assert_eq!(e.raw_os_error(), Some(libc::EBADFD), "{e}");
    // A ring created R_DISABLED and enabled without restrictions: too late (EBADFD).
    let late: IoUring = IoUring::builder().setup_r_disabled().build(4).unwrap();
    late.submitter().register_enable_rings().unwrap();
    let e = late
        .submitter()
        .register_restrictions(&mut r)
        .expect_err("restrictions on an enabled ring");
    assert_eq!(e.raw_os_error(), Some(libc::EBADFD), "{e}");
    // A restricted ring: a second allowlist is refused (EACCES: REGISTER_RESTRICTIONS is
    // not among its register opcodes).
    let f = fixture(&RingPolicy::for_device(false, false, false));
    let e = f
        .ring
        .submitter()
        .register_restrictions(&mut r)
        .expect_err("a second allowlist");
    assert_eq!(e.raw_os_error(), Some(libc::EACCES), "{e}");
}
