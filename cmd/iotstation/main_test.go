package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

func stationCLI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func shortDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "stcli")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return filepath.Join(d, "st")
}

func TestStationCLI(t *testing.T) {
	dir := shortDir(t)
	roots := filepath.Join(t.TempDir(), "roots.pem")
	os.WriteFile(roots, append(tpmtest.ManufacturerRootPEM(t), tpmtest.ManufacturerIntermediatePEM(t)...), 0o600)

	code, out, errs := stationCLI(t, "init", "--dir", dir, "--tpm-roots", roots, "--san", "127.0.0.1", "--cert-lifetime", "1h")
	if code != 0 || !strings.Contains(out, "root fingerprint: sha256:") {
		t.Fatalf("init = %d, %q, %q", code, out, errs)
	}
	for _, f := range []string{"root.key", "ca.key", "tls.key"} {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode = %v, %v; want 0600", f, fi.Mode().Perm(), err)
		}
	}
	_, fp, _ := stationCLI(t, "fingerprint", "--dir", dir)
	if !strings.HasPrefix(fp, "sha256:") || !strings.Contains(out, strings.TrimSpace(fp)) {
		t.Errorf("fingerprint = %q, init said %q", fp, out)
	}

	// Without a running station the commands open the directory.
	code, out, errs = stationCLI(t, "token", "create", "--dir", dir, "--device", "gw-1", "--ttl", "2h")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if code != 0 || !strings.HasPrefix(lines[len(lines)-1], "gw-1:") {
		t.Fatalf("token create = %d, %q, %q; want DEVICE:SECRET on the last line", code, out, errs)
	}

	// Serving: the same commands go through the admin socket.
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan string, 1)
	done := make(chan int)
	var serr bytes.Buffer
	go func() {
		done <- runWith(ctx, &env{stdout: &bytes.Buffer{}, stderr: &serr, ready: func(a string) { ready <- a }},
			[]string{"serve", "--dir", dir, "--listen", "127.0.0.1:0"})
	}()
	select {
	case <-ready:
	case code := <-done:
		t.Fatalf("serve exited %d: %s", code, serr.String())
	}
	waitSock(t, filepath.Join(dir, "admin.sock"))
	code, out, errs = stationCLI(t, "token", "create", "--dir", dir, "--device", "gw-2")
	if code != 0 || !strings.Contains(out, "gw-2:") {
		t.Errorf("token create while serving = %d, %q, %q", code, out, errs)
	}
	code, out, _ = stationCLI(t, "devices", "--dir", dir, "--json")
	var devs []station.Device
	if code != 0 || json.Unmarshal([]byte(out), &devs) != nil || len(devs) != 0 {
		t.Errorf("devices --json = %d, %q; want []", code, out)
	}
	code, _, errs = stationCLI(t, "revoke", "--dir", dir, "gw-nope")
	if code != 1 || !strings.Contains(errs, `unknown device "gw-nope"`) {
		t.Errorf("revoke unknown = %d, %q", code, errs)
	}
	// Service certificates for a broker and a backend reader.
	prefix := filepath.Join(t.TempDir(), "broker")
	code, out, errs = stationCLI(t, "issue", "--dir", dir, "--name", "broker", "--server", "--san", "127.0.0.1", "--out", prefix)
	if code != 0 || !strings.Contains(out, "issued broker") {
		t.Fatalf("issue = %d, %q, %q", code, out, errs)
	}
	chain, err := station.ReadCertificates(prefix + ".crt")
	if err != nil || len(chain) != 2 || chain[0].Subject.CommonName != "broker" || len(chain[0].IPAddresses) != 1 {
		t.Errorf("broker.crt = %d certificates, %v", len(chain), err)
	}
	if fi, err := os.Stat(prefix + ".key"); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("broker.key mode = %v, %v", fi.Mode().Perm(), err)
	}
	if trust, err := station.ReadCertificates(prefix + "-ca.pem"); err != nil || len(trust) != 2 {
		t.Errorf("broker-ca.pem = %d certificates, %v", len(trust), err)
	}
	code, _, errs = stationCLI(t, "issue", "--dir", dir, "--name", "x", "--server", "--out", prefix)
	if code != 2 || !strings.Contains(errs, "needs at least one --san") {
		t.Errorf("issue --server without --san = %d, %q", code, errs)
	}
	cancel()
	if code := <-done; code != 0 {
		t.Errorf("serve exited %d: %s", code, serr.String())
	}
	if _, err := os.Stat(filepath.Join(dir, "admin.sock")); !os.IsNotExist(err) {
		t.Error("admin socket left behind")
	}
}

func waitSock(t *testing.T, p string) {
	t.Helper()
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(p); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s did not appear", p)
}

func TestStationCLIBadInput(t *testing.T) {
	dir := shortDir(t)
	if code, _, errs := stationCLI(t, "init", "--dir", dir); code != 0 {
		t.Fatalf("init: %s", errs)
	}
	badManifest := filepath.Join(t.TempDir(), "m.txt")
	os.WriteFile(badManifest, []byte("abc gw-1\n"), 0o600)
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"no command", nil, 2, "no command given"},
		{"unknown command", []string{"frob"}, 2, `unknown command "frob"`},
		{"no dir", []string{"devices"}, 2, "--dir is required"},
		{"init twice", []string{"init", "--dir", dir}, 1, "already initialized"},
		{"missing roots file", []string{"init", "--dir", shortDir(t), "--tpm-roots", "/nonexistent.pem"}, 1, "/nonexistent.pem"},
		{"bad manifest", []string{"init", "--dir", shortDir(t), "--manifest", badManifest}, 1, "line 1: \"abc\" is not a SHA-256"},
		{"short lifetime", []string{"init", "--dir", shortDir(t), "--cert-lifetime", "1s"}, 2, "too short"},
		{"not a station dir", []string{"devices", "--dir", t.TempDir()}, 1, "is not a station directory"},
		{"token without device", []string{"token", "create", "--dir", dir}, 2, "--device is required"},
		{"token bad device id", []string{"token", "create", "--dir", dir, "--device", "a/b"}, 2, `device ID "a/b"`},
		{"token ttl too long", []string{"token", "create", "--dir", dir, "--device", "gw", "--ttl", "9999h"}, 2, "at most"},
		{"revoke without id", []string{"revoke", "--dir", dir}, 2, "want the device ID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := stationCLI(t, tc.args...)
			last := strings.TrimSpace(errs)
			if i := strings.LastIndex(last, "\n"); i >= 0 {
				last = last[i+1:]
			}
			if code != tc.code || !strings.HasPrefix(last, "iotstation: ") || !strings.Contains(last, tc.want) {
				t.Errorf("= %d, %q; want %d and 'iotstation: …%s…'", code, errs, tc.code, tc.want)
			}
		})
	}
}
