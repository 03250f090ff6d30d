//! After the walk: interrupt specifiers decoded into INTIDs ([`gic_intids`]) for the devices whose
//! interrupt parent is the GIC, the generic timer's PPIs, and the console UART that
//! `/chosen/stdout-path` names.

use alloc::vec::Vec;

use super::blob::be32;
use super::walk::Collected;
use super::{Pl011, Platform, PlatformError, Timer, VirtioMmio};

/// Decodes a GIC interrupt specifier list (`cells` >= 3 cells each: type, number, flags) into
/// INTIDs: SPI n is 32 + n, PPI n is 16 + n, extended SPI n is 4096 + n, extended PPI n is
/// 1056 + n.
pub fn gic_intids(spec: &[u8], cells: u32) -> Result<Vec<u32>, PlatformError> {
    let malformed = |what| PlatformError::Malformed {
        node: "interrupts",
        what,
    };
    if !(3..=4).contains(&cells) {
        return Err(malformed("GIC #interrupt-cells is not 3 or 4"));
    }
    let entry = cells as usize * 4;
    if !spec.len().is_multiple_of(entry) {
        return Err(malformed("length is not a whole number of specifiers"));
    }
    spec.chunks_exact(entry)
        .map(|e| {
            let kind = be32(e, 0).unwrap_or(u32::MAX);
            let n = be32(e, 4).unwrap_or(u32::MAX);
            match kind {
                0 if n < 988 => Ok(32 + n),
                1 if n < 16 => Ok(16 + n),
                2 if n < 1024 => Ok(4096 + n),
                3 if n < 64 => Ok(1056 + n),
                0..=3 => Err(malformed("interrupt number out of range for its type")),
                _ => Err(malformed("unknown interrupt type")),
            }
        })
        .collect()
}

pub(super) fn finish(c: Collected<'_>) -> Result<Platform, PlatformError> {
    let mut p = c.platform;
    let (gic_phandle, gic_cells) = match &c.gic {
        Some((_, phandle, cells)) => (*phandle, *cells),
        None => (None, 0),
    };
    // INTIDs of a device, when its interrupt parent is the GIC.
    let intids = |interrupt_parent: Option<u32>,
                  spec: Option<&[u8]>|
     -> Result<Option<Vec<u32>>, PlatformError> {
        match (spec, gic_phandle) {
            (Some(spec), Some(gic)) if interrupt_parent == Some(gic) => {
                gic_intids(spec, gic_cells).map(Some)
            }
            _ => Ok(None),
        }
    };

    if let Some((pending, _, _)) = c.gic {
        let mut gic = pending.device;
        gic.maintenance_intid =
            intids(pending.interrupt_parent, pending.interrupts)?.and_then(|v| v.first().copied());
        p.gic = Some(gic);
    }

    if let Some(t) = c.timer {
        if let Some(v) = intids(t.interrupt_parent, t.interrupts)? {
            if v.len() < 4 {
                return Err(PlatformError::Malformed {
                    node: "timer",
                    what: "fewer than four interrupts",
                });
            }
            p.timer = Some(Timer {
                secure_phys: v[0],
                nonsecure_phys: v[1],
                virt: v[2],
                hyp_phys: v[3],
                hyp_virt: v.get(4).copied(),
            });
        }
    }

    // The console: stdout-path (possibly an alias, possibly with ":options") else the first.
    let stdout = p
        .stdout_path
        .as_deref()
        .map(|s| s.split(':').next().unwrap_or(s))
        .map(|s| {
            if s.starts_with('/') {
                s
            } else {
                c.aliases
                    .iter()
                    .find(|(alias, _)| *alias == s)
                    .map(|(_, t)| *t)
                    .unwrap_or(s)
            }
        });
    let console = c
        .uarts
        .iter()
        .position(|u| Some(u.path.as_str()) == stdout)
        .unwrap_or(0);
    if let Some(u) = c.uarts.get(console) {
        let intid = intids(u.interrupt_parent, u.interrupts)?.and_then(|v| v.first().copied());
        p.uart = Some(Pl011 { intid, ..u.device });
    }

    for v in c.virtio {
        let intid = intids(v.interrupt_parent, v.interrupts)?.and_then(|i| i.first().copied());
        p.virtio_mmio.push(VirtioMmio { intid, ..v.device });
    }
    p.virtio_mmio.sort_by_key(|v| v.region.base);
    Ok(p)
}
