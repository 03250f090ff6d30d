//! The Linux guest for the integration tests: `guest-images/linux/build.sh` run once per test
//! process (cached per machine), and the constants every Linux test needs.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::workspace_root;

pub const CMDLINE: &str = "console=ttyAMA0 earlycon rdinit=/init";
/// What the busybox shell prints when it starts. Its prompt has no newline, and the monitor
/// forwards a guest's console output line by line, so the prompt itself shows up only later.
pub const SHELL_UP: &str = "Enter 'help' for a list of built-in commands.";
/// `build.sh`'s exit status when the packages cannot be fetched.
pub const EXIT_NO_NETWORK: i32 = 2;

/// The kernel `Image` and the initramfs.
#[derive(Clone, Debug)]
pub struct LinuxGuest {
    /// The kernel `Image`.
    pub image: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// Builds the guest once per test process (build.sh itself does nothing when its output is up to
/// date and makes no network request when the packages are cached). `Err` is the skip reason.
pub fn linux_guest() -> Result<LinuxGuest, String> {
    static GUEST: OnceLock<Result<LinuxGuest, String>> = OnceLock::new();
    GUEST
        .get_or_init(|| {
            let root = workspace_root();
            let script = root.join("guest-images/linux/build.sh");
            let started = Instant::now();
            let out = Command::new("bash")
                .arg(&script)
                .current_dir(&root)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            let stderr = String::from_utf8_lossy(&out.stderr);
            match out.status.code() {
                Some(0) => {}
                Some(EXIT_NO_NETWORK) => {
                    return Err(format!(
                        "the Linux guest is not built and its packages cannot be fetched:\n{stderr}"
                    ))
                }
                _ => panic!("{} failed ({}):\n{stderr}", script.display(), out.status),
            }
            eprintln!(
                "linux: build.sh took {:.1} s",
                started.elapsed().as_secs_f64()
            );
            let dir = root.join("target/linux");
            Ok(LinuxGuest {
                image: dir.join("Image"),
                initrd: dir.join("initramfs.cpio.gz"),
            })
        })
        .clone()
}

/// Linux boots are heavy for a 2-core machine and the timing comparison must not run beside
/// another boot: the tests of this file run one at a time.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Gets the guest, or prints why the test is skipped and returns.
#[macro_export]
macro_rules! guest_or_skip {
    () => {
        match $crate::linux::linux_guest() {
            Ok(g) => g,
            Err(why) => {
                println!("SKIP: {why}");
                eprintln!("SKIP: {why}");
                return;
            }
        }
    };
}

/// Adds the Linux guest to the monitor as guest 0 (`vm1`, named `linux`): `mem_mib` of RAM,
/// `cpus` vCPUs, [`CMDLINE`].
pub fn with_linux(
    cfg: crate::QemuConfig,
    g: &LinuxGuest,
    mem_mib: u64,
    cpus: u32,
) -> crate::QemuConfig {
    cfg.guest_files(
        0,
        &g.image,
        Some(&g.initrd),
        &format!("mem={mem_mib}M cpus={cpus} name=linux cmdline={CMDLINE}"),
    )
}
