#!/usr/bin/env bash
# Installs what converge's build, tests and demo need on a fresh Debian machine.
# Idempotent: installs only what is missing.
set -euo pipefail

need=()
command -v qemu-img >/dev/null || need+=(qemu-utils)
command -v sha256sum >/dev/null || need+=(coreutils)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

command -v cargo >/dev/null || { echo "setup: cargo is missing; install a stable Rust toolchain (rustup)"; exit 1; }
echo "setup: ok"
