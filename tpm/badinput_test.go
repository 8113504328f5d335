package tpm_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"iotagent.dev/iotagent/internal/testdirs"
	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestParseSpec(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    tpm.Spec
		wantErr string
	}{
		{"", tpm.Spec{Kind: tpm.Device, Path: "/dev/tpmrm0"}, ""},
		{"/dev/tpm0", tpm.Spec{Kind: tpm.Device, Path: "/dev/tpm0"}, ""},
		{"unix:/run/swtpm.sock", tpm.Spec{Kind: tpm.UnixSocket, Path: "/run/swtpm.sock"}, ""},
		{"tcp:127.0.0.1:2321", tpm.Spec{Kind: tpm.TCP, Addr: "127.0.0.1:2321"}, ""},
		{"mssim:127.0.0.1:2321", tpm.Spec{}, `unknown scheme "mssim"`},
		{"unix:", tpm.Spec{}, "needs a socket path"},
		{"tcp:localhost", tpm.Spec{}, "needs HOST:PORT"},
		{"tpmrm0", tpm.Spec{}, "want a device path"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := tpm.ParseSpec(tc.in)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) || !errors.Is(err, tpm.ErrBadSpec) {
					t.Fatalf("ParseSpec(%q) = %v, want ErrBadSpec containing %q", tc.in, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("ParseSpec(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
			}
			if tc.in != "" && got.String() != tc.in {
				t.Errorf("String() = %q, want %q", got.String(), tc.in)
			}
		})
	}
}

func TestOpenUnreachableNamesPath(t *testing.T) {
	dir := t.TempDir()
	regular := filepath.Join(dir, "not-a-device")
	os.WriteFile(regular, nil, 0o600)
	for _, spec := range []string{
		"unix:" + filepath.Join(dir, "missing.sock"),
		filepath.Join(dir, "tpmrm9"),
		regular,
		"tcp:127.0.0.1:1",
	} {
		_, err := tpm.Open(spec)
		if !errors.Is(err, tpm.ErrUnreachable) {
			t.Errorf("Open(%s) = %v, want ErrUnreachable", spec, err)
			continue
		}
		name := strings.TrimPrefix(strings.TrimPrefix(spec, "unix:"), "tcp:")
		if !strings.Contains(err.Error(), name) {
			t.Errorf("Open(%s) error %q does not name %s", spec, err, name)
		}
	}
}

// snapshot records every file under dir with its content.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			b, _ := os.ReadFile(p)
			out[p] = string(b)
		}
		return nil
	})
	return out
}

func sameSnapshot(t *testing.T, before, after map[string]string) {
	t.Helper()
	if len(before) != len(after) {
		t.Errorf("files changed: %d before, %d after", len(before), len(after))
	}
	for p, c := range before {
		if after[p] != c {
			t.Errorf("%s changed", p)
		}
	}
}

func TestDamagedKeyFileIsReportedNotReplaced(t *testing.T) {
	sim := tpmtest.New(t)
	tp := sim.Open(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "device-key.json")
	if _, _, err := tp.EnsureKey(path, tpm.KeyOptions{}); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(path)

	for _, tc := range []struct {
		name    string
		content []byte
		want    string
	}{
		{"truncated", good[:len(good)/2], "corrupt key file"},
		{"empty", nil, "corrupt key file"},
		{"edited", []byte(strings.Replace(string(good), `"public": "`, `"public": "AAAA`, 1)), "checksum mismatch"},
		{"not json", []byte("-----BEGIN EC PRIVATE KEY-----\n"), "corrupt key file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			os.WriteFile(path, tc.content, 0o600)
			before := snapshot(t, dir)
			_, _, err := tp.EnsureKey(path, tpm.KeyOptions{})
			if !errors.Is(err, tpm.ErrCorruptKey) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("EnsureKey on %s file = %v, want ErrCorruptKey containing %q", tc.name, err, tc.want)
			}
			if !strings.Contains(err.Error(), path) {
				t.Errorf("error %q does not name %s", err, path)
			}
			sameSnapshot(t, before, snapshot(t, dir))
		})
	}

	// --force replaces a damaged file with a new key.
	os.WriteFile(path, good[:10], 0o600)
	if _, created, err := tp.EnsureKey(path, tpm.KeyOptions{Force: true}); err != nil || !created {
		t.Fatalf("EnsureKey(Force) on damaged file = %v, %v; want a new key", created, err)
	}
}

func TestKeyFromAnotherTPM(t *testing.T) {
	tpA := tpmtest.New(t).Open(t)
	tpB := tpmtest.Start(t, tpmtest.Options{Identity: 1}).Open(t)
	dir := t.TempDir()
	path := filepath.Join(dir, "device-key.json")
	if _, _, err := tpA.EnsureKey(path, tpm.KeyOptions{}); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, dir)
	_, _, err := tpB.EnsureKey(path, tpm.KeyOptions{})
	if !errors.Is(err, tpm.ErrWrongTPM) || !strings.Contains(err.Error(), "key belongs to a different TPM") {
		t.Fatalf("EnsureKey with TPM B on TPM A's key = %v, want ErrWrongTPM", err)
	}
	sameSnapshot(t, before, snapshot(t, dir))

	// Even with a forged parent name, the TPM's integrity check refuses
	// the private blob.
	kf, _ := tpm.ReadKeyFile(path)
	kfB, _ := tpB.CreateKey()
	kf.ParentName = kfB.ParentName
	if _, err := tpB.LoadKey(kf); !errors.Is(err, tpm.ErrWrongTPM) {
		t.Errorf("LoadKey with forged parent name = %v, want ErrWrongTPM", err)
	}
}

func TestStateDirNotWritable(t *testing.T) {
	tp := tpmtest.New(t).Open(t)
	dir := testdirs.ReadOnly(t)
	_, _, err := tp.EnsureKey(filepath.Join(dir, "device-key.json"), tpm.KeyOptions{})
	if err == nil || !strings.Contains(err.Error(), "state dir "+dir+" is not writable") {
		t.Fatalf("EnsureKey in read-only dir = %v, want 'state dir %s is not writable'", err, dir)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Errorf("read-only dir has %d entries after the failure", len(entries))
	}
}

func TestParseHandle(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint32
		err  string
	}{
		{"0x81000010", 0x81000010, ""},
		{"0X81000001", 0x81000001, ""},
		{"81000010", 0, "want hex"},
		{"0x81010001", 0, "endorsement key range"},
		{"0x81800000", 0, "outside the owner range"},
		{"0xzz", 0, "want hex"},
	} {
		h, err := tpm.ParseHandle(tc.in)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("ParseHandle(%q) = %v, want error %q", tc.in, err, tc.err)
			}
			continue
		}
		if err != nil || uint32(h) != tc.want {
			t.Errorf("ParseHandle(%q) = %#x, %v; want %#x", tc.in, h, err, tc.want)
		}
	}
}
