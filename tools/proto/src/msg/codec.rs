//! How the message types go on the wire: the [`Wire`] trait (one type's encoding, in the
//! `wire` primitives), its implementations for the field types, and the declarative macros the
//! message tables in `msg/mod.rs` are written in:
//!
//! - `wire_struct!`: a struct whose fields are encoded one after the other, in declaration order.
//! - `wire_enum!`: an enum encoded as a `u8` tag, then the chosen variant's fields in order.
//! - `messages!`: the `Request` and `Response` enums, each variant with its frame kind (the
//!   kind is the frame header's, not part of the payload), and the `kind` constants; generates
//!   `kind()`, `encode_payload()` and `decode()`.
//!
//! A field is encoded by its type's [`Wire`] implementation unless the table names another
//! codec with `field: Type as Codec` (e.g. [`Chunk`] for a byte string of at most `CHUNK_SIZE`).
//! Tuple variants name their one field (`VmList(list: Vec<VmInfo>)`) so the macros can bind it;
//! the name appears only in the table, the type stays a tuple variant.

use super::VmId;
use crate::wire::{DecodeError, Reader, Writer};
use crate::CHUNK_SIZE;
use alloc::string::String;
use alloc::vec::Vec;

/// One type's encoding: written with [`Writer`], read back with [`Reader`] (which never panics
/// and never allocates more than the payload holds).
pub(crate) trait Wire: Sized {
    /// Appends the encoding.
    fn put(&self, w: &mut Writer<'_>);
    /// Reads one value.
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError>;
}

/// A type that may be an element of a counted list (`count u32`, then the elements).
pub(crate) trait Elem: Wire {
    /// The fewest bytes one element takes: a count the rest of the payload cannot hold at this
    /// size is refused before anything is allocated.
    const MIN_SIZE: usize;
}

/// How one field of type `T` is encoded when it is not by `T`'s own [`Wire`].
pub(crate) trait Codec<T> {
    /// Appends the encoding of `v`.
    fn put(v: &T, w: &mut Writer<'_>);
    /// Reads one value.
    fn get(r: &mut Reader<'_>) -> Result<T, DecodeError>;
}

impl<T: Wire> Codec<T> for T {
    fn put(v: &T, w: &mut Writer<'_>) {
        v.put(w);
    }
    fn get(r: &mut Reader<'_>) -> Result<T, DecodeError> {
        T::get(r)
    }
}

/// A byte string of at most [`CHUNK_SIZE`] bytes: encoded like any byte string, refused with
/// `Limit` when a longer one is decoded.
pub(crate) struct Chunk;

impl Codec<Vec<u8>> for Chunk {
    fn put(v: &Vec<u8>, w: &mut Writer<'_>) {
        w.bytes(v);
    }
    fn get(r: &mut Reader<'_>) -> Result<Vec<u8>, DecodeError> {
        let b = r.bytes()?;
        if b.len() > CHUNK_SIZE {
            return Err(DecodeError::Limit("chunk larger than CHUNK_SIZE"));
        }
        Ok(b)
    }
}

pub(crate) fn bad_tag(what: &'static str, value: u8) -> DecodeError {
    DecodeError::BadTag {
        what,
        value: u32::from(value),
    }
}

/// Reads a `u32` count of items, each at least `min_size` bytes, refusing counts the remaining
/// payload cannot hold (so a lying count allocates nothing).
fn count(r: &mut Reader<'_>, min_size: usize) -> Result<usize, DecodeError> {
    let n = r.u32()? as usize;
    if n.saturating_mul(min_size) > r.remaining() {
        return Err(DecodeError::Truncated);
    }
    Ok(n)
}

fn len_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Wire for u16 {
    fn put(&self, w: &mut Writer<'_>) {
        w.u16(*self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.u16()
    }
}

impl Wire for u32 {
    fn put(&self, w: &mut Writer<'_>) {
        w.u32(*self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.u32()
    }
}

impl Wire for u64 {
    fn put(&self, w: &mut Writer<'_>) {
        w.u64(*self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.u64()
    }
}

/// A `u8`, 0 or 1.
impl Wire for bool {
    fn put(&self, w: &mut Writer<'_>) {
        w.bool(*self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.bool()
    }
}

/// `u32` length, UTF-8 bytes.
impl Wire for String {
    fn put(&self, w: &mut Writer<'_>) {
        w.str(self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.str()
    }
}

/// `u32` length, bytes (no limit but the payload's; see [`Chunk`] for the bounded kind).
impl Wire for Vec<u8> {
    fn put(&self, w: &mut Writer<'_>) {
        w.bytes(self);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        r.bytes()
    }
}

/// `u32` count, then the elements.
impl<T: Elem> Wire for Vec<T> {
    fn put(&self, w: &mut Writer<'_>) {
        w.u32(len_u32(self.len()));
        for x in self {
            x.put(w);
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let n = count(r, T::MIN_SIZE)?;
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            v.push(T::get(r)?);
        }
        Ok(v)
    }
}

/// A `u8` tag (0 = none, 1 = some), then the value.
impl<T: Wire> Wire for Option<T> {
    fn put(&self, w: &mut Writer<'_>) {
        match self {
            None => w.u8(0),
            Some(x) => {
                w.u8(1);
                x.put(w);
            }
        }
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        match r.u8()? {
            0 => Ok(None),
            1 => Ok(Some(T::get(r)?)),
            t => Err(bad_tag("option", t)),
        }
    }
}

/// A `u32`.
impl Wire for VmId {
    fn put(&self, w: &mut Writer<'_>) {
        w.u32(self.0);
    }
    fn get(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(VmId(r.u32()?))
    }
}

impl Elem for VmId {
    const MIN_SIZE: usize = 4;
}

/// The codec of a field: its type's own, or the one the table names.
macro_rules! codec {
    ($t:ty) => {
        $t
    };
    ($t:ty, $c:ty) => {
        $c
    };
}

/// A struct encoded as its fields in declaration order. Takes the struct's definition (with
/// its attributes and docs) and emits it with its `Wire` implementation.
macro_rules! wire_struct {
    (
        $(#[$m:meta])*
        pub struct $Name:ident {
            $( $(#[$fm:meta])* pub $f:ident : $ft:ty ),* $(,)?
        }
    ) => {
        $(#[$m])*
        pub struct $Name {
            $( $(#[$fm])* pub $f: $ft, )*
        }

        impl $crate::msg::codec::Wire for $Name {
            fn put(&self, w: &mut $crate::wire::Writer<'_>) {
                $( $crate::msg::codec::Wire::put(&self.$f, w); )*
            }
            fn get(
                r: &mut $crate::wire::Reader<'_>,
            ) -> ::core::result::Result<Self, $crate::wire::DecodeError> {
                Ok($Name {
                    $( $f: $crate::msg::codec::Wire::get(r)?, )*
                })
            }
        }
    };
}

/// An enum encoded as a `u8` tag (`= n` after each variant), then the variant's fields in
/// order. `what` names the tag in the `BadTag` error an unknown tag gives.
macro_rules! wire_enum {
    (
        $what:literal;
        $(#[$m:meta])*
        pub enum $Name:ident {
            $(
                $(#[$vm:meta])*
                $V:ident
                $( { $( $(#[$fm:meta])* $f:ident : $ft:ty $(as $fc:ty)? ),* $(,)? } )?
                $( ( $b:ident : $bt:ty $(as $bc:ty)? ) )?
                = $tag:literal
            ),* $(,)?
        }
    ) => {
        $(#[$m])*
        pub enum $Name {
            $(
                $(#[$vm])*
                $V
                $( { $( $(#[$fm])* $f: $ft, )* } )?
                $( ( $bt ) )?,
            )*
        }

        impl $crate::msg::codec::Wire for $Name {
            fn put(&self, w: &mut $crate::wire::Writer<'_>) {
                match self {
                    $(
                        Self::$V $( { $( $f ),* } )? $( ( $b ) )? => {
                            w.u8($tag);
                            $( $(
                                <codec!($ft $(, $fc)?) as $crate::msg::codec::Codec<$ft>>::put(
                                    $f, w,
                                );
                            )* )?
                            $(
                                <codec!($bt $(, $bc)?) as $crate::msg::codec::Codec<$bt>>::put(
                                    $b, w,
                                );
                            )?
                        }
                    )*
                }
            }
            fn get(
                r: &mut $crate::wire::Reader<'_>,
            ) -> ::core::result::Result<Self, $crate::wire::DecodeError> {
                Ok(match r.u8()? {
                    $(
                        $tag => Self::$V
                        $( { $(
                            $f: <codec!($ft $(, $fc)?) as $crate::msg::codec::Codec<$ft>>::get(r)?,
                        )* } )?
                        $( (
                            <codec!($bt $(, $bc)?) as $crate::msg::codec::Codec<$bt>>::get(r)?
                        ) )?,
                    )*
                    t => return Err($crate::msg::codec::bad_tag($what, t)),
                })
            }
        }
    };
}

/// The messages: each enum's variants with their frame kinds (`= NAME(0x...)`, optionally with
/// a note for the constant's doc), emitted as the enums, the `kind` module of constants and,
/// per enum, `kind()`, `encode_payload()` and `decode()`. The payload is the variant's fields
/// in order.
macro_rules! messages {
    (
        $(#[$km:meta])*
        pub mod kind;
        $(
            $(#[$m:meta])*
            pub enum $Name:ident {
                $(
                    $(#[$vm:meta])*
                    $V:ident
                    $( { $( $(#[$fm:meta])* $f:ident : $ft:ty $(as $fc:ty)? ),* $(,)? } )?
                    $( ( $b:ident : $bt:ty $(as $bc:ty)? ) )?
                    = $K:ident ( $kv:literal $(, $note:literal)? )
                ),* $(,)?
            }
        )*
    ) => {
        $(#[$km])*
        pub mod kind {
            $( $(
                #[doc = concat!(
                    "`", stringify!($Name), "::", stringify!($V), "`",
                    $(" (", $note, ")",)? "."
                )]
                pub const $K: u16 = $kv;
            )* )*
        }

        $(
            $(#[$m])*
            pub enum $Name {
                $(
                    $(#[$vm])*
                    $V
                    $( { $( $(#[$fm])* $f: $ft, )* } )?
                    $( ( $bt ) )?,
                )*
            }

            impl $Name {
                /// This message's frame kind.
                pub fn kind(&self) -> u16 {
                    match self {
                        $( Self::$V { .. } => kind::$K, )*
                    }
                }

                /// Appends the payload encoding to `out`.
                pub fn encode_payload(&self, out: &mut Vec<u8>) {
                    let mut writer = $crate::wire::Writer::new(out);
                    let w = &mut writer;
                    match self {
                        $(
                            Self::$V $( { $( $f ),* } )? $( ( $b ) )? => {
                                $( $(
                                    <codec!($ft $(, $fc)?) as $crate::msg::codec::Codec<$ft>>
                                        ::put($f, w);
                                )* )?
                                $(
                                    <codec!($bt $(, $bc)?) as $crate::msg::codec::Codec<$bt>>
                                        ::put($b, w);
                                )?
                            }
                        )*
                    }
                }

                /// Decodes a message from its kind and payload (the caller has checked the
                /// frame version).
                pub fn decode(
                    kind: u16,
                    payload: &[u8],
                ) -> ::core::result::Result<Self, $crate::wire::DecodeError> {
                    let mut reader = $crate::wire::Reader::new(payload);
                    let r = &mut reader;
                    let msg = match kind {
                        $(
                            kind::$K => Self::$V
                            $( { $(
                                $f: <codec!($ft $(, $fc)?) as $crate::msg::codec::Codec<$ft>>
                                    ::get(r)?,
                            )* } )?
                            $( (
                                <codec!($bt $(, $bc)?) as $crate::msg::codec::Codec<$bt>>
                                    ::get(r)?
                            ) )?,
                        )*
                        k => return Err($crate::wire::DecodeError::UnknownKind(k)),
                    };
                    reader.finish()?;
                    Ok(msg)
                }
            }
        )*
    };
}
