package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestEnrollStatusRenewCLI(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, CertLifetime: time.Hour})
	sim := tpmtest.New(t)
	state := filepath.Join(t.TempDir(), "state")
	g := []string{"--tpm", sim.Spec, "--state-dir", state}

	code, out, errs := cli(t, append(g, "enroll", "--station", st.URL, "--station-fingerprint", st.Fingerprint)...)
	if code != 0 || !strings.Contains(out, "enrolled as dev-") || !strings.Contains(out, "by tpmenroll") {
		t.Fatalf("enroll = %d, %q, %q", code, out, errs)
	}
	code, out, _ = cli(t, append(g, "enroll", "--station", st.URL, "--station-ca", st.RootFile)...)
	if code != 0 || !strings.Contains(out, "already enrolled as dev-") {
		t.Fatalf("second enroll = %d, %q; want already enrolled", code, out)
	}

	code, out, errs = cli(t, append(g, "status", "--json")...)
	if code != 0 {
		t.Fatalf("status = %d, %s", code, errs)
	}
	var s map[string]any
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	for _, k := range []string{"device_id", "cert_serial", "cert_not_after", "next_renewal", "last_renewal_error", "tpm"} {
		if _, ok := s[k]; !ok {
			t.Errorf("status --json lacks %q:\n%s", k, out)
		}
	}
	if s["tpm"] != sim.Spec {
		t.Errorf("status tpm = %v, want %s", s["tpm"], sim.Spec)
	}
	serial := s["cert_serial"]

	code, out, errs = cli(t, append(g, "renew")...)
	if code != 0 || !strings.Contains(out, "renewed dev-") {
		t.Fatalf("renew = %d, %q, %q", code, out, errs)
	}
	_, out, _ = cli(t, append(g, "status", "--json")...)
	json.Unmarshal([]byte(out), &s)
	if s["cert_serial"] == serial {
		t.Error("renew did not change the certificate")
	}

	// With the daemon running, renew asks it (SIGUSR1) instead of racing
	// it for the state dir.
	os.Remove(filepath.Join(state, "renewal.json")) // run writes it once it holds the state dir
	ctx, cancel := context.WithCancel(context.Background())
	var rout, rerr bytes.Buffer
	done := make(chan int)
	sockDir, _ := os.MkdirTemp("", "sock")
	defer os.RemoveAll(sockDir)
	go func() {
		done <- runWith(ctx, &env{stdin: strings.NewReader(""), stdout: &rout, stderr: &rerr, now: time.Now},
			append(g, "run", "--config", "/dev/null", "--ingest-socket", filepath.Join(sockDir, "ingest.sock")))
	}()
	waitForFile(t, filepath.Join(state, "renewal.json"))
	code, out, errs = cli(t, append(g, "renew")...)
	if code != 0 || !strings.Contains(out, "renewed by the running agent") {
		t.Errorf("renew with the daemon running = %d, %q, %q", code, out, errs)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("run exited %d: %s", code, rerr.String())
	}
}

func waitForFile(t *testing.T, path string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not appear", path)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestEnrollBadInput(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	sim := tpmtest.New(t)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no station", []string{"enroll", "--station-fingerprint", st.Fingerprint}, 2, "--station is required"},
		{"both CA and fingerprint", []string{"enroll", "--station", st.URL, "--station-ca", st.RootFile, "--station-fingerprint", st.Fingerprint}, 2, "exactly one of"},
		{"bad fingerprint", []string{"enroll", "--station", st.URL, "--station-fingerprint", "md5:abc"}, 2, "want sha256:"},
		{"missing CA file", []string{"enroll", "--station", st.URL, "--station-ca", "/nonexistent.pem"}, 2, "/nonexistent.pem"},
		{"http URL", []string{"enroll", "--station", "http://" + st.Addr, "--station-fingerprint", st.Fingerprint}, 1, "want https://"},
		{"wrong fingerprint", []string{"enroll", "--station", st.URL, "--station-fingerprint", "sha256:" + strings.Repeat("00", 32)}, 1, "no certificate with fingerprint"},
		{"station down", []string{"enroll", "--station", "https://127.0.0.1:1", "--station-fingerprint", st.Fingerprint}, 1, "connection refused"},
		{"unknown EK, no auto-approve", []string{"enroll", "--station", st.URL, "--station-fingerprint", st.Fingerprint}, 1, "not in the manifest"},
		{"status before enrolling", []string{"status"}, 1, "not enrolled"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "state")
			code, _, errs := cli(t, append([]string{"--tpm", sim.Spec, "--state-dir", state}, tc.args...)...)
			if code != tc.code || !strings.Contains(errs, tc.want) || strings.Count(strings.TrimSpace(errs), "\n") > 0 && !strings.Contains(errs, "level=") {
				t.Errorf("= %d, %q; want %d and one line containing %q", code, errs, tc.code, tc.want)
			}
			if _, err := os.Stat(filepath.Join(state, "cert.pem")); err == nil {
				t.Error("a certificate was stored")
			}
		})
	}
}

// One configuration file serves every command: enroll needs no station
// flags, status, renew, tpm, run and send find the TPM, the state dir and
// the ingest socket in it, and a flag given beats its key everywhere.
func TestOneConfigForEveryCommand(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true, CertLifetime: time.Hour})
	sim := tpmtest.New(t)
	state := filepath.Join(t.TempDir(), "state")
	sockDir, err := os.MkdirTemp("", "sock")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "ingest.sock")
	cfg := filepath.Join(t.TempDir(), "config.toml")
	body := fmt.Sprintf("tpm = %q\nstate_dir = %q\n[station]\nurl = %q\nfingerprint = %q\n[ingest]\nsocket = %q\n[collectors]\nhost = false\n",
		sim.Spec, state, st.URL, st.Fingerprint, sock)
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"--config", cfg, "enroll"},
		{"--config", cfg, "status"},
		{"tpm", "info", "--config", cfg}, // after the command too
		{"--config", cfg, "renew", "--keep-key"},
	} {
		if code, out, errs := cli(t, args...); code != 0 {
			t.Fatalf("%v = %d, %q, %q", args, code, out, errs)
		}
	}
	if _, err := os.Stat(filepath.Join(state, "cert.pem")); err != nil {
		t.Fatalf("enroll with the config alone stored no certificate: %v", err)
	}
	// Once enrolled, [station] is not needed: a bootstrap CA file removed
	// after provisioning does not stop the agent.
	gone := filepath.Join(t.TempDir(), "gone.toml")
	if err := os.WriteFile(gone, fmt.Appendf(nil, "tpm = %q\nstate_dir = %q\n[station]\nurl = %q\nca_file = \"/nonexistent/bootstrap.pem\"\n",
		sim.Spec, state, st.URL), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, out, errs := cli(t, "--config", gone, "status"); code != 0 {
		t.Errorf("status of an enrolled agent whose bootstrap CA file is gone = %d, %q, %q", code, out, errs)
	}
	// A flag beats the file: another state dir is not enrolled.
	if code, _, errs := cli(t, "--config", cfg, "--state-dir", t.TempDir(), "status"); code != 1 || !strings.Contains(errs, "not enrolled") {
		t.Errorf("status --state-dir OTHER = %d, %q; want not enrolled", code, errs)
	}

	ctx, cancel := context.WithCancel(context.Background())
	var rerr bytes.Buffer
	done := make(chan int)
	go func() {
		done <- runWith(ctx, &env{stdin: strings.NewReader(""), stdout: io.Discard, stderr: &rerr, now: time.Now}, []string{"--config", cfg, "run"})
	}()
	testsync.Until(t, 20*time.Second, "the ingest socket of iotagent run --config", func() bool {
		_, err := os.Stat(sock)
		return err == nil
	})
	code, out, errs := cli(t, "--config", cfg, "send", "--name", "temp", "--value", "21.5")
	if code != 0 || !strings.HasPrefix(out, "ok ") {
		t.Errorf("send with the config's socket = %d, %q, %q", code, out, errs)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("run exited %d: %s", code, rerr.String())
	}
}
