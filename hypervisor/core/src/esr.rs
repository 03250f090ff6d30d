//! TEMPORARY placeholder until the esr branch lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExceptionClass { Unknown, Other(u8) }
impl ExceptionClass { pub fn name(&self) -> &'static str { match self { Self::Unknown => "unknown", Self::Other(_) => "other" } } }
#[derive(Clone, Copy, Debug)]
pub struct Esr(pub u64);
impl Esr { pub fn ec(&self) -> ExceptionClass { match (self.0 >> 26) & 0x3f { 0 => ExceptionClass::Unknown, n => ExceptionClass::Other(n as u8) } } }
