//! The shutdown signals: blocked in every thread, received by the signal thread alone.

/// The signals that stop the daemon.
const SHUTDOWN: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// A set holding the shutdown signals.
fn shutdown_set() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value of this plain C type; sigemptyset and
    // sigaddset only write into the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SHUTDOWN {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Block SIGTERM/SIGINT/SIGHUP in this thread and every thread it creates from now on,
/// so that only the signal thread receives them.
pub fn block_signals() {
    let set = shutdown_set();
    // SAFETY: pthread_sigmask on the calling thread with a set we own.
    unsafe {
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Wait for SIGTERM, SIGINT or SIGHUP (which `block_signals` blocked) and return it.
pub fn wait_for_signal() -> i32 {
    let set = shutdown_set();
    let mut sig = 0;
    loop {
        // SAFETY: sigwait reads a set we own and writes the signal number into `sig`.
        if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
            return sig;
        }
    }
}
