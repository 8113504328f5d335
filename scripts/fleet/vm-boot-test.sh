#!/usr/bin/env bash
# Boots one arm64 VM of the fleet's VM tier and checks that the agent inside
# sees the TPM: `iotagent --tpm /dev/tpmrm0 tpm info --json` must report the
# swtpm (manufacturer IBM) and its EK certificates issued by the local
# manufacturer CA. Exits 0 only then.
#
# usage: scripts/fleet/vm-boot-test.sh [--cache DIR] [--keep]
#
# Steps and what each needs:
#   1. scripts/fleet/vm-image.sh: kernel + base initramfs, cached (see there).
#   2. the agent: CGO_ENABLED=0 GOARCH=arm64 go build ./cmd/iotagent, put in
#      a small gzip'd cpio as /iotagent and appended to the base initramfs.
#   3. a TPM manufactured like scripts/demo.sh does (swtpm_setup with
#      swtpm_localca: EK certificates, platform certificate), served by
#      `swtpm socket --tpm2 --ctrl type=unixio,...` and attached to QEMU as
#      tpm-tis-device. swtpm/swtpm-tools are apt-installed when missing.
#   4. qemu-system-aarch64 -M virt -cpu cortex-a53 -accel tcg -smp 1 -m 160,
#      sealed user networking (restrict=on; one guestfwd 10.0.2.100:PORT to
#      a listener on the host's loopback, as the fleet's services will be).
#      The guest prints the JSON between FLEET-BEGIN and FLEET-END on the
#      serial console and powers off.
#   5. a second boot with a /fleet-init hook (busybox nc): the guest must
#      reach the listener through guestfwd and must not reach 10.0.2.2.
# Prints: image lookup time (and the cold build time recorded in the cache),
# boot-to-userspace (guest uptime, and host wall time from QEMU start), the
# whole run, and the VM's peak RSS.
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib/tpm-mfr.sh
export PATH="$PATH:/usr/local/go/bin"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/iotagent-fleet"
keep=0
while [ $# -gt 0 ]; do
	case "$1" in
	--cache) cache="$2"; shift 2 ;;
	--keep) keep=1; shift ;;
	-h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) echo "vm-boot-test: unknown argument $1 (see --help)" >&2; exit 2 ;;
	esac
done
say() { echo "vm-boot-test: $*" >&2; }
die() { echo "vm-boot-test: FAIL: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

if ! command -v swtpm >/dev/null || ! command -v swtpm_setup >/dev/null; then
	say "installing swtpm"
	SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
	{ $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq swtpm swtpm-tools; } >&2 ||
		die "could not install swtpm (apt-get install swtpm swtpm-tools)"
fi
command -v jq >/dev/null || die "jq is needed to check the guest's JSON (apt-get install jq)"

W=$(mktemp -d /tmp/iotagent-vm.XXXXXX)
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	if [ "$keep" = 1 ]; then say "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT

# 1. Image.
t=$(now)
img=$(scripts/fleet/vm-image.sh --cache "$cache") || die "scripts/fleet/vm-image.sh failed"
eval "$img"
image_s=$(since "$t")
cold_s=$(cat "$(dirname "$KERNEL")/build-seconds" 2>/dev/null || echo "?")

# 2. Agent, appended to the base initramfs.
t=$(now)
mkdir -p "$W/agent"
CGO_ENABLED=0 GOOS=linux GOARCH=arm64 go build -trimpath -ldflags "-s -w" -o "$W/agent/iotagent" ./cmd/iotagent
(cd "$W/agent" && echo iotagent | cpio -o -H newc -R 0:0 2>/dev/null | gzip -1) >"$W/agent.cpio.gz"
cat "$INITRD" "$W/agent.cpio.gz" >"$W/initrd.gz"
agent_s=$(since "$t")

# 3. TPM with EK certificates from a local manufacturer CA.
t=$(now)
mfr_init "$W/mfr"
mfr_tpm "$W/mfr" "$W/tpm" "$W/swtpm_setup.log" ||
	die "swtpm_setup: $(tail -3 "$W/swtpm_setup.log")"
swtpm socket --tpm2 --tpmstate dir="$W/tpm" --ctrl type=unixio,path="$W/tpm.ctrl" --terminate \
	--log file="$W/swtpm.log" &
pids+=($!)
for _ in $(seq 50); do [ -S "$W/tpm.ctrl" ] && break; sleep 0.1; done
[ -S "$W/tpm.ctrl" ] || die "swtpm did not create $W/tpm.ctrl"
tpm_s=$(since "$t")

# A loopback listener for the sealed network's one way out.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
while True:
    c, _ = s.accept()
    with open(sys.argv[2], "ab") as f:
        f.write(c.recv(256))
    c.close()' "$port" "$W/received" &
pids+=($!)
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done

# 4. Boot.
args="--tpm /dev/tpmrm0 --state-dir /var/lib/iotagent tpm info --json"
: >"$W/console.log"
t=$(now)
timeout 180 qemu-system-aarch64 -M virt -cpu cortex-a53 -accel tcg,tb-size=32 -smp 1 -m 160 -nographic -no-reboot \
	-kernel "$KERNEL" -initrd "$W/initrd.gz" \
	-append "console=ttyAMA0 quiet loglevel=1 panic=-1 iotagent.args=\"$args\"" \
	-chardev socket,id=chrtpm,path="$W/tpm.ctrl" -tpmdev emulator,id=tpm0,chardev=chrtpm \
	-device tpm-tis-device,tpmdev=tpm0 \
	-netdev user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:$port-tcp:127.0.0.1:$port \
	-device virtio-net-device,netdev=n0 \
	-monitor none -serial file:"$W/console.log" </dev/null >"$W/qemu.out" 2>&1 &
qpid=$!
hwm=0 up_wall=""
while kill -0 "$qpid" 2>/dev/null; do
	# timeout's child is QEMU.
	q=$(pgrep -P "$qpid" qemu-system-aar 2>/dev/null | head -1 || true)
	if [ -n "$q" ]; then
		h=$(awk '/^VmHWM:/ { print $2 }' "/proc/$q/status" 2>/dev/null || echo 0)
		[ "${h:-0}" -gt "$hwm" ] && hwm=$h
	fi
	[ -z "$up_wall" ] && grep -q FLEET-USERSPACE "$W/console.log" 2>/dev/null && up_wall=$(since "$t")
	sleep 0.1
done
wait "$qpid" && qrc=0 || qrc=$?
run_s=$(since "$t")
[ -z "$up_wall" ] && grep -q FLEET-USERSPACE "$W/console.log" 2>/dev/null && up_wall="<$run_s"
tr -d '\r' <"$W/console.log" >"$W/console.txt"
[ "$qrc" = 0 ] || die "qemu exited $qrc: $(tail -5 "$W/qemu.out") — console tail: $(tail -15 "$W/console.txt")"
up_guest=$(sed -n 's/.*FLEET-USERSPACE \([0-9.]*\).*/\1/p' "$W/console.txt")
[ -n "$up_guest" ] || die "guest never reached userspace; console tail: $(tail -20 "$W/console.txt")"
grep FLEET-WARN "$W/console.txt" >&2 || true

sed -n '/^FLEET-BEGIN$/,/^FLEET-END/p' "$W/console.txt" | sed '1d;$d' >"$W/info.json"
rc=$(sed -n 's/^FLEET-END rc=//p' "$W/console.txt")
[ "$rc" = 0 ] || die "iotagent tpm info exited ${rc:-?} in the guest: $(cat "$W/info.json")"
jq -e '
	.tpm == "/dev/tpmrm0" and .manufacturer == "IBM" and
	(.ek_certificates | length) >= 1 and
	all(.ek_certificates[]; (.issuer | length) > 0 and (.error // "") == "" and (.not_after | length) > 0)
' "$W/info.json" >/dev/null || die "unexpected tpm info: $(cat "$W/info.json")"
issuer=$(jq -r '.ek_certificates[0].issuer' "$W/info.json")

# 5. Network and the /fleet-init hook, in a second boot: the guest reaches
# the host listener only through guestfwd; 10.0.2.2 (the host) is sealed off.
cat >"$W/agent/fleet-init" <<INIT
#!/bin/sh
# nc waits for a close that a guestfwd chardev does not pass on: stop it.
(echo via-guestfwd | busybox nc 10.0.2.100 $port) & sleep 2; kill \$! 2>/dev/null
(echo via-host | busybox nc 10.0.2.2 $port) & sleep 2; kill \$! 2>/dev/null
INIT
chmod 755 "$W/agent/fleet-init"
(cd "$W/agent" && printf 'iotagent\nfleet-init\n' | cpio -o -H newc -R 0:0 2>/dev/null | gzip -1) >"$W/agent2.cpio.gz"
cat "$INITRD" "$W/agent2.cpio.gz" >"$W/initrd2.gz"
t=$(now)
timeout 120 qemu-system-aarch64 -M virt -cpu cortex-a53 -accel tcg,tb-size=32 -smp 1 -m 160 -nographic -no-reboot \
	-kernel "$KERNEL" -initrd "$W/initrd2.gz" -append "console=ttyAMA0 quiet loglevel=1 panic=-1" \
	-netdev user,id=n0,restrict=on,guestfwd=tcp:10.0.2.100:$port-tcp:127.0.0.1:$port \
	-device virtio-net-device,netdev=n0 \
	-monitor none -serial file:"$W/console2.log" </dev/null >"$W/qemu2.out" 2>&1 ||
	die "second boot: qemu failed: $(tail -5 "$W/qemu2.out")"
net_s=$(since "$t")
tr -d '\r' <"$W/console2.log" >"$W/console2.txt"
grep -q via-guestfwd "$W/received" ||
	die "guest could not reach the host listener through guestfwd: $(tail -10 "$W/console2.txt")"
! grep -q via-host "$W/received" ||
	die "guest reached the host directly at 10.0.2.2 (restrict=on not sealing): $(tail -10 "$W/console2.txt")"

echo "vm-boot-test: OK — network sealed: guestfwd 10.0.2.100:$port reaches the host listener, 10.0.2.2 does not (second boot via /fleet-init, ${net_s} s)"
echo "vm-boot-test: OK — guest /dev/tpmrm0: $(jq -r '"\(.manufacturer) \(.model) fw \(.firmware)"' "$W/info.json"), EK certs: $(jq -r '[.ek_certificates[] | "\(.key_type)@\(.nv_index)"] | join(", ")' "$W/info.json") (issuer $issuer)"
printf '%-34s %s\n' \
	"image (vm-image.sh, this run)" "${image_s} s  (cold build recorded: ${cold_s} s, key ${IMAGE_KEY:0:12})" \
	"agent build + append" "${agent_s} s  (agent $(du -k "$W/agent/iotagent" | cut -f1) KiB, initrd $(du -k "$W/initrd.gz" | cut -f1) KiB)" \
	"TPM manufacture + swtpm start" "${tpm_s} s" \
	"boot to userspace (guest uptime)" "${up_guest} s" \
	"boot to userspace (host wall)" "${up_wall:-?} s" \
	"QEMU start to power-off" "${run_s} s" \
	"VM peak RSS (VmHWM)" "$((hwm / 1024)) MiB"
