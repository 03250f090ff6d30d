//! [`Shared`]: copy-on-write sharing of a value between VMs (a fork and its fork point share the
//! parent's device state until one of them changes it), so a fork copies a pointer instead of a
//! device model.

use alloc::sync::Arc;
use core::ops::{Deref, DerefMut};

/// A value that clones share until one of them is changed. Reading goes through [`Deref`];
/// the first [`DerefMut`] of a shared value copies it (`Arc::make_mut`).
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

impl<T: Clone> DerefMut for Shared<T> {
    /// Copies the value first if it is shared.
    fn deref_mut(&mut self) -> &mut T {
        Arc::make_mut(&mut self.0)
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
        a.push(4);
        assert!(!a.is_shared() && !b.is_shared());
        assert_eq!(*a, [1, 2, 3, 4]);
        assert_eq!(*b, [1, 2, 3]);
        let mut c = b.clone();
        c[0] = 9;
        assert_eq!(*b, [1, 2, 3]);
        assert_eq!(*c, [9, 2, 3]);
    }
}
