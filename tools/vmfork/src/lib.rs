//! The `vmfork` host tool as a library: a [`client::Client`] that speaks the control protocol to
//! a monitor over its Unix socket, console streaming, output formatting, and [`mux`], which shares the
//! monitor's single control connection among many clients. With the `fake` feature (off by
//! default; the tests turn it on), `fake`: the monitor's own control server
//! (`vmfork_core::machine::server`) over its machine model on fake memory, on a Unix socket, with
//! a small fake guest, for the tests to run the tool against.

pub mod client;
pub mod complete;
pub mod console;
pub mod errors;
#[cfg(feature = "fake")]
pub mod fake;
pub mod format;
pub mod mux;
pub mod savefile;
pub mod socket;
pub mod vmref;
pub mod watch;

pub use client::{Client, ClientError, ClientOptions};
