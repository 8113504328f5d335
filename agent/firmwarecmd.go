package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"iotagent.dev/iotagent/agent/statedir"
	"iotagent.dev/iotagent/firmware"
	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/internal/atomicfile"
)

// The iotagent firmware commands. Slots is used by one process at a
// time, the state directory's owner: when an agent runs, a command is
// handed to it (FIRMWARE/request.json, then SIGUSR2) and its answer read
// from FIRMWARE/answer.json; when none runs, the command takes the lock
// and does the same work itself.

// firmwareRequestWait bounds how long a command waits for the running
// agent's answer.
const firmwareRequestWait = 60 * time.Second

// Firmware operations.
const (
	opApply    = "apply"
	opCommit   = "commit"
	opRollback = "rollback"
)

// fwRequest is request.json.
type fwRequest struct {
	ID string `json:"id"`
	Op string `json:"op"`
	// Sent is when the command handed it over: one older than its wait
	// is dropped (the command gave up; it must not happen later).
	Sent time.Time `json:"sent"`
	// File is the payload and Manifest its signed manifest, for apply;
	// KeyList an optional key list to trust first.
	File     string `json:"file,omitempty"`
	Manifest []byte `json:"manifest,omitempty"`
	KeyList  []byte `json:"keylist,omitempty"`
}

// fwAnswer is answer.json.
type fwAnswer struct {
	ID     string `json:"id"`
	Result string `json:"result,omitempty"`
	Error  string `json:"error,omitempty"`
}

// ErrFirmwareOff: the configuration has no [firmware] root key.
var ErrFirmwareOff = errors.New("firmware updates are off: [firmware] has no root key (root_keys or root_keys_file)")

// FirmwareResult says what a firmware command did.
type FirmwareResult struct {
	// DaemonPID is the running agent that did it (0: this process).
	DaemonPID int
	Result    string
}

// FirmwareApply installs the payload at file, described by the signed
// manifest, as a trial, with the checks of an update from the station
// (keyList, if given, is trusted first under the rotation rules). The
// trial starts at the next start of the agent (at once when one runs).
func (a *Agent) FirmwareApply(ctx context.Context, file string, manifest, keyList []byte) (*FirmwareResult, error) {
	abs, err := filepath.Abs(file)
	if err != nil {
		return nil, err
	}
	if _, err := os.Stat(abs); err != nil {
		return nil, err
	}
	return a.firmwareOp(ctx, fwRequest{Op: opApply, File: abs, Manifest: manifest, KeyList: keyList})
}

// FirmwareCommit commits the release on trial now (an operator's
// verdict that it is healthy).
func (a *Agent) FirmwareCommit(ctx context.Context) (*FirmwareResult, error) {
	return a.firmwareOp(ctx, fwRequest{Op: opCommit})
}

// FirmwareRollback rolls the release on trial back (marked bad); the
// committed binary runs next.
func (a *Agent) FirmwareRollback(ctx context.Context) (*FirmwareResult, error) {
	return a.firmwareOp(ctx, fwRequest{Op: opRollback})
}

// FirmwareCheck asks the running agent to check with the station now.
func (a *Agent) FirmwareCheck() (int, error) {
	if a.s.firmware == nil {
		return 0, ErrFirmwareOff
	}
	lock, err := a.s.dir.Lock()
	if le := (*statedir.LockedError)(nil); errors.As(err, &le) && le.PID > 0 {
		if err := syscall.Kill(le.PID, syscall.SIGUSR2); err != nil {
			return 0, fmt.Errorf("asking iotagent (pid %d) to check: %w", le.PID, err)
		}
		return le.PID, nil
	}
	if err == nil {
		lock.Close()
		return 0, errors.New("no agent is running: the check is made by iotagent run (it checks at start)")
	}
	return 0, err
}

func (a *Agent) firmwareOp(ctx context.Context, req fwRequest) (*FirmwareResult, error) {
	if a.s.firmware == nil {
		return nil, ErrFirmwareOff
	}
	if err := a.s.dir.Create(); err != nil {
		return nil, err
	}
	lock, err := a.s.dir.Lock()
	if le := (*statedir.LockedError)(nil); errors.As(err, &le) {
		return a.firmwareOpByDaemon(ctx, le.PID, req)
	}
	if err != nil {
		return nil, err
	}
	defer lock.Close()
	t, err := a.openTPM()
	if err != nil {
		return nil, err
	}
	defer t.Close()
	d := &daemon{a: a, t: t, clock: a.clock()}
	u, err := d.newUpdater()
	if err != nil {
		return nil, err
	}
	u.inline = true
	res, err := u.do(ctx, req)
	if err != nil && !errors.Is(err, ErrRelaunch) && !errors.Is(err, firmware.ErrRebooting) {
		return nil, err // done, to take effect at the next start
	}
	return &FirmwareResult{Result: res}, nil
}

func requestPath(fw string) string { return filepath.Join(fw, "request.json") }
func answerPath(fw string) string  { return filepath.Join(fw, "answer.json") }

func (a *Agent) firmwareOpByDaemon(ctx context.Context, pid int, req fwRequest) (*FirmwareResult, error) {
	if pid <= 0 {
		return nil, errors.New("the state dir is locked by another iotagent whose pid is unknown")
	}
	id := make([]byte, 8)
	rand.Read(id)
	req.ID, req.Sent = hex.EncodeToString(id), time.Now().UTC()
	fw := a.s.dir.Firmware()
	b, _ := json.Marshal(req)
	if err := atomicfile.Write(requestPath(fw), b, 0o600); err != nil {
		return nil, err
	}
	var ans fwAnswer
	err := signalAndWait(ctx, pid, syscall.SIGUSR2, "to take a firmware command", firmwareRequestWait, func() bool {
		b, err := os.ReadFile(answerPath(fw))
		ans = fwAnswer{} // not a field left from another command's answer
		return err == nil && json.Unmarshal(b, &ans) == nil && ans.ID == req.ID
	})
	if err != nil {
		os.Remove(requestPath(fw))
		return nil, fmt.Errorf("%w (is it built with firmware updates and [firmware] configured?)", err)
	}
	if ans.Error != "" {
		return nil, errors.New(ans.Error)
	}
	return &FirmwareResult{DaemonPID: pid, Result: ans.Result}, nil
}

// takeRequest reads and removes a pending request.json, if any.
func (u *updater) takeRequest() (*fwRequest, bool) {
	path := requestPath(u.d.a.s.dir.Firmware())
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, false
	}
	os.Remove(path)
	var req fwRequest
	if err := json.Unmarshal(b, &req); err != nil || req.ID == "" {
		u.d.a.log.Warn("firmware: ignoring a malformed request.json", "err", err)
		return nil, false
	}
	if age := time.Since(req.Sent); age > firmwareRequestWait || age < -firmwareRequestWait {
		u.d.a.log.Warn("firmware: dropping a command its sender gave up on", "op", req.Op, "sent", req.Sent)
		return nil, false
	}
	return &req, true
}

// answer writes the answer to req.
func (u *updater) answer(req *fwRequest, result string, err error) {
	ans := fwAnswer{ID: req.ID, Result: result}
	if err != nil && !errors.Is(err, ErrRelaunch) && !errors.Is(err, firmware.ErrRebooting) {
		ans.Error = oneLine(err)
	}
	b, _ := json.Marshal(ans)
	if err := atomicfile.Write(answerPath(u.d.a.s.dir.Firmware()), b, 0o600); err != nil {
		u.d.a.log.Warn("firmware: writing the answer to a command", "err", err)
	}
}

// serveRequest handles a pending command in the daemon, outside a
// trial. It returns ErrRelaunch when the launcher must run.
func (u *updater) serveRequest(ctx context.Context) error {
	req, ok := u.takeRequest()
	if !ok {
		return nil
	}
	res, err := u.do(ctx, *req)
	u.answer(req, res, err)
	if errors.Is(err, ErrRelaunch) || errors.Is(err, firmware.ErrRebooting) {
		return err
	}
	return nil
}

// do runs one command: in the daemon, or in the command's own process
// when no agent runs. ErrRelaunch (with a result) means done, and the
// launcher must run for it to take effect.
func (u *updater) do(ctx context.Context, req fwRequest) (string, error) {
	switch req.Op {
	case opApply:
		if len(req.KeyList) > 0 {
			if _, err := u.trust.Update(req.KeyList); err != nil {
				return "", fmt.Errorf("firmware apply: the key list: %w", err)
			}
			if err := atomicfile.Write(u.keyListFile(), u.trust.Raw(), 0o600); err != nil {
				return "", err
			}
		}
		m, err := u.trust.Manifest(req.Manifest, u.d.clock.Now())
		if err != nil {
			return "", fmt.Errorf("firmware apply: %w", err)
		}
		if m.Type == release.TypeImage {
			if err := u.acceptImage(m); err != nil {
				return "", fmt.Errorf("firmware apply: %w", err)
			}
			// The installer gets the agent's own copy, checked while it
			// is made: the caller's file may change after the check.
			file, err := u.copyPayload(req.File, m)
			if err != nil {
				return "", fmt.Errorf("firmware apply: %w", err)
			}
			defer removeDownload(file)
			err = u.installImage(ctx, file, m, "")
			if errors.Is(err, firmware.ErrRebooting) {
				return fmt.Sprintf("%s %s installed; rebooting into it", m.Name, m.Version), err
			}
			return "", fmt.Errorf("firmware apply: %w", err)
		}
		if m.Name != u.fw.name {
			return "", fmt.Errorf("firmware apply: release %s is not this agent's (its release name is %s)", m.Name, u.fw.name)
		}
		if err := u.accept(m); err != nil {
			return "", fmt.Errorf("firmware apply: %w", err)
		}
		if err := u.slots.StageFor(req.File, m, ""); err != nil {
			return "", fmt.Errorf("firmware apply: %w", err)
		}
		return fmt.Sprintf("%s %s staged; on trial from the next start", m.Name, m.Version), ErrRelaunch
	case opCommit:
		if !u.inline {
			// The running agent is not the trial (one on trial answers in
			// waitHealthy): its start is still to come.
			return "", errors.New("firmware commit: the running agent is not the release on trial; it commits from within the trial")
		}
		t, err := u.slots.Commit()
		if err != nil {
			return "", err
		}
		u.raiseCounter()
		return fmt.Sprintf("%s %s committed", t.Name, t.Version), nil
	case opRollback:
		st, err := u.slots.State()
		if err != nil {
			return "", err
		}
		if err := u.slots.Rollback("rolled back by the operator"); err != nil {
			return "", err
		}
		return fmt.Sprintf("%s %s rolled back and marked bad", st.Trial.Name, st.Trial.Version), ErrRelaunch
	}
	return "", fmt.Errorf("firmware: unknown command %q", req.Op)
}

// copyPayload copies the payload at src into the download directory,
// checking it against m as it copies.
func (u *updater) copyPayload(src string, m *release.Manifest) (string, error) {
	dir := filepath.Join(u.d.a.s.dir.Firmware(), "download")
	dst := filepath.Join(dir, m.Name+"-"+m.SemVer().String())
	if err := cleanDownloads(dir, dst); err != nil {
		return "", err
	}
	if err := firmware.CopyVerified(src, dst, m); err != nil {
		os.Remove(dst)
		return "", err
	}
	return dst, nil
}

func (u *updater) keyListFile() string {
	return filepath.Join(u.d.a.s.dir.Firmware(), "keylist.json")
}

// errLocal marks a failure of the device itself (its TPM, its state):
// retried, never reported as the release's refusal.
var errLocal = errors.New("firmware: this device")

// accept applies the anti-rollback policy for this device to m.
func (u *updater) accept(m *release.Manifest) error {
	st, err := u.slots.State()
	if err != nil {
		return fmt.Errorf("%w: %w", errLocal, err)
	}
	n, err := u.counter()
	if err != nil {
		return fmt.Errorf("%w: reading the TPM counter: %w", errLocal, err)
	}
	// The floor is the committed svn even while the counter's raise to
	// it is still to be done (a TPM error at the commit).
	n = max(n, uint64(st.ActiveSVN))
	bad := map[string]bool{}
	for _, k := range st.Bad {
		bad[k] = true
	}
	return firmware.Accept(m, firmware.Device{Committed: u.committed(st), Counter: n, HW: hardware(), Board: u.fw.board, Bad: bad})
}

// fwRuntime is the running agent's firmware view, in its status file.
type fwRuntime struct {
	Running        string    `json:"running"`
	Committed      string    `json:"committed,omitempty"`
	Counter        *uint64   `json:"counter,omitempty"`
	LastCheck      time.Time `json:"last_check,omitzero"`
	LastCheckError string    `json:"last_check_error,omitempty"`
	Trial          string    `json:"trial,omitempty"`
}

// FirmwareStatus is what iotagent firmware status reports; its JSON keys
// are a contract with operators' scripts.
type FirmwareStatus struct {
	// Running is the version the running agent runs ("": none runs);
	// DaemonPID is that agent.
	Running   string `json:"running"`
	DaemonPID int    `json:"pid,omitempty"`
	// Committed is the committed version; ActiveSlot its slot ("" while
	// the installed binary was never updated).
	Committed  string `json:"committed"`
	ActiveSlot string `json:"active_slot,omitempty"`
	// Trial is the release on trial, if any.
	Trial *firmware.Trial `json:"trial,omitempty"`
	// Counter is the TPM anti-rollback counter (nil: unknown).
	Counter *uint64 `json:"counter,omitempty"`
	// CommittedSVN is the committed release's svn: the counter is raised
	// to it.
	CommittedSVN uint32               `json:"committed_svn"`
	Last         *firmware.SlotResult `json:"last,omitempty"`
	Bad          []string             `json:"bad,omitempty"`
	// KeyList is the version of the trusted key list (0: none yet).
	KeyList        uint64    `json:"keylist_version"`
	LastCheck      time.Time `json:"last_check,omitzero"`
	LastCheckError string    `json:"last_check_error,omitempty"`
	// Images is the system image installer's state ([firmware.image]).
	Images *firmware.ImageState `json:"images,omitempty"`
}

// FirmwareStatus reads the update state (state.json, the kept key list)
// and, from the running agent's status file, what it runs and its TPM
// counter. It needs no TPM and takes no lock (a starting agent must
// not find its state directory taken by a status command).
func (a *Agent) FirmwareStatus() (*FirmwareStatus, error) {
	if a.s.firmware == nil {
		return nil, ErrFirmwareOff
	}
	d := &daemon{a: a, clock: a.clock()}
	u, err := d.newUpdater()
	if err != nil {
		return nil, err
	}
	st, err := u.slots.State()
	if err != nil {
		return nil, err
	}
	out := &FirmwareStatus{Running: running(), Committed: u.committed(st).String(), ActiveSlot: st.Active, CommittedSVN: st.ActiveSVN, Trial: st.Trial, Last: st.Last, Bad: st.Bad}
	if l := u.trust.KeyList(); l != nil {
		out.KeyList = l.Version
	}
	if u.images != nil {
		ist, err := u.images.State()
		if err != nil {
			return nil, err
		}
		out.Images = &ist
	}
	rs, ok := readRuntimeStatus(statusFile(a.s.socket))
	if ok && rs.Firmware != nil {
		out.DaemonPID, out.Running, out.Counter = rs.PID, rs.Firmware.Running, rs.Firmware.Counter
		out.LastCheck, out.LastCheckError = rs.Firmware.LastCheck, rs.Firmware.LastCheckError
		if rs.Firmware.Committed != "" {
			out.Committed = rs.Firmware.Committed // it knows the launcher's version
		}
		return out, nil
	}
	out.Running = ""
	if ok {
		out.DaemonPID = rs.PID // starting: its updater has not reported yet
	}
	return out, nil
}

// WriteText writes the report as iotagent prints it without --json.
func (out *FirmwareStatus) WriteText(w io.Writer) {
	slot := out.ActiveSlot
	if slot == "" {
		slot = "the installed binary"
	}
	running := out.Running
	if running == "" {
		running = "(no agent running)"
	}
	fmt.Fprintf(w, "running:       %s\ncommitted:     %s (%s, svn %d)\n", running, out.Committed, slot, out.CommittedSVN)
	if t := out.Trial; t != nil {
		fmt.Fprintf(w, "on trial:      %s %s in slot %s, attempt %d, deadline %s\n", t.Name, t.Version, t.Slot, t.Attempts, t.Deadline.Format(time.RFC3339))
	}
	if out.Counter != nil {
		fmt.Fprintf(w, "tpm counter:   %d\n", *out.Counter)
	} else {
		fmt.Fprintf(w, "tpm counter:   unknown (read by the running agent; none runs)\n")
	}
	fmt.Fprintf(w, "key list:      version %d\n", out.KeyList)
	if l := out.Last; l != nil {
		fmt.Fprintf(w, "last result:   %s %s at %s", l.Release, l.Result, l.At.Format(time.RFC3339))
		if l.Reason != "" {
			fmt.Fprintf(w, ": %s", l.Reason)
		}
		fmt.Fprintln(w)
	}
	for _, b := range out.Bad {
		fmt.Fprintf(w, "marked bad:    %s\n", b)
	}
	if im := out.Images; im != nil {
		for name, v := range im.Committed {
			fmt.Fprintf(w, "image:         %s %s committed (svn %d)\n", name, v.Version, v.SVN)
		}
		if t := im.Trial; t != nil {
			fmt.Fprintf(w, "image trial:   %s %s %s, attempt %d\n", t.Name, t.Version, t.Phase, t.Attempts)
		}
		if l := im.Last; l != nil {
			fmt.Fprintf(w, "image result:  %s %s at %s %s\n", l.Release, l.Result, l.At.Format(time.RFC3339), l.Reason)
		}
	}
	if !out.LastCheck.IsZero() {
		fmt.Fprintf(w, "last check:    %s", out.LastCheck.Format(time.RFC3339))
		if out.LastCheckError != "" {
			fmt.Fprintf(w, ": %s", out.LastCheckError)
		}
		fmt.Fprintln(w)
	}
}
