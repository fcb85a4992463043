//! The vhost-user control plane: one VMM connection's request loop ([`serve`]) and the device it
//! drives ([`Device`]), which starts each queue's worker loop ([`crate::worker::QueueLoop`]).
//!
//! **Why our own handler.** The `vhost` crate frames, decodes and validates every message and
//! calls a handler trait (`VhostUserBackendReqHandlerMut`); `vhost-user-backend` supplies one
//! (with its own worker loops) but leaves out what this device needs: it answers
//! GET/SET_INFLIGHT_FD "not supported" (inflight tracking, so a restarted backend loses and
//! repeats nothing), builds guest memory from a memory table without sorting it (valid tables
//! in any order were refused), and ends the connection after any refused request (a VMM that
//! asked for something we refuse could not go on). Its handler is private, so it can be neither
//! wrapped nor extended. Implementing the trait ourselves is the least code that does all three
//! cleanly: the message framing stays the `vhost` crate's, the vrings stay
//! `vhost-user-backend`'s `VringRwLock` (inside [`crate::vring::Vring`]), and what serves I/O
//! is [`crate::queues::Queues`], which the device calls directly.
//!
//! SET_LOG_FD is the one message the crate does not dispatch: [`log_fd`] takes it off the
//! socket before the crate reads it.
//!
//! **Refusals.** A request the device refuses is answered with a nack where the VMM asked for an
//! answer (REPLY_ACK), and the connection goes on. A message that cannot be decoded, a request
//! whose answer is a value we cannot give, or a broken socket ends the connection.

mod device;
mod handler;
mod log_fd;
mod memory;
mod migration;
#[cfg(test)]
mod tests;
mod vrings;

pub use device::Device;

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{BackendReqHandler, Error as VhostUserError};

/// Serve one VMM connection until it ends; `Ok` when the VMM hung up.
pub fn serve(stream: UnixStream, device: Arc<Mutex<Device>>) -> Result<(), VhostUserError> {
    let peek = stream.try_clone().map_err(VhostUserError::SocketBroken)?;
    let mut handler = BackendReqHandler::from_stream(stream, device.clone());
    loop {
        // SET_LOG_FD, which the crate does not dispatch (see `log_fd`).
        if let Some(m) = log_fd::take(&peek).map_err(VhostUserError::SocketBroken)? {
            let needs_reply = m.needs_reply();
            let mut d = device.lock().unwrap_or_else(|p| p.into_inner());
            let ok = d.set_log_fd(m.fds);
            if needs_reply && d.reply_ack() {
                log_fd::reply(&peek, ok).map_err(VhostUserError::SocketBroken)?;
            }
            continue;
        }
        device
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .begin_request();
        match handler.handle_request() {
            Ok(()) => {}
            Err(e) => {
                let go_on = device
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take_refused(&e);
                if go_on {
                    continue;
                }
                return match e {
                    VhostUserError::Disconnected
                    | VhostUserError::PartialMessage
                    | VhostUserError::SocketBroken(_) => Ok(()),
                    e => Err(e),
                };
            }
        }
    }
}
