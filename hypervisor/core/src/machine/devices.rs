//! A VM's device models, and how each one's state goes with the VM: copied (or shared, copy on
//! write) when the VM forks, kept in the fork's reset point and copied back by a reset, written
//! by a dump and checked when a restore reads it back. A new device (a virtio disk, a socket)
//! is a field of [`Devices`] whose state implements [`DeviceState`], and a window in
//! [`Devices::route`].

use super::HeapLow;
use crate::guest_dtb::layout;
use crate::shared::Shared;
use crate::vgic::Vgic;
use crate::vuart::Vuart;

/// How a device's state forks, resets and restores.
pub trait DeviceState: Sized {
    /// The state a fork starts with, and its reset point keeps (a reset puts a copy of the
    /// reset point's back): a copy, or a share of one that is copied on its first change.
    /// Fails, changing nothing, when the heap cannot take it.
    fn try_fork(&self) -> Result<Self, HeapLow>;

    /// Checks a state read from a dump before a VM of `vcpus` vCPUs gets it: a dump is hostile
    /// input, and a state that passes must never make the device misbehave.
    fn validate(&self, vcpus: usize) -> Result<(), &'static str>;
}

impl DeviceState for Shared<Vgic> {
    /// Shared with the parent until either changes it (`Vm::vgic_mut` makes the copy then).
    fn try_fork(&self) -> Result<Self, HeapLow> {
        Ok(self.clone())
    }

    fn validate(&self, vcpus: usize) -> Result<(), &'static str> {
        (**self)
            .validate()
            .map_err(|_| "the vGIC's state is inconsistent")?;
        if (**self).nr_vcpus() != vcpus {
            return Err("the vGIC is for another number of vCPUs");
        }
        Ok(())
    }
}

impl DeviceState for Vuart {
    /// A copy (a few hundred bytes, counted in the fork's heap cost).
    fn try_fork(&self) -> Result<Self, HeapLow> {
        Ok(self.clone())
    }

    fn validate(&self, _vcpus: usize) -> Result<(), &'static str> {
        Vuart::validate(self)
    }
}

/// The device models of one VM.
#[derive(Clone, Debug)]
pub struct Devices {
    /// Emulated GICv3 distributor and redistributors (shared with the reset point until
    /// changed).
    pub vgic: Shared<Vgic>,
    /// Emulated PL011.
    pub uart: Vuart,
}

/// Which device a guest-physical address falls in, and the offset into its window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Window {
    /// The GIC distributor.
    Gicd(u64),
    /// The GIC redistributors (one frame pair per vCPU).
    Gicr(u64),
    /// The PL011.
    Uart(u64),
}

impl Devices {
    /// A fresh set: a vGIC and an idle UART.
    pub fn new(vgic: Vgic, uart: Vuart) -> Self {
        Self {
            vgic: Shared::new(vgic),
            uart,
        }
    }

    /// What a fork of the VM starts with, and its reset point keeps.
    pub fn try_fork(&self) -> Result<Self, HeapLow> {
        Ok(Self {
            vgic: self.vgic.try_fork()?,
            uart: self.uart.try_fork()?,
        })
    }

    /// Checks every device's state read from a dump, for a VM of `vcpus` vCPUs.
    pub fn validate(&self, vcpus: usize) -> Result<(), &'static str> {
        self.vgic.validate(vcpus)?;
        DeviceState::validate(&self.uart, vcpus)
    }

    /// The device whose MMIO window holds `ipa` (a VM of `vcpus` vCPUs has as many
    /// redistributors), or `None`: no device there.
    pub fn route(ipa: u64, vcpus: usize) -> Option<Window> {
        let gicr_size = layout::gicr_size(u32::try_from(vcpus).unwrap_or(u32::MAX));
        if (layout::GICD_BASE..layout::GICD_BASE + layout::GICD_SIZE).contains(&ipa) {
            Some(Window::Gicd(ipa - layout::GICD_BASE))
        } else if (layout::GICR_BASE..layout::GICR_BASE + gicr_size).contains(&ipa) {
            Some(Window::Gicr(ipa - layout::GICR_BASE))
        } else if (layout::UART_BASE..layout::UART_BASE + layout::UART_SIZE).contains(&ipa) {
            Some(Window::Uart(ipa - layout::UART_BASE))
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vgic::VgicConfig;

    #[test]
    fn windows_and_their_offsets() {
        assert_eq!(
            Devices::route(layout::GICD_BASE + 0x104, 2),
            Some(Window::Gicd(0x104))
        );
        assert_eq!(Devices::route(layout::GICR_BASE, 1), Some(Window::Gicr(0)));
        // One vCPU has one redistributor: the next one's frames are nothing.
        let one = layout::gicr_size(1);
        assert_eq!(Devices::route(layout::GICR_BASE + one, 1), None);
        assert!(Devices::route(layout::GICR_BASE + one, 2).is_some());
        assert_eq!(
            Devices::route(layout::UART_BASE + 0x18, 1),
            Some(Window::Uart(0x18))
        );
        assert_eq!(Devices::route(layout::RAM_BASE, 1), None);
    }

    #[test]
    fn a_fork_shares_the_vgic_and_copies_the_uart() {
        let d = Devices::new(Vgic::new(&VgicConfig::qemu_virt(2)).unwrap(), Vuart::new());
        let f = d.try_fork().unwrap();
        assert!(f.vgic.is_shared() && d.vgic.is_shared());
        assert!(f.validate(2).is_ok());
        assert!(
            f.validate(3).is_err(),
            "a vGIC for 2 vCPUs is not one for 3"
        );
    }
}
