//! The restricted ring: its policy (what the kernel will allow), the one place that builds a
//! ring and locks it down (and swaps its fixed buffers), each queue's set of rings made at
//! startup (`set`), and the task-level allowlist a ring created later would inherit (Linux
//! 7.0+: `task` installs it, `process` decides whether startup needs it).

pub mod builder;
pub mod policy;
pub mod process;
pub mod set;
pub mod task;

pub use builder::{build_ring, register_buffers, unregister_buffers, RingSetup};
pub use policy::{RegisterOp, RingPolicy, SqeOp};
pub use set::RingSet;
