//! `vmfork`: drive a running vmfork monitor from the host.
use std::fs;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, Subcommand};
use serde_json::json;
use vmfork::client::{Client, ClientError, StartFlags};
use vmfork::complete;
use vmfork::console::{self, ConsoleOptions, RawMode, DETACH_KEY};
use vmfork::errors::{CliError, ErrorKind, MemoryFigures};
use vmfork::format::{self, Progress};
use vmfork::mux::{Mux, MuxEnd, MuxLog, MuxOptions};
use vmfork::savefile::{SaveError, SaveFile};
use vmfork::socket::{self, Found};
use vmfork::vmref::VmRef;
use vmfork::watch::{self, Target};
use vmfork_core::guest_spec;
use vmfork_proto::snapshot::Snapshot;
use vmfork_proto::{ErrorReply, GlobalStats, Request, VmId};

/// Drive a running vmfork monitor: list, fork, pause, reset, kill, snapshot and inspect its VMs.
///
/// The monitor listens on a Unix socket that `make qemu-virt` creates. Without --socket, vmfork
/// uses $VMFORK_SOCKET; else run/vmfork.sock in the current directory or the nearest parent
/// that has one (a checkout running `make qemu-virt`); else the per-user socket
/// $XDG_RUNTIME_DIR/vmfork/vmfork.sock (/tmp/vmfork-$UID/vmfork.sock without XDG_RUNTIME_DIR),
/// which `make qemu-virt` links to its socket while no other monitor holds it.
#[derive(Parser, Debug)]
#[command(name = "vmfork", version, about, long_about, after_help = ErrorKind::help_table())]
struct Cli {
    /// Path of the monitor's control socket [default: $VMFORK_SOCKET, else the checkout's
    /// run/vmfork.sock, else the per-user socket].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Print machine-readable JSON instead of text, errors included (on stdout).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List every VM: id, parent, state, vCPUs, memory, private/shared pages, COW faults,
    /// uptime and vCPU time.
    ///
    /// A VM that stopped (powered off, crashed, killed, reset by its guest) stays listed, with
    /// why, until `vmfork rm` removes it (or it was made with --rm). It holds no memory.
    List,
    /// Show everything the monitor accounts for one VM.
    Info {
        /// The VM: its id (3 or vm3) or its name.
        vm: VmRef,
    },
    /// Show the monitor's global accounting (frames, VMs), and one VM's when given.
    Stats {
        /// A VM: its id (3 or vm3) or its name.
        vm: Option<VmRef>,
    },
    /// Fork a VM by copy-on-write; prints the new ids, one per line.
    Fork {
        /// The parent VM: its id (3 or vm3) or its name.
        vm: VmRef,
        /// How many children.
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u32,
        /// Leave the children paused (resume them with `vmfork resume`).
        #[arg(long)]
        paused: bool,
        /// Keep no record of the children once they stop (they leave `list` at once).
        #[arg(long)]
        rm: bool,
        /// Name the child NAME (several: NAME.1, NAME.2, ...) [default: the monitor's,
        /// `<parent name>.<child id>`].
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// Give a VM a new name: 1 to 32 of [A-Za-z0-9._-], not only digits nor vm and digits.
    Rename {
        /// The VM: its id (3 or vm3) or its name.
        vm: VmRef,
        /// Its new name.
        name: String,
    },
    /// Stop a VM's vCPUs.
    Pause {
        /// The VM: its id (3 or vm3) or its name.
        vm: VmRef,
    },
    /// Let a paused VM run again.
    Resume {
        /// The VM: its id (3 or vm3) or its name.
        vm: VmRef,
    },
    /// Put a fork back to its fork point: memory, vCPUs and devices as they were when it was
    /// forked (forks only: a booted, created or restored VM has no fork point and is refused).
    Reset {
        /// The VM: its id (3 or vm3) or its name.
        vm: VmRef,
    },
    /// Stop a VM and free its memory (its forks live on). It stays listed as stopped (killed)
    /// until `vmfork rm`.
    Kill {
        /// The VM: its id (3 or vm3) or its name.
        vm: VmRef,
    },
    /// Remove stopped VMs from the list; with --force, kill live ones first.
    Rm {
        /// The VMs: ids (3 or vm3) or names.
        #[arg(required = true, value_name = "VM")]
        vm: Vec<VmRef>,
        /// Kill a VM that is still live, then remove it.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Boot a new guest on the running monitor; the images travel over the channel. Prints the id.
    Create {
        /// Kernel image (arm64 Image or ELF).
        #[arg(long, value_name = "FILE")]
        kernel: PathBuf,
        /// Initial ramdisk.
        #[arg(long, value_name = "FILE")]
        initrd: Option<PathBuf>,
        /// Guest RAM, e.g. 128M or 1G: a multiple of 2M, at most 32G.
        #[arg(long, value_name = "SIZE", default_value = "128M", value_parser = format::parse_size)]
        mem: u64,
        /// Number of vCPUs (1 to 8).
        #[arg(long, value_name = "N", default_value_t = 1)]
        cpus: u32,
        /// Kernel command line.
        #[arg(long, value_name = "STR", default_value = "")]
        cmdline: String,
        /// The VM's name [default: the kernel's file name, when it is a valid name].
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Leave it paused before its first instruction (start it with `vmfork resume`).
        #[arg(long)]
        paused: bool,
        /// Keep no record of it once it stops (it leaves `list` at once).
        #[arg(long)]
        rm: bool,
    },
    /// Attach to a VM's console: its output streams to stdout, stdin goes to the guest.
    ///
    /// On a terminal the console is raw: every key goes to the guest, and Ctrl-] detaches.
    /// With piped stdin every byte is sent as is; at the end of input vmfork keeps printing
    /// output for --linger milliseconds, then detaches.
    ///
    /// When the VM goes while attached (it powered off, was killed, crashed), everything it
    /// printed is shown first, then "vmN <why>" on stderr, and vmfork exits with status 10
    /// (`vm_gone`).
    Console {
        /// The VM: its id (3 or vm3) or its name.
        vm: VmRef,
        /// Milliseconds to keep printing output after stdin ends.
        #[arg(long, value_name = "MS", default_value_t = 300)]
        linger: u64,
        /// Do not show the VM's scroll-back (the last 4 KiB it printed) first.
        #[arg(long)]
        no_replay: bool,
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
        /// The VM: its id (3 or vm3) or its name.
        vm: VmRef,
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
        /// The new VM's name [default: the name in the snapshot].
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// Leave it paused (start it with `vmfork resume`).
        #[arg(long)]
        paused: bool,
        /// Keep no record of it once it stops (it leaves `list` at once).
        #[arg(long)]
        rm: bool,
    },
    /// Which guest pages differ between two VMs, with counts and IPA ranges.
    ///
    /// With --json, each range has the index of its first page in guest RAM (first_page), its
    /// length in pages, and its guest-physical addresses: ipa (first byte) and ipa_end (the
    /// byte after its last page).
    Diff {
        /// First VM: its id (3 or vm3) or its name.
        vm1: VmRef,
        /// Second VM: its id or its name.
        vm2: VmRef,
    },
    /// Wait until a VM is in a state: running, paused, stopped, or gone (no longer listed).
    ///
    /// The monitor pushes no events: vmfork polls its list every --interval milliseconds.
    /// Prints the VM's state line once it is there (JSON with --json). `stopped` is also
    /// reached when the VM is gone (removed). Fails at once when the VM can never be running or
    /// paused: exit status 11 (`stopped`) when it has stopped, 10 (`vm_gone`) when it is gone;
    /// after --timeout with exit status 12 (`timeout`).
    Wait {
        /// The VM: its id (3 or vm3) or its name.
        vm: VmRef,
        /// The state to wait for.
        #[arg(long, value_enum, value_name = "STATE")]
        state: Target,
        /// Give up after this many seconds (fractions allowed) [default: wait for ever].
        #[arg(long, value_name = "SECS", value_parser = parse_secs)]
        timeout: Option<Duration>,
        /// Milliseconds between two looks at the monitor's list.
        #[arg(long, value_name = "MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
    },
    /// Print what happens to VMs as JSON lines: created, forked, paused, resumed, stopped,
    /// renamed, removed, and COW faults per second.
    ///
    /// The monitor pushes no events: vmfork polls its list every --interval milliseconds and
    /// prints what changed (VMs that exist when it starts are not announced). Each line is one
    /// object with "event", "vm", "name", "time" (seconds since `events` started) and the
    /// event's fields: "parent" (created: null, forked: the parent's id), "reason" (paused,
    /// stopped), "old_name" (renamed); once a second a "cow" event for each VM whose COW faults
    /// grew, with "cow_faults_per_sec" and "cow_faults". A change undone within one interval is
    /// not seen. Ends after --count events; fails (exit status 3) when the monitor goes.
    Events {
        /// Milliseconds between two looks at the monitor's list.
        #[arg(long, value_name = "MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
        /// Exit after this many events [default: never].
        #[arg(long, value_name = "N")]
        count: Option<u64>,
    },
    /// A live table of the VMs: state, vCPU use, COW faults per second, private and shared
    /// memory, uptime.
    ///
    /// The monitor pushes nothing: vmfork polls it every --interval milliseconds and redraws
    /// the table (on a terminal; Ctrl-C ends). With --once, or when stdout is not a terminal,
    /// it prints one table, its rates measured over one interval, and exits. VCPU% is the
    /// time the VM's vCPUs ran over the time that passed (above 100 with several vCPUs busy).
    Top {
        /// Milliseconds between two looks (and redraws).
        #[arg(long, value_name = "MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
        /// Print one table and exit.
        #[arg(long)]
        once: bool,
    },
    /// Share the monitor's one control socket among many vmfork processes.
    ///
    /// QEMU's socket serves one client at a time. The mux holds that connection and serves any
    /// number of clients on --listen; point them at it with --socket or VMFORK_SOCKET. It
    /// listens at once, keeps trying until the monitor answers (clients that come earlier are
    /// told what it waits for), and exits when QEMU does.
    Mux {
        /// QEMU's control socket (the monitor's), e.g. run/vmfork.sock.qemu.
        #[arg(long, value_name = "PATH")]
        upstream: PathBuf,
        /// The socket to serve clients on.
        #[arg(long, value_name = "PATH")]
        listen: PathBuf,
        /// Give up when QEMU's socket is missing, or the monitor has not answered, for this
        /// many seconds [default: never give up].
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        /// Append the mux's messages to FILE instead of stderr; what the mux tells clients names
        /// it.
        #[arg(long, value_name = "FILE")]
        log: Option<PathBuf>,
        /// Also make the per-user default socket a link to --listen while no other live monitor
        /// serves it, so that `vmfork` finds this monitor from any directory.
        #[arg(long)]
        user_socket: bool,
    },
    /// Print the man page (roff), made from these definitions; --dir writes vmfork.1 and one
    /// vmfork-COMMAND.1 per command there instead.
    ///
    /// `vmfork man | man -l -` reads it.
    Man {
        /// Directory to write the pages to.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// In bash, zsh and fish, VM arguments complete to the running monitor's VMs (ids as vmN,
    /// and names), which the script asks `vmfork` for as it completes.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `vmfork [--socket PATH] __complete-vms`, which the completion scripts run: the live VMs' ids
/// (vmN) and names, one a line, nothing on any error. A command line of its own rather than a
/// hidden subcommand of [`Cli`]: clap_complete would offer a hidden one among the commands.
#[derive(Parser, Debug)]
#[command(name = "vmfork", disable_help_flag = true, disable_version_flag = true)]
struct CompleteVmsCli {
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CompleteVmsCommand,
}

#[derive(Subcommand, Debug)]
enum CompleteVmsCommand {
    #[command(name = "__complete-vms")]
    CompleteVms,
}

fn main() -> ExitCode {
    if let Ok(c) = CompleteVmsCli::try_parse() {
        // Quiet and quick whatever happens: its output goes into a command line.
        if let Ok(path) = socket_path(c.socket.as_deref()) {
            for vm in complete::live_candidates(&path) {
                println!("{vm}");
            }
        }
        return ExitCode::SUCCESS;
    }
    // Whether --json was asked for, for a command line clap refuses (it comes before `--`).
    let json_asked = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json");
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() || !json_asked => e.exit(),
        Err(e) => {
            // clap's message up to its usage part, on one line.
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect();
            let msg = msg.join(" ");
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
            return fail(&CliError::new(ErrorKind::Usage, msg), true);
        }
    };
    let json = cli.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e, json),
    }
}

/// Reports `e` (JSON on stdout with --json, else one line on stderr) and returns its exit code.
fn fail(e: &CliError, json: bool) -> ExitCode {
    if json {
        let text = serde_json::to_string_pretty(&e.to_json()).unwrap_or_default();
        println!("{text}");
    } else {
        eprintln!("vmfork: {e}");
    }
    ExitCode::from(e.kind.exit_code())
}

fn read_file(p: &PathBuf) -> Result<Vec<u8>, CliError> {
    fs::read(p)
        .map_err(|e| CliError::new(ErrorKind::Io, format!("cannot read {}: {e}", p.display())))
}

/// `--timeout SECS`: seconds, fractions allowed.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{s}` is not a valid timeout"))
}

fn usage(msg: String) -> CliError {
    CliError::new(ErrorKind::Usage, msg)
}

/// The figures of an out-of-memory error for a VM of `mem` bytes, from the monitor's `stats`.
fn memory_figures(mem: u64, g: &GlobalStats) -> MemoryFigures {
    MemoryFigures {
        requested_bytes: mem,
        requested_frames: mem / 4096,
        free_frames: g.free_frames,
        total_frames: g.total_frames,
        heap_free_bytes: g.heap_free,
        heap_reserve_bytes: g.heap_reserve,
    }
}

fn out_of_memory(what: &str, f: MemoryFigures) -> CliError {
    let page = |n: u64| format::bytes(n.saturating_mul(4096));
    let msg = format!(
        "the monitor is out of memory: {what} of {} needs at least {} frames ({}) for its RAM; the monitor has {} of {} frames free ({} of {}) and {} of heap free beyond its {} reserve",
        format::bytes(f.requested_bytes),
        f.requested_frames,
        page(f.requested_frames),
        f.free_frames,
        f.total_frames,
        page(f.free_frames),
        page(f.total_frames),
        format::bytes(f.heap_free_bytes.saturating_sub(f.heap_reserve_bytes)),
        format::bytes(f.heap_reserve_bytes),
    );
    CliError {
        kind: ErrorKind::OutOfMemory,
        message: msg,
        memory: Some(f),
    }
}

/// An out-of-memory reply, with the figures added from `stats` (for a VM of `mem` bytes).
fn with_figures(c: &mut Client, e: ClientError, what: &str, mem: u64) -> CliError {
    match e {
        ClientError::Monitor(ErrorReply::OutOfMemory) => match c.stats(None) {
            Ok((g, _)) => out_of_memory(what, memory_figures(mem, &g)),
            Err(_) => CliError::from(ClientError::Monitor(ErrorReply::OutOfMemory)),
        },
        e => e.into(),
    }
}

/// The socket to use, or an error that says where vmfork looked.
fn socket_path(flag: Option<&Path>) -> Result<PathBuf, CliError> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let user = socket::user_socket();
    match socket::find(flag, std::env::var_os("VMFORK_SOCKET"), &cwd, &user) {
        Found::At(p) => Ok(p),
        Found::Nowhere(looked) => Err(CliError::new(
            ErrorKind::Connection,
            format!(
                "no monitor socket found: no {} in {} or its parents, no {} (is it running? start it with `make qemu-virt`, or name it with --socket or VMFORK_SOCKET)",
                socket::CHECKOUT_SOCKET,
                cwd.display(),
                looked.last().map_or_else(String::new, |p| p.display().to_string()),
            ),
        )),
    }
}

/// The id `r` names: as it is for an id, else looked up in the monitor's list by name.
fn resolve(c: &mut Client, r: &VmRef) -> Result<u32, CliError> {
    if let Some(id) = r.id() {
        return Ok(id);
    }
    let vms = c.list()?;
    r.resolve(&vms).map_err(|e| {
        let kind = match e {
            vmfork::vmref::ResolveError::NoSuchName(_) => ErrorKind::NotFound,
            vmfork::vmref::ResolveError::Ambiguous(..) => ErrorKind::Usage,
        };
        CliError::new(kind, e.to_string())
    })
}

fn print_json(v: &impl serde::Serialize) -> Result<(), CliError> {
    let s = serde_json::to_string_pretty(v)
        .map_err(|e| CliError::new(ErrorKind::Internal, e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn progress_bar(label: &str) -> Option<Progress> {
    io::stderr().is_terminal().then(|| Progress::new(label))
}

fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Completions { shell } = cli.command {
        print!("{}", complete::script(shell, &mut Cli::command()));
        return Ok(());
    }
    if let Command::Man { dir } = &cli.command {
        return man(dir.as_deref());
    }
    if let Command::Mux {
        upstream,
        listen,
        wait,
        log,
        user_socket,
    } = &cli.command
    {
        return run_mux(upstream, listen, *wait, log.as_deref(), *user_socket);
    }
    // What can be checked here is, before anything is sent.
    if let Command::Create {
        mem, cpus, cmdline, ..
    } = &cli.command
    {
        guest_spec::check_mem(*mem)
            .map_err(|why| usage(format!("--mem {}: {why}", format::bytes(*mem))))?;
        guest_spec::check_cpus(*cpus).map_err(|why| usage(format!("--cpus {cpus}: {why}")))?;
        guest_spec::check_cmdline(cmdline).map_err(|why| usage(format!("--cmdline: {why}")))?;
    }
    let name_flag = match &cli.command {
        Command::Create { name, .. }
        | Command::Restore { name, .. }
        | Command::Fork { name, .. } => name.as_deref(),
        Command::Rename { name, .. } => Some(name.as_str()),
        _ => None,
    };
    if let Some(n) = name_flag {
        // Fork children get `.1`, `.2`, ... after it: checked with the longest suffix below.
        guest_spec::check_name(n).map_err(|why| usage(format!("name {n:?}: {why}")))?;
    }
    let socket = socket_path(cli.socket.as_deref())?;
    let mut c = Client::connect(&socket)?;
    let json = cli.json;
    match cli.command {
        Command::Completions { .. } | Command::Mux { .. } | Command::Man { .. } => {}
        Command::List => {
            let vms = c.list()?;
            if json {
                print_json(&vms)?;
            } else {
                print!("{}", format::vm_table(&vms));
            }
        }
        Command::Info { vm } => {
            let vm = resolve(&mut c, &vm)?;
            let info = c.info(VmId(vm))?;
            if json {
                print_json(&info)?;
            } else {
                print!("{}", format::vm_details(&info));
            }
        }
        Command::Stats { vm } => {
            let vm = vm.map(|v| resolve(&mut c, &v)).transpose()?;
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
        Command::Fork {
            vm,
            count,
            paused,
            rm,
            name,
        } => {
            let vm = resolve(&mut c, &vm)?;
            if let Some(n) = &name {
                if count > 1 {
                    let longest = format!("{n}.{count}");
                    guest_spec::check_name(&longest)
                        .map_err(|why| usage(format!("name {longest:?}: {why}")))?;
                }
            }
            let start = StartFlags {
                paused,
                remove_on_stop: rm,
            };
            let children = c.fork_with(VmId(vm), count, start)?;
            if let Some(n) = &name {
                for (k, child) in children.iter().enumerate() {
                    let child_name = if children.len() == 1 {
                        n.clone()
                    } else {
                        format!("{n}.{}", k + 1)
                    };
                    c.simple(&Request::Rename {
                        vm: *child,
                        name: child_name,
                    })?;
                }
            }
            if json {
                print_json(&json!({ "parent": vm, "children": children }))?;
            } else {
                for ch in children {
                    println!("{ch}");
                }
            }
        }
        Command::Rename { vm, name } => {
            let vm = VmId(resolve(&mut c, &vm)?);
            simple(&mut c, Request::Rename { vm, name }, json)?
        }
        Command::Pause { vm } => {
            let vm = VmId(resolve(&mut c, &vm)?);
            simple(&mut c, Request::Pause { vm }, json)?
        }
        Command::Resume { vm } => {
            let vm = VmId(resolve(&mut c, &vm)?);
            simple(&mut c, Request::Resume { vm }, json)?
        }
        Command::Reset { vm } => {
            let vm = VmId(resolve(&mut c, &vm)?);
            simple(&mut c, Request::Reset { vm }, json)?
        }
        Command::Kill { vm } => {
            let vm = VmId(resolve(&mut c, &vm)?);
            simple(&mut c, Request::Kill { vm }, json)?
        }
        Command::Rm { vm, force } => {
            // All resolved first: a name that names nothing removes nothing.
            let ids = vm
                .iter()
                .map(|v| resolve(&mut c, v))
                .collect::<Result<Vec<u32>, CliError>>()?;
            for &vm in &ids {
                c.simple(&Request::Remove {
                    vm: VmId(vm),
                    force,
                })?;
            }
            if json {
                print_json(&json!({ "removed": ids }))?;
            }
        }
        Command::Create {
            kernel,
            initrd,
            mem,
            cpus,
            cmdline,
            name,
            paused,
            rm,
        } => {
            let start = StartFlags {
                paused,
                remove_on_stop: rm,
            };
            // The kernel's file name, when it can name a VM.
            let name = name.or_else(|| {
                kernel
                    .file_name()
                    .and_then(|f| f.to_str())
                    .filter(|f| guest_spec::check_name(f).is_ok())
                    .map(str::to_string)
            });
            // Every guest page gets a frame when the VM is made: refuse what cannot fit before
            // uploading the images.
            let (global, _) = c.stats(None)?;
            let figures = memory_figures(mem, &global);
            if figures.requested_frames > figures.free_frames {
                return Err(out_of_memory("a VM", figures));
            }
            let k = read_file(&kernel)?;
            let i = initrd.as_ref().map(read_file).transpose()?;
            let mut bar = progress_bar("upload");
            let vm = c.create(&k, i.as_deref(), mem, cpus, &cmdline, start, &mut |d, t| {
                if let Some(b) = bar.as_mut() {
                    b.update(d, t)
                }
            });
            if let Some(b) = bar.as_mut() {
                b.finish()
            }
            let vm = vm.map_err(|e| with_figures(&mut c, e, "a VM", mem))?;
            if let Some(name) = name {
                c.simple(&Request::Rename { vm, name })?;
            }
            if json {
                print_json(&json!({ "vm": vm }))?;
            } else {
                println!("{vm}");
            }
        }
        Command::Console {
            vm,
            linger,
            no_replay,
        } => {
            let vm = resolve(&mut c, &vm)?;
            let stdin = io::stdin();
            let tty = stdin.is_terminal();
            let _raw = if tty {
                Some(RawMode::enter(&stdin).map_err(|e| {
                    CliError::new(
                        ErrorKind::Io,
                        format!("cannot put the terminal in raw mode: {e}"),
                    )
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
                replay: !no_replay,
            };
            let mut out = io::stdout();
            let end = console::run(c, VmId(vm), Box::new(io::stdin()), &mut out, &opts);
            let _ = out.flush();
            drop(_raw);
            if let Ok(console::ConsoleEnd::VmGone(reason)) = end {
                // Everything the guest printed has been written; say why it ended (exit status
                // of `vm_gone`, see `vmfork --help`).
                if tty {
                    eprint!("\r\n");
                }
                return Err(CliError::new(ErrorKind::VmGone, format!("vm{vm} {reason}")));
            }
            if tty {
                eprintln!("\r\ndetached from vm {vm}");
            }
            end?;
        }
        Command::Dump { vm, file, force } => {
            let vm = resolve(&mut c, &vm)?;
            let save_err = |e: SaveError| CliError::new(ErrorKind::Io, format!("{e}"));
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
                    w.flush().map(|()| t).map_err(|e| {
                        CliError::new(
                            ErrorKind::Io,
                            format!("cannot write {}: {e}", file.display()),
                        )
                    })
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
        Command::Restore {
            file,
            name,
            paused,
            rm,
        } => {
            let start = StartFlags {
                paused,
                remove_on_stop: rm,
            };
            let bytes = read_file(&file)?;
            // Check it here, to say clearly what is wrong with the file.
            let header = Snapshot::visit(&bytes, |_, _| {}).map_err(|e| {
                CliError::new(
                    ErrorKind::Refused,
                    format!("{} is not a valid vmfork snapshot: {e}", file.display()),
                )
            })?;
            let mut bar = progress_bar("restore");
            let vm = c.restore(&bytes, start, &mut |d, t| {
                if let Some(b) = bar.as_mut() {
                    b.update(d, t)
                }
            });
            if let Some(b) = bar.as_mut() {
                b.finish()
            }
            let vm =
                vm.map_err(|e| with_figures(&mut c, e, "the snapshot's VM", header.mem_bytes))?;
            if let Some(name) = name {
                c.simple(&Request::Rename { vm, name })?;
            }
            if json {
                print_json(&json!({ "vm": vm }))?;
            } else {
                println!("{vm}");
            }
        }
        Command::Wait {
            vm,
            state,
            timeout,
            interval,
        } => {
            let vm = resolve(&mut c, &vm)?;
            let every = Duration::from_millis(interval);
            watch::wait(&mut c, vm, state, timeout, every, json)?;
        }
        Command::Events { interval, count } => {
            watch::events(&mut c, Duration::from_millis(interval), count)?;
        }
        Command::Top { interval, once } => {
            let live = !once && io::stdout().is_terminal();
            watch::top(&mut c, Duration::from_millis(interval), live)?;
        }
        Command::Diff { vm1, vm2 } => {
            let (vm1, vm2) = (resolve(&mut c, &vm1)?, resolve(&mut c, &vm2)?);
            let d = c.diff(VmId(vm1), VmId(vm2))?;
            if json {
                print_json(&format::diff_json(&d))?;
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

fn run_mux(
    upstream: &Path,
    listen: &Path,
    wait: Option<u64>,
    log: Option<&Path>,
    user_socket: bool,
) -> Result<(), CliError> {
    let mut opts = MuxOptions::new(upstream, listen);
    opts.connect_wait = wait.map(Duration::from_secs);
    opts.hello_wait = opts.connect_wait;
    if let Some(path) = log {
        opts.log = MuxLog::file(path).map_err(|e| {
            CliError::new(
                ErrorKind::Io,
                format!("cannot open the log {}: {e}", path.display()),
            )
        })?;
    }
    opts.link = user_socket.then(socket::user_socket);
    let log = opts.log.clone();
    log.line(&format!(
        "starting: serving {} for the monitor at {}",
        listen.display(),
        upstream.display()
    ));
    let mux = Mux::start(&opts).map_err(|e| {
        let kind = match e {
            vmfork::mux::MuxError::VersionMismatch { .. } => ErrorKind::Protocol,
            vmfork::mux::MuxError::Listen { .. } | vmfork::mux::MuxError::AlreadyServing(_) => {
                ErrorKind::Usage
            }
            _ => ErrorKind::Connection,
        };
        CliError::new(kind, format!("mux: {e}{}", log.hint()))
    })?;
    let end = mux.wait();
    let r = match end {
        MuxEnd::Stopped => Ok(()),
        MuxEnd::UpstreamClosed => Err(CliError::new(
            ErrorKind::Connection,
            format!(
                "mux: the monitor at {} closed the connection (did QEMU exit?)",
                upstream.display()
            ),
        )),
    };
    if let (Err(e), Some(_)) = (&r, log.path()) {
        log.line(&e.message);
    }
    r
}

/// `vmfork man`: the page of `vmfork` on stdout, or every page into `dir`.
fn man(dir: Option<&Path>) -> Result<(), CliError> {
    let cmd = Cli::command().disable_help_subcommand(true);
    let io_err = |what: &Path, e: io::Error| {
        CliError::new(
            ErrorKind::Io,
            format!("cannot write {}: {e}", what.display()),
        )
    };
    match dir {
        None => {
            top_man_page(cmd, &mut io::stdout().lock()).map_err(|e| io_err(Path::new("stdout"), e))
        }
        Some(d) => {
            fs::create_dir_all(d).map_err(|e| io_err(d, e))?;
            clap_mangen::generate_to(cmd.clone(), d).map_err(|e| io_err(d, e))?;
            let top = d.join("vmfork.1");
            let mut f = fs::File::create(&top).map_err(|e| io_err(&top, e))?;
            top_man_page(cmd, &mut f).map_err(|e| io_err(&top, e))
        }
    }
}

/// vmfork(1): clap_mangen's sections, with the exit statuses as an EXIT STATUS section of
/// their own instead of the help's text.
fn top_man_page(mut cmd: clap::Command, w: &mut dyn Write) -> io::Result<()> {
    cmd.build();
    let man = clap_mangen::Man::new(cmd.after_help(""));
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    man.render_options_section(w)?;
    man.render_subcommands_section(w)?;
    let roff = |t: &str| t.replace('\\', "\\e").replace('-', "\\-");
    writeln!(w, ".SH \"EXIT STATUS\"")?;
    writeln!(w, ".TP\n\\fB0\\fR\nsuccess")?;
    for k in ErrorKind::ALL {
        writeln!(
            w,
            ".TP\n\\fB{}\\fR \\fI{}\\fR\n{}",
            k.exit_code(),
            roff(k.name()),
            roff(k.meaning())
        )?;
    }
    writeln!(w, ".SH JSON")?;
    writeln!(
        w,
        "{}",
        roff(
            "With --json, output is one JSON document on stdout: the command's result, or on failure {\"error\": {\"kind\": KIND, \"message\": TEXT, \"exit_code\": N}}. The shapes are in docs/vmfork-json.schema.json and docs/PROTOCOL.md of the vmfork sources."
        )
    )?;
    man.render_version_section(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vm_argument_completes_to_the_live_vms() {
        let slots = complete::vm_slots(&Cli::command());
        let got: Vec<(&str, &[usize])> = slots
            .commands
            .iter()
            .map(|(c, s)| (c.as_str(), s.as_slice()))
            .collect();
        let one: &[usize] = &[0];
        assert_eq!(
            got,
            [
                ("info", one),
                ("stats", one),
                ("fork", one),
                ("rename", one),
                ("pause", one),
                ("resume", one),
                ("reset", one),
                ("kill", one),
                ("rm", one),
                ("console", one),
                ("dump", one),
                ("diff", &[0, 1][..]),
                ("wait", one),
            ]
        );
        for opt in ["--socket", "--count", "-n", "--name", "--linger"] {
            assert!(slots.value_options.iter().any(|o| o == opt), "{opt}");
        }
        assert!(!slots.value_options.iter().any(|o| o == "--json"));
    }

    #[test]
    fn complete_vms_is_a_command_line_of_its_own() {
        let ok = |args: &[&str]| CompleteVmsCli::try_parse_from(args).is_ok();
        assert!(ok(&["vmfork", "__complete-vms"]));
        assert!(ok(&["vmfork", "--socket", "s", "--json", "__complete-vms"]));
        assert!(ok(&["vmfork", "__complete-vms", "--socket=s"]));
        assert!(!ok(&["vmfork", "list"]));
        assert!(!ok(&["vmfork", "--help"]));
        assert!(!ok(&["vmfork", "__complete-vms", "extra"]));
        // Never offered: not a subcommand of the real command line.
        assert!(Cli::command()
            .find_subcommand(complete::SUBCOMMAND)
            .is_none());
        assert!(Cli::try_parse_from(["vmfork", complete::SUBCOMMAND]).is_err());
    }
}
