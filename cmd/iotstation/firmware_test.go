package main

import (
	"crypto/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
