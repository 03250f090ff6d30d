//! QEMU integration-test harness.
//!
//! A test builds a [`QemuConfig`] (the vmfork monitor at EL2 with [`QemuConfig::monitor`], or any
//! EL1 kernel with [`QemuConfig::plain`]), starts it with [`Qemu::start`] and then reads the serial
//! console with [`Qemu::wait_for`] / [`Qemu::wait_for_regex`], writes to it with [`Qemu::send`] and
//! collects the exit code with [`Qemu::wait_exit`].
//!
//! The harness never runs cargo: the `Makefile` builds the bare-metal images first. A missing image
//! is a panic that names the path and says to run `make`.
//!
//! # Reading the serial output
//! The serial port (QEMU's stdout) is read by a background thread into a growing log. Each [`Qemu`]
//! keeps a *cursor* into that log:
//! - [`Qemu::wait_for`] and [`Qemu::wait_for_regex`] look only at output after the cursor, one line
//!   at a time, and move the cursor past the line they matched; successive waits therefore see
//!   successive output, and waiting for `A` then `B` checks that `B` comes after `A`.
//! - [`Qemu::count`], [`Qemu::expect_no`] and [`Qemu::serial`] look at the whole log so far.
//!
//! A line is complete when it ends in `\n`, when QEMU has exited, or when no output has arrived
//! for two seconds (a prompt without a newline). A match in an incomplete line waits for the line
//! to complete, so the returned line is whole and a regex never matches half a number. Trailing
//! `\r` is removed from returned lines.
//!
//! # Failures
//! Every wait has a deadline. On a timeout, or when QEMU exits before the pattern appears, the
//! wait panics; while the test unwinds, dropping the [`Qemu`] kills QEMU's whole process group and
//! prints a banner with the test name, the QEMU command line, the exit status, the temp dir (kept
//! for inspection, with `serial.log`, `stderr.log` and `command.txt` in it) and the full serial
//! log and QEMU's stderr.
//!
//! # Environment
//! - `VMFORK_MONITOR_IMAGE`: the monitor image (default
//!   `target/aarch64-unknown-none/release/vmfork-monitor`).
//! - `VMFORK_GUEST_DIR`: the directory of guest images (default
//!   `target/aarch64-unknown-none/release`).
//! - `CARGO_TARGET_DIR`: honoured when looking for the default image directory.
//! - `VMFORK_QEMU`: the QEMU binary (default `qemu-system-aarch64`).
//! - `VMFORK_TEST_TIMEOUT_SCALE`: multiplies every timeout (e.g. `3` on a very slow machine).
//! - `VMFORK_TEST_HARD_CAP_SECS`: a watchdog kills any QEMU that lives longer (default 1800).
//! - `VMFORK_TEST_ECHO=1`: also copy the serial output to stderr as it arrives (use with
//!   `--nocapture` to watch a test live).
//!
//! # Modules
//! - `config`: [`QemuConfig`], how QEMU is started (its command line, guests, control channel).
//! - `qemu`: [`Qemu`], a running QEMU: starting, the serial console, exit, the failure banner.
//! - `lines`: helpers over a whole serial log ([`complete_lines`], [`vm_lines`], ...).
//! - `control`: the monitor's control socket ([`ControlSocket`]) and running the `vmfork` tool.
//! - `images`: where the monitor, guest and tool images are.
//! - `timing`: the default timeout and the timeout overrides from the environment.

pub mod linux;
pub mod mux;
pub mod proto_client;

mod config;
mod control;
mod images;
mod lines;
mod qemu;
mod timing;

pub use config::QemuConfig;
pub use control::{vmfork_ok, vmfork_run, ControlSocket};
pub use images::{guest_image, monitor_image, vmfork_tool, workspace_root};
pub use lines::{complete_lines, plain_lines, vm_lines, wait_count};
pub use mux::MuxProcess;
pub use qemu::Qemu;
pub use timing::DEFAULT_TIMEOUT;
