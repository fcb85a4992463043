//! The restricted ring: its policy (what the kernel will allow) and the one place that
//! builds a ring and locks it down.

pub mod builder;
pub mod policy;
pub mod task;

pub use builder::{build_ring, RingSetup};
pub use policy::{RegisterOp, RingPolicy, SqeOp};
