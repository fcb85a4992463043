//! The vring type the backend serves. Today the `vhost-user-backend` crate's own
//! `VringRwLock`; a guarded wrapper (kick and call fds checked and made non-blocking) goes here.

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// The vring type the backend serves.
pub type Vring = vhost_user_backend::VringRwLock<GuestMemoryAtomic<GuestMemoryMmap>>;
