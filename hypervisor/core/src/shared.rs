//! [`Shared`]: copy-on-write sharing of a value between VMs (a fork and its fork point share the
//! parent's device state until one of them changes it), so a fork copies a pointer instead of a
//! device model.
//!
//! The copy a first write makes is an allocation a guest drives (fork, then touch the device), so
//! it is fallible: [`Shared::try_make_mut`] copies with [`TryClone`] and reports running out of
//! memory instead of aborting, and there is no `DerefMut` that could copy behind the caller's
//! back. Only the reference-count header of the new copy (a few words) is allocated infallibly;
//! the monitor keeps a heap margin for such small allocations.
//!
//! Each `Shared` carries a [version](Shared::version): a number no other `Shared` ever had or
//! will have, renewed whenever the value may change (every [`Shared::try_make_mut`]). Equal
//! versions mean an unchanged value, so a caller can keep something it computed from the value
//! (the scheduler keeps "this vCPU has no interrupt pending") and skip the work while the version
//! stays the same.

use alloc::collections::TryReserveError;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ops::Deref;
use core::sync::atomic::{AtomicU64, Ordering};

/// The next version to hand out. Starts at 1, so 0 is never a version (a cache can use it for
/// "nothing known"). 2^64 versions cannot run out.
static NEXT_VERSION: AtomicU64 = AtomicU64::new(1);

fn new_version() -> u64 {
    // Only uniqueness matters, not an order with other memory accesses.
    NEXT_VERSION.fetch_add(1, Ordering::Relaxed)
}

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
#[derive(Debug)]
pub struct Shared<T: Clone> {
    value: Arc<T>,
    version: u64,
}

impl<T: Clone> Shared<T> {
    /// Wraps `value`.
    pub fn new(value: T) -> Self {
        Self {
            value: Arc::new(value),
            version: new_version(),
        }
    }

    /// True when another `Shared` holds the same value (no copy has been made yet).
    pub fn is_shared(&self) -> bool {
        Arc::strong_count(&self.value) > 1
    }

    /// This `Shared`'s version (see the module docs): never 0, unique to it, renewed by every
    /// [`Shared::try_make_mut`] that succeeds.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// A copy of the value (fallibly), for a new, unshared `Shared`.
    pub fn try_clone_value(&self) -> Result<T, TryReserveError>
    where
        T: TryClone,
    {
        (*self.value).try_clone()
    }

    /// The value, to change: copied first (fallibly) if another `Shared` holds it too. On an
    /// error nothing changed and the value is still shared.
    pub fn try_make_mut(&mut self) -> Result<&mut T, TryReserveError>
    where
        T: TryClone,
    {
        if Arc::get_mut(&mut self.value).is_none() {
            let copy = (*self.value).try_clone()?;
            self.value = Arc::new(copy);
        }
        // The caller may change the value through what is returned.
        self.version = new_version();
        // The Arc is unique now (no `Weak` is ever made), so this never clones.
        Ok(Arc::make_mut(&mut self.value))
    }
}

impl<T: Clone> Clone for Shared<T> {
    /// Shares the value: constant time, no copy.
    fn clone(&self) -> Self {
        Self {
            value: Arc::clone(&self.value),
            version: new_version(),
        }
    }
}

impl<T: Clone + Default> Default for Shared<T> {
    fn default() -> Self {
        Self::new(T::default())
    }
}

impl<T: Clone> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
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

    #[test]
    fn versions_change_with_every_chance_of_a_write_and_only_then() {
        let mut a = Shared::new(alloc::vec![1]);
        let v0 = a.version();
        assert_ne!(v0, 0);
        assert_eq!(a.version(), v0, "reading keeps the version");
        let _ = a.len();
        assert_eq!(a.version(), v0);
        let b = a.clone();
        assert_ne!(b.version(), v0, "a clone is another Shared");
        a.try_make_mut().unwrap();
        let v1 = a.version();
        assert_ne!(v1, v0, "a write may have happened");
        assert_ne!(v1, b.version());
        let c = Shared::new(alloc::vec![1]);
        assert!(
            ![v0, v1, b.version()].contains(&c.version()),
            "never reused"
        );
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
