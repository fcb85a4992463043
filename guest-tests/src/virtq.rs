//! A split virtqueue laid out by hand in guest RAM (virtio 1.x, 2.7): descriptor table,
//! available ring, used ring. The writer places whatever descriptors it is told to, valid or
//! not, and remembers every range it marked device-writable so that a test knows which guest
//! bytes the device may touch.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::frontend::{eventfd, eventfd_drain, eventfd_signal};
use crate::memory::GuestMemory;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One descriptor (16 bytes in memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: F_WRITE,
            next: 0,
        }
    }

    pub fn is_write(&self) -> bool {
        self.flags & F_WRITE != 0
    }

    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// An element of the used ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

/// Bytes of the descriptor table, available ring and used ring for `size` entries
/// (including the event-index fields).
pub fn ring_sizes(size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    (16 * n, 6 + 2 * n, 6 + 8 * n)
}

/// Total bytes one queue's rings take in the standard layout of [`SplitQueue::new`].
pub fn ring_footprint(size: u16) -> u64 {
    let (d, a, u) = ring_sizes(size);
    d + ((a + 3) & !3) + u
}

pub struct SplitQueue {
    /// Index of the vring on the vhost-user connection.
    pub index: u32,
    pub size: u16,
    /// Guest addresses of the three parts.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub kick: OwnedFd,
    pub call: OwnedFd,
    /// Next free descriptor slot (a simple cursor; wraps).
    free: u16,
    /// Our avail idx (published by [`SplitQueue::publish`]).
    pub avail_idx: u16,
    /// The used idx up to which we consumed entries.
    pub last_used: u16,
    /// Every `(gpa, len)` written with F_WRITE, in the table or in indirect tables.
    pub writable: Vec<(u64, u64)>,
    /// Every head ever made available (pushed).
    pub heads: Vec<u16>,
}

impl SplitQueue {
    /// Lay out a queue of `size` entries at `base` (16-byte aligned): descriptor table, then
    /// the available ring, then the used ring (4-byte aligned). Zeroes all three.
    pub fn new(mem: &GuestMemory, index: u32, size: u16, base: u64) -> SplitQueue {
        assert_eq!(base % 16, 0);
        let (d, a, u) = ring_sizes(size);
        let avail = base + d;
        let used = (avail + a + 3) & !3;
        mem.fill(base, (used + u - base) as usize, 0);
        SplitQueue {
            index,
            size,
            desc: base,
            avail,
            used,
            kick: eventfd(),
            call: eventfd(),
            free: 0,
            avail_idx: 0,
            last_used: 0,
            writable: Vec::new(),
            heads: Vec::new(),
        }
    }

    /// A queue whose three parts lie where the caller says (each part zeroed): e.g. each on a
    /// page of its own, so that a dirty log can tell them apart.
    pub fn at(
        mem: &GuestMemory,
        index: u32,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> SplitQueue {
        assert!(desc.is_multiple_of(16) && avail.is_multiple_of(2) && used.is_multiple_of(4));
        let (d, a, u) = ring_sizes(size);
        mem.fill(desc, d as usize, 0);
        mem.fill(avail, a as usize, 0);
        mem.fill(used, u as usize, 0);
        SplitQueue {
            index,
            size,
            desc,
            avail,
            used,
            kick: eventfd(),
            call: eventfd(),
            free: 0,
            avail_idx: 0,
            last_used: 0,
            writable: Vec::new(),
            heads: Vec::new(),
        }
    }

    /// Address of the used ring's `avail_event` field (VIRTIO_F_EVENT_IDX), after its ring.
    pub fn avail_event_gpa(&self) -> u64 {
        self.used + 4 + 8 * u64::from(self.size)
    }

    /// Address of the avail ring's `used_event` field (VIRTIO_F_EVENT_IDX), after its ring.
    pub fn used_event_gpa(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    pub fn desc_range(&self) -> (u64, u64) {
        (self.desc, ring_sizes(self.size).0)
    }

    pub fn avail_range(&self) -> (u64, u64) {
        (self.avail, ring_sizes(self.size).1)
    }

    pub fn used_range(&self) -> (u64, u64) {
        (self.used, ring_sizes(self.size).2)
    }

    /// Write descriptor `i` (which may lie past the table: the caller decides).
    pub fn write_desc(&mut self, mem: &GuestMemory, i: u16, d: Desc) {
        if d.is_write() {
            self.writable.push((d.addr, u64::from(d.len)));
        }
        mem.write(self.desc + 16 * u64::from(i), &d.bytes());
    }

    /// Write an indirect table at `gpa` exactly as given (flags and next untouched).
    pub fn write_table(&mut self, mem: &GuestMemory, gpa: u64, descs: &[Desc]) {
        for (i, d) in descs.iter().enumerate() {
            if d.is_write() {
                self.writable.push((d.addr, u64::from(d.len)));
            }
            mem.write(gpa + 16 * i as u64, &d.bytes());
        }
    }

    /// Reserve `n` consecutive descriptor slots; returns the first.
    pub fn alloc(&mut self, n: u16) -> u16 {
        assert!(
            n <= self.size,
            "test bug: {n} descriptors in a queue of {}",
            self.size
        );
        if u32::from(self.free) + u32::from(n) > u32::from(self.size) {
            self.free = 0;
        }
        let first = self.free;
        self.free = (self.free + n) % self.size;
        first
    }

    /// Write `segs` as a chain in fresh slots (F_NEXT and `next` filled in; other flags as
    /// given). Returns the head. Not yet made available.
    pub fn chain(&mut self, mem: &GuestMemory, segs: &[Desc]) -> u16 {
        let first = self.alloc(segs.len() as u16);
        for (i, s) in segs.iter().enumerate() {
            let idx = first + i as u16;
            let mut d = *s;
            if i + 1 < segs.len() {
                d.flags |= F_NEXT;
                d.next = idx + 1;
            }
            self.write_desc(mem, idx, d);
        }
        first
    }

    /// Write `segs` as an indirect table at `table` (chained 0→1→...), and one descriptor
    /// pointing at it. Returns the head.
    pub fn indirect(&mut self, mem: &GuestMemory, table: u64, segs: &[Desc]) -> u16 {
        let descs: Vec<Desc> = segs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut d = *s;
                if i + 1 < segs.len() {
                    d.flags |= F_NEXT;
                    d.next = i as u16 + 1;
                }
                d
            })
            .collect();
        self.write_table(mem, table, &descs);
        let head = self.alloc(1);
        self.write_desc(
            mem,
            head,
            Desc {
                addr: table,
                len: 16 * segs.len() as u32,
                flags: F_INDIRECT,
                next: 0,
            },
        );
        head
    }

    /// Put `head` in the next available-ring slot (not yet published).
    pub fn push(&mut self, mem: &GuestMemory, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_u16(slot, head);
        self.heads.push(head);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Address of the avail ring's idx field.
    pub fn avail_idx_gpa(&self) -> u64 {
        self.avail + 2
    }

    /// Make everything pushed so far visible to the device.
    pub fn publish(&self, mem: &GuestMemory) {
        mem.store_u16(self.avail_idx_gpa(), self.avail_idx);
    }

    /// Signal the kick eventfd.
    pub fn kick(&self) {
        eventfd_signal(self.kick.as_raw_fd());
    }

    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.load_u16(self.used + 2)
    }

    /// Take the next used element, if the device published one.
    pub fn pop_used(&mut self, mem: &GuestMemory) -> Option<Used> {
        if self.used_idx(mem) == self.last_used {
            return None;
        }
        let e = self.used + 4 + 8 * u64::from(self.last_used % self.size);
        let b = mem.read(e, 8);
        self.last_used = self.last_used.wrapping_add(1);
        Some(Used {
            id: u32::from_le_bytes(b[0..4].try_into().unwrap()),
            len: u32::from_le_bytes(b[4..8].try_into().unwrap()),
        })
    }

    /// Wait until the device publishes a used element or `deadline` passes. Wakes on the
    /// call eventfd, and re-checks the ring at least every 20 ms (a device that does not
    /// notify is still seen). If `abort` is given, returns early when that socket hangs up.
    pub fn wait_used(
        &mut self,
        mem: &GuestMemory,
        deadline: Instant,
        abort: Option<RawFd>,
    ) -> Option<Used> {
        loop {
            if let Some(u) = self.pop_used(mem) {
                return Some(u);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let step = (deadline - now).min(Duration::from_millis(20));
            let mut fds = vec![libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            if let Some(s) = abort {
                fds.push(libc::pollfd {
                    fd: s,
                    events: libc::POLLRDHUP,
                    revents: 0,
                });
            }
            // SAFETY: a valid array of pollfds.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, step.as_millis() as i32) };
            eventfd_drain(self.call.as_raw_fd());
            if fds.len() > 1 && fds[1].revents != 0 {
                // Last look: the device may have completed just before hanging up.
                return self.pop_used(mem);
            }
        }
    }
}
