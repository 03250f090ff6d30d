#!/usr/bin/env bash
# Builds the Linux guest from Debian trixie's arm64 packages (see README.md beside this file):
#   target/linux/Image              the kernel (a raw arm64 Image, from linux-image-<abi>-arm64-unsigned)
#   target/linux/initramfs.cpio.gz  busybox-static plus an /init script
#
# Downloads go through a private arm64 apt configuration under the cache directory
# ($VMFORK_CACHE, default ~/.cache/vmfork-linux); the host's apt state is never touched. Once the
# two .deb files are in the cache a run makes no network request.
#
# Exit status: 0 built (or already up to date), 2 the packages could not be fetched (no network
# or no apt), 1 anything else.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
cache=${VMFORK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vmfork-linux}
out=${VMFORK_LINUX_OUT:-$root/target/linux}
suite=${VMFORK_DEBIAN_SUITE:-trixie}

say() { echo "linux-guest: $*" >&2; }
fetch_failed() { say "cannot fetch packages: $*"; exit 2; }

# The Debian mirror the host already uses (deb822 or one-line sources), else deb.debian.org.
mirror() {
    local m
    m=$(grep -hsE '^URIs:[[:space:]]+https?://[^[:space:]]*/debian/?$' /etc/apt/sources.list.d/*.sources |
        head -n1 | awk '{print $2}')
    if [ -z "$m" ]; then
        m=$(grep -hsE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?https?://[^[:space:]]*/debian/?[[:space:]]' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.list | head -n1 |
            sed -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' | awk '{print $1}')
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

debs=$cache/debs
apt_dir=$cache/apt
mkdir -p "$debs"

cached() { compgen -G "$debs/$1" >/dev/null; }

if cached 'linux-image-*-arm64-unsigned_*_arm64.deb' && cached 'busybox-static_*_arm64.deb'; then
    say "using cached packages in $debs"
else
    command -v apt-get >/dev/null || fetch_failed "apt-get not found"
    mkdir -p "$apt_dir/state/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/etc"
    : >"$apt_dir/state/status"
    keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    [ -r "$keyring" ] || fetch_failed "$keyring missing (apt-get install debian-archive-keyring)"
    echo "deb [arch=arm64 signed-by=$keyring] $(mirror) $suite main" >"$apt_dir/etc/sources.list"
    apt_opts=(
        -o APT::Architecture=arm64 -o APT::Architectures=arm64
        -o Dir::State="$apt_dir/state" -o Dir::State::status="$apt_dir/state/status"
        -o Dir::Cache="$apt_dir/cache"
        -o Dir::Etc::SourceList="$apt_dir/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null
        -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts=/dev/null
        -o APT::Sandbox::User=root -o Acquire::Retries=3
    )
    say "apt-get update ($suite arm64, private state in $apt_dir)"
    apt-get "${apt_opts[@]}" -qq update || fetch_failed "apt-get update failed"
    # The meta package names the current ABI: Depends: linux-image-<abi>-arm64 (= ...).
    abi_pkg=$(apt-cache "${apt_opts[@]}" depends linux-image-arm64 2>/dev/null |
        sed -nE 's/^[[:space:]]*Depends: (linux-image-[0-9][^[:space:]]*-arm64)$/\1/p' | head -n1)
    [ -n "$abi_pkg" ] || fetch_failed "linux-image-arm64 names no linux-image-<abi>-arm64"
    say "kernel package ${abi_pkg}-unsigned"
    (cd "$debs" && apt-get "${apt_opts[@]}" -q download "${abi_pkg}-unsigned" busybox-static) ||
        fetch_failed "apt-get download failed"
fi

kernel_deb=$(ls -t "$debs"/linux-image-*-arm64-unsigned_*_arm64.deb | head -n1)
busybox_deb=$(ls -t "$debs"/busybox-static_*_arm64.deb | head -n1)
mkdir -p "$out"

if [ ! -s "$out/Image" ] || [ "$kernel_deb" -nt "$out/Image" ]; then
    say "extracting the kernel from $(basename "$kernel_deb")"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    dpkg-deb --fsys-tarfile "$kernel_deb" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*'
    img=$(ls "$tmp"/boot/vmlinuz-* | head -n1)
    # A raw arm64 Image carries the magic "ARM\x64" at offset 56 (arm64 booting.rst).
    [ "$(dd if="$img" bs=1 skip=56 count=4 2>/dev/null)" = $'ARM\x64' ] ||
        { say "$(basename "$img") is not a raw arm64 Image"; exit 1; }
    cp "$img" "$out/Image.tmp" && mv "$out/Image.tmp" "$out/Image"
    basename "$img" | sed 's/^vmlinuz-//' >"$out/kernel-release"
    rm -rf "$tmp"
    trap - EXIT
fi

if [ ! -s "$out/initramfs.cpio.gz" ] || [ "$busybox_deb" -nt "$out/initramfs.cpio.gz" ] ||
    [ "$here/init" -nt "$out/initramfs.cpio.gz" ] || [ "$here/build.sh" -nt "$out/initramfs.cpio.gz" ]; then
    say "building the initramfs from $(basename "$busybox_deb")"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    dpkg-deb -x "$busybox_deb" "$tmp/deb"
    rootfs=$tmp/root
    mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
    bb=
    for f in "$tmp"/deb/usr/bin/busybox "$tmp"/deb/bin/busybox; do [ -x "$f" ] && bb=$f && break; done
    [ -n "$bb" ] || { say "no busybox in $(basename "$busybox_deb")"; exit 1; }
    cp "$bb" "$rootfs/bin/busybox"
    install -m 0755 "$here/init" "$rootfs/init"
    # The applets init and the shell need; the rest are linked by `busybox --install` at boot.
    for a in sh mount umount mkdir dmesg grep setsid cttyhack poweroff reboot sleep cat echo ls; do
        ln -s busybox "$rootfs/bin/$a"
    done
    # cpio "newc" written by a few lines of Python, so the host needs no cpio package. Entries
    # are owned by root, and the device nodes come from devtmpfs at boot.
    python3 - "$rootfs" "$out/initramfs.cpio.gz.tmp" <<'PY'
import gzip, os, stat, sys
src, dst = sys.argv[1], sys.argv[2]
ino = 1
def entry(out, name, st, data):
    global ino
    hdr = "070701" + "".join("%08X" % v for v in (
        ino, st, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0))
    ino += 1
    out.write(hdr.encode() + name.encode() + b"\0")
    out.write(b"\0" * (-(110 + len(name) + 1) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))
with gzip.open(dst, "wb", compresslevel=9) as out:
    for d, dirs, files in os.walk(src):
        dirs.sort()
        for n in [None] + sorted(files) + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = d if n is None else os.path.join(d, n)
            rel = os.path.relpath(p, src)
            if rel == ".":
                continue
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                entry(out, rel, stat.S_IFLNK | 0o777, os.readlink(p).encode())
            elif stat.S_ISDIR(st.st_mode):
                entry(out, rel, stat.S_IFDIR | 0o755, b"")
            else:
                with open(p, "rb") as f:
                    entry(out, rel, stat.S_IFREG | (st.st_mode & 0o777), f.read())
    entry(out, "TRAILER!!!", 0, b"")
PY
    mv "$out/initramfs.cpio.gz.tmp" "$out/initramfs.cpio.gz"
    rm -rf "$tmp"
    trap - EXIT
fi

say "ready: $out/Image ($(cat "$out/kernel-release" 2>/dev/null || echo '?')) and $out/initramfs.cpio.gz"
