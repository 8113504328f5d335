#!/usr/bin/env bash
# Benchmarks, reported and never asserted: this machine is shared and noisy,
# so every figure is a median of several runs, and comparisons are made
# side by side in one run.
#
# usage: scripts/bench.sh [COUNT]     (default 6 runs of each benchmark: benchstat needs 6 for a confidence interval)
# Output: a benchstat summary (medians with their spread) in bench.out.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
COUNT=${1:-6}
BENCHSTAT="golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da"
out=bench.out
raw=$(mktemp)
trap 'rm -f "$raw"' EXIT

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m), $(go version | cut -d' ' -f3)" | tee "$out"

run() { # run PACKAGE REGEXP BENCHTIME
	echo "--- go test -bench '$2' $1" >&2
	local log
	log=$(mktemp)
	# A benchmark that fails stops the run: a figure silently missing from
	# the summary would read as measured.
	if ! go test -run - -bench "$2" -benchtime "$3" -count "$COUNT" "$1" >"$log" 2>&1; then
		cat "$log" >&2
		rm -f "$log"
		echo "bench.sh: a benchmark of $1 failed" >&2
		exit 1
	fi
	cat "$log" >>"$raw"
	grep -E '^Benchmark' "$log" >&2 || true
	rm -f "$log"
}
# TPM: signature; TLS 1.3 mutual handshake, TPM key vs software key.
run ./tpm . 2s
# Station: /tpmenroll and /simplereenroll throughput; enrollment wall time.
run ./station . 2s
run ./enroll . 20x
# Queue: appends and drains.
run ./store . 1s
# Telemetry: ingest→queue→MQTT→subscriber vs raw paho QoS 1 (same broker,
# same run); TPM signatures per reconnect.
run ./telemetry/mqtt 'IngestToSubscriber|RawPahoQoS1' 10x
run ./telemetry/mqtt 'ReconnectTPMSignatures' 5x
# CoAP/DTLS: records/s at 0% and 10% loss, datagrams per 1000 records,
# wire bytes per record vs MQTT/JSON; DTLS handshake TPM vs software key.
run ./telemetry/coap . 10x
run ./dtls . 10x
# Agent process at 1000 records/s: disk bytes per record, RSS.
COUNT=3 run ./cmd/iotagent 'AgentSteady1000' 1x

go run "$BENCHSTAT" "$raw" | tee -a "$out"

# Binary sizes.
scripts/crossbuild.sh armv7 arm64 | tee -a "$out"
echo "wrote $out"
