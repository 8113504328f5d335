#!/usr/bin/env bash
# Builds the static, stripped agent for every supported gateway target:
#   dist/iotagent-linux-{armv6,armv7,arm64,amd64}, dist/SHA256SUMS
# and prints a size table. The version, commit and commit time come from git.
#
# usage: scripts/crossbuild.sh [TARGET...]    (default: all four)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(armv6 armv7 arm64 amd64)

version=$(git describe --tags --always --dirty 2>/dev/null || echo dev)
commit=$(git rev-parse --verify -q HEAD || echo unknown)
# The commit time, not the wall clock, so a rebuild is byte-identical; the
# agent also uses it as the lowest plausible "now" (clock floor).
stamp=$(git log -1 --format=%ct 2>/dev/null || date +%s)
pkg=iotagent.dev/iotagent/internal/buildinfo
ldflags="-s -w -X $pkg.version=$version -X $pkg.commit=$commit -X $pkg.buildTime=$stamp"

mkdir -p dist
for t in "${targets[@]}"; do
	case "$t" in
	armv6) env=(GOARCH=arm GOARM=6) ;;
	armv7) env=(GOARCH=arm GOARM=7) ;;
	arm64) env=(GOARCH=arm64) ;;
	amd64) env=(GOARCH=amd64) ;;
	*) echo "crossbuild: unknown target $t (want armv6, armv7, arm64, amd64)" >&2; exit 2 ;;
	esac
	env CGO_ENABLED=0 GOOS=linux "${env[@]}" go build -trimpath -buildvcs=false \
		-ldflags "$ldflags" -o "dist/iotagent-linux-$t" ./cmd/iotagent
done

(cd dist && sha256sum iotagent-linux-* > SHA256SUMS)

printf '%-24s %12s %8s\n' binary bytes MiB
for t in "${targets[@]}"; do
	f="dist/iotagent-linux-$t"
	s=$(stat -c %s "$f")
	printf '%-24s %12d %8.2f\n' "$(basename "$f")" "$s" "$(awk -v s="$s" 'BEGIN { print s / 1048576 }')"
done
echo "version $version ($commit)"
