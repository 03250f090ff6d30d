//! Boot-time guests: the VMs named by QEMU fw_cfg files `opt/vmfork/<n>/{kernel,initrd,config}`
//! are created, in index order, before the monitor says it is ready.

use alloc::format;
use alloc::string::String;

use vmfork_core::guest_spec::FwCfgFile;
use vmfork_core::platform::Platform;

use crate::fwcfg::FwCfg;
use crate::vm::{GuestSpec, VMS};

fn lookup<'a>(dir: &'a [FwCfgFile], name: &str) -> Result<&'a FwCfgFile, String> {
    dir.iter()
        .find(|f| f.name == name)
        .ok_or_else(|| format!("fw_cfg file {name} vanished"))
}

/// Creates every guest the fw_cfg files describe. A guest that cannot be created is reported on
/// one line and skipped; the others still start. Returns how many were created.
pub fn create_boot_guests(platform: &Platform) -> usize {
    let Some(region) = &platform.fw_cfg else {
        return 0;
    };
    let dev = match FwCfg::probe(region) {
        Ok(d) => d,
        Err(e) => {
            log::error!("fw_cfg: {e}");
            return 0;
        }
    };
    let dir = match dev.files() {
        Ok(d) => d,
        Err(e) => {
            log::error!("fw_cfg: file directory: {e}");
            return 0;
        }
    };
    // Malformed names and configs were already reported, one line each, by
    // `fwcfg::log_guests`; such guests are skipped here without a second line.
    let Ok(specs) = dev.guest_specs(&dir) else {
        return 0;
    };
    let mut created = 0;
    for (files, config) in specs {
        let n = files.index;
        let Ok(config) = config else { continue };
        let result = (|| -> Result<u32, String> {
            let kernel = dev
                .read_file_vec(lookup(&dir, &files.kernel)?)
                .map_err(|e| format!("reading the kernel: {e}"))?;
            let initrd = match &files.initrd {
                Some(name) => Some(
                    dev.read_file_vec(lookup(&dir, name)?)
                        .map_err(|e| format!("reading the initrd: {e}"))?,
                ),
                None => None,
            };
            let spec = GuestSpec {
                name: config.name.clone().unwrap_or_else(|| format!("guest{n}")),
                kernel: &kernel,
                initrd: initrd.as_deref(),
                mem: config.mem,
                cpus: config.cpus,
                cmdline: config.cmdline.clone(),
            };
            VMS.lock().create(&spec).map_err(|e| format!("{e}"))
        })();
        match result {
            Ok(_) => created += 1,
            Err(e) => log::error!("guest {n}: not started: {e}"),
        }
    }
    created
}
