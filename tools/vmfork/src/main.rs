//! `vmfork`: drive a running vmfork monitor from the host.
//!
//! The control channel does not exist yet, so the tool has no commands beyond `--help` and
//! `--version`; they arrive with the control-channel work.
use clap::Parser;

/// Drive a running vmfork monitor: list, fork, pause, reset, kill and inspect its VMs.
#[derive(Parser, Debug)]
#[command(name = "vmfork", version, about, long_about = None)]
struct Cli {
    /// Path of the monitor's control socket.
    #[arg(long, env = "VMFORK_SOCKET", default_value = "run/vmfork.sock")]
    socket: std::path::PathBuf,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::bail!(
        "no commands yet: the control channel to the monitor at {} is not built (protocol v{})",
        cli.socket.display(),
        vmfork_proto::PROTOCOL_VERSION
    )
}
