//! A vCPU's synchronous exits: stage-2 aborts (copy-on-write faults, emulated devices),
//! PSCI and the vmfork hypercalls, WFI/WFE and trapped system registers. Each handler gets the
//! vCPU's context and its VM, changes them as the architecture says the trapped instruction
//! would have, and says what the CPU does next.

use alloc::format;

use super::devices::{Devices, Window};
use super::ops::PendingOp;
use super::vm::{MemoryWant, PauseReason, StopReason, VcpuState, Vm, VmState};
use super::{
    vm_log, El1Sysregs, GuestRegs, Host, Kicks, PauthKeys, VcpuCtx, VmTable, PSTATE_EL1H_MASKED,
};
use crate::addr::Ipa;
use crate::esr::{Esr, ExceptionClass};
use crate::guest_dtb::layout;
use crate::mmio::{MmioAccess, MmioResult};
use crate::psci::{self, PsciCall, PsciReturn};
use crate::stage2::{FaultOutcome, Stage2Error};
use crate::vgic::SgiRegister;

/// What the physical CPU does after an exit was handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Run the same vCPU again.
    Resume,
    /// The vCPU waits for an interrupt (WFI).
    Wait,
    /// Give the CPU to another vCPU (WFE, PSCI CPU_OFF of itself handled separately).
    Yield,
    /// The vCPU is off (CPU_OFF).
    Off,
    /// The VM is stopping or paused: put the vCPU back.
    Leave,
}

/// The syndrome registers of a synchronous exit.
#[derive(Clone, Copy, Debug)]
pub struct Syndrome {
    /// ESR_EL2.
    pub esr: Esr,
    /// FAR_EL2.
    pub far: u64,
    /// HPFAR_EL2.
    pub hpfar: u64,
}

/// Handles a synchronous exit of vCPU `vcpu` of VM `id` in table `t`. Returns what to do next
/// and the physical CPUs to kick (vCPUs that got an interrupt while running elsewhere). The
/// monitor does the same in two steps ([`handle_sync_vm`] under the VM's lock only, then the
/// stop, if any, under the table lock); this is the whole of it for the host tests.
pub fn handle_sync<H: Host>(
    t: &mut VmTable<H>,
    id: u32,
    vcpu: usize,
    ctx: &mut VcpuCtx,
    syn: Syndrome,
) -> (Next, Kicks) {
    let Some(handle) = t.vms.handle(&id) else {
        return (Next::Leave, Kicks::new());
    };
    let handled = handle_sync_vm(&t.host, &mut super::vmmap::lock(&handle), vcpu, ctx, syn);
    let mut kicks = handled.kicks;
    if let Some(reason) = handled.stop {
        kicks.merge(t.stop(id, reason));
    }
    (handled.next, kicks)
}

/// What handling an exit of one vCPU asks for.
#[derive(Debug)]
pub struct Handled {
    /// What the physical CPU does next.
    pub next: Next,
    /// The physical CPUs to kick.
    pub kicks: Kicks,
    /// The VM must stop (a fatal exit): for the caller to do with [`VmTable::stop`] once it
    /// holds the table lock (the vCPU is still on its CPU then, so the VM goes when it comes
    /// back).
    pub stop: Option<StopReason>,
}

/// Handles a synchronous exit of vCPU `vcpu` of `vm` with nothing but the VM (its lock) and
/// the host: no other VM and no table-wide state is needed to handle an exit, so exits of
/// different VMs on different CPUs never wait on one another ([`super::vmmap`]).
pub fn handle_sync_vm<H: Host>(
    h: &H,
    vm: &mut Vm,
    vcpu: usize,
    ctx: &mut VcpuCtx,
    syn: Syndrome,
) -> Handled {
    let mut kicks = Kicks::new();
    let esr = syn.esr;
    let next = match esr.ec() {
        ExceptionClass::DataAbortLowerEl => data_abort(h, vm, vcpu, ctx, syn, &mut kicks),
        ExceptionClass::InstructionAbortLowerEl => instruction_abort(h, vm, ctx, syn),
        ExceptionClass::HvcA64 => hypercall(vm, vcpu, ctx, &mut kicks),
        ExceptionClass::SmcA64 => {
            // A trapped SMC returns to the SMC itself (ARM ARM D1.10.2): step over it.
            ctx.regs.pc += 4;
            hypercall(vm, vcpu, ctx, &mut kicks)
        }
        ExceptionClass::WfiWfe => {
            ctx.regs.pc += 4;
            let is_wfe = esr.iss() & 1 == 1;
            if is_wfe {
                Next::Yield
            } else if vm.has_pending(vcpu) {
                Next::Resume
            } else {
                Next::Wait
            }
        }
        ExceptionClass::MsrMrsTrap => sysreg(h, vm, vcpu, ctx, esr, &mut kicks),
        _ => {
            let reason = format!(
                "unhandled exception from the guest: {} (EC {:#04x}), ESR {:#x}, FAR {:#x}, HPFAR {:#x}, PC {:#x}",
                esr.ec().name(),
                esr.ec_raw(),
                esr.0,
                syn.far,
                syn.hpfar,
                ctx.regs.pc
            );
            dump_vcpu(vm.id, vcpu, ctx);
            return Handled {
                next: Next::Leave,
                kicks,
                stop: Some(StopReason::Fault(reason)),
            };
        }
    };
    // A stop requested while handling (SYSTEM_OFF, a fatal access) wins.
    let next = if vm.schedulable() { next } else { Next::Leave };
    Handled {
        next,
        kicks,
        stop: None,
    }
}

fn dump_vcpu(id: u32, vcpu: usize, ctx: &VcpuCtx) {
    let mut s = format!(
        "vm{id} vcpu{vcpu}: PC {:#018x} PSTATE {:#x} SP_EL1 {:#x} ELR_EL1 {:#x} ESR_EL1 {:#x} FAR_EL1 {:#x}\n",
        ctx.regs.pc,
        ctx.regs.pstate,
        ctx.sys.sp_el1,
        ctx.sys.elr_el1,
        ctx.sys.esr_el1,
        ctx.sys.far_el1
    );
    for (i, x) in ctx.regs.x.iter().enumerate() {
        s += &format!("  x{i:<2}={x:#018x}{}", if i % 4 == 3 { "\n" } else { "" });
    }
    log::warn!("{s}");
}

/// Injects a synchronous external abort into the guest as the hardware would for an access
/// that no device answers (ARM ARM D1.10: exception entry to EL1): ESR_EL1 describes a data or
/// instruction abort with DFSC/IFSC 0b010000, FAR_EL1 the faulting VA, and the vCPU continues
/// at its EL1 vector.
fn inject_abort(ctx: &mut VcpuCtx, far: u64, instruction: bool, write: bool) {
    let from_el0 = ctx.regs.pstate & 0xf == 0;
    let ec: u64 = match (instruction, from_el0) {
        (false, true) => 0x24,
        (false, false) => 0x25,
        (true, true) => 0x20,
        (true, false) => 0x21,
    };
    // IL (bit 25): 32-bit instruction; WnR (bit 6) for a store; DFSC/IFSC 0b010000.
    let wnr = if write && !instruction { 1 << 6 } else { 0 };
    let esr = (ec << 26) | (1 << 25) | wnr | 0x10;
    inject_exception(ctx, esr, Some(far));
}

/// Injects an UNDEFINED exception (EC 0) for an instruction the monitor does not emulate.
fn inject_undef(ctx: &mut VcpuCtx) {
    inject_exception(ctx, 1 << 25, None);
}

fn inject_exception(ctx: &mut VcpuCtx, esr: u64, far: Option<u64>) {
    let pstate = ctx.regs.pstate;
    let vector_offset = match pstate & 0xf {
        0b0000 => 0x400, // from EL0 (AArch64): lower EL, synchronous
        0b0100 => 0x000, // EL1t: current EL with SP_EL0
        _ => 0x200,      // EL1h: current EL with SP_ELx
    };
    ctx.sys.esr_el1 = esr;
    if let Some(far) = far {
        ctx.sys.far_el1 = far;
    }
    ctx.sys.elr_el1 = ctx.regs.pc;
    ctx.sys.spsr_el1 = pstate;
    ctx.regs.pc = ctx.sys.vbar_el1 + vector_offset;
    ctx.regs.pstate = PSTATE_EL1H_MASKED;
}

/// Writes a fork's pending vmgenid ID before a fault in the low GiB is handled; `Some` when the
/// vCPU cannot go on (out of memory pauses the VM, as for a copy-on-write fault).
fn new_identity_first<H: Host>(h: &H, vm: &mut Vm, ipa: Ipa) -> Option<Next> {
    match vm.write_new_identity(h, ipa) {
        Ok(()) => None,
        Err(Stage2Error::OutOfMemory) => {
            vm.state = VmState::Paused(PauseReason::OutOfMemory(MemoryWant::NewIdentity));
            vm_log!(
                h,
                Warn,
                vm.id,
                "vm{}: paused: no free frame for its vmgenid page",
                vm.id
            );
            Some(Next::Leave)
        }
        Err(e) => {
            vm.state = VmState::Stopping(StopReason::Internal(format!(
                "stage-2 error writing its vmgenid ID: {e}"
            )));
            Some(Next::Leave)
        }
    }
}

fn instruction_abort<H: Host>(h: &H, vm: &mut Vm, ctx: &mut VcpuCtx, syn: Syndrome) -> Next {
    let ipa = crate::esr::hpfar_to_ipa(syn.hpfar, syn.far);
    if let Some(next) = new_identity_first(h, vm, ipa) {
        return next;
    }
    // A fault on a stage-1 table walk counts as a write: with FEAT_HAFDBS (Linux sets
    // TCR_EL1.HA) the walk writes the Access flag into the descriptor, so a shared table page
    // must be copied, or the fetch faults again forever.
    let write = syn.esr.instruction_abort().is_some_and(|i| i.s1ptw);
    let Some(s2) = vm.s2.as_mut() else {
        return Next::Leave;
    };
    match h.with_mem(|cx| s2.handle_fault(cx, ipa, write)) {
        // A fetch from a page mapped without execute permission (the vmgenid page) faults
        // again however often it is retried: the guest gets an instruction abort instead. It
        // is a synchronous external abort (IFSC 0b010000), as for a fetch outside RAM and as
        // KVM injects for a fetch it cannot serve: the guest's own translation may be off, in
        // which case no stage-1 permission fault is architecturally possible, while an
        // external abort always is.
        Ok(FaultOutcome::Retry)
            if h.with_mem(|cx| s2.translate(&*cx.mem, ipa))
                .is_some_and(|t| !t.perms.exec) =>
        {
            vm_log!(
                h,
                Warn,
                vm.id,
                "vm{}: instruction fetch from non-executable IPA {ipa} (PC {:#x}): external abort injected",
                vm.id,
                ctx.regs.pc
            );
            inject_abort(ctx, syn.far, true, false);
            Next::Resume
        }
        Ok(FaultOutcome::Retry) => Next::Resume,
        Ok(FaultOutcome::OutOfMemory) => {
            vm.state = VmState::Paused(PauseReason::OutOfMemory(MemoryWant::Fetch(ipa)));
            vm_log!(h, Warn, vm.id, "vm{}: paused: out of memory", vm.id);
            Next::Leave
        }
        Ok(_) => {
            vm_log!(
                h,
                Warn,
                vm.id,
                "vm{}: instruction fetch from IPA {ipa} (PC {:#x}) outside RAM: external abort injected",
                vm.id,
                ctx.regs.pc
            );
            inject_abort(ctx, syn.far, true, false);
            Next::Resume
        }
        Err(e) => {
            vm.state = VmState::Stopping(StopReason::Internal(format!(
                "stage-2 error at IPA {ipa}: {e}"
            )));
            Next::Leave
        }
    }
}

fn data_abort<H: Host>(
    h: &H,
    vm: &mut Vm,
    vcpu: usize,
    ctx: &mut VcpuCtx,
    syn: Syndrome,
    kicks: &mut Kicks,
) -> Next {
    let ipa = crate::esr::hpfar_to_ipa(syn.hpfar, syn.far);
    if let Some(next) = new_identity_first(h, vm, ipa) {
        return next;
    }
    let iss = syn.esr.data_abort();
    // A fault on a stage-1 table walk counts as a write (the walk may update the Access flag
    // or dirty state of the descriptor: FEAT_HAFDBS), as for instruction fetches above.
    let write = iss.as_ref().is_some_and(|d| d.wnr || d.s1ptw);
    let Some(s2) = vm.s2.as_mut() else {
        return Next::Leave;
    };
    match h.with_mem(|cx| s2.handle_fault(cx, ipa, write)) {
        Ok(FaultOutcome::Retry) => return Next::Resume,
        Ok(FaultOutcome::OutOfMemory) => {
            vm.state = VmState::Paused(PauseReason::OutOfMemory(MemoryWant::CowWrite(ipa)));
            vm_log!(
                h,
                Warn,
                vm.id,
                "vm{}: paused: no free frame for a copy-on-write fault at {ipa}",
                vm.id
            );
            return Next::Leave;
        }
        Ok(FaultOutcome::NotMapped) | Ok(FaultOutcome::PermissionDenied) => {}
        Err(e) => {
            vm.state = VmState::Stopping(StopReason::Internal(format!(
                "stage-2 error at IPA {ipa}: {e}"
            )));
            return Next::Leave;
        }
    }
    // A cache maintenance instruction by VA (DC CIVAC, CVAC, IVAC, ...; ESR CM = 1) on
    // something that is not writable RAM: on hardware it completes (Device memory, or nothing,
    // holds no cache lines), so it is stepped over, not answered with an abort, as KVM does
    // (the monitor cleans what it writes itself). DC ZVA is a store, with CM = 0. A stage-2
    // fault on an address translation's table walk (CM and S1PTW) goes on to the abort below.
    if iss.as_ref().is_some_and(|d| d.cm && !d.s1ptw) {
        ctx.regs.pc += 4;
        return Next::Resume;
    }
    // Not RAM: an emulated device, or nothing.
    let Some(access) = iss.and_then(|d| d.access()) else {
        vm_log!(
                h,
            Warn,
            vm.id,
            "vm{}: access to IPA {ipa} without a valid syndrome (PC {:#x}): external abort injected",
            vm.id,
            ctx.regs.pc
        );
        inject_abort(ctx, syn.far, false, write);
        return Next::Resume;
    };
    let size = access.size;
    // A big-endian access (SCTLR_EL1.EE, or E0E from EL0) moves the register's bytes reversed:
    // the device sees, and the register receives, what the hardware would have transferred
    // (crate::mmio::data_is_big_endian says why the ID registers are left alone).
    let big_endian = crate::mmio::data_is_big_endian(ctx.regs.pstate, ctx.sys.sctlr_el1);
    let write_value = access.write.then(|| {
        let v = if access.register == 31 {
            0
        } else {
            ctx.regs.x[access.register as usize]
        };
        let v = if size >= 8 {
            v
        } else {
            v & ((1u64 << (size as u32 * 8)) - 1)
        };
        if big_endian {
            crate::mmio::swap_bytes(v, size)
        } else {
            v
        }
    });
    let at = |offset| MmioAccess {
        offset,
        size,
        write: write_value,
    };
    let result = match Devices::route(ipa.0, vm.vcpus.len()) {
        Some(Window::Gicd(offset)) => match vm.vgic_mut(h) {
            // Paused: the access is made again when the VM is resumed.
            None => return Next::Leave,
            Some(vgic) => vgic.dist_access(vcpu, at(offset)),
        },
        Some(Window::Gicr(offset)) => match vm.vgic_mut(h) {
            None => return Next::Leave,
            Some(vgic) => vgic.redist_access(vcpu, at(offset)),
        },
        Some(Window::Uart(offset)) => {
            let r = crate::mmio::MmioDevice::access(&mut vm.devices.uart, vcpu, at(offset));
            vm.drain_console(h);
            // A read may have made room in the receive FIFO for queued input.
            if let Some(k) = vm.feed_uart(h) {
                vm.kick_vcpu(k, kicks);
            }
            r
        }
        None => MmioResult::Fault,
    };
    match result {
        MmioResult::Read(v) => {
            let v = if big_endian {
                crate::mmio::swap_bytes(v, size)
            } else {
                v
            };
            let v = if access.sign_extend && size < 8 {
                let shift = 64 - size as u32 * 8;
                (((v << shift) as i64) >> shift) as u64
            } else {
                v
            };
            let v = if access.sixty_four {
                v
            } else {
                v & 0xffff_ffff
            };
            if access.register != 31 {
                ctx.regs.x[access.register as usize] = v;
            }
            ctx.regs.pc += 4;
            Next::Resume
        }
        MmioResult::Written => {
            ctx.regs.pc += 4;
            Next::Resume
        }
        MmioResult::Fault => {
            vm_log!(
                h,
                Warn,
                vm.id,
                "vm{}: {} of {} bytes at IPA {ipa} (PC {:#x}) hits no RAM or device: external abort injected",
                vm.id,
                if access.write { "write" } else { "read" },
                size,
                ctx.regs.pc
            );
            inject_abort(ctx, syn.far, false, access.write);
            Next::Resume
        }
    }
}

fn hypercall(vm: &mut Vm, vcpu: usize, ctx: &mut VcpuCtx, kicks: &mut Kicks) -> Next {
    let x = &ctx.regs.x;
    let call = psci::decode(x[0], x[1], x[2], x[3]);
    let mut next = Next::Resume;
    let ret: u64 = match call {
        PsciCall::Version => psci::PSCI_VERSION_1_1 as u64,
        PsciCall::SmcccVersion => psci::SMCCC_VERSION_1_1 as u64,
        PsciCall::Features { function_id } => psci::ret(psci::psci_features(function_id)),
        PsciCall::SmcccArchFeatures { function_id } => {
            psci::ret(psci::smccc_arch_features(function_id))
        }
        PsciCall::MigrateInfoType => psci::MIGRATE_INFO_TYPE_NOT_PRESENT as u64,
        PsciCall::CpuOn {
            target_cpu,
            entry_point,
            context_id,
        } => cpu_on(vm, target_cpu, entry_point, context_id, kicks),
        PsciCall::CpuOff => {
            next = Next::Off;
            0
        }
        PsciCall::CpuSuspend { .. } => {
            // Every power state is a standby state here, as KVM treats them: PSCI (DEN0022,
            // 5.4.2) lets an implementation enter a shallower state than asked, and a
            // powerdown request that is entered as standby returns like one, SUCCESS in X0 at
            // the instruction after the call, with the entry point unused. The vCPU waits as
            // in WFI: until an interrupt is pending for it (whatever PSTATE.{I,F} mask) or its
            // timer fires.
            next = if vm.has_pending(vcpu) {
                Next::Resume
            } else {
                Next::Wait
            };
            0
        }
        PsciCall::AffinityInfo {
            target_affinity,
            lowest_affinity_level,
        } => {
            if lowest_affinity_level != 0 {
                PsciReturn::InvalidParameters.to_x0()
            } else {
                match psci::find_target(target_affinity, vm.vcpus.iter().map(|v| v.mpidr)) {
                    Err(e) => e.to_x0(),
                    Ok(i) if vm.vcpus[i].state == VcpuState::Off => 1, // OFF
                    Ok(_) => 0,                                        // ON
                }
            }
        }
        PsciCall::SystemOff => {
            vm.state = VmState::Stopping(StopReason::PowerOff);
            0
        }
        PsciCall::SystemReset => {
            vm.state = VmState::Stopping(StopReason::SystemReset);
            0
        }
        PsciCall::VendorHypCallUid => {
            let uid = psci::VMFORK_UID;
            ctx.regs.x[1] = uid[1] as u64;
            ctx.regs.x[2] = uid[2] as u64;
            ctx.regs.x[3] = uid[3] as u64;
            uid[0] as u64
        }
        PsciCall::Vmfork(psci::VmforkCall::Identity) => {
            ctx.regs.x[1] = vm.parent.map_or(u64::MAX, u64::from);
            ctx.regs.x[2] = vm.generation;
            ctx.regs.x[3] = vm.stats.resets;
            vm.id as u64
        }
        PsciCall::Vmfork(psci::VmforkCall::Reset) => {
            if vm.reset_point.is_none() {
                PsciReturn::Denied.to_x0()
            } else {
                // Like a fork: every vCPU leaves first; the reset then replaces all of them
                // with their fork-point contexts, so nothing is returned here when it is queued.
                match super::ops::guest_request(vm, vcpu, PendingOp::Reset, kicks) {
                    Ok(()) => {
                        next = Next::Leave;
                        ctx.regs.x[0]
                    }
                    Err(x0) => x0,
                }
            }
        }
        PsciCall::Vmfork(psci::VmforkCall::Fork { .. }) => {
            // Every vCPU of the VM must be off the CPUs first: this one leaves now, the others
            // are kicked; the last one back runs the fork (VmTable::run_pending), which
            // also writes this call's result into X0 of parent and child. Refused at once
            // (VMFORK_BUSY in X0) when another fork or reset already waits.
            let op = PendingOp::Fork {
                count: 1,
                paused: false,
                remove_on_stop: false,
            };
            match super::ops::guest_request(vm, vcpu, op, kicks) {
                Ok(()) => {
                    next = Next::Leave;
                    ctx.regs.x[0]
                }
                Err(x0) => x0,
            }
        }
        PsciCall::VendorHypRevision => {
            ctx.regs.x[1] = psci::VMFORK_REVISION.1 as u64;
            psci::VMFORK_REVISION.0 as u64
        }
        _ => PsciReturn::NotSupported.to_x0(),
    };
    ctx.regs.x[0] = ret;
    next
}

fn cpu_on(vm: &mut Vm, target: u64, entry: u64, context: u64, kicks: &mut Kicks) -> u64 {
    // The target must name a vCPU exactly (no bits outside Aff3..Aff0) and the entry point
    // must be in the VM's RAM: a vCPU started anywhere else could only loop on aborts.
    let i = match psci::check_cpu_on(
        target,
        entry,
        layout::RAM_BASE,
        vm.ram_size,
        vm.vcpus.iter().map(|v| v.mpidr),
    ) {
        Ok(i) => i,
        Err(e) => return e.to_x0(),
    };
    if vm.vcpus[i].state != VcpuState::Off {
        return PsciReturn::AlreadyOn.to_x0();
    }
    let Some(ctx) = vm.vcpus[i].ctx.as_mut() else {
        return PsciReturn::InternalFailure.to_x0();
    };
    ctx.regs = GuestRegs::default();
    ctx.regs.pc = entry;
    ctx.regs.x[0] = context;
    ctx.regs.pstate = PSTATE_EL1H_MASKED;
    ctx.sys = El1Sysregs::reset();
    ctx.pauth = PauthKeys::default();
    vm.vcpus[i].state = VcpuState::Runnable;
    kicks.idle = true;
    0
}

/// ICC_SGI1R_EL1 as Op0/Op1/CRn/CRm/Op2 = 3/0/12/11/5.
const ICC_SGI1R_EL1: (u8, u8, u8, u8, u8) = (3, 0, 12, 11, 5);
/// ICC_ASGI1R_EL1: 3/0/12/11/6.
const ICC_ASGI1R_EL1: (u8, u8, u8, u8, u8) = (3, 0, 12, 11, 6);
/// ICC_SGI0R_EL1: 3/0/12/11/7.
const ICC_SGI0R_EL1: (u8, u8, u8, u8, u8) = (3, 0, 12, 11, 7);

fn sysreg<H: Host>(
    h: &H,
    vm: &mut Vm,
    vcpu: usize,
    ctx: &mut VcpuCtx,
    esr: Esr,
    kicks: &mut Kicks,
) -> Next {
    let Some(iss) = esr.sys_reg() else {
        inject_undef(ctx);
        return Next::Resume;
    };
    // ID, debug registers (HCR_EL2.TID3, MDCR_EL2.TDA): arch/idregs.rs.
    if h.emulate_sysreg(&iss, &mut ctx.regs, &mut ctx.sys) {
        return Next::Resume;
    }
    // The three SGI generation registers (write-only: a read is UNDEFINED, below). With
    // HCR_EL2.IMO/FMO set, EL1 writes to them trap here (ARM ARM D13.x, ICC_SGI*R_EL1 traps);
    // which targets take the SGI depends on the register and the SGI's group (vgic).
    let sgi_register = [
        (ICC_SGI1R_EL1, SgiRegister::Sgi1r),
        (ICC_ASGI1R_EL1, SgiRegister::Asgi1r),
        (ICC_SGI0R_EL1, SgiRegister::Sgi0r),
    ]
    .into_iter()
    .find(|&((op0, op1, crn, crm, op2), _)| iss.is(op0, op1, crn, crm, op2));
    if let (Some((_, register)), false) = (sgi_register, iss.read) {
        let value = if iss.rt == 31 {
            0
        } else {
            ctx.regs.x[iss.rt as usize]
        };
        let Some(vgic) = vm.vgic_mut(h) else {
            // Paused: the write is made again when the VM is resumed.
            return Next::Leave;
        };
        match vgic.send_sgi_from(vcpu, value, register) {
            Ok(targets) => {
                for t in targets.iter() {
                    vm.kick_vcpu(t, kicks);
                }
            }
            Err(e) => vm_log!(
                h,
                Debug,
                vm.id,
                "vm{}: SGI write {value:#x} refused: {e:?}",
                vm.id
            ),
        }
        ctx.regs.pc += 4;
        return Next::Resume;
    }
    vm_log!(
        h,
        Debug,
        vm.id,
        "vm{} vcpu{vcpu}: {} at PC {:#x} is not emulated: UNDEFINED injected",
        vm.id,
        iss,
        ctx.regs.pc
    );
    inject_undef(ctx);
    Next::Resume
}
