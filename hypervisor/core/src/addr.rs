//! Address newtypes. Addresses of different spaces never mix by accident: a guest's intermediate
//! physical address ([`Ipa`]) and a real physical address ([`PhysAddr`]) are different types.

use core::fmt;

/// Size of a translation granule and of a frame: 4 KiB.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

macro_rules! address_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
        #[repr(transparent)]
        pub struct $name(pub u64);

        impl $name {
            /// The address rounded down to its 4 KiB page.
            pub const fn page_base(self) -> Self {
                Self(self.0 & !(PAGE_SIZE - 1))
            }
            /// Offset inside its 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & (PAGE_SIZE - 1)
            }
            /// True when the address is 4 KiB aligned.
            pub const fn is_page_aligned(self) -> bool {
                self.page_offset() == 0
            }
            /// The address `bytes` further on, or `None` on overflow.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

address_type!(
    /// A real physical address (the output of stage-2 translation).
    PhysAddr
);
address_type!(
    /// A guest intermediate physical address (the input of stage-2 translation).
    Ipa
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_helpers() {
        let a = PhysAddr(0x4000_1234);
        assert_eq!(a.page_base(), PhysAddr(0x4000_1000));
        assert_eq!(a.page_offset(), 0x234);
        assert!(!a.is_page_aligned());
        assert!(a.page_base().is_page_aligned());
        assert_eq!(Ipa(u64::MAX).checked_add(1), None);
        assert_eq!(format!("{:?}", Ipa(0x10)), "Ipa(0x10)");
    }
}
