//! The control handler's decisions, driven as the `vhost` crate's handler drives [`Device`]
//! (and as `fuzz/fuzz_targets/vhost_messages.rs` does): a real device on a real image, with
//! real memfd-backed guest RAM and restricted rings. Needs io_uring.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::{
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserSingleMemoryRegion,
    VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Error as VhostUserError, VhostUserBackendReqHandlerMut};
use vhost_user_backend::VringT;
use virtio_queue::QueueT;
use vm_memory::{
    GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use super::memory::MAX_MEM_SLOTS;
use super::Device;
use crate::config::DeviceSpec;
use crate::image::{CacheMode, Image};
use crate::queues::{Queues, PROTOCOL_FEATURES};
use crate::stats::DeviceStats;
use crate::vring::Connection;
use crate::worker::Tuning;

const PAGE: u64 = 4096;

/// A device on a fresh 1 MiB image (held: its lock is taken), and the image.
fn device(num_queues: u16, max_guest_ram: Option<u64>) -> (Device, Arc<Image>, tempfile::TempDir) {
    crate::kernel::check_io_uring().expect("these tests build real rings: io_uring is needed");
    let dir = tempfile::tempdir().expect("a scratch directory");
    let path = dir.path().join("disk.img");
    File::create(&path)
        .and_then(|f| f.set_len(1 << 20))
        .expect("create the image");
    let image = Arc::new(
        Image::open(
            &path,
            None,
            false,
            Some(CacheMode::Writeback),
            Duration::ZERO,
            false,
        )
        .expect("open the image"),
    );
    let spec = DeviceSpec {
        size_bytes: image.size(),
        read_only: false,
        num_queues,
        queue_size: 16,
        serial: *b"unit-test-serial-000",
        physical_block_exp: 0,
    };
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let tuning = Tuning {
        max_poll: Duration::from_micros(50),
        submit_batch: 8,
    };
    let rings = crate::queues::make_ring_sets(&spec, &image).expect("the rings");
    let queues = Queues::new(
        spec,
        image.clone(),
        mem.clone(),
        Arc::new(|_| {}),
        tuning,
        &DeviceStats::new(num_queues),
        crate::queues::Lent {
            rings,
            throttle: Arc::new(crate::throttle::Throttle::new(Default::default())),
        },
    )
    .map(Arc::new)
    .expect("create the queues");
    let device = Device::new(queues, mem, &Connection::new())
        .expect("create the device")
        .with_max_guest_ram(max_guest_ram);
    (device, image, dir)
}

fn memfd(len: u64, seal: bool) -> File {
    let flags = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd is ours alone.
    let fd = unsafe { libc::memfd_create(c"ringfence-unit".as_ptr(), flags) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and nothing else owns it.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("size the memfd");
    if seal {
        // SAFETY: fcntl F_ADD_SEALS on a memfd of ours (created with MFD_ALLOW_SEALING).
        let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
        assert_eq!(rc, 0, "seal the memfd");
    }
    f
}

/// A table of one-page regions at `gpas` (the VMM's address of each: 1 GiB above it).
fn table(gpas: &[u64]) -> (Vec<VhostUserMemoryRegion>, Vec<File>) {
    let regions = gpas
        .iter()
        .map(|&g| VhostUserMemoryRegion::new(g, PAGE, g + (1 << 30), 0))
        .collect();
    let files = gpas.iter().map(|_| memfd(PAGE, false)).collect();
    (regions, files)
}

/// Whether the request that ended in `r` was refused with the connection going on.
fn goes_on<T>(device: &mut Device, r: Result<T, VhostUserError>) -> bool {
    match r {
        Ok(_) => panic!("the request was accepted"),
        Err(e) => device.take_refused(&e),
    }
}

#[test]
fn a_table_in_any_order_is_served_sorted_by_guest_address() {
    let (mut d, _image, _dir) = device(1, None);
    let gpas = [8 * PAGE, 0, 4 * PAGE];
    let (regions, files) = table(&gpas);
    d.set_mem_table(&regions, files, None)
        .expect("a valid table in descending order");
    let mem = d.mem.memory();
    let starts: Vec<u64> = mem.iter().map(|r| r.start_addr().0).collect();
    assert_eq!(starts, vec![0, 4 * PAGE, 8 * PAGE]);
    let bases: Vec<u64> = d.mappings.iter().map(|m| m.gpa_base).collect();
    assert_eq!(bases, vec![0, 4 * PAGE, 8 * PAGE]);
    // The VMM's addresses translate to the guest's, region by region.
    for g in gpas {
        assert_eq!(d.vmm_va_to_gpa(g + (1 << 30) + 8).ok(), Some(g + 8));
    }
    assert!(d.vmm_va_to_gpa(2 * PAGE + (1 << 30)).is_err());
}

#[test]
fn unoffered_features_are_refused_and_the_connection_goes_on() {
    let (mut d, _image, _dir) = device(1, None);
    let offered = d.get_features().expect("GET_FEATURES");
    let unoffered = (0..64).map(|b| 1u64 << b).find(|b| offered & b == 0);
    let bit = unoffered.expect("some feature bit is not offered");
    d.begin_request();
    let r = d.set_features(offered | bit);
    assert!(goes_on(&mut d, r));
    assert_eq!(
        d.acked_features, 0,
        "nothing of a refused SET_FEATURES is kept"
    );
    d.begin_request();
    d.set_features(offered).expect("the offered features");
    assert_eq!(d.acked_features, offered);
    assert!(!d.refused, "an accepted request is no refusal");
}

#[test]
fn unoffered_protocol_features_are_refused() {
    let (mut d, _image, _dir) = device(1, None);
    let offered = d.get_protocol_features().expect("GET_PROTOCOL_FEATURES");
    assert_eq!(offered, PROTOCOL_FEATURES);
    for f in [
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::INFLIGHT_SHMFD,
        VhostUserProtocolFeatures::LOG_SHMFD,
        VhostUserProtocolFeatures::BACKEND_REQ,
    ] {
        assert!(offered.contains(f), "{f:?} is offered");
    }
    let r = d.set_protocol_features((offered | VhostUserProtocolFeatures::PAGEFAULT).bits());
    assert!(goes_on(&mut d, r));
    assert_eq!(d.acked_protocol_features, 0);
    d.set_protocol_features(offered.bits())
        .expect("the offered protocol features");
    assert_eq!(d.acked_protocol_features, offered.bits());
}

#[test]
fn rings_are_enabled_at_once_only_without_protocol_features() {
    let (mut d, _image, _dir) = device(2, None);
    let offered = d.get_features().expect("GET_FEATURES");
    let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    // With PROTOCOL_FEATURES, rings start disabled and SET_VRING_ENABLE is valid.
    d.set_features(offered).expect("SET_FEATURES");
    assert!(d.vrings.iter().all(|v| !v.get_ref().is_enabled()));
    d.set_vring_enable(1, true).expect("SET_VRING_ENABLE");
    assert!(d.vrings[1].get_ref().is_enabled());
    let r = d.set_vring_enable(2, true);
    assert!(goes_on(&mut d, r), "a queue the device does not have");
    // Without it, every ring is enabled at once and SET_VRING_ENABLE is refused.
    let (mut d, _image, _dir) = device(2, None);
    d.set_features(offered & !protocol).expect("SET_FEATURES");
    assert!(d.vrings.iter().all(|v| v.get_ref().is_enabled()));
    let r = d.set_vring_enable(0, false);
    assert!(matches!(r, Err(VhostUserError::InactiveFeature(_))));
    assert!(goes_on(&mut d, r));
}

#[test]
fn guest_ram_above_the_cap_is_refused_before_anything_is_mapped() {
    let (mut d, _image, _dir) = device(1, Some(2 * PAGE));
    let (regions, files) = table(&[0, 4 * PAGE, 8 * PAGE]);
    let r = d.set_mem_table(&regions, files, None);
    assert!(goes_on(&mut d, r));
    assert_eq!(
        d.mem.memory().num_regions(),
        0,
        "the refused table is not served"
    );
    // Within the cap: served; one more region past it: refused.
    let (regions, files) = table(&[0, 4 * PAGE]);
    d.set_mem_table(&regions, files, None)
        .expect("a table within the cap");
    let region = VhostUserSingleMemoryRegion::new(8 * PAGE, PAGE, 8 * PAGE + (1 << 30), 0);
    let r = d.add_mem_region(&region, memfd(PAGE, false), None);
    assert!(goes_on(&mut d, r));
    assert_eq!(d.mem.memory().num_regions(), 2);
    // A total that overflows is refused too.
    let huge = VhostUserMemoryRegion::new(0, u64::MAX, 1 << 30, 0);
    let r = d.set_mem_table(&[huge, huge], vec![], None);
    assert!(goes_on(&mut d, r));
}

#[test]
fn more_regions_than_the_slots_offered_are_refused() {
    let (mut d, _image, _dir) = device(1, None);
    assert_eq!(
        d.get_max_mem_slots().expect("GET_MAX_MEM_SLOTS"),
        MAX_MEM_SLOTS
    );
    // Refused on the count alone, before any region is looked at.
    let region = VhostUserMemoryRegion::new(0, PAGE, 1 << 30, 0);
    let many = vec![region; MAX_MEM_SLOTS as usize + 1];
    let r = d.set_mem_table(&many, vec![], None);
    assert!(goes_on(&mut d, r));
    // Postcopy is refused as well.
    let (regions, files) = table(&[0]);
    let r = d.set_mem_table(&regions, files, Some(true));
    assert!(goes_on(&mut d, r));
}

#[test]
fn a_log_that_cannot_be_used_ends_the_connection() {
    let (mut d, _image, _dir) = device(1, None);
    let (regions, files) = table(&[0]);
    d.set_mem_table(&regions, files, None).expect("a table");
    // Unsealed: refused, and not as a refusal the connection survives (no nack is possible).
    let e = d
        .set_log_base(&VhostUserLog::new(PAGE, 0), memfd(PAGE, false))
        .expect_err("an unsealed log");
    assert!(!d.take_refused(&e));
    // Past the end of its file: the same.
    let e = d
        .set_log_base(&VhostUserLog::new(PAGE, PAGE), memfd(PAGE, true))
        .expect_err("a log past the end of its file");
    assert!(!d.take_refused(&e));
    assert!(d.log.is_none());
    d.set_log_base(&VhostUserLog::new(PAGE, 0), memfd(PAGE, true))
        .expect("a sealed log that covers guest RAM");
    assert!(d.log.is_some());
}

#[test]
fn the_dirty_log_is_kept_while_log_all_is_acked_and_dropped_after() {
    let (mut d, _image, _dir) = device(1, None);
    let offered = d.get_features().expect("GET_FEATURES");
    let log_all = VhostUserVirtioFeatures::LOG_ALL.bits();
    assert_ne!(offered & log_all, 0, "LOG_ALL is offered");
    let (regions, files) = table(&[0]);
    d.set_mem_table(&regions, files, None).expect("a table");
    // LOG_ALL before the log (QEMU's order when it starts a device mid-migration).
    d.set_features(offered).expect("SET_FEATURES with LOG_ALL");
    assert!(d.logging() && d.log.is_none());
    d.set_log_base(&VhostUserLog::new(PAGE, 0), memfd(PAGE, true))
        .expect("SET_LOG_BASE");
    assert!(d.log.is_some());
    // LOG_ALL acked again: the log stays.
    d.set_features(offered).expect("SET_FEATURES with LOG_ALL");
    assert!(d.log.is_some());
    // Without LOG_ALL: the log is dropped (unmapped).
    d.set_features(offered & !log_all)
        .expect("SET_FEATURES without LOG_ALL");
    assert!(!d.logging() && d.log.is_none());
    // A log that arrives while not logging is kept for later, and dropped at the end.
    d.set_log_base(&VhostUserLog::new(PAGE, 0), memfd(PAGE, true))
        .expect("SET_LOG_BASE");
    assert!(d.log.is_some());
    d.connection_ended();
    assert!(d.log.is_none());
}

#[test]
fn the_image_is_given_up_once_every_queue_stopped_and_nothing_is_in_flight() {
    let (mut d, image, _dir) = device(2, None);
    assert!(image.held());
    // A queue that does not exist: refused, and nothing is given up.
    assert!(d.get_vring_base(2).is_err());
    assert!(image.held());
    // No queue was started: every one is stopped, nothing is in flight.
    let state = d.get_vring_base(0).expect("GET_VRING_BASE");
    let num = state.num;
    assert_eq!(num, 0);
    assert!(!image.held(), "the image is given up");
    assert!(!d.give_up_pending);
    d.connection_ended();
    assert!(!image.held());
}

#[test]
fn a_refusal_never_outlives_its_request() {
    let (mut d, _image, _dir) = device(1, None);
    let r = d.set_vring_num(0, 0);
    assert!(r.is_err());
    assert!(d.refused);
    d.begin_request();
    assert!(!d.refused);
    let e = VhostUserError::InvalidParam;
    assert!(!d.take_refused(&e), "no refusal left for the next request");
    // A refusal the crate's own checks made (not ours) ends the connection.
    let _ = d.set_vring_num(0, 1 << 20);
    assert!(!d.take_refused(&VhostUserError::PartialMessage));
}

#[test]
fn ring_addresses_outside_guest_ram_leave_the_queue_unserved() {
    use vhost::vhost_user::message::VhostUserVringAddrFlags;
    let (mut d, _image, _dir) = device(1, None);
    let flags = VhostUserVringAddrFlags::empty;
    // Before any memory table.
    let r = d.set_vring_addr(0, flags(), 1 << 30, 1 << 30, 1 << 30, 0);
    assert!(goes_on(&mut d, r));
    assert!(!d.rings_valid[0]);
    let (regions, files) = table(&[0]);
    d.set_mem_table(&regions, files, None).expect("a table");
    let base = 1 << 30;
    d.set_vring_addr(0, flags(), base, base + 2048, base + 1024, 0)
        .expect("addresses inside guest RAM");
    assert!(d.rings_valid[0]);
    // Outside it: refused, and the queue may not be served.
    let r = d.set_vring_addr(0, flags(), base + PAGE, base, base, 0);
    assert!(goes_on(&mut d, r));
    assert!(!d.rings_valid[0]);
    // A kick fd now does not start it.
    let kick = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    // SAFETY: dup of an eventfd we own; it reads no memory of ours.
    let fd = unsafe { libc::dup(kick.as_raw_fd()) };
    assert!(fd >= 0, "dup: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nothing else owns; the File owns it from here on.
    let file = unsafe { File::from_raw_fd(fd) };
    let _ = d.set_vring_kick(0, Some(file));
    assert!(!d.vrings[0].get_ref().get_queue().ready());
}
