//! The `vmfork` host tool as a library: a [`client::Client`] that speaks the control protocol to
//! a monitor over its Unix socket, console streaming, output formatting, and [`fake`], an
//! in-process reference monitor that the tests (and the monitor's authors) use as the executable
//! specification of the server side, and [`mux`], which shares the monitor's single control
//! connection among many clients.

pub mod client;
pub mod console;
pub mod errors;
pub mod fake;
pub mod format;
pub mod mux;
pub mod savefile;
pub mod socket;

pub use client::{Client, ClientError, ClientOptions};
