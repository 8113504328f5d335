package main

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/internal/testdirs"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// The example file documents every key; it must load, and flags must win
// over it.
func TestExampleConfig(t *testing.T) {
	c, err := loadConfig("../../examples/config.toml")
	if err != nil {
		t.Fatalf("examples/config.toml: %v", err)
	}
	if c.TPM != "/dev/tpmrm0" || c.Queue.OnFull != "drop-oldest" || c.Ingest.Socket != "/run/iotagent/ingest.sock" {
		t.Errorf("config = %+v", c)
	}
	e := &env{stateDir: defaultStateDir}
	s, err := e.settings("../../examples/config.toml", true, "mqtts://other:8883", "", "/tmp/x.sock", false)
	if err != nil {
		t.Fatal(err)
	}
	if s.uplinkURL != "mqtts://other:8883" || s.socket != "/tmp/x.sock" || s.maxBytes != 64<<20 || s.onFull != store.DropOldest ||
		s.interval != time.Minute || s.maxPayload != 0 || s.keepKey { // max_payload: the uplink's default
		t.Errorf("settings = %+v", s)
	}
}

func TestConfigBadInput(t *testing.T) {
	for _, tc := range []struct {
		name, body, want string
	}{
		{"unknown key", "[queue]\nmax_byte = \"1MiB\"\n", "unknown key queue.max_byte"},
		{"bad size", "[queue]\nmax_bytes = \"lots\"\n", `[queue] max_bytes: size "lots"`},
		{"bad policy", "[queue]\non_full = \"drop-newest\"\n", "want drop-oldest or reject"},
		{"bad interval", "[collectors]\ninterval = \"10ms\"\n", "below 1s"},
		{"not TOML", "tpm = \n", "config"},
		{"wrong type", "[uplink]\nwindow = \"eight\"\n", "window"},
		{"bad log level", "[log]\nlevel = \"loud\"\n", "want debug, info, warn or error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.toml")
			os.WriteFile(p, []byte(tc.body), 0o600)
			e := &env{stateDir: defaultStateDir}
			_, err := e.settings(p, true, "", "", "", false)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("settings = %v, want an error containing %q", err, tc.want)
			}
			var ue usageError
			if err != nil && !asUsage(err, &ue) {
				t.Errorf("a bad config must be a usage error (exit 2): %v", err)
			}
		})
	}
	e := &env{stateDir: defaultStateDir}
	if _, err := e.settings("/nonexistent/config.toml", true, "", "", "", false); err == nil || !strings.Contains(err.Error(), "/nonexistent/config.toml") {
		t.Errorf("missing explicit config = %v", err)
	}
	if _, err := e.settings("/nonexistent/config.toml", false, "", "", "", false); err != nil {
		t.Errorf("missing default config = %v, want defaults", err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"64MiB": 64 << 20, "512KiB": 512 << 10, "1GB": 1e9, "1048576": 1 << 20, "10 MiB": 10 << 20} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1MiB", "0", "1.5MiB", "MiB", "1TB"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) succeeded", bad)
		}
	}
}

func asUsage(err error, target *usageError) bool { return errors.As(err, target) }

func TestRunBadStateDir(t *testing.T) {
	sim := tpmtest.New(t)
	sock := filepath.Join(t.TempDir(), "s", "ingest.sock")
	missing := filepath.Join(t.TempDir(), "fresh")
	ro := testdirs.ReadOnly(t)
	for _, tc := range []struct {
		name, dir, want string
	}{
		{"missing state dir, nothing to enroll with", missing, "not enrolled: run iotagent enroll, or set [station] url"},
		{"read-only state dir", ro, "read-only file system"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := agent(t, "--tpm", sim.Spec, "--state-dir", tc.dir, "run", "--config", "/dev/null", "--ingest-socket", sock)
			if code != 1 || !strings.Contains(errs, tc.want) {
				t.Errorf("run = %d, %q; want 1 and %q", code, errs, tc.want)
			}
		})
	}
}
