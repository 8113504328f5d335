#!/usr/bin/env bash
# Benchmarks, reported and never asserted: this machine is shared and noisy,
# so every figure is a median of several runs, and comparisons are made
# side by side in one run.
#
# usage: scripts/bench.sh [SECTION...] [COUNT]
#   SECTION: core (TPM, station, enrollment, queue, telemetry, CoAP/DTLS,
#   the agent at 1000 records/s, binary sizes) and firmware (issue 11:
#   the bytes firmware adds to the armv7 agent, the agent's RSS while it
#   downloads a 20 MiB release, download throughput vs curl); default both.
#   COUNT: runs of each benchmark (default 6: benchstat needs 6 for a
#   confidence interval).
# Output: a benchstat summary (medians with their spread) in bench.out,
# then the sizes and, for firmware, a table of its figures.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"
COUNT=6
sections=()
for a in "$@"; do
	case "$a" in
	core | firmware) sections+=("$a") ;;
	'' | *[!0-9]*) echo "bench.sh: unknown section $a (want core, firmware, or a run count)" >&2; exit 2 ;;
	*) COUNT=$a ;;
	esac
done
[ ${#sections[@]} -gt 0 ] || sections=(core firmware)
want() { [[ " ${sections[*]} " == *" $1 "* ]]; }
BENCHSTAT="golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da"
out=bench.out
raw=$(mktemp)
work=$(mktemp -d)
trap 'rm -rf "$raw" "$work"' EXIT

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m), $(go version | cut -d' ' -f3); sections: ${sections[*]}" | tee "$out"

run() { # run PACKAGE REGEXP BENCHTIME [TEST BINARY FLAG...]
	echo "--- go test -bench '$2' $1 ${*:4}" >&2
	local log
	log=$(mktemp)
	# A benchmark that fails stops the run: a figure silently missing from
	# the summary would read as measured.
	if ! go test -run - -bench "$2" -benchtime "$3" -count "$COUNT" -timeout 60m "$1" -args "${@:4}" >"$log" 2>&1; then
		cat "$log" >&2
		rm -f "$log"
		echo "bench.sh: a benchmark of $1 failed" >&2
		exit 1
	fi
	cat "$log" >>"$raw"
	grep -E '^Benchmark|_test.go:' "$log" >&2 || true
	rm -f "$log"
}
if want core; then
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
fi

# The bytes firmware (issue 11) adds to the stripped armv7 agent. Method:
# the agent built as the issue asks (CGO_ENABLED=0 GOARCH=arm GOARM=7 go
# build -trimpath -ldflags "-s -w") from this tree and from the commit
# before firmware was wired into the agent (the parent of the commit that
# added agent/firmware.go, found again at every run). Everything the
# firmware code pulls in counts (its packages, regexp, the TPM counter's
# commands, pclntab), which no sum of symbols from go tool nm captures: nm
# names some 60% of the delta. Two figures, as a stripped file
# grows by whole 64 KiB segments: the file size, and the bytes the
# segments load (PT_LOAD file sizes). At a later HEAD the delta also holds
# whatever else the agent gained since that commit: the per-package
# breakdown of named symbols (unstripped builds, go tool nm) shows where
# the bytes went.
fw_size() {
	local first base
	first=$(git log --diff-filter=A --format=%H -- agent/firmware.go | tail -1)
	base=$(git rev-parse --short "$first^")
	mkdir -p "$work/base"
	git archive "$base" | tar -x -C "$work/base"
	build() { # build DIR OUT [STRIP]
		(cd "$1" && env CGO_ENABLED=0 GOOS=linux GOARCH=arm GOARM=7 go build -trimpath -buildvcs=false ${3:+-ldflags "-s -w"} -o "$2" ./cmd/iotagent)
	}
	build . "$work/head" strip
	build "$work/base" "$work/base.bin" strip
	build . "$work/head.full"
	build "$work/base" "$work/base.full"
	loaded() { readelf -lW "$1" | awk '$1 == "LOAD" { print $5 }' | while read -r h; do echo $((h)); done | awk '{ s += $1 } END { print s }'; }
	local hs bs hl bl
	hs=$(stat -c %s "$work/head") bs=$(stat -c %s "$work/base.bin")
	hl=$(loaded "$work/head") bl=$(loaded "$work/base.bin")
	{
		echo "--- firmware: stripped armv7 agent, $(git describe --always --dirty) vs $base (before $(git rev-parse --short "$first"), which wired firmware into the agent)"
		printf '%-28s %12s %12s %12s\n' "" "HEAD" "$base" "delta"
		printf '%-28s %12d %12d %+12d\n' "file bytes" "$hs" "$bs" $((hs - bs))
		printf '%-28s %12d %12d %+12d\n' "loaded bytes (PT_LOAD)" "$hl" "$bl" $((hl - bl))
		echo "named symbols by package, the largest changes (go tool nm -size, unstripped):"
		for b in base head; do
			go tool nm -size "$work/$b.full" | awk '
				{
					size = $2; n = $4; for (i = 5; i <= NF; i++) n = n " " $i
					sub(/^type:\**/, "", n); sub(/^\.eq\./, "", n); sub(/^go:itab\.\**/, "", n)
					if (n ~ /^go:/ || n !~ /^[a-zA-Z0-9_\/.-]+\./) { sums["(go:func.*,go:string.*,anonymous-types)"] += size; next }
					b = index(n, "["); if (b) n = substr(n, 1, b - 1)
					# The package: up to the first dot after the last slash.
					p = n; s = 0
					while ((k = index(p, "/")) > 0) { s += k; p = substr(p, k + 1) }
					sums[substr(n, 1, s + index(p, ".") - 1)] += size
				}
				END { for (p in sums) print p, sums[p] }' | sort >"$work/$b.pkg"
		done
		join -a1 -a2 -e0 -o 0,1.2,2.2 "$work/base.pkg" "$work/head.pkg" |
			awk '{ d = $3 - $2; if (d != 0) print d, $1 }' >"$work/pkg.delta"
		sort -rn "$work/pkg.delta" | head -12 | awk '{ printf "  %+9d  %s\n", $1, $2 }'
		awk '{ t += $1 } END { printf "  %+9d  (all named symbols)\n", t }' "$work/pkg.delta"
	} | tee -a "$out" >&2
	size_file=$((hs - bs)) size_loaded=$((hl - bl)) size_head=$hs size_base=$bs
}

if want firmware; then
	fw_size
	# The agent process downloading, verifying and staging a 20 MiB
	# release from the station after a minute of telemetry: RSS steady vs
	# peak (a full minute each run: three runs, as AgentSteady1000;
	# FW_STEADY and FW_RSS_COUNT change them).
	COUNT=${FW_RSS_COUNT:-3} run ./cmd/iotagent 'FirmwareUpdateRSS' 1x -fwbench.steady="${FW_STEADY:-1m}"
	# The agent's Downloader vs curl on the same payload from the same
	# station over loopback mTLS, alternated fetch by fetch.
	run ./cmd/iotagent 'FirmwareFetch' 10x
fi

go run "$BENCHSTAT" "$raw" | tee -a "$out"

if want core; then
	# Binary sizes.
	scripts/crossbuild.sh armv7 arm64 | tee -a "$out"
fi

# med BENCHMARK UNIT: the median of UNIT over the runs of BENCHMARK.
med() {
	awk -v b="$1" -v u="$2" '$1 ~ "^" b "(-[0-9]+)?$" { for (i = 3; i < NF; i += 2) if ($(i + 1) == u) print $i }' "$raw" |
		sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "?"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
if want firmware; then
	rss=BenchmarkFirmwareUpdateRSS fetch=BenchmarkFirmwareFetch
	{
		echo
		echo "=== firmware (issue 11): medians; MB = 10^6 bytes (benchstat above prints them in binary units, Mi);"
		echo "    RSS of ${FW_RSS_COUNT:-3} runs after ${FW_STEADY:-1m} of telemetry each, throughput of $COUNT runs of 10 fetches each"
		printf '%-46s %-60s %s\n' figure measured goal
		printf '%-46s %-60s %s\n' "bytes added to the stripped armv7 agent" \
			"$(printf '%+d file (%d vs %d), %+d loaded' "$size_file" "$size_head" "$size_base" "$size_loaded")" "<= 0.5 MB"
		printf '%-46s %-60s %s\n' "agent RSS steady (VmRSS: anon + file)" \
			"$(med $rss steady-RSS-MB) MB ($(med $rss steady-anon-MB) + $(med $rss steady-file-MB))" ""
		printf '%-46s %-60s %s\n' "agent RSS peak, 20 MiB download+verify+stage" \
			"$(med $rss peak-RSS-MB) MB (VmHWM; top sample $(med $rss peak-anon-MB) + $(med $rss peak-file-MB))" ""
		printf '%-46s %-60s %s\n' "  peak above steady" "$(med $rss above-steady-MB) MB" "<= 2 MB"
		printf '%-46s %-60s %s\n' "agent process download (TPM-keyed mTLS)" "$(med $rss agent-MB/s) MB/s" ""
		printf '%-46s %-60s %s\n' "Downloader vs curl, loopback mTLS, 20 MiB" \
			"$(med $fetch downloader-MB/s) vs $(med $fetch curl-MB/s) MB/s: ratio $(med $fetch downloader/curl)" "reported"
		printf '%-46s %-60s %s\n' "  Downloader saving its resume point once" "$(med $fetch downloader-saved-once-MB/s) MB/s" ""
	} | tee -a "$out"
fi
echo "wrote $out"
