//! ringfence: a vhost-user-blk backend that serves one disk image from io_uring rings the
//! kernel locks down.
//!
//! Layout: `cli` (options), `config` (the virtio-blk device model), `image` (the disk image),
//! `kernel` (what the running kernel enforces, probed once), `request` (pure request parsing), `guest_map` (guest-memory translation to fixed buffers),
//! `ring` (ring policy and the one ring builder), `worker` (the per-queue worker loop),
//! `inflight` (inflight I/O tracking across restarts), `dirty_log` (the migration's
//! dirty-page log), `control` (the vhost-user request
//! handler and each queue's event loop), `backend` (vhost-user glue), `sandbox` (seccomp and signals), `daemon` (socket and
//! connection loop), `stats` (the I/O counters and their Prometheus encoding), `error` (every
//! error, in one place).

pub mod backend;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dirty_log;
pub mod error;
pub mod guest_map;
pub mod image;
pub mod inflight;
pub mod kernel;
pub mod ops;
pub mod opsctl;
pub mod queues;
pub mod request;
pub mod ring;
pub mod sandbox;
pub mod socket;
pub mod stats;
pub mod vmm_channel;
pub mod vring;
pub mod worker;
