#!/usr/bin/env bash
# Builds converge's test guest from Debian's packages (scripts/setup.sh installs them):
#   OUT/vmlinuz            the linux-image-cloud-amd64 kernel
#   OUT/initramfs.cpio.gz  busybox-static, the virtio modules, and an /init that mounts /dev/vda
#   OUT/rootfs.img         an ext4 root filesystem with busybox and /sbin/init (guest/rootfs-init)
# No root needed. Usage: guest/build.sh [OUT]   (default target/guest)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$here/../target/guest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Tests build the guest in parallel: one builds, the others wait and find it built.
exec 9>"$OUT/.lock"
flock 9
KVER=$(ls /lib/modules | grep cloud-amd64 | sort -V | tail -1)
[ -n "$KVER" ] || { echo "no cloud-amd64 kernel in /lib/modules: run scripts/setup.sh" >&2; exit 1; }
MD=/lib/modules/$KVER
BUSYBOX=/bin/busybox
[ -f "$MD/modules.dep" ] || depmod "$KVER"
stamp="$KVER $(cat "$here/initramfs-init" "$here/rootfs-init" "$here/build.sh" | sha256sum | cut -c1-16)"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] && [ -f "$OUT/rootfs.img" ]; then
    exit 0
fi
cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
applets() { # $1 = root dir
    mkdir -p "$1/bin"
    cp "$BUSYBOX" "$1/bin/busybox"
    for applet in $("$BUSYBOX" --list); do [ "$applet" = busybox ] || ln -sf busybox "$1/bin/$applet"; done
    ln -sf bin "$1/sbin"
}

ir=$work/initramfs
mkdir -p "$ir"/{etc,proc,sys,dev,tmp,newroot,lib/modules/$KVER}
applets "$ir"
install -m 755 "$here/initramfs-init" "$ir/init"
want="kernel/drivers/virtio/virtio_pci.ko kernel/drivers/block/virtio_blk.ko kernel/drivers/acpi/button.ko kernel/drivers/input/evdev.ko"
declare -A seen=()
add() {
    local module=$1 dep
    [ -n "${seen[$module]:-}" ] && return
    seen[$module]=1
    for dep in $(grep "^$module:" "$MD/modules.dep" | cut -d: -f2); do add "$dep"; done
    mkdir -p "$ir/lib/modules/$KVER/$(dirname "$module")"
    case "$module" in
        *.ko.xz) xz -dc "$MD/$module" > "$ir/lib/modules/$KVER/${module%.xz}" ;;
        *.ko.zst) zstd -qdc "$MD/$module" > "$ir/lib/modules/$KVER/${module%.zst}" ;;
        *) cp "$MD/$module" "$ir/lib/modules/$KVER/$module" ;;
    esac
    grep "^$module:" "$MD/modules.dep" | sed 's/\.ko\.\(xz\|zst\)/.ko/g' >> "$ir/lib/modules/$KVER/modules.dep"
}
for module in $want; do add "$module"; done
echo "$want" | tr ' ' '\n' > "$ir/etc/modules"
( cd "$ir" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --owner=0:0 --quiet ) | gzip -1 > "$OUT/initramfs.cpio.gz"

rootfs=$work/rootfs
mkdir -p "$rootfs"/{etc,proc,sys,dev,tmp,root,var}
applets "$rootfs"
install -m 755 "$here/rootfs-init" "$rootfs/bin/init"
rm -f "$OUT/rootfs.img"
mkfs.ext4 -q -F -L converge-root -d "$rootfs" "$OUT/rootfs.img" 32M
echo "$stamp" > "$OUT/stamp"
echo "guest: built $OUT (kernel $KVER)"
