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

use vmfork_proto::crc::Crc32;
use vmfork_proto::snapshot::{encode_run, Snapshot, SnapshotHeader};

use super::devices::Devices;
use super::vm::{NewIdentity, Vcpu, VcpuState, Vm, VmState};
use super::{El1Sysregs, GuestRegs, Host, PauthKeys, VcpuCtx, VmTable};
use crate::addr::{Ipa, PAGE_SIZE};
use crate::guest_dtb::layout;
use crate::snapshot::{check_header, SavedCtx, SavedRegs, SavedVcpu, SavedVcpuState, SavedVm};
use crate::vgic::CpuIfState;

/// Pages per run in a snapshot.
const RUN_PAGES: u64 = 16;

/// A vCPU's context in the snapshot encoding. The list registers are a cache of the vGIC that
/// the monitor refills before every entry, so they are never saved.
fn save_ctx(ctx: &VcpuCtx) -> SavedCtx {
    let r = &ctx.regs;
    SavedCtx {
        regs: SavedRegs {
            x: r.x,
            pc: r.pc,
            pstate: r.pstate,
            reserved: 0,
            v: r.v,
            fpcr: r.fpcr,
            fpsr: r.fpsr,
        },
        sys: ctx.sys.to_array(),
        pauth: ctx.pauth.to_array(),
        cpuif: CpuIfState::default(),
    }
}

/// A vCPU's context from a snapshot [`SavedVm::validate`] accepted.
fn load_ctx(saved: &SavedCtx) -> VcpuCtx {
    let mut regs = GuestRegs::default();
    regs.x = saved.regs.x;
    regs.pc = saved.regs.pc;
    regs.pstate = saved.regs.pstate;
    regs.v = saved.regs.v;
    regs.fpcr = saved.regs.fpcr;
    regs.fpsr = saved.regs.fpsr;
    VcpuCtx {
        regs,
        sys: El1Sysregs::from_array(&saved.sys),
        pauth: PauthKeys::from_array(&saved.pauth),
        cpuif: CpuIfState::default(),
    }
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
pub fn begin<H: Host>(t: &VmTable<H>, id: u32, name: &str) -> Result<Dump, String> {
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
            ctx: save_ctx(ctx),
            state: match v.state {
                VcpuState::Off => SavedVcpuState::Off,
                // A vCPU whose context is in the table is not running: a snapshot never says so.
                VcpuState::Runnable | VcpuState::Running(_) => SavedVcpuState::Runnable,
                VcpuState::Waiting => SavedVcpuState::Waiting,
            },
            mpidr: v.mpidr,
        });
    }
    let saved = SavedVm {
        vcpus,
        vgic: (*vm.devices.vgic).clone(),
        uart: vm.devices.uart.clone(),
        virtual_count: t.host.now().wrapping_sub(vm.cntvoff),
        generation: vm.generation,
    };
    let state = saved
        .encode()
        .map_err(|e| format!("encoding the state: {e}"))?;
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
    pub fn scan<H: Host>(&mut self, t: &VmTable<H>, max_pages: u64) -> Result<bool, String> {
        let vm = t.vms.get(&self.vm).ok_or("the dump's VM is gone")?;
        let s2 = vm.s2.as_ref().ok_or("the dump's VM is being torn down")?;
        let mut page = [0u8; PAGE_SIZE as usize];
        let end = self.pages.min(self.scanned.saturating_add(max_pages));
        for p in self.scanned..end {
            let ipa = Ipa(layout::RAM_BASE + p * PAGE_SIZE);
            t.host
                .with_mem(|cx| s2.read_guest(&*cx.mem, ipa, &mut page))
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
    pub fn read<H: Host>(
        &mut self,
        t: &VmTable<H>,
        offset: u64,
        max: usize,
    ) -> Result<Vec<u8>, String> {
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
                let ipa = Ipa(layout::RAM_BASE + first * PAGE_SIZE);
                t.host
                    .with_mem(|cx| s2.read_guest(&*cx.mem, ipa, &mut data))
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

/// Creates a running VM from snapshot `bytes`. Everything the file says is checked before
/// anything is allocated or changed (`vmfork_core::snapshot` lists the checks): the container
/// and its page runs, the header against the machine's free memory, then every vCPU and device
/// field. A restore that fails changes nothing.
pub fn restore<H: Host>(t: &mut VmTable<H>, bytes: &[u8]) -> Result<u32, String> {
    let parsed = Snapshot::parse(bytes).map_err(|e| format!("not a snapshot: {e}"))?;
    let header = &parsed.header;
    let free_frames = t.host.with_mem(|cx| cx.frames.free_frames());
    check_header(
        header.vcpus,
        header.mem_bytes,
        header.ram_base,
        header.name,
        header.cmdline,
        free_frames as u64,
    )
    .map_err(|e| format!("snapshot refused: {e}"))?;
    let saved = SavedVm::decode(header.state).map_err(|e| format!("snapshot refused: {e}"))?;
    saved
        .validate(header.vcpus)
        .map_err(|e| format!("snapshot refused: {e}"))?;

    // Everything is known good: build.
    // A restored VM gets its VMID when it is first picked to run.
    let id = t.next_id;
    let genid = t.host.generation_id(id);
    let built = t.guest_memory(header.mem_bytes, &genid, |s2, cx| {
        for (first, data) in parsed.runs() {
            s2.write_guest(cx, Ipa(layout::RAM_BASE + first * PAGE_SIZE), data)?;
        }
        Ok(())
    });
    let s2 = match built {
        Ok(s2) => s2,
        Err(e) => {
            return Err(format!("{e}"));
        }
    };
    let now = t.host.now();
    let mut vcpus = Vec::new();
    for v in &saved.vcpus {
        let ctx = vcpus
            .try_reserve(1)
            .ok()
            .and_then(|()| t.host.try_box(load_ctx(&v.ctx)).ok());
        let Some(ctx) = ctx else {
            // Give the tables back: a restore that fails changes nothing.
            let _ = t.host.with_mem(|cx| s2.destroy(cx));
            return Err(String::from("out of memory: monitor heap low"));
        };
        let state = match v.state {
            SavedVcpuState::Off => VcpuState::Off,
            SavedVcpuState::Waiting => VcpuState::Waiting,
            // `validate` refused `Running`.
            SavedVcpuState::Runnable | SavedVcpuState::Running(_) => VcpuState::Runnable,
        };
        vcpus.push(Vcpu::new(Some(ctx), state, v.mpidr));
    }
    let SavedVm {
        vgic,
        uart,
        virtual_count,
        generation,
        ..
    } = saved;
    let nr_runs = parsed.nr_runs;
    let ram_size = header.mem_bytes;
    let (name, cmdline) = (String::from(header.name), String::from(header.cmdline));
    t.next_id += 1;
    let mut vm = Vm::new(
        id,
        name,
        VmState::Running,
        s2,
        vcpus,
        Devices::new(vgic, uart),
        now.wrapping_sub(virtual_count),
        ram_size,
        cmdline,
        genid,
    );
    vm.generation = generation;
    vm.stats.born = now;
    // A restored VM is a new clone of the one dumped: its new ID is already in place
    // (guest_memory wrote it); tell it through the vmgenid interrupt.
    vm.new_identity = NewIdentity::Pending;
    // The VM's own box: within the estimate the control server checked the heap for.
    t.vms.insert(id, alloc::boxed::Box::new(vm));
    log::info!(
        "vm{id}: restored from a snapshot: {} MiB, {} vCPU(s), {} page runs",
        ram_size >> 20,
        t.vms.get(&id).map_or(0, |vm| vm.vcpus.len()),
        nr_runs
    );
    Ok(id)
}
