//! The SIGBUS handler, run for real: each case runs in a re-executed copy of this test binary
//! (`run_sigbus_child`), since the handler is process-wide and the foreign case ends the process.

use super::*;

#[test]
fn the_fatal_sigbus_message_names_address_and_code() {
    let mut buf = [0u8; 128];
    let n = fatal_sigbus_message(&mut buf, 0x7f00_dead_b000, 2);
    assert_eq!(
        std::str::from_utf8(&buf[..n]).unwrap(),
        "ringfence: fatal: SIGBUS at 0x00007f00deadb000, outside guest RAM (si_code 2)\n"
    );
    let n = fatal_sigbus_message(&mut buf, 0, -6);
    assert!(std::str::from_utf8(&buf[..n])
        .unwrap()
        .ends_with("(si_code -6)\n"));
}

/// A shared mapping of a memfd of `pages` pages: (file, mapping address, length).
fn memfd_pages(pages: usize) -> (std::fs::File, usize) {
    use std::os::fd::FromRawFd;
    let len = pages * 4096;
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned from here on.
    let file = unsafe {
        let fd = libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        std::fs::File::from_raw_fd(fd)
    };
    file.set_len(len as u64).expect("ftruncate");
    (file, len)
}

/// Touch one byte at `addr` (volatile: the read must happen).
fn touch(addr: usize) -> u8 {
    // SAFETY: `addr` lies in a live mapping of ours; a SIGBUS there is what is tested.
    unsafe { std::ptr::read_volatile(addr as *const u8) }
}

/// The child side of the SIGBUS tests (re-executed test binary, see `run_sigbus_child`):
/// does nothing unless `RINGFENCE_SIGBUS_CHILD` says which case to run.
#[test]
fn sigbus_child() {
    let Ok(case) = std::env::var("RINGFENCE_SIGBUS_CHILD") else {
        return;
    };
    install_sigbus_handler().expect("handler");
    match case.as_str() {
        "guest" => child_guest(),
        "hugetlb" => child_hugetlb(),
        "foreign" => child_foreign(),
        other => panic!("unknown case {other}"),
    }
}

/// Guest RAM as the crate maps it (a GuestMemoryMmap over the VMM's memfd) is tracked, and
/// its vanished pages read as zeroes.
fn child_guest() {
    use vm_memory::{FileOffset, GuestAddress};
    let (file, len) = memfd_pages(4);
    let f2 = file.try_clone().unwrap();
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0x10_0000),
            len,
            Some(FileOffset::new(f2, 0)),
        )])
        .expect("guest memory"),
    );
    track_guest_ram(&mem);
    let host = mem.iter().next().unwrap().as_ptr() as usize;
    let whole = GuestRamRange {
        start: host,
        end: host + len,
        page: base_page_size(),
    };
    assert_eq!(guest_ram_ranges(), vec![whole]);
    // An older table still alive stays known; a dead one is forgotten.
    let (file_b, len_b) = memfd_pages(1);
    let mem_b = Arc::new(
        GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            len_b,
            Some(FileOffset::new(file_b, 0)),
        )])
        .unwrap(),
    );
    track_guest_ram(&mem_b);
    assert_eq!(guest_ram_ranges().len(), 2);
    drop(mem_b);
    track_guest_ram(&mem);
    assert_eq!(guest_ram_ranges(), vec![whole]);
    // The VMM shrinks its file: the vanished pages read as zeroes.
    file.set_len(4096).expect("shrink");
    assert_eq!(touch(host + 2 * 4096 + 17), 0);
    assert_eq!(GUEST_MEMORY_FAULTS.load(Ordering::Relaxed), 1);
    assert_eq!(touch(host + 2 * 4096), 0, "the zero page stays");
    assert_eq!(GUEST_MEMORY_FAULTS.load(Ordering::Relaxed), 1);
    drop(file);
    println!("SIGBUS-CHILD-OK");
}

/// Hugetlbfs guest RAM (QEMU's memory-backend-memfd,hugetlb=on): 4 huge pages; a vanished
/// huge page is replaced whole, from one fault.
fn child_hugetlb() {
    use vm_memory::{FileOffset, GuestAddress};
    let huge = huge_page_size();
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned from here.
    let file = unsafe {
        let fd = libc::memfd_create(
            c"guest-ram-huge".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB,
        );
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
    };
    let len = 4 * huge;
    file.set_len(len as u64).expect("ftruncate");
    let mem = Arc::new(
        GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0x4000_0000),
            len,
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
        )])
        .expect("guest memory"),
    );
    track_guest_ram(&mem);
    let host = mem.iter().next().unwrap().as_ptr() as usize;
    assert_eq!(
        guest_ram_ranges(),
        vec![GuestRamRange {
            start: host,
            end: host + len,
            page: huge,
        }],
        "tracked with its huge-page size"
    );
    // Fill every huge page. vm-memory maps with MAP_NORESERVE: a huge page that
    // cannot be allocated would raise SIGBUS here, which the handler would absorb.
    for i in 0..4 {
        // SAFETY: inside the live mapping.
        unsafe { std::ptr::write_volatile((host + i * huge) as *mut u8, 1) };
    }
    assert_eq!(
        GUEST_MEMORY_FAULTS.load(Ordering::Relaxed),
        0,
        "the huge pages could not be allocated"
    );
    // The VMM shrinks its file: the last huge page vanishes and reads as zeroes,
    // all of it, from one fault; what is written there stays.
    file.set_len((3 * huge) as u64).expect("shrink");
    let gone = host + 3 * huge;
    assert_eq!(touch(gone + 4096 + 17), 0);
    assert_eq!(GUEST_MEMORY_FAULTS.load(Ordering::Relaxed), 1);
    // SAFETY: inside the live mapping (now the private replacement).
    unsafe { std::ptr::write_volatile((gone + 5) as *mut u8, 9) };
    assert_eq!(touch(gone + 5), 9, "the replacement is writable and stays");
    assert_eq!(touch(gone), 0);
    assert_eq!(touch(gone + huge - 1), 0);
    assert_eq!(
        GUEST_MEMORY_FAULTS.load(Ordering::Relaxed),
        1,
        "one fault replaced the whole huge page"
    );
    assert_eq!(
        touch(host + 2 * huge),
        1,
        "the pages that stay are untouched"
    );
    drop(mem);
    drop(file);
    println!("SIGBUS-CHILD-OK");
}

/// A shared file mapping the daemon did not register as guest RAM: the fault ends the process.
fn child_foreign() {
    use std::os::fd::AsRawFd;
    let (file, len) = memfd_pages(2);
    // SAFETY: a fresh shared mapping of our memfd; nothing else uses the range.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    file.set_len(0).expect("shrink");
    println!("SIGBUS-CHILD-ADDR {:#018x}", p as usize + 4096);
    touch(p as usize + 4096);
    unreachable!("the SIGBUS handler returned for a foreign address");
}

/// `sigbus_child`'s name as libtest knows it: this module's path without the crate's name,
/// so that the child is found wherever the module lives.
fn child_test_name() -> String {
    let module = module_path!();
    let module = module.split_once("::").map_or(module, |(_, m)| m);
    format!("{module}::sigbus_child")
}

/// Run `sigbus_child` with `case` in a fresh process (the handler is process-wide, and the
/// foreign case ends the process): (exit code, stdout, stderr).
fn run_sigbus_child(case: &str) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            &child_test_name(),
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RINGFENCE_SIGBUS_CHILD", case)
        .output()
        .expect("run the child");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sigbus_on_guest_ram_is_absorbed() {
    let (code, out, err) = run_sigbus_child("guest");
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("SIGBUS-CHILD-OK"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
}

/// The default huge-page size (`Hugepagesize` in /proc/meminfo), what MFD_HUGETLB uses.
fn huge_page_size() -> usize {
    meminfo("Hugepagesize:").expect("Hugepagesize in /proc/meminfo") * 1024
}

/// A `/proc/meminfo` field, in its unit (kB, or pages for the HugePages_ counts).
fn meminfo(field: &str) -> Option<usize> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Hugetlbfs guest RAM the VMM shrinks: the handler replaces the whole huge page (a 4 KiB
/// page cannot be mapped inside a huge-page mapping). Needs 4 free huge pages: reserves
/// them in /proc/sys/vm/nr_hugepages if they are not (and restores it), and skips, saying
/// so, only if they cannot be had.
#[test]
fn sigbus_on_hugetlb_guest_ram_is_absorbed() {
    const NEED: usize = 4;
    const NR: &str = "/proc/sys/vm/nr_hugepages";
    struct Restore(Option<String>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(before) = &self.0 {
                let _ = std::fs::write(NR, before);
            }
        }
    }
    let mut restore = Restore(None);
    let free = meminfo("HugePages_Free:").unwrap_or(0);
    if free < NEED {
        if let Ok(before) = std::fs::read_to_string(NR) {
            let before = before.trim().to_string();
            if let Ok(n) = before.parse::<usize>() {
                if std::fs::write(NR, (n + NEED - free).to_string()).is_ok() {
                    restore.0 = Some(before);
                }
            }
        }
    }
    let free = meminfo("HugePages_Free:").unwrap_or(0);
    if free < NEED {
        eprintln!(
            "SKIPPED sigbus_on_hugetlb_guest_ram_is_absorbed: {free} free huge page(s), \
             {NEED} needed, and {NR} could not provide them (not root?)"
        );
        return;
    }
    let (code, out, err) = run_sigbus_child("hugetlb");
    drop(restore);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("SIGBUS-CHILD-OK"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
}

/// What the handler may replace in a mapping: whole pages of its size, and only those.
#[test]
fn tracked_ranges_hold_whole_pages() {
    const H: usize = 2 << 20;
    let r = |start, end, page| GuestRamRange { start, end, page };
    assert_eq!(
        whole_pages(0x4000_0000, 4 * H, H),
        Some(r(0x4000_0000, 0x4000_0000 + 4 * H, H))
    );
    assert_eq!(
        whole_pages(0x7000_1000, 0x3000, 4096),
        Some(r(0x7000_1000, 0x7000_4000, 4096))
    );
    // Not aligned to its huge pages: only the whole ones inside.
    assert_eq!(
        whole_pages(0x4000_1000, 3 * H, H),
        Some(r(0x4000_0000 + H, 0x4000_0000 + 3 * H, H))
    );
    assert_eq!(whole_pages(0x4000_1000, H, H), None);
    assert_eq!(whole_pages(usize::MAX - 4095, 8192, 4096), None);
}

#[test]
fn sigbus_elsewhere_ends_the_process_with_a_message() {
    let (code, out, err) = run_sigbus_child("foreign");
    assert_eq!(code, Some(70), "stdout:\n{out}\nstderr:\n{err}");
    let addr = out
        .lines()
        .find_map(|l| l.split("SIGBUS-CHILD-ADDR ").nth(1))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no address in stdout:\n{out}"));
    let want = format!("ringfence: fatal: SIGBUS at {addr}, outside guest RAM (si_code 2)");
    assert!(err.contains(&want), "want {want:?} in stderr:\n{err}");
}
