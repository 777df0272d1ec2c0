#!/usr/bin/env bash
# Stage 1 of a lab guest: a Debian tree with systemd, installed by debootstrap
# and packed into a tarball. Slow (60-100 s, CPU-bound), so the lab caches the
# tarball under a key that hashes this file, the suite and the mirror.
#
# Usage: debootstrap.sh SUITE MIRROR WORKDIR OUT_TAR
# Writes only under WORKDIR (which must be new or empty) and to OUT_TAR.
set -euo pipefail

suite=${1:?suite}
mirror=${2:?mirror}
work=${3:?workdir}
out=${4:?output tarball}

case $work in
/ | "" | /. | //*) echo "debootstrap.sh: refusing work dir '$work'" >&2; exit 2 ;;
esac
tree=${work:?}/tree
mkdir -p "$tree"
if [ -n "$(ls -A "$tree")" ]; then
  echo "debootstrap.sh: $tree is not empty" >&2
  exit 2
fi

pkgs=(systemd systemd-sysv systemd-container dbus udev kmod openssh-server
  linux-image-amd64 initramfs-tools iproute2 procps sudo busybox)
include=$(IFS=,; echo "${pkgs[*]}")

# INITRD=No: no Debian initramfs (the lab brings its own): skips mkinitramfs.
INITRD=No debootstrap --variant=minbase --include="$include" "$suite" "$tree" "$mirror" \
  >"$work/debootstrap.log" 2>&1 || {
  tail -n 40 "$work/debootstrap.log" >&2
  exit 1
}

# Never keep the host's resolver configuration in the guest.
: >"$tree/etc/resolv.conf"
# The .debs are not needed any more.
rm -rf "${tree:?}/var/cache/apt/archives/"*.deb

tar --numeric-owner --xattrs -C "$tree" -cf - . | zstd -q -T0 -3 -o "$out.tmp"
mv "$out.tmp" "$out"
