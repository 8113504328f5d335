#!/usr/bin/env bash
# Builds the VM tier's boot image — a Debian arm64 kernel and a base initramfs
# with the TPM driver Debian leaves out — and caches it by content hash.
#
# usage: scripts/fleet/vm-image.sh [--arch arm64] [--cache DIR] [--refresh]
#
# Prints, on stdout, shell assignments for the caller to eval:
#   KERNEL=DIR/vmlinuz  INITRD=DIR/base.cpio.gz  KVER=6.1.0-N-arm64  IMAGE_KEY=sha256
# (progress goes to stderr). Only arm64 is built so far.
#
# Cache: --cache, default ${XDG_CACHE_HOME:-~/.cache}/iotagent-fleet.
#   apt-arm64/  private apt lists for arm64 (no `dpkg --add-architecture`:
#               nothing foreign is installed on the host, .debs are only
#               downloaded and unpacked with dpkg-deb -x)
#   debs/       the downloaded .debs (about 210 MB, mostly linux-source-6.1)
#   img/KEY/    vmlinuz, base.cpio.gz, inputs (what KEY was made of), build.log
# KEY = sha256 of the package versions, this script and the module sources,
# so a second run with the same inputs only hashes and prints (seconds). The
# apt lists are refreshed only when missing or with --refresh, so a cached
# run works offline.
#
# Steps and what each needs:
#   1. host tools, apt-installed when missing: qemu-system-arm (provides
#      qemu-system-aarch64), gcc-aarch64-linux-gnu, make, cpio, xz-utils.
#   2. the kernel: the linux-image-6.1.0-N-arm64 whose version equals the
#      linux-source-6.1 candidate, its headers (-arm64, -common) and the
#      host's linux-kbuild-6.1 of that version (amd64 modpost/fixdep).
#   3. tpm_tis.ko built out of tree from linux-source-6.1's drivers/char/tpm:
#      Debian's arm64 kernel has CONFIG_TCG_TIS unset (notes/fleet.md), so
#      QEMU's tpm-tis-device has no driver. tpm_tis_core.ko is built too when
#      the image does not ship it. The modules are unsigned; the kernel loads
#      them with a taint.
#   4. the base initramfs: static busybox (busybox-static:arm64), the modules
#      with their dependencies, and /init (below). It has no agent: the boot
#      script appends a small gzip'd cpio with /iotagent (and optionally
#      /fleet-init) per run — concatenated gzip'd cpio archives are one
#      initramfs to the kernel, so the agent can change without a rebuild.
#
# The guest's /init: mounts proc/sys/devtmpfs, loads the modules, brings up
# eth0 as 10.0.2.15/24 via 10.0.2.2 (QEMU user networking), prints
# "FLEET-USERSPACE <uptime>" on the console, then runs /fleet-init if present,
# otherwise `/iotagent ARGS` with ARGS from the kernel command line
# (iotagent.args="..."). Output is framed by FLEET-BEGIN / FLEET-END rc=N
# lines, then the guest powers off.
set -euo pipefail

arch=arm64
cache="${XDG_CACHE_HOME:-$HOME/.cache}/iotagent-fleet"
refresh=0
while [ $# -gt 0 ]; do
	case "$1" in
	--arch) arch="$2"; shift 2 ;;
	--cache) cache="$2"; shift 2 ;;
	--refresh) refresh=1; shift ;;
	-h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "vm-image: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
[ "$arch" = arm64 ] || { echo "vm-image: --arch $arch is not built yet (only arm64)" >&2; exit 2; }

say() { echo "vm-image: $*" >&2; }
die() { echo "vm-image: $*" >&2; exit 1; }
self="$(readlink -f "$0")"
t0=$(date +%s.%N)
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# 1. Host tools.
need=()
command -v qemu-system-aarch64 >/dev/null || need+=(qemu-system-arm)
command -v aarch64-linux-gnu-gcc >/dev/null || need+=(gcc-aarch64-linux-gnu)
command -v make >/dev/null || need+=(make)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
if [ ${#need[@]} -gt 0 ]; then
	say "installing ${need[*]}"
	SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
	{ $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"; } >&2 ||
		die "could not install ${need[*]} (apt-get install ${need[*]})"
fi

# 2. Resolve versions, from a private arm64 apt state in the cache.
mkdir -p "$cache/apt-arm64/lists/partial" "$cache/apt-arm64/archives/partial" "$cache/debs" "$cache/img"
A=(-o Dir::State::Lists="$cache/apt-arm64/lists" -o Dir::Cache="$cache/apt-arm64"
	-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o Dir::State::status=/dev/null)
if [ "$refresh" = 1 ] || ! ls "$cache/apt-arm64/lists/"*Packages* >/dev/null 2>&1; then
	say "fetching arm64 package lists"
	apt-get "${A[@]}" update -qq 2>&1 | grep -v 'unsandboxed' >&2 || true
	ls "$cache/apt-arm64/lists/"*Packages* >/dev/null 2>&1 || die "apt-get update for arm64 failed"
fi
field() { awk -v f="$1:" '!d && $1 == f { print $2; d = 1 }'; }
srcver=$(apt-cache show linux-source-6.1 2>/dev/null | field Version)
[ -n "$srcver" ] || die "no linux-source-6.1 in apt (apt-get update?)"
kver=""
for p in $(apt-cache "${A[@]}" pkgnames linux-image-6.1.0- | grep -E '^linux-image-6\.1\.0-[0-9]+-arm64$' | sort -t- -k4,4nr); do
	if apt-cache "${A[@]}" show "$p" 2>/dev/null | grep -x "Version: $srcver" >/dev/null; then kver=${p#linux-image-}; break; fi
done
[ -n "$kver" ] || die "no linux-image-6.1.0-*-arm64 at version $srcver (the linux-source-6.1 candidate)"
abi=${kver%-arm64}
bbver=$(apt-cache "${A[@]}" show busybox-static 2>/dev/null | field Version)
[ -n "$bbver" ] || die "no busybox-static for arm64 in apt"

# KEY: the versions, this script; the module sources are fixed by srcver and
# hashed after unpacking into inputs for the record.
inputs="arch=$arch
kernel=linux-image-$kver $srcver
headers=linux-headers-$kver linux-headers-$abi-common linux-kbuild-6.1 $srcver
source=linux-source-6.1 $srcver
busybox=busybox-static:arm64 $bbver
compiler=$(aarch64-linux-gnu-gcc -dumpfullversion)
script=$(sha256sum "$self" | cut -d' ' -f1)"
key=$(printf '%s\n' "$inputs" | sha256sum | cut -d' ' -f1)
out="$cache/img/$key"
if [ -s "$out/vmlinuz" ] && [ -s "$out/base.cpio.gz" ]; then
	say "cached image $out ($(elapsed) s)"
	printf 'KERNEL=%s\nINITRD=%s\nKVER=%s\nIMAGE_KEY=%s\n' "$out/vmlinuz" "$out/base.cpio.gz" "$kver" "$key"
	exit 0
fi
say "building image $key for $kver (cold: downloads ~210 MB, then a module build)"

# Download (kept in debs/ across keys).
fetch() { # fetch APTOPTS... -- PKG=VER...
	local opts=() pkgs=() p f
	while [ "$1" != -- ]; do opts+=("$1"); shift; done; shift
	for p in "$@"; do
		f=$(ls "$cache/debs/${p%%=*}_"*.deb 2>/dev/null | grep -F "$(echo "${p#*=}" | sed 's/^[0-9]*://')_" | head -1 || true)
		[ -n "$f" ] || pkgs+=("$p")
	done
	[ ${#pkgs[@]} -eq 0 ] && return 0
	say "downloading ${pkgs[*]}"
	(cd "$cache/debs" && apt-get "${opts[@]}" download "${pkgs[@]}" 2>&1 | grep -v unsandboxed >&2) || true
	for p in "${pkgs[@]}"; do ls "$cache/debs/${p%%=*}_"*.deb >/dev/null 2>&1 || die "apt-get download $p failed"; done
}
fetch "${A[@]}" -- "linux-image-$kver=$srcver" "linux-headers-$kver=$srcver" "busybox-static=$bbver"
fetch "${A[@]}" -- "linux-headers-$abi-common=$srcver"
fetch -- "linux-kbuild-6.1=$srcver" "linux-source-6.1=$srcver"
deb() { ls "$cache/debs/$1_"*"$(echo "$2" | sed 's/^[0-9]*://')"_*.deb | head -1; }

W=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$W"' EXIT
R="$W/root"
mkdir -p "$R"
for p in "linux-image-$kver" "linux-headers-$kver" "linux-headers-$abi-common" linux-kbuild-6.1; do
	dpkg-deb -x "$(deb "$p" "$srcver")" "$R"
done
dpkg-deb -x "$(deb busybox-static "$bbver")" "$W/bb"
mods="$R/lib/modules/$kver"
[ -f "$R/boot/vmlinuz-$kver" ] || die "no /boot/vmlinuz-$kver in linux-image-$kver"
grep -q '^# CONFIG_TCG_TIS is not set' "$R/boot/config-$kver" || say "note: CONFIG_TCG_TIS is set in $kver; building anyway"

# 3. Module sources: only drivers/char/tpm out of the 140 MB tarball.
say "unpacking drivers/char/tpm from linux-source-6.1"
dpkg-deb --fsys-tarfile "$(deb linux-source-6.1 "$srcver")" | tar -x -C "$W" --wildcards './usr/src/linux-source-6.1.tar.xz'
tar -xJf "$W/usr/src/linux-source-6.1.tar.xz" -C "$W" --wildcards 'linux-source-6.1/drivers/char/tpm/*'
rm -rf "$W/usr"
src="$W/linux-source-6.1/drivers/char/tpm"
have_core=$(find "$mods" -name 'tpm_tis_core.ko*' | head -1)
objs="tpm_tis.o"; [ -n "$have_core" ] || objs="tpm_tis_core.o tpm_tis.o"
mkdir -p "$W/mod"
cp "$src"/tpm_tis.c "$src"/tpm_tis_core.c "$src"/*.h "$W/mod/"
echo "obj-m := $objs" >"$W/mod/Kbuild"
inputs="$inputs
modsrc=$(cd "$W/mod" && cat tpm_tis.c tpm_tis_core.c tpm_tis_core.h tpm.h | sha256sum | cut -d' ' -f1)"
say "building $objs for $kver"
# The headers' Makefile includes the -common one by absolute path; point it into the unpacked tree.
sed -i "s|/usr/src/|$R/usr/src/|" "$R/usr/src/linux-headers-$kver/Makefile"
make -C "$R/usr/src/linux-headers-$kver" M="$W/mod" ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu- modules >"$W/build.log" 2>&1 ||
	die "module build failed: $(tail -20 "$W/build.log")"
[ -f "$W/mod/tpm_tis.ko" ] || die "module build made no tpm_tis.ko: $(tail -20 "$W/build.log")"

# 4. Base initramfs.
I="$W/initramfs"
mkdir -p "$I"/{bin,dev,proc,sys,tmp,etc,lib/modules,var/lib/iotagent}
cp "$W/bb/bin/busybox" "$I/bin/busybox"
for a in sh mount ip insmod poweroff cat sleep ls mkdir dmesg uptime echo sed tr grep; do ln -s busybox "$I/bin/$a"; done
# Modules in load order: each one's dependencies first, read from the
# .modinfo section (the host may have no kmod, and its modinfo is no help with xz).
depends() {
	local k="$W/dep.ko"
	case "$1" in *.xz) xz -dc "$1" >"$k" ;; *) cp "$1" "$k" ;; esac
	aarch64-linux-gnu-objcopy -O binary --only-section=.modinfo "$k" "$W/dep.info"
	tr '\0' '\n' <"$W/dep.info" | sed -n 's/^depends=//p' | tr , ' '
}
declare -A seen=()
order=()
modpath() { # the .ko for a module name, from the build or the image
	local n=$1 f
	for f in "$W/mod/$n.ko" "$W/mod/${n//-/_}.ko"; do [ -f "$f" ] && { echo "$f"; return; }; done
	find "$mods/kernel" \( -name "$n.ko*" -o -name "${n//_/-}.ko*" \) | head -1
}
builtin() { grep -qE "/(${1}|${1//_/-})\.ko\$" "$mods/modules.builtin"; }
add() {
	local n=$1 f d
	[ -n "${seen[$n]:-}" ] && return 0
	seen[$n]=1
	builtin "$n" && return 0
	f=$(modpath "$n")
	[ -n "$f" ] || die "module $n not found in $kver"
	for d in $(depends "$f"); do add "$d"; done
	order+=("$f")
}
for n in virtio_mmio virtio_net tpm_tis_core tpm_tis; do add "$n"; done
: >"$I/etc/modules"
for f in "${order[@]}"; do
	b=$(basename "$f")
	case "$b" in
	*.ko.xz) xz -dc "$f" >"$I/lib/modules/${b%.xz}"; b=${b%.xz} ;;
	*.ko.zst) zstd -qdc "$f" >"$I/lib/modules/${b%.zst}"; b=${b%.zst} ;;
	*) cp "$f" "$I/lib/modules/$b" ;;
	esac
	echo "$b" >>"$I/etc/modules"
done
say "modules: $(tr '\n' ' ' <"$I/etc/modules")"
cat >"$I/init" <<'EOF'
#!/bin/sh
# iotagent fleet VM init (scripts/fleet/vm-image.sh).
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in $(cat /etc/modules); do insmod /lib/modules/$m || echo "FLEET-WARN insmod $m failed"; done
ip link set lo up
ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 ||
	echo "FLEET-WARN eth0 not configured"
echo "FLEET-USERSPACE $(cut -d' ' -f1 /proc/uptime)"
args=$(sed -n 's/.*iotagent\.args="\([^"]*\)".*/\1/p' /proc/cmdline)
[ -n "$args" ] || args=$(sed -n 's/.*iotagent\.args=\([^ ]*\).*/\1/p' /proc/cmdline | tr , ' ')
echo "FLEET-BEGIN"
if [ -x /fleet-init ]; then
	/fleet-init
elif [ -x /iotagent ]; then
	/iotagent $args
else
	echo "no /iotagent and no /fleet-init in the initramfs"; false
fi
echo "FLEET-END rc=$?"
poweroff -f
EOF
chmod 755 "$I/init"

mkdir -p "$W/out"
cp "$R/boot/vmlinuz-$kver" "$W/out/vmlinuz"
(cd "$I" && find . | sort | cpio -o -H newc --reproducible -R 0:0 2>/dev/null | gzip -9n) >"$W/out/base.cpio.gz"
printf '%s\n' "$inputs" >"$W/out/inputs"
cp "$W/build.log" "$W/out/build.log"
elapsed >"$W/out/build-seconds"
rm -rf "$out" && mv "$W/out" "$out"
say "built $out in $(elapsed) s (initramfs $(du -k "$out/base.cpio.gz" | cut -f1) KiB)"
printf 'KERNEL=%s\nINITRD=%s\nKVER=%s\nIMAGE_KEY=%s\n' "$out/vmlinuz" "$out/base.cpio.gz" "$kver" "$key"
