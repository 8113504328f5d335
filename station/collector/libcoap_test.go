package collector_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"iotagent.dev/iotagent/station/collector"
)

// libcoap's clients (Debian's libcoap3-bin: OpenSSL and GnuTLS builds) are
// an independent DTLS and CoAP implementation posting to the collector
// with a station-issued device certificate (no Connection ID: libcoap
// 4.3.1 has none).
func TestLibcoapClients(t *testing.T) {
	checkGoroutines(t)
	f := newFixture(t)
	c, out := f.start(t, collector.Config{})

	for _, tool := range []string{"coap-client-openssl", "coap-client-gnutls"} {
		t.Run(tool, func(t *testing.T) {
			if _, err := exec.LookPath(tool); err != nil {
				t.Fatalf("%s not found: install libcoap3-bin (scripts/test.sh does)", tool)
			}
			device := "gw-" + strings.TrimPrefix(tool, "coap-client-")
			dir := t.TempDir()
			dev := f.st.Device(t, device)
			files := map[string][]byte{
				"cert.pem": dev.ChainPEM, "key.pem": dev.KeyPEM, "ca.pem": f.st.TrustPEM(),
				"body.cbor": mustCBOR(t, batch(device, 1, 20)),
				"body.json": mustJSON(t, batch(device, 21, 20)),
				"bad.cbor":  []byte("not cbor"),
			}
			for name, b := range files {
				if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			uri := fmt.Sprintf("coaps://%s/telemetry", c.Addr())
			before := len(out.read(t))
			for _, step := range []struct {
				cf, file string
				want     string // in the output; "" for 2.04, which prints nothing
				newRecs  int
			}{
				{"112", "body.cbor", "", 20},
				{"110", "body.json", "", 20},
				{"112", "body.cbor", "", 0}, // a retry: de-duplicated
				{"112", "bad.cbor", "4.00", 0},
				{"0", "body.json", "4.15", 0},
			} {
				okBefore := c.Stats().Handshakes["ok"]
				n := len(out.read(t))
				ctx, cancel := context.WithTimeout(context.Background(), wait)
				cmd := exec.CommandContext(ctx, tool, "-m", "post", "-B", "10",
					"-c", filepath.Join(dir, "cert.pem"), "-j", filepath.Join(dir, "key.pem"), "-C", filepath.Join(dir, "ca.pem"),
					"-t", step.cf, "-f", filepath.Join(dir, step.file), uri)
				outb, err := cmd.CombinedOutput()
				cancel()
				t.Logf("%s: %v\n%s", strings.Join(cmd.Args, " "), err, outb)
				if err != nil {
					t.Fatalf("%s %s: %v", tool, step.file, err)
				}
				if step.want == "" && strings.TrimSpace(string(outb)) != "" || !strings.Contains(string(outb), step.want) {
					t.Errorf("%s -t %s -f %s printed %q, want %q", tool, step.cf, step.file, outb, step.want)
				}
				if got := len(out.read(t)) - n; got != step.newRecs {
					t.Errorf("%s -t %s -f %s: sink gained %d records, want %d", tool, step.cf, step.file, got, step.newRecs)
				}
				if got := c.Stats().Handshakes["ok"]; got != okBefore+1 {
					t.Errorf("%s: handshakes ok = %d, want %d", tool, got, okBefore+1)
				}
			}
			t.Logf("%s: handshakes %v", tool, c.Stats().Handshakes)
			if got, want := seqs(out.read(t)[before:]), span(1, 40); !slices.Equal(got, want) {
				t.Errorf("sink seqs = %v, want %v", got, want)
			}
		})
	}
}
