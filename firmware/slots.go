package firmware

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"time"

	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/internal/atomicfile"
)

// Slots is the agent's A/B self-update without bootloader control:
//
//	DIR/slots/a/iotagent, DIR/slots/b/iotagent   the two slots
//	DIR/state.json                                the only source of truth
//
// The binary the system starts is the launcher: it asks Next which
// binary to exec (the committed slot, or a trial, counting the attempt
// first) and execs it in its own process, so systemd's MainPID and
// watchdog hold. A trial that is healthy commits; one that reaches the
// attempt limit or misses its deadline is rolled back and marked bad,
// never to be tried again.
//
//	        Stage                 Next (attempts < max, before deadline)
//	idle ─────────► trial staged ──────────────► trial running ─┐
//	 ▲                   │                         │  Commit    │ crash: Next again
//	 │ Rollback / limit  │                         ▼            │
//	 └───────────────────┴──────────────────── committed ◄──────┘
//
// Every step is one atomic write of state.json (temp, fsync, rename,
// fsync dir); a slot's binary is in place, fsync'ed, before state.json
// names it. A crash between any two steps leaves a state that names only
// intact binaries.
//
// Not safe for concurrent use by several processes: the agent holds its
// state directory's lock.
type Slots struct {
	dir string
	// MaxAttempts is how many starts a trial gets (default 3).
	MaxAttempts int
	// Deadline is how long a trial has to prove healthy (default 5 min).
	Deadline time.Duration
	Now      func() time.Time

	// crash, when set (tests), is called between the steps of Stage with
	// the step's name and stops Stage there when it returns an error.
	crash func(step string) error
}

// SlotState is state.json.
type SlotState struct {
	// Active is the committed slot, "a" or "b"; "" while the installed
	// binary has never been updated (the launcher runs itself).
	Active        string `json:"active,omitempty"`
	ActiveVersion string `json:"active_version,omitempty"`
	// ActiveSVN is the committed release's security version: the TPM
	// counter is raised to it after the commit, and again at every start
	// until it holds (a crash between the two loses nothing).
	ActiveSVN uint32 `json:"active_svn,omitempty"`
	Trial     *Trial `json:"trial,omitempty"`
	// Bad holds releases that failed their trial, as NAME@VERSION.
	Bad  []string    `json:"bad,omitempty"`
	Last *SlotResult `json:"last,omitempty"`
}

// Trial is a staged release on trial.
type Trial struct {
	Slot     string    `json:"slot"`
	Name     string    `json:"name"`
	Version  string    `json:"version"`
	SVN      uint32    `json:"svn"`
	Attempts int       `json:"attempts"`
	Staged   time.Time `json:"staged"`
	// Deadline is set at the trial's first start.
	Deadline time.Time `json:"deadline,omitzero"`
	// Rollout is the station's rollout that assigned the release ("" for
	// one applied locally).
	Rollout string `json:"rollout,omitempty"`
}

// SlotResult is how the last trial ended.
type SlotResult struct {
	Release string    `json:"release"` // NAME@VERSION
	Result  string    `json:"result"`  // committed, rolled-back
	Reason  string    `json:"reason,omitempty"`
	At      time.Time `json:"at"`
	Rollout string    `json:"rollout,omitempty"`
	// Reported: the station has been told (the agent reports a result
	// once, at its first chance after the result was recorded).
	Reported bool `json:"reported,omitempty"`
}

// OpenSlots uses dir (created 0700).
func OpenSlots(dir string) (*Slots, error) {
	for _, d := range []string{dir, filepath.Join(dir, "slots", "a"), filepath.Join(dir, "slots", "b")} {
		if err := atomicfile.MkdirPrivate(d); err != nil {
			return nil, fmt.Errorf("firmware slots: %w", err)
		}
	}
	return &Slots{dir: dir, MaxAttempts: 3, Deadline: 5 * time.Minute, Now: time.Now}, nil
}

func (s *Slots) statePath() string         { return filepath.Join(s.dir, "state.json") }
func (s *Slots) binary(slot string) string { return filepath.Join(s.dir, "slots", slot, "iotagent") }

// State reads state.json (the zero state when there is none).
func (s *Slots) State() (SlotState, error) {
	var st SlotState
	b, err := os.ReadFile(s.statePath())
	if errors.Is(err, os.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return st, fmt.Errorf("firmware slots: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, &StateError{Path: s.statePath(), Err: err}
	}
	if st.Active != "" && st.Active != "a" && st.Active != "b" || st.Trial != nil && st.Trial.Slot != "a" && st.Trial.Slot != "b" {
		return SlotState{}, &StateError{Path: s.statePath(), Err: errors.New("names a slot other than a and b")}
	}
	return st, nil
}

// StateError is a state.json that cannot be read as one: damaged (a
// file system that lost it) or edited by hand.
type StateError struct {
	Path string
	Err  error
}

func (e *StateError) Error() string { return "firmware slots: " + e.Path + ": " + e.Err.Error() }
func (e *StateError) Unwrap() error { return e.Err }

func (s *Slots) write(st SlotState) error {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(s.statePath(), append(b, '\n'), 0o600)
}

func (s *Slots) step(name string) error {
	if s.crash != nil {
		return s.crash(name)
	}
	return nil
}

// RemoveLeftovers deletes what a crash in the middle of a write leaves
// and nothing reads: state.json's atomic-write temporaries and a slot
// copy (iotagent.new) that was never renamed into place, a payload's
// size of flash each. Only the state directory's owner may call it
// (the launcher, at start): another process's write in progress would
// lose its file.
func (s *Slots) RemoveLeftovers() error {
	tmps, err := filepath.Glob(filepath.Join(s.dir, ".state.json.tmp-*"))
	if err != nil {
		return err
	}
	var errs []error
	for _, p := range append(tmps, s.binary("a")+".new", s.binary("b")+".new") {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("firmware slots: %w", err))
		}
	}
	return errors.Join(errs...)
}

// ErrTrialPending: a release is on trial; it commits or rolls back first.
var ErrTrialPending = errors.New("firmware: a release is on trial")

// Stage puts the verified payload at src (an agent binary) into the slot
// that is not active and makes it the trial for m. The payload must have
// passed release.Trust and Accept.
func (s *Slots) Stage(src string, m *release.Manifest) error { return s.StageFor(src, m, "") }

// StageFor is Stage for a release assigned by the station's rollout
// (kept with the trial and its result, for the reports).
func (s *Slots) StageFor(src string, m *release.Manifest, rollout string) error {
	if m.Type != release.TypeAgent {
		return fmt.Errorf("firmware: %s %s is of type %q; only %q releases go into the agent's slots", m.Name, m.Version, m.Type, release.TypeAgent)
	}
	st, err := s.State()
	if err != nil {
		return err
	}
	if st.Trial != nil {
		return fmt.Errorf("%w: %s@%s", ErrTrialPending, st.Trial.Name, st.Trial.Version)
	}
	if slices.Contains(st.Bad, BadKey(m)) {
		return fmt.Errorf("%w: %s", ErrMarkedBad, BadKey(m))
	}
	slot := "a"
	if st.Active == "a" {
		slot = "b"
	}
	dst := s.binary(slot)
	if err := copyExecutable(src, dst+".new", m, s.step); err != nil {
		os.Remove(dst + ".new")
		return err
	}
	if err := s.step("binary written"); err != nil {
		return err
	}
	if err := os.Rename(dst+".new", dst); err != nil {
		return fmt.Errorf("firmware slots: %w", err)
	}
	if err := atomicfile.SyncDir(filepath.Dir(dst)); err != nil {
		return err
	}
	if err := s.step("binary in place"); err != nil {
		return err
	}
	v := m.SemVer()
	v.Build = "" // a release is one version, whatever its build metadata
	st.Trial = &Trial{Slot: slot, Name: m.Name, Version: v.String(), SVN: m.SVN, Staged: s.Now().UTC(), Rollout: rollout}
	return s.write(st)
}

// copyExecutable copies src to dst (0755), fsync'ed, checking that what
// it copies is m's payload (the bytes that go into the slot are the
// signed ones, whatever happened to src since it was verified).
func copyExecutable(src, dst string, m *release.Manifest, step func(string) error) error {
	return copyVerified(src, dst, m, 0o755, step)
}

// CopyVerified copies src to dst (0600, fsync'ed), checking that what it
// copies is m's payload: a file checked and then used by name could have
// changed in between; the copy is what was checked.
func CopyVerified(src, dst string, m *release.Manifest) error {
	return copyVerified(src, dst, m, 0o600, func(string) error { return nil })
}

func copyVerified(src, dst string, m *release.Manifest, mode os.FileMode, step func(string) error) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("firmware slots: %w", err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return fmt.Errorf("firmware slots: %w", err)
	}
	h := sha256.New()
	n, err := io.Copy(io.MultiWriter(out, h), io.LimitReader(in, m.Length+1))
	if err != nil {
		out.Close()
		return fmt.Errorf("firmware slots: copying the payload: %w", err)
	}
	if n != m.Length || !bytes.Equal(h.Sum(nil), m.Digest()) {
		out.Close()
		return fmt.Errorf("%w: %s is not the payload of %s %s", ErrDigest, src, m.Name, m.Version)
	}
	if err := step("binary copied, not synced"); err != nil {
		out.Close()
		return err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		return fmt.Errorf("firmware slots: %w", err)
	}
	return out.Close()
}

// Next is the launcher's decision: the binary to exec, and whether it
// is a trial. A trial's attempt is counted (and its deadline set at the
// first) before it is returned; a trial out of attempts or past its
// deadline is rolled back first. "" means the launcher's own binary (no
// update was ever committed).
func (s *Slots) Next() (path string, trial bool, err error) {
	st, err := s.State()
	if err != nil {
		return "", false, err
	}
	now := s.Now().UTC()
	if t := st.Trial; t != nil {
		switch {
		case t.Attempts >= s.MaxAttempts:
			return s.rollback(st, fmt.Sprintf("%d starts without becoming healthy", t.Attempts))
		case !t.Deadline.IsZero() && now.After(t.Deadline):
			return s.rollback(st, fmt.Sprintf("not healthy within %v", s.Deadline))
		}
		if !executable(s.binary(t.Slot)) {
			return s.rollback(st, "the trial's binary is missing")
		}
		t.Attempts++
		if t.Deadline.IsZero() {
			t.Deadline = now.Add(s.Deadline)
		}
		if err := s.write(st); err != nil {
			return "", false, err
		}
		return s.binary(t.Slot), true, nil
	}
	return s.committed(st), false, nil
}

// committed is the committed slot's binary, or "" (the launcher's own)
// when there is none or it is missing.
func (s *Slots) committed(st SlotState) string {
	if st.Active == "" || !executable(s.binary(st.Active)) {
		return ""
	}
	return s.binary(st.Active)
}

func executable(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o100 != 0
}

func (s *Slots) rollback(st SlotState, reason string) (string, bool, error) {
	t := st.Trial
	key := t.Name + "@" + t.Version // a version without build metadata
	st.Bad = append(st.Bad, key)
	st.Trial = nil
	st.Last = &SlotResult{Release: key, Result: "rolled-back", Reason: reason, At: s.Now().UTC(), Rollout: t.Rollout}
	if err := s.write(st); err != nil {
		return "", false, err
	}
	return s.committed(st), false, nil
}

// Commit makes the running trial the committed slot; the caller raises
// the TPM counter to its svn afterwards.
func (s *Slots) Commit() (*Trial, error) {
	st, err := s.State()
	if err != nil {
		return nil, err
	}
	t := st.Trial
	if t == nil {
		return nil, errors.New("firmware: no release on trial to commit")
	}
	if t.Attempts < 1 {
		return nil, fmt.Errorf("firmware: %s %s has not run yet; a trial commits once it has proved healthy", t.Name, t.Version)
	}
	st.Active, st.ActiveVersion, st.ActiveSVN, st.Trial = t.Slot, t.Version, t.SVN, nil
	st.Last = &SlotResult{Release: t.Name + "@" + t.Version, Result: "committed", At: s.Now().UTC(), Rollout: t.Rollout}
	return t, s.write(st)
}

// MarkReported records that the last result was reported to the
// station.
func (s *Slots) MarkReported(r SlotResult) error {
	st, err := s.State()
	if err != nil {
		return err
	}
	if st.Last == nil || st.Last.Release != r.Release || !st.Last.At.Equal(r.At) || st.Last.Reported {
		return nil // another result since, or already marked
	}
	st.Last.Reported = true
	return s.write(st)
}

// Rollback ends the trial as failed, for reason: marked bad, the
// committed binary runs at the next start.
func (s *Slots) Rollback(reason string) error {
	st, err := s.State()
	if err != nil {
		return err
	}
	if st.Trial == nil {
		return errors.New("firmware: no release on trial to roll back")
	}
	_, _, err = s.rollback(st, reason)
	return err
}
