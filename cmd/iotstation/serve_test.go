package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/telemetry/senml"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// iotstation serve --coap-listen: a device (libcoap's client, with a
// certificate from iotstation issue) posts SenML to the collector, the
// station restarts, the device posts the same batch again and a new one:
// the sink holds every record once, because the de-duplication windows
// were saved at shutdown in DIR/collector-dedupe.bin.
func TestServeCoAPCollector(t *testing.T) {
	const tool = "coap-client-openssl"
	if _, err := exec.LookPath(tool); err != nil {
		t.Fatalf("%s not found: install libcoap3-bin (scripts/test.sh does)", tool)
	}
	dir := shortDir(t)
	if code, out, errs := stationCLI(t, "init", "--dir", dir, "--san", "127.0.0.1"); code != 0 {
		t.Fatalf("init = %d, %q, %q", code, out, errs)
	}
	files := t.TempDir()
	prefix := filepath.Join(files, "gw-9")
	code, out, errs := stationCLI(t, "token", "create", "--dir", dir, "--device", "gw-9")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	device, secret, ok := strings.Cut(lines[len(lines)-1], ":")
	if code != 0 || !ok {
		t.Fatalf("token create = %d, %q, %q", code, out, errs)
	}
	pack := func(from uint64, n int) string {
		p := make(senml.Pack, n)
		p[0].BaseName = new("urn:dev:gw-9:")
		for i := range p {
			p[i].Name = "temp"
			p[i].Value = new(float64(i))
			p[i].Seq = from + uint64(i)
		}
		b, err := p.EncodeCBOR()
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(files, fmt.Sprintf("%d.cbor", from))
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	first, second := pack(1, 20), pack(21, 10)

	// A free UDP port for both runs of serve.
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	coapAddr := pc.LocalAddr().String()
	pc.Close()
	post := func(body string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, tool, "-m", "post", "-B", "10",
			"-c", prefix+".crt", "-j", prefix+".key", "-C", prefix+"-ca.pem",
			"-t", "112", "-f", body, "coaps://"+coapAddr+"/telemetry")
		out, err := cmd.CombinedOutput()
		if err != nil || len(out) != 0 { // 2.04 prints nothing
			t.Fatalf("%v: %v, %q; want 2.04", cmd.Args, err, out)
		}
	}

	addr, stop := serveCLIStop(t, dir, "--coap-listen", coapAddr)
	// A device enrolled by token: a service certificate is not a device's.
	roots, err := certpem.ReadFile(filepath.Join(dir, "root.crt"))
	if err != nil {
		t.Fatal(err)
	}
	dev := stationtest.EnrollByToken(t, "https://"+addr, roots[0], device, secret)
	trust, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{".crt": dev.ChainPEM, ".key": dev.KeyPEM, "-ca.pem": append(trust, certpem.Encode(roots[0])...)} {
		if err := os.WriteFile(prefix+name, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	post(first)
	stop()
	fi, err := os.Stat(filepath.Join(dir, "collector-dedupe.bin"))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("collector-dedupe.bin after stopping: %v, %v; want mode 0600", fi, err)
	}

	serveCLI(t, dir, "--coap-listen", coapAddr)
	post(first) // the device never heard the 2.04, say: it sends again
	post(second)

	f, err := os.Open(filepath.Join(dir, "telemetry.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var got []uint64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var rec struct {
			Device string `json:"device"`
			Seq    uint64 `json:"seq"`
		}
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil || rec.Device != "gw-9" {
			t.Fatalf("sink line %q: %v", sc.Text(), err)
		}
		got = append(got, rec.Seq)
	}
	slices.Sort(got)
	want := make([]uint64, 30)
	for i := range want {
		want[i] = uint64(i + 1)
	}
	if !slices.Equal(got, want) {
		t.Errorf("telemetry.jsonl seqs = %v, want 1…30 once each", got)
	}
}

// init --crl-hook keeps the hook in station.json, where every later
// command that changes crl.pem finds it; serve --crl-hook overrides it for
// that run. With a relative --dir the hook still finds crl.pem through
// IOTSTATION_CRL_FILE (it runs in the station directory).
func TestCRLHookFlags(t *testing.T) {
	abs := shortDir(t)
	t.Chdir(filepath.Dir(abs))
	dir := filepath.Base(abs) // relative
	files := t.TempDir()
	kept, override := filepath.Join(files, "kept"), filepath.Join(files, "override")
	hook := func(out string) string { return `test -f "$IOTSTATION_CRL_FILE" && echo ran >> ` + out }
	if code, out, errs := stationCLI(t, "init", "--dir", dir, "--san", "127.0.0.1", "--crl-hook", hook(kept)); code != 0 {
		t.Fatalf("init = %d, %q, %q", code, out, errs)
	}
	b, err := os.ReadFile(filepath.Join(dir, "station.json"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		CRLHook string `json:"crl_hook"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil || cfg.CRLHook != hook(kept) {
		t.Errorf("station.json crl_hook = %q, %v", cfg.CRLHook, err)
	}
	ran := func(path string) bool {
		b, _ := os.ReadFile(path)
		return len(b) > 0
	}
	_, stop := serveCLIStop(t, dir)
	testsync.Until(t, 10*time.Second, "serve runs station.json's hook", func() bool { return ran(kept) })
	stop()
	os.Remove(kept)
	serveCLI(t, dir, "--crl-hook", hook(override))
	testsync.Until(t, 10*time.Second, "serve runs --crl-hook", func() bool { return ran(override) })
	if ran(kept) {
		t.Error("serve --crl-hook ran station.json's hook too")
	}
}

// init --ca-tpm: a spec that reaches no TPM is refused with nothing
// written; a real one holds the issuing CA key (no ca.key), and serve
// issues with it.
func TestInitCATPM(t *testing.T) {
	dir := shortDir(t)
	code, out, errs := stationCLI(t, "init", "--dir", dir, "--ca-tpm", "unix:"+filepath.Join(t.TempDir(), "none.sock"))
	if code != 1 || out != "" || !strings.HasPrefix(errs, "iotstation: --ca-tpm: ") || strings.Count(errs, "\n") != 1 {
		t.Errorf("init --ca-tpm with no TPM there = %d, %q, %q; want 1, nothing on stdout and one line naming --ca-tpm", code, out, errs)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the failed init left %s behind: %v", dir, err)
	}

	sim := tpmtest.Start(t, tpmtest.Options{Identity: 1})
	// A relative socket path is kept absolute: serve may run elsewhere.
	t.Chdir(filepath.Dir(sim.Socket))
	code, out, errs = stationCLI(t, "init", "--dir", dir, "--san", "127.0.0.1", "--ca-tpm", "unix:"+filepath.Base(sim.Socket))
	if code != 0 {
		t.Fatalf("init --ca-tpm = %d, %q, %q", code, out, errs)
	}
	if !strings.Contains(errs, "warning:") {
		t.Errorf("init --ca-tpm with swtpm's socket printed %q, want a warning that the loaded key is reachable by whoever reaches the socket", errs)
	}
	b, err := os.ReadFile(filepath.Join(dir, "station.json"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		CATPM string `json:"ca_tpm"`
	}
	if err := json.Unmarshal(b, &cfg); err != nil || cfg.CATPM != "unix:"+sim.Socket {
		t.Errorf("station.json ca_tpm = %q, %v; want unix:%s", cfg.CATPM, err, sim.Socket)
	}
	t.Chdir(t.TempDir())
	if _, err := os.Stat(filepath.Join(dir, "ca.key")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("ca.key after init --ca-tpm: %v, want none", err)
	}
	serveCLI(t, dir)
	prefix := filepath.Join(t.TempDir(), "svc")
	if code, out, errs := stationCLI(t, "issue", "--dir", dir, "--name", "svc", "--out", prefix); code != 0 {
		t.Fatalf("issue through the TPM-held CA = %d, %q, %q", code, out, errs)
	}
	certs, err := certpem.ReadFile(prefix + ".crt")
	if err != nil {
		t.Fatal(err)
	}
	issuers, err := certpem.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	if err := certs[0].CheckSignatureFrom(issuers[0]); err != nil {
		t.Errorf("issued certificate: %v", err)
	}
}

// serve --coap-listen on a UDP port another process holds fails at once
// with one line naming the address, before it serves anything.
func TestServeCoAPPortTaken(t *testing.T) {
	dir := shortDir(t)
	if code, out, errs := stationCLI(t, "init", "--dir", dir, "--san", "127.0.0.1"); code != 0 {
		t.Fatalf("init = %d, %q, %q", code, out, errs)
	}
	taken, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var out, errb strings.Builder
	code := run(ctx, []string{"serve", "--dir", dir, "--listen", "127.0.0.1:0", "--coap-listen", taken.LocalAddr().String()}, &out, &errb)
	if ctx.Err() != nil {
		t.Fatal("serve kept running with its CoAP port taken")
	}
	lines := strings.Split(strings.TrimSpace(errb.String()), "\n")
	if code != 1 || len(lines) != 1 || !strings.HasPrefix(lines[0], "iotstation: ") ||
		!strings.Contains(lines[0], taken.LocalAddr().String()) || !strings.Contains(lines[0], "address already in use") {
		t.Errorf("serve = %d, stderr %q; want 1 and one line naming %s, address already in use", code, errb.String(), taken.LocalAddr())
	}
}

// serve --coap-mqtt starts: its republisher holds a certificate renewed
// while serving (it refused one without a fixed certificate).
func TestServeCoAPRepublisherStarts(t *testing.T) {
	dir := shortDir(t)
	if code, _, errs := stationCLI(t, "init", "--dir", dir, "--san", "127.0.0.1"); code != 0 {
		t.Fatalf("init = %d: %s", code, errs)
	}
	// The broker is reached lazily, at the first record: none is needed.
	serveCLI(t, dir, "--coap-listen", "127.0.0.1:0", "--coap-mqtt", "mqtts://127.0.0.1:1")
}
