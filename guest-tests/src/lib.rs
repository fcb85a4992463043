//! Tests of ringfence from the guest's side: a real Linux guest in QEMU (`qemu/`, `tests/qemu_guest.rs`)
//! and a hostile virtio driver speaking vhost-user itself (`tests/hostile.rs`,
//! `tests/hostile_protocol.rs`).

pub mod blk;
pub mod daemon;
pub mod frontend;
pub mod image;
pub mod memory;
pub mod migration;
pub mod rig;
pub mod virtq;
