//! The old name of [`crate::queues::Queues`], kept only while `QueueLoop` imports it from
//! here: drop this file once it imports `crate::queues::Queues`.

pub use crate::queues::Queues as BlkBackend;
