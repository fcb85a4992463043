//! The filters, compiled and installed on real threads of this test process.

use super::*;

/// Run `f` on a fresh thread that first installs the worker filter.
fn in_worker<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        apply_worker_filter().expect("install worker filter");
        f()
    })
    .join()
    .expect("worker thread")
}

fn errno_of(rc: libc::c_long) -> i32 {
    if rc < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    } else {
        0
    }
}

#[test]
fn worker_cannot_create_rings_open_files_or_sockets() {
    let results = in_worker(|| {
        let mut params = [0u8; 120];
        // SAFETY: raw syscalls with valid pointers to buffers we own; they are expected
        // to be refused by the filter before the kernel looks at the arguments.
        unsafe {
            vec![
                (
                    "io_uring_setup",
                    errno_of(libc::syscall(
                        libc::SYS_io_uring_setup,
                        4,
                        params.as_mut_ptr(),
                    )),
                ),
                (
                    "io_uring_register",
                    errno_of(libc::syscall(libc::SYS_io_uring_register, 0, 0, 0, 0)),
                ),
                (
                    "openat",
                    errno_of(libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        c"/etc/hostname".as_ptr(),
                        libc::O_RDONLY,
                    )),
                ),
                (
                    "socket",
                    errno_of(libc::syscall(
                        libc::SYS_socket,
                        libc::AF_INET,
                        libc::SOCK_STREAM,
                        0,
                    )),
                ),
                (
                    "connect",
                    errno_of(libc::syscall(libc::SYS_connect, 0, 0, 0)),
                ),
                (
                    "execve",
                    errno_of(libc::syscall(libc::SYS_execve, c"/bin/true".as_ptr(), 0, 0)),
                ),
                (
                    "ptrace",
                    errno_of(libc::syscall(libc::SYS_ptrace, 0, 0, 0, 0)),
                ),
                (
                    "mmap(PROT_EXEC)",
                    errno_of(libc::syscall(
                        libc::SYS_mmap,
                        0,
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )),
                ),
            ]
        }
    });
    for (name, errno) in results {
        assert_eq!(
            errno,
            libc::EPERM,
            "{name} must be refused with EPERM in a worker"
        );
    }
}

#[test]
fn worker_keeps_what_the_loop_needs() {
    let efd = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
    let ok = in_worker(move || {
        let big = vec![7u8; 8 << 20];
        let fd = std::os::fd::AsRawFd::as_raw_fd(&efd);
        // SAFETY: fcntl on an eventfd we own.
        let nonblock = unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            fl >= 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
        };
        nonblock && efd.write(1).is_ok() && efd.read().is_ok() && big.iter().all(|&b| b == 7)
    });
    assert!(ok);
}

#[test]
fn filters_compile() {
    assert_eq!(process_filters().unwrap().len(), 2);
    assert!(!removal_filter().unwrap().is_empty());
    assert!(!worker_filter().unwrap().is_empty());
}

/// What src/vring.rs does on a worker: read the kick eventfd with preadv2(RWF_NOWAIT), and
/// shut a socket down (the connection of a VMM whose kick fd is a semaphore).
#[test]
fn worker_can_read_kicks_without_waiting_and_drop_a_connection() {
    let efd = vmm_sys_util::eventfd::EventFd::new(0).expect("eventfd");
    let (a, b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let (nowait, shut) = in_worker(move || {
        let mut v = 0u64;
        let iov = libc::iovec {
            iov_base: (&mut v as *mut u64).cast(),
            iov_len: 8,
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&efd);
        // SAFETY: one iovec of 8 bytes pointing at `v`, which we own.
        let rc = unsafe { libc::preadv2(fd, &iov, 1, -1, libc::RWF_NOWAIT) };
        let nowait = (rc, std::io::Error::last_os_error().raw_os_error());
        (nowait, a.shutdown(std::net::Shutdown::Both).is_ok())
    });
    // An empty eventfd without O_NONBLOCK: "would block", at once.
    assert_eq!(nowait, (-1, Some(libc::EAGAIN)));
    assert!(shut);
    let mut buf = [0u8; 1];
    assert_eq!(
        std::io::Read::read(&mut &b, &mut buf).unwrap(),
        0,
        "peer sees EOF"
    );
}
