//! The kernel ABI that the `libc` and `io-uring` crates do not name (yet): structs, opcodes
//! and syscall numbers newer than those crates, hand-written here once and used everywhere
//! else. Each item names its kernel header and the Linux version that added it; when a crate
//! gains one, the item goes and its users take the crate's.
//!
//! What the crates do name is taken from them, not copied here: `libc::HUGETLBFS_MAGIC`,
//! `libc::BUS_ADRERR`,
//! `libc::RWF_*`, `libc::FALLOC_FL_*`, `libc::STATX_DIOALIGN`, `io_uring::register::Restriction`
//! (`struct io_uring_restriction`).

// ---- Syscall numbers (include/uapi/asm-generic/unistd.h; from 424 on, one number on every
// ---- architecture). libc 0.2.191 lacks them on x86_64 and aarch64 (fchmodat2: on aarch64).

/// `__NR_fchmodat2`, Linux 6.6.
pub const SYS_FCHMODAT2: i64 = 452;
/// `__NR_setxattrat`, Linux 6.13.
pub const SYS_SETXATTRAT: i64 = 463;
/// `__NR_getxattrat`, Linux 6.13.
pub const SYS_GETXATTRAT: i64 = 464;
/// `__NR_listxattrat`, Linux 6.13.
pub const SYS_LISTXATTRAT: i64 = 465;
/// `__NR_removexattrat`, Linux 6.13.
pub const SYS_REMOVEXATTRAT: i64 = 466;
/// `__NR_open_tree_attr`, Linux 6.15.
pub const SYS_OPEN_TREE_ATTR: i64 = 467;

// ---- io_uring_register(2) opcodes (include/uapi/linux/io_uring.h, `enum io_uring_register_op`).
// ---- The io-uring crate wraps some of them in methods but exports no numbers, and has no
// ---- blind (fd -1) form.

/// `IORING_REGISTER_RESTRICTIONS`, Linux 5.10 (on a ring); on the blind fd -1, the task-level
/// allowlist, Linux 7.0.
pub const IORING_REGISTER_RESTRICTIONS: u32 = 11;

/// `struct io_uring_task_restriction` (include/uapi/linux/io_uring.h, Linux 7.0) without its
/// flexible array of `struct io_uring_restriction` entries, which follow it in memory.
#[repr(C)]
pub struct TaskRestrictionHeader {
    pub flags: u16,
    pub nr_res: u16,
    pub resv: [u32; 3],
}

// ---- struct io_uring_sqe (include/uapi/linux/io_uring.h, Linux 5.1).

/// Offset of the `op_flags` union (`rw_flags`, `fsync_flags`, ...) in `struct io_uring_sqe`,
/// which the io-uring crate writes but does not let us read back from an `Entry`.
pub const SQE_OP_FLAGS_OFFSET: usize = 28;
/// Size of `struct io_uring_sqe` (without SQE128).
pub const SQE_SIZE: usize = 64;

// The layouts the kernel reads; the kernel matrix (6.1, 6.12, 7.x) checks they are accepted.
const _: () = assert!(std::mem::size_of::<TaskRestrictionHeader>() == 16);
const _: () = assert!(std::mem::size_of::<io_uring::squeue::Entry>() == SQE_SIZE);
