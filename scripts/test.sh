#!/usr/bin/env bash
# The one test command: installs what the tests need (only when missing),
# then runs formatting, vet, staticcheck, the race-enabled test suite
# against real swtpm/mosquitto/libcoap peers, the TPM tests cross-compiled
# for armv7 and arm64 under qemu-user, and the cross-build.
#
# usage: scripts/test.sh            (from anywhere; CI runs .ci/run)
# Environment: GOTEST_FLAGS adds flags to `go test` (e.g. -run TestX -v).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

STATICCHECK_VERSION=v0.8.2
# The issue's list, plus curl and openssl, the independent EST clients of
# the RFC 7030 conformance test.
# rauc, rauc-service, squashfs-tools and dbus: the image installer's test
# against the real RAUC.
APT_PACKAGES=(swtpm swtpm-tools tpm2-tools mosquitto mosquitto-clients qemu-user-static libcoap3-bin curl openssl rauc rauc-service squashfs-tools dbus)

step() { printf '\n=== %s\n' "$*"; }
die() { printf 'test.sh: FAIL: %s\n' "$*" >&2; exit 1; }
start=$(date +%s)

step "prerequisites"
command -v go >/dev/null || die "go not found (want Go 1.26 at /usr/local/go)"
missing=()
for p in "${APT_PACKAGES[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	echo "installing: ${missing[*]}"
	SUDO=""
	if [ "$(id -u)" -ne 0 ]; then
		command -v sudo >/dev/null || die "need root or sudo to install ${missing[*]}"
		SUDO=sudo
	fi
	export DEBIAN_FRONTEND=noninteractive
	$SUDO apt-get update -qq || die "apt-get update failed"
	$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
		die "apt-get install ${missing[*]} failed"
fi
for bin in swtpm swtpm_setup swtpm_localca certtool tpm2_readpublic mosquitto mosquitto_sub qemu-arm-static qemu-aarch64-static coap-client-openssl coap-client-gnutls coap-server-openssl curl openssl rauc dbus-daemon mksquashfs; do
	command -v "$bin" >/dev/null || die "$bin not found after installing ${APT_PACKAGES[*]}"
done
go version

# The armv7 self-update test runs the agent under qemu-arm-static, and the
# agent execs its ARM slot binary: the kernel must hand ARM ELF files to
# qemu (binfmt_misc, with the registration qemu-user-static ships but
# does not make outside systemd). Idempotent; machine-wide, as an
# installed package is.
step "binfmt_misc: ARM ELF through qemu-arm"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
[ -e /proc/sys/fs/binfmt_misc/register ] || $SUDO mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
	die "cannot mount binfmt_misc (needed by the armv7 self-update test)"
[ -e /proc/sys/fs/binfmt_misc/qemu-arm ] || $SUDO sh -c 'cat /usr/lib/binfmt.d/qemu-arm.conf >/proc/sys/fs/binfmt_misc/register' ||
	die "cannot register qemu-arm with binfmt_misc"
grep -qx enabled /proc/sys/fs/binfmt_misc/qemu-arm || die "binfmt_misc qemu-arm is disabled"

step "go mod download"
go mod download

step "gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
[ -z "$unformatted" ] || die "gofmt needed on: $unformatted"

step "go vet"
go vet ./...

step "staticcheck $STATICCHECK_VERSION"
go run "honnef.co/go/tools/cmd/staticcheck@$STATICCHECK_VERSION" ./...

step "adversarial suite present"
# The TestAttack* tests (issue 10) run with the rest below; this step
# fails if one of them is removed or renamed, so that an attack class
# that was closed stays tested.
attacks=$(go test -list 'TestAttack' ./... | grep '^TestAttack' | sort)
for want in \
	TestAttackSenMLExpansion TestAttackSenMLExpansionIngest TestAttackSenMLExpansionCollector TestAttackSenMLFieldLimits \
	TestAttackTPMEnrollWithPublicEKData TestAttackTPMEnrollClearsFailureLimiter TestAttackTPMEnrollFloodFromOneSource TestAttackForgeriesRaceTheExchange \
	TestAttackCookielessHelloFlood TestAttackStalledHandshakesPerSource TestAttackCookielessHellosPerSource TestAttackSpoofedSourceLocksOutDevice \
	TestAttackTokenTakesOverTPMDevice TestAttackServiceAndUnknownCertificates \
	TestAttackConcurrentBadTokens TestAttackLimiterSources TestAttackTPMEnrollWeakKey TestAttackTokenAnswersRevealNothing \
	TestAttackRevokedDeviceKeepsMQTTSession TestAttackDeviceEndsAnotherDevicesSession \
	TestAttackInitRefusesLooseDirectory TestAttackAdminSocketMode TestAttackIngestSocketMode TestAttackExpiredPinnedStation; do
	grep -qx "$want" <<<"$attacks" || die "adversarial test $want is missing"
done
echo "$(wc -l <<<"$attacks") TestAttack tests"

step "go test -race ./..."
# shellcheck disable=SC2086
go test -race -count=1 -timeout 20m ${GOTEST_FLAGS:-} ./...

step "tpm tests on ARM under qemu-user (against a native swtpm)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for arch in armv7 arm64; do
	case $arch in
	armv7) goenv=(GOARCH=arm GOARM=7) qemu=qemu-arm-static ;;
	arm64) goenv=(GOARCH=arm64) qemu=qemu-aarch64-static ;;
	esac
	env CGO_ENABLED=0 "${goenv[@]}" go test -c -o "$tmp/tpm.$arch.test" ./tpm
	file_arch=$(od -An -tx1 -j18 -N2 "$tmp/tpm.$arch.test" | tr -d ' ')
	# ELF e_machine: 0x28 ARM, 0xb7 AArch64
	case "$arch:$file_arch" in
	armv7:2800 | arm64:b700) ;;
	*) die "$tmp/tpm.$arch.test is not an $arch binary (e_machine $file_arch)" ;;
	esac
	echo "--- $arch ($qemu)"
	(cd tpm && "$qemu" "$tmp/tpm.$arch.test" -test.count=1 -test.timeout=10m) || die "tpm tests failed on $arch"
done

step "cross-build"
scripts/crossbuild.sh
(cd dist && sha256sum -c --quiet SHA256SUMS) || die "dist/SHA256SUMS does not match"
out=$(qemu-arm-static dist/iotagent-linux-armv7 version)
echo "$out"
grep -q "linux/armv7" <<<"$out" || die "armv7 binary does not report linux/armv7"
grep -q "$(git rev-parse --verify -q HEAD || echo unknown)" <<<"$out" || die "armv7 binary does not carry the commit"
qemu-aarch64-static dist/iotagent-linux-arm64 version | grep -q "linux/arm64" || die "arm64 binary does not report linux/arm64"

printf '\ntest.sh: PASS in %ds\n' "$(($(date +%s) - start))"
