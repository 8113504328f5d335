package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"iotagent.dev/iotagent/internal/testdirs"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// cli runs iotagent in-process and returns exit code, stdout and stderr.
func cli(t testing.TB, args ...string) (int, string, string) {
	t.Helper()
	return cliStdin(t, "", args...)
}

// cliStdin is cli with stdin reading stdin.
func cliStdin(t testing.TB, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(context.Background(), args, strings.NewReader(stdin), &out, &errb)
	return code, out.String(), errb.String()
}

// tree records every path under dir with its content and mode.
func tree(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		fi, _ := d.Info()
		c, _ := os.ReadFile(p)
		b.WriteString(p + " " + fi.Mode().String() + " " + string(c) + "\n")
		return nil
	})
	return b.String()
}

func TestKeygenAndInfo(t *testing.T) {
	sim := tpmtest.New(t)
	state := filepath.Join(t.TempDir(), "state")

	code, out, errs := cli(t, "--tpm", sim.Spec, "--state-dir", state, "tpm", "keygen")
	if code != 0 || !strings.Contains(out, "created device key") {
		t.Fatalf("keygen = %d, %q, %q; want 0 and 'created device key'", code, out, errs)
	}
	fi, err := os.Stat(state)
	if err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode = %v, %v; want 0700", fi.Mode().Perm(), err)
	}
	first, _ := os.ReadFile(filepath.Join(state, "device-key.json"))

	// Idempotent, and flags work after the command too.
	code, out, _ = cli(t, "tpm", "keygen", "--tpm", sim.Spec, "--state-dir", state)
	if code != 0 || !strings.Contains(out, "device key exists") {
		t.Fatalf("second keygen = %d, %q; want 0 and 'device key exists'", code, out)
	}
	if again, _ := os.ReadFile(filepath.Join(state, "device-key.json")); !bytes.Equal(first, again) {
		t.Error("second keygen changed the key file")
	}

	code, out, errs = cli(t, "--tpm", sim.Spec, "--state-dir", state, "tpm", "info", "--json")
	if code != 0 {
		t.Fatalf("tpm info = %d, %s", code, errs)
	}
	var info struct {
		Manufacturer   string `json:"manufacturer"`
		EKCertificates []struct {
			NVIndex  string `json:"nv_index"`
			Subject  string `json:"subject"`
			Issuer   string `json:"issuer"`
			NotAfter string `json:"not_after"`
			KeyType  string `json:"key_type"`
		} `json:"ek_certificates"`
		DeviceKey *struct {
			PublicSHA256 string   `json:"public_sha256"`
			Attributes   []string `json:"attributes"`
			BlobPath     string   `json:"blob_path"`
			Handle       string   `json:"handle"`
			Usable       bool     `json:"usable"`
		} `json:"device_key"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("tpm info --json: %v\n%s", err, out)
	}
	if info.Manufacturer != "IBM" {
		t.Errorf("manufacturer = %q, want IBM (swtpm)", info.Manufacturer)
	}
	if len(info.EKCertificates) != 2 || info.EKCertificates[0].NVIndex != "0x01c00002" ||
		info.EKCertificates[1].KeyType != "ecc-p384" || info.EKCertificates[0].Issuer == "" || info.EKCertificates[0].NotAfter == "" {
		t.Errorf("ek_certificates = %+v, want rsa2048 at 0x01c00002 and ecc-p384", info.EKCertificates)
	}
	dk := info.DeviceKey
	if dk == nil || len(dk.PublicSHA256) != 64 || !dk.Usable || dk.BlobPath != filepath.Join(state, "device-key.json") {
		t.Fatalf("device_key = %+v", dk)
	}
	if strings.Join(dk.Attributes, ",") != "fixedTPM,fixedParent,sensitiveDataOrigin,userWithAuth,noDA,sign" {
		t.Errorf("attributes = %v", dk.Attributes)
	}
	if !strings.Contains(out, `"public_sha256": "`+dk.PublicSHA256) || !strings.Contains(out, `"ek_certificates"`) {
		t.Error("JSON keys differ from the documented ones")
	}

	// Persisting an existing key keeps it and records the handle.
	code, out, errs = cli(t, "--tpm", sim.Spec, "--state-dir", state, "tpm", "keygen", "--persist", "0x81000020")
	if code != 0 || !strings.Contains(out, "persistent handle 0x81000020") {
		t.Fatalf("keygen --persist = %d, %q, %q", code, out, errs)
	}
	_, out, _ = cli(t, "--tpm", sim.Spec, "--state-dir", state, "tpm", "info", "--json")
	if !strings.Contains(out, `"handle": "0x81000020"`) || !strings.Contains(out, dk.PublicSHA256) {
		t.Errorf("info after --persist lacks the handle or changed key:\n%s", out)
	}

	// --force replaces the key.
	code, out, _ = cli(t, "--tpm", sim.Spec, "--state-dir", state, "tpm", "keygen", "--force")
	if code != 0 || !strings.Contains(out, "created device key") || strings.Contains(out, dk.PublicSHA256) {
		t.Errorf("keygen --force = %d, %q; want a new key", code, out)
	}
}

func TestBadInput(t *testing.T) {
	sim := tpmtest.New(t)
	other := tpmtest.Start(t, tpmtest.Options{Identity: 1})

	goodState := filepath.Join(t.TempDir(), "good")
	if code, _, errs := cli(t, "--tpm", sim.Spec, "--state-dir", goodState, "tpm", "keygen"); code != 0 {
		t.Fatalf("keygen: %s", errs)
	}
	goodKey, _ := os.ReadFile(filepath.Join(goodState, "device-key.json"))

	withKey := func(content []byte) string {
		d := filepath.Join(t.TempDir(), "state")
		os.MkdirAll(d, 0o700)
		os.WriteFile(filepath.Join(d, "device-key.json"), content, 0o600)
		return d
	}
	ro := testdirs.ReadOnly(t)
	missingSock := filepath.Join(t.TempDir(), "nope.sock")

	for _, tc := range []struct {
		name     string
		tpm      string
		state    string
		args     []string
		wantCode int
		want     string
	}{
		{"unknown spec scheme", "mssim:127.0.0.1:2321", t.TempDir(), []string{"tpm", "keygen"}, 2, `unknown scheme "mssim"`},
		{"unreachable socket", "unix:" + missingSock, t.TempDir(), []string{"tpm", "keygen"}, 1, missingSock},
		{"missing device", "/dev/tpmrm99", t.TempDir(), []string{"tpm", "info"}, 1, "/dev/tpmrm99"},
		{"truncated key blob", sim.Spec, withKey(goodKey[:len(goodKey)/3]), []string{"tpm", "keygen"}, 1, "corrupt key file"},
		{"edited key blob", sim.Spec, withKey(bytes.Replace(goodKey, []byte(`"private": "`), []byte(`"private": "AAAA`), 1)), []string{"tpm", "keygen"}, 1, "checksum mismatch"},
		{"key from another TPM", other.Spec, withKey(goodKey), []string{"tpm", "keygen"}, 1, "key belongs to a different TPM"},
		{"state dir not writable", sim.Spec, ro, []string{"tpm", "keygen"}, 1, "state dir " + ro + " is not writable"},
		{"state dir under a file", sim.Spec, filepath.Join(withKey(goodKey), "device-key.json", "sub"), []string{"tpm", "keygen"}, 1, "not a directory"},
		{"bad persist handle", sim.Spec, t.TempDir(), []string{"tpm", "keygen", "--persist", "0x01c00002"}, 2, "--persist"},
		{"unknown command", sim.Spec, t.TempDir(), []string{"frobnicate"}, 2, `unknown command "frobnicate"`},
		{"unknown tpm subcommand", sim.Spec, t.TempDir(), []string{"tpm", "erase"}, 2, `unknown subcommand "erase"`},
		{"unknown flag", sim.Spec, t.TempDir(), []string{"tpm", "keygen", "--bogus"}, 2, "bogus"},
		{"stray argument", sim.Spec, t.TempDir(), []string{"tpm", "info", "extra"}, 2, `unexpected argument "extra"`},
		{"renamed send flag", sim.Spec, t.TempDir(), []string{"send", "--socket", "/run/x.sock", "-"}, 2, "--socket is now --ingest-socket"},
		{"config file missing", sim.Spec, t.TempDir(), []string{"--config", "/nonexistent/agent.toml", "status"}, 2, "/nonexistent/agent.toml"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			parent := filepath.Dir(tc.state)
			before := tree(t, parent)
			args := append([]string{"--tpm", tc.tpm, "--state-dir", tc.state}, tc.args...)
			code, _, errs := cli(t, args...)
			if code != tc.wantCode {
				t.Errorf("exit code = %d, want %d (stderr %q)", code, tc.wantCode, errs)
			}
			if lines := strings.Split(strings.TrimSpace(errs), "\n"); len(lines) != 1 ||
				!strings.HasPrefix(lines[0], "iotagent: ") || !strings.Contains(lines[0], tc.want) {
				t.Errorf("stderr = %q, want exactly one line 'iotagent: …%s…'", errs, tc.want)
			}
			if after := tree(t, parent); after != before {
				t.Errorf("files changed on disk:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	code, out, _ := cli(t, "version")
	if code != 0 || !strings.Contains(out, runtime.Version()) || !strings.Contains(out, "iotagent ") {
		t.Errorf("version = %d, %q", code, out)
	}
}
