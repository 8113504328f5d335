package layout

import (
	"os/exec"
	"slices"
	"strings"
	"testing"
)

const mod = "iotagent.dev/iotagent/"

// fixtures are packages for tests only: outside the layers, and never in
// a binary.
var fixtures = []string{"tpm/tpmtest", "station/stationtest", "station/mqtttest", "enroll/enrolltest",
	"firmware/release/releasetest", "internal/dnstest", "internal/leakcheck", "internal/testsync", "internal/testdirs", "internal/udpproxy"}

// layer of a production package: it may import ours of lower layers only.
func layer(p string) int {
	switch {
	case strings.HasPrefix(p, "cmd/"):
		return 5
	case p == "agent":
		return 4
	case p == "enroll", p == "firmware", p == "telemetry":
		return 3
	case p == "telemetry/mqtt", p == "telemetry/coap":
		return 3
	case strings.HasPrefix(p, "internal/"):
		return 1
	case strings.HasPrefix(p, "station"):
		return 3
	}
	return 2 // tpm, store, dtls, est, telemetry/senml, agent/statedir
}

// imports lists, for each of our packages, the packages of ours it
// imports (tests left out).
func imports(t *testing.T, patterns ...string) map[string][]string {
	t.Helper()
	out, err := exec.Command("go", append([]string{"list", "-f", "{{.ImportPath}} {{join .Imports \" \"}}"}, patterns...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	m := map[string][]string{}
	for line := range strings.Lines(string(out)) {
		f := strings.Fields(line)
		p := strings.TrimPrefix(f[0], mod)
		m[p] = nil
		for _, imp := range f[1:] {
			if q, ok := strings.CutPrefix(imp, mod); ok {
				m[p] = append(m[p], q)
			}
		}
	}
	if len(m) < 20 {
		t.Fatalf("go list found %d packages; the check would prove little", len(m))
	}
	return m
}

func TestImportDirection(t *testing.T) {
	for p, deps := range imports(t, "iotagent.dev/iotagent/...") {
		if slices.Contains(fixtures, p) {
			continue
		}
		for _, q := range deps {
			switch {
			case slices.Contains(fixtures, q):
				t.Errorf("%s imports the test fixture %s", p, q)
			case strings.HasPrefix(q, "station") && !strings.HasPrefix(p, "station") && p != "cmd/iotstation":
				t.Errorf("%s, on the agent's side, imports the station's %s", p, q)
			case strings.HasPrefix(p, "station") && (q == "store" || q == "agent" || q == "enroll" || q == "agent/statedir" || strings.HasPrefix(q, "telemetry") && q != "telemetry/senml"):
				t.Errorf("the station's %s imports the agent's %s", p, q)
			case (p == "tpm" || p == "store") && !strings.HasPrefix(q, "internal/"):
				t.Errorf("%s imports %s: tpm and store import nothing of ours but internal packages", p, q)
			case strings.HasPrefix(p, "telemetry/") && q == "telemetry":
				// the uplinks implement telemetry's interfaces
			case strings.HasPrefix(p, "station/") && q == "station":
				// the station's parts use the station
			case layer(q) >= layer(p):
				t.Errorf("%s (layer %d) imports %s (layer %d): imports go down, cmd → agent → {enroll, telemetry/*} → {tpm, store, dtls, est}", p, layer(p), q, layer(q))
			}
		}
	}
}

// deps lists every package a binary links.
func deps(t *testing.T, pkg string) []string {
	t.Helper()
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", pkg).CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps %s: %v\n%s", pkg, err, out)
	}
	d := strings.Fields(string(out))
	if len(d) < 50 {
		t.Fatalf("go list -deps %s returned %d packages; the check would prove nothing", pkg, len(d))
	}
	return d
}

func forbid(t *testing.T, binary string, forbidden ...string) {
	t.Helper()
	for _, d := range deps(t, mod+binary) {
		for _, f := range forbidden {
			if d == f || strings.HasPrefix(d, f+"/") {
				t.Errorf("%s links %s", binary, d)
			}
		}
	}
}

// interopOnly are the foreign CMS implementations the interop tests run
// against our encodings; our own est package is what both binaries use.
var interopOnly = []string{"github.com/smallstep/pkcs7", "go.mozilla.org/pkcs7"}

// The agent binary carries no test code, no test fixture and no server:
// its size is a product feature.
func TestAgentBinary(t *testing.T) {
	forbidden := append([]string{"testing", mod + "station", "github.com/mochi-mqtt/server/v2", "github.com/google/go-tpm-tools/simulator"}, interopOnly...)
	for _, f := range fixtures {
		forbidden = append(forbidden, mod+f)
	}
	forbid(t, "cmd/iotagent", forbidden...)
}

// The station links neither the agent's queue nor its pipeline or
// uplinks, nor the agent itself.
func TestStationBinary(t *testing.T) {
	forbid(t, "cmd/iotstation", append([]string{"testing", mod + "store", mod + "telemetry/mqtt", mod + "telemetry/coap", mod + "agent", mod + "enroll"}, interopOnly...)...)
	for _, d := range deps(t, mod+"cmd/iotstation") {
		if d == mod+"telemetry" {
			t.Errorf("cmd/iotstation links %s (the pipeline and ingest)", d)
		}
	}
}
