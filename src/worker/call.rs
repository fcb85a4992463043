//! Signalling the guest's call eventfd so that no signal ever blocks, whatever the VMM does.
//!
//! The VMM shares the call fd's open file description: it can clear `O_NONBLOCK` again at any
//! moment and fill the counter (write 2^64-2), and then our write of 1 sleeps until someone
//! reads the counter, while the worker holds the queue and vring locks (GET_VRING_BASE, the end
//! of the connection and SIGTERM's wait all need them). The kernel has no per-call "do not
//! wait" for an eventfd write: `pwritev2(RWF_NOWAIT)` fails with EOPNOTSUPP (eventfd has no
//! `write_iter`; so on 6.1 and on 6.18). Checking the counter or the flag first is a race the
//! VMM can win. So a write is made interruptible instead, and interrupted when it lasts:
//!
//! - every write is bracketed by a generation counter, odd while the write is in progress;
//! - a watchdog thread looks at every queue's counter every [`TICK`]; a write still in progress
//!   with the generation it saw at its previous look has lasted at least one tick (an eventfd
//!   write that does not block takes microseconds), and its thread gets [`interrupt_signal`],
//!   whose handler does nothing and which is installed without `SA_RESTART`: the sleeping write
//!   returns EINTR. The signal is sent again at every tick while the same write lasts, so one
//!   that lands just before the write starts sleeping cannot leave it asleep;
//! - the worker gives up a notification whose write failed and writes the call fd no more in
//!   that pass (`QueueState::notify`): a VMM that keeps its counter full delays its own guest by
//!   at most two ticks per pass, and nothing else.
//!
//! An idle daemon costs no wakeup: after a tick in which no queue wrote, the watchdog parks
//! until the next write starts (the writer wakes it; one futex wake after each idle spell).
//!
//! A stray signal (the write ended between the watchdog's look and its signal) interrupts
//! whatever the worker does next; every blocking call of the worker loop takes EINTR as "look
//! again" (epoll_wait, io_uring_enter, futex).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use log::{error, warn};

/// How often the watchdog looks: a write that blocks is interrupted within two ticks.
pub const TICK: Duration = Duration::from_millis(100);

/// One queue's call-fd writes, as the watchdog sees them.
#[derive(Debug, Default)]
pub struct CallWatch {
    /// Odd while a write is in progress; bumped before and after each write.
    generation: AtomicU64,
    /// The generation the watchdog saw at its previous look.
    seen: AtomicU64,
    /// Thread id of the worker that writes (0 until its first write).
    tid: AtomicI32,
}

static WATCHED: Mutex<Vec<Weak<CallWatch>>> = Mutex::new(Vec::new());
static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
/// The watchdog thread, to wake it.
static WATCHDOG: OnceLock<std::thread::Thread> = OnceLock::new();
/// The watchdog parks (no write since its last look) or is about to.
static PARKED: AtomicBool = AtomicBool::new(false);

/// The signal that interrupts a write that blocks (a real-time signal nothing else uses).
pub fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN() + 3
}

extern "C" fn on_interrupt(_sig: libc::c_int) {
    // Nothing to do: being delivered is what makes the sleeping write return EINTR.
}

/// Install the handler and start the watchdog, once per process. Call before the first worker
/// writes (from `Queues::new`, on a thread the worker allowlist does not restrict).
fn start() -> Result<(), String> {
    STARTED
        .get_or_init(|| {
            // SAFETY: an all-zero sigaction is a valid value of this plain C struct; we set a
            // handler that only returns, no SA_RESTART (so that a sleeping write is not
            // restarted), and sigaction copies it.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_interrupt as *const () as usize;
                sa.sa_flags = 0;
                libc::sigemptyset(&mut sa.sa_mask);
                if libc::sigaction(interrupt_signal(), &sa, std::ptr::null_mut()) != 0 {
                    return Err(format!(
                        "cannot install the call-fd interrupt handler: {}",
                        io::Error::last_os_error()
                    ));
                }
            }
            std::thread::Builder::new()
                .name("call-watchdog".into())
                .spawn(watchdog)
                .map(|h| {
                    let _ = WATCHDOG.set(h.thread().clone());
                })
                .map_err(|e| format!("cannot start the call-fd watchdog: {e}"))
        })
        .clone()
}

fn watchdog() {
    crate::sandbox::forbid_ring_registration_or_exit("call-watchdog");
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    loop {
        std::thread::sleep(TICK);
        if look(pid) {
            continue;
        }
        // Nothing written since the last look: park until a write starts. A writer bumps its
        // generation, then reads PARKED; we set PARKED, then look again (both SeqCst): either
        // we see its write here, or it sees PARKED and wakes us.
        PARKED.store(true, Ordering::SeqCst);
        if look(pid) {
            PARKED.store(false, Ordering::SeqCst);
            continue;
        }
        while PARKED.load(Ordering::SeqCst) {
            std::thread::park();
        }
    }
}

/// One look at every queue: interrupt a write that lasted a whole tick. Returns whether any
/// queue wrote since the previous look (or is writing).
fn look(pid: libc::pid_t) -> bool {
    let mut busy = false;
    let mut list = WATCHED.lock().unwrap_or_else(|p| p.into_inner());
    list.retain(|w| w.strong_count() > 0);
    for w in list.iter().filter_map(Weak::upgrade) {
        let g = w.generation.load(Ordering::SeqCst);
        let seen = w.seen.load(Ordering::Relaxed);
        let tid = w.tid.load(Ordering::Relaxed);
        if g & 1 == 1 && seen == g && tid > 0 {
            // SAFETY: tgkill to a thread of our own process, with a signal whose handler
            // only returns.
            unsafe {
                libc::syscall(libc::SYS_tgkill, pid, tid, interrupt_signal());
            }
        }
        busy |= g != seen || g & 1 == 1;
        w.seen.store(g, Ordering::Relaxed);
    }
    busy
}

/// A write starts: wake the watchdog if it parked.
fn wake_watchdog() {
    if PARKED.load(Ordering::SeqCst) && PARKED.swap(false, Ordering::SeqCst) {
        if let Some(t) = WATCHDOG.get() {
            t.unpark();
        }
    }
}

impl CallWatch {
    /// A watch the watchdog looks at for as long as it lives.
    pub fn new() -> Arc<CallWatch> {
        let w = Arc::new(CallWatch::default());
        if let Err(e) = start() {
            // Not expected (sigaction and thread creation are allowed here); the worker then
            // still sets O_NONBLOCK on every pass.
            error!("{e}: a VMM that fills its call eventfd can stall a queue");
        }
        WATCHED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&w));
        w
    }

    /// Add 1 to the eventfd `fd`. Returns at once if the fd is non-blocking, and within two
    /// [`TICK`]s (EINTR) if the VMM cleared `O_NONBLOCK` and filled the counter.
    pub fn signal(&self, fd: RawFd) -> io::Result<()> {
        if self.tid.load(Ordering::Relaxed) == 0 {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            self.tid.store(tid, Ordering::Relaxed);
        }
        let one = 1u64;
        self.generation.fetch_add(1, Ordering::SeqCst);
        wake_watchdog();
        // SAFETY: writes 8 bytes from `one`, which outlives the call, to an fd the vring owns.
        let n = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        let err = io::Error::last_os_error();
        self.generation.fetch_add(1, Ordering::SeqCst);
        match n {
            8 => Ok(()),
            n if n < 0 => Err(err),
            n => Err(io::Error::other(format!("a write of {n} bytes"))),
        }
    }
}

/// Log a notification that could not be delivered (the caller rate-limits).
pub fn warn_dropped(queue: u16, e: &io::Error, note: &str) {
    warn!(
        "queue {queue}: cannot signal the guest ({e}): the VMM's call eventfd is full (its \
         counter at the maximum); notification dropped{note}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A blocking eventfd whose counter the "VMM" filled: the write must come back with an
    /// error within a few ticks instead of sleeping until someone reads the counter.
    #[test]
    fn a_write_to_a_full_blocking_eventfd_is_interrupted() {
        // SAFETY: eventfd with no flags (blocking, as a hostile VMM leaves it).
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        assert!(fd >= 0);
        let full = 0xffff_ffff_ffff_fffe_u64;
        // SAFETY: an 8-byte write from `full`.
        assert_eq!(
            unsafe { libc::write(fd, (&full as *const u64).cast(), 8) },
            8
        );
        let w = CallWatch::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let t0 = Instant::now();
        let w2 = w.clone();
        std::thread::spawn(move || {
            let _ = tx.send(w2.signal(fd).map_err(|e| e.raw_os_error()));
        });
        let r = rx
            .recv_timeout(TICK * 20)
            .expect("the write to a full eventfd was never interrupted");
        assert_eq!(r, Err(Some(libc::EINTR)));
        assert!(t0.elapsed() < TICK * 20);
        // A write that can land lands.
        let mut v = 0u64;
        // SAFETY: an 8-byte read into `v`.
        assert_eq!(unsafe { libc::read(fd, (&mut v as *mut u64).cast(), 8) }, 8);
        w.signal(fd).expect("a write to an emptied eventfd");
        // SAFETY: closing the fd this test created.
        unsafe { libc::close(fd) };
    }
}
