package agent

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/store"
)

// The example file documents every key; it must load, and fields set
// over it (as flags do) must win.
func TestExampleConfig(t *testing.T) {
	c, err := LoadConfig("../examples/config.toml")
	if err != nil {
		t.Fatalf("examples/config.toml: %v", err)
	}
	if c.TPM != "/dev/tpmrm0" || c.Queue.OnFull != "drop-oldest" || c.Ingest.Socket != "/run/iotagent/ingest.sock" {
		t.Errorf("config = %+v", c)
	}
	c.Uplink.URL, c.Ingest.Socket = "mqtts://other:8883", "/tmp/x.sock"
	s, err := c.parse()
	if err != nil {
		t.Fatal(err)
	}
	if s.socket != "/tmp/x.sock" || s.maxBytes != 64<<20 || s.onFull != store.DropOldest ||
		s.interval != time.Minute || s.maxPayload != 0 || s.keepKey || s.dir != "/var/lib/iotagent" { // max_payload: the uplink's default
		t.Errorf("settings = %+v", s)
	}
}

// testRoot is a valid base64 ed25519 public key.
const testRoot = "uJ8c0u5m2nF4m6x0yZ1kC8w0Q3lq4o9cYp0mB2o7vPQ="

func TestConfigBadInput(t *testing.T) {
	for _, tc := range []struct {
		name, body, want string
	}{
		{"unknown key", "[queue]\nmax_byte = \"1MiB\"\n", "unknown key queue.max_byte"},
		{"firmware without a root key", "[firmware]\npoll_interval = \"1h\"\n", "[firmware]: no root key"},
		{"bad root key", "[firmware]\nroot_keys = [\"abc\"]\n", `[firmware] root key "abc"`},
		{"threshold above the keys", "[firmware]\nroot_keys = [\"" + testRoot + "\"]\nroot_threshold = 2\n", "root_threshold 2: want 1 to 1"},
		{"short poll", "[firmware]\nroot_keys = [\"" + testRoot + "\"]\npoll_interval = \"1s\"\n", "poll_interval 1s is below 10s"},
		{"counter out of range", "[firmware]\nroot_keys = [\"" + testRoot + "\"]\ncounter_index = \"0x81000001\"\n", "counter_index \"0x81000001\""},
		{"counters overlap", "[firmware]\nroot_keys = [\"" + testRoot + "\"]\nimage_counter_index = \"0x01500101\"\n", "the agent's counter takes"},
		{"install without file", "[firmware]\nroot_keys = [\"" + testRoot + "\"]\n[firmware.image]\ninstall = \"rauc install\"\nmark_good = \"a\"\nmark_bad = \"b\"\nreboot = \"c\"\n", "[firmware.image]"},
		{"bad size", "[queue]\nmax_bytes = \"lots\"\n", `[queue] max_bytes: size "lots"`},
		{"huge size", "[queue]\nmax_bytes = \"99999999999GiB\"\n", `[queue] max_bytes: size`},
		{"bad policy", "[queue]\non_full = \"drop-newest\"\n", "want drop-oldest or reject"},
		{"bad interval", "[collectors]\ninterval = \"10ms\"\n", "below 1s"},
		{"not TOML", "tpm = \n", "config"},
		{"wrong type", "[uplink]\nwindow = \"eight\"\n", "window"},
		{"bad log level", "[log]\nlevel = \"loud\"\n", "want debug, info, warn or error"},
		{"bad TPM", "tpm = \"mssim:1\"\n", `unknown scheme "mssim"`},
		{"bad uplink scheme", "[uplink]\nurl = \"http://broker:80\"\n", `scheme "http" is not MQTT over TLS`},
		{"bad CoAP port", "[uplink]\nurl = \"coaps://collector:99999\"\n", "is not a UDP port"},
		{"missing uplink CA", "[uplink]\nca_file = \"/nonexistent/ca.pem\"\n", "uplink CA: open /nonexistent/ca.pem"},
		{"station with both", "[station]\nurl = \"https://st:8443\"\nfingerprint = \"sha256:00\"\nca_file = \"/x\"\n", "not both"},
		{"bad fingerprint", "[station]\nurl = \"https://st:8443\"\nfingerprint = \"md5:00\"\n", "station fingerprint ([station] fingerprint, --station-fingerprint)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "c.toml")
			os.WriteFile(p, []byte(tc.body), 0o600)
			c, err := LoadConfig(p)
			if err == nil {
				_, err = New(*c)
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("config = %v, want an error containing %q", err, tc.want)
			}
			var ce *ConfigError
			if err != nil && !errors.As(err, &ce) {
				t.Errorf("a bad config must be a *ConfigError (exit 2): %v", err)
			}
		})
	}
	if _, err := LoadDefaultConfig("/nonexistent/config.toml"); err == nil || !strings.Contains(err.Error(), "/nonexistent/config.toml") {
		t.Errorf("missing explicit config = %v", err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"64MiB": 64 << 20, "512KiB": 512 << 10, "1GB": 1e9, "1048576": 1 << 20, "10 MiB": 10 << 20} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "-1MiB", "0", "1.5MiB", "MiB", "1TB", "9999999999GiB"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) succeeded", bad)
		}
	}
}

// [station] is read when enrolling, not before: an enrolled agent whose
// bootstrap CA file is gone, or whose [station] has only a url, runs.
func TestStationCheckedWhenEnrolling(t *testing.T) {
	for _, tc := range []struct {
		name    string
		station StationConfig
		want    string
	}{
		{"no station", StationConfig{}, "no station to enroll with"},
		{"no trust", StationConfig{URL: "https://st:8443"}, "set its fingerprint or CA file"},
		{"CA file gone", StationConfig{URL: "https://st:8443", CAFile: "/nonexistent/root.pem"}, "station CA file ([station] ca_file, --station-ca): open /nonexistent/root.pem"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := Config{Station: tc.station}
			if _, err := c.parse(); err != nil {
				t.Fatalf("parse = %v, want no error before enrolling", err)
			}
			_, _, err := c.stationTrust()
			var ce *ConfigError
			if err == nil || !strings.Contains(err.Error(), tc.want) || !errors.As(err, &ce) {
				t.Errorf("stationTrust = %v, want a *ConfigError containing %q", err, tc.want)
			}
		})
	}
}
