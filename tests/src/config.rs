//! [`QemuConfig`]: how to start QEMU (machine, CPUs, memory, kernel, command line, extra
//! arguments), the monitor's guests and control channel, and the QEMU command line it makes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::control::ControlSocket;
use crate::images::{guest_image, monitor_image};

/// How to start QEMU. Build it with [`QemuConfig::monitor`] or [`QemuConfig::plain`] and adjust it
/// with the builder methods; start it with [`Qemu::start`](crate::Qemu::start).
#[derive(Clone, Debug)]
pub struct QemuConfig {
    kernel: PathBuf,
    el2: bool,
    smp: u32,
    mem_mib: u64,
    append: Option<String>,
    extra: Vec<String>,
    icount: Option<u32>,
    pub(crate) name: Option<String>,
}

impl QemuConfig {
    /// The vmfork monitor at EL2: `-M virt,virtualization=on,gic-version=3 -cpu max,pauth-impdef=on
    /// -smp 4 -m 2G -semihosting`. Panics if the monitor image is missing.
    pub fn monitor() -> Self {
        QemuConfig {
            kernel: monitor_image(),
            el2: true,
            smp: 4,
            mem_mib: 2048,
            append: None,
            extra: Vec::new(),
            icount: None,
            name: None,
        }
    }

    /// A plain EL1 guest on QEMU virt: `-M virt,gic-version=3 -cpu max,pauth-impdef=on -smp 1
    /// -m 128M -semihosting` with `kernel` as `-kernel`.
    pub fn plain(kernel: impl AsRef<Path>) -> Self {
        QemuConfig {
            kernel: kernel.as_ref().to_path_buf(),
            el2: false,
            smp: 1,
            mem_mib: 128,
            append: None,
            extra: Vec::new(),
            icount: None,
            name: None,
        }
    }

    /// The image passed as `-kernel` (ELF, Linux arm64 Image, or a raw binary).
    pub fn kernel(mut self, p: impl AsRef<Path>) -> Self {
        self.kernel = p.as_ref().to_path_buf();
        self
    }

    /// Whether the CPUs implement EL2 and start there (`virtualization=on`) or start at EL1.
    pub fn el2(mut self, on: bool) -> Self {
        self.el2 = on;
        self
    }

    /// Number of CPUs (`-smp`).
    pub fn smp(mut self, n: u32) -> Self {
        self.smp = n;
        self
    }

    /// RAM size in MiB (`-m <mib>M`).
    pub fn mem_mib(mut self, mib: u64) -> Self {
        self.mem_mib = mib;
        self
    }

    /// The kernel command line (`-append`), which QEMU puts in the DTB's `/chosen/bootargs`.
    pub fn append(mut self, cmdline: &str) -> Self {
        self.append = Some(cmdline.to_string());
        self
    }

    /// One extra raw QEMU argument, added after the standard ones; call once per argument
    /// (`.arg("-fw_cfg").arg("name=opt/x,file=/path")`).
    pub fn arg(mut self, a: &str) -> Self {
        self.extra.push(a.to_string());
        self
    }

    /// Instruction counting (`-icount shift=<shift>`): the virtual clock advances 2^shift ns per
    /// emulated instruction, so timings repeat run to run.
    pub fn icount(mut self, shift: u32) -> Self {
        self.icount = Some(shift);
        self
    }

    /// The test's name, used in the temp dir name and the failure banner. Defaults to the name of
    /// the current thread, which libtest sets to the test's name.
    pub fn name(mut self, test_name: &str) -> Self {
        self.name = Some(test_name.to_string());
        self
    }

    /// Adds the monitor's control channel: port 1 (`virtserialport`, named `vmfork.ctl`) of a
    /// virtio console on QEMU's virtio-mmio bus, backed by a Unix socket server at `socket` that
    /// waits for nobody.
    pub fn control(self, socket: &ControlSocket) -> Self {
        let chardev = format!(
            "socket,id=ctl,path={},server=on,wait=off",
            socket.path().display()
        );
        self.arg("-chardev")
            .arg(&chardev)
            .arg("-device")
            .arg("virtio-serial-device")
            .arg("-device")
            .arg("virtserialport,chardev=ctl,name=vmfork.ctl,nr=1")
    }

    /// Adds guest `index` of the monitor: `image` (a guest-images name or a path) as its kernel
    /// and, unless empty, `config` as its fw_cfg config text.
    pub fn guest(self, index: u32, image: &str, config: &str) -> Self {
        let path = if Path::new(image).exists() {
            PathBuf::from(image)
        } else {
            guest_image(image)
        };
        self.guest_files(index, &path, None, config)
    }

    /// Adds guest `index` of the monitor from files: `kernel`, an optional `initrd` and, unless
    /// empty, `config` as its fw_cfg config text.
    pub fn guest_files(
        self,
        index: u32,
        kernel: &Path,
        initrd: Option<&Path>,
        config: &str,
    ) -> Self {
        let mut cfg = self.arg("-fw_cfg").arg(&format!(
            "name=opt/vmfork/{index}/kernel,file={}",
            kernel.display()
        ));
        if let Some(initrd) = initrd {
            cfg = cfg.arg("-fw_cfg").arg(&format!(
                "name=opt/vmfork/{index}/initrd,file={}",
                initrd.display()
            ));
        }
        if config.is_empty() {
            return cfg;
        }
        // fw_cfg's `string=` takes commas doubled.
        cfg.arg("-fw_cfg").arg(&format!(
            "name=opt/vmfork/{index}/config,string={}",
            config.replace(',', ",,")
        ))
    }

    /// QEMU's arguments, without the program name.
    pub(crate) fn args(&self) -> Vec<OsString> {
        let machine = if self.el2 {
            "virt,virtualization=on,gic-version=3"
        } else {
            "virt,gic-version=3"
        };
        // QEMU runs in the test's working directory, so make a relative kernel path absolute now
        // (the failure banner then shows a path that can be pasted anywhere).
        let kernel = std::path::absolute(&self.kernel).unwrap_or_else(|_| self.kernel.clone());
        let mut args: Vec<OsString> = [
            "-M",
            machine,
            "-cpu",
            "max,pauth-impdef=on",
            "-smp",
            &self.smp.to_string(),
            "-m",
            &format!("{}M", self.mem_mib),
            "-semihosting",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        args.push("-kernel".into());
        args.push(kernel.into_os_string());
        if let Some(cmdline) = &self.append {
            args.push("-append".into());
            args.push(cmdline.into());
        }
        if let Some(shift) = self.icount {
            args.push("-icount".into());
            args.push(format!("shift={shift}").into());
        }
        args.extend(self.extra.iter().map(OsString::from));
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu::process::shell_join;

    #[test]
    fn monitor_args_match_the_contract() {
        let cfg = QemuConfig {
            kernel: PathBuf::from("/img"),
            el2: true,
            smp: 4,
            mem_mib: 2048,
            append: Some("log=debug".into()),
            extra: vec!["-fw_cfg".into(), "name=opt/x,string=1".into()],
            icount: Some(0),
            name: None,
        };
        let line = shell_join(&"qemu".into(), &cfg.args());
        assert_eq!(
            line,
            "qemu -M virt,virtualization=on,gic-version=3 -cpu max,pauth-impdef=on -smp 4 \
             -m 2048M -semihosting -display none -monitor none -serial stdio -no-reboot \
             -kernel /img -append log=debug -icount shift=0 -fw_cfg name=opt/x,string=1"
        );
    }

    #[test]
    fn plain_args_are_el1_single_cpu() {
        let line = shell_join(&"qemu".into(), &QemuConfig::plain("/k").args());
        assert!(line.starts_with(
            "qemu -M virt,gic-version=3 -cpu max,pauth-impdef=on -smp 1 -m 128M -semihosting"
        ));
        assert!(line.ends_with("-kernel /k"));
    }
}
