//! Dump and restore: a VM as a self-describing snapshot (`vmfork_proto::snapshot` format).
//!
//! A dump is taken from a paused fork of the VM, made inside the monitor when the dump starts
//! (constant time), so the VM itself keeps running while the snapshot is read out: the Redis
//! BGSAVE pattern at VM level. The snapshot holds the vCPU and device state (postcard-encoded
//! [`SavedVm`]) and every non-zero guest page; pages are read as the client asks for them, so
//! the monitor never holds the whole snapshot in memory. Restore rebuilds a VM from one.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};
use vmfork_core::addr::{Ipa, PAGE_SIZE};
use vmfork_core::guest_dtb::layout;
use vmfork_core::vgic::Vgic;
use vmfork_core::vuart::Vuart;
use vmfork_proto::crc::Crc32;
use vmfork_proto::snapshot::{encode_run, Snapshot, SnapshotHeader};

use crate::vm::{guest_memory, new_generation_id, Vcpu, VcpuCtx, VcpuState, Vm, VmState, VmTable};

/// Pages per run in a snapshot.
const RUN_PAGES: u64 = 16;

/// One vCPU in a snapshot.
#[derive(Serialize, Deserialize)]
struct SavedVcpu {
    ctx: VcpuCtx,
    state: VcpuState,
    mpidr: u64,
}

/// Everything but memory.
#[derive(Serialize, Deserialize)]
struct SavedVm {
    vcpus: Vec<SavedVcpu>,
    vgic: Vgic,
    uart: Vuart,
    /// The guest's virtual counter when the snapshot was taken; a restored VM's clock goes on
    /// from there.
    virtual_count: u64,
    generation: u64,
}

/// A snapshot being read out.
pub struct Dump {
    /// The paused fork the snapshot is read from (torn down by [`Dump::close`]).
    pub vm: u32,
    prefix: Vec<u8>,
    runs: Vec<(u64, u64)>,
    /// Snapshot length in bytes.
    pub total: u64,
    cursor: u64,
    next: usize,
    prefix_sent: bool,
    end_sent: bool,
    crc: Crc32,
    pending: Vec<u8>,
    /// Pages looked at by [`Dump::scan`] so far, of `pages`.
    scanned: u64,
    pages: u64,
}

fn page_is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// Starts a dump of `vm` (a paused fork made for the purpose): encodes the header and state.
/// The non-zero pages are found by [`Dump::scan`], in steps, before the first read.
pub fn begin(t: &VmTable, id: u32, name: &str) -> Result<Dump, String> {
    let vm = t
        .vms
        .get(&id)
        .ok_or_else(|| format!("no such VM: vm{id}"))?;
    if vm.s2.is_none() {
        return Err(String::from("the VM is being torn down"));
    }
    let mut vcpus = Vec::new();
    for v in &vm.vcpus {
        let ctx = v.ctx.as_ref().ok_or("a vCPU is running")?;
        vcpus.push(SavedVcpu {
            ctx: (**ctx).clone(),
            state: match v.state {
                VcpuState::Running(_) => VcpuState::Runnable,
                s => s,
            },
            mpidr: v.mpidr,
        });
    }
    let saved = SavedVm {
        vcpus,
        vgic: (*vm.vgic).clone(),
        uart: vm.uart.clone(),
        virtual_count: crate::arch::counter().0.wrapping_sub(vm.cntvoff),
        generation: vm.generation,
    };
    let state = postcard::to_allocvec(&saved).map_err(|e| format!("encoding the state: {e}"))?;
    let header = SnapshotHeader {
        name: String::from(name),
        vcpus: vm.vcpus.len() as u32,
        mem_bytes: vm.ram_size,
        ram_base: layout::RAM_BASE,
        cmdline: vm.cmdline.clone(),
        state,
    };
    let mut prefix = Vec::new();
    header.encode(&mut prefix);

    let pages = vm.ram_size / PAGE_SIZE;
    // The end marker and CRC; the runs are added by `scan`.
    let total = prefix.len() as u64 + 5;
    Ok(Dump {
        vm: id,
        prefix,
        runs: Vec::new(),
        total,
        cursor: 0,
        next: 0,
        prefix_sent: false,
        end_sent: false,
        crc: Crc32::new(),
        pending: Vec::new(),
        scanned: 0,
        pages,
    })
}

impl Dump {
    /// Looks at up to `max_pages` more pages for the runs of non-zero pages (RUN_PAGES at most
    /// each), adding them to `total`. Returns true once every page has been looked at. Called
    /// with the VM lock held for one step only, so a large VM never holds it for the whole scan;
    /// the dumped VM is a paused internal fork, so its memory does not change in between.
    pub fn scan(&mut self, t: &VmTable, max_pages: u64) -> Result<bool, String> {
        let vm = t.vms.get(&self.vm).ok_or("the dump's VM is gone")?;
        let s2 = vm.s2.as_ref().ok_or("the dump's VM is being torn down")?;
        let mem = crate::physmem::IdentityMem;
        let mut page = [0u8; PAGE_SIZE as usize];
        let end = self.pages.min(self.scanned.saturating_add(max_pages));
        for p in self.scanned..end {
            let ipa = Ipa(layout::RAM_BASE + p * PAGE_SIZE);
            s2.read_guest(&mem, ipa, &mut page)
                .map_err(|e| format!("reading page {p}: {e}"))?;
            if page_is_zero(&page) {
                continue;
            }
            match self.runs.last_mut() {
                Some((first, n)) if *first + *n == p && *n < RUN_PAGES => {
                    *n += 1;
                    self.total += PAGE_SIZE;
                }
                _ => {
                    self.runs
                        .try_reserve(1)
                        .map_err(|_| String::from("out of memory listing the page runs"))?;
                    self.runs.push((p, 1));
                    self.total += 13 + PAGE_SIZE;
                }
            }
        }
        self.scanned = end;
        Ok(self.scanned == self.pages)
    }

    /// The next at most `max` bytes of the snapshot, which must be read in order from `offset`.
    /// Empty at the end.
    pub fn read(&mut self, t: &VmTable, offset: u64, max: usize) -> Result<Vec<u8>, String> {
        if self.scanned != self.pages {
            return Err(String::from("the dump's pages have not been scanned yet"));
        }
        if offset != self.cursor {
            return Err(format!(
                "dump reads must be sequential: asked for offset {offset}, next is {}",
                self.cursor
            ));
        }
        while self.pending.len() < max && !self.end_sent {
            let start = self.pending.len();
            if !self.prefix_sent {
                self.pending.extend_from_slice(&self.prefix);
                self.prefix_sent = true;
            } else if let Some(&(first, n)) = self.runs.get(self.next) {
                let vm = t.vms.get(&self.vm).ok_or("the dump's VM is gone")?;
                let s2 = vm.s2.as_ref().ok_or("the dump's VM is being torn down")?;
                let mut data = alloc::vec![0u8; (n * PAGE_SIZE) as usize];
                s2.read_guest(
                    &crate::physmem::IdentityMem,
                    Ipa(layout::RAM_BASE + first * PAGE_SIZE),
                    &mut data,
                )
                .map_err(|e| format!("reading pages at {first}: {e}"))?;
                encode_run(first, &data, &mut self.pending);
                self.next += 1;
            } else {
                self.pending.push(0);
                self.crc.update(&self.pending[start..]);
                let crc = core::mem::replace(&mut self.crc, Crc32::new()).finish();
                self.pending.extend_from_slice(&crc.to_le_bytes());
                self.end_sent = true;
                continue;
            }
            self.crc.update(&self.pending[start..]);
        }
        let n = max.min(self.pending.len());
        let out: Vec<u8> = self.pending.drain(..n).collect();
        self.cursor += out.len() as u64;
        Ok(out)
    }
}

/// Creates a running VM from snapshot `bytes`.
pub fn restore(t: &mut VmTable, bytes: &[u8]) -> Result<u32, String> {
    let mut runs: Vec<(u64, usize, usize)> = Vec::new();
    let base = bytes.as_ptr() as usize;
    let header = Snapshot::visit(bytes, |first, data| {
        runs.push((first, data.as_ptr() as usize - base, data.len()));
    })
    .map_err(|e| format!("not a snapshot: {e}"))?;
    if header.ram_base != layout::RAM_BASE {
        return Err(format!(
            "guest RAM at {:#x}, expected {:#x}",
            header.ram_base,
            layout::RAM_BASE
        ));
    }
    if header.mem_bytes == 0 || header.mem_bytes % (2 << 20) != 0 {
        return Err(format!("guest RAM of {} bytes", header.mem_bytes));
    }
    let saved: SavedVm =
        postcard::from_bytes(&header.state).map_err(|e| format!("vCPU and device state: {e}"))?;
    if saved.vcpus.is_empty()
        || saved.vcpus.len() != header.vcpus as usize
        || saved.vcpus.len() > layout::MAX_VCPUS as usize
        || saved.vgic.nr_vcpus() != saved.vcpus.len()
    {
        return Err(String::from("the state does not match the vCPU count"));
    }
    let vmid = t.vmids.alloc().ok_or("no VMID left")?;
    let id = t.next_id;
    let genid = new_generation_id(id);
    let built = guest_memory(vmid, header.mem_bytes, &genid, |s2, cx| {
        for &(first, off, len) in &runs {
            s2.write_guest(
                cx,
                Ipa(layout::RAM_BASE + first * PAGE_SIZE),
                &bytes[off..off + len],
            )?;
        }
        Ok(())
    });
    let s2 = match built {
        Ok(s2) => s2,
        Err(e) => {
            t.vmids.free(vmid);
            return Err(format!("{e}"));
        }
    };
    let now = crate::arch::counter().0;
    let vcpus = saved
        .vcpus
        .into_iter()
        .map(|v| Vcpu {
            ctx: Some(alloc::boxed::Box::new(v.ctx)),
            state: v.state,
            mpidr: v.mpidr,
        })
        .collect();
    let vgic = saved.vgic;
    t.next_id += 1;
    t.vms.insert(
        id,
        Vm {
            id,
            name: header.name,
            state: VmState::Running,
            s2: Some(s2),
            vcpus,
            vgic: vmfork_core::shared::Shared::new(vgic),
            uart: saved.uart,
            cntvoff: now.wrapping_sub(saved.virtual_count),
            ram_size: header.mem_bytes,
            cmdline: header.cmdline,
            line: Vec::new(),
            parent: None,
            generation: saved.generation,
            genid,
            // A restored VM is a new clone of the one dumped: its new ID is already in place
            // (guest_memory wrote it); tell it through the vmgenid interrupt.
            new_identity: crate::vm::NewIdentity::Pending,
            fork_point: None,
            pending: None,
            stats: Default::default(),
            console_attached: false,
            console_tap: Vec::new(),
            rx_pending: Default::default(),
        },
    );
    log::info!(
        "vm{id}: restored from a snapshot: {} MiB, {} vCPU(s), {} page runs",
        t.vms[&id].ram_size >> 20,
        t.vms[&id].vcpus.len(),
        runs.len()
    );
    Ok(id)
}
