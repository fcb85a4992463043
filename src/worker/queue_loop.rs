//! One queue's worker thread: an epoll loop over the guest's kick eventfd, the queue's
//! completion eventfd (its rings signal it), a wake eventfd (the control thread asks the worker
//! to look at the queue: it was started or enabled, or has requests to resubmit) and an exit
//! eventfd. Every event ends in [`Serve::serve`] (`crate::queues::Queues` implements it),
//! which does the work; the worker names no type above it. While the I/O limits hold a request
//! back, the epoll wait has a timeout: the time the limits let it go.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use log::debug;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::Vring;

/// What a queue's loop serves: implemented by the queues of a connection.
pub trait Serve {
    /// Once on the worker thread, before its first event (its sandbox).
    fn init_thread(&self, index: usize);
    /// Queue `index` has an event: a kick, a completion (`completion`), or a request to look.
    /// Nothing is done once `exiting` is raised. Returns when to look again without an event
    /// (a request the I/O limits hold back), if ever.
    fn serve(
        &self,
        index: usize,
        vring: &Vring,
        completion: bool,
        exiting: &AtomicBool,
    ) -> Option<Instant>;
}

const EV_KICK: u64 = 0;
const EV_EXIT: u64 = 1;
const EV_WAKE: u64 = 2;
const EV_COMPLETION: u64 = 3;

/// The control thread's handle on one queue's worker loop.
pub struct QueueLoop {
    epoll: Epoll,
    exit: EventFd,
    wake: EventFd,
    /// The kick fd registered with the epoll now, if any.
    kick: Mutex<Option<RawFd>>,
    /// Raised by [`QueueLoop::exit`]: the worker serves nothing more, not even a pass that was
    /// waiting for the queue lock.
    exiting: AtomicBool,
}

impl QueueLoop {
    /// A loop that watches `completion_fd` (the queue's rings' eventfd).
    pub fn new(completion_fd: RawFd) -> io::Result<QueueLoop> {
        let epoll = Epoll::new()?;
        let exit = EventFd::new(EFD_NONBLOCK)?;
        let wake = EventFd::new(EFD_NONBLOCK)?;
        for (fd, id) in [
            (exit.as_raw_fd(), EV_EXIT),
            (wake.as_raw_fd(), EV_WAKE),
            (completion_fd, EV_COMPLETION),
        ] {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, id))?;
        }
        Ok(QueueLoop {
            epoll,
            exit,
            wake,
            kick: Mutex::new(None),
            exiting: AtomicBool::new(false),
        })
    }

    /// Watch `fd` as the queue's kick fd (None: watch none), and have the worker look at the
    /// queue at once, so that requests made available before the kick fd was watched are
    /// not left waiting for another kick.
    pub fn watch_kick(&self, fd: Option<RawFd>) -> io::Result<()> {
        let mut cur = self.kick.lock().unwrap_or_else(|p| p.into_inner());
        if *cur == fd {
            return Ok(());
        }
        if let Some(old) = cur.take() {
            // The fd may already be closed (replaced): then the kernel dropped it already.
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                old,
                EpollEvent::new(EventSet::IN, EV_KICK),
            );
        }
        if let Some(new) = fd {
            self.epoll.ctl(
                ControlOperation::Add,
                new,
                EpollEvent::new(EventSet::IN, EV_KICK),
            )?;
            *cur = Some(new);
            self.wake();
        }
        Ok(())
    }

    /// Have the worker look at its queue.
    pub fn wake(&self) {
        let _ = self.wake.write(1);
    }

    /// End the worker loop (after the event it is handling, if any).
    pub fn exit(&self) {
        self.exiting.store(true, Ordering::Release);
        let _ = self.exit.write(1);
    }

    /// The worker thread's body: serve queue `index` of `queues` until [`QueueLoop::exit`].
    pub fn run(&self, queues: &dyn Serve, index: usize, vring: &Vring) {
        queues.init_thread(index);
        let mut events = vec![EpollEvent::default(); 8];
        // When to look again without an event: the I/O limits let a held request go then.
        let mut deadline: Option<Instant> = None;
        loop {
            let timeout = deadline.map_or(-1, |d| {
                let left = d.saturating_duration_since(Instant::now());
                // Whole milliseconds, rounded up: never woken before the time.
                i32::try_from(left.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX)
            });
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Not expected; ending the loop would leave the queue unserved for good.
                    debug!("queue {index}: epoll_wait: {e}");
                    continue;
                }
            };
            // Woken by the timeout alone: the held request's time has come.
            let mut look = n == 0 && deadline.is_some();
            let mut completion = false;
            for ev in &events[..n] {
                match ev.data() {
                    EV_EXIT => return,
                    EV_KICK => {
                        // False while the queue is disabled: the kick is consumed, not acted on.
                        look |= vring.take_kick();
                    }
                    EV_WAKE => {
                        let _ = self.wake.read();
                        look = true;
                    }
                    EV_COMPLETION => {
                        completion = true;
                        look = true;
                    }
                    _ => {}
                }
            }
            if look {
                deadline = queues.serve(index, vring, completion, &self.exiting);
            }
        }
    }
}
