//! The vhost-user message handling that is ringfence's own code: the request handler
//! (`ringfence::control::Device`, which the `vhost` crate's `BackendReqHandler` calls once it
//! has framed and decoded a message) for GET/SET_FEATURES, GET/SET_CONFIG, SET_MEM_TABLE (in
//! any region order), GET_VRING_BASE and GET/SET_INFLIGHT_FD, the config space behind
//! GET_CONFIG, and the fixed-buffer layout built from a memory table
//! (`FixedBufferMap::from_regions`).
//!
//! Each input is a device (read-only or not, 1-2 queues, queue size, topology) followed by a
//! script of up to 64 messages. A model of what the guest has been told (offered and acked
//! features, the write-cache setting) checks every answer, and that every refusal lets the
//! connection go on. SET_MEM_TABLE builds real guest memory (memfd-backed, possibly mapping
//! past the end of its file) and real restricted rings. Needs io_uring.
//!
//! Input layout (little-endian; reading past the end yields zeroes), see `seeds.py`:
//!   u8 device: bit0 read-only, bit1 two queues; u8 queue size 2^(1 + b % 10);
//!   u8 physical_block_exp % 4
//!   then messages, each a u8 opcode (b % 8) and its arguments:
//!     0 GET_FEATURES
//!     1 SET_FEATURES   u64 bits (bit 63 set: masked with the offered bits; clear: as is,
//!                      refused if it holds a bit that was not offered)
//!     2 GET_CONFIG     u32 offset, u32 size
//!     3 SET_CONFIG     u32 offset, u8 length (b % 4), that many bytes
//!     4 INFLIGHT       u8 b: queues (b >> 1) % 4, queue size 2^((b >> 3) % 16); bit0:
//!                      GET_INFLIGHT_FD then SET_INFLIGHT_FD with its fd; else
//!                      SET_INFLIGHT_FD with an unsealed memfd (refused)
//!     5 SET_MEM_TABLE  u8 flags (bit0: at the top of the address space, bit1: regions in
//!                      descending order), u8 count (b % 4), per region: u8 gap pages
//!                      (b % 16), u8 pages (1 + b % 8), u8 backing: bit0 a file of its own
//!                      size and offset (else one that fits), then u8 offset pages (b % 4)
//!                      and u8 file pages (b % 16)
//!     6 GET_VRING_BASE u8 queue index
//!     7 LAYOUT         u8 count (b % 5), per region u8 mode + u64 gpa, u64 len, u64 host,
//!                      then u64 max_buffer and 4 x (u64 gpa, u32 len) ranges to translate
//!     8 SET_LOG_BASE   u8 flags (bit0: sealed against shrinking), u16 file pages, u64 size,
//!                      u64 offset: accepted only for a sealed memfd whose range lies inside
//!                      it; a refusal ends the connection (it cannot be nacked)

#![no_main]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use ringfence::config::{
    config_read, serves_writeback, DeviceSpec, CONFIG_LEN, CONFIG_WRITEBACK_OFFSET,
};
use ringfence::control::Device;
use ringfence::guest_map::{FixedBufferMap, TranslateError, MAX_FIXED_BUFFERS};
use ringfence::image::{CacheMode, Image};
use ringfence::inflight::region_len;
use ringfence::queues::Queues;
use ringfence::stats::DeviceStats;
use ringfence::vring::Connection;
use ringfence::worker::Tuning;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserLog, VhostUserMemoryRegion,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::{Error as VhostUserError, Result as VhostUserResult};
use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

const PAGE: u64 = 4096;
const IMAGE_SIZE: u64 = 1 << 20;
const MAX_MESSAGES: usize = 64;

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.bytes::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The images, opened once per process: (writable, read-only). Their files are unlinked at
/// once; the open descriptors keep them alive.
fn images() -> &'static (Arc<Image>, Arc<Image>) {
    static IMAGES: OnceLock<(Arc<Image>, Arc<Image>)> = OnceLock::new();
    IMAGES.get_or_init(|| {
        if let Err(e) = ringfence::kernel::check_io_uring() {
            panic!("the vhost_messages target builds real rings and needs io_uring: {e}");
        }
        let open = |name: &str, read_only: bool| {
            let path: PathBuf = std::env::temp_dir()
                .join(format!("ringfence-fuzz-{}-{name}.img", std::process::id()));
            let _ = std::fs::remove_file(&path);
            File::create(&path)
                .and_then(|f| f.set_len(IMAGE_SIZE))
                .expect("create a scratch image");
            let img = Image::open(
                &path,
                None,
                read_only,
                Some(CacheMode::Writeback),
                Duration::ZERO,
                false,
            )
            .expect("open the scratch image");
            std::fs::remove_file(&path).expect("unlink the scratch image");
            Arc::new(img)
        };
        (open("rw", false), open("ro", true))
    })
}

/// What the guest has been told so far.
struct Model {
    read_only: bool,
    offered: u64,
    acked: u64,
    /// The guest's CONFIG_WCE choice, if it made one.
    choice: Option<bool>,
}

impl Model {
    /// The write cache served (virtio 1.2 §5.2.6), from the acked features (the offered
    /// ones before any were acked) and the guest's choice.
    fn writeback(&self) -> bool {
        let f = if self.acked == 0 {
            self.offered
        } else {
            self.acked
        };
        let has = |b: u32| f & (1u64 << b) != 0;
        serves_writeback(
            has(VIRTIO_BLK_F_FLUSH),
            has(VIRTIO_BLK_F_CONFIG_WCE),
            self.choice,
        )
    }
}

fuzz_target!(|data: &[u8]| run(data));

fn run(data: &[u8]) {
    let mut inp = Input(data);
    let dev = inp.u8();
    let read_only = dev & 1 != 0;
    let num_queues = 1 + u16::from(dev >> 1 & 1);
    let queue_size = 1u16 << (1 + inp.u8() % 10);
    let physical_block_exp = inp.u8() % 4;
    let (rw, ro) = images();
    let image = if read_only { ro.clone() } else { rw.clone() };
    // The images outlive one input, and the guest's write-cache choice belongs to the image
    // (it survives reconnects): a new input starts from what the last one left.
    let choice = image.write_cache.get();
    let spec = DeviceSpec {
        size_bytes: image.size(),
        read_only,
        num_queues,
        queue_size,
        serial: *b"fuzz-serial-00000000",
        physical_block_exp,
    };
    // One memory object shared by the queues and the "crate", as in the daemon.
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    // The daemon makes its rings once, at startup; here, once per input.
    let rings = ringfence::queues::make_ring_sets(&spec, &image).expect("the rings");
    let queues = Queues::new(
        spec.clone(),
        image,
        mem.clone(),
        Arc::new(|_| {}),
        Tuning {
            max_poll: Duration::from_micros(50),
            submit_batch: 8,
        },
        &DeviceStats::new(num_queues),
        ringfence::queues::Lent {
            rings,
            throttle: Arc::new(ringfence::throttle::Throttle::new(Default::default())),
        },
    )
    .map(Arc::new)
    .expect("create the queues");
    let conn = Connection::new();
    let mut device = Device::new(queues.clone(), mem.clone(), &conn).expect("create the device");
    let mut model = Model {
        read_only,
        offered: queues.features(),
        acked: 0,
        choice,
    };
    check_offer(&model, &spec);
    assert_eq!(queues.num_queues(), usize::from(num_queues));
    assert_eq!(queues.max_queue_size(), usize::from(queue_size));

    for _ in 0..MAX_MESSAGES {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 9 {
            0 => assert_eq!(device.get_features().expect("GET_FEATURES"), model.offered),
            1 => {
                let raw = inp.u64();
                let bits = if raw >> 63 != 0 {
                    raw & model.offered
                } else {
                    raw
                };
                let r = device.set_features(bits);
                assert_eq!(
                    r.is_ok(),
                    bits & !model.offered == 0,
                    "SET_FEATURES {bits:#x}"
                );
                goes_on(&mut device, r);
                if bits & !model.offered == 0 {
                    model.acked = bits;
                }
            }
            2 => {
                let (offset, size) = (inp.u32(), inp.u32());
                get_config(&mut device, &spec, &model, offset, size);
            }
            3 => {
                let offset = inp.u32();
                let len = usize::from(inp.u8() % 4);
                let buf: Vec<u8> = (0..len).map(|_| inp.u8()).collect();
                set_config(&mut device, &spec, &mut model, offset, &buf);
            }
            4 => inflight(&mut device, num_queues, inp.u8()),
            5 => set_mem_table(&mut device, &mut inp),
            6 => {
                let q = u32::from(inp.u8());
                let r = device.get_vring_base(q);
                assert_eq!(r.is_ok(), q < u32::from(num_queues), "GET_VRING_BASE {q}");
            }
            7 => layout(&mut inp),
            _ => set_log_base(&mut device, &mut inp),
        }
    }
}

/// A refused request is answered and the connection goes on; an accepted one leaves nothing
/// behind.
fn goes_on<T>(device: &mut Device, r: VhostUserResult<T>) {
    let e = match r {
        Ok(_) => VhostUserError::InvalidParam,
        Err(e) => {
            assert!(
                device.take_refused(&e),
                "a refusal ({e}) must let the connection go on"
            );
            return;
        }
    };
    assert!(
        !device.take_refused(&e),
        "an accepted request counted as refused"
    );
}

fn inflight(device: &mut Device, num_queues: u16, b: u8) {
    let nq = u16::from(b >> 1) % 4;
    let qs = 1u16 << ((b >> 3) % 16);
    let valid = nq >= 1 && nq <= num_queues;
    if b & 1 != 0 {
        let r = device.get_inflight_fd(&VhostUserInflight::new(0, 0, nq, qs));
        assert_eq!(r.is_ok(), valid, "GET_INFLIGHT_FD {nq} x {qs}");
        let Ok((reply, file)) = r else { return };
        assert_eq!(reply.mmap_size, region_len(nq, qs) as u64);
        assert_eq!((reply.num_queues, reply.queue_size), (nq, qs));
        let r = device.set_inflight_fd(&reply, file);
        assert!(r.is_ok(), "SET_INFLIGHT_FD of our own region: {r:?}");
        goes_on(device, r);
    } else {
        let len = region_len(nq.max(1), qs) as u64;
        let r = device.set_inflight_fd(&VhostUserInflight::new(len, 0, nq.max(1), qs), memfd(len));
        assert!(
            r.is_err(),
            "SET_INFLIGHT_FD of an unsealed memfd was accepted"
        );
        goes_on(device, r);
    }
}

fn set_log_base(device: &mut Device, inp: &mut Input) {
    let sealed = inp.u8() & 1 != 0;
    let file_len = u64::from(inp.u16()) * 4096;
    let (size, offset) = (inp.u64(), inp.u64());
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd is ours alone.
    let fd = unsafe { libc::memfd_create(c"ringfence-fuzz-log".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(file_len).expect("size the log memfd");
    if sealed {
        // SAFETY: fcntl F_ADD_SEALS on a memfd of ours (created with MFD_ALLOW_SEALING).
        let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0, "seal the log");
    }
    let r = device.set_log_base(&VhostUserLog::new(size, offset), file);
    if r.is_ok() {
        assert!(sealed, "an unsealed log was accepted");
        assert!(
            size > 0 && offset.checked_add(size).is_some_and(|end| end <= file_len),
            "a log of {size} bytes at offset {offset} of a {file_len}-byte file was accepted"
        );
    }
    if let Err(e) = r {
        assert!(
            !device.take_refused(&e),
            "a refused SET_LOG_BASE must end the connection (the VMM waits for its reply)"
        );
    }
}

fn check_offer(m: &Model, spec: &DeviceSpec) {
    let has = |b: u32| m.offered & (1u64 << b) != 0;
    assert!(has(VIRTIO_F_VERSION_1));
    assert_eq!(has(VIRTIO_BLK_F_RO), m.read_only);
    for b in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_CONFIG_WCE,
    ] {
        assert_eq!(has(b), !m.read_only, "feature bit {b}");
    }
    assert!(has(VIRTIO_BLK_F_MQ) || spec.num_queues == 1);
}

fn get_config(device: &mut Device, spec: &DeviceSpec, m: &Model, offset: u32, size: u32) {
    let got = device
        .get_config(offset, size, VhostUserConfigFlags::WRITABLE)
        .expect("GET_CONFIG answers");
    let space = spec.config_space(m.writeback());
    let inside = u64::from(offset) + u64::from(size) <= CONFIG_LEN as u64;
    if inside {
        let start = offset as usize;
        assert_eq!(got, &space[start..start + size as usize]);
    } else {
        assert!(
            got.is_empty(),
            "config read past the space answered {got:?}"
        );
    }
    assert_eq!(config_read(&space, offset, size).is_some(), inside);
    // The fields a driver reads.
    let cap = u64::from_le_bytes(space[0..8].try_into().expect("8 bytes"));
    assert_eq!(cap, spec.capacity_sectors());
    assert_eq!(space[CONFIG_WRITEBACK_OFFSET], u8::from(m.writeback()));
    let nq = u16::from_le_bytes(space[34..36].try_into().expect("2 bytes"));
    assert_eq!(nq, spec.num_queues);
    let seg_max = u32::from_le_bytes(space[12..16].try_into().expect("4 bytes"));
    assert!(seg_max >= 1 && seg_max <= u32::from(spec.queue_size));
    if spec.read_only {
        assert!(
            space[36..].iter().all(|&b| b == 0),
            "discard fields on a read-only disk"
        );
    }
}

fn set_config(device: &mut Device, spec: &DeviceSpec, m: &mut Model, offset: u32, buf: &[u8]) {
    let wce = m.acked & (1u64 << VIRTIO_BLK_F_CONFIG_WCE) != 0;
    let allowed = wce && offset as usize == CONFIG_WRITEBACK_OFFSET && buf.len() == 1;
    let res = device.set_config(offset, buf, VhostUserConfigFlags::WRITABLE);
    assert_eq!(
        res.is_ok(),
        allowed,
        "SET_CONFIG {offset} {buf:?} with wce={wce}"
    );
    goes_on(device, res);
    if allowed {
        m.choice = Some(buf[0] != 0);
    }
    let wb = device
        .get_config(
            CONFIG_WRITEBACK_OFFSET as u32,
            1,
            VhostUserConfigFlags::WRITABLE,
        )
        .expect("GET_CONFIG answers");
    assert_eq!(wb, vec![u8::from(m.writeback())]);
    assert!(!spec.read_only || !allowed);
}

fn memfd(len: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd is ours alone.
    let fd = unsafe { libc::memfd_create(c"ringfence-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size the memfd");
    f
}

fn set_mem_table(device: &mut Device, inp: &mut Input) {
    let flags = inp.u8();
    let n = inp.u8() % 4;
    let mut regions = Vec::new();
    let mut fits = true;
    for _ in 0..n {
        let gap = u64::from(inp.u8() % 16) * PAGE;
        let len = (1 + u64::from(inp.u8() % 8)) * PAGE;
        let backing = inp.u8();
        let (offset, file_len) = if backing & 1 != 0 {
            let offset = u64::from(inp.u8() % 4) * PAGE;
            let file_len = u64::from(inp.u8() % 16) * PAGE;
            fits &= offset + len <= file_len;
            (offset, file_len)
        } else {
            (0, len)
        };
        regions.push((gap, len, offset, memfd(file_len)));
    }
    let span: u64 = regions.iter().map(|(g, l, _, _)| g + l).sum();
    let mut at = if flags & 1 != 0 {
        (u64::MAX - span - PAGE + 1) & !(PAGE - 1)
    } else {
        0
    };
    let mut table = Vec::new();
    let mut files = Vec::new();
    let mut desc = Vec::new();
    for (gap, len, offset, file) in regions {
        at += gap;
        desc.push((at, len, offset));
        // The VMM's address of the region: anything, as long as the regions do not overlap.
        table.push(VhostUserMemoryRegion::new(at, len, at, offset));
        files.push(file);
        at += len;
    }
    if flags & 2 != 0 {
        table.reverse();
        files.reverse();
    }
    let res = device.set_mem_table(&table, files, None);
    // A region mapping past the end of its file would raise SIGBUS when touched: the table
    // must be refused, as must an empty one. Anything else, in any order, must be accepted
    // (and get restricted rings).
    assert_eq!(
        res.is_ok(),
        fits && n > 0,
        "SET_MEM_TABLE {desc:?} (flags {flags}): {res:?}"
    );
    goes_on(device, res);
}

/// Fixed-buffer layouts from arbitrary region tables, and translation through them.
fn layout(inp: &mut Input) {
    let n = inp.u8() % 5;
    let regions: Vec<(u64, u64, u64)> = (0..n)
        .map(|_| {
            let mode = inp.u8();
            let (gpa, len, host) = (inp.u64(), inp.u64(), inp.u64());
            // Mode bit0: small numbers (page-scaled), to make overlaps and adjacency likely.
            if mode & 1 != 0 {
                (gpa % 64 * PAGE, len % 16 * PAGE, host)
            } else {
                (gpa, len, host)
            }
        })
        .collect();
    // Keep the number of buffers bounded (from_regions builds them all before checking the
    // count), and never 0 (which would never finish splitting).
    let total: u128 = regions.iter().map(|r| u128::from(r.1)).sum();
    let floor = (total >> 15).max(1);
    let max_buffer = u128::from(inp.u64()).max(floor).min(u128::from(u64::MAX)) as u64;

    let res = FixedBufferMap::from_regions(regions.iter().copied(), max_buffer);

    // The expected verdict, computed independently.
    let overflow = regions
        .iter()
        .any(|&(g, l, h)| g.checked_add(l).is_none() || h.checked_add(l).is_none());
    let nonempty: Vec<_> = regions.iter().filter(|r| r.1 > 0).collect();
    let overlap = nonempty.iter().enumerate().any(|(i, a)| {
        nonempty[i + 1..]
            .iter()
            .any(|b| a.0 < b.0.wrapping_add(b.1) && b.0 < a.0.wrapping_add(a.1))
    });
    let count: u128 = regions
        .iter()
        .map(|r| u128::from(r.1).div_ceil(u128::from(max_buffer)))
        .sum();
    let expect_ok = !overflow && !overlap && count <= MAX_FIXED_BUFFERS as u128;
    assert_eq!(
        res.is_ok(),
        expect_ok,
        "{regions:?} max {max_buffer}: {res:?}"
    );
    let Ok(map) = res else { return };

    let bufs = map.buffers();
    assert_eq!(bufs.len() as u128, count);
    assert_eq!(u128::from(map.total_len()), total);
    for w in bufs.windows(2) {
        assert!(w[0].gpa + w[0].len <= w[1].gpa, "sorted and disjoint");
    }
    for b in bufs {
        assert!(b.len > 0 && b.len <= max_buffer);
        // Inside one region, at the matching host offset.
        assert!(regions
            .iter()
            .any(|&(g, l, h)| b.gpa >= g && b.gpa + b.len <= g + l && b.host == h + (b.gpa - g)));
    }

    for _ in 0..4 {
        let (gpa, len) = (inp.u64(), inp.u32());
        // Aim at the layout half of the time.
        let gpa = match bufs.get(gpa as usize % (bufs.len() + 1)) {
            Some(b) if len & 1 == 0 => b.gpa.wrapping_add(gpa >> 32),
            _ => gpa,
        };
        let mut pieces = Vec::new();
        match map.translate(gpa, len, |p| pieces.push(p)) {
            Ok(()) => {
                let mut cur = gpa;
                for p in &pieces {
                    let b = bufs[usize::from(p.buf_index)];
                    assert!(p.len > 0);
                    assert!(p.host >= b.host && p.host + u64::from(p.len) <= b.host + b.len);
                    assert_eq!(b.gpa + (p.host - b.host), cur);
                    cur += u64::from(p.len);
                }
                assert_eq!(cur - gpa, u64::from(len));
            }
            Err(TranslateError::Overflow { .. }) => {
                assert!(pieces.is_empty());
                assert!(gpa.checked_add(u64::from(len)).is_none());
            }
            Err(TranslateError::NotMapped(a)) => {
                assert!(pieces.is_empty());
                assert!(a >= gpa && a - gpa < u64::from(len));
                assert!(!bufs.iter().any(|b| a >= b.gpa && a - b.gpa < b.len));
            }
        }
    }
}
