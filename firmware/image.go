package firmware

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/internal/atomicfile"
)

// ImageCommands are the system installer's commands ([firmware.image]
// in the agent's configuration), each an argv run without a shell.
type ImageCommands struct {
	// Install hands the verified file over ("rauc install {file}"); each
	// "{file}" is replaced by the file's path within its argument.
	Install []string
	// MarkGood and MarkBad confirm or reject the booted image ("rauc
	// status mark-good booted").
	MarkGood, MarkBad []string
	// Reboot restarts the system ("systemctl reboot").
	Reboot []string
	// Version, optional, prints the running image's version as the first
	// line of its output. With it, Boot sees a bootloader that fell back
	// to the old image, or an install that completed before a crash let
	// the agent record it; without it, a trial is taken to run once the
	// system rebooted after the install.
	Version []string
}

// ImageConfig is [firmware.image] in the agent's configuration: each
// command one string, split into argv at white space.
type ImageConfig struct {
	Install  string `toml:"install"`   // "rauc install {file}"
	MarkGood string `toml:"mark_good"` // "rauc status mark-good booted"
	MarkBad  string `toml:"mark_bad"`  // "rauc status mark-bad booted"
	Reboot   string `toml:"reboot"`    // "systemctl reboot"
	Version  string `toml:"version"`   // optional
}

// ParseImageCommands splits c's commands into argv at white space.
// Quotes, backslashes and shell operators are refused: no shell gives
// them a meaning. install must contain {file}, the others must not;
// version may be empty, the others not.
func ParseImageCommands(c ImageConfig) (ImageCommands, error) {
	cmds := ImageCommands{
		Install:  strings.Fields(c.Install),
		MarkGood: strings.Fields(c.MarkGood),
		MarkBad:  strings.Fields(c.MarkBad),
		Reboot:   strings.Fields(c.Reboot),
		Version:  strings.Fields(c.Version),
	}
	return cmds, cmds.validate()
}

func (c ImageCommands) validate() error {
	var errs []error
	for _, f := range []struct {
		key  string
		argv []string
	}{{"install", c.Install}, {"mark_good", c.MarkGood}, {"mark_bad", c.MarkBad}, {"reboot", c.Reboot}, {"version", c.Version}} {
		if f.key == "version" && len(f.argv) == 0 {
			continue
		}
		if err := checkCommand(f.key, f.argv); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func checkCommand(key string, argv []string) error {
	if len(argv) == 0 {
		return fmt.Errorf("firmware.image: %s: no command", key)
	}
	hasFile := false
	for _, a := range argv {
		if a == "" || strings.ContainsAny(a, " \t\n\r") {
			return fmt.Errorf("firmware.image: %s: argument %q: arguments are separated by white space and cannot be empty or contain it", key, a)
		}
		if strings.ContainsAny(a, `'"\`+"`") {
			return fmt.Errorf("firmware.image: %s: %q: quotes and backslashes are not supported (commands are split at white space, not run by a shell)", key, a)
		}
		switch a {
		case "|", "||", "&", "&&", ";", ">", ">>", "<", "2>&1":
			return fmt.Errorf("firmware.image: %s: %q is a shell operator; commands are not run by a shell (use a script)", key, a)
		}
		hasFile = hasFile || strings.Contains(a, "{file}")
	}
	switch {
	case key == "install" && !hasFile:
		return fmt.Errorf("firmware.image: install %q has no {file} argument for the image's path", strings.Join(argv, " "))
	case key != "install" && hasFile:
		return fmt.Errorf("firmware.image: %s %q: only install takes {file}", key, strings.Join(argv, " "))
	}
	return nil
}

// Images installs system images (releases of type image) with the
// commands of an installer such as RAUC or SWUpdate, and keeps the
// trial of the installed image across the reboot:
//
//	DIR/images.json   the only source of truth
//
// It must be on storage both image slots share (a data partition), so
// that the new image's agent finds it.
//
//	        Install               install ok           reboot, Boot
//	idle ───────────► installing ──────────► installed ────────────► trial ──┐
//	 ▲        │ failed      │ crash                   same boot: Boot   │      │ Boot: attempt
//	 │        ▼ (error)     ▼                         reboots again     │ ◄────┘ (< max, before deadline)
//	 ├─── idle   rolled back, "install interrupted"           Commit   │
//	 │           (mark_bad not run: never booted)      mark_good ───────┤
//	 │                                                                   ▼
//	 │   Boot, next boot       mark_bad recorded,        Rollback, or Boot at the limit,
//	 └──────────────────────── rolling-back ◄──────────  past the deadline: mark_bad
//	    (same boot: reboot again)          └── reboot
//
// Every step is one atomic write of images.json (temp, fsync, rename,
// fsync dir), made before the command whose effect it announces
// (installing before install) or after the command it records (installed
// after install, committed after mark_good). The kernel's boot id tells
// Boot a reboot from a restart of the agent alone: an image installed
// but not rebooted into is not a trial yet, and a rollback whose reboot
// did not happen reboots again.
//
// Methods serialize on the Images; the commands run without a shell,
// with a timeout and with their output kept (the last 4 KiB) for the
// error. The fields are set before the first call and not changed
// afterwards.
//
// # Caveats
//
// Without a Version command two windows stay open. A crash in the
// instant between the installer's success and the agent's record of it,
// or a kill of the agent while an installer that carries on by itself
// (RAUC's service) writes the slot, leaves "installing": the next Boot
// takes the install as interrupted, while the bootloader may start the
// new image at the next reboot unconfirmed. A power cut after a
// rollback was recorded and before mark_bad ran leaves the trial
// bootable. The Version command closes both once the system rebooted;
// otherwise the bootloader's own attempt counter (BOOT_x_LEFT with
// RAUC's U-Boot backend, bootcount with SWUpdate) is what brings the
// old image back. TestImagesCrashAtEveryStep asserts both windows.
type Images struct {
	dir  string
	cmds ImageCommands

	// MaxAttempts is how many starts a trial gets (default 3).
	MaxAttempts int
	// Deadline is how long a trial has to prove healthy from its first
	// start (default 5 min).
	Deadline time.Duration
	// InstallTimeout bounds the install command (default 30 min);
	// CommandTimeout the others (default 2 min).
	InstallTimeout, CommandTimeout time.Duration
	Now                            func() time.Time

	mu sync.Mutex
	// bootID reads the kernel's boot id (tests replace it).
	bootID func() (string, error)
	// crash, when set (tests), is called before each write of the state
	// ("writing PHASE"), before each command ("running CMD") and after
	// it succeeded ("CMD ran"); an error stops the operation there, as a
	// crash would.
	crash func(step string) error
}

// Phases of an image trial.
const (
	// PhaseInstalling: the install command was started.
	PhaseInstalling = "installing"
	// PhaseInstalled: installed; the reboot into it is pending.
	PhaseInstalled = "installed"
	// PhaseTrial: the system runs the image, not yet confirmed.
	PhaseTrial = "trial"
	// PhaseRollingBack: failed and recorded bad; mark_bad and the reboot
	// into the committed image are due.
	PhaseRollingBack = "rolling-back"
)

// ImageState is images.json.
type ImageState struct {
	// Committed is, per release name, the version last committed.
	Committed map[string]ImageVersion `json:"committed,omitempty"`
	Trial     *ImageTrial             `json:"trial,omitempty"`
	// Bad holds releases that failed, as NAME@VERSION (BadKey).
	Bad  []string     `json:"bad,omitempty"`
	Last *ImageResult `json:"last,omitempty"`
}

// ImageVersion is a committed image release.
type ImageVersion struct {
	Version string `json:"version"`
	SVN     uint32 `json:"svn"`
}

// ImageTrial is an image release between Install and its commit or
// rollback.
type ImageTrial struct {
	Name    string `json:"name"`
	Version string `json:"version"` // without build metadata
	SVN     uint32 `json:"svn"`
	Phase   string `json:"phase"`
	// Attempts counts the agent's starts in the trial.
	Attempts int `json:"attempts,omitempty"`
	// BootID is the kernel's boot id when the phase was entered, or at
	// the trial's last start.
	BootID  string    `json:"boot_id"`
	Started time.Time `json:"started"`
	// Deadline is set at the trial's first start.
	Deadline time.Time `json:"deadline,omitzero"`
	// Reason is why a rolling-back trial failed.
	Reason string `json:"reason,omitempty"`
	// Reboots counts the reboots Boot ran again in this phase (at most
	// MaxAttempts: a reboot command that returns without rebooting does
	// not loop).
	Reboots int `json:"reboots,omitempty"`
	// Rollout is the station's rollout that assigned the release ("" for
	// one applied locally).
	Rollout string `json:"rollout,omitempty"`
}

// ImageResult is how the last trial ended.
type ImageResult = SlotResult

// CommittedVersion is the version and svn last committed for name (the zero
// Version, below every other, when none was).
func (st ImageState) CommittedVersion(name string) (release.Version, uint32) {
	c, ok := st.Committed[name]
	if !ok {
		return release.Version{}, 0
	}
	v, _ := release.ParseVersion(c.Version) // checked when read
	return v, c.SVN
}

// BadReleases is Bad as a set, for Device.Bad.
func (st ImageState) BadReleases() map[string]bool {
	bad := make(map[string]bool, len(st.Bad))
	for _, k := range st.Bad {
		bad[k] = true
	}
	return bad
}

// ErrRebooting: Boot ran the reboot command; the caller stops and waits
// for the system to go down.
var ErrRebooting = errors.New("firmware: rebooting")

// OpenImages keeps its state in dir (created 0700) and runs cmds.
func OpenImages(dir string, cmds ImageCommands) (*Images, error) {
	if err := cmds.validate(); err != nil {
		return nil, err
	}
	if err := atomicfile.MkdirPrivate(dir); err != nil {
		return nil, fmt.Errorf("firmware images: %w", err)
	}
	// A power cut during a write leaves its temporary file.
	stale, _ := filepath.Glob(filepath.Join(dir, ".images.json.tmp-*"))
	for _, p := range stale {
		os.Remove(p)
	}
	return &Images{dir: dir, cmds: cmds, MaxAttempts: 3, Deadline: 5 * time.Minute,
		InstallTimeout: 30 * time.Minute, CommandTimeout: 2 * time.Minute, Now: time.Now, bootID: readBootID}, nil
}

func readBootID() (string, error) {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", fmt.Errorf("firmware images: reading the boot id: %w", err)
	}
	return strings.TrimSpace(string(b)), nil
}

func (im *Images) statePath() string { return filepath.Join(im.dir, "images.json") }

// State reads images.json (the zero state when there is none).
func (im *Images) State() (ImageState, error) {
	var st ImageState
	b, err := os.ReadFile(im.statePath())
	if errors.Is(err, os.ErrNotExist) {
		return st, nil
	}
	if err != nil {
		return st, fmt.Errorf("firmware images: %w", err)
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return ImageState{}, fmt.Errorf("firmware images: %s: %w", im.statePath(), err)
	}
	if err := st.check(); err != nil {
		return ImageState{}, fmt.Errorf("firmware images: %s: %w", im.statePath(), err)
	}
	return st, nil
}

func (st ImageState) check() error {
	for name, c := range st.Committed {
		if !release.ValidName(name) {
			return fmt.Errorf("committed release name %q", name)
		}
		if _, err := release.ParseVersion(c.Version); err != nil {
			return fmt.Errorf("committed %s: %w", name, err)
		}
	}
	if t := st.Trial; t != nil {
		if !release.ValidName(t.Name) {
			return fmt.Errorf("trial release name %q", t.Name)
		}
		if _, err := release.ParseVersion(t.Version); err != nil {
			return fmt.Errorf("trial %s: %w", t.Name, err)
		}
		switch t.Phase {
		case PhaseInstalling, PhaseInstalled, PhaseTrial, PhaseRollingBack:
		default:
			return fmt.Errorf("trial %s: unknown phase %q", t.Name, t.Phase)
		}
	}
	return nil
}

func (im *Images) write(st ImageState, what string) error {
	if err := im.step("writing " + what); err != nil {
		return err
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(im.statePath(), append(b, '\n'), 0o600)
}

func (im *Images) step(name string) error {
	if im.crash != nil {
		return im.crash(name)
	}
	return nil
}

// Install hands the verified file for m (an image release that passed
// release.Trust and Accept) to the install command and makes it the
// trial, reboot pending. The file is checked against m's length and
// SHA-256 first, then handed over by name: it must be in a directory
// only the agent writes. A failed install leaves no trial.
func (im *Images) Install(ctx context.Context, file string, m *release.Manifest) error {
	return im.InstallFor(ctx, file, m, "")
}

// InstallFor is Install for a release assigned by the station's rollout
// (kept with the trial and its result, for the reports).
func (im *Images) InstallFor(ctx context.Context, file string, m *release.Manifest, rollout string) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	if m.Type != release.TypeImage {
		return fmt.Errorf("firmware: %s %s is of type %q; only %q releases go to the image installer", m.Name, m.Version, m.Type, release.TypeImage)
	}
	st, err := im.State()
	if err != nil {
		return err
	}
	if st.Trial != nil {
		return fmt.Errorf("%w: %s@%s (%s)", ErrTrialPending, st.Trial.Name, st.Trial.Version, st.Trial.Phase)
	}
	key := BadKey(m)
	if slices.Contains(st.Bad, key) {
		return fmt.Errorf("%w: %s", ErrMarkedBad, key)
	}
	if err := checkPayload(file, m); err != nil {
		return err
	}
	boot, err := im.bootID()
	if err != nil {
		return err
	}
	v := m.SemVer()
	v.Build = ""
	st.Trial = &ImageTrial{Name: m.Name, Version: v.String(), SVN: m.SVN, Phase: PhaseInstalling, BootID: boot, Started: im.Now().UTC(), Rollout: rollout}
	if err := im.write(st, PhaseInstalling); err != nil {
		return err
	}
	argv := make([]string, len(im.cmds.Install))
	for i, a := range im.cmds.Install {
		argv[i] = strings.ReplaceAll(a, "{file}", file)
	}
	if _, runErr := im.run(ctx, "install", argv, im.InstallTimeout); runErr != nil {
		st.Trial = nil
		if err := im.write(st, "install failed"); err != nil {
			return errors.Join(runErr, err)
		}
		return runErr
	}
	st.Trial.Phase = PhaseInstalled
	return im.write(st, PhaseInstalled)
}

// checkPayload checks that file is m's payload.
func checkPayload(file string, m *release.Manifest) error {
	f, err := os.Open(file)
	if err != nil {
		return fmt.Errorf("firmware images: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, io.LimitReader(f, m.Length+1))
	if err != nil {
		return fmt.Errorf("firmware images: reading %s: %w", file, err)
	}
	if n != m.Length || !bytes.Equal(h.Sum(nil), m.Digest()) {
		return fmt.Errorf("%w: %s is not the payload of %s %s", ErrDigest, file, m.Name, m.Version)
	}
	return nil
}

// Reboot runs the reboot command. When it returns nil the system is
// going down: the caller stops.
func (im *Images) Reboot(ctx context.Context) error {
	_, err := im.run(ctx, "reboot", im.cmds.Reboot, im.CommandTimeout)
	return err
}

// Boot is called once at each start of the agent, before anything else
// uses the installer. It returns the trial the system now runs, if any,
// its start counted (and its deadline set at the first): the caller
// checks its health, then Commits or Rolls back. It returns nil when no
// trial runs, after ending one that:
//   - was interrupted while installing (rolled back, marked bad; mark_bad
//     is not run: the image never booted);
//   - reached the attempt limit or passed its deadline (mark_bad, then
//     the reboot: ErrRebooting);
//   - was rolling back and the system has rebooted since.
//
// When a reboot recorded as due has not happened (an installed image, a
// rollback), Boot runs it again and returns ErrRebooting.
func (im *Images) Boot(ctx context.Context) (*ImageTrial, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	st, err := im.State()
	if err != nil {
		return nil, err
	}
	t := st.Trial
	if t == nil {
		return nil, nil
	}
	boot, err := im.bootID()
	if err != nil {
		return nil, err
	}
	rebooted := boot != t.BootID
	now := im.Now().UTC()
	switch t.Phase {
	case PhaseInstalling:
		if running, ok, err := im.runningVersion(ctx); err != nil {
			return nil, err
		} else if ok && rebooted && running == t.Version {
			// The install completed just before the crash, and the
			// system runs it: a trial like any other.
			return im.start(st, boot, now)
		}
		return nil, im.end(st, "install interrupted")
	case PhaseInstalled:
		if !rebooted {
			return nil, im.rebootAgain(ctx, st)
		}
		if err := im.checkRunning(ctx, st, "the system started %s after the install, not the trial"); err != nil {
			return nil, noTrial(err)
		}
		return im.start(st, boot, now)
	case PhaseTrial:
		if err := im.checkRunning(ctx, st, "the system started %s, not the trial"); err != nil {
			return nil, noTrial(err)
		}
		switch {
		case t.Attempts >= im.MaxAttempts:
			return nil, im.rollback(ctx, st, fmt.Sprintf("%d starts without becoming healthy", t.Attempts))
		case !t.Deadline.IsZero() && now.After(t.Deadline):
			return nil, im.rollback(ctx, st, fmt.Sprintf("not healthy within %v", im.Deadline))
		}
		return im.start(st, boot, now)
	default: // PhaseRollingBack
		running, ok, err := im.runningVersion(ctx)
		if err != nil {
			return nil, err
		}
		if !rebooted || ok && running == t.Version {
			// Still on the trial: mark_bad may not have run.
			return nil, im.finishRollback(ctx, st)
		}
		// mark_bad ran, or a power cut came first and the bootloader
		// may start the trial again unconfirmed (see Caveats); running
		// mark_bad now could reject the image the system went back to.
		st.Trial = nil
		return nil, im.write(st, "rolled back")
	}
}

// start counts a start of the trial.
func (im *Images) start(st ImageState, boot string, now time.Time) (*ImageTrial, error) {
	t := st.Trial
	t.Phase, t.BootID = PhaseTrial, boot
	t.Attempts++
	if t.Deadline.IsZero() {
		t.Deadline = now.Add(im.Deadline)
	}
	if err := im.write(st, PhaseTrial); err != nil {
		return nil, err
	}
	c := *t
	return &c, nil
}

// checkRunning ends the trial, when the Version command says the system
// runs another version, as rolled back for the reason format (which
// takes that version): the bootloader went back by itself, so neither
// mark_bad nor a reboot is needed. It returns nil when the trial runs
// or there is no Version command, and errTrialEnded after ending it.
func (im *Images) checkRunning(ctx context.Context, st ImageState, format string) error {
	running, ok, err := im.runningVersion(ctx)
	if err != nil {
		// A version command that fails (the installer's service not up
		// yet, say) must not keep the trial from being counted: the
		// start goes on as without one, and the attempt limit still
		// ends a trial that never proves healthy.
		return nil
	}
	if !ok || running == st.Trial.Version {
		return nil
	}
	if err := im.end(st, fmt.Sprintf(format, running)); err != nil {
		return err
	}
	return errTrialEnded
}

// errTrialEnded: checkRunning ended the trial (Boot returns no trial).
var errTrialEnded = errors.New("firmware: trial ended")

func noTrial(err error) error {
	if err == errTrialEnded {
		return nil
	}
	return err
}

// runningVersion is the Version command's answer, without build
// metadata; ok is false without a Version command.
func (im *Images) runningVersion(ctx context.Context) (string, bool, error) {
	if len(im.cmds.Version) == 0 {
		return "", false, nil
	}
	out, err := im.run(ctx, "version", im.cmds.Version, im.CommandTimeout)
	if err != nil {
		return "", false, err
	}
	first, _, _ := strings.Cut(strings.TrimSpace(out), "\n")
	v, err := release.ParseVersion(strings.TrimSpace(first))
	if err != nil {
		return "", false, fmt.Errorf("firmware images: the version command printed %q: %w", first, err)
	}
	v.Build = ""
	return v.String(), true, nil
}

// end records the trial as rolled back for reason and marked bad,
// without running a command.
func (im *Images) end(st ImageState, reason string) error {
	t := st.Trial
	key := t.Name + "@" + t.Version
	if !slices.Contains(st.Bad, key) {
		st.Bad = append(st.Bad, key)
	}
	st.Trial = nil
	st.Last = &ImageResult{Release: key, Result: "rolled-back", Reason: reason, At: im.Now().UTC(), Rollout: t.Rollout}
	return im.write(st, "rolled back")
}

// rollback records the trial rolling back for reason (marked bad, the
// result), then runs mark_bad and reboots: ErrRebooting once the
// reboot command succeeded. The record comes first: a crash before
// mark_bad then brings Boot back here in the same boot, while a record
// after mark_bad would, after a power cut, leave a trial that the
// bootloader no longer starts (and a mark_bad then of the image it
// went back to).
func (im *Images) rollback(ctx context.Context, st ImageState, reason string) error {
	t := st.Trial
	boot, err := im.bootID()
	if err != nil {
		return err
	}
	key := t.Name + "@" + t.Version
	if !slices.Contains(st.Bad, key) {
		st.Bad = append(st.Bad, key)
	}
	t.Phase, t.BootID, t.Reason, t.Reboots = PhaseRollingBack, boot, reason, 0
	st.Last = &ImageResult{Release: key, Result: "rolled-back", Reason: reason, At: im.Now().UTC(), Rollout: t.Rollout}
	if err := im.write(st, PhaseRollingBack); err != nil {
		return err
	}
	return im.finishRollback(ctx, st)
}

// finishRollback runs mark_bad and the reboot for a trial rolling back
// that the system still runs.
func (im *Images) finishRollback(ctx context.Context, st ImageState) error {
	if _, err := im.run(ctx, "mark_bad", im.cmds.MarkBad, im.CommandTimeout); err != nil {
		return err
	}
	return im.rebootAgain(ctx, st)
}

// rebootAgain runs a reboot the state says is due, counted: after
// MaxAttempts of them in one phase it gives up with an error.
func (im *Images) rebootAgain(ctx context.Context, st ImageState) error {
	t := st.Trial
	if t.Reboots >= im.MaxAttempts {
		return fmt.Errorf("firmware: %s@%s (%s): %d reboots did not restart the system; run the reboot by hand", t.Name, t.Version, t.Phase, t.Reboots)
	}
	t.Reboots++
	if err := im.write(st, "reboot"); err != nil {
		return err
	}
	return im.reboot(ctx)
}

func (im *Images) reboot(ctx context.Context) error {
	if _, err := im.run(ctx, "reboot", im.cmds.Reboot, im.CommandTimeout); err != nil {
		return err
	}
	return ErrRebooting
}

// Commit confirms the running trial: mark_good, then the committed
// version and svn recorded. It returns the trial; the caller raises the
// TPM counter to its svn afterwards. A failed mark_good commits nothing.
func (im *Images) Commit(ctx context.Context) (*ImageTrial, error) {
	im.mu.Lock()
	defer im.mu.Unlock()
	st, t, err := im.running()
	if err != nil {
		return nil, err
	}
	if _, err := im.run(ctx, "mark_good", im.cmds.MarkGood, im.CommandTimeout); err != nil {
		return nil, err
	}
	if st.Committed == nil {
		st.Committed = map[string]ImageVersion{}
	}
	st.Committed[t.Name] = ImageVersion{Version: t.Version, SVN: t.SVN}
	st.Trial = nil
	st.Last = &ImageResult{Release: t.Name + "@" + t.Version, Result: "committed", At: im.Now().UTC(), Rollout: t.Rollout}
	if err := im.write(st, "committed"); err != nil {
		return nil, err
	}
	return t, nil
}

// Rollback ends the running trial as failed, for reason: mark_bad, the
// release recorded bad, then the reboot into the committed image. When
// it returns nil the system is going down: the caller stops.
func (im *Images) Rollback(ctx context.Context, reason string) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	st, err := im.State()
	if err != nil {
		return err
	}
	if t := st.Trial; t != nil && t.Phase == PhaseRollingBack {
		err = im.finishRollback(ctx, st) // again, after a failure
	} else if st, _, err = im.running(); err == nil {
		err = im.rollback(ctx, st, reason)
	}
	if errors.Is(err, ErrRebooting) {
		return nil
	}
	return err
}

// running is the state with a trial the system runs in this boot.
func (im *Images) running() (ImageState, *ImageTrial, error) {
	st, err := im.State()
	if err != nil {
		return st, nil, err
	}
	t := st.Trial
	if t == nil {
		return st, nil, errors.New("firmware: no image on trial")
	}
	if t.Phase != PhaseTrial {
		return st, nil, fmt.Errorf("firmware: %s@%s is %s, not running on trial", t.Name, t.Version, t.Phase)
	}
	boot, err := im.bootID()
	if err != nil {
		return st, nil, err
	}
	if boot != t.BootID {
		return st, nil, fmt.Errorf("firmware: %s@%s: the system rebooted since the trial's last start (Boot first)", t.Name, t.Version)
	}
	return st, t, nil
}

// MarkReported records that the station has r, when r is still the
// last result (not one recorded since).
func (im *Images) MarkReported(r ImageResult) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	st, err := im.State()
	if err != nil || st.Last == nil || st.Last.Reported || st.Last.Release != r.Release || !st.Last.At.Equal(r.At) {
		return err
	}
	st.Last.Reported = true
	return im.write(st, "reported")
}

// run runs argv with a timeout, its output (stdout and stderr, the last
// 4 KiB) returned, and in the error as its last line.
func (im *Images) run(ctx context.Context, what string, argv []string, timeout time.Duration) (string, error) {
	if err := im.step("running " + what); err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	var out tail
	cmd.Stdout, cmd.Stderr = &out, &out
	// A child that keeps the output open does not hold us past the
	// timeout.
	cmd.WaitDelay = 5 * time.Second
	// The installer dies with the agent (an install that goes on after a
	// crash is one the agent does not know of). The signal follows the
	// thread that started the child, so the thread stays ours until it
	// has ended.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	runtime.LockOSThread()
	err := cmd.Run()
	runtime.UnlockOSThread()
	if err != nil {
		if ctx.Err() == context.DeadlineExceeded {
			err = fmt.Errorf("timed out after %v", timeout)
		}
		msg := fmt.Sprintf("firmware image: %s %q: %v", what, strings.Join(argv, " "), err)
		if last := out.lastLine(); last != "" {
			msg += ": " + last
		}
		return out.String(), errors.New(msg)
	}
	if err := im.step(what + " ran"); err != nil {
		return "", err
	}
	return out.String(), nil
}

// tail keeps the last 4 KiB written to it.
type tail struct{ b []byte }

const tailSize = 4 << 10

func (t *tail) Write(p []byte) (int, error) {
	n := len(p)
	if len(p) >= tailSize {
		p = p[len(p)-tailSize:]
		t.b = t.b[:0]
	}
	if over := len(t.b) + len(p) - tailSize; over > 0 {
		t.b = t.b[over:]
	}
	t.b = append(t.b, p...)
	return n, nil
}

func (t *tail) String() string { return string(t.b) }

// lastLine is the output's last non-empty line, on one line and at
// most 200 bytes.
func (t *tail) lastLine() string {
	lines := strings.Split(strings.TrimSpace(strings.ToValidUTF8(string(t.b), "?")), "\n")
	last := strings.TrimSpace(lines[len(lines)-1])
	last = strings.Map(func(r rune) rune {
		if r < ' ' || r == 0x7f {
			return ' '
		}
		return r
	}, last)
	if len(last) > 200 {
		last = strings.ToValidUTF8(last[:200], "") + "…"
	}
	return last
}
