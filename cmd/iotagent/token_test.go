package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// The one-time token need not be on the command line, where every local
// user reads it in ps and /proc/PID/cmdline: enroll takes it from a file
// (--token-file, [station] token_file) or from stdin (--token-file -).
func TestEnrollTokenFromFileOrStdin(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	token := func(id string) string {
		tok, err := st.CreateToken(id, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return tok.Credential()
	}
	file := func(content string) string {
		p := filepath.Join(t.TempDir(), "token")
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	config := func(key, value string) string {
		p := filepath.Join(t.TempDir(), "config.toml")
		if err := os.WriteFile(p, fmt.Appendf(nil, "[station]\nurl = %q\nfingerprint = %q\n%s = %q\n", st.URL, st.Fingerprint, key, value), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	station := []string{"--station", st.URL, "--station-fingerprint", st.Fingerprint}
	for _, tc := range []struct {
		name  string
		id    string // the device the token enrolls; "" when enrollment must fail
		args  func(tok string) []string
		stdin func(tok string) string
		code  int
		want  string // in stdout, or in stderr when code != 0
	}{
		{"file", "gw-file", func(tok string) []string {
			return append([]string{"enroll", "--token-file", file(tok + "\n")}, station...)
		}, nil, 0, "enrolled as gw-file by simpleenroll"},
		{"stdin", "gw-stdin", func(string) []string {
			return append([]string{"enroll", "--token-file", "-"}, station...)
		}, func(tok string) string { return tok + "\n" }, 0, "enrolled as gw-stdin by simpleenroll"},
		{"config key", "gw-config", func(tok string) []string {
			return []string{"--config", config("token_file", file(tok)), "enroll"}
		}, nil, 0, "enrolled as gw-config by simpleenroll"},
		{"flag beats the key", "gw-flag", func(tok string) []string {
			return []string{"--config", config("token", "gw-other:wrong"), "enroll", "--token-file", file(tok)}
		}, nil, 0, "enrolled as gw-flag by simpleenroll"},
		{"--token still works", "gw-argv", func(tok string) []string {
			return append([]string{"enroll", "--token", tok}, station...)
		}, nil, 0, "enrolled as gw-argv by simpleenroll"},
		{"both flags", "", func(string) []string {
			return append([]string{"enroll", "--token", "a:b", "--token-file", "/dev/null"}, station...)
		}, nil, 2, "at most one of --token and --token-file"},
		{"both keys", "", func(string) []string {
			p := config("token", "a:b")
			f, _ := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			fmt.Fprintf(f, "token_file = %q\n", file("a:b"))
			f.Close()
			return []string{"--config", p, "enroll"}
		}, nil, 2, "not both"},
		{"missing file", "", func(string) []string {
			return append([]string{"enroll", "--token-file", "/nonexistent/token"}, station...)
		}, nil, 2, "/nonexistent/token"},
		{"empty file", "", func(string) []string {
			return append([]string{"enroll", "--token-file", file(" \n")}, station...)
		}, nil, 2, "empty"},
		{"empty stdin", "", func(string) []string {
			return append([]string{"enroll", "--token-file", "-"}, station...)
		}, nil, 2, "token from stdin: empty"},
		{"stdin in the config", "", func(string) []string {
			return []string{"--config", config("token_file", "-"), "enroll"}
		}, nil, 2, `token_file "-"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var tok string
			if tc.id != "" {
				tok = token(tc.id)
			}
			stdin := ""
			if tc.stdin != nil {
				stdin = tc.stdin(tok)
			}
			sim := tpmtest.Start(t, tpmtest.Options{NoEKCertificate: true})
			state := filepath.Join(t.TempDir(), "state")
			args := append([]string{"--tpm", sim.Spec, "--state-dir", state}, tc.args(tok)...)
			code, out, errs := cliStdin(t, stdin, args...)
			got := out
			if tc.code != 0 {
				got = errs
			}
			if code != tc.code || !strings.Contains(got, tc.want) {
				t.Errorf("iotagent %s = %d, %q, %q; want %d and %q", strings.Join(args, " "), code, out, errs, tc.code, tc.want)
			}
			if _, err := os.Stat(filepath.Join(state, "cert.pem")); (err == nil) != (tc.code == 0) {
				t.Errorf("certificate stored: %v, want %v", err == nil, tc.code == 0)
			}
		})
	}
}
