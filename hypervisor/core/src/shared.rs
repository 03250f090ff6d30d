//! [`Shared`]: copy-on-write sharing of a value between VMs (a fork and its fork point share the
//! parent's device state until one of them changes it), so a fork copies a pointer instead of a
//! device model.
//!
//! The copy a first write makes is an allocation a guest drives (fork, then touch the device), so
//! it is fallible: [`Shared::try_make_mut`] copies with [`TryClone`] and reports running out of
//! memory instead of aborting, and there is no `DerefMut` that could copy behind the caller's
//! back. Only the reference-count header of the new copy (a few words) is allocated infallibly;
//! the monitor keeps a heap margin for such small allocations.

use alloc::collections::TryReserveError;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ops::Deref;

/// A clone that reports running out of memory instead of aborting.
pub trait TryClone: Sized {
    /// A copy of `self`, or the allocation failure.
    fn try_clone(&self) -> Result<Self, TryReserveError>;
}

impl<T: Clone> TryClone for Vec<T> {
    fn try_clone(&self) -> Result<Self, TryReserveError> {
        let mut v = Vec::new();
        v.try_reserve_exact(self.len())?;
        v.extend_from_slice(self);
        Ok(v)
    }
}

/// A value that clones share until one of them is changed. Reading goes through [`Deref`];
/// writing through [`Shared::try_make_mut`], which copies a shared value first.
#[derive(Debug, Default)]
pub struct Shared<T: Clone>(Arc<T>);

impl<T: Clone> Shared<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Self(Arc::new(value))
    }

    /// True when another `Shared` holds the same value (no copy has been made yet).
    pub fn is_shared(&self) -> bool {
        Arc::strong_count(&self.0) > 1
    }

    /// A copy of the value (fallibly), for a new, unshared `Shared`.
    pub fn try_clone_value(&self) -> Result<T, TryReserveError>
    where
        T: TryClone,
    {
        (*self.0).try_clone()
    }

    /// The value, to change: copied first (fallibly) if another `Shared` holds it too. On an
    /// error nothing changed and the value is still shared.
    pub fn try_make_mut(&mut self) -> Result<&mut T, TryReserveError>
    where
        T: TryClone,
    {
        if Arc::get_mut(&mut self.0).is_none() {
            let copy = (*self.0).try_clone()?;
            self.0 = Arc::new(copy);
        }
        // The Arc is unique now (no `Weak` is ever made), so this never clones.
        Ok(Arc::make_mut(&mut self.0))
    }
}

impl<T: Clone> Clone for Shared<T> {
    /// Shares the value: constant time, no copy.
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T: Clone> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_until_written() {
        let mut a = Shared::new(alloc::vec![1, 2, 3]);
        let b = a.clone();
        assert!(a.is_shared() && b.is_shared());
        assert!(core::ptr::eq(&*a, &*b));
        a.try_make_mut().unwrap().push(4);
        assert!(!a.is_shared() && !b.is_shared());
        assert_eq!(*a, [1, 2, 3, 4]);
        assert_eq!(*b, [1, 2, 3]);
        let mut c = b.clone();
        c.try_make_mut().unwrap()[0] = 9;
        assert_eq!(*b, [1, 2, 3]);
        assert_eq!(*c, [9, 2, 3]);
    }

    /// A value whose copy always runs out of memory.
    #[derive(Clone, Debug, PartialEq)]
    struct Huge(u8);

    impl TryClone for Huge {
        fn try_clone(&self) -> Result<Self, TryReserveError> {
            let mut v: Vec<u8> = Vec::new();
            v.try_reserve_exact(usize::MAX)?;
            Ok(Huge(self.0))
        }
    }

    #[test]
    fn a_failed_copy_changes_nothing() {
        let mut a = Shared::new(Huge(1));
        let b = a.clone();
        assert!(a.try_make_mut().is_err(), "the copy must fail, not abort");
        assert!(a.is_shared() && core::ptr::eq(&*a, &*b));
        assert_eq!(*a, Huge(1));
        drop(b);
        // Unique now: written in place, no copy needed.
        a.try_make_mut().unwrap().0 = 2;
        assert_eq!(*a, Huge(2));
    }
}
