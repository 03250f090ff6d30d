#!/usr/bin/env bash
# Installs what building and testing vmfork needs, once: a quick check first, work only when
# something is missing. Used by the Makefile (every target that runs cargo or QEMU) and .ci/run.
#
#   scripts/setup.sh toolchain   the Rust toolchain pinned in rust-toolchain.toml with its target
#                                (aarch64-unknown-none) and components (rustfmt, clippy)
#   scripts/setup.sh qemu        qemu-system-aarch64 (Debian's qemu-system-arm), as root via apt-get
#   scripts/setup.sh all         both
#
# Why this exists: rustup installs nothing by itself when RUSTUP_AUTO_INSTALL=0 (and never adds a
# rust-toolchain.toml's targets to a toolchain that is already installed), so a new machine has
# no aarch64-unknown-none until something runs `rustup toolchain install`.
#
# Exit status: 0 ready, 1 something is missing and could not be installed (the message says
# what to run).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
qemu=${QEMU:-qemu-system-aarch64}
say() { echo "setup: $*" >&2; }
die() { say "$*"; exit 1; }

# The channel and target pinned in rust-toolchain.toml, read with sed so the check costs nothing.
toml=$root/rust-toolchain.toml
channel=$(sed -nE 's/^channel[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' "$toml")
target=aarch64-unknown-none
[ -n "$channel" ] || die "no channel in $toml"

# The quick check: the pinned toolchain answers (rustup picks it from rust-toolchain.toml and
# fails when it is not installed), has the bare-metal target's standard library, and has rustfmt
# and clippy. About 0.1 s.
toolchain_ready() {
    local sysroot
    sysroot=$(cd "$root" && rustc --print sysroot 2>/dev/null) || return 1
    [ -d "$sysroot/lib/rustlib/$target/lib" ] || return 1
    [ -x "$sysroot/bin/rustfmt" ] && [ -x "$sysroot/bin/cargo-clippy" ]
}

ensure_toolchain() {
    toolchain_ready && return 0
    command -v rustup >/dev/null 2>&1 || die "rustup not found. Install rustup (https://rustup.rs), then run: rustup toolchain install $channel --target $target --component rustfmt,clippy"
    say "installing Rust $channel with $target, rustfmt and clippy (rust-toolchain.toml)"
    # Inside the work tree `rustup toolchain install` with no name installs the toolchain that
    # rust-toolchain.toml names, with its targets and components (--no-self-update: a new rustup
    # home would otherwise try to replace rustup itself). Its exit status is not the
    # verdict (it fails on harmless post-install checks, e.g. a CARGO_HOME without rustup in
    # it): the check below is.
    (cd "$root" && RUST_BACKTRACE=0 rustup toolchain install --no-self-update) >&2 || true
    if ! toolchain_ready; then
        # An already installed toolchain keeps its old target list: add what is missing.
        (cd "$root" && export RUST_BACKTRACE=0 && rustup target add --toolchain "$channel" "$target" &&
            rustup component add --toolchain "$channel" rustfmt clippy) >&2 || true
    fi
    toolchain_ready || die "Rust $channel with $target, rustfmt and clippy is still missing. Run: rustup toolchain install $channel --target $target --component rustfmt,clippy"
    say "Rust ready: $(cd "$root" && rustc --version)"
}

ensure_qemu() {
    command -v "$qemu" >/dev/null 2>&1 && return 0
    command -v apt-get >/dev/null 2>&1 || die "$qemu not found and there is no apt-get: install QEMU's aarch64 system emulator (7.2 or newer)"
    local sudo=()
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
            sudo=(sudo -n)
        else
            die "$qemu not found. Install it with: sudo apt-get install -y qemu-system-arm"
        fi
    fi
    say "$qemu not found: installing qemu-system-arm"
    "${sudo[@]}" apt-get update -qq </dev/null >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-arm </dev/null >&2
    command -v "$qemu" >/dev/null 2>&1 || die "installed qemu-system-arm but $qemu is still not on PATH"
}

case "${1:-all}" in
    toolchain) ensure_toolchain ;;
    qemu) ensure_qemu ;;
    all) ensure_toolchain; ensure_qemu ;;
    check) toolchain_ready ;;
    *) die "usage: scripts/setup.sh [toolchain|qemu|all]" ;;
esac
