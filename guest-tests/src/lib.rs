//! Tests of ringfence from the guest's side: a real Linux guest in QEMU (`qemu/`, `tests/qemu_guest.rs`)
//! and a hostile virtio driver speaking vhost-user itself (`tests/hostile.rs`).

pub mod daemon;
