#!/usr/bin/env bash
# Installs what converge's build, tests and demo need on a fresh Debian 12 machine that has
# a Rust toolchain, git, make and a C compiler: QEMU, its UEFI firmware and the image tools,
# the tools that build the test guests, a C++ compiler for cargo-fuzz. The test guest's
# kernel, busybox and boot loader are taken out of Debian's packages without installing
# them (guest/build.sh uses them), so this never touches the host's own /boot or boot
# loader.
# Idempotent: installs only what is missing, then checks every tool it needs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
have() { command -v "$1" >/dev/null 2>&1; }

# Each tool, and the Debian package that brings it.
tools=(
  qemu-img:qemu-utils
  qemu-nbd:qemu-utils
  qemu-system-x86_64:qemu-system-x86
  cpio:cpio
  mkfs.ext4:e2fsprogs
  depmod:kmod
  g++:g++
  ip:iproute2
  bridge:iproute2
  # Tests and the demo run nodes in network namespaces of their own.
  nsenter:util-linux
  dpkg-deb:dpkg
  # The UEFI test image: a GPT, a FAT EFI system partition, without loop devices.
  sfdisk:fdisk
  mkfs.vfat:dosfstools
  mcopy:mtools
  # ... and the installer ISO (UEFI El Torito).
  xorriso:xorriso
)
# Files the daemon needs, and the package that brings each: the UEFI firmware guests boot.
files=(
  /usr/share/OVMF/OVMF_CODE_4M.fd:ovmf
  /usr/share/OVMF/OVMF_VARS_4M.fd:ovmf
)
need=()
for entry in "${tools[@]}"; do
  have "${entry%%:*}" || need+=("${entry#*:}")
done
# Debian's qemu-system-x86 takes away a qemu-utils of another release (a backport): both
# come from Debian's own QEMU, in one transaction, whenever either is missing.
if [[ " ${need[*]:-} " == *" qemu-"* ]]; then need+=(qemu-utils qemu-system-x86); fi
for entry in "${files[@]}"; do
  [ -e "${entry%%:*}" ] || need+=("${entry#*:}")
done

apt_updated=
apt_update() {
  if [ -z "$apt_updated" ]; then $SUDO apt-get update -qq; apt_updated=1; fi
}
if [ ${#need[@]} -gt 0 ]; then
  need=($(printf '%s\n' "${need[@]}" | sort -u))
  apt_update
  # QEMU's tools and its system emulator come from one release: a qemu-utils of a newer one
  # (a backport) breaks Debian's qemu-system-common, and apt would rather refuse than take
  # it back. Both are asked for at the emulator's version, a downgrade if need be.
  qemu=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ { print $2 }')
  downgrade=()
  if [ -n "$qemu" ] && [ "$qemu" != "(none)" ]; then
    for i in "${!need[@]}"; do
      case ${need[$i]} in qemu-utils | qemu-system-x86) need[$i]="${need[$i]}=$qemu" ;; esac
    done
    installed=$(dpkg-query -W -f '${Version}' qemu-utils 2>/dev/null || true)
    if [ -n "$installed" ] && [ "$installed" != "$qemu" ]; then
      echo "setup: qemu-utils $installed is not of Debian's QEMU $qemu: installing both at $qemu"
      downgrade=(--allow-downgrades)
    fi
  fi
  echo "setup: installing ${need[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${downgrade[@]}" \
    "${need[@]}" >/dev/null
fi
missing=()
for entry in "${tools[@]}"; do
  have "${entry%%:*}" || missing+=("${entry%%:*} (package ${entry#*:})")
done
for entry in "${files[@]}"; do
  [ -e "${entry%%:*}" ] || missing+=("${entry%%:*} (package ${entry#*:})")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: still missing after installing: ${missing[*]}" >&2
  exit 1
fi

# The test guest's kernel (Debian's cloud kernel) and busybox-static, downloaded and
# unpacked under target/guest-packages, never installed.
packages=$root/target/guest-packages
unpack() { # $1 = package, $2 = directory to unpack into
  local package=$1 into=$packages/$2 debs=$packages/debs
  [ -f "$into/.unpacked" ] && [ "$(cat "$into/.unpacked")" = "$package" ] && return
  mkdir -p "$debs"
  if ! apt-cache show "$package" >/dev/null 2>&1; then apt_update; fi
  echo "setup: unpacking $package into $into"
  rm -f "$debs/${package}_"*.deb
  # As root, apt would download as its own user, who may not write here.
  local as=()
  [ "$(id -u)" -ne 0 ] || as=(-o APT::Sandbox::User=root)
  (cd "$debs" && apt-get download -qq "${as[@]}" "$package" >/dev/null)
  rm -rf "$into" && mkdir -p "$into"
  dpkg-deb -x "$debs/${package}_"*.deb "$into"
  echo "$package" > "$into/.unpacked"
}
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then apt_update; fi
kernel=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
[ -n "$kernel" ] || { echo "setup: apt knows no linux-image-cloud-amd64 (is this Debian?)" >&2; exit 1; }
unpack "$kernel" kernel
unpack busybox-static busybox
# The boot loader of the UEFI test image.
unpack systemd-boot-efi systemd-boot
for file in "$packages/busybox/bin/busybox" "$packages"/kernel/boot/vmlinuz-* \
    "$packages/systemd-boot/usr/lib/systemd/boot/efi/systemd-bootx64.efi"; do
  [ -s "$file" ] || { echo "setup: $file is missing after unpacking" >&2; exit 1; }
done

# Guests' QEMU runs as this unprivileged user when the daemon runs as root.
if ! getent passwd converge-qemu >/dev/null; then
  echo "setup: adding the system user converge-qemu (guests run as it)"
  $SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin converge-qemu
fi
# It opens /dev/kvm itself: it belongs in the kvm group wherever there is one.
if getent group kvm >/dev/null && ! id -nG converge-qemu | grep -qw kvm; then
  $SUDO usermod -a -G kvm converge-qemu
fi

have cargo || { echo "setup: cargo is missing; install a stable Rust toolchain (rustup)"; exit 1; }
have cargo-fuzz || { echo "setup: installing cargo-fuzz"; cargo install cargo-fuzz --locked --quiet; }
"$root/guest/build.sh"
echo "setup: ok"
