//! Self-test of the QEMU harness, independent of the vmfork monitor: it boots two tiny hand-made
//! AArch64 programs on plain QEMU virt and checks waiting, cursors, sending, exit codes, timeouts,
//! killing and the temp dir.
//!
//! The programs are position-independent raw binaries (QEMU's `-kernel` loads a raw file at
//! 0x4008_0000 and enters it there, at EL1 or, with `virtualization=on`, at EL2). The PL011 at
//! 0x0900_0000 transmits without any set-up on QEMU. Both programs end in an Arm semihosting
//! `SYS_EXIT` (`x0 = 0x18`, `x1` -> `{ADP_Stopped_ApplicationExit = 0x20026, exit code}`,
//! `HLT #0xF000`), which makes QEMU (run with `-semihosting`) exit with that code.
//!
//! The encodings were produced once with `llvm-mc -triple=aarch64` and checked with
//! `llvm-objdump -d`; the source is in the comment next to each word.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use vmfork_tests::{guest_image, Qemu, QemuConfig, DEFAULT_TIMEOUT};

/// Byte offset of the semihosting parameter block `{reason: u64, exit code: u64}` in both
/// programs.
const BLOCK: usize = 0x38;
/// `ADP_Stopped_ApplicationExit`, the SYS_EXIT reason that carries an exit code.
const ADP_STOPPED_APPLICATION_EXIT: u64 = 0x2_0026;

/// "print": writes the NUL-terminated message at 0x4c to the PL011, then, if the word at 0x48
/// (`spin`) is zero, exits through semihosting with the code in the block at 0x38; otherwise it
/// sleeps forever in WFI (interrupts are masked and none are configured, so it never wakes and
/// costs the host no CPU).
const PRINT_CODE: [u32; 14] = [
    0xd2a1_2001, // 0x00 movz x1, #0x0900, lsl #16   x1 = 0x0900_0000, PL011 UARTDR
    0x1000_0242, // 0x04 adr  x2, 0x4c               x2 = message cursor
    0x3840_1443, // 0x08 ldrb w3, [x2], #1           next byte, post-increment
    0x3400_0063, // 0x0c cbz  w3, 0x18               NUL: done
    0x3900_0023, // 0x10 strb w3, [x1]               transmit
    0x17ff_fffd, // 0x14 b    0x08
    0x1800_0184, // 0x18 ldr  w4, 0x48               w4 = spin
    0x3500_0084, // 0x1c cbnz w4, 0x2c
    0xd280_0300, // 0x20 movz x0, #0x18              SYS_EXIT
    0x1000_00a1, // 0x24 adr  x1, 0x38               parameter block
    0xd45e_0000, // 0x28 hlt  #0xf000                A64 semihosting trap
    0xd503_207f, // 0x2c wfi
    0x17ff_ffff, // 0x30 b    0x2c
    0xd503_201f, // 0x34 nop                         pads the block to 8-byte alignment
];
/// Offset of `spin` (u32) in "print".
const PRINT_SPIN: usize = 0x48;

/// "echo": copies every byte received by the PL011 back to it until it receives `q`, then exits
/// through semihosting with the code in the block at 0x38. It polls UARTFR.RXFE (bit 4) in a busy
/// loop, so keep its runs short.
const ECHO_CODE: [u32; 14] = [
    0xd2a1_2001, // 0x00 movz x1, #0x0900, lsl #16   PL011 base
    0xb940_1823, // 0x04 ldr  w3, [x1, #0x18]        UARTFR
    0x3727_ffe3, // 0x08 tbnz w3, #4, 0x04           RXFE: nothing received yet
    0xb940_0023, // 0x0c ldr  w3, [x1]               UARTDR
    0x1200_1c63, // 0x10 and  w3, w3, #0xff          drop the error bits
    0x7101_c47f, // 0x14 cmp  w3, #0x71              'q'?
    0x5400_0060, // 0x18 b.eq 0x24
    0x3900_0023, // 0x1c strb w3, [x1]               echo it
    0x17ff_fff9, // 0x20 b    0x04
    0xd280_0300, // 0x24 movz x0, #0x18              SYS_EXIT
    0x1000_0081, // 0x28 adr  x1, 0x38               parameter block
    0xd45e_0000, // 0x2c hlt  #0xf000                A64 semihosting trap
    0x1400_0000, // 0x30 b    0x30
    0xd503_201f, // 0x34 nop                         pads the block to 8-byte alignment
];

/// Code words followed by the semihosting SYS_EXIT block.
fn with_exit_block(code: &[u32; 14], exit_code: u64) -> Vec<u8> {
    let mut bytes: Vec<u8> = code.iter().flat_map(|w| w.to_le_bytes()).collect();
    assert_eq!(bytes.len(), BLOCK);
    bytes.extend_from_slice(&ADP_STOPPED_APPLICATION_EXIT.to_le_bytes());
    bytes.extend_from_slice(&exit_code.to_le_bytes());
    bytes
}

/// "print" with `msg`; exits with `exit` or, with `None`, sleeps forever.
fn print_program(msg: &str, exit: Option<u64>) -> Vec<u8> {
    assert!(!msg.as_bytes().contains(&0));
    let mut bytes = with_exit_block(&PRINT_CODE, exit.unwrap_or(0));
    assert_eq!(bytes.len(), PRINT_SPIN);
    bytes.extend_from_slice(&u32::from(exit.is_none()).to_le_bytes());
    bytes.extend_from_slice(msg.as_bytes());
    bytes.push(0);
    bytes
}

/// "echo", exiting with `exit_code` on `q`.
fn echo_program(exit_code: u64) -> Vec<u8> {
    with_exit_block(&ECHO_CODE, exit_code)
}

/// A program written to a temp file that lives as long as this value.
struct Program {
    _dir: TempDir,
    path: PathBuf,
}

fn write_program(bytes: &[u8]) -> Program {
    let dir = tempfile::Builder::new()
        .prefix("vmfork-selftest-")
        .tempdir()
        .expect("create a temp dir for the test program");
    let path = dir.path().join("prog.bin");
    std::fs::write(&path, bytes).expect("write the test program");
    Program { _dir: dir, path }
}

/// Whether a process with this pid exists (a zombie would still count).
fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The text of a panic payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else {
        String::from("<non-string panic payload>")
    }
}

/// Runs `f`, which must panic; its QEMUs must be named `name`. Checks that the failure kept their
/// temp dirs (as it does for a real failing test), removes them so the self-test leaves no litter,
/// and returns the panic message.
fn expect_failure(name: &str, f: impl FnOnce()) -> String {
    let result = catch_unwind(AssertUnwindSafe(f));
    let msg = panic_text(result.expect_err("this must panic").as_ref()).to_string();
    let prefix = format!("{name}-{}-", std::process::id());
    let root = std::env::temp_dir().join("vmfork-tests");
    let mut kept = 0;
    for entry in std::fs::read_dir(&root).expect("the vmfork-tests temp root exists") {
        let path = entry.expect("read the temp root").path();
        let file_name = path.file_name().unwrap().to_string_lossy().into_owned();
        if file_name.starts_with(&prefix) {
            assert!(path.join("serial.log").is_file(), "{}", path.display());
            std::fs::remove_dir_all(&path).expect("remove a kept temp dir");
            kept += 1;
        }
    }
    assert!(kept > 0, "the failure kept no temp dir named {prefix}*");
    msg
}

#[test]
fn hello_then_semihosting_exit_code_3() {
    let prog = write_program(&print_program("hello\n", Some(3)));
    let mut qemu = Qemu::start(QemuConfig::plain(&prog.path));
    assert_eq!(qemu.wait_for("hello", DEFAULT_TIMEOUT), "hello");
    assert_eq!(qemu.wait_exit(DEFAULT_TIMEOUT), 3);
    assert_eq!(qemu.serial(), "hello\n");
}

#[test]
fn exit_code_zero_is_reported() {
    let prog = write_program(&print_program("bye\n", Some(0)));
    let mut qemu = Qemu::start(QemuConfig::plain(&prog.path));
    assert_eq!(qemu.wait_exit(DEFAULT_TIMEOUT), 0);
    assert_eq!(qemu.serial(), "bye\n");
}

#[test]
fn runs_at_el2_with_four_cpus_and_icount() {
    let prog = write_program(&print_program("at el2\n", Some(5)));
    let cfg = QemuConfig::plain(&prog.path)
        .el2(true)
        .smp(4)
        .mem_mib(512)
        .icount(0);
    let mut qemu = Qemu::start(cfg);
    assert_eq!(qemu.wait_for("el2", DEFAULT_TIMEOUT), "at el2");
    assert_eq!(qemu.wait_exit(DEFAULT_TIMEOUT), 5);
}

#[test]
fn kernel_builder_replaces_the_image() {
    let first = write_program(&print_program("first\n", Some(1)));
    let second = write_program(&print_program("second\n", Some(2)));
    let mut qemu = Qemu::start(QemuConfig::plain(&first.path).kernel(&second.path));
    assert_eq!(qemu.wait_exit(DEFAULT_TIMEOUT), 2);
    assert_eq!(qemu.serial(), "second\n");
}

#[test]
fn successive_waits_see_successive_lines() {
    let prog = write_program(&print_program(
        "one\r\ntwo\none again\nvalue=42 name=abc\n",
        None,
    ));
    let qemu = Qemu::start(QemuConfig::plain(&prog.path));
    // "\r\n" line ends lose their "\r".
    assert_eq!(qemu.wait_for("one", DEFAULT_TIMEOUT), "one");
    assert_eq!(qemu.wait_for("two", DEFAULT_TIMEOUT), "two");
    // The cursor is past the first "one": this finds the third line.
    assert_eq!(qemu.wait_for("one", DEFAULT_TIMEOUT), "one again");
    assert_eq!(
        qemu.wait_for_regex(r"value=(\d+) name=(\w+)(x)?", DEFAULT_TIMEOUT),
        vec!["value=42 name=abc", "42", "abc", ""]
    );
    // count and expect_no look at the whole log, wherever the cursor is.
    assert_eq!(qemu.count("one"), 2);
    assert_eq!(qemu.count("two"), 1);
    assert_eq!(qemu.count("three"), 0);
    qemu.expect_no("three");
    assert!(qemu.serial().starts_with("one\r\ntwo\n"));
}

#[test]
fn cursor_hides_output_already_consumed() {
    let prog = write_program(&print_program("one\ntwo\n", None));
    let msg = expect_failure("cursor_hides", || {
        let qemu = Qemu::start(QemuConfig::plain(&prog.path).name("cursor_hides"));
        qemu.wait_for("two", DEFAULT_TIMEOUT);
        // "one" came before the cursor, so it is not seen again.
        qemu.wait_for("one", Duration::from_secs(3));
    });
    assert!(
        msg.contains("timed out after 3.0 s waiting for \"one\""),
        "{msg}"
    );
}

#[test]
fn wait_for_panics_on_timeout() {
    let prog = write_program(&print_program("hello\n", None));
    let msg = expect_failure("wait_timeout", || {
        let qemu = Qemu::start(QemuConfig::plain(&prog.path).name("wait_timeout"));
        qemu.wait_for("hello", DEFAULT_TIMEOUT);
        qemu.wait_for("never printed", Duration::from_secs(2));
    });
    assert!(
        msg.starts_with("[wait_timeout] timed out after 2.0 s"),
        "{msg}"
    );
    assert!(msg.contains("\"never printed\""), "{msg}");
}

#[test]
fn wait_for_regex_panics_on_timeout() {
    let prog = write_program(&print_program("value=x\nend\n", None));
    let msg = expect_failure("regex_timeout", || {
        let qemu = Qemu::start(QemuConfig::plain(&prog.path).name("regex_timeout"));
        // Let all output arrive without moving the cursor (QEMU may start slowly on a loaded
        // machine), so that the short wait below fails only because nothing matches.
        let deadline = Instant::now() + DEFAULT_TIMEOUT;
        while qemu.count("end\n") == 0 {
            assert!(Instant::now() < deadline, "no output");
            std::thread::sleep(Duration::from_millis(10));
        }
        qemu.wait_for_regex(r"value=\d+", Duration::from_secs(3));
    });
    assert!(msg.contains("timed out after 3.0 s"), "{msg}");
    // The output that did not match is shown.
    assert!(msg.contains("value=x"), "{msg}");
}

#[test]
fn wait_for_panics_promptly_when_qemu_exits_first() {
    let prog = write_program(&print_program("hello\n", Some(3)));
    let started = Instant::now();
    let msg = expect_failure("exits_first", || {
        let qemu = Qemu::start(QemuConfig::plain(&prog.path).name("exits_first"));
        qemu.wait_for("never printed", DEFAULT_TIMEOUT);
    });
    assert!(
        msg.starts_with("[exits_first] QEMU exited (exited with code 3) before"),
        "{msg}"
    );
    assert!(
        msg.contains("hello"),
        "the message shows recent output: {msg}"
    );
    // It must not have waited for the timeout.
    assert!(started.elapsed() < DEFAULT_TIMEOUT / 2);
}

#[test]
fn expect_no_panics_when_pattern_present() {
    let prog = write_program(&print_program("all good\npanicked at x\n", None));
    let msg = expect_failure("expect_no", || {
        let qemu = Qemu::start(QemuConfig::plain(&prog.path).name("expect_no"));
        qemu.wait_for("panicked", DEFAULT_TIMEOUT);
        qemu.expect_no("not in the log");
        qemu.expect_no("panicked");
    });
    assert!(msg.contains("must not"), "{msg}");
    assert!(msg.contains("panicked at x"), "the line is shown: {msg}");
}

#[test]
fn partial_line_counts_once_output_goes_idle() {
    let prog = write_program(&print_program("login\nprompt> ", None));
    let qemu = Qemu::start(QemuConfig::plain(&prog.path));
    assert_eq!(qemu.wait_for("prompt>", DEFAULT_TIMEOUT), "prompt> ");
}

#[test]
fn send_reaches_the_guest() {
    let prog = write_program(&echo_program(7));
    let mut qemu = Qemu::start(QemuConfig::plain(&prog.path));
    qemu.send(b"ping\n");
    assert_eq!(qemu.wait_for("ping", DEFAULT_TIMEOUT), "ping");
    qemu.send(b"pong\n");
    assert_eq!(qemu.wait_for("o", DEFAULT_TIMEOUT), "pong");
    qemu.send(b"q");
    assert_eq!(qemu.wait_exit(DEFAULT_TIMEOUT), 7);
}

#[test]
fn drop_kills_qemu_and_removes_the_temp_dir() {
    let prog = write_program(&print_program("hello\n", None));
    let qemu = Qemu::start(QemuConfig::plain(&prog.path).name("drop_kills"));
    qemu.wait_for("hello", DEFAULT_TIMEOUT);
    let pid = qemu.pid();
    let dir = qemu.temp_dir().to_path_buf();
    assert!(pid_exists(pid));
    assert!(dir.is_dir());
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(&format!("drop_kills-{}-", std::process::id())),
        "{name}"
    );
    drop(qemu);
    assert!(!pid_exists(pid), "QEMU {pid} survived the drop");
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn kill_stops_qemu() {
    let prog = write_program(&print_program("hello\n", None));
    let mut qemu = Qemu::start(QemuConfig::plain(&prog.path));
    qemu.wait_for("hello", DEFAULT_TIMEOUT);
    let pid = qemu.pid();
    qemu.kill();
    assert!(!pid_exists(pid), "QEMU {pid} survived kill()");
    // The log stays readable after the kill.
    assert_eq!(qemu.count("hello"), 1);
}

#[test]
fn wait_exit_timeout_kills_and_panics() {
    let prog = write_program(&print_program("hello\n", None));
    let mut pid = 0;
    let msg = expect_failure("exit_timeout", || {
        let mut qemu = Qemu::start(QemuConfig::plain(&prog.path).name("exit_timeout"));
        pid = qemu.pid();
        qemu.wait_exit(Duration::from_secs(2));
    });
    assert!(msg.contains("did not exit within 2.0 s"), "{msg}");
    assert!(!pid_exists(pid), "QEMU {pid} survived");
}

#[test]
fn failure_keeps_the_temp_dir_with_the_logs() {
    let prog = write_program(&print_program("hello\n", None));
    let mut kept = PathBuf::new();
    let mut pid = 0;
    let result = catch_unwind(AssertUnwindSafe(|| {
        let qemu = Qemu::start(QemuConfig::plain(&prog.path).append("a b"));
        qemu.wait_for("hello", DEFAULT_TIMEOUT);
        kept = qemu.temp_dir().to_path_buf();
        pid = qemu.pid();
        panic!("deliberate failure");
    }));
    assert!(result.is_err());
    assert!(!pid_exists(pid), "QEMU {pid} survived the failing test");
    assert!(kept.is_dir(), "{} was not kept", kept.display());
    let serial = std::fs::read_to_string(kept.join("serial.log")).unwrap();
    assert_eq!(serial, "hello\n");
    let command = std::fs::read_to_string(kept.join("command.txt")).unwrap();
    assert!(command.contains("-serial stdio"), "{command}");
    assert!(command.contains("-append 'a b'"), "{command}");
    assert!(kept.join("stderr.log").is_file());
    std::fs::remove_dir_all(&kept).unwrap();
}

#[test]
fn parallel_qemus_are_independent() {
    let a = write_program(&print_program("I am A\n", None));
    let b = write_program(&print_program("I am B\n", Some(4)));
    let qa = Qemu::start(QemuConfig::plain(&a.path));
    let mut qb = Qemu::start(QemuConfig::plain(&b.path));
    assert_ne!(qa.temp_dir(), qb.temp_dir());
    assert_eq!(qa.wait_for("I am", DEFAULT_TIMEOUT), "I am A");
    assert_eq!(qb.wait_for("I am", DEFAULT_TIMEOUT), "I am B");
    assert_eq!(qb.wait_exit(DEFAULT_TIMEOUT), 4);
    assert_eq!(qa.count("B"), 0);
}

#[test]
fn missing_image_names_the_path_and_make() {
    let msg = panic_text(
        catch_unwind(|| guest_image("no-such-guest-image"))
            .expect_err("a missing image must panic")
            .as_ref(),
    );
    assert!(msg.contains("no-such-guest-image"), "{msg}");
    assert!(msg.contains("Run `make`"), "{msg}");
}

/// The state letter of a process in /proc (`Z` for a zombie), or `None` if it is gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ...": the state follows the last ')'.
    stat.rsplit(')').next()?.trim_start().chars().next()
}

#[test]
fn qemu_dies_with_the_thread_that_started_it_even_if_leaked() {
    // Stands in for a test process killed without unwinding (^C): Drop never runs, yet QEMU
    // must not outlive its parent. PR_SET_PDEATHSIG fires when the spawning thread exits.
    let prog = write_program(&print_program("hello\n", None));
    let path = prog.path.clone();
    let pid = std::thread::spawn(move || {
        let qemu = Qemu::start(QemuConfig::plain(&path).name("leaked"));
        qemu.wait_for("hello", DEFAULT_TIMEOUT);
        let pid = qemu.pid();
        std::mem::forget(qemu);
        pid
    })
    .join()
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Gone, or a zombie waiting for the leaked handle's (never-run) reap.
    while !matches!(proc_state(pid), None | Some('Z')) {
        assert!(
            Instant::now() < deadline,
            "leaked QEMU {pid} is still alive"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let dir = std::env::temp_dir()
        .join("vmfork-tests")
        .join(format!("leaked-{}-", std::process::id()));
    // The leaked Qemu's temp dir was never removed; clean it up.
    let root = dir.parent().unwrap();
    let prefix = dir.file_name().unwrap().to_string_lossy().into_owned();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(&prefix)
        {
            std::fs::remove_dir_all(&path).unwrap();
        }
    }
}
