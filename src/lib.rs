//! ringfence: a vhost-user-blk backend that serves one disk image from io_uring rings the
//! kernel locks down.

pub mod cli;
pub mod config;
pub mod error;
pub mod guest_map;
pub mod request;
