package main

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/stationtest"
)

// The release workflow from the command line: root and signing keys,
// a key list, its install, a publish, with a station serving and
// without; each refusal names what was wrong.
func TestFirmwareCLI(t *testing.T) {
	dir := shortDir(t)
	if code, _, errs := stationCLI(t, "init", "--dir", dir, "--san", "127.0.0.1"); code != 0 {
		t.Fatalf("init = %d: %s", code, errs)
	}
	keys := t.TempDir()
	newKey := func(name string) string {
		t.Helper()
		code, out, errs := stationCLI(t, "firmware", "key", "new", "--out", filepath.Join(keys, name))
		if code != 0 || len(strings.TrimSpace(out)) != 44 {
			t.Fatalf("key new = %d %q %q", code, out, errs)
		}
		if fi, err := os.Stat(filepath.Join(keys, name)); err != nil || fi.Mode().Perm() != 0o600 {
			t.Errorf("key file: %v %v", fi, err)
		}
		return strings.TrimSpace(out)
	}
	newKey("root.key")
	signPub := newKey("signing.key")
	if code, _, errs := stationCLI(t, "firmware", "key", "new", "--out", filepath.Join(keys, "root.key")); code != 1 || !strings.Contains(errs, "never overwritten") {
		t.Errorf("key new over an existing key = %d %q", code, errs)
	}
	list := filepath.Join(keys, "keylist.json")
	if code, _, errs := stationCLI(t, "firmware", "keys", "sign", "--root", filepath.Join(keys, "root.key"), "--signing", signPub, "--version", "1", "--out", list); code != 0 {
		t.Fatalf("keys sign = %d %q", code, errs)
	}
	if code, _, errs := stationCLI(t, "firmware", "keys", "sign", "--root", filepath.Join(keys, "root.key"), "--signing", "not-a-key", "--version", "1", "--out", list); code != 2 || !strings.Contains(errs, "--signing") {
		t.Errorf("keys sign with a bad key = %d %q", code, errs)
	}
	payload := filepath.Join(t.TempDir(), "iotagent")
	b := make([]byte, 100_000)
	rand.Read(b)
	os.WriteFile(payload, b, 0o600)
	publish := func(version string) (int, string, string) {
		return stationCLI(t, "firmware", "publish", "--dir", dir, "--file", payload, "--name", "iotagent", "--type", "agent",
			"--version", version, "--svn", "1", "--hw", "linux/armv7", "--key", filepath.Join(keys, "signing.key"))
	}
	if code, _, errs := publish("1.0.0"); code != 1 || !strings.Contains(errs, "no firmware key list installed") {
		t.Errorf("publish before the key list = %d %q", code, errs)
	}
	if code, _, errs := stationCLI(t, "firmware", "keys", "install", "--dir", dir, list); code != 0 {
		t.Fatalf("keys install = %d %q", code, errs)
	}
	// Through a serving station's admin socket.
	serveCLI(t, dir)
	waitSock(t, filepath.Join(dir, "admin.sock"))
	code, out, errs := publish("1.0.0")
	if code != 0 || !strings.Contains(out, "published iotagent 1.0.0 (100000 bytes") {
		t.Fatalf("publish = %d %q %q", code, out, errs)
	}
	if got, err := os.ReadFile(filepath.Join(dir, "firmware", "releases", "iotagent", "1.0.0", "payload")); err != nil || string(got) != string(b) {
		t.Errorf("the stored payload: %v", err)
	}
	// --manifest-out writes the manifest the station stored.
	mout := filepath.Join(t.TempDir(), "manifest")
	if code, _, errs := stationCLI(t, "firmware", "publish", "--dir", dir, "--file", payload, "--name", "iotagent", "--type", "agent",
		"--version", "1.0.1", "--svn", "1", "--hw", "linux/armv7", "--key", filepath.Join(keys, "signing.key"), "--manifest-out", mout); code != 0 {
		t.Fatalf("publish --manifest-out = %d %q", code, errs)
	}
	stored, _ := os.ReadFile(filepath.Join(dir, "firmware", "releases", "iotagent", "1.0.1", "manifest"))
	if got, err := os.ReadFile(mout); err != nil || len(got) == 0 || string(got) != string(stored) {
		t.Errorf("--manifest-out wrote %q (%v), the station stored %q", got, err, stored)
	}
	if code, _, errs := publish("1.0.0"); code != 1 || !strings.Contains(errs, "already published") {
		t.Errorf("publish again = %d %q", code, errs)
	}
	if code, _, errs := publish("v2"); code != 1 || !strings.Contains(errs, "MAJOR.MINOR.PATCH") {
		t.Errorf("publish with a bad version = %d %q", code, errs)
	}
	if code, _, errs := stationCLI(t, "firmware", "keys", "install", "--dir", dir, list); code != 0 {
		t.Errorf("installing the same key list again = %d %q", code, errs)
	}
}

// firmware root init writes the offline root key in a directory only its
// owner may enter, and never over a key or into a looser directory.
func TestFirmwareRootInit(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "offline")
	code, out, errs := stationCLI(t, "firmware", "root", "init", "--out", dir)
	if code != 0 || len(strings.TrimSpace(out)) != 44 || !strings.Contains(errs, "keep it offline") {
		t.Fatalf("root init = %d %q %q", code, out, errs)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("root key directory: %v %v, want 0700", fi, err)
	}
	if fi, err := os.Stat(filepath.Join(dir, "root.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("root.key: %v %v, want 0600", fi, err)
	}
	if code, _, errs := stationCLI(t, "firmware", "root", "init", "--out", dir); code != 1 || !strings.Contains(errs, "never overwritten") {
		t.Errorf("root init again = %d %q", code, errs)
	}
	loose := t.TempDir()
	os.Chmod(loose, 0o755)
	if code, _, errs := stationCLI(t, "firmware", "root", "init", "--out", loose); code != 1 || !strings.Contains(errs, "chmod 700") {
		t.Errorf("root init into a 0755 directory = %d %q", code, errs)
	}
	if code, _, errs := stationCLI(t, "firmware", "root", "init"); code != 2 || !strings.Contains(errs, "want --out DIR") {
		t.Errorf("root init without --out = %d %q", code, errs)
	}
}

// The rollout commands, through a serving station's admin socket and on
// a stopped station's directory: create, status (text, --devices,
// --json), pause, resume, abort, each refusal one line; iotstation
// devices shows the agent version a device checked in with.
func TestFirmwareRolloutCLI(t *testing.T) {
	dir := shortDir(t)
	if code, _, errs := stationCLI(t, "init", "--dir", dir, "--san", "127.0.0.1"); code != 0 {
		t.Fatalf("init = %d: %s", code, errs)
	}
	keys := t.TempDir()
	for _, name := range []string{"root.key", "signing.key"} {
		if code, _, errs := stationCLI(t, "firmware", "key", "new", "--out", filepath.Join(keys, name)); code != 0 {
			t.Fatalf("key new = %d %q", code, errs)
		}
	}
	_, signPub, _ := stationCLI(t, "firmware", "key", "new", "--out", filepath.Join(keys, "signing2.key"))
	list := filepath.Join(keys, "keylist.json")
	if code, _, errs := stationCLI(t, "firmware", "keys", "sign", "--root", filepath.Join(keys, "root.key"), "--signing", strings.TrimSpace(signPub), "--version", "1", "--out", list); code != 0 {
		t.Fatalf("keys sign = %d %q", code, errs)
	}
	if code, _, errs := stationCLI(t, "firmware", "keys", "install", "--dir", dir, list); code != 0 {
		t.Fatalf("keys install = %d %q", code, errs)
	}
	payload := filepath.Join(t.TempDir(), "iotagent")
	os.WriteFile(payload, []byte("a new agent"), 0o600)
	if code, _, errs := stationCLI(t, "firmware", "publish", "--dir", dir, "--file", payload, "--name", "iotagent", "--type", "agent",
		"--version", "1.1.0", "--svn", "1", "--hw", "linux/armv7", "--key", filepath.Join(keys, "signing2.key")); code != 0 {
		t.Fatalf("publish = %d %q", code, errs)
	}

	addr, stop := serveCLIStop(t, dir)
	roots, err := certpem.ReadFile(filepath.Join(dir, "root.crt"))
	if err != nil {
		t.Fatal(err)
	}
	var gw1 tls.Certificate
	for _, id := range []string{"gw-1", "gw-2", "gw-3"} {
		_, out, _ := stationCLI(t, "token", "create", "--dir", dir, "--device", id)
		lines := strings.Split(strings.TrimSpace(out), "\n")
		_, secret, _ := strings.Cut(lines[len(lines)-1], ":")
		if c := stationtest.EnrollByToken(t, "https://"+addr, roots[0], id, secret); id == "gw-1" {
			gw1 = c.TLS
		}
	}
	code, out, errs := stationCLI(t, "firmware", "rollout", "create", "--dir", dir, "--release", "iotagent@1.1.0",
		"--devices", "gw-1", "gw-2", "gw-3", "--waves", "33%,100%", "--wave-wait", "1h", "--max-failures", "0%")
	if code != 0 || !strings.Contains(out, "rollout r1: iotagent@1.1.0 to 3 devices; wave 1 is open") || !strings.Contains(out, "2     100%     2") {
		t.Fatalf("rollout create = %d %q %q", code, out, errs)
	}
	// A device checks in: it is assigned the release if in wave 1, and
	// iotstation devices shows what it runs.
	pool := x509.NewCertPool()
	pool.AddCert(roots[0])
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{gw1}}}}
	defer c.CloseIdleConnections()
	resp, err := c.Post("https://"+addr+"/firmware/check", "application/json", strings.NewReader(`{"agent":{"name":"iotagent","version":"1.0.3"}}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK && resp.StatusCode != http.StatusNoContent {
		t.Errorf("check = %d", resp.StatusCode)
	}
	_, out, _ = stationCLI(t, "devices", "--dir", dir)
	if !strings.Contains(out, "AGENT") || !regexp.MustCompile(`(?m)^gw-1\s+enrolled\s+1\.0\.3\s`).MatchString(out) || !regexp.MustCompile(`(?m)^gw-2\s+enrolled\s+-\s`).MatchString(out) {
		t.Errorf("devices = %q, want gw-1 running 1.0.3 and gw-2 unknown", out)
	}
	_, out, _ = stationCLI(t, "devices", "--dir", dir, "--json")
	var devs []station.Device
	if json.Unmarshal([]byte(out), &devs) != nil || len(devs) != 3 || devs[0].Firmware == nil || devs[0].Firmware.Agent.Version != "1.0.3" {
		t.Errorf("devices --json = %q, want gw-1's firmware.agent.version", out)
	}

	code, out, errs = stationCLI(t, "firmware", "rollout", "status", "--dir", dir, "r1", "--devices")
	if code != 0 || !strings.Contains(out, "rollout r1: iotagent@1.1.0, running, wave 1 of 2") || !strings.Contains(out, "the next opens by") || strings.Count(out, "gw-") != 3 {
		t.Errorf("rollout status --devices = %d %q %q", code, out, errs)
	}
	if code, out, _ := stationCLI(t, "firmware", "rollout", "status", "--dir", dir); code != 0 || !strings.Contains(out, "r1  iotagent@1.1.0  running  1/2") {
		t.Errorf("rollout status = %d %q", code, out)
	}
	if code, out, errs := stationCLI(t, "firmware", "rollout", "pause", "--dir", dir, "r1"); code != 0 || !strings.Contains(out, "paused rollout r1") {
		t.Errorf("rollout pause = %d %q %q", code, out, errs)
	}
	for _, tc := range []struct {
		name string
		args []string
		code int
		want string
	}{
		{"second rollout", []string{"create", "--dir", dir, "--release", "iotagent@1.1.0", "--all"}, 1, "rollout r1 of iotagent@1.1.0 is paused"},
		{"not published", []string{"create", "--dir", dir, "--release", "iotagent@2.0.0", "--all"}, 1, "is not published"},
		{"no release", []string{"create", "--dir", dir, "--all"}, 2, "--release NAME@VERSION is required"},
		{"devices and all", []string{"create", "--dir", dir, "--release", "iotagent@1.1.0", "--all", "--devices", "gw-1"}, 2, "want --devices ID... or --all"},
		{"bad waves", []string{"create", "--dir", dir, "--release", "iotagent@1.1.0", "--all", "--waves", "10%,x"}, 2, `--waves "x"`},
		{"last wave not 100%", []string{"create", "--dir", dir, "--release", "iotagent@1.1.0", "--all", "--waves", "10%,50%"}, 1, "the last wave must be 100%"},
		{"bad max failures", []string{"create", "--dir", dir, "--release", "iotagent@1.1.0", "--all", "--max-failures", "lots"}, 2, `--max-failures "lots"`},
		{"stray argument", []string{"create", "--dir", dir, "--release", "iotagent@1.1.0", "--all", "gw-1"}, 2, `unexpected argument "gw-1"`},
		{"unknown rollout", []string{"status", "--dir", dir, "r9"}, 1, `unknown rollout "r9"`},
		{"pause paused", []string{"pause", "--dir", dir, "r1"}, 1, "rollout r1 is paused, not running"},
		{"abort without ID", []string{"abort", "--dir", dir}, 2, "want the rollout ID"},
		{"unknown subcommand", []string{"frob", "--dir", dir}, 2, `unknown command "rollout frob"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := stationCLI(t, append([]string{"firmware", "rollout"}, tc.args...)...)
			if code != tc.code || strings.Count(errs, "\n") != 1 || !strings.Contains(errs, tc.want) {
				t.Errorf("= %d %q, want %d and one line with %q", code, errs, tc.code, tc.want)
			}
		})
	}

	// The station stopped: the commands open its directory.
	stop()
	code, out, errs = stationCLI(t, "firmware", "rollout", "status", "--dir", dir, "r1", "--json")
	var st station.RolloutStatus
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || st.State != station.RolloutPaused || len(st.DeviceSteps) != 3 || st.Progress[0].Devices != 1 {
		t.Fatalf("rollout status --json, stopped = %d %q %q", code, out, errs)
	}
	for _, step := range []struct{ args, want string }{{"resume", "resumed rollout r1"}, {"abort", "aborted rollout r1"}} {
		if code, out, errs := stationCLI(t, "firmware", "rollout", step.args, "--dir", dir, "r1"); code != 0 || !strings.Contains(out, step.want) {
			t.Errorf("rollout %s, stopped = %d %q %q", step.args, code, out, errs)
		}
	}
	if code, out, _ := stationCLI(t, "firmware", "rollout", "status", "--dir", dir, "r1"); code != 0 || !strings.Contains(out, "aborted") {
		t.Errorf("rollout status after abort = %d %q", code, out)
	}
	if code, _, errs := stationCLI(t, "firmware", "rollout", "abort", "--dir", dir, "r1"); code != 1 || !strings.Contains(errs, "rollout r1 is aborted already") {
		t.Errorf("abort twice = %d %q", code, errs)
	}
	if code, out, errs := stationCLI(t, "firmware", "rollout", "create", "--dir", dir, "--release", "iotagent@1.1.0", "--all"); code != 0 || !strings.Contains(out, "rollout r2:") {
		t.Errorf("rollout create, stopped = %d %q %q", code, out, errs)
	}
}
