package agent

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"iotagent.dev/iotagent/firmware/release/releasetest"
)

// A kill between Stage and the removal of the download left the
// complete payload in FIRMWARE/download for good (only the next
// update's stage cleaned the directory, and a release rolled back is
// refused before that). The launcher removes complete downloads, and
// what a crash left in the slots, and keeps a resumable .part.
func TestLaunchRemovesWhatACrashLeft(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	root, _ := releasetest.Public(releasetest.Key(t)).MarshalText()
	a, err := New(Config{TPM: "unix:/nonexistent", StateDir: state, Firmware: FirmwareConfig{RootKeys: []string{string(root)}}})
	if err != nil {
		t.Fatal(err)
	}
	fw := filepath.Join(state, "firmware")
	dl := filepath.Join(fw, "download")
	for _, d := range []string{dl, filepath.Join(fw, "slots", "a")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{"download/iotagent-1.1.0", "download/iotagent-1.2.0.part", "download/iotagent-1.2.0.part.json", ".state.json.tmp-1", "slots/a/iotagent.new"} {
		if err := os.WriteFile(filepath.Join(fw, p), []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.Launch(); err != nil {
		t.Fatalf("Launch with nothing staged = %v", err)
	}
	var left []string
	filepath.Walk(fw, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			rel, _ := filepath.Rel(fw, p)
			left = append(left, rel)
		}
		return nil
	})
	if want := []string{"download/iotagent-1.2.0.part", "download/iotagent-1.2.0.part.json"}; !slices.Equal(left, want) {
		t.Errorf("after Launch the firmware directory holds %q, want %q", left, want)
	}
}

// A command handed to the agent that it did not read before its sender
// gave up (the agent was down) is dropped, not carried out later.
func TestStaleFirmwareRequestDropped(t *testing.T) {
	state := filepath.Join(t.TempDir(), "state")
	root, _ := releasetest.Public(releasetest.Key(t)).MarshalText()
	a, err := New(Config{TPM: "unix:/nonexistent", StateDir: state, Firmware: FirmwareConfig{RootKeys: []string{string(root)}}})
	if err != nil {
		t.Fatal(err)
	}
	u, err := (&daemon{a: a, clock: a.clock()}).newUpdater()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		sent time.Time
		want bool
	}{{time.Now().Add(-2 * firmwareRequestWait), false}, {time.Now(), true}} {
		b, _ := json.Marshal(fwRequest{ID: "x", Op: opRollback, Sent: c.sent})
		if err := os.WriteFile(requestPath(a.s.dir.Firmware()), b, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, ok := u.takeRequest(); ok != c.want {
			t.Errorf("request sent at %v taken = %v, want %v", c.sent, ok, c.want)
		}
		if _, err := os.Stat(requestPath(a.s.dir.Firmware())); !os.IsNotExist(err) {
			t.Errorf("request.json left after takeRequest: %v", err)
		}
	}
}
