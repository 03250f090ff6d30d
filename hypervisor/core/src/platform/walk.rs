//! The walk over a validated tree: `/chosen`, `/aliases`, the CPUs, and which nodes are which
//! devices, collected into [`Collected`] (a device's interrupts stay [`Pending`] until the GIC is
//! known, in `resolve`).

use alloc::string::String;
use alloc::vec::Vec;

use super::reg::{
    child_translation, compatible_with, enabled, first_region, prop, prop_str, prop_u32,
    read_cells, regions, Ctx, Node, Translation,
};
use super::resolve::finish;
use super::{
    Cpu, Gic, GicVersion, Pl011, Platform, PlatformError, PsciConduit, Region, VirtioMmio,
};

/// A device whose interrupt is resolved once the GIC is known.
pub(super) struct Pending<'a, T> {
    pub(super) device: T,
    pub(super) interrupt_parent: Option<u32>,
    pub(super) interrupts: Option<&'a [u8]>,
    pub(super) path: String,
}

#[derive(Default)]
pub(super) struct Collected<'a> {
    pub(super) platform: Platform,
    pub(super) uarts: Vec<Pending<'a, Pl011>>,
    pub(super) virtio: Vec<Pending<'a, VirtioMmio>>,
    pub(super) timer: Option<Pending<'a, ()>>,
    pub(super) gic: Option<(Pending<'a, Gic>, Option<u32>, u32)>,
    pub(super) aliases: Vec<(&'a str, &'a str)>,
}

const GIC_V3: &[&str] = &["arm,gic-v3"];
const GIC_V2: &[&str] = &[
    "arm,cortex-a15-gic",
    "arm,gic-400",
    "arm,cortex-a9-gic",
    "arm,cortex-a7-gic",
    "arm,arm11mp-gic",
];
const TIMER: &[&str] = &["arm,armv8-timer", "arm,armv7-timer"];
const PSCI: &[&str] = &["arm,psci-1.0", "arm,psci-0.2", "arm,psci"];

pub(super) fn parse_valid(blob: &[u8]) -> Result<Platform, PlatformError> {
    let fdt =
        fdt::Fdt::new(blob).map_err(|_| PlatformError::BadLayout("rejected by the fdt crate"))?;
    let root = fdt
        .find_node("/")
        .ok_or(PlatformError::BadLayout("no root node"))?;
    let ctx = Ctx {
        address_cells: 2,
        size_cells: 1,
        translation: Translation::Identity,
        interrupt_parent: None,
        path: String::new(),
    };
    let mut c = Collected::default();
    walk(root, &ctx, 0, &mut c)?;
    finish(c)
}

fn walk<'a>(
    node: Node<'_, 'a>,
    ctx: &Ctx,
    depth: usize,
    c: &mut Collected<'a>,
) -> Result<(), PlatformError> {
    let is_root = depth == 0;
    let name = node.name;
    let base_name = name.split('@').next().unwrap_or(name);
    if !is_root && !enabled(node) {
        return Ok(());
    }

    if depth == 1 && base_name == "chosen" {
        chosen(node, &mut c.platform)?;
    } else if depth == 1 && base_name == "aliases" {
        for p in node.properties() {
            let v = p.value.strip_suffix(&[0]).unwrap_or(p.value);
            if let Ok(target) = core::str::from_utf8(v) {
                c.aliases.push((p.name, target));
            }
        }
    } else if depth == 1 && base_name == "cpus" {
        cpus(node, &mut c.platform)?;
        return Ok(());
    } else if !is_root {
        device(node, ctx, c)?;
    }

    // What the children inherit from this node.
    let address_cells = prop_u32(node, "#address-cells").unwrap_or(2);
    let size_cells = prop_u32(node, "#size-cells").unwrap_or(1);
    let interrupt_parent = prop_u32(node, "interrupt-parent").or(ctx.interrupt_parent);
    let mut path = ctx.path.clone();
    if !is_root {
        path.push('/');
        path.push_str(name);
    }
    let mut children = node.children().peekable();
    if children.peek().is_none() {
        return Ok(());
    }
    let translation = if is_root {
        Translation::Identity
    } else {
        child_translation(node, ctx, address_cells, size_cells)
    };
    let child_ctx = Ctx {
        address_cells,
        size_cells,
        translation,
        interrupt_parent,
        path,
    };
    for child in children {
        walk(child, &child_ctx, depth + 1, c)?;
    }
    Ok(())
}

fn chosen(node: Node<'_, '_>, p: &mut Platform) -> Result<(), PlatformError> {
    p.bootargs = prop_str(node, "bootargs").map(String::from);
    p.stdout_path = prop_str(node, "stdout-path").map(String::from);
    let addr = |name| -> Result<Option<u64>, PlatformError> {
        match prop(node, name) {
            None => Ok(None),
            Some(v) if v.len() == 4 || v.len() == 8 => Ok(read_cells(v, v.len() as u32 / 4)),
            Some(_) => Err(PlatformError::Malformed {
                node: "chosen",
                what: "initrd address not 1 or 2 cells",
            }),
        }
    };
    p.initrd = match (addr("linux,initrd-start")?, addr("linux,initrd-end")?) {
        (Some(start), Some(end)) if end >= start => Some(Region {
            base: start,
            size: end - start,
        }),
        (Some(_), Some(_)) => {
            return Err(PlatformError::Malformed {
                node: "chosen",
                what: "initrd ends before it starts",
            })
        }
        (None, None) => None,
        _ => {
            return Err(PlatformError::Malformed {
                node: "chosen",
                what: "only one of initrd-start/end",
            })
        }
    };
    Ok(())
}

fn cpus(node: Node<'_, '_>, p: &mut Platform) -> Result<(), PlatformError> {
    let address_cells = prop_u32(node, "#address-cells").unwrap_or(2);
    if !(1..=2).contains(&address_cells) {
        return Err(PlatformError::Malformed {
            node: "cpus",
            what: "#address-cells not 1 or 2",
        });
    }
    for cpu in node.children() {
        let is_cpu = prop_str(cpu, "device_type") == Some("cpu")
            || cpu.name.split('@').next() == Some("cpu");
        if !is_cpu || !enabled(cpu) {
            continue;
        }
        let reg = prop(cpu, "reg").ok_or(PlatformError::Malformed {
            node: "cpu",
            what: "no reg",
        })?;
        if reg.len() != address_cells as usize * 4 {
            return Err(PlatformError::Malformed {
                node: "cpu",
                what: "reg is not one MPIDR",
            });
        }
        let mpidr = read_cells(reg, address_cells).ok_or(PlatformError::Malformed {
            node: "cpu",
            what: "bad reg",
        })?;
        p.cpus.push(Cpu { mpidr });
    }
    Ok(())
}

fn pending<'a, T>(node: Node<'_, 'a>, ctx: &Ctx, device: T) -> Pending<'a, T> {
    let mut path = ctx.path.clone();
    path.push('/');
    path.push_str(node.name);
    Pending {
        device,
        interrupt_parent: prop_u32(node, "interrupt-parent").or(ctx.interrupt_parent),
        interrupts: prop(node, "interrupts"),
        path,
    }
}

fn device<'a>(node: Node<'_, 'a>, ctx: &Ctx, c: &mut Collected<'a>) -> Result<(), PlatformError> {
    if prop_str(node, "device_type") == Some("memory") {
        if let Some(regions) = regions(node, ctx, "memory")? {
            c.platform
                .ram
                .extend(regions.into_iter().filter(|r| r.size != 0));
        }
    } else if compatible_with(node, &["arm,pl011"]) {
        if let Some(region) = first_region(node, ctx, "pl011")? {
            c.uarts.push(pending(
                node,
                ctx,
                Pl011 {
                    region,
                    intid: None,
                },
            ));
        }
    } else if compatible_with(node, &["virtio,mmio"]) {
        if let Some(region) = first_region(node, ctx, "virtio-mmio")? {
            c.virtio.push(pending(
                node,
                ctx,
                VirtioMmio {
                    region,
                    intid: None,
                },
            ));
        }
    } else if compatible_with(node, &["qemu,fw-cfg-mmio"]) {
        if c.platform.fw_cfg.is_none() {
            c.platform.fw_cfg = first_region(node, ctx, "fw-cfg")?;
        }
    } else if compatible_with(node, TIMER) {
        if c.timer.is_none() {
            c.timer = Some(pending(node, ctx, ()));
        }
    } else if compatible_with(node, PSCI) {
        if c.platform.psci.is_none() {
            c.platform.psci = match prop_str(node, "method") {
                Some("smc") => Some(PsciConduit::Smc),
                Some("hvc") => Some(PsciConduit::Hvc),
                _ => {
                    return Err(PlatformError::Malformed {
                        node: "psci",
                        what: "method is not smc or hvc",
                    })
                }
            };
        }
    } else if c.gic.is_none() && (compatible_with(node, GIC_V3) || compatible_with(node, GIC_V2)) {
        let gic = gic(node, ctx)?;
        let phandle = prop_u32(node, "phandle").or_else(|| prop_u32(node, "linux,phandle"));
        let cells = prop_u32(node, "#interrupt-cells").unwrap_or(0);
        if let Some(gic) = gic {
            c.gic = Some((pending(node, ctx, gic), phandle, cells));
        }
    }
    Ok(())
}

fn gic(node: Node<'_, '_>, ctx: &Ctx) -> Result<Option<Gic>, PlatformError> {
    let malformed = |what| PlatformError::Malformed { node: "gic", what };
    let Some(regs) = regions(node, ctx, "gic")? else {
        return Ok(None);
    };
    let mut regs = regs.into_iter();
    let distributor = regs.next().ok_or(malformed("no distributor in reg"))?;
    if compatible_with(node, GIC_V3) {
        let count = prop_u32(node, "#redistributor-regions").unwrap_or(1) as usize;
        if count == 0 {
            return Err(malformed("#redistributor-regions is 0"));
        }
        let redistributors: Vec<Region> = regs.by_ref().take(count).collect();
        if redistributors.len() != count {
            return Err(malformed(
                "fewer redistributor regions than #redistributor-regions",
            ));
        }
        Ok(Some(Gic {
            version: GicVersion::V3,
            distributor,
            redistributors,
            cpu_interface: regs.next(),
            hyp_interface: regs.next(),
            vcpu_interface: regs.next(),
            maintenance_intid: None,
        }))
    } else {
        let cpu_interface = Some(regs.next().ok_or(malformed("no CPU interface in reg"))?);
        Ok(Some(Gic {
            version: GicVersion::V2,
            distributor,
            redistributors: Vec::new(),
            cpu_interface,
            hyp_interface: regs.next(),
            vcpu_interface: regs.next(),
            maintenance_intid: None,
        }))
    }
}
