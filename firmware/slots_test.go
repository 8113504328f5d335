package firmware_test

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/firmware"
	"iotagent.dev/iotagent/firmware/release"
)

// release returns a stand-in agent binary holding content and its
// manifest.
func agentRelease(t *testing.T, version, content string) (string, *release.Manifest) {
	t.Helper()
	sum := sha256.Sum256([]byte(content))
	return binaryFile(t, content), &release.Manifest{Name: "iotagent", Type: release.TypeAgent, Version: version, SVN: 1,
		HW: []string{"linux/armv7"}, Length: int64(len(content)), SHA256: hex.EncodeToString(sum[:])}
}

func stage(t *testing.T, s *firmware.Slots, version, content string) error {
	t.Helper()
	p, m := agentRelease(t, version, content)
	return s.Stage(p, m)
}

// binaryFile writes a stand-in agent binary holding content.
func binaryFile(t *testing.T, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "payload")
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading %s: %v", path, err)
	}
	return string(b)
}

func TestSlotsTrialCommitRollback(t *testing.T) {
	s, err := firmware.OpenSlots(filepath.Join(t.TempDir(), "fw"))
	if err != nil {
		t.Fatal(err)
	}
	if p, trial, err := s.Next(); p != "" || trial || err != nil {
		t.Fatalf("Next before any update = %q %v %v, want the launcher itself", p, trial, err)
	}
	if err := stage(t, s, "1.5.0", "v1.5"); err != nil {
		t.Fatal(err)
	}
	if err := stage(t, s, "9.0.0", "v9"); !errors.Is(err, firmware.ErrTrialPending) {
		t.Errorf("Stage during a trial = %v, want ErrTrialPending", err)
	}
	p, trial, err := s.Next()
	if err != nil || !trial || read(t, p) != "v1.5" {
		t.Fatalf("Next with a trial = %q %v %v", p, trial, err)
	}
	if fi, _ := os.Stat(p); fi.Mode().Perm() != 0o755 {
		t.Errorf("the trial binary's mode is %v, want 0755", fi.Mode().Perm())
	}
	if _, err := s.Commit(); err != nil {
		t.Fatal(err)
	}
	committed, trial, _ := s.Next()
	if trial || read(t, committed) != "v1.5" {
		t.Fatalf("Next after commit = %q %v", committed, trial)
	}
	// The next release goes to the other slot; a failed trial is marked
	// bad and the committed binary runs again.
	if err := stage(t, s, "1.6.0", "v1.6"); err != nil {
		t.Fatal(err)
	}
	if p, _, _ := s.Next(); p == committed || read(t, p) != "v1.6" {
		t.Fatalf("the second release went to %s", p)
	}
	if err := s.Rollback("uplink never delivered"); err != nil {
		t.Fatal(err)
	}
	if p, trial, _ := s.Next(); p != committed || trial {
		t.Errorf("Next after a rollback = %q %v, want the committed %s", p, trial, committed)
	}
	if err := stage(t, s, "1.6.0", "v1.6"); !errors.Is(err, firmware.ErrMarkedBad) {
		t.Errorf("staging the release marked bad = %v, want ErrMarkedBad", err)
	}
	st, _ := s.State()
	if st.Last == nil || st.Last.Result != "rolled-back" || st.Last.Reason != "uplink never delivered" {
		t.Errorf("last result = %+v", st.Last)
	}
}

// A trial that crashes at every start is rolled back after the attempt
// limit; one that never becomes healthy, at its deadline.
func TestSlotsRollBackByThemselves(t *testing.T) {
	t.Run("crash loop", func(t *testing.T) {
		s, _ := firmware.OpenSlots(filepath.Join(t.TempDir(), "fw"))
		stage(t, s, "2.0.0", "bad")
		for i := range 3 {
			if _, trial, err := s.Next(); !trial || err != nil {
				t.Fatalf("start %d = trial %v, %v", i+1, trial, err)
			}
		}
		if p, trial, err := s.Next(); p != "" || trial || err != nil {
			t.Fatalf("the 4th start = %q %v %v, want the known-good binary", p, trial, err)
		}
		st, _ := s.State()
		if st.Last == nil || !strings.Contains(st.Last.Reason, "3 starts") || len(st.Bad) != 1 {
			t.Errorf("state = %+v", st)
		}
	})
	t.Run("deadline", func(t *testing.T) {
		now := time.Now()
		s, _ := firmware.OpenSlots(filepath.Join(t.TempDir(), "fw"))
		s.Now = func() time.Time { return now }
		stage(t, s, "2.0.0", "slow")
		if _, trial, _ := s.Next(); !trial {
			t.Fatal("the first start is not the trial")
		}
		now = now.Add(s.Deadline + time.Second)
		if _, trial, _ := s.Next(); trial {
			t.Fatal("a trial past its deadline started again")
		}
		if st, _ := s.State(); st.Last == nil || !strings.Contains(st.Last.Reason, "not healthy within") {
			t.Errorf("state = %+v", st)
		}
	})
}

// A crash between any two steps of staging leaves a state that names
// only intact binaries: the committed one runs, and staging again works.
func TestSlotsCrashWhileStaging(t *testing.T) {
	for _, step := range []string{"binary copied, not synced", "binary written", "binary in place"} {
		t.Run(step, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "fw")
			s, _ := firmware.OpenSlots(dir)
			stage(t, s, "1.0.0", "v1")
			s.Next()
			if _, err := s.Commit(); err != nil {
				t.Fatal(err)
			}
			crash := errors.New("crash")
			s.SetCrash(func(at string) error {
				if at == step {
					return crash
				}
				return nil
			})
			if err := stage(t, s, "2.0.0", "v2"); !errors.Is(err, crash) {
				t.Fatalf("Stage = %v, want the crash", err)
			}
			// The agent starts again.
			again, err := firmware.OpenSlots(dir)
			if err != nil {
				t.Fatal(err)
			}
			p, trial, err := again.Next()
			if err != nil || trial || read(t, p) != "v1" {
				t.Fatalf("after the crash Next = %q %v %v, want the committed v1", p, trial, err)
			}
			if err := stage(t, again, "2.0.0", "v2"); err != nil {
				t.Fatalf("staging again: %v", err)
			}
			if p, trial, _ := again.Next(); !trial || read(t, p) != "v2" {
				t.Errorf("the trial after staging again = %q %v", p, trial)
			}
		})
	}
}

// What review found the slots let through.
func TestSlotsRefuse(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "fw")
	s, _ := firmware.OpenSlots(dir)
	p, m := agentRelease(t, "1.0.0", "signed")
	os.WriteFile(p, []byte("swapped"), 0o600) // changed after it was verified
	if err := s.Stage(p, m); !errors.Is(err, firmware.ErrDigest) {
		t.Errorf("staging a file that is not the signed payload = %v, want ErrDigest", err)
	}
	p, m = agentRelease(t, "1.0.0", "image")
	m.Type = release.TypeImage
	if err := s.Stage(p, m); err == nil || !strings.Contains(err.Error(), `only "agent" releases`) {
		t.Errorf("staging an image release into the agent's slots = %v", err)
	}
	if err := stage(t, s, "1.0.0", "v1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Commit(); err == nil || !strings.Contains(err.Error(), "has not run yet") {
		t.Errorf("committing a trial that never ran = %v", err)
	}
	// The trial's binary went missing: rolled back at once.
	st, _ := s.State()
	os.Remove(filepath.Join(dir, "slots", st.Trial.Slot, "iotagent"))
	if p, trial, err := s.Next(); trial || err != nil || p != "" {
		t.Errorf("Next with the trial's binary gone = %q %v %v, want a rollback to the launcher", p, trial, err)
	}
	if st, _ := s.State(); st.Last == nil || !strings.Contains(st.Last.Reason, "missing") {
		t.Errorf("state = %+v", st)
	}
	// A state naming another slot than a or b is refused.
	os.WriteFile(filepath.Join(dir, "state.json"), []byte(`{"active":"../../../../bin"}`), 0o600)
	if _, _, err := s.Next(); err == nil {
		t.Error("a state naming a slot outside the slots was used")
	}
}

// A crash in the middle of Stage or of a state.json write leaves a slot
// copy and a temporary file that nothing reads or removes: the
// launcher removes them at start (RemoveLeftovers), and leaves the
// state and the slots alone.
func TestSlotsRemoveLeftovers(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "fw")
	s, err := firmware.OpenSlots(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := stage(t, s, "1.5.0", "v1.5"); err != nil {
		t.Fatal(err)
	}
	crash := errors.New("crash")
	s.SetCrash(func(step string) error {
		if step == "binary written" {
			return crash
		}
		return nil
	})
	s.Rollback("test")
	if err := stage(t, s, "1.6.0", "v1.6"); !errors.Is(err, crash) {
		t.Fatalf("Stage cut at binary written = %v", err)
	}
	tmp := filepath.Join(dir, ".state.json.tmp-123")
	os.WriteFile(tmp, []byte(`{"act`), 0o600)
	before, _ := s.State()
	if err := s.RemoveLeftovers(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{tmp, filepath.Join(dir, "slots", "a", "iotagent.new")} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("after RemoveLeftovers %s: %v, want gone", p, err)
		}
	}
	if after, _ := s.State(); len(after.Bad) != len(before.Bad) || read(t, filepath.Join(dir, "slots", "a", "iotagent")) != "v1.5" {
		t.Errorf("RemoveLeftovers changed the state or a slot: %+v, slot a %q", after, read(t, filepath.Join(dir, "slots", "a", "iotagent")))
	}
}
