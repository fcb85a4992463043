use super::*;

fn eventfd(flags: i32) -> File {
    // SAFETY: eventfd with valid flags; the result is checked and owned from here on.
    unsafe {
        let fd = libc::eventfd(0, flags | libc::EFD_CLOEXEC);
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        File::from_raw_fd(fd)
    }
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array; we own them from here on.
    unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
    }
}

fn write_u64(f: &File, v: u64) {
    use std::io::Write;
    (&*f).write_all(&v.to_ne_bytes()).expect("write");
}

fn vring() -> Vring {
    Vring::new(GuestMemoryAtomic::new(GuestMemoryMmap::new()), 256).expect("vring")
}

fn nonblocking(f: &File) -> bool {
    // SAFETY: F_GETFL on an fd we own.
    unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) & libc::O_NONBLOCK != 0 }
}

fn clear_nonblocking(fd: RawFd) {
    // SAFETY: F_GETFL/F_SETFL on an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        assert_eq!(libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK), 0);
    }
}

#[test]
fn only_eventfds_pass() {
    assert_eq!(check_eventfd(eventfd(0).as_raw_fd()), Ok(()));
    assert_eq!(
        check_eventfd(eventfd(libc::EFD_SEMAPHORE).as_raw_fd()),
        Ok(())
    );
    check_fd_inspection().expect("fd inspection works here");
    let (r, w) = pipe();
    for (f, kind) in [(&r, "a pipe"), (&w, "a pipe")] {
        let e = check_eventfd(f.as_raw_fd()).unwrap_err();
        assert!(e.starts_with(kind) && e.contains("pipe:["), "{e}");
    }
    let file = tempfile::tempfile().expect("tempfile");
    let e = check_eventfd(file.as_raw_fd()).unwrap_err();
    assert!(e.starts_with("a regular file"), "{e}");
    let (a, _b) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let e = check_eventfd(a.as_raw_fd()).unwrap_err();
    assert!(e.starts_with("a socket"), "{e}");
    let null = File::open("/dev/null").expect("/dev/null");
    let e = check_eventfd(null.as_raw_fd()).unwrap_err();
    assert!(e.starts_with("a character device"), "{e}");
    // Other anonymous-inode files share the eventfd's inode; the name tells them apart.
    let ep = vmm_sys_util::epoll::Epoll::new().expect("epoll");
    let e = check_eventfd(ep.as_raw_fd()).unwrap_err();
    assert!(e.contains("anon_inode:[eventpoll]"), "{e}");
    assert!(check_eventfd(-1).is_err());
}

#[test]
fn a_pipe_is_refused_and_drops_the_connection() {
    for role in ["kick", "call"] {
        let v = vring();
        let (r, w) = pipe();
        write_u64(&w, 1);
        let f = if role == "kick" { r } else { w };
        if role == "kick" {
            v.set_kick(Some(f));
            assert!(v.get_ref().get_kick().is_none(), "{role}: no fd kept");
            // Nothing to read, nothing blocks.
            assert!(!v.read_kick().unwrap());
        } else {
            v.set_call(Some(f));
            assert!(v.get_ref().get_call().is_none(), "{role}: no fd kept");
        }
        assert!(v.connection().refused(), "{role}: connection refused");
    }
}

#[test]
fn a_refusal_before_attach_is_carried_out_on_attach() {
    let conn = Connection::new();
    let v = conn.scope(vring);
    assert!(Arc::ptr_eq(v.connection(), &conn));
    v.set_kick(Some(tempfile::tempfile().unwrap()));
    assert!(conn.refused());
    // The vrings of another connection are not affected.
    let other = vring();
    assert!(!Arc::ptr_eq(other.connection(), &conn));
    assert!(!other.connection().refused());
}

#[test]
fn eventfds_are_kept_and_made_nonblocking() {
    let v = vring();
    v.set_enabled(true);
    let kick = eventfd(0);
    let call = eventfd(0);
    let (k, c) = (kick.try_clone().unwrap(), call.try_clone().unwrap());
    v.set_kick(Some(kick));
    v.set_call(Some(call));
    assert!(!v.connection().refused());
    assert!(nonblocking(&k) && nonblocking(&c));
    write_u64(&k, 1);
    assert!(v.read_kick().unwrap());
    assert_eq!(
        read_nowait(k.as_raw_fd()).unwrap(),
        None,
        "the kick was consumed"
    );
    v.signal_used_queue().expect("signal");
    assert_eq!(read_nowait(c.as_raw_fd()).unwrap(), Some(1));
}

/// The VMM shares the open file description and may clear O_NONBLOCK after handing the
/// fd over: reading an empty kick still returns at once.
#[test]
fn read_kick_does_not_block_when_the_vmm_clears_o_nonblock() {
    let v = vring();
    v.set_enabled(true);
    let kick = eventfd(0);
    let k = kick.try_clone().unwrap();
    v.set_kick(Some(kick));
    clear_nonblocking(k.as_raw_fd());
    let (tx, rx) = std::sync::mpsc::channel();
    let v2 = v.clone();
    std::thread::spawn(move || {
        let _ = tx.send(v2.read_kick().map_err(|e| e.to_string()));
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("read_kick blocked on an empty eventfd without O_NONBLOCK");
    assert_eq!(got, Ok(true));
}

#[test]
fn a_semaphore_kick_with_a_large_count_drops_the_connection() {
    let v = vring();
    v.set_enabled(true);
    let kick = eventfd(libc::EFD_SEMAPHORE);
    let k = kick.try_clone().unwrap();
    v.set_kick(Some(kick));
    assert!(
        !v.connection().refused(),
        "a semaphore eventfd is an eventfd"
    );
    write_u64(&k, u64::MAX - 1);
    let mut wakeups = 0;
    while !v.connection().refused() {
        wakeups += 1;
        assert!(
            wakeups <= CHECK_EVERY,
            "not recognised after {wakeups} wakeups"
        );
        let _ = v.read_kick();
    }
    // From then on the fd is not read again.
    assert!(!v.read_kick().unwrap());
    // A new kick fd is judged afresh.
    v.set_kick(Some(eventfd(0)));
    assert!(v.read_kick().unwrap());
}

#[test]
fn a_normal_kick_is_never_taken_for_a_semaphore() {
    let v = vring();
    v.set_enabled(true);
    let kick = eventfd(0);
    let k = kick.try_clone().unwrap();
    v.set_kick(Some(kick));
    for _ in 0..10 * CHECK_EVERY {
        write_u64(&k, 1);
        assert!(v.read_kick().unwrap());
    }
    assert!(!v.connection().refused());
}
