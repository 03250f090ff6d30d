//! The in-monitor benchmark driver: `bench=all` (or `bench=fork,cow,...`) on the command line.
//!
//! It runs on the boot CPU after `monitor: ready`, in place of the scheduler (other CPUs idle,
//! except in the `smp` phase).
//! `make bench` boots the monitor under `-icount shift=0`, so the physical counter follows
//! emulated instructions (one nanosecond each) and the figures repeat run to run. Every figure is
//! the physical counter read right before and after the operation only (not the lock taking, not
//! the logging), repeated, and reported as the median in emulated nanoseconds. Each result is one
//! line `bench: {json}` on the console; `tools/bench` turns them into the table, the JSON file
//! and the plot (docs/BENCHMARKS.md).
//!
//! Phases (`bench=` takes a comma-separated list of these, or `all`):
//! * `fork`: fork latency (`VmTable::fork_now`, one child) for 16, 64, 256 and 1024 MiB guests with
//!   1 and 2 vCPUs, and an *eager clone* beside it that copies every page at once (written here
//!   only, as the baseline; never run);
//! * `cow`: the first write to a shared page after a fork (`Stage2::handle_fault`), the first
//!   touch of each table (read faults that unshare a level-2 and a level-3 table), and a plain
//!   4 KiB copy in the same run;
//! * `reset`: `VmTable::reset_now` against the number of pages the child dirtied;
//! * `density`: frames and heap used per idle child, 100 children of a 64 MiB guest;
//! * `fuzz`: fork once, then reset and really run a small workload in the child, in a loop;
//! * `idle`: the fuzzing loop's throughput with 0, 1,000, 10,000 and 100,000 idle forks alive
//!   beside it (waiting in WFI with nothing armed, as a fork bomb's children do), and what one
//!   scheduler pick costs with nothing to run: whether idle VMs slow the ones that work;
//! * `scale`: fork idle children until something runs out, and say what;
//! * `smp` (named alone, never part of `all`): exits per second of 1 busy VM on 1 CPU against
//!   N busy VMs on N CPUs, with the other CPUs running the scheduler as they do in service. It
//!   needs a boot of its own: `tools/bench` starts QEMU for it with N + 1 CPUs, multi-threaded
//!   TCG and no `-icount` (under `-icount` QEMU runs the CPUs one after another, so emulated
//!   time is the sum of what they all did and no two exits can ever overlap). Its figures are
//!   host wall-clock time, so they are ratios taken within the one boot.
//!
//! Bench VMs are created paused from tiny arm64 `Image`s made here ([`workload_image`],
//! [`exit_loop_image`]); the `fuzz` and `idle` phases run them through `sched::run_vcpu` on this
//! CPU, the `smp` phase on the other CPUs' schedulers.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use vmfork_core::addr::{Ipa, PhysAddr, PAGE_SIZE};
use vmfork_core::guest_dtb::layout;
use vmfork_core::physmem::{PhysMem, TABLE_ENTRIES};
use vmfork_core::stage2::{desc, FaultOutcome, MemCtx, Stage2Error, TlbOps};

use crate::vm::{with_mem, GuestSpec, VmState, VmTable, VMS};

const MIB: u64 = 1 << 20;
/// Guest sizes of the fork-latency phase.
const FORK_SIZES_MIB: [u64; 4] = [16, 64, 256, 1024];
/// Repetitions of each fork measurement.
const FORK_REPS: usize = 9;
/// Repetitions of each eager clone (1 GiB guests get fewer: each copies 262,144 pages).
const EAGER_REPS: usize = 5;
const EAGER_REPS_1G: usize = 3;
/// Forks of the `cow` phase; each gives one first-touch sample and [`COW_WRITES`] COW samples.
const COW_FORKS: usize = 7;
const COW_WRITES: usize = 8;
/// Guest size of the `cow` and `reset` phases.
const COW_MEM_MIB: u64 = 256;
/// Pages dirtied before a timed reset.
const RESET_DIRTY: [u64; 5] = [0, 1, 16, 256, 4096];
const RESET_REPS: usize = 7;
/// Children of the density phase, and their parent's size.
const DENSITY_CHILDREN: usize = 100;
const DENSITY_MEM_MIB: u64 = 64;
/// Fuzzing loop: workload sizes (pages the child writes per run) and timed cycles each.
const FUZZ_DIRTY: [u16; 3] = [1, 16, 256];
const FUZZ_CYCLES: usize = 101;
const FUZZ_MEM_MIB: u64 = 64;
/// Idle phase: idle forks alive beside the working VM, and timed cycles at each count.
const IDLE_COUNTS: [usize; 4] = [0, 1000, 10_000, 100_000];
const IDLE_CYCLES: usize = 51;
/// Scale phase: parent size, and the heap kept free so the monitor itself never runs out.
const SCALE_MEM_MIB: u64 = 16;
const SCALE_HEAP_MARGIN: usize = 4 << 20;
/// Where the workload writes: 16 MiB into guest RAM (past its code and DTB).
const WORKLOAD_BUF: u64 = layout::RAM_BASE + 16 * MIB;
/// Offset of the workload's final `wfi` from the image start (see [`workload_image`]).
const WORKLOAD_WFI: u64 = 64 + 6 * 4;

/// SMP phase: alternating windows (1 VM, then N VMs), each after a warm-up, in host microseconds.
const SMP_ROUNDS: u64 = 9;
const SMP_WARMUP_MICROS: u64 = 100_000;
const SMP_WINDOW_MICROS: u64 = 400_000;
/// The most worker CPUs the `smp` phase uses.
const SMP_MAX_WORKERS: usize = 4;

/// The phases `bench=all` runs, in this order.
const PHASES: [&str; 7] = ["fork", "cow", "reset", "density", "fuzz", "idle", "scale"];

/// Whether `spec` is the `smp` phase, which runs with the other CPUs scheduling vCPUs (every
/// other phase wants them idle: it runs its VMs on this CPU).
pub fn wants_schedulers(spec: &str) -> bool {
    spec == "smp"
}

/// Runs the phases `spec` names (`all` or a comma-separated list), prints one `bench: {json}`
/// line per result, then stops QEMU (semihosting exit 0, or power off). `cpus`: CPUs online.
pub fn run(spec: &str, cpus: usize) -> ! {
    let (_, freq) = crate::arch::counter();
    let wanted: Vec<&str> = if spec == "all" {
        PHASES.to_vec()
    } else {
        spec.split(',').filter(|s| !s.is_empty()).collect()
    };
    let (free, total) = crate::mem::frame_counts();
    let (heap_used, heap_free) = crate::heap::usage();
    Line::new("info")
        .u("freq_hz", freq)
        .u("frames_total", total as u64)
        .u("frames_free", free as u64)
        .u("heap_bytes", (heap_used + heap_free) as u64)
        .u("heap_used", heap_used as u64)
        .u("cpus", cpus as u64)
        .s("phases", &wanted.join(","))
        .emit();
    let start = now();
    for phase in wanted {
        let t0 = now();
        let result = match phase {
            "fork" => phase_fork(),
            "cow" => phase_cow(),
            "reset" => phase_reset(),
            "density" => phase_density(),
            "fuzz" => phase_fuzz(),
            "idle" => phase_idle(),
            "scale" => phase_scale(),
            "smp" if wants_schedulers(spec) => phase_smp(cpus),
            "smp" => Err(String::from(
                "the smp phase runs alone (bench=smp): it needs the other CPUs scheduling",
            )),
            other => Err(format!(
                "unknown phase {other}; known: all, {}, smp",
                PHASES.join(", ")
            )),
        };
        if let Err(e) = result {
            Line::new("error").s("phase", phase).s("msg", &e).emit();
        }
        Line::new("phase")
            .s("phase", phase)
            .u("emulated_ns", ns(now() - t0))
            .emit();
    }
    let (free, _) = crate::mem::frame_counts();
    Line::new("done")
        .u("emulated_ns", ns(now() - start))
        .u("frames_free", free as u64)
        .emit();
    crate::arch::semihosting::exit(0)
}

// ---------------------------------------------------------------------------------------------
// Measuring and reporting

fn now() -> u64 {
    crate::arch::counter().0
}

/// Counter ticks to nanoseconds (emulated: one instruction per nanosecond under icount).
fn ns(ticks: u64) -> u64 {
    let freq = crate::arch::timer::freq().max(1);
    u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(freq)).unwrap_or(u64::MAX)
}

/// Median, minimum and maximum of a set of samples, in nanoseconds.
#[derive(Clone, Copy, Debug, Default)]
struct Summary {
    median: u64,
    min: u64,
    max: u64,
    reps: usize,
}

fn summarize(ticks: &[u64]) -> Summary {
    let mut v: Vec<u64> = ticks.iter().map(|&t| ns(t)).collect();
    v.sort_unstable();
    let n = v.len();
    if n == 0 {
        return Summary::default();
    }
    Summary {
        median: (v[(n - 1) / 2] + v[n / 2]) / 2,
        min: v[0],
        max: v[n - 1],
        reps: n,
    }
}

/// One `bench: {json}` line: a flat object of numbers and strings.
struct Line(String);

impl Line {
    fn new(kind: &str) -> Self {
        Line(format!("{{\"bench\":\"{kind}\""))
    }

    fn u(mut self, key: &str, v: u64) -> Self {
        self.0.push_str(&format!(",\"{key}\":{v}"));
        self
    }

    fn s(mut self, key: &str, v: &str) -> Self {
        let mut escaped = String::with_capacity(v.len());
        for c in v.chars() {
            match c {
                '"' | '\\' => {
                    escaped.push('\\');
                    escaped.push(c);
                }
                c if (c as u32) < 0x20 => escaped.push(' '),
                c => escaped.push(c),
            }
        }
        self.0.push_str(&format!(",\"{key}\":\"{escaped}\""));
        self
    }

    /// `median_ns`, `min_ns`, `max_ns` and `reps` of `s`.
    fn sum(self, s: &Summary) -> Self {
        self.u("median_ns", s.median)
            .u("min_ns", s.min)
            .u("max_ns", s.max)
            .u("reps", s.reps as u64)
    }

    fn emit(mut self) {
        self.0.push('}');
        crate::println!("bench: {}", self.0);
    }
}

fn used_frames() -> u64 {
    let (free, total) = crate::mem::frame_counts();
    (total - free) as u64
}

// ---------------------------------------------------------------------------------------------
// Bench VMs

/// A minimal arm64 `Image` (64-byte header, `text_offset` 0) whose code writes one 64-bit word
/// into each of `pages` consecutive pages at [`WORKLOAD_BUF`], then waits in `wfi` forever.
/// With the MMU off every access is a plain stage-2 access: each page written after a fork or
/// reset takes a COW fault, the code page an instruction-abort unshare.
fn workload_image(pages: u16) -> Vec<u8> {
    let pages = pages.max(1) as u32;
    let buf_hi = (WORKLOAD_BUF >> 16) as u32;
    let code: [u32; 8] = [
        0xD280_0001 | (pages << 5),  // movz x1, #pages
        0xD2A0_0002 | (buf_hi << 5), // movz x2, #(buf >> 16), lsl #16
        0xF900_0041,                 // 1: str x1, [x2]
        0x9140_0442,                 // add x2, x2, #1, lsl #12 (next page)
        0xF100_0421,                 // subs x1, x1, #1
        0x54FF_FFA1,                 // b.ne 1b
        0xD503_207F,                 // 2: wfi          (offset WORKLOAD_WFI)
        0x17FF_FFFF,                 // b 2b
    ];
    arm64_image(&code)
}

/// A minimal arm64 `Image` that takes an exit as fast as it can, for ever: it reads the UART's
/// flag register (a trapped MMIO read the monitor emulates) and counts the reads in the first
/// word of [`WORKLOAD_BUF`], so the monitor can read how many exits it took.
fn exit_loop_image() -> Vec<u8> {
    let uart_hi = (layout::UART_BASE >> 16) as u32;
    let buf_hi = (WORKLOAD_BUF >> 16) as u32;
    let code: [u32; 7] = [
        0xD2A0_0000 | (uart_hi << 5), // movz x0, #(uart >> 16), lsl #16
        0xD2A0_0002 | (buf_hi << 5),  // movz x2, #(buf >> 16), lsl #16
        0xD280_0003,                  // movz x3, #0
        0xB940_1801,                  // 1: ldr w1, [x0, #0x18]  (UARTFR: traps)
        0x9100_0463,                  // add x3, x3, #1
        0xF900_0043,                  // str x3, [x2]
        0x17FF_FFFD,                  // b 1b
    ];
    arm64_image(&code)
}

/// An arm64 `Image` (64-byte header, `text_offset` 0) whose code is `code`.
fn arm64_image(code: &[u32]) -> Vec<u8> {
    let mut image = alloc::vec![0u8; 64];
    image[0..4].copy_from_slice(&0x1400_0010u32.to_le_bytes()); // code0: b +0x40
    for w in code {
        image.extend_from_slice(&w.to_le_bytes());
    }
    let len = image.len() as u64;
    image[16..24].copy_from_slice(&len.to_le_bytes()); // image_size (text_offset stays 0)
    image[56..60].copy_from_slice(b"ARM\x64");
    image
}

/// Creates a paused bench VM (the scheduler never picks it; `fuzz` forks running children).
fn create_vm(t: &mut VmTable, mem_mib: u64, cpus: u32, dirty: u16) -> Result<u32, String> {
    create_vm_from(t, &workload_image(dirty), mem_mib, cpus)
}

/// Creates a paused bench VM running `image`.
fn create_vm_from(t: &mut VmTable, image: &[u8], mem_mib: u64, cpus: u32) -> Result<u32, String> {
    let spec = GuestSpec {
        name: format!("bench{mem_mib}m{cpus}c"),
        kernel: image,
        initrd: None,
        mem: mem_mib * MIB,
        cpus,
        cmdline: String::new(),
    };
    let id = t
        .create(&spec)
        .map_err(|e| format!("creating a {mem_mib} MiB guest: {e}"))?;
    if let Some(mut vm) = t.vms.get_mut(&id) {
        vm.state = VmState::Paused(vmfork_core::machine::PauseReason::Requested);
    }
    Ok(id)
}

/// Services a stage-2 fault of VM `id` at `ipa`; returns the ticks `handle_fault` took.
fn fault(t: &mut VmTable, id: u32, ipa: u64, write: bool) -> Result<u64, String> {
    let mut vm = t
        .vms
        .get_mut(&id)
        .ok_or_else(|| format!("vm{id} has no tables"))?;
    let s2 = vm
        .s2
        .as_mut()
        .ok_or_else(|| format!("vm{id} has no tables"))?;
    let (r, ticks) = with_mem(|cx| {
        let t0 = now();
        let r = s2.handle_fault(cx, Ipa(ipa), write);
        (r, now() - t0)
    });
    match r {
        Ok(FaultOutcome::Retry) => Ok(ticks),
        other => Err(format!(
            "vm{id}: fault at {ipa:#x} (write {write}): {other:?}"
        )),
    }
}

/// Makes the parent's root entries valid again, as if it had run since its last fork (a read
/// fault in each 1 GiB region it maps), so every timed fork starts from the same state.
fn touch_parent(t: &mut VmTable, id: u32) -> Result<(), String> {
    fault(t, id, layout::RAM_BASE, false)?;
    fault(t, id, layout::VMGENID_BASE, false)?;
    Ok(())
}

/// Forks `parent` once (paused child unless `running`); returns the child and the ticks taken.
fn fork_timed(t: &mut VmTable, parent: u32, running: bool) -> Result<(u32, u64), String> {
    let t0 = now();
    let r = t.fork_now(parent, 1, !running, None);
    let ticks = now() - t0;
    let ids = r.map_err(|e| format!("fork of vm{parent}: {e}"))?;
    let child = ids.first().copied().ok_or("fork returned no child")?;
    Ok((child, ticks))
}

// ---------------------------------------------------------------------------------------------
// Eager clone (baseline only)

/// A copy of a VM's stage-2 tables and every page they map, made at once: what a fork without
/// copy-on-write costs. Never run by a vCPU, so descriptors are written without TLB maintenance.
struct EagerClone {
    root: PhysAddr,
    pages: u64,
}

fn alloc_table<M: PhysMem, T: TlbOps>(cx: &mut MemCtx<'_, M, T>) -> Result<PhysAddr, Stage2Error> {
    let f = cx.frames.alloc().map_err(|_| Stage2Error::OutOfMemory)?;
    cx.mem.zero_frame(f);
    Ok(f)
}

/// Where a table entry of the source leads (valid table or marker alike).
fn next_table(d: u64, level: u8) -> Option<PhysAddr> {
    match desc::decode(d, level) {
        desc::Desc::Table(t) | desc::Desc::Marker(t) => Some(t),
        _ => None,
    }
}

impl EagerClone {
    /// Copies every table and page reachable from `src_root` (following markers). All or
    /// nothing: out of memory frees what was built.
    fn build<M: PhysMem, T: TlbOps>(
        cx: &mut MemCtx<'_, M, T>,
        src_root: PhysAddr,
    ) -> Result<Self, Stage2Error> {
        let mut clone = EagerClone {
            root: alloc_table(cx)?,
            pages: 0,
        };
        if let Err(e) = clone.copy_from(cx, src_root) {
            clone.free(cx);
            return Err(e);
        }
        Ok(clone)
    }

    fn copy_from<M: PhysMem, T: TlbOps>(
        &mut self,
        cx: &mut MemCtx<'_, M, T>,
        src_root: PhysAddr,
    ) -> Result<(), Stage2Error> {
        for i1 in 0..TABLE_ENTRIES {
            let Some(l2) = next_table(cx.mem.read_desc(src_root, i1), 1) else {
                continue;
            };
            let c2 = alloc_table(cx)?;
            cx.mem.write_desc(self.root, i1, desc::table(c2));
            for i2 in 0..TABLE_ENTRIES {
                let Some(l3) = next_table(cx.mem.read_desc(l2, i2), 2) else {
                    continue;
                };
                let c3 = alloc_table(cx)?;
                cx.mem.write_desc(c2, i2, desc::table(c3));
                for i3 in 0..TABLE_ENTRIES {
                    let d = cx.mem.read_desc(l3, i3);
                    let desc::Desc::Page(f) = desc::decode(d, 3) else {
                        continue;
                    };
                    let new = if desc::is_unmanaged(d) {
                        d
                    } else {
                        let nf = cx.frames.alloc().map_err(|_| Stage2Error::OutOfMemory)?;
                        cx.mem.copy_frame(nf, f);
                        self.pages += 1;
                        if desc::is_cow(d) {
                            desc::make_writable(d, nf)
                        } else {
                            desc::with_oa(d, nf)
                        }
                    };
                    cx.mem.write_desc(c3, i3, new);
                }
            }
        }
        Ok(())
    }

    /// Gives back every frame and table of the clone.
    fn free<M: PhysMem, T: TlbOps>(self, cx: &mut MemCtx<'_, M, T>) {
        for i1 in 0..TABLE_ENTRIES {
            let Some(c2) = next_table(cx.mem.read_desc(self.root, i1), 1) else {
                continue;
            };
            for i2 in 0..TABLE_ENTRIES {
                let Some(c3) = next_table(cx.mem.read_desc(c2, i2), 2) else {
                    continue;
                };
                for i3 in 0..TABLE_ENTRIES {
                    let d = cx.mem.read_desc(c3, i3);
                    if let desc::Desc::Page(f) = desc::decode(d, 3) {
                        if !desc::is_unmanaged(d) {
                            let _ = cx.frames.put(f);
                        }
                    }
                }
                let _ = cx.frames.put(c3);
            }
            let _ = cx.frames.put(c2);
        }
        let _ = cx.frames.put(self.root);
    }
}

// ---------------------------------------------------------------------------------------------
// Phases

/// Fork latency against guest size and vCPUs, with the eager clone beside it.
fn phase_fork() -> Result<(), String> {
    let mut t = VMS.lock();
    for mem in FORK_SIZES_MIB {
        for cpus in [1u32, 2] {
            let parent = create_vm(&mut t, mem, cpus, 1)?;
            let result = (|| -> Result<(), String> {
                let mut samples = Vec::new();
                for _ in 0..FORK_REPS {
                    touch_parent(&mut t, parent)?;
                    let (child, ticks) = fork_timed(&mut t, parent, false)?;
                    samples.push(ticks);
                    t.destroy(child);
                }
                Line::new("fork")
                    .u("mem_mib", mem)
                    .u("vcpus", cpus as u64)
                    .sum(&summarize(&samples))
                    .emit();
                if cpus != 1 {
                    return Ok(()); // the eager copy does not depend on the vCPUs
                }
                fork_parts(&mut t, parent, mem)?;
                let reps = if mem >= 1024 {
                    EAGER_REPS_1G
                } else {
                    EAGER_REPS
                };
                let root = t
                    .vms
                    .get(&parent)
                    .and_then(|vm| vm.s2.as_ref().map(|s| s.root()))
                    .ok_or("parent has no tables")?;
                let mut samples = Vec::new();
                let mut pages = 0;
                for _ in 0..reps {
                    let (clone, ticks) = with_mem(|cx| {
                        let t0 = now();
                        let c = EagerClone::build(cx, root);
                        (c, now() - t0)
                    });
                    let clone = clone.map_err(|e| format!("eager clone of {mem} MiB: {e}"))?;
                    pages = clone.pages;
                    samples.push(ticks);
                    with_mem(|cx| clone.free(cx));
                }
                Line::new("eager")
                    .u("mem_mib", mem)
                    .u("pages", pages)
                    .sum(&summarize(&samples))
                    .emit();
                Ok(())
            })();
            t.destroy(parent);
            result?;
        }
    }
    Ok(())
}

/// Where a fork's time goes: `Stage2::fork` alone, the child's generation-ID write (which
/// unshares the path to that page in the child), and the rest (`fork_now` minus both: vCPU and
/// device clones, bookkeeping).
fn fork_parts(t: &mut VmTable, parent: u32, mem: u64) -> Result<(), String> {
    let (mut stage2, mut genid) = (Vec::new(), Vec::new());
    for _ in 0..FORK_REPS {
        touch_parent(t, parent)?;
        let mut vm = t.vms.get_mut(&parent).ok_or("parent has no tables")?;
        let s2 = vm.s2.as_mut().ok_or("parent has no tables")?;
        let r = with_mem(|cx| -> Result<(), Stage2Error> {
            let t0 = now();
            // A fork has no VMID until it is first scheduled.
            let (mut child, fp) = s2.fork(cx, None)?;
            let t1 = now();
            let w = child.write_guest(cx, Ipa(layout::VMGENID_BASE), &[0x5a; 16]);
            let t2 = now();
            stage2.push(t1 - t0);
            genid.push(t2 - t1);
            fp.release(cx)?;
            child.destroy(cx)?;
            w
        });
        r.map_err(|e| format!("fork parts: {e}"))?;
    }
    Line::new("fork_parts")
        .u("mem_mib", mem)
        .u("stage2_fork_ns", summarize(&stage2).median)
        .u("genid_write_ns", summarize(&genid).median)
        .u("reps", stage2.len() as u64)
        .emit();
    Ok(())
}

/// The costs that move to after the fork: COW faults, first touches, against a plain copy.
fn phase_cow() -> Result<(), String> {
    let mut t = VMS.lock();
    let parent = create_vm(&mut t, COW_MEM_MIB, 1, 1)?;
    let result = (|| -> Result<(), String> {
        const REGION: u64 = 2 * MIB; // what one level-3 table maps
        let base = layout::RAM_BASE + 32 * MIB;
        let (mut l2, mut l3, mut cow, mut cold, mut parent_touch) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..COW_FORKS {
            touch_parent(&mut t, parent)?;
            let (child, _) = fork_timed(&mut t, parent, false)?;
            let r = (|| -> Result<(), String> {
                // First touch after the fork: root marker -> copy the level-2 and a level-3 table.
                l2.push(fault(&mut t, child, base, false)?);
                // First touch of another 2 MiB region: copy its level-3 table only.
                l3.push(fault(&mut t, child, base + REGION, false)?);
                // Writes to shared pages whose level-3 table is already private: the COW copy.
                for k in 1..=COW_WRITES as u64 {
                    cow.push(fault(&mut t, child, base + REGION + k * PAGE_SIZE, true)?);
                }
                // A write as the first touch of a region: level-3 copy and frame copy together.
                cold.push(fault(&mut t, child, base + 2 * REGION, true)?);
                // The parent's own first touch after the fork (its root entry is a marker too).
                parent_touch.push(fault(&mut t, parent, base + 3 * REGION, false)?);
                Ok(())
            })();
            t.destroy(child);
            r?;
        }
        // The plain copies, in the same run: the primitive the COW path uses (copy plus the
        // cache maintenance a guest with its MMU off and a page of guest code need), the SIMD
        // copy loop alone, a bare memcpy (compiler_builtins, for comparison), and the zeroing of
        // a fresh frame (also with its cache maintenance).
        let mut plain = Vec::new();
        let mut zero = Vec::new();
        let (copy, memcpy) = with_mem(|cx| -> Result<(Vec<u64>, Vec<u64>), String> {
            let a = cx.frames.alloc().map_err(|e| format!("{e}"))?;
            let b = cx.frames.alloc().map_err(|e| format!("{e}"))?;
            cx.mem.zero_frame(a);
            let (mut copy, mut memcpy) = (Vec::new(), Vec::new());
            for _ in 0..COW_FORKS * COW_WRITES {
                let t0 = now();
                cx.mem.copy_frame(b, a);
                copy.push(now() - t0);
                let t0 = now();
                // SAFETY: `a` and `b` are two distinct whole frames just allocated to this
                // function, identity mapped; nothing else refers to them.
                unsafe { crate::arch::frame::copy_plain(b, a) };
                plain.push(now() - t0);
                let t0 = now();
                cx.mem.zero_frame(b);
                zero.push(now() - t0);
                let t0 = now();
                // SAFETY: `a` and `b` are two distinct whole frames just allocated to this
                // function, identity mapped; nothing else refers to them.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        a.0 as *const u8,
                        b.0 as *mut u8,
                        PAGE_SIZE as usize,
                    )
                };
                memcpy.push(now() - t0);
            }
            let _ = cx.frames.put(a);
            let _ = cx.frames.put(b);
            Ok((copy, memcpy))
        })?;
        let rows: [(&str, &Vec<u64>); 9] = [
            ("cow_fault", &cow),
            ("copy_frame", &copy),
            ("copy_4k_simd", &plain),
            ("memcpy_4k", &memcpy),
            ("zero_frame", &zero),
            ("first_touch_l2_l3", &l2),
            ("first_touch_l3", &l3),
            ("first_write_region", &cold),
            ("parent_first_touch", &parent_touch),
        ];
        for (what, samples) in rows {
            Line::new("cow")
                .s("what", what)
                .u("mem_mib", COW_MEM_MIB)
                .sum(&summarize(samples))
                .emit();
        }
        Ok(())
    })();
    t.destroy(parent);
    result
}

/// Reset latency against pages the child dirtied since its fork point.
fn phase_reset() -> Result<(), String> {
    let mut t = VMS.lock();
    let parent = create_vm(&mut t, COW_MEM_MIB, 1, 1)?;
    let result = (|| -> Result<(), String> {
        touch_parent(&mut t, parent)?;
        let (child, _) = fork_timed(&mut t, parent, false)?;
        let r = (|| -> Result<(), String> {
            for dirty in RESET_DIRTY {
                let mut samples = Vec::new();
                let mut freed = 0;
                for _ in 0..RESET_REPS {
                    for p in 0..dirty {
                        fault(&mut t, child, WORKLOAD_BUF + p * PAGE_SIZE, true)?;
                    }
                    let before = used_frames();
                    let t0 = now();
                    let r = t.reset_now(child);
                    samples.push(now() - t0);
                    r.map_err(|e| format!("reset of vm{child}: {e}"))?;
                    freed = before.saturating_sub(used_frames());
                }
                // The same with `Stage2::reset` alone (the generation ID rewritten untimed).
                let mut stage2 = Vec::new();
                for _ in 0..RESET_REPS {
                    for p in 0..dirty {
                        fault(&mut t, child, WORKLOAD_BUF + p * PAGE_SIZE, true)?;
                    }
                    let mut guard = t.vms.get_mut(&child).ok_or("child vanished")?;
                    let vm = &mut *guard;
                    let (Some(s2), Some(snap)) = (vm.s2.as_mut(), vm.reset_point.as_ref()) else {
                        return Err(String::from("child has no tables or fork point"));
                    };
                    let genid = vm.genid;
                    let r = with_mem(|cx| {
                        let t0 = now();
                        let r = s2.reset(cx, &snap.point);
                        stage2.push(now() - t0);
                        r.and_then(|()| s2.write_guest(cx, Ipa(layout::VMGENID_BASE), &genid))
                    });
                    r.map_err(|e| format!("Stage2::reset of vm{child}: {e}"))?;
                }
                Line::new("reset")
                    .u("dirty", dirty)
                    .u("stage2_reset_ns", summarize(&stage2).median)
                    .u("frames_freed", freed)
                    .u("mem_mib", COW_MEM_MIB)
                    .sum(&summarize(&samples))
                    .emit();
            }
            Ok(())
        })();
        t.destroy(child);
        r
    })();
    t.destroy(parent);
    result
}

/// Memory used per idle child: 100 forks of an idle 64 MiB guest.
fn phase_density() -> Result<(), String> {
    let mut t = VMS.lock();
    let parent = create_vm(&mut t, DENSITY_MEM_MIB, 1, 1)?;
    touch_parent(&mut t, parent)?;
    let frames0 = used_frames();
    let heap0 = crate::heap::usage().0 as u64;
    let mut children = Vec::with_capacity(DENSITY_CHILDREN);
    let mut samples = Vec::with_capacity(DENSITY_CHILDREN);
    let mut result = Ok(());
    for _ in 0..DENSITY_CHILDREN {
        match fork_timed(&mut t, parent, false) {
            Ok((c, ticks)) => {
                children.push(c);
                samples.push(ticks);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    let frames1 = used_frames();
    let heap1 = crate::heap::usage().0 as u64;
    let n = children.len().max(1) as u64;
    let frames_per_child = (frames1 - frames0) * PAGE_SIZE / n;
    let heap_per_child = heap1.saturating_sub(heap0) / n;
    // What one child's tables hold (census of the first child).
    let census = children.first().and_then(|c| {
        let vm = t.vms.get(c)?;
        let s2 = vm.s2.as_ref()?;
        let frames = crate::mem::FRAMES.lock();
        Some(s2.usage(frames.as_ref()?, &crate::physmem::IdentityMem))
    });
    // Heap taken by one clone of the parent's vGIC and of its vCPUs (a child holds two of each:
    // live and in its fork snapshot).
    let (vgic_heap, vcpus_heap) = match t.vms.get(&parent) {
        Some(vm) => {
            let h0 = crate::heap::usage().0;
            let g = vm.devices.vgic.clone();
            let h1 = crate::heap::usage().0;
            let v = vm.vcpus.clone();
            let h2 = crate::heap::usage().0;
            drop((g, v));
            ((h1 - h0) as u64, (h2 - h1) as u64)
        }
        None => (0, 0),
    };
    for c in &children {
        t.destroy(*c);
    }
    let leaked = used_frames() as i64 - frames0 as i64;
    let mut line = Line::new("density")
        .u("children", children.len() as u64)
        .u("mem_mib", DENSITY_MEM_MIB)
        .u("frames_delta", frames1 - frames0)
        .u("frame_bytes_per_child", frames_per_child)
        .u("heap_bytes_per_child", heap_per_child)
        .u("bytes_per_child", frames_per_child + heap_per_child)
        .u("frames_leaked", leaked.max(0) as u64)
        .u("vgic_clone_heap", vgic_heap)
        .u("vcpus_clone_heap", vcpus_heap);
    if let Some(u) = census {
        line = line
            .u("child_private_tables", u.private_tables as u64)
            .u("child_private_frames", u.private_frames as u64)
            .u("child_shared_tables", u.shared_tables as u64);
    }
    line.sum(&summarize(&samples)).emit();
    t.destroy(parent);
    result
}

/// Fork once, then reset and run the workload in the child, in a loop.
fn phase_fuzz() -> Result<(), String> {
    for dirty in FUZZ_DIRTY {
        let (parent, child) = {
            let mut t = VMS.lock();
            let parent = create_vm(&mut t, FUZZ_MEM_MIB, 1, dirty)?;
            match fork_timed(&mut t, parent, true) {
                Ok((child, _)) => (parent, child),
                Err(e) => {
                    t.destroy(parent);
                    return Err(e);
                }
            }
        };
        let done_pc = layout::RAM_BASE + WORKLOAD_WFI;
        let result = (|| -> Result<(), String> {
            run_until(child, done_pc)?; // the first run, from the fork itself
            let (mut cycles, mut resets, mut runs) = (Vec::new(), Vec::new(), Vec::new());
            let loop_start = now();
            for _ in 0..FUZZ_CYCLES {
                let t0 = now();
                VMS.lock()
                    .reset_now(child)
                    .map_err(|e| format!("reset of vm{child}: {e}"))?;
                let t1 = now();
                run_until(child, done_pc)?;
                let t2 = now();
                cycles.push(t2 - t0);
                resets.push(t1 - t0);
                runs.push(t2 - t1);
            }
            let total = now() - loop_start;
            let per_sec = (FUZZ_CYCLES as u64 * 1_000_000_000).checked_div(ns(total));
            Line::new("fuzz")
                .u("dirty", dirty as u64)
                .u("mem_mib", FUZZ_MEM_MIB)
                .u("total_ns", ns(total))
                .u("cycles_per_sec", per_sec.unwrap_or(0))
                .u("reset_median_ns", summarize(&resets).median)
                .u("run_median_ns", summarize(&runs).median)
                .sum(&summarize(&cycles))
                .emit();
            Ok(())
        })();
        let mut t = VMS.lock();
        t.destroy(child);
        t.destroy(parent);
        result?;
    }
    Ok(())
}

/// The fuzzing loop (1 page written per run) beside 0, 1,000, 10,000 and 100,000 idle forks:
/// forks of a VM that ran to its final `wfi` and waits there, interrupts masked, no timer
/// armed (they hold no VMID: they never run). Each count
/// reports the loop's cycles per second and the median of one [`VmTable::pick`] that finds
/// nothing to run (every vCPU waiting), which is what the idle VMs add to every pick.
fn phase_idle() -> Result<(), String> {
    let done_pc = layout::RAM_BASE + WORKLOAD_WFI;
    let (parent, child, idler) = {
        let mut t = VMS.lock();
        let parent = create_vm(&mut t, FUZZ_MEM_MIB, 1, 1)?;
        let child = fork_timed(&mut t, parent, true).map(|(c, _)| c);
        let idler = fork_timed(&mut t, parent, true).map(|(c, _)| c);
        match (child, idler) {
            (Ok(c), Ok(i)) => (parent, c, i),
            (c, i) => {
                for id in [c.ok(), i.ok(), Some(parent)].into_iter().flatten() {
                    t.destroy(id);
                }
                return Err(String::from("forking the idle phase's VMs failed"));
            }
        }
    };
    let mut idle: Vec<u32> = Vec::new();
    let result = (|| -> Result<(), String> {
        // Both run to their `wfi` and wait there: the idler is what every idle fork copies.
        run_until(child, done_pc)?;
        run_until(idler, done_pc)?;
        for target in IDLE_COUNTS {
            {
                let mut t = VMS.lock();
                while idle.len() < target {
                    let n = (target - idle.len()).min(1000) as u32;
                    let ids = t
                        .fork_now(idler, n, false, None)
                        .map_err(|e| format!("idle fork {} of vm{idler}: {e}", idle.len()))?;
                    idle.extend(ids);
                }
                let waiting = |id: &u32| {
                    t.vms.get(id).is_some_and(|vm| {
                        vm.vcpus[0].state == vmfork_core::machine::VcpuState::Waiting
                    })
                };
                if !idle.iter().all(waiting) {
                    return Err(String::from("an idle fork is not waiting"));
                }
            }
            // Every VM waits now: the child and the idler at their `wfi`, the forks as copies.
            let mut picks = Vec::new();
            for _ in 0..9 {
                let mut t = VMS.lock();
                let t0 = now();
                let picked = t.pick(0, crate::arch::counter().0);
                picks.push(now() - t0);
                if let Some((id, vcpu, ctx)) = picked {
                    let state = ctx.regs.pc;
                    let _ = t.put_back(id, vcpu, ctx, vmfork_core::machine::VcpuState::Waiting);
                    return Err(format!(
                        "vm{id} was runnable beside the idle forks (pc {state:#x})"
                    ));
                }
            }
            let mut cycles = Vec::new();
            let loop_start = now();
            for _ in 0..IDLE_CYCLES {
                let t0 = now();
                VMS.lock()
                    .reset_now(child)
                    .map_err(|e| format!("reset of vm{child}: {e}"))?;
                run_until(child, done_pc)?;
                cycles.push(now() - t0);
            }
            let total = now() - loop_start;
            let per_sec = (IDLE_CYCLES as u64 * 1_000_000_000).checked_div(ns(total));
            Line::new("idle")
                .u("idle_forks", idle.len() as u64)
                .u("cycles_per_sec", per_sec.unwrap_or(0))
                .u("pick_none_ns", summarize(&picks).median)
                .sum(&summarize(&cycles))
                .emit();
        }
        Ok(())
    })();
    let mut t = VMS.lock();
    for id in idle {
        t.destroy(id);
    }
    for id in [child, idler, parent] {
        t.destroy(id);
    }
    result
}

/// Runs the (only running) bench child on this CPU until its vCPU 0 sits in the final `wfi`.
fn run_until(child: u32, done_pc: u64) -> Result<(), String> {
    for _ in 0..10_000 {
        let picked = VMS.lock().pick_to_run(0, crate::arch::counter().0);
        let Some(picked) = picked else {
            let t = VMS.lock();
            let v = t.vms.get(&child).map(|vm| {
                (
                    vm.vcpus[0].state,
                    vm.vcpus[0].ctx.as_ref().map_or(0, |c| c.regs.pc),
                )
            });
            return Err(format!(
                "vm{child}: no runnable vCPU before the workload ended (vCPU 0 state, pc: {v:?})"
            ));
        };
        crate::sched::run_vcpu(0, picked);
        let t = VMS.lock();
        let vm = t
            .vms
            .get(&child)
            .ok_or_else(|| format!("vm{child} is gone"))?;
        if vm.state != VmState::Running {
            return Err(format!("vm{child} stopped: {:?}", vm.state));
        }
        let pc = vm.vcpus[0].ctx.as_ref().map_or(0, |c| c.regs.pc);
        if pc == done_pc || pc == done_pc + 4 {
            return Ok(());
        }
    }
    Err(format!("vm{child}: the workload did not finish"))
}

/// How many idle forks can be alive at once, and what stops there being more.
fn phase_scale() -> Result<(), String> {
    let mut t = VMS.lock();
    let parent = create_vm(&mut t, SCALE_MEM_MIB, 1, 1)?;
    touch_parent(&mut t, parent)?;
    let frames0 = used_frames();
    let heap0 = crate::heap::usage().0 as u64;
    let mut children: Vec<u32> = Vec::with_capacity(1 << 19);
    let mut ticks: Vec<u32> = Vec::with_capacity(1 << 19);
    let alloc_first = heap_probe();
    let t0 = now();
    let stopped_by = loop {
        let (_, heap_free) = crate::heap::usage();
        if heap_free < SCALE_HEAP_MARGIN {
            break String::from("heap");
        }
        let t1 = now();
        match t.fork_now(parent, 1, true, None) {
            Ok(ids) => {
                ticks.push(u32::try_from(now() - t1).unwrap_or(u32::MAX));
                children.extend(ids);
            }
            // Out of frames, or the heap's reserve reached (`heap::check` or a fallible
            // allocation): a fork needs one frame, its root table.
            Err(crate::vm::ForkError::OutOfMemory) => {
                break String::from(if crate::mem::frame_counts().0 == 0 {
                    "frames"
                } else {
                    "heap"
                })
            }
            Err(e) => break format!("error: {e}"),
        }
    };
    let elapsed = now() - t0;
    let alloc_last = heap_probe();
    let frames1 = used_frames();
    let (heap1, heap_free) = crate::heap::usage();
    let n = children.len();
    let head: Vec<u64> = ticks.iter().take(100).map(|&x| x as u64).collect();
    let tail: Vec<u64> = ticks.iter().rev().take(100).map(|&x| x as u64).collect();
    // The fork samples are summarized: the teardown's go into their vector (the heap is at its
    // reserve here).
    ticks.clear();
    let td0 = now();
    for c in children {
        let t1 = now();
        t.destroy(c);
        ticks.push(u32::try_from(now() - t1).unwrap_or(u32::MAX));
    }
    let destroy = now() - td0;
    let d_head: Vec<u64> = ticks.iter().take(100).map(|&x| x as u64).collect();
    let d_tail: Vec<u64> = ticks.iter().rev().take(100).map(|&x| x as u64).collect();
    t.destroy(parent);
    let (free, _) = crate::mem::frame_counts();
    Line::new("scale")
        .u("mem_mib", SCALE_MEM_MIB)
        .u("children", n as u64)
        .s("stopped_by", &stopped_by)
        .u("frames_used", frames1 - frames0)
        .u("frames_free", free as u64)
        .u("heap_used", (heap1 as u64).saturating_sub(heap0))
        .u("heap_free", heap_free as u64)
        .u("fork_first100_median_ns", summarize(&head).median)
        .u("fork_last100_median_ns", summarize(&tail).median)
        .u("heap_alloc_first_ns", alloc_first)
        .u("heap_alloc_last_ns", alloc_last)
        .u("forks_ns", ns(elapsed))
        .u("destroy_all_ns", ns(destroy))
        .u("destroy_first100_median_ns", summarize(&d_head).median)
        .u("destroy_last100_median_ns", summarize(&d_tail).median)
        .emit();
    Ok(())
}

/// Median time of one 1 KiB heap allocation and its free, at the start and at the end of the
/// scale phase: whether the allocator slows as the heap fills with tens of thousands of VMs and
/// the holes between them (the first-fit list allocator the monitor had did, and made every fork
/// O(VMs alive); docs/BENCHMARKS.md).
fn heap_probe() -> u64 {
    let mut samples = Vec::with_capacity(9);
    for _ in 0..9 {
        let t0 = now();
        let v: Vec<u8> = Vec::with_capacity(1024);
        core::hint::black_box(&v);
        drop(v);
        samples.push(now() - t0);
    }
    summarize(&samples).median
}

// ---------------------------------------------------------------------------------------------
// Scaling across CPUs

/// Exits per second of busy VMs on the other CPUs: 1 VM, then N VMs on N CPUs (N = the CPUs
/// beside this one, at most [`SMP_MAX_WORKERS`]), alternating for [`SMP_ROUNDS`] rounds so that
/// a change in the host's load hits both alike. Each VM runs [`exit_loop_image`]: every
/// iteration is one exit, handled under the VM's own lock. This CPU only sleeps between reading
/// the VMs' counts.
fn phase_smp(cpus: usize) -> Result<(), String> {
    let workers = cpus.saturating_sub(1).min(SMP_MAX_WORKERS);
    if workers < 2 {
        return Err(format!(
            "needs at least 3 CPUs (this one and 2 to run VMs), {cpus} online"
        ));
    }
    let image = exit_loop_image();
    let mut ids = Vec::new();
    {
        let mut t = VMS.lock();
        for _ in 0..workers {
            match create_vm_from(&mut t, &image, FUZZ_MEM_MIB, 1) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        t.destroy(id);
                    }
                    return Err(e);
                }
            }
        }
    }
    let result = (|| -> Result<(), String> {
        for round in 0..SMP_ROUNDS {
            for n in [1, workers] {
                let (exits, ticks, (handled, waited)) = smp_window(&ids[..n])?;
                let per_sec = (exits as u128 * crate::arch::counter().1 as u128)
                    .checked_div(ticks as u128)
                    .unwrap_or(0) as u64;
                Line::new("smp")
                    .u("round", round)
                    .u("vms", n as u64)
                    .u("workers", workers as u64)
                    .u("exits", exits)
                    .u("window_ns", ns(ticks))
                    .u("exits_per_sec", per_sec)
                    .u("exits_handled", handled)
                    .u("exits_waited", waited)
                    .emit();
            }
        }
        Ok(())
    })();
    let mut t = VMS.lock();
    for id in ids {
        let kicks = t.stop(id, vmfork_core::machine::StopReason::Killed);
        crate::kick::send(&kicks);
    }
    drop(t);
    // The workers see the stop at the VMs' next exit and hand the vCPUs back; then they go.
    sleep_micros(SMP_WARMUP_MICROS);
    result
}

/// Lets the VMs `ids` run (the others stay paused) and counts their exits over one window after
/// a warm-up: (exits, counter ticks of the window, and the scheduler's own counts over it:
/// exits handled and exits that waited for a lock held by another CPU). Pauses them again
/// before it returns.
fn smp_window(ids: &[u32]) -> Result<(u64, u64, (u64, u64)), String> {
    set_running(ids, true);
    sleep_micros(SMP_WARMUP_MICROS);
    let (c0, t0, s0) = (exit_counts(ids), now(), crate::sched::exit_counts());
    sleep_micros(SMP_WINDOW_MICROS);
    let (c1, t1, s1) = (exit_counts(ids), now(), crate::sched::exit_counts());
    set_running(ids, false);
    // Every vCPU off its CPU before the next window starts with another set.
    sleep_micros(SMP_WARMUP_MICROS / 10);
    let (c0, c1) = (c0?, c1?);
    let exits = c1.iter().zip(&c0).map(|(b, a)| b.wrapping_sub(*a)).sum();
    if c0.iter().zip(&c1).any(|(a, b)| a == b) {
        return Err(format!(
            "a VM of {ids:?} took no exit in the window (counts {c0:?} -> {c1:?}): is every CPU scheduling?"
        ));
    }
    Ok((exits, t1 - t0, (s1.0 - s0.0, s1.1 - s0.1)))
}

/// Resumes (`run`) or pauses the VMs `ids`, kicking the CPUs that must notice.
fn set_running(ids: &[u32], run: bool) {
    let mut kicks = vmfork_core::machine::Kicks::new();
    {
        let mut t = VMS.lock();
        for id in ids {
            if let Some(mut vm) = t.vms.get_mut(id) {
                if run {
                    vm.state = VmState::Running;
                    kicks.idle = true;
                } else {
                    vm.state = VmState::Paused(vmfork_core::machine::PauseReason::Requested);
                    kicks.extend(vm.running_cpus());
                }
            }
        }
    }
    crate::kick::send(&kicks);
}

/// The exit counts the VMs `ids` keep in their first [`WORKLOAD_BUF`] word (an aligned 64-bit
/// read: single-copy atomic, so a count a vCPU is writing on another CPU reads whole).
fn exit_counts(ids: &[u32]) -> Result<Vec<u64>, String> {
    let t = VMS.lock();
    let mut counts = Vec::new();
    for id in ids {
        let vm = t.vms.get(id).ok_or_else(|| format!("vm{id} is gone"))?;
        let s2 = vm
            .s2
            .as_ref()
            .ok_or_else(|| format!("vm{id} has no tables"))?;
        let mut word = [0u8; 8];
        with_mem(|cx| s2.read_guest(cx.mem, Ipa(WORKLOAD_BUF), &mut word))
            .map_err(|e| format!("vm{id}: reading its count: {e:?}"))?;
        counts.push(u64::from_le_bytes(word));
    }
    Ok(counts)
}

/// Sleeps on this CPU (WFI with the EL2 timer armed) for `micros` of counter time.
fn sleep_micros(micros: u64) {
    let end = now() + crate::arch::timer::ticks_from_micros(micros);
    while now() < end {
        crate::arch::timer::arm_at(end);
        // WFI wakes on a pending physical interrupt even with PSTATE.I set at EL2 (ARM ARM
        // D1.16.2); it is then handled by polling.
        aarch64_cpu::asm::wfi();
        crate::arch::gic::dispatch_pending();
    }
    crate::arch::timer::cancel();
}
