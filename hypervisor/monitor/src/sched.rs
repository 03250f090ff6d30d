//! The per-physical-CPU scheduler: pick a runnable vCPU, run it for a time slice (the EL2
//! physical timer ends the slice), handle its exits, and go round again. An idle CPU waits for an
//! interrupt with the timer armed for the earliest virtual-timer deadline of a waiting vCPU.

use alloc::collections::VecDeque;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use aarch64_cpu::registers::{Readable, ESR_EL2, FAR_EL2, HPFAR_EL2};
use spin::Mutex;
use vmfork_core::esr::Esr;
use vmfork_core::focus::{FocusAction, FocusKeys};
use vmfork_core::stage2::vtcr_el2;
use vmfork_core::vgic::CpuIfState;

use crate::arch::boot::MAX_CPUS;
use crate::arch::gic;
use crate::arch::sysregs::{load_el1, load_pauth, store_el1, store_pauth};
use crate::arch::timer;
use crate::arch::vcpu::{enter_guest, GuestExit};
use crate::vm::{self, MonitorHost, Next, Syndrome, VcpuState, VMS};
use vmfork_core::machine::{handle_sync_vm, Handled, Kicks, Picked, StopReason};

/// Length of a time slice in microseconds.
const SLICE_MICROS: u64 = 4_000;
/// Longest an idle CPU sleeps before looking at the run queue again, in microseconds.
const IDLE_MICROS: u64 = 20_000;

static SLICE_OVER: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Bytes typed on the monitor console, waiting to go to the focused VM.
static RX: Mutex<VecDeque<u8>> = Mutex::new(VecDeque::new());
static HCR_GUEST: AtomicU64 = AtomicU64::new(0);
static VTCR: AtomicU64 = AtomicU64::new(0);
static NR_LRS: AtomicU64 = AtomicU64::new(0);
/// ICH_AP<n>R registers implemented (1, 2 or 4), read once at boot.
static NR_APRS: AtomicU64 = AtomicU64::new(1);
/// The CPU has pointer authentication, so its key registers are switched (read once at boot).
static PAUTH: AtomicBool = AtomicBool::new(false);

/// HCR_EL2 while a guest runs. VM: stage 2 on; SWIO: set/way cache ops become clean+invalidate;
/// FMO/IMO/AMO: physical FIQ/IRQ/SError go to EL2 (and the guest gets virtual ones); FB and
/// BSU=inner shareable: the guest's TLB and cache maintenance is broadcast, so a vCPU that
/// migrates finds no stale entries; TWI/TWE: WFI/WFE trap so an idle vCPU gives up its CPU; TSC:
/// SMC traps (PSCI is emulated); RW: EL1 is AArch64; APK/API: pointer authentication does not
/// trap (its keys are switched with the vCPU).
fn hcr_guest(pauth: bool) -> u64 {
    let mut v = (1 << 0)
        | (1 << 1)
        | (1 << 3)
        | (1 << 4)
        | (1 << 5)
        | (1 << 9)
        | (1 << 10)
        | (1 << 13)
        | (1 << 14)
        | (1 << 19)
        | (1 << 31);
    if pauth {
        v |= (1 << 40) | (1 << 41);
    }
    v
}

/// HCR_EL2 while the monitor runs: stage 2 off, physical interrupts still routed to EL2 (so WFI
/// wakes and they stay pending for the monitor), EL1 AArch64.
const HCR_MONITOR: u64 = (1 << 3) | (1 << 4) | (1 << 5) | (1 << 31);

fn write_hcr(v: u64) {
    crate::arch::sysregs::set_hcr_el2(v);
}

fn write_vttbr(v: u64) {
    crate::arch::sysregs::set_vttbr_el2(v);
}

fn write_vmpidr(v: u64) {
    crate::arch::sysregs::set_vmpidr_el2(v);
}

/// Per-CPU setup for running guests: VTCR_EL2, the physical interrupts the scheduler uses, and
/// their handlers. Called on every CPU once the GIC is up.
pub fn init_cpu(cpu: usize) {
    if cpu == 0 {
        let (mmfr0, mmfr1) = crate::arch::sysregs::mmfr0_mmfr1();
        // VTCR_EL2.PS: the physical address size this CPU implements (ID_AA64MMFR0_EL1.PARange,
        // capped at 48 bits: 52-bit output addresses need FEAT_LPA descriptors we do not use).
        // The guest IPA space is 39 bits (vmfork_core::stage2: the walk starts at level 1),
        // which needs a PARange of at least 40 bits (0b0010) to be a valid configuration.
        let ps = ((mmfr0 & 0xf) as u8).min(0b101);
        if ps < 0b010 {
            log::error!(
                "this CPU's PARange ({ps:#05b}) is below 40 bits: the 39-bit guest IPA space \
                 does not fit; guests will fault"
            );
        }
        let vmid16 = (mmfr1 >> 4) & 0xf == 0b0010;
        VTCR.store(vtcr_el2(ps, vmid16), Ordering::SeqCst);
        VMS.lock().set_vmid_bits(if vmid16 { 16 } else { 8 });
        PAUTH.store(crate::arch::sysregs::has_pauth(), Ordering::SeqCst);
        HCR_GUEST.store(
            hcr_guest(PAUTH.load(Ordering::SeqCst)) | crate::arch::idregs::HCR_EL2_TRAPS,
            Ordering::SeqCst,
        );
        let vtr = gic::ich_vtr();
        NR_LRS.store(vtr.list_registers as u64, Ordering::SeqCst);
        // 5, 6 or 7 preemption bits: 1, 2 or 4 ICH_AP<n>R registers.
        let aprs = match vtr.pre_bits {
            0..=5 => 1,
            6 => 2,
            _ => 4,
        };
        NR_APRS.store(aprs, Ordering::SeqCst);
        let _ = gic::register_handler(timer::intid(), on_slice_timer);
        let _ = gic::register_handler(vm::VTIMER_INTID, on_nothing);
        let _ = gic::register_handler(25, on_nothing); // GIC maintenance interrupt
        let _ = gic::register_handler(crate::kick::KICK_SGI, on_nothing);
        if let Some(intid) = crate::console::rx_intid() {
            let _ = gic::register_handler(intid, on_console_rx);
            let _ = gic::enable_spi(intid, 0);
            crate::console::enable_rx_interrupt();
        }
    }
    let vtcr = VTCR.load(Ordering::SeqCst);
    // VTCR_EL2 describes the stage-2 tables all VMs use (vmfork_core::stage2); no guest runs yet
    // on this CPU.
    crate::arch::sysregs::set_vtcr_el2(vtcr);
    write_hcr(HCR_MONITOR);
    crate::arch::idregs::init_cpu(cpu);
    timer::set_guest_timer_access();
    for intid in [timer::intid(), vm::VTIMER_INTID, 25] {
        let _ = gic::enable_ppi(intid, 0x80);
    }
}

fn on_nothing(_intid: u32) {}

fn on_slice_timer(_intid: u32) {
    timer::cancel();
    SLICE_OVER[crate::arch::percpu::cpu_index()].store(true, Ordering::SeqCst);
}

fn on_console_rx(_intid: u32) {
    let mut rx = RX.lock();
    while let Some(b) = crate::console::read_byte() {
        if rx.len() < 4096 {
            rx.push_back(b);
        }
    }
}

/// The focus keys' state between bytes typed on the monitor console (`vmfork_core::focus`).
static KEYS: Mutex<FocusKeys> = Mutex::new(FocusKeys::new());

/// Hands typed bytes to the focused VM; Ctrl-T moves the focus to the next VM, and Ctrl-T, a
/// VM id and Enter to that VM (`vmfork_core::focus`).
fn deliver_console_input() {
    let bytes: Vec<u8> = {
        let mut rx = RX.lock();
        if rx.is_empty() {
            return;
        }
        rx.drain(..).collect()
    };
    let mut actions = Vec::new();
    {
        let mut keys = KEYS.lock();
        for b in bytes {
            keys.feed(b, &mut actions);
        }
    }
    let mut kicks = vmfork_core::machine::Kicks::new();
    {
        let mut guard = VMS.lock();
        let t = &mut *guard;
        for action in actions {
            match action {
                FocusAction::Next => {
                    let next = t
                        .focus
                        .and_then(|f| t.vms.ids_in(f + 1..).next())
                        .or_else(|| t.vms.keys().next().copied());
                    t.focus = next;
                    match next {
                        Some(id) => crate::println!("monitor: console focus on vm{id}"),
                        None => crate::println!("monitor: no VM to focus"),
                    }
                }
                FocusAction::Jump(id) => {
                    let there = t.vms.get(&id).is_some_and(|vm| !vm.internal);
                    if there {
                        t.focus = Some(id);
                        crate::println!("monitor: console focus on vm{id}");
                    } else {
                        crate::println!("monitor: no vm{id} to focus");
                    }
                }
                FocusAction::Send(data) => {
                    let Some(id) = t.focus else { continue };
                    if let Some(mut vm) = t.vms.get_mut(&id) {
                        if let Some(v) = vm.type_input(&t.host, &data) {
                            vm.kick_vcpu(v, &mut kicks);
                        }
                    }
                }
            }
        }
    }
    crate::kick::send(&kicks);
}

/// How long a guest's unended console line waits before it is printed anyway (a prompt).
const LINE_FLUSH_MICROS: u64 = 500_000;
/// When [`flush_stale_console_lines`] last looked (counter ticks).
static LAST_LINE_FLUSH: AtomicU64 = AtomicU64::new(0);

/// Prints guests' console lines left unended for [`LINE_FLUSH_MICROS`] (looks at most that
/// often: it visits every VM).
fn flush_stale_console_lines() {
    let now = timer::now();
    let period = timer::ticks_from_micros(LINE_FLUSH_MICROS);
    if now.wrapping_sub(LAST_LINE_FLUSH.load(Ordering::Relaxed)) < period {
        return;
    }
    LAST_LINE_FLUSH.store(now, Ordering::Relaxed);
    VMS.lock().flush_stale_lines(now, period);
}

/// The scheduler loop of physical CPU `cpu`. Never returns.
pub fn run(cpu: usize) -> ! {
    loop {
        // The control channel did work and may have more (requests still queued): no sleep.
        let mut channel_busy = false;
        if cpu == 0 {
            deliver_console_input();
            flush_stale_console_lines();
            channel_busy = crate::control::poll();
        }
        let picked = VMS.lock().pick_to_run(cpu, timer::now());
        match picked {
            Some(p) => run_vcpu(cpu, p),
            None if channel_busy => {}
            None => idle(cpu),
        }
    }
}

fn idle(cpu: usize) {
    crate::kick::set_idle(cpu, true);
    let now = timer::now();
    // CPU 0 also serves the control channel (polled): it looks again sooner.
    let sleep = if cpu == 0 {
        IDLE_MICROS / 8
    } else {
        IDLE_MICROS
    };
    let mut deadline = now + timer::ticks_from_micros(sleep);
    if let Some(d) = VMS.lock().next_timer_deadline(now) {
        deadline = deadline.min(d);
    }
    // Look again after publishing IDLE: a vCPU made runnable in between would otherwise wait
    // for the next tick.
    if VMS.lock().has_runnable() {
        crate::kick::set_idle(cpu, false);
        return;
    }
    timer::arm_at(deadline.max(now + 1));
    // WFI wakes on a pending physical interrupt even with PSTATE.I set at EL2 (ARM ARM D1.16.2,
    // "Wait for Interrupt"); the interrupt is then handled here by polling.
    aarch64_cpu::asm::wfi();
    crate::kick::set_idle(cpu, false);
    gic::dispatch_pending();
    SLICE_OVER[cpu].store(false, Ordering::SeqCst);
}

fn load_cpuif(s: &CpuIfState) {
    let n = NR_LRS.load(Ordering::Relaxed) as usize;
    for i in 0..n.min(s.lrs.len()) {
        let _ = gic::write_lr(i, s.lrs[i]);
    }
    let aprs = NR_APRS.load(Ordering::Relaxed) as usize;
    for i in 0..aprs {
        let _ = gic::write_ap0r(i, s.ap0r[i] as u64);
        let _ = gic::write_ap1r(i, s.ap1r[i] as u64);
    }
    gic::write_ich_vmcr(s.vmcr);
    gic::write_ich_hcr(s.hcr);
}

fn store_cpuif(s: &mut CpuIfState) {
    let n = NR_LRS.load(Ordering::Relaxed) as usize;
    s.nr_lrs = n;
    for i in 0..n.min(s.lrs.len()) {
        s.lrs[i] = gic::read_lr(i).unwrap_or(0);
    }
    let aprs = NR_APRS.load(Ordering::Relaxed) as usize;
    for i in 0..aprs {
        s.ap0r[i] = gic::read_ap0r(i).unwrap_or(0) as u32;
        s.ap1r[i] = gic::read_ap1r(i).unwrap_or(0) as u32;
    }
    s.vmcr = gic::read_ich_vmcr();
    s.hcr = gic::read_ich_hcr();
    // The virtual interface stays off while the monitor runs: no maintenance interrupts.
    gic::write_ich_hcr(0);
}

/// One CPU's exit counts, alone on its cache line (CPUs never write each other's).
#[repr(align(64))]
struct ExitCounts {
    exits: AtomicU64,
    waited: AtomicU64,
}

/// Per CPU: guest exits handled, and those of them that found a lock they needed (their VM's or
/// the table's) held by another CPU. `bench=smp` reads them: exits of different VMs on
/// different CPUs should never wait on one another.
static EXIT_COUNTS: [ExitCounts; MAX_CPUS] = [const {
    ExitCounts {
        exits: AtomicU64::new(0),
        waited: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// (exits, exits that waited for a lock) of every CPU together, since boot.
pub fn exit_counts() -> (u64, u64) {
    EXIT_COUNTS.iter().fold((0, 0), |(e, w), c| {
        (
            e + c.exits.load(Ordering::Relaxed),
            w + c.waited.load(Ordering::Relaxed),
        )
    })
}

/// Takes `m`, noting in `waited` whether another CPU held it.
fn lock_noting<'a, T>(m: &'a Mutex<T>, waited: &mut bool) -> spin::MutexGuard<'a, T> {
    if let Some(g) = m.try_lock() {
        return g;
    }
    *waited = true;
    m.lock()
}

/// Runs vCPU `p.vcpu` of VM `p.id` on physical CPU `cpu` until it leaves the CPU (its slice
/// ends, it waits, its VM stops or pauses). Its exits are handled under its VM's lock alone
/// ([`vmfork_core::machine::vmmap`]): the table lock is taken only when the vCPU goes back or
/// the VM must stop, so exits of different VMs on different CPUs never wait on one another.
pub(crate) fn run_vcpu(cpu: usize, p: Picked) {
    let Picked {
        id,
        vcpu,
        mut ctx,
        vm: handle,
    } = p;
    let h = &MonitorHost;
    let slice_end = timer::now() + timer::ticks_from_micros(SLICE_MICROS);
    SLICE_OVER[cpu].store(false, Ordering::SeqCst);
    let pauth = PAUTH.load(Ordering::Relaxed);
    let nr_lrs = NR_LRS.load(Ordering::Relaxed) as usize;
    let counts = &EXIT_COUNTS[cpu];
    loop {
        // Whether this entry and its exit found a lock held by another CPU.
        let mut waited = false;
        // Prepare under the VM's lock: deliver a due virtual-timer interrupt, fill the list
        // registers.
        let setup = {
            let mut guard = lock_noting(&handle, &mut waited);
            let vm = &mut *guard;
            // A vCPU only runs with its VM's own vGIC (the copy of a shared one is made here,
            // before anything else, so no exit of a running vCPU ever copies it); with no heap
            // for the copy the VM pauses instead.
            // Then a new vmgenid ID is shown (page, then interrupt) before the vCPU runs.
            let ready = vm.schedulable() && vm.vgic_mut(h).is_some() && vm.apply_new_identity(h);
            if ready {
                vm.check_vtimer(h, vcpu, &mut ctx, timer::now());
                if let Some(vgic) = vm.vgic_mut(h) {
                    match vgic.fill_lrs(vcpu, nr_lrs) {
                        Ok(cpuif) => ctx.cpuif = cpuif,
                        Err(e) => crate::vm_log!(Error, id, "vm{id}: vgic fill failed: {e:?}"),
                    }
                }
                Some((
                    vm.s2.as_ref().map_or(0, |s| s.vttbr_el2()),
                    vm.cntvoff,
                    vm.vcpus[vcpu].mpidr,
                ))
            } else {
                None
            }
        };
        let Some((vttbr, cntvoff, mpidr)) = setup else {
            // The VM paused or is stopping (or its vGIC copy or vmgenid page wanted memory).
            let kicks = VMS.lock().put_back(id, vcpu, ctx, VcpuState::Runnable);
            crate::kick::send(&kicks);
            return;
        };

        write_vttbr(vttbr);
        timer::write_cntvoff(cntvoff);
        write_vmpidr(mpidr | (1 << 31));
        // SAFETY: the registers being loaded are this vCPU's own saved context.
        unsafe {
            load_el1(&ctx.sys);
            if pauth {
                load_pauth(&ctx.pauth);
            }
        }
        load_cpuif(&ctx.cpuif);
        timer::arm_at(slice_end);
        write_hcr(HCR_GUEST.load(Ordering::Relaxed));
        // SAFETY: VTTBR_EL2, HCR_EL2, VTCR_EL2, CNTVOFF_EL2, the GIC virtual interface and the
        // EL1 registers all describe this vCPU of this VM, whose stage-2 tables map only its own
        // RAM and the pages the monitor gave it.
        let exit = unsafe { enter_guest(&mut ctx.regs) };
        let syn = Syndrome {
            esr: Esr(ESR_EL2.get()),
            far: FAR_EL2.get(),
            hpfar: HPFAR_EL2.get(),
        };
        write_hcr(HCR_MONITOR);
        store_el1(&mut ctx.sys);
        if pauth {
            store_pauth(&mut ctx.pauth);
        }
        // The guest's virtual timer must not fire while someone else runs: its state is saved.
        crate::arch::sysregs::stop_guest_vtimer();
        store_cpuif(&mut ctx.cpuif);
        if exit == GuestExit::Irq {
            gic::dispatch_pending();
        }
        if cpu == 0 {
            deliver_console_input();
        }

        let now = timer::now();
        counts.exits.fetch_add(1, Ordering::Relaxed);
        let Handled {
            next,
            mut kicks,
            stop,
        } = {
            let mut guard = lock_noting(&handle, &mut waited);
            let vm = &mut *guard;
            // Never a copy here: the vGIC was made the VM's own before the vCPU ran.
            if let Some(vgic) = vm.vgic_mut(h) {
                if let Err(e) = vgic.sync_from_lrs(vcpu, &ctx.cpuif) {
                    crate::vm_log!(Error, id, "vm{id}: vgic sync failed: {e:?}");
                }
            }
            vm.check_vtimer(h, vcpu, &mut ctx, now);
            match exit {
                GuestExit::Sync => handle_sync_vm(h, vm, vcpu, &mut ctx, syn),
                GuestExit::Irq | GuestExit::Fiq => Handled {
                    next: Next::Resume,
                    kicks: Kicks::new(),
                    stop: None,
                },
                GuestExit::SError | GuestExit::Aarch32(_) => Handled {
                    next: Next::Leave,
                    kicks: Kicks::new(),
                    stop: Some(StopReason::Fault(alloc::format!(
                        "{exit:?} from the guest (ESR {:#x}, PC {:#x})",
                        syn.esr.0,
                        ctx.regs.pc
                    ))),
                },
            }
        };
        let slice_over = SLICE_OVER[cpu].load(Ordering::SeqCst) || now >= slice_end;
        if next == Next::Resume && !slice_over && stop.is_none() {
            // The common case (an emulated access, a copy-on-write fault): no table lock.
            if waited {
                counts.waited.fetch_add(1, Ordering::Relaxed);
            }
            crate::kick::send(&kicks);
            continue;
        }
        // The vCPU leaves its CPU, or its VM must stop: table-wide changes, under the table
        // lock (then the VM's, in that order).
        let mut guard = lock_noting(&VMS, &mut waited);
        if waited {
            counts.waited.fetch_add(1, Ordering::Relaxed);
        }
        let t = &mut *guard;
        if let Some(reason) = stop {
            kicks.merge(t.stop(id, reason));
        }
        let state = match next {
            Next::Resume | Next::Yield | Next::Leave => VcpuState::Runnable,
            Next::Wait => {
                let pending = t
                    .vms
                    .get_mut(&id)
                    .is_some_and(|mut vm| vm.has_pending(vcpu));
                if pending {
                    VcpuState::Runnable
                } else {
                    VcpuState::Waiting
                }
            }
            Next::Off => VcpuState::Off,
        };
        kicks.merge(t.put_back(id, vcpu, ctx, state));
        drop(guard);
        crate::kick::send(&kicks);
        timer::cancel();
        return;
    }
}
