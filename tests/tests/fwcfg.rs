//! The monitor's fw_cfg driver: guests named by `-fw_cfg name=opt/vmfork/<n>/...` files are found
//! at boot, their kernels and initrds read back byte-exact (FNV-1a 64 compared with the host's,
//! over DMA and over the data register), their configs parsed, and malformed specs reported as one
//! error line each without stopping the monitor.

use std::path::{Path, PathBuf};

use tempfile::TempDir;
use vmfork_tests::{Qemu, QemuConfig, DEFAULT_TIMEOUT};

/// FNV-1a 64, computed independently of the monitor.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// `len` pseudo-random bytes (xorshift64*, so every run sees the same file).
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A temp dir holding test files, alive as long as this value.
struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Files {
        let dir = tempfile::Builder::new()
            .prefix("vmfork-fwcfg-")
            .tempdir()
            .expect("create a temp dir");
        Files { dir }
    }

    /// Writes `bytes` as `name`; returns the path and the bytes' FNV-1a 64.
    fn write(&self, name: &str, bytes: &[u8]) -> (PathBuf, u64) {
        let path = self.dir.path().join(name);
        std::fs::write(&path, bytes).expect("write a test file");
        (path, fnv1a(bytes))
    }
}

/// `-fw_cfg name=<name>,file=<path>`.
fn fw_file(cfg: QemuConfig, name: &str, path: &Path) -> QemuConfig {
    let path = path.to_str().expect("temp path is UTF-8");
    assert!(!path.contains(','), "{path}");
    cfg.arg("-fw_cfg").arg(&format!("name={name},file={path}"))
}

/// `-fw_cfg name=<name>,string=<text>`: QEMU's option syntax needs every comma doubled.
fn fw_string(cfg: QemuConfig, name: &str, text: &str) -> QemuConfig {
    cfg.arg("-fw_cfg")
        .arg(&format!("name={name},string={}", text.replace(',', ",,")))
}

/// The monitor on one CPU (enough for boot; the machine is shared) at debug level.
fn monitor(append: &str, name: &str) -> QemuConfig {
    QemuConfig::monitor().smp(1).append(append).name(name)
}

/// Waits for `guest <n>`'s info line and returns (kernel name, kernel size, initrd part, mem MiB,
/// cpus, cmdline, rest).
fn guest_line(qemu: &Qemu, n: u32) -> Vec<String> {
    qemu.wait_for_regex(
        &format!(
            r#"INFO .*fw_cfg: guest {n}: kernel (\S+) \((\d+) bytes\), (initrd none|initrd \S+ \(\d+ bytes\)), mem=(\d+)M cpus=(\d+) cmdline="(.*)"(.*)$"#
        ),
        DEFAULT_TIMEOUT,
    )
}

/// Waits for the debug line with the FNV-1a of guest `n`'s `what` and returns it.
fn logged_hash(qemu: &Qemu, n: u32, what: &str) -> u64 {
    let caps = qemu.wait_for_regex(
        &format!(r"DEBUG .*fw_cfg: guest {n}: {what} fnv1a=0x([0-9a-f]{{16}})$"),
        DEFAULT_TIMEOUT,
    );
    u64::from_str_radix(&caps[1], 16).expect("16 hex digits")
}

/// Kernel (3 MiB + 5: one DMA transfer with an odd length) and initrd (2.5 MiB + 3: read in
/// 1 MiB chunks with DMA skips) come back byte-exact; the config, commas included, parses.
#[test]
fn guest_over_dma_reads_back_exact_and_parses_config() {
    let files = Files::new();
    let (kernel, kernel_hash) = files.write("kernel.bin", &pseudo_random(3 * 1024 * 1024 + 5, 1));
    let (initrd, initrd_hash) = files.write("initrd.bin", &pseudo_random(5 * 512 * 1024 + 3, 2));
    let mut cfg = monitor("log=debug", "fwcfg_dma");
    cfg = fw_file(cfg, "opt/vmfork/0/kernel", &kernel);
    cfg = fw_file(cfg, "opt/vmfork/0/initrd", &initrd);
    cfg = fw_string(
        cfg,
        "opt/vmfork/0/config",
        "mem=64M cpus=2 name=web-1\ncmdline=console=ttyAMA0,115200 foo",
    );
    let qemu = Qemu::start(cfg);
    qemu.wait_for("fw_cfg at 0x9020000: DMA interface", DEFAULT_TIMEOUT);
    let caps = guest_line(&qemu, 0);
    assert_eq!(caps[1], "opt/vmfork/0/kernel");
    assert_eq!(caps[2], (3 * 1024 * 1024 + 5).to_string());
    assert_eq!(
        caps[3],
        format!("initrd opt/vmfork/0/initrd ({} bytes)", 5 * 512 * 1024 + 3)
    );
    assert_eq!((caps[4].as_str(), caps[5].as_str()), ("64", "2"));
    assert_eq!(caps[6], "console=ttyAMA0,115200 foo");
    assert_eq!(caps[7], " name=web-1");
    assert_eq!(logged_hash(&qemu, 0, "kernel"), kernel_hash);
    assert_eq!(logged_hash(&qemu, 0, "initrd"), initrd_hash);
    qemu.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    // The pseudo-random "kernel" is read back exactly, and then rightly refused by the loader.
    assert_eq!(
        qemu.count("ERROR"),
        qemu.count("not started: cannot load the kernel")
    );
}

/// `fw_cfg=nodma` forces the data register: 8-byte reads plus a byte-wise tail, and skips by
/// reading; the bytes must be the same.
#[test]
fn data_register_fallback_reads_back_exact() {
    let files = Files::new();
    let (kernel, kernel_hash) = files.write("kernel.bin", &pseudo_random(1024 * 1024 + 7, 3));
    let (initrd, initrd_hash) = files.write("initrd.bin", &pseudo_random(1024 * 1024 + 13, 4));
    let mut cfg = monitor("log=debug fw_cfg=nodma", "fwcfg_nodma");
    cfg = fw_file(cfg, "opt/vmfork/7/kernel", &kernel);
    cfg = fw_file(cfg, "opt/vmfork/7/initrd", &initrd);
    let qemu = Qemu::start(cfg);
    qemu.wait_for(
        "fw_cfg at 0x9020000: data register interface",
        DEFAULT_TIMEOUT,
    );
    let caps = guest_line(&qemu, 7);
    assert_eq!(caps[2], (1024 * 1024 + 7).to_string());
    // No config file: the defaults.
    assert_eq!((caps[4].as_str(), caps[5].as_str()), ("64", "1"));
    assert_eq!((caps[6].as_str(), caps[7].as_str()), ("", ""));
    assert_eq!(logged_hash(&qemu, 7, "kernel"), kernel_hash);
    assert_eq!(logged_hash(&qemu, 7, "initrd"), initrd_hash);
    qemu.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    // The pseudo-random "kernel" is read back exactly, and then rightly refused by the loader.
    assert_eq!(
        qemu.count("ERROR"),
        qemu.count("not started: cannot load the kernel")
    );
}

/// A bad config is one error line for that guest; the others are still listed and the monitor
/// reaches ready.
#[test]
fn malformed_configs_are_one_error_line_each() {
    let files = Files::new();
    let (kernel, _) = files.write("kernel.bin", &pseudo_random(4096, 5));
    let mut cfg = monitor("log=info", "fwcfg_badcfg");
    for n in 0..4 {
        cfg = fw_file(cfg, &format!("opt/vmfork/{n}/kernel"), &kernel);
    }
    cfg = fw_string(cfg, "opt/vmfork/0/config", "cpus=2 mem=3M");
    cfg = fw_string(cfg, "opt/vmfork/1/config", "cpus=1");
    cfg = fw_string(cfg, "opt/vmfork/2/config", "mem=64M\nbogus");
    cfg = fw_string(cfg, "opt/vmfork/3/config", "cpus=1 cpus=2");
    let qemu = Qemu::start(cfg);
    qemu.wait_for(
        "ERROR cpu0: fw_cfg: guest 0: config line 1: mem=3M: must be a non-zero multiple of 2M",
        DEFAULT_TIMEOUT,
    );
    let caps = guest_line(&qemu, 1);
    assert_eq!((caps[2].as_str(), caps[5].as_str()), ("4096", "1"));
    qemu.wait_for(
        "ERROR cpu0: fw_cfg: guest 2: config line 2: `bogus` is not key=value",
        DEFAULT_TIMEOUT,
    );
    qemu.wait_for(
        "ERROR cpu0: fw_cfg: guest 3: config line 1: `cpus` given twice",
        DEFAULT_TIMEOUT,
    );
    qemu.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    assert_eq!(
        qemu.count("ERROR") - qemu.count("not started: cannot load the kernel"),
        3
    );
    assert_eq!(qemu.count("fw_cfg: guest"), 4);
    qemu.expect_no("panic");
}

/// A malformed name under `opt/vmfork/` fails the listing with one error line; a guest with only
/// a config is another; neither stops the monitor.
#[test]
fn malformed_names_are_an_error_line() {
    let files = Files::new();
    let (kernel, _) = files.write("kernel.bin", b"not really a kernel");
    let cfg = fw_file(
        monitor("log=info", "fwcfg_badname"),
        "opt/vmfork/01/kernel",
        &kernel,
    );
    let qemu = Qemu::start(cfg);
    qemu.wait_for(
        "ERROR cpu0: fw_cfg: guest files: opt/vmfork/01/kernel: guest index must be a decimal",
        DEFAULT_TIMEOUT,
    );
    qemu.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    assert_eq!(qemu.count("ERROR"), 1);

    let cfg = fw_string(
        monitor("log=info", "fwcfg_nokernel"),
        "opt/vmfork/4/config",
        "cpus=1",
    );
    let qemu = Qemu::start(cfg);
    qemu.wait_for(
        "ERROR cpu0: fw_cfg: guest files: guest 4: no opt/vmfork/4/kernel file",
        DEFAULT_TIMEOUT,
    );
    qemu.wait_for("monitor: ready", DEFAULT_TIMEOUT);
}

/// Without any guest files the monitor says so and boots.
#[test]
fn no_guest_files() {
    let qemu = Qemu::start(monitor("log=info", "fwcfg_none"));
    qemu.wait_for("fw_cfg: no guests", DEFAULT_TIMEOUT);
    qemu.wait_for("monitor: ready", DEFAULT_TIMEOUT);
    // The pseudo-random "kernel" is read back exactly, and then rightly refused by the loader.
    assert_eq!(
        qemu.count("ERROR"),
        qemu.count("not started: cannot load the kernel")
    );
}
