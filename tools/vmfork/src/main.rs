//! `vmfork`: drive a running vmfork monitor from the host.
use std::fs;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::json;
use vmfork::client::{Client, ClientError};
use vmfork::console::{self, ConsoleOptions, RawMode, DETACH_KEY};
use vmfork::format::{self, Progress};
use vmfork::mux::{Mux, MuxEnd, MuxOptions};
use vmfork::savefile::{SaveError, SaveFile};
use vmfork_proto::snapshot::Snapshot;
use vmfork_proto::{Request, VmId};

/// Drive a running vmfork monitor: list, fork, pause, reset, kill, snapshot and inspect its VMs.
///
/// The monitor listens on a Unix socket that `make qemu-virt` creates (run/vmfork.sock in the
/// checkout by default).
#[derive(Parser, Debug)]
#[command(name = "vmfork", version, about, long_about)]
struct Cli {
    /// Path of the monitor's control socket [default: run/vmfork.sock].
    #[arg(long, global = true, env = "VMFORK_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every VM: id, parent, state, vCPUs, memory, private/shared pages, COW faults.
    List,
    /// Show everything the monitor accounts for one VM.
    Info {
        /// The VM's id.
        vm: u32,
    },
    /// Show the monitor's global accounting (frames, VMs), and one VM's when given.
    Stats {
        /// A VM's id.
        vm: Option<u32>,
    },
    /// Fork a VM by copy-on-write; prints the new ids, one per line.
    Fork {
        /// The parent VM.
        vm: u32,
        /// How many children.
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u32,
        /// Leave the children paused (resume them with `vmfork resume`).
        #[arg(long)]
        paused: bool,
    },
    /// Stop a VM's vCPUs.
    Pause {
        /// The VM's id.
        vm: u32,
    },
    /// Let a paused VM run again.
    Resume {
        /// The VM's id.
        vm: u32,
    },
    /// Put a fork back to its fork point (a booted VM back to its boot state).
    Reset {
        /// The VM's id.
        vm: u32,
    },
    /// Destroy a VM (its forks live on).
    Kill {
        /// The VM's id.
        vm: u32,
    },
    /// Boot a new guest on the running monitor; the images travel over the channel. Prints the id.
    Create {
        /// Kernel image (arm64 Image or ELF).
        #[arg(long, value_name = "FILE")]
        kernel: PathBuf,
        /// Initial ramdisk.
        #[arg(long, value_name = "FILE")]
        initrd: Option<PathBuf>,
        /// Guest RAM, e.g. 128M or 1G.
        #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = format::parse_size)]
        mem: u64,
        /// Number of vCPUs.
        #[arg(long, value_name = "N", default_value_t = 1)]
        cpus: u32,
        /// Kernel command line.
        #[arg(long, value_name = "STR", default_value = "")]
        cmdline: String,
    },
    /// Attach to a VM's console: its output streams to stdout, stdin goes to the guest.
    ///
    /// On a terminal the console is raw: every key goes to the guest, and Ctrl-] detaches.
    /// With piped stdin every byte is sent as is; at the end of input vmfork keeps printing
    /// output for --linger milliseconds, then detaches.
    ///
    /// When the VM goes while attached (it powered off, was killed, crashed), everything it
    /// printed is shown first, then "vmN <why>" on stderr, and vmfork exits with status 3.
    Console {
        /// The VM's id.
        vm: u32,
        /// Milliseconds to keep printing output after stdin ends.
        #[arg(long, value_name = "MS", default_value_t = 300)]
        linger: u64,
    },
    /// Write a self-describing snapshot of a VM (vCPU and device state, all memory) to FILE.
    ///
    /// The snapshot goes to a temporary file beside FILE, which is synced and then renamed to
    /// FILE: FILE is either the old one or the whole new one, never half. An existing FILE is
    /// refused unless --force is given.
    ///
    /// BGSAVE recipe: `vmfork fork VM --paused` prints a child id C; `vmfork dump C FILE`
    /// snapshots the frozen child while VM keeps running; then `vmfork kill C`.
    Dump {
        /// The VM's id.
        vm: u32,
        /// Output file.
        file: PathBuf,
        /// Replace FILE if it exists (only once the new snapshot is complete).
        #[arg(long)]
        force: bool,
    },
    /// Start a running VM from a snapshot written by `vmfork dump`. Prints the new id.
    Restore {
        /// Snapshot file.
        file: PathBuf,
    },
    /// Which guest pages differ between two VMs, with counts and IPA ranges.
    Diff {
        /// First VM.
        vm1: u32,
        /// Second VM.
        vm2: u32,
    },
    /// Share the monitor's one control socket among many vmfork processes.
    ///
    /// QEMU's socket serves one client at a time. The mux holds that connection and serves any
    /// number of clients on --listen; point them at it with --socket or VMFORK_SOCKET. It exits
    /// when QEMU does.
    Mux {
        /// QEMU's control socket (the monitor's), e.g. run/vmfork.sock.
        #[arg(long, value_name = "PATH")]
        upstream: PathBuf,
        /// The socket to serve clients on.
        #[arg(long, value_name = "PATH")]
        listen: PathBuf,
        /// Seconds to keep trying while the upstream socket does not exist yet.
        #[arg(long, value_name = "SECS", default_value_t = 30)]
        wait: u64,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Exit status of `vmfork console` when the VM went while attached.
const EXIT_VM_GONE: i32 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmfork: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One-line errors: the client's own messages, or I/O on local files with the file named.
#[derive(Debug)]
enum CliError {
    Client(ClientError),
    Msg(String),
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Client(e) => write!(f, "{e}"),
            CliError::Msg(m) => write!(f, "{m}"),
        }
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        CliError::Client(e)
    }
}

fn read_file(p: &PathBuf) -> Result<Vec<u8>, CliError> {
    fs::read(p).map_err(|e| CliError::Msg(format!("cannot read {}: {e}", p.display())))
}

fn print_json(v: &impl serde::Serialize) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CliError::Msg(e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn progress_bar(label: &str) -> Option<Progress> {
    io::stderr().is_terminal().then(|| Progress::new(label))
}

fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "vmfork", &mut io::stdout());
        return Ok(());
    }
    if let Command::Mux {
        upstream,
        listen,
        wait,
    } = &cli.command
    {
        return run_mux(upstream, listen, *wait);
    }
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| PathBuf::from("run/vmfork.sock"));
    let mut c = Client::connect(&socket)?;
    let json = cli.json;
    match cli.command {
        Command::Completions { .. } | Command::Mux { .. } => {}
        Command::List => {
            let vms = c.list()?;
            if json {
                print_json(&vms)?;
            } else {
                print!("{}", format::vm_table(&vms));
            }
        }
        Command::Info { vm } => {
            let info = c.info(VmId(vm))?;
            if json {
                print_json(&info)?;
            } else {
                print!("{}", format::vm_details(&info));
            }
        }
        Command::Stats { vm } => {
            let (global, info) = c.stats(vm.map(VmId))?;
            if json {
                print_json(&json!({ "global": global, "vm": info }))?;
            } else {
                print!("{}", format::global_stats(&global));
                if let Some(i) = info {
                    println!();
                    print!("{}", format::vm_details(&i));
                }
            }
        }
        Command::Fork { vm, count, paused } => {
            let children = c.fork(VmId(vm), count, paused)?;
            if json {
                print_json(&json!({ "parent": vm, "children": children }))?;
            } else {
                for ch in children {
                    println!("{ch}");
                }
            }
        }
        Command::Pause { vm } => simple(&mut c, Request::Pause { vm: VmId(vm) }, json)?,
        Command::Resume { vm } => simple(&mut c, Request::Resume { vm: VmId(vm) }, json)?,
        Command::Reset { vm } => simple(&mut c, Request::Reset { vm: VmId(vm) }, json)?,
        Command::Kill { vm } => simple(&mut c, Request::Kill { vm: VmId(vm) }, json)?,
        Command::Create {
            kernel,
            initrd,
            mem,
            cpus,
            cmdline,
        } => {
            let k = read_file(&kernel)?;
            let i = initrd.as_ref().map(read_file).transpose()?;
            let mut bar = progress_bar("upload");
            let vm = c.create(&k, i.as_deref(), mem, cpus, &cmdline, &mut |d, t| {
                if let Some(b) = bar.as_mut() {
                    b.update(d, t)
                }
            });
            if let Some(b) = bar.as_mut() {
                b.finish()
            }
            let vm = vm?;
            if json {
                print_json(&json!({ "vm": vm }))?;
            } else {
                println!("{vm}");
            }
        }
        Command::Console { vm, linger } => {
            let stdin = io::stdin();
            let tty = stdin.is_terminal();
            let _raw = if tty {
                Some(RawMode::enter(&stdin).map_err(|e| {
                    CliError::Msg(format!("cannot put the terminal in raw mode: {e}"))
                })?)
            } else {
                None
            };
            if tty {
                eprint!("attached to vm {vm}; Ctrl-] detaches\r\n");
            }
            let opts = ConsoleOptions {
                detach_key: tty.then_some(DETACH_KEY),
                linger: Duration::from_millis(linger),
            };
            let mut out = io::stdout();
            let end = console::run(c, VmId(vm), Box::new(io::stdin()), &mut out, &opts);
            let _ = out.flush();
            drop(_raw);
            if let Ok(console::ConsoleEnd::VmGone(reason)) = &end {
                // Everything the guest printed has been written; say why it ended, and exit
                // with the status that means it (see `vmfork console --help`).
                eprintln!("{}vm{vm} {reason}", if tty { "\r\n" } else { "" });
                std::process::exit(EXIT_VM_GONE);
            }
            if tty {
                eprintln!("\r\ndetached from vm {vm}");
            }
            end?;
        }
        Command::Dump { vm, file, force } => {
            let save_err = |e: SaveError| CliError::Msg(format!("{e}"));
            // Only the temporary file is written; it goes away by itself on any error.
            let mut out = SaveFile::create(&file, force).map_err(save_err)?;
            let mut bar = progress_bar(&format!("dump vm {vm}"));
            let r = {
                let mut w = io::BufWriter::new(&mut out);
                let r = c.dump(VmId(vm), &mut w, &mut |d, t| {
                    if let Some(b) = bar.as_mut() {
                        b.update(d, t)
                    }
                });
                r.map_err(CliError::from).and_then(|t| {
                    w.flush()
                        .map(|()| t)
                        .map_err(|e| CliError::Msg(format!("cannot write {}: {e}", file.display())))
                })
            };
            if let Some(b) = bar.as_mut() {
                b.finish()
            }
            let total = r?;
            out.commit().map_err(save_err)?;
            if json {
                print_json(&json!({ "vm": vm, "file": file, "bytes": total }))?;
            } else {
                println!(
                    "vm {vm}: {} written to {}",
                    format::bytes(total),
                    file.display()
                );
            }
        }
        Command::Restore { file } => {
            let bytes = read_file(&file)?;
            // Check it here, to say clearly what is wrong with the file.
            Snapshot::visit(&bytes, |_, _| {}).map_err(|e| {
                CliError::Msg(format!(
                    "{} is not a valid vmfork snapshot: {e}",
                    file.display()
                ))
            })?;
            let mut bar = progress_bar("restore");
            let vm = c.restore(&bytes, &mut |d, t| {
                if let Some(b) = bar.as_mut() {
                    b.update(d, t)
                }
            });
            if let Some(b) = bar.as_mut() {
                b.finish()
            }
            let vm = vm?;
            if json {
                print_json(&json!({ "vm": vm }))?;
            } else {
                println!("{vm}");
            }
        }
        Command::Diff { vm1, vm2 } => {
            let d = c.diff(VmId(vm1), VmId(vm2))?;
            if json {
                print_json(&d)?;
            } else {
                print!("{}", format::diff(&d));
            }
        }
    }
    Ok(())
}

fn simple(c: &mut Client, req: Request, json: bool) -> Result<(), CliError> {
    c.simple(&req)?;
    if json {
        print_json(&json!({ "ok": true }))?;
    }
    Ok(())
}

fn run_mux(upstream: &Path, listen: &Path, wait: u64) -> Result<(), CliError> {
    let mut opts = MuxOptions::new(upstream, listen);
    opts.connect_wait = Duration::from_secs(wait);
    let mux = Mux::start(&opts).map_err(|e| CliError::Msg(e.to_string()))?;
    eprintln!(
        "vmfork mux: serving {} for {} at {}",
        listen.display(),
        mux.monitor(),
        upstream.display()
    );
    match mux.wait() {
        MuxEnd::Stopped => Ok(()),
        MuxEnd::UpstreamClosed => Err(CliError::Msg(format!(
            "mux: the monitor at {} closed the connection (did QEMU exit?)",
            upstream.display()
        ))),
    }
}
