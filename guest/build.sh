#!/usr/bin/env bash
# Builds converge's test guest from Debian's packages, which scripts/setup.sh unpacks under
# target/guest-packages without installing them:
#   OUT/vmlinuz            the linux-image-cloud-amd64 kernel
#   OUT/initramfs.cpio.gz  busybox-static, the virtio modules, and an /init that mounts /dev/vda
#   OUT/rootfs.img         an ext4 root filesystem with busybox and /sbin/init (guest/rootfs-init)
#   OUT/uefi.img           a disk laid out as cloud images are: GPT, an EFI system partition
#                          with systemd-boot, the kernel and the initramfs, and the same ext4
#                          root as partition 2. Built without loop devices, by sfdisk,
#                          mkfs.vfat and mtools.
#   OUT/installer.iso      an ISO 9660 image that UEFI boots from a CD-ROM (El Torito, the
#                          same boot loader, kernel and initramfs; the guest says it came
#                          from the CD), as installers are made; by xorriso.
# No root needed. Usage: guest/build.sh [OUT]   (default target/guest)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${1:-$here/../target/guest}
PACKAGES=${CONVERGE_GUEST_PACKAGES:-$here/../target/guest-packages}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Tests build the guest in parallel: one builds, the others wait and find it built.
exec 9>"$OUT/.lock"
flock 9
KROOT=$PACKAGES/kernel
KVER=$(ls "$KROOT/lib/modules" 2>/dev/null | grep cloud-amd64 | sort -V | tail -1)
[ -n "$KVER" ] || { echo "no cloud-amd64 kernel unpacked in $KROOT: run scripts/setup.sh" >&2; exit 1; }
MD=$KROOT/lib/modules/$KVER
BUSYBOX=$PACKAGES/busybox/bin/busybox
[ -x "$BUSYBOX" ] || { echo "no busybox-static unpacked in $PACKAGES/busybox: run scripts/setup.sh" >&2; exit 1; }
[ -f "$MD/modules.dep" ] || depmod -b "$KROOT" "$KVER"
SDBOOT=$PACKAGES/systemd-boot/usr/lib/systemd/boot/efi/systemd-bootx64.efi
[ -f "$SDBOOT" ] || { echo "no systemd-boot-efi unpacked in $PACKAGES/systemd-boot: run scripts/setup.sh" >&2; exit 1; }
stamp="$KVER $(cat "$here/initramfs-init" "$here/rootfs-init" "$here/build.sh" "$BUSYBOX" "$SDBOOT" | sha256sum | cut -c1-16)"
if [ -f "$OUT/stamp" ] && [ "$(cat "$OUT/stamp")" = "$stamp" ] && [ -f "$OUT/installer.iso" ]; then
    exit 0
fi
cp "$KROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"

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
want="kernel/drivers/virtio/virtio_pci.ko kernel/drivers/block/virtio_blk.ko kernel/drivers/acpi/button.ko kernel/drivers/input/evdev.ko kernel/fs/efivarfs/efivarfs.ko kernel/fs/fat/vfat.ko kernel/fs/nls/nls_cp437.ko kernel/fs/nls/nls_ascii.ko kernel/fs/isofs/isofs.ko kernel/drivers/net/virtio_net.ko"
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

# The UEFI disk: 1 MiB of GPT, a 40 MiB EFI system partition, the root file system after it.
esp_start=2048 esp_sectors=81920
root_start=$((esp_start + esp_sectors))
disk=$work/uefi.img
rm -f "$disk"
truncate -s 96M "$disk"
sfdisk --quiet "$disk" <<PARTITIONS
label: gpt
start=$esp_start, size=$esp_sectors, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="EFI system partition"
start=$root_start, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name="root"
PARTITIONS
esp=$work/esp.img
mkfs.vfat -C -n ESP "$esp" $((esp_sectors / 2)) >/dev/null
export MTOOLS_SKIP_CHECK=1
mmd -i "$esp" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
mcopy -i "$esp" "$SDBOOT" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$esp" "$OUT/vmlinuz" ::/vmlinuz
mcopy -i "$esp" "$OUT/initramfs.cpio.gz" ::/initrd.img
printf 'default converge.conf\ntimeout 0\n' > "$work/loader.conf"
printf 'title converge test guest\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=/dev/vda2 console=ttyS0 panic=-1\n' > "$work/converge.conf"
mcopy -i "$esp" "$work/loader.conf" ::/loader/loader.conf
mcopy -i "$esp" "$work/converge.conf" ::/loader/entries/converge.conf
dd if="$esp" of="$disk" bs=512 seek=$esp_start conv=notrunc,sparse status=none
dd if="$OUT/rootfs.img" of="$disk" bs=512 seek=$root_start conv=notrunc,sparse status=none
mv "$disk" "$OUT/uefi.img"

# The installer ISO: its El Torito boot image is a small EFI system partition of its own.
efiboot=$work/efiboot.img
mkfs.vfat -C -n EFIBOOT "$efiboot" 20480 >/dev/null
mmd -i "$efiboot" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
mcopy -i "$efiboot" "$SDBOOT" ::/EFI/BOOT/BOOTX64.EFI
mcopy -i "$efiboot" "$OUT/vmlinuz" ::/vmlinuz
mcopy -i "$efiboot" "$OUT/initramfs.cpio.gz" ::/initrd.img
printf 'default installer.conf\ntimeout 0\n' > "$work/installer-loader.conf"
mcopy -i "$efiboot" "$work/installer-loader.conf" ::/loader/loader.conf
printf 'title converge installer\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=/dev/vda console=ttyS0 panic=-1 gfrom=cdrom\n' > "$work/installer.conf"
mcopy -i "$efiboot" "$work/installer.conf" ::/loader/entries/installer.conf
iso=$work/iso
mkdir -p "$iso/boot"
cp "$efiboot" "$iso/boot/efiboot.img"
echo "converge test installer" > "$iso/README.TXT"
xorriso -as mkisofs -quiet -V CONVERGE_INSTALLER -J -R -e boot/efiboot.img -no-emul-boot \
    -o "$OUT/installer.iso" "$iso" 2>"$work/xorriso.log" || { cat "$work/xorriso.log" >&2; exit 1; }
echo "$stamp" > "$OUT/stamp"
echo "guest: built $OUT (kernel $KVER)"
