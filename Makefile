# vmfork: build, boot and test the EL2 monitor on QEMU's virt board.
#
#   make                build the monitor, the guest images and the host tools
#   make qemu-virt      build and boot the monitor interactively (Ctrl-A X quits QEMU)
#                       SMP=4 MEM=2G QEMU_ARGS='...' APPEND='log=debug'
#                       GUEST=<image> [GUEST_INITRD=<file>] [GUEST_MEM=64M] [GUEST_CPUS=1]
#                       [GUEST_CMDLINE=...] [GUEST_NAME=...]  boots one guest (its VM is named
#                       after the image, or GUEST_NAME); GUESTS='<image> <image> ...'
#                       adds more guests with the default configuration. An image is a path or
#                       the name of a guest in guest-images (hello, counter, memcheck, smp, ...).
#                       The control channel listens on SOCKET=run/vmfork.sock for `vmfork`
#                       (QEMU's own socket is SOCKET.qemu; `vmfork mux` shares it among clients,
#                       waits for the monitor as long as it takes and logs to MUX_LOG=SOCKET.log).
#                       USER_SOCKET=1 (default) also links the per-user socket
#                       ($XDG_RUNTIME_DIR/vmfork/vmfork.sock or /tmp/vmfork-$UID/vmfork.sock) to
#                       SOCKET while no other monitor holds it: `vmfork` finds it from anywhere.
#   make test           every test: host unit/property tests, then the QEMU integration tests
#   make lint           cargo fmt --check and clippy (host and bare-metal crates)
#   make setup          install what the others need (they run it themselves): the Rust toolchain
#                       of rust-toolchain.toml with aarch64-unknown-none, rustfmt and clippy, and QEMU
#   make clean          remove build output

SHELL        := /bin/bash
CARGO        ?= cargo
QEMU         ?= qemu-system-aarch64
TARGET       := aarch64-unknown-none
PROFILE_DIR  := target/$(TARGET)/release
MONITOR      := $(PROFILE_DIR)/vmfork-monitor
SMP          ?= 4
MEM          ?= 2G
APPEND       ?=
QEMU_ARGS    ?=
GUEST        ?=
GUEST_INITRD ?=
GUEST_MEM    ?=
GUEST_CPUS   ?=
GUEST_CMDLINE ?=
GUESTS       ?=
# The control channel's Unix socket (the `vmfork` tool's default is run/vmfork.sock too).
SOCKET       ?= run/vmfork.sock
# The mux's log (what it tells clients names it), and whether it claims the per-user socket.
MUX_LOG      ?= $(SOCKET).log
USER_SOCKET  ?= 1

comma := ,
# A guest image: a path to a file, or the name of one of our guest images.
guest_path = $(if $(wildcard $(1)),$(1),$(PROFILE_DIR)/$(1))
# The first guest's VM name: GUEST_NAME=, else the guest's when GUEST names one of ours
# (`counter`, `linux`); a path gets the monitor's default (`guest0`).
GUEST_NAME ?= $(if $(wildcard $(GUEST)),,$(GUEST))
GUEST_CONFIG = $(strip $(if $(GUEST_NAME),name=$(GUEST_NAME)) $(if $(GUEST_MEM),mem=$(GUEST_MEM)) $(if $(GUEST_CPUS),cpus=$(GUEST_CPUS)) $(if $(GUEST_CMDLINE),cmdline=$(GUEST_CMDLINE)))
# Guests reach the monitor as QEMU fw_cfg files opt/vmfork/<n>/{kernel,initrd,config}
# (docs/GUESTS.md); fw_cfg's string= needs commas doubled.
GUEST_FWCFG = $(if $(GUEST),\
  -fw_cfg name=opt/vmfork/0/kernel$(comma)file=$(call guest_path,$(GUEST)) \
  $(if $(GUEST_INITRD),-fw_cfg name=opt/vmfork/0/initrd$(comma)file=$(GUEST_INITRD)) \
  $(if $(GUEST_CONFIG),-fw_cfg 'name=opt/vmfork/0/config$(comma)string=$(subst $(comma),$(comma)$(comma),$(GUEST_CONFIG))'))

# The board: EL2 (virtualization=on), GICv3, PSCI over SMC. pauth-impdef=on: QEMU's default
# pointer-authentication algorithm is about 3x slower to emulate.
QEMU_MACHINE := -M virt,virtualization=on,gic-version=3 -cpu max,pauth-impdef=on

.PHONY: all build monitor guests tools qemu-virt test test-host test-qemu lint clean ensure-qemu \
	ensure-toolchain setup

all: build

setup: ensure-toolchain ensure-qemu

build: monitor guests tools

# Every target that runs cargo first makes sure the toolchain pinned in rust-toolchain.toml, its
# aarch64-unknown-none target, rustfmt and clippy are installed (scripts/setup.sh: a 0.1 s check,
# `rustup toolchain install` only when something is missing).
ensure-toolchain:
	@scripts/setup.sh toolchain

monitor: ensure-toolchain
	$(CARGO) build --release --target $(TARGET) -p vmfork-monitor

guests: ensure-toolchain
	$(CARGO) build --release --target $(TARGET) -p vmfork-guests

tools: ensure-toolchain
	$(CARGO) build --release -p vmfork

# Installs QEMU when it is missing: with apt-get as root, otherwise says what to run.
ensure-qemu:
	@QEMU=$(QEMU) scripts/setup.sh qemu

qemu-virt: ensure-qemu build
	@i=$(if $(GUEST),1,0); more=""; \
	for g in $(GUESTS); do \
	  p=$$g; [ -f "$$p" ] || p=$(PROFILE_DIR)/$$g; \
	  more="$$more -fw_cfg name=opt/vmfork/$$i/kernel,file=$$p"; i=$$((i+1)); \
	done; \
	mkdir -p $(dir $(SOCKET)); rm -f $(SOCKET) $(SOCKET).qemu; \
	target/release/vmfork mux --upstream $(SOCKET).qemu --listen $(SOCKET) --log $(MUX_LOG) \
	  $(if $(filter 1,$(USER_SOCKET)),--user-socket) 2>>$(MUX_LOG) & mux=$$!; \
	trap 'kill $$mux 2>/dev/null' EXIT; \
	echo "vmfork mux: serving $(SOCKET) (log: $(MUX_LOG))"; \
	set -x; \
	$(QEMU) $(QEMU_MACHINE) -smp $(SMP) -m $(MEM) -nographic -semihosting \
	  -kernel $(MONITOR) $(if $(APPEND),-append "$(APPEND)") \
	  -chardev socket,id=vmfork-ctl,path=$(SOCKET).qemu,server=on,wait=off \
	  -device virtio-serial-device -device virtserialport,chardev=vmfork-ctl,name=vmfork.ctl,nr=1 \
	  $(GUEST_FWCFG) $$more $(QEMU_ARGS)

test: ensure-qemu build test-host test-qemu

# The default members (core, proto, vmfork), then the host tests of the crates that are not
# default members: the guest images' portable parts and the bench report.
test-host: ensure-toolchain
	$(CARGO) test
	$(CARGO) test -p vmfork-guests -p vmfork-bench

test-qemu: ensure-qemu build
	$(CARGO) test --release -p vmfork-tests

lint: ensure-toolchain
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --release -p vmfork-tests --all-targets -- -D warnings
	$(CARGO) clippy --release --target $(TARGET) -p vmfork-monitor -p vmfork-guests -- -D warnings

clean: ensure-toolchain
	$(CARGO) clean

# --- The Linux guest (guest-images/linux/README.md) ----------------------------------------------
#   make linux-guest        fetch Debian's arm64 kernel and busybox (cached in VMFORK_CACHE,
#                           default ~/.cache/vmfork-linux) and build target/linux/{Image,initramfs.cpio.gz}
#   make qemu-virt GUEST=linux [GUEST_CPUS=2]   boot it under the monitor (256M, console=ttyAMA0)
LINUX_OUT := target/linux

.PHONY: linux-guest
linux-guest:
	$(if $(VMFORK_CACHE),VMFORK_CACHE=$(VMFORK_CACHE)) guest-images/linux/build.sh

ifeq ($(GUEST),linux)
GUEST_NAME := $(or $(GUEST_NAME),linux)
override GUEST := $(LINUX_OUT)/Image
GUEST_INITRD := $(or $(GUEST_INITRD),$(LINUX_OUT)/initramfs.cpio.gz)
GUEST_MEM := $(or $(GUEST_MEM),256M)
GUEST_CMDLINE := $(or $(GUEST_CMDLINE),console=ttyAMA0 earlycon rdinit=/init)
qemu-virt: linux-guest
endif

# make bench: fork, COW, reset, density, fuzzing-loop and scale figures measured inside the
# monitor under QEMU -icount shift=0 (emulated time), docs/BENCHMARKS.md. Prints the table,
# writes target/bench/results.json and target/bench/bench-fork.svg. BENCH_RUNS boots (in
# parallel) that many identical runs and reports how closely they agree; BENCH_PHASES picks
# phases (fork,cow,reset,density,fuzz,scale).
BENCH_RUNS   ?= 2
BENCH_PHASES ?= all
BENCH_ARGS   ?=
.PHONY: bench
bench: ensure-qemu monitor
	$(CARGO) run --release -q -p vmfork-bench -- --qemu $(QEMU) --monitor $(MONITOR) \
	  --runs $(BENCH_RUNS) --phases $(BENCH_PHASES) --out target/bench $(BENCH_ARGS)

# --- Fuzzing (not part of `make test`) -----------------------------------------------------------
#   make fuzz FUZZ_TARGET=<target> [FUZZ_SECONDS=60] [FUZZ_ARGS='-jobs=2']
#   runs one cargo-fuzz target (fuzz/fuzz_targets) for a bounded time on the nightly toolchain,
#   installing cargo-fuzz first if it is missing. Targets: snapshot_restore, control_request,
#   kernel_image, guest_config, boot_dtb. The corpus grows in fuzz/corpus/<target>; crashes land
#   in fuzz/artifacts/<target>. `make fuzz-list` lists the targets. The same parsers get
#   ~10^5 proptest cases in `make test` (hypervisor/core/tests/parsers_fuzz.rs,
#   tools/proto/tests/parsers_fuzz.rs).
FUZZ_TARGET   ?= snapshot_restore
FUZZ_SECONDS  ?= 60
FUZZ_ARGS     ?=
FUZZ_NIGHTLY  ?= nightly
# Seed corpora kept with the sources.
FUZZ_SEEDS_boot_dtb := ../hypervisor/core/tests/fixtures
FUZZ_SEEDS_kernel_image := seeds/kernel_image

.PHONY: fuzz fuzz-list ensure-cargo-fuzz
ensure-cargo-fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) +$(FUZZ_NIGHTLY) install cargo-fuzz --locked

fuzz: ensure-cargo-fuzz
	mkdir -p fuzz/corpus/$(FUZZ_TARGET)
	cd fuzz && $(CARGO) +$(FUZZ_NIGHTLY) fuzz run -O $(FUZZ_TARGET) corpus/$(FUZZ_TARGET) \
	  $(FUZZ_SEEDS_$(FUZZ_TARGET)) -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
	  -max_len=65536 $(FUZZ_ARGS)

fuzz-list: ensure-cargo-fuzz
	cd fuzz && $(CARGO) +$(FUZZ_NIGHTLY) fuzz list
