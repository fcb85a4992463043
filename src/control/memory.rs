//! Memory tables: SET_MEM_TABLE, ADD_MEM_REG and REM_MEM_REG, checked (slots, `--max-guest-ram`)
//! and sorted by guest address before [`crate::queues::Queues::set_memory`] serves them; and the
//! VMM's addresses translated to guest addresses.

use std::fs::File;
use std::io;
use std::sync::Arc;

use log::{error, warn};
use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserSingleMemoryRegion};
use vhost::vhost_user::{Error as VhostUserError, Result as VhostUserResult};
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::device::{invalid, Device};

/// Memory slots offered with CONFIGURE_MEM_SLOTS (QEMU's limit for vhost-user).
pub(super) const MAX_MEM_SLOTS: u64 = 509;

/// Where one region of the VMM's address space lies in guest-physical memory (the VMM gives
/// vring addresses in its own address space).
pub(super) struct AddrMapping {
    pub(super) vmm_addr: u64,
    pub(super) size: u64,
    pub(super) gpa_base: u64,
}

/// The host's RAM (MemTotal), the default `--max-guest-ram`. From sysinfo(2), which needs no
/// open: the process filter forbids opening /proc/meminfo once the daemon runs.
pub(super) fn host_ram() -> u64 {
    // SAFETY: an all-zero sysinfo is a valid value of this plain C struct; sysinfo fills it.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: sysinfo writes into `si`, which we own.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        warn!(
            "cannot read the host's RAM size ({}): guest RAM is not capped",
            io::Error::last_os_error()
        );
        return u64::MAX;
    }
    (si.totalram as u64).saturating_mul(u64::from(si.mem_unit.max(1)))
}

impl Device {
    pub(super) fn vmm_va_to_gpa(&self, va: u64) -> VhostUserResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa_base)
            .ok_or_else(|| invalid(format!("address {va:#x} is in no memory region")))
    }

    /// Serve `mem` from now on: its mappings are known to the SIGBUS handler and checked
    /// against their files before any worker can see them (`Queues::set_memory`).
    pub(super) fn install_memory(&mut self, mem: GuestMemoryMmap) -> VhostUserResult<()> {
        self.queues
            .set_memory(&self.mem, mem)
            .map_err(VhostUserError::ReqHandlerError)
    }

    /// Refuse guest RAM of `total` bytes above `--max-guest-ram`, before anything is mapped.
    pub(super) fn check_guest_ram(&self, total: Option<u64>) -> VhostUserResult<()> {
        match total {
            Some(t) if t <= self.max_guest_ram => Ok(()),
            _ => {
                let t = total.map_or_else(|| "more than 2^64".into(), |t| t.to_string());
                error!(
                    "refusing a memory table of {t} bytes of guest RAM: more than \
                     --max-guest-ram ({} bytes); guest RAM is pinned, so fully populated on \
                     this host",
                    self.max_guest_ram
                );
                Err(invalid(format!(
                    "guest RAM of {t} bytes exceeds --max-guest-ram ({} bytes)",
                    self.max_guest_ram
                )))
            }
        }
    }

    /// Guest-physical addresses below this are guest RAM.
    pub(super) fn guest_ram_end(&self) -> u64 {
        self.mappings
            .iter()
            .map(|m| m.gpa_base.saturating_add(m.size))
            .max()
            .unwrap_or(0)
    }

    pub(super) fn do_set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
    ) -> VhostUserResult<()> {
        if ctx.len() as u64 > MAX_MEM_SLOTS {
            return Err(invalid(format!(
                "{} memory regions: more than the {MAX_MEM_SLOTS} slots offered",
                ctx.len()
            )));
        }
        self.check_guest_ram(
            ctx.iter()
                .try_fold(0u64, |sum, r| sum.checked_add(r.memory_size)),
        )?;
        // Any order is valid vhost-user; vm-memory wants the regions sorted by guest address.
        let mut table: Vec<(&VhostUserMemoryRegion, File)> = ctx.iter().zip(files).collect();
        table.sort_by_key(|(r, _)| r.guest_phys_addr);
        let mut regions = Vec::with_capacity(table.len());
        let mut mappings = Vec::with_capacity(table.len());
        for (r, file) in table {
            let region =
                GuestRegionMmap::new(r.mmap_region(file)?, GuestAddress(r.guest_phys_addr))
                    .ok_or_else(|| invalid("a memory region wraps around the address space"))?;
            mappings.push(AddrMapping {
                vmm_addr: r.user_addr,
                size: r.memory_size,
                gpa_base: r.guest_phys_addr,
            });
            regions.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| invalid(format!("memory table: {e}")))?;
        self.install_memory(mem)?;
        self.mappings = mappings;
        self.check_log_covers();
        Ok(())
    }

    /// ADD_MEM_REG: one more region, within the slots offered and `--max-guest-ram`.
    pub(super) fn do_add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VhostUserResult<()> {
        if postcopy_listening.is_some() {
            return Err(VhostUserError::InvalidOperation(
                "postcopy is not supported",
            ));
        }
        let current = self.mem.memory();
        if current.num_regions() as u64 >= MAX_MEM_SLOTS {
            return Err(invalid(format!(
                "a memory region past the {MAX_MEM_SLOTS} slots offered"
            )));
        }
        self.check_guest_ram(
            current
                .iter()
                .map(|r| r.len())
                .try_fold(region.memory_size, |sum, l| sum.checked_add(l)),
        )?;
        drop(current);
        let guest_region = Arc::new(
            GuestRegionMmap::new(
                region.mmap_region(fd)?,
                GuestAddress(region.guest_phys_addr),
            )
            .ok_or_else(|| invalid("a memory region wraps around the address space"))?,
        );
        let mem = self
            .mem
            .memory()
            .insert_region(guest_region)
            .map_err(|e| invalid(format!("memory region: {e}")))?;
        self.install_memory(mem)?;
        self.mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(())
    }

    /// REM_MEM_REG: one region fewer.
    pub(super) fn do_remove_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
    ) -> VhostUserResult<()> {
        let (mem, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(|e| invalid(format!("memory region: {e}")))?;
        self.install_memory(mem)?;
        self.mappings
            .retain(|m| m.gpa_base != region.guest_phys_addr);
        Ok(())
    }
}
