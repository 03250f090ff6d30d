//! What the model tests (`vmid_model`, `sched_model`, `machine_model`) share: how they make
//! their VMs.

use vmfork_core::machine::fake::FakeHost;
use vmfork_core::machine::{CreateError, GuestSpec, VcpuState, VmTable};

/// A tiny Linux arm64 `Image`: the header and a page of zeros.
pub fn kernel() -> Vec<u8> {
    let mut b = vec![0u8; 4096];
    b[0..4].copy_from_slice(&0x9100_0000u32.to_le_bytes());
    b[16..24].copy_from_slice(&(4096u64).to_le_bytes()); // image_size
    b[56..60].copy_from_slice(b"ARM\x64");
    b
}

/// Creates VM `name` in `t` from [`kernel`], with `mem` bytes of RAM, `cpus` vCPUs, no initrd
/// nor command line, and every vCPU runnable (the secondaries as if `CPU_ON` had started them).
pub fn create_vm(
    t: &mut VmTable<FakeHost>,
    name: &str,
    mem: u64,
    cpus: u32,
) -> Result<u32, CreateError> {
    let k = kernel();
    let id = t.create(&GuestSpec {
        name: name.to_string(),
        kernel: &k,
        initrd: None,
        mem,
        cpus,
        cmdline: String::new(),
    })?;
    if let Some(mut vm) = t.vms.get_mut(&id) {
        for v in vm.vcpus.iter_mut() {
            v.state = VcpuState::Runnable;
        }
    }
    Ok(id)
}
