//! Bounded deserialisation: a `Vec` field read from untrusted bytes (a snapshot) that refuses
//! more than `N` elements as it reads them, so a lying length prefix or a long run of elements
//! fails with an error instead of growing the heap. Use as
//! `#[serde(deserialize_with = "crate::bounded::vec::<_, _, N>")]`.

use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, Error, SeqAccess, Visitor};

struct BoundedVec<T, const N: usize>(PhantomData<T>);

impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for BoundedVec<T, N> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a sequence of at most {N} elements")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        if seq.size_hint().is_some_and(|n| n > N) {
            return Err(A::Error::invalid_length(
                seq.size_hint().unwrap_or(0),
                &self,
            ));
        }
        let mut out = Vec::new();
        out.try_reserve_exact(seq.size_hint().unwrap_or(0).min(N))
            .map_err(|_| A::Error::custom("out of memory"))?;
        while let Some(v) = seq.next_element()? {
            if out.len() == N {
                return Err(A::Error::invalid_length(N + 1, &self));
            }
            out.try_reserve(1)
                .map_err(|_| A::Error::custom("out of memory"))?;
            out.push(v);
        }
        Ok(out)
    }
}

/// Deserialises a `Vec<T>` of at most `N` elements.
pub fn vec<'de, D: Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
    d: D,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(BoundedVec::<T, N>(PhantomData))
}

/// Deserialises a `VecDeque<T>` of at most `N` elements.
pub fn vec_deque<'de, D: Deserializer<'de>, T: Deserialize<'de>, const N: usize>(
    d: D,
) -> Result<alloc::collections::VecDeque<T>, D::Error> {
    vec::<D, T, N>(d).map(Into::into)
}
