//! ringfence: a vhost-user-blk backend that serves one disk image from io_uring rings the
//! kernel locks down.
//!
//! Layout, from the VMM's socket to the disk:
//! - `daemon` (the accept loop: a fresh device per VMM connection), `socket` (the listening
//!   sockets), `cli` (options), `main.rs` (the binary);
//! - `control` (the vhost-user control plane: the request loop and [`control::Device`], which
//!   the VMM drives; split by job into memory tables, vrings, migration and features);
//! - `queues` ([`queues::Queues`]: what serves I/O; the queues' worker states, their rings
//!   (made at startup, armed with each memory table for the negotiated features), the config
//!   space);
//! - `worker` (one queue's data path: its epoll loop, intake, SQEs, the rings' engine,
//!   completions, calls), `request` (pure request parsing), `guest_map` (guest memory to fixed
//!   buffers), `vring` (the vring type, kick and call fds checked), `ring` (ring policy, the
//!   one ring builder, each queue's rings made at startup, the process ring restrictions),
//!   `kernel` (what the running kernel enforces, probed once; `kernel::abi`, the kernel ABI
//!   the crates lack);
//! - `throttle` (the operator's I/O limits: IOPS and bandwidth, shared by the queues);
//! - `image` (the disk image and its lock), `config` (the virtio-blk device model; the
//!   sandbox choice), `inflight` (inflight I/O tracking across restarts), `dirty_log` (the
//!   migration's dirty-page log), `vmm_channel` (the backend request channel to the VMM);
//! - `sandbox` (seccomp filters, SIGBUS, signals);
//! - `ops` (the stats socket and live resize; a handle on what is served), `opsctl` (`ringfence
//!   stat` and `ringfence resize`), `stats` (the I/O counters and their Prometheus encoding);
//! - `error` (every error the daemon reports, in one place; `sandbox` keeps its own).

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
pub mod throttle;
pub mod vmm_channel;
pub mod vring;
pub mod worker;
