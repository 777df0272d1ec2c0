#!/usr/bin/env bash
# Stage 2 of a lab guest: configure the stage-1 tree for fast test boots and
# turn it into a qcow2 disk, an uncompressed kernel (booted through PVH) and a
# tiny busybox initrd. No loop mounts; every write stays under WORKDIR.
#
# Usage: image.sh STAGE1_TAR WORKDIR PUBKEY_FILE
# Writes WORKDIR/{base.qcow2,vmlinux,initrd.img,host_ed25519.pub,systemd-version}.
set -euo pipefail

stage1=${1:?stage-1 tarball}
work=${2:?workdir}
pubkey=${3:?public key file}

case $work in
/ | "" | /. | //*) echo "image.sh: refusing work dir '$work'" >&2; exit 2 ;;
esac
root=${work:?}/tree
if [ -e "$root" ]; then
  echo "image.sh: $root exists already" >&2
  exit 2
fi
mkdir -p "$root"
zstd -q -dc "$stage1" | tar --numeric-owner --xattrs -xpf - -C "$root"
[ -x "$root/sbin/init" ] || { echo "image.sh: no /sbin/init in $root" >&2; exit 1; }

# All paths below are "$root/..." with root non-empty and not "/".
etc=${root:?}/etc
sysd=$etc/systemd/system

# Nothing of the host's: no resolver, no root line in fstab (systemd would wait
# for dev-vda.device), a fixed machine-id (clones share it).
: >"$etc/resolv.conf"
echo '# lab guest: the root file system is mounted by the initrd' >"$etc/fstab"
printf '%s\n' 0b5e1fda7ac4e5c0ffee000000000001 >"$etc/machine-id"
echo lab >"$etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tlab\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$etc/hosts"

# Users: root, deploy (passwordless sudo), sudopw (sudo asks for the password
# "lab-password"), nosudo (no sudo rights). All log in with the lab key.
for u in deploy sudopw nosudo; do
  chroot "$root" useradd --create-home --shell /bin/bash "$u"
  chroot "$root" usermod --password '*' "$u"
done
echo 'sudopw:lab-password' | chroot "$root" chpasswd
echo 'deploy ALL=(ALL) NOPASSWD: ALL' >"$etc/sudoers.d/lab-deploy"
echo 'sudopw ALL=(ALL) ALL' >"$etc/sudoers.d/lab-sudopw"
chmod 0440 "$etc/sudoers.d/lab-deploy" "$etc/sudoers.d/lab-sudopw"
for home in root home/deploy home/sudopw home/nosudo; do
  install -d -m 0700 "$root/$home/.ssh"
  install -m 0600 "$pubkey" "$root/$home/.ssh/authorized_keys"
done
for u in deploy sudopw nosudo; do
  chroot "$root" chown -R "$u:$u" "/home/$u/.ssh"
done

# sshd: keys only, no DNS, room for multiplexed sessions; started without
# waiting for network.target and without the `sshd -t` pre-check.
cat >"$etc/ssh/sshd_config.d/lab.conf" <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UseDNS no
MaxSessions 64
MaxStartups 64:30:128
CONF
cat >"$sysd/ssh.service" <<'UNIT'
[Unit]
Description=OpenBSD Secure Shell server (lab)
ConditionPathExists=!/etc/ssh/sshd_not_to_be_run

[Service]
ExecStart=/usr/sbin/sshd -D
ExecReload=/bin/kill -HUP $MAINPID
KillMode=process
Restart=on-failure
RestartPreventExitStatus=255
Type=notify
RuntimeDirectory=sshd
RuntimeDirectoryMode=0755

[Install]
WantedBy=multi-user.target
UNIT
mkdir -p "$sysd/multi-user.target.wants"
ln -sfn /etc/systemd/system/ssh.service "$sysd/multi-user.target.wants/ssh.service"
rm -f "$sysd/sshd.service" "$sysd/sockets.target.wants/ssh.socket"

# Static address for QEMU user networking instead of systemd-networkd.
cat >"$sysd/lab-net.service" <<'UNIT'
[Unit]
Description=Static address for QEMU user networking (lab)
DefaultDependencies=no
Wants=sys-subsystem-net-devices-eth0.device
After=sys-subsystem-net-devices-eth0.device
Before=network.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/ip link set lo up
ExecStart=/sbin/ip link set eth0 up
ExecStart=/sbin/ip addr replace 10.0.2.15/24 dev eth0
ExecStart=/sbin/ip route replace default via 10.0.2.2

[Install]
WantedBy=multi-user.target
UNIT
ln -sfn /etc/systemd/system/lab-net.service "$sysd/multi-user.target.wants/lab-net.service"

# Units that cost boot time or do nothing useful in a throwaway guest.
for unit in systemd-firstboot.service systemd-networkd.service systemd-networkd.socket \
  systemd-networkd-wait-online.service apt-daily.timer apt-daily-upgrade.timer \
  e2scrub_all.timer e2scrub_reap.service fstrim.timer man-db.timer dpkg-db-backup.timer \
  getty@.service serial-getty@.service systemd-pstore.service; do
  ln -sfn /dev/null "$sysd/$unit"
done

# Smaller image: no docs, no Debian initramfs (the lab brings its own), no
# modules for hardware a QEMU guest does not have.
rm -rf "${root:?}/usr/share/doc/"* "${root:?}/usr/share/man/"* "${root:?}/usr/share/info/"*
rm -f "${root:?}/boot/initrd.img"* "${root:?}/initrd.img" "${root:?}/initrd.img.old"
kver=$(ls "$root/lib/modules" | sort -V | tail -n 1)
kmod=${root:?}/lib/modules/${kver:?}/kernel
for d in sound drivers/gpu drivers/media drivers/infiniband drivers/usb drivers/iio \
  drivers/hwmon drivers/staging drivers/isdn drivers/bluetooth drivers/mmc drivers/nfc \
  drivers/net/wireless drivers/net/ethernet drivers/net/can drivers/net/usb \
  net/wireless net/mac80211 net/bluetooth; do
  rm -rf "${kmod:?}/$d"
done
chroot "$root" depmod -a "$kver"

# Kernel: the uncompressed ELF out of the bzImage (PVH boot, no decompression
# under TCG). Same search as the kernel's scripts/extract-vmlinux.
bz=$root/boot/vmlinuz-$kver
try_decompress() { # magic-as-tr-set search-marker command...
  local magic=$1 marker=$2
  shift 2
  local pos
  for pos in $(tr "$magic\n$marker" "\n$marker=" <"$bz" | grep -abo "^$marker" | cut -d: -f1); do
    tail -c+"$pos" "$bz" | "$@" >"$work/vmlinux" 2>/dev/null || true
    if [ "$(head -c4 "$work/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ]; then
      return 0
    fi
  done
  return 1
}
try_decompress '\037\213\010' xy gunzip ||
  try_decompress '\3757zXZ\000' abcde unxz ||
  try_decompress '(\265/\375' xxx unzstd ||
  { echo "image.sh: cannot extract vmlinux from $bz" >&2; exit 1; }

# Tiny initrd: static busybox, the block/fs modules, an /init that mounts
# /dev/vda and switches root.
ird=$work/initrd
mkdir -p "$ird/bin" "$ird/dev" "$ird/proc" "$ird/newroot" "$ird/lib/modules"
cp /bin/busybox "$ird/bin/busybox"
: >"$ird/modules"
for m in virtio_pci virtio_blk crc32c_generic ext4; do
  chroot "$root" modprobe --show-depends --set-version "$kver" "$m" 2>/dev/null |
    awk '$1 == "insmod" { print $2 }' | while read -r ko; do
    name=$(basename "$ko")
    name=${name%.xz}
    name=${name%.zst}
    grep -qx "$name" "$ird/modules" && continue
    case $ko in
    *.xz) xz -dc "$root$ko" >"$ird/lib/modules/$name" ;;
    *.zst) zstd -q -dc "$root$ko" >"$ird/lib/modules/$name" ;;
    *) cp "$root$ko" "$ird/lib/modules/$name" ;;
    esac
    echo "$name" >>"$ird/modules"
  done
done
cat >"$ird/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t proc proc /proc
for m in $(/bin/busybox cat /modules); do
  /bin/busybox insmod "/lib/modules/$m" 2>/dev/null
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do /bin/busybox usleep 20000; i=$((i + 1)); done
if ! /bin/busybox mount -t ext4 -o rw /dev/vda /newroot; then
  echo "lab initrd: cannot mount /dev/vda" >/dev/console
  /bin/busybox sleep 5
  /bin/busybox poweroff -f
fi
/bin/busybox umount /proc
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
INIT
chmod 0755 "$ird/init"
(cd "$ird" && find . | sort | cpio --quiet -o -H newc -R 0:0) >"$work/initrd.img"
rm -rf "${ird:?}"

cp "$etc/ssh/ssh_host_ed25519_key.pub" "$work/host_ed25519.pub"
chroot "$root" systemctl --version | head -n 1 >"$work/systemd-version"

mkfs.ext4 -q -F -L lab-root -d "$root" "$work/root.raw" 4G
qemu-img convert -O qcow2 "$work/root.raw" "$work/base.qcow2"
rm -f "$work/root.raw"
rm -rf "${root:?}"
