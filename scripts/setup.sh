#!/usr/bin/env bash
# Installs what converge's build, tests and demo need on a fresh Debian machine: QEMU, the
# guest kernel and busybox for the test guest, and the tools that build it.
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img || need+=(qemu-utils)
have qemu-system-x86_64 || need+=(qemu-system-x86)
# The guest needs the static busybox: a dynamically linked one would not run in the initramfs.
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
ls /lib/modules 2>/dev/null | grep -q cloud-amd64 || need+=(linux-image-cloud-amd64)
have cpio || need+=(cpio)
have mkfs.ext4 || need+=(e2fsprogs)
have depmod || need+=(kmod)
# The HA test cuts a node off the network with a route (`ip route ... prohibit`).
have ip || need+=(iproute2)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Debian's qemu-system-x86 takes away a qemu-utils of another release (a backport): the
  # image tools then come again, from Debian's own QEMU.
  if ! have qemu-img; then
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-utils >/dev/null
  fi
fi

# Guests' QEMU runs as this unprivileged user when the daemon runs as root.
if ! getent passwd converge-qemu >/dev/null; then
  echo "setup: adding the system user converge-qemu (guests run as it)"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin converge-qemu
fi
# It opens /dev/kvm itself: it belongs in the kvm group wherever there is one.
if getent group kvm >/dev/null && ! id -nG converge-qemu | grep -qw kvm; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO usermod -a -G kvm converge-qemu
fi

have cargo || { echo "setup: cargo is missing; install a stable Rust toolchain (rustup)"; exit 1; }
have cargo-fuzz || { echo "setup: installing cargo-fuzz"; cargo install cargo-fuzz --locked --quiet; }
"$(dirname "$0")/../guest/build.sh"
echo "setup: ok"
