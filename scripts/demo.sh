#!/usr/bin/env bash
# The whole flow on one machine: a provisioning station, an MQTT broker and
# three gateways, each with its own TPM (swtpm). The gateways enroll
# themselves (zero-touch, TPM attestation), stream host/SLI telemetry and
# readings, rotate short-lived certificates with new TPM keys, and ride
# through a broker restart. At the end: a table per device; then a firmware
# rollout of a new agent release to the three gateways in two waves, each
# gateway running it on trial and committing it (its TPM counter raised).
#
# usage: scripts/demo.sh [--duration 2m] [--keep]
#        DEMO_BROKER=embedded scripts/demo.sh   (the embedded broker even
#        where mosquitto is installed)
#   --coap      the gateways use the CoAP-over-DTLS uplink; the station's
#               collector republishes into MQTT for the watcher
#   --duration  how long the gateways stream (default 100s; the demo ends
#               within about a minute more)
#   --keep      keep the working directory (printed) for inspection
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/tpm-mfr.sh
export PATH="$PATH:/usr/local/go/bin"

DURATION=100
KEEP=0
COAP=0
while [ $# -gt 0 ]; do
	case "$1" in
	--duration) DURATION=$(( $(sed -E 's/m$/*60/; s/s$//' <<<"$2") )); shift 2 ;;
	--keep) KEEP=1; shift ;;
	--coap) COAP=1; shift ;;
	*) echo "demo: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
	esac
done
DEVICES=3
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

# swtpm is what the gateways' TPMs are; install it if missing.
if ! command -v swtpm >/dev/null || ! command -v swtpm_setup >/dev/null; then
	say "installing swtpm"
	SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
	$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq swtpm swtpm-tools >/dev/null ||
		die "could not install swtpm (apt-get install swtpm swtpm-tools)"
fi
command -v go >/dev/null || die "Go 1.26 is needed to build (https://go.dev/dl)"

W=$(mktemp -d /tmp/iotagent-demo.XXXX)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	if [ "$KEEP" = 1 ]; then echo "kept $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
bg() { "$@" & PIDS+=($!); }
port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])' 2>/dev/null ||
	echo $((20000 + RANDOM % 20000)); }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
	local n=$(($1 * 10)) what=$2; shift 2
	until "$@" >/dev/null 2>&1; do n=$((n - 1)); [ $n -gt 0 ] || die "timed out waiting for $what"; sleep 0.1; done
}

say "building iotagent and iotstation (and iotagent 1.1.0, the release rolled out at the end)"
STAMP=iotagent.dev/iotagent/internal/buildinfo.version
go build -ldflags "-X $STAMP=1.0.0" -o "$W/bin/" ./cmd/iotagent ./cmd/iotstation
mkdir -p "$W/release"
go build -ldflags "-X $STAMP=1.1.0" -o "$W/release/iotagent" ./cmd/iotagent
export PATH="$W/bin:$PATH"

say "manufacturing $DEVICES TPMs with EK certificates (swtpm_setup, local manufacturer CA)"
mfr_init "$W/mfr"
for i in $(seq 1 $DEVICES); do
	mfr_tpm "$W/mfr" "$W/gw$i/tpm" "$W/gw$i/swtpm_setup.log" ||
		die "swtpm_setup failed: $(tail -3 "$W/gw$i/swtpm_setup.log")"
	bg swtpm socket --tpm2 --tpmstate dir="$W/gw$i/tpm" --flags not-need-init,startup-clear \
		--server type=unixio,path="$W/gw$i/tpm.sock" --ctrl type=unixio,path="$W/gw$i/tpm.sock.ctrl" >"$W/gw$i/swtpm.log" 2>&1
done

say "station: CA, EST enrollment with TPM attestation (certificates live 60 s, to watch rotation)"
SP=$(port)
BP=$(port)
CP=$(port)
# The CRL hook reloads mosquitto whenever crl.pem changes (it reads its
# crlfile only at start and on SIGHUP); the embedded broker reads the file
# itself.
iotstation init --dir "$W/station" --san 127.0.0.1 --cert-lifetime 60s --auto-approve \
	--tpm-roots "$W/mfr/ca/swtpm-localca-rootca-cert.pem" --tpm-roots "$W/mfr/ca/issuercert.pem" \
	--crl-hook "[ ! -s '$W/broker.pid' ] || kill -HUP \"\$(cat '$W/broker.pid')\"" \
	--nudge-broker "mqtts://127.0.0.1:$BP"
COAP_FLAGS=()
if [ "$COAP" = 1 ]; then
	# The collector republishes what arrives over CoAP into the broker.
	COAP_FLAGS=(--coap-listen "127.0.0.1:$CP" --coap-mqtt "mqtts://127.0.0.1:$BP")
fi
bg iotstation serve --dir "$W/station" --listen "127.0.0.1:$SP" "${COAP_FLAGS[@]}" 2>"$W/station.log"
wait_for 10 "the station" test -S "$W/station/admin.sock"
FP=$(iotstation fingerprint --dir "$W/station")

say "firmware keys: an offline root, a signing key, the key list installed at the station"
ROOT_PUB=$(iotstation firmware root init --out "$W/offline" 2>/dev/null)
SIGN_PUB=$(iotstation firmware key new --out "$W/offline/signing.key")
iotstation firmware keys sign --root "$W/offline/root.key" --signing "$SIGN_PUB" --version 1 --out "$W/keylist-1.json" >/dev/null
iotstation firmware keys install --dir "$W/station" "$W/keylist-1.json"

say "broker"
iotstation issue --dir "$W/station" --name fleet-reader --out "$W/reader" >/dev/null
# DEMO_BROKER=embedded uses the embedded broker even where mosquitto exists.
if command -v mosquitto >/dev/null && [ "${DEMO_BROKER:-}" != embedded ]; then
	BROKER=mosquitto
	iotstation issue --dir "$W/station" --name broker --server --san 127.0.0.1 --out "$W/broker" >/dev/null
	cat >"$W/acl" <<'EOF'
user fleet-reader
topic read devices/#
pattern write devices/%u/telemetry
pattern readwrite devices/%u/status
pattern read devices/%u/cmd
user coap-collector
topic write devices/+/telemetry
user iotstation-firmware
topic write devices/+/cmd
EOF
	cat >"$W/mosquitto.conf" <<EOF
per_listener_settings false
allow_anonymous false
listener $BP 127.0.0.1
cafile $W/broker-ca.pem
certfile $W/broker.crt
keyfile $W/broker.key
require_certificate true
use_identity_as_username true
use_username_as_clientid true
crlfile $W/station/crl.pem
acl_file $W/acl
persistence true
persistence_location $W/
max_queued_messages 100000
log_dest file $W/mosquitto.log
EOF
	[ "$(id -u)" -ne 0 ] || echo "user root" >>"$W/mosquitto.conf"
	start_broker() { mosquitto -c "$W/mosquitto.conf" 2>>"$W/mosquitto.err" & BROKER_PID=$!; PIDS+=($BROKER_PID); echo "$BROKER_PID" >"$W/broker.pid"; }
else
	BROKER="iotstation demo-broker (mosquitto is not installed; the embedded broker is for the demo only)"
	start_broker() { iotstation demo-broker --dir "$W/station" --listen "127.0.0.1:$BP" --reader-first >>"$W/broker.log" 2>&1 & BROKER_PID=$!; PIDS+=($BROKER_PID); }
fi
echo "using $BROKER on 127.0.0.1:$BP"
start_broker
wait_for 10 "the broker" bash -c "exec 3<>/dev/tcp/127.0.0.1/$BP"

say "fleet watcher: subscribes to devices/# and accounts for every sequence number"
# A persistent session: the broker keeps queueing for the watcher while it
# reconnects after the broker restart, so it misses nothing the gateways
# delivered.
bg iotstation watch --persistent --broker "mqtts://127.0.0.1:$BP" --cert "$W/reader.crt" --key "$W/reader.key" --ca "$W/reader-ca.pem" \
	--json "$W/watch.json" >"$W/watch.out" 2>"$W/watch.log"
WATCH_PID=$!

if [ "$COAP" = 1 ]; then
	UPLINK="coaps://127.0.0.1:$CP"
	say "gateways: zero-touch enrollment, then telemetry over CoAP/DTLS (Connection ID, sealed sessions) with their TPM keys"
else
	UPLINK="mqtts://127.0.0.1:$BP"
	say "gateways: zero-touch enrollment, then telemetry over MQTT/TLS with their TPM keys"
fi
for i in $(seq 1 $DEVICES); do
	cat >"$W/gw$i/config.toml" <<EOF
tpm = "unix:$W/gw$i/tpm.sock"
state_dir = "$W/gw$i/state"
[station]
url = "https://127.0.0.1:$SP"
fingerprint = "$FP"
[uplink]
url = "$UPLINK"
keepalive = "10s"
[queue]
max_bytes = "8MiB"
[ingest]
socket = "$W/gw$i/run/ingest.sock"
[collectors]
interval = "5s"
[firmware]
root_keys = ["$ROOT_PUB"]
poll_interval = "30s"
EOF
	bg iotagent run --config "$W/gw$i/config.toml" 2>"$W/gw$i/agent.log"
	GWPID[$i]=$!
done
for i in $(seq 1 $DEVICES); do
	# Ingest opens at once; the certificate comes with the first enrollment.
	wait_for 60 "gateway $i to open its ingest socket" test -S "$W/gw$i/run/ingest.sock"
	wait_for 60 "gateway $i to enroll" test -f "$W/gw$i/state/cert.pem"
	echo "gw$i: $(iotagent --config "$W/gw$i/config.toml" status | head -1)"
done

say "streaming for ${DURATION}s: each gateway sends a reading every 50 ms"
for i in $(seq 1 $DEVICES); do
	(
		end=$((SECONDS + DURATION)); n=0
		while [ $SECONDS -lt $end ]; do
			printf '[{"bn":"gw%d/","n":"temp","u":"Cel","v":%d.%d},{"n":"seq","v":%d}]\n' "$i" $((18 + RANDOM % 8)) $((RANDOM % 10)) $n
			n=$((n + 1)); sleep 0.05
		done
	) | iotagent --config "$W/gw$i/config.toml" send - >"$W/gw$i/send.out" 2>"$W/gw$i/send.err" &
	PIDS+=($!)
done
sleep $((DURATION / 2))
say "restarting the broker mid-stream (down 5 s)"
kill "$BROKER_PID"; wait "$BROKER_PID" 2>/dev/null || true
sleep 5
start_broker
sleep $((DURATION - DURATION / 2))

say "draining: waiting for every queue to empty"
sleep 2
for i in $(seq 1 $DEVICES); do
	wait_for 60 "gateway $i's queue to drain" bash -c \
		"iotagent --config '$W/gw$i/config.toml' status --json | grep -q '\"queue_depth\": 0,'"
done
sleep 2
cp "$W"/gw*/run/status.json "$W" 2>/dev/null || true
for i in $(seq 1 $DEVICES); do cp "$W/gw$i/run/status.json" "$W/gw$i/status.final.json"; done
kill -INT "$WATCH_PID"; wait "$WATCH_PID" 2>/dev/null || true

say "result"
printf '%-22s %-9s %-10s %-10s %-13s %-10s %-10s %-5s\n' device enrolled rotations ingested acknowledged received duplicates lost
total_lost=0
for i in $(seq 1 $DEVICES); do
	id=$(sed -n 's/.*"device_id": "\([^"]*\)".*/\1/p' "$W/gw$i/state/enrollment.json")
	ing=$(sed -n 's/.*"records_ingested":\([0-9]*\).*/\1/p' "$W/gw$i/status.final.json")
	ack=$(sed -n 's/.*"records_delivered":\([0-9]*\).*/\1/p' "$W/gw$i/status.final.json")
	rot=$(sed -n 's/.*"renewals": \([0-9]*\).*/\1/p' "$W/gw$i/state/renewal.json")
	rec=$(awk -v id="$id" '$1 == id {print $4}' "$W/watch.out")
	dup=$(awk -v id="$id" '$1 == id {print $5}' "$W/watch.out")
	lost=$((ing - ${rec:-0}))
	total_lost=$((total_lost + lost))
	printf '%-22s %-9s %-10s %-10s %-13s %-10s %-10s %-5s\n' "$id" yes "${rot:-0}" "${ing:-?}" "${ack:-?}" "${rec:-0}" "${dup:-0}" "$lost"
done
echo
if [ "$COAP" = 1 ]; then
	echo "ingested: records the gateway queued (readings and its own telemetry); acknowledged: answered 2.04"
	echo "by the collector (after republishing them to the broker); received: distinct sequence numbers the"
	echo "fleet watcher saw on MQTT; lost = ingested - received."
else
	echo "ingested: records the gateway queued (readings and its own telemetry); acknowledged: PUBACKed by"
	echo "the broker; received: distinct sequence numbers the fleet watcher saw; lost = ingested - received."
fi
[ "$total_lost" -eq 0 ] || die "$total_lost records lost"
echo "nothing lost."

say "firmware: iotagent 1.1.0 published and rolled out in two waves (34%, 100%)"
ARCH=$(iotagent version --json | sed -n 's/.*"goarch": "\([^"]*\)".*/\1/p')
[ "$ARCH" != arm ] || ARCH=armv$(iotagent version --json | sed -n 's/.*"goarm": "\([0-9]\).*/\1/p')
iotstation firmware publish --dir "$W/station" --file "$W/release/iotagent" --name iotagent --type agent \
	--version 1.1.0 --svn 1 --hw "linux/$ARCH" --key "$W/offline/signing.key"
iotstation firmware rollout create --dir "$W/station" --release iotagent@1.1.0 --all --waves 34%,100% --wave-wait 5m
wait_for 240 "the rollout to finish" bash -c "iotstation firmware rollout status --dir '$W/station' r1 --json | grep -q '\"state\": \"done\"'"
iotstation firmware rollout status --dir "$W/station" r1 --devices
echo
printf '%-22s %-9s %-10s %-12s %-8s\n' device running committed tpm-counter pid
for i in $(seq 1 $DEVICES); do
	id=$(sed -n 's/.*"device_id": "\([^"]*\)".*/\1/p' "$W/gw$i/state/enrollment.json")
	wait_for 30 "gateway $i's status" bash -c "iotagent --config '$W/gw$i/config.toml' firmware status --json | grep -q '\"running\": \"1.1.0\"'"
	fw=$(iotagent --config "$W/gw$i/config.toml" firmware status --json)
	run=$(echo "$fw" | sed -n 's/.*"running": "\([^"]*\)".*/\1/p')
	com=$(echo "$fw" | sed -n 's/.*"committed": "\([^"]*\)".*/\1/p')
	ctr=$(echo "$fw" | sed -n 's/.*"counter": \([0-9]*\).*/\1/p')
	pid=$(echo "$fw" | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
	printf '%-22s %-9s %-10s %-12s %-8s\n' "$id" "$run" "$com" "${ctr:-?}" "$pid"
	[ "$com" = 1.1.0 ] || die "gateway $i did not commit 1.1.0"
	[ "$pid" = "${GWPID[$i]}" ] || die "gateway $i runs as pid $pid, not the pid ${GWPID[$i]} it started with"
done
echo "every gateway runs 1.1.0, committed after its trial, exec'd in the process it started as (the same pid)."
