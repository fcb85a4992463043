//! The process allowlist (Linux 7.0+): the task-level io_uring restrictions the daemon installs
//! on its main thread once its rings are made and before any other thread exists (`task.rs`
//! holds the mechanism), whether startup may go on without them, and how the log describes
//! what fences the rings.

use super::task::restrict_current_task;
use super::RingPolicy;
use crate::error::{KernelError, RingError, StartupError};
use crate::kernel::{Kernel, TaskRestrictions};

/// Install the process-wide io_uring allowlist where the kernel has task-level restrictions
/// (Linux 7.0+). Call on the main thread once the rings are made (they keep their own
/// allowlists) and before it spawns any thread: every thread and every ring created afterwards
/// inherits it. Returns the allowlist installed, if any.
///
/// Fails closed: on a kernel that has task restrictions, or where the probe cannot tell,
/// anything but installing the allowlist refuses startup with the reason. Only a kernel
/// without the feature (the probe's "not supported" answers) goes on without it.
pub fn restrict_process_rings(read_only: bool) -> Result<Option<RingPolicy>, StartupError> {
    let kernel = Kernel::get();
    process_rings_decision(kernel)?;
    match kernel.task_restrictions {
        TaskRestrictions::Available => {
            let policy = RingPolicy::for_process(!read_only, kernel.vectored_fixed);
            restrict_current_task(&policy).map_err(RingError::RestrictProcess)?;
            Ok(Some(policy))
        }
        _ => Ok(None),
    }
}

/// Whether startup may go on given what the kernel probe found: `Ok(true)` to install the
/// process allowlist, `Ok(false)` where the kernel has none, else why not to start. Pure.
pub fn process_rings_decision(kernel: &Kernel) -> Result<bool, StartupError> {
    match kernel.task_restrictions {
        TaskRestrictions::Available => Ok(true),
        TaskRestrictions::Absent => Ok(false),
        TaskRestrictions::Inherited => Err(RingError::InheritedRestrictions.into()),
        // io_uring_register refused for every opcode: on a kernel that has task restrictions
        // the allowlist cannot go on. Before 7.0 there is nothing to install (and the rings
        // could not be built either: `kernel::check_io_uring` reports that first).
        TaskRestrictions::Blocked if kernel.at_least(7, 0) || kernel.version.is_none() => {
            Err(KernelError::TaskRestrictionsBlocked {
                release: kernel.release.clone(),
            }
            .into())
        }
        TaskRestrictions::Blocked => Ok(false),
        TaskRestrictions::Unknown(errno) => Err(KernelError::TaskProbeUnexpected {
            source: std::io::Error::from_raw_os_error(errno),
        }
        .into()),
    }
}

/// The part of the sandbox's log line about io_uring: what stops a ring from doing more than
/// fixed-buffer I/O on the image, and what stops a thread from making another ring, given
/// whether the seccomp filters are on and the process allowlist installed (if any).
pub fn describe(sandboxed: bool, process_rings: Option<&RingPolicy>) -> String {
    let own = "io_uring: every ring was made at startup with its own allowlist (fixed files and \
               buffers only, the opcodes of one feature set, FIXED_FILE required, of the \
               register opcodes only the buffer swap)";
    let setup = if sandboxed {
        "; no thread can make another ring (seccomp denies io_uring_setup to every thread, and \
         io_uring_register to every thread but the control thread, which may only swap \
         fixed buffers)"
    } else {
        "; without the seccomp sandbox any thread could make another ring"
    };
    let task = match process_rings {
        Some(p) => format!(
            "; a ring created now would inherit the process allowlist (task-level \
             restrictions: {p})"
        ),
        None => "; no task-level restrictions on this kernel (Linux 7.0+)".to_string(),
    };
    format!("{own}{setup}{task}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel(release: &str, task: TaskRestrictions) -> Kernel {
        Kernel {
            release: release.into(),
            version: release
                .split('.')
                .take(2)
                .map(|v| v.parse().ok())
                .collect::<Option<Vec<u32>>>()
                .map(|v| (v[0], v[1])),
            vectored_fixed: true,
            task_restrictions: task,
        }
    }

    /// Issue 21, item 7: the process allowlist fails closed. Only a kernel without task
    /// restrictions starts without it; an unexpected probe answer, inherited restrictions, or
    /// a refused io_uring_register on a 7.x kernel refuse startup, each with its reason.
    #[test]
    fn the_process_allowlist_fails_closed() {
        use TaskRestrictions::*;
        assert!(process_rings_decision(&kernel("7.2.13", Available)).unwrap());
        assert!(!process_rings_decision(&kernel("6.12.1", Absent)).unwrap());
        assert!(!process_rings_decision(&kernel("6.1.0", Blocked)).unwrap());
        let refused = |k: Kernel| {
            process_rings_decision(&k)
                .expect_err("must refuse")
                .to_string()
        };
        assert!(refused(kernel("7.2.13", Unknown(libc::ENOMEM))).contains("unexpected answer"));
        assert!(refused(kernel("6.12.1", Unknown(libc::EINTR))).contains("unexpected answer"));
        assert!(refused(kernel("7.2.13", Blocked)).contains("allow io_uring_register"));
        assert!(refused(kernel("7.2.13", Inherited)).contains("task-level io_uring restrictions"));
    }
}
