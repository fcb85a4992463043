//! The restricted ring: its policy (what the kernel will allow), the one place that builds a
//! ring and locks it down, and the task-level allowlist every ring of the process inherits
//! (Linux 7.0+: `task` installs it, `process` decides whether startup needs it).

pub mod builder;
pub mod policy;
pub mod process;
pub mod task;

pub use builder::{build_ring, RingSetup};
pub use policy::{RegisterOp, RingPolicy, SqeOp};
