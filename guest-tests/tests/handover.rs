//! The image hand-over of a live migration (issue "Live migration"): two ringfence processes on
//! one image, the test playing both QEMUs (source and destination) with its own frontend.
//!
//! * a second plain daemon is refused at startup while the first serves;
//! * an `--incoming` daemon starts beside a serving one, but its queue is not served while the
//!   first serves (the start waits `--lock-wait`, is refused, the log says why) and no request
//!   of it reaches the image;
//! * after GET_VRING_BASE on every queue of the source (not before: one queue of two is not
//!   enough), the destination's queue starts and serves, and reads what the source wrote;
//! * a cancelled migration: the destination's queues stopped, the source's queue restarted,
//!   the source serves again (and not before the destination stopped);
//! * a write held in flight (a frozen filesystem) when the source is stopped keeps the image
//!   with the source until it completed.
//!
//! Every wait is bounded and waits on an event (a reply, a used element, a log line); the one
//! observation window is the hostile rig's: a request that must not be served is watched for
//! `RINGFENCE_HOSTILE_WAIT_MS` (1 s). ringfence only: qemu-storage-daemon has no `--incoming`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ringfence_guest_tests::blk;
use ringfence_guest_tests::daemon::{ringfence_refused, Daemon, LoopFs};
use ringfence_guest_tests::frontend::*;
use ringfence_guest_tests::image;
use ringfence_guest_tests::memory::GuestMemory;
use ringfence_guest_tests::rig::{self, hostile_wait, Session, SessionCfg, RAM_A, RAM_B};
use ringfence_guest_tests::virtq::{Desc, SplitQueue};

const WAIT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;
const IMAGE_SIZE: u64 = 16 * MIB;
/// `--lock-wait` of every daemon here: how long a queue start waits for the other daemon.
const LOCK_WAIT: &str = "1";

/// An image and the sockets of two daemons.
struct Site {
    image: PathBuf,
    dir: tempfile::TempDir,
    _fs: Option<LoopFs>,
}

impl Site {
    fn new() -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = dir.path().join("disk.img");
        image::create(&image, IMAGE_SIZE);
        Site {
            image,
            dir,
            _fs: None,
        }
    }

    /// The image on a freezable filesystem (the sockets stay elsewhere).
    fn on_loopfs() -> Site {
        let fs = LoopFs::new(64 * MIB);
        let image = fs.path().join("disk.img");
        image::create(&image, IMAGE_SIZE);
        std::fs::File::open(&image)
            .and_then(|f| f.sync_all())
            .expect("sync the image");
        Site {
            image,
            dir: tempfile::tempdir().expect("socket dir"),
            _fs: Some(fs),
        }
    }

    fn fs(&self) -> &LoopFs {
        self._fs.as_ref().expect("a loop filesystem")
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.sock"))
    }

    fn daemon(&self, name: &str, num_queues: u16, incoming: bool) -> Daemon {
        let nq = num_queues.to_string();
        let mut args = vec![
            "--blk-file",
            self.image.to_str().unwrap(),
            "--num-queues",
            &nq,
            "--lock-wait",
            LOCK_WAIT,
        ];
        if incoming {
            args.push("--incoming");
        }
        Daemon::ringfence(&self.socket(name), &args)
    }

    fn read_image(&self, off: u64, len: usize) -> Vec<u8> {
        rig::read_image(&self.image, off, len)
    }
}

fn cfg(queues: u16) -> SessionCfg {
    SessionCfg {
        queues,
        ..SessionCfg::default()
    }
}

/// An honest session on `d` with `queues` queues, which must be served.
fn session(d: &Daemon, queues: u16, who: &str) -> Session {
    let mut fe = Frontend::connect(&d.socket).expect("connect");
    fe.timeout = WAIT;
    Session::establish(fe, &cfg(queues))
        .unwrap_or_else(|e| panic!("{who}: setting up the device: {e}\n{}", tail(d)))
}

fn tail(d: &Daemon) -> String {
    let s = d.stderr();
    let lines: Vec<&str> = s.lines().collect();
    format!(
        "--- {} stderr ---\n{}",
        d.socket.display(),
        lines[lines.len().saturating_sub(25)..].join("\n")
    )
}

fn data(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

/// Compare a session's guest RAM (the device may have written its buffers and used rings
/// only) and drop it.
fn check_memory(s: Session) {
    let allowed = s.writable();
    let mut s = s;
    let (mem, _queues) = s.take_memory();
    drop(s);
    let strays = mem.stray_writes_since_creation(&allowed);
    assert!(strays.is_empty(), "guest RAM: {strays:?}");
}

/// GET_VRING_BASE on every queue of `s` (QEMU stopping the device).
fn stop(s: &Session, d: &Daemon, who: &str) -> Vec<u32> {
    (0..s.queues.len() as u32)
        .map(|q| {
            s.fe.get_vring_base(q)
                .unwrap_or_else(|e| panic!("{who}: GET_VRING_BASE {q}: {e}\n{}", tail(d)))
        })
        .collect()
}

/// Start queue `i` of `s` again after a stop (QEMU's vhost_dev_start after a cancelled
/// migration: NUM, BASE as GET_VRING_BASE answered, ADDR, CALL, KICK, ENABLE). Returns the
/// first error.
fn restart(s: &Session, i: usize, base: u32) -> FeResult<()> {
    let q = &s.queues[i];
    s.fe.set_vring_num(q.index, u32::from(q.size))?;
    s.fe.set_vring_base(q.index, base)?;
    s.fe.set_vring_addr(
        q.index,
        s.mem.uaddr(q.desc),
        s.mem.uaddr(q.used),
        s.mem.uaddr(q.avail),
    )?;
    s.fe.set_vring_fd(code::SET_VRING_CALL, q.index, Some(q.call.as_raw_fd()))?;
    s.fe.set_vring_fd(code::SET_VRING_KICK, q.index, Some(q.kick.as_raw_fd()))?;
    s.fe.set_vring_enable(q.index, true)
}

/// The log line of a daemon that could not start a queue because the other one serves the
/// image, after byte `from` of its stderr.
fn refusal_logged(d: &Daemon, from: usize, image: &Path) -> Option<String> {
    let img = image.display().to_string();
    d.wait_for_log_after(from, WAIT, |l| {
        l.contains("not served") && l.contains(&img) && l.contains("another process")
    })
}

/// Connect to `d` (which must not get the image: the other daemon serves it), set the device
/// up with one queue: its start must be refused after `--lock-wait`, with the error logged
/// (naming the image and the other process). If the connection survives, a write made
/// available on that queue anyway must not be served nor reach the image. Returns how long
/// the refused start took.
fn refused_start(d: &Daemon, site: &Site, who: &str) -> Duration {
    let mut fe = Frontend::connect(&d.socket).expect("connect");
    fe.timeout = WAIT;
    let c = cfg(1);
    Session::negotiate(&mut fe, &c).unwrap_or_else(|e| panic!("{who}: negotiation: {e}"));
    let mem = GuestMemory::new(&c.layout);
    let (table, fds) = mem.table();
    fe.set_mem_table(&table, &fds)
        .unwrap_or_else(|e| panic!("{who}: SET_MEM_TABLE: {e}"));
    let q = SplitQueue::new(&mem, 0, 256, RAM_A.0);
    fe.set_vring_num(0, 256).expect("SET_VRING_NUM");
    fe.set_vring_base(0, 0).expect("SET_VRING_BASE");
    fe.set_vring_addr(0, mem.uaddr(q.desc), mem.uaddr(q.used), mem.uaddr(q.avail))
        .expect("SET_VRING_ADDR");
    fe.set_vring_fd(code::SET_VRING_CALL, 0, Some(q.call.as_raw_fd()))
        .expect("SET_VRING_CALL");
    let from = d.log_len();
    let t0 = Instant::now();
    let kick = fe.set_vring_fd(code::SET_VRING_KICK, 0, Some(q.kick.as_raw_fd()));
    let took = t0.elapsed();
    match &kick {
        Err(e) if e.is_refusal() => {}
        Ok(()) => panic!(
            "{who}: the queue started (SET_VRING_KICK acked) although the other daemon serves \
             the image\n{}",
            tail(d)
        ),
        Err(e) => panic!(
            "{who}: SET_VRING_KICK: {e} (expected a refusal)\n{}",
            tail(d)
        ),
    }
    let line = refusal_logged(d, from, &site.image).unwrap_or_else(|| {
        panic!(
            "{who}: the refused queue start logged no error naming the image {} and the other \
             process\n{}",
            site.image.display(),
            tail(d)
        )
    });
    eprintln!("{who}: refused after {took:?}: {line}");
    // Whatever the frontend does now, no request of this queue may reach the image.
    let off = 4 * MIB;
    let before = site.read_image(off, 4096);
    let mut s = Session::from_parts(fe, mem, vec![q], RAM_B.0);
    if !s.fe.peer_hung_up() {
        let _ = s.fe.set_vring_enable(0, true);
        let hdr = s.put(&blk::header(blk::T_OUT, off / blk::SECTOR));
        let buf = s.put(&data(0x77, 4096));
        let st = s.status();
        s.chain(0, &[Desc::r(hdr, 16), Desc::r(buf, 4096), Desc::w(st, 1)]);
        s.kick(0);
        let sock = s.fe.as_raw_fd();
        let u = s.queues[0].wait_used(&s.mem, Instant::now() + hostile_wait(), Some(sock));
        assert!(
            u.is_none(),
            "{who}: a write on the refused queue was answered ({u:?}, status {})",
            blk::status_name(s.mem.read_u8(st))
        );
    }
    check_memory(s);
    assert!(
        site.read_image(off, 4096) == before,
        "{who}: a write on the refused queue reached the image"
    );
    took
}

/// (a) A second plain daemon on the image is refused at startup while the first serves, with
/// one line that names the image.
#[test]
fn a_second_plain_daemon_is_refused_at_startup() {
    let site = Site::new();
    let src = site.daemon("src", 1, false);
    let mut s = session(&src, 1, "source");
    s.write(0, MIB, &data(1, 4096))
        .expect("a write through the source");
    let (code, err) = ringfence_refused(
        &site.socket("second"),
        &[
            "--blk-file",
            site.image.to_str().unwrap(),
            "--lock-wait",
            "0",
        ],
        WAIT,
    );
    assert_eq!(
        code,
        Some(1),
        "exit status of the second daemon; stderr:\n{err}"
    );
    let img = site.image.display().to_string();
    assert!(
        err.lines()
            .any(|l| l.contains(&img) && (l.contains("another process") || l.contains("locked"))),
        "the second daemon's refusal does not say that another process serves {img}:\n{err}"
    );
    // The first goes on serving.
    assert_eq!(
        s.read(0, MIB, 4096).expect("a read through the source"),
        data(1, 4096)
    );
    check_memory(s);
}

/// (b) An `--incoming` daemon starts beside a serving one; its queue start waits
/// `--lock-wait`, is refused with the error logged, and nothing of it reaches the image; the
/// source serves on.
#[test]
fn an_incoming_daemon_is_not_served_while_the_source_serves() {
    let site = Site::new();
    let src = site.daemon("src", 1, false);
    let mut s = session(&src, 1, "source");
    s.write(0, MIB, &data(2, 4096))
        .expect("a write through the source");
    let dst = site.daemon("dst", 1, true);
    let took = refused_start(&dst, &site, "the incoming daemon");
    assert!(
        took >= Duration::from_millis(900),
        "the refused start took {took:?}: it did not wait --lock-wait {LOCK_WAIT} s for the \
         source"
    );
    assert_eq!(
        s.read(0, MIB, 4096).expect("a read through the source"),
        data(2, 4096)
    );
    s.write(0, MIB + 4096, &data(3, 4096))
        .expect("a write through the source after the refusal");
    check_memory(s);
    assert!(site.read_image(MIB, 4096) == data(2, 4096));
    assert!(site.read_image(MIB + 4096, 4096) == data(3, 4096));
}

/// (c) and (d): the source (two queues) is stopped one queue at a time; with one queue
/// stopped the destination is still refused; with both, the destination's queue starts, reads
/// what the source wrote and writes. Then a cancelled migration: the source's restart is
/// refused while the destination serves, and served once the destination's queue stopped,
/// reading what the destination wrote.
#[test]
fn the_image_moves_after_every_source_queue_stopped_and_back_when_cancelled() {
    let site = Site::new();
    let src = site.daemon("src", 2, false);
    let mut s = session(&src, 2, "source");
    s.write(0, MIB, &data(4, 8192))
        .expect("a write through source queue 0");
    s.write(1, 2 * MIB, &data(5, 4096))
        .expect("a write through source queue 1");
    let dst = site.daemon("dst", 1, true);

    // One queue of two stopped: the source still holds the image.
    let base0 = s.fe.get_vring_base(0).expect("GET_VRING_BASE 0");
    refused_start(&dst, &site, "the destination, source queue 1 still running");
    // Both stopped: the image is free once the reply came.
    let from = src.log_len();
    let base1 = s.fe.get_vring_base(1).expect("GET_VRING_BASE 1");
    let given = src.wait_for_log_after(from, WAIT, |l| l.contains("given up"));
    assert!(
        given.is_some(),
        "the source did not log giving the image up\n{}",
        tail(&src)
    );

    let from = dst.log_len();
    let mut d = session(&dst, 1, "the destination after the source stopped");
    assert!(
        dst.wait_for_log_after(from, WAIT, |l| l.contains("taken over"))
            .is_some(),
        "the destination did not log taking the image over\n{}",
        tail(&dst)
    );
    assert_eq!(
        d.read(0, MIB, 8192)
            .expect("a read through the destination"),
        data(4, 8192),
        "the destination does not read what the source wrote"
    );
    assert_eq!(d.read(0, 2 * MIB, 4096).expect("read"), data(5, 4096));
    d.write(0, 3 * MIB, &data(6, 4096))
        .expect("a write through the destination");
    assert!(site.read_image(3 * MIB, 4096) == data(6, 4096));

    // (d) Cancelled: the source restarts while the destination serves: refused.
    let from = src.log_len();
    let r = restart(&s, 0, base0);
    assert!(
        matches!(&r, Err(e) if e.is_refusal()),
        "the source's queue restarted while the destination serves: {r:?}\n{}",
        tail(&src)
    );
    assert!(
        refusal_logged(&src, from, &site.image).is_some(),
        "the source's refused restart logged no error\n{}",
        tail(&src)
    );
    // The destination stops; the source (on a new connection if the refusal ended the old
    // one) takes the image back and serves, reading what the destination wrote.
    stop(&d, &dst, "the destination");
    check_memory(d);
    let mut s2 = if s.fe.peer_hung_up() {
        eprintln!("the source's refused restart ended its connection: restarting on a new one");
        check_memory(s);
        session(&src, 2, "the source after the cancel (new connection)")
    } else {
        eprintln!("the source's refused restart left its connection up: restarting on it");
        let r = restart(&s, 0, base0).and_then(|_| restart(&s, 1, base1));
        if let Err(e) = r {
            panic!(
                "the source's restart after the destination stopped: {e}\n{}",
                tail(&src)
            );
        }
        s
    };
    assert_eq!(
        s2.read(0, 3 * MIB, 4096)
            .expect("a read through the source after the cancel"),
        data(6, 4096),
        "the source does not read what the destination wrote"
    );
    s2.write(1, 4 * MIB, &data(7, 4096))
        .expect("a write through the source after the cancel");
    assert!(site.read_image(4 * MIB, 4096) == data(7, 4096));
    check_memory(s2);
}

/// (e) A write held in flight (frozen filesystem) when the source is stopped: the source keeps
/// the image (the destination is refused) until the write completed; then the destination
/// takes it and reads the write's data.
#[test]
fn a_write_in_flight_at_the_stop_keeps_the_image_until_it_completed() {
    let site = Site::on_loopfs();
    let src = site.daemon("src", 1, false);
    let dst = site.daemon("dst", 1, true);
    let mut s = session(&src, 1, "source");
    // Dropped before the daemons if the test fails while the filesystem is frozen.
    let _thaw = site.fs().thaw_guard();
    s.read(0, 0, 4096).expect("a read before the freeze");
    site.fs().freeze();
    // The held write, then a read behind it that completes: the write was taken.
    let w_off = 2 * MIB;
    let w = data(8, 64 * 1024);
    let hdr = s.put(&blk::header(blk::T_OUT, w_off / blk::SECTOR));
    let buf = s.alloc(w.len() as u64, 4096);
    s.mem.write(buf, &w);
    let w_st = s.status();
    let w_head = s.chain(
        0,
        &[
            Desc::r(hdr, 16),
            Desc::r(buf, w.len() as u32),
            Desc::w(w_st, 1),
        ],
    );
    s.kick(0);
    s.read(0, 0, 4096).expect("a read behind the held write");
    assert_eq!(
        s.mem.read_u8(w_st),
        0xff,
        "the write completed although the filesystem is frozen: the scenario holds nothing"
    );
    // QEMU stops the source: GET_VRING_BASE, answered once the write is done.
    s.fe.send_get_vring_base(0).expect("send GET_VRING_BASE");
    refused_start(
        &dst,
        &site,
        "the destination, a write in flight on the source",
    );
    site.fs().thaw();
    let u = s.queues[0]
        .wait_used(&s.mem, Instant::now() + WAIT, None)
        .unwrap_or_else(|| panic!("the held write never completed\n{}", tail(&src)));
    assert_eq!(u.id, u32::from(w_head));
    assert_eq!(s.mem.read_u8(w_st), blk::S_OK, "the held write's status");
    let base = s.fe.recv_vring_base(WAIT).unwrap_or_else(|e| {
        panic!(
            "GET_VRING_BASE after the write completed: {e}\n{}",
            tail(&src)
        )
    });
    assert_eq!(base, 3, "GET_VRING_BASE: three requests were taken");
    let mut d = session(&dst, 1, "the destination after the write completed");
    assert_eq!(
        d.read(0, w_off, w.len())
            .expect("a read through the destination"),
        w,
        "the destination does not read the write that was in flight at the stop"
    );
    check_memory(d);
    check_memory(s);
}
