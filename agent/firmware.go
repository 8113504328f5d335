package agent

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"iotagent.dev/iotagent/firmware"
	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/internal/backoff"
	"iotagent.dev/iotagent/internal/buildinfo"
	"iotagent.dev/iotagent/tpm"
)

// Firmware updates in the daemon (the [firmware] section; off without
// root keys):
//
//	iotagent run ── Launch ── state.json names a slot? ──exec──▶ slots/X/iotagent run
//	                  │ (a trial pending: its attempt counted first)
//	                  └── none: this binary runs
//
//	daemon ── updater ─┬─ reports the last result not yet reported
//	                   ├─ a trial: healthy within the deadline → commit, raise the TPM counter
//	                   │           else → roll back, Relaunch (the committed binary)
//	                   └─ every poll interval (jittered), at a nudge (MQTT
//	                      devices/ID/cmd, SIGUSR2, iotagent firmware check):
//	                      check → assignment → manifest → Accept → download
//	                      → Stage → Relaunch (into the trial)
//
// Every refusal is reported to the station with its one-line reason,
// and nothing is installed.

// Environment the launcher sets for the binary it execs.
const (
	// envLauncher is the launcher's path: set, this process was exec'd
	// by it (and does not launch again).
	envLauncher = "IOTAGENT_LAUNCHER"
	// envTrial is NAME@VERSION when this process is a trial.
	envTrial = "IOTAGENT_FIRMWARE_TRIAL"
)

// Defaults of [firmware].
const (
	defaultReleaseName  = "iotagent"
	defaultPoll         = time.Hour
	defaultCounterIndex = 0x01500100
	// healthEvery is how often a trial looks at its health.
	healthEvery = time.Second
)

// ErrRelaunch is returned by Run when it stopped so that the launcher
// decides again which binary runs (a release was staged, or a trial was
// rolled back): iotagent run then calls Relaunch.
var ErrRelaunch = errors.New("firmware: restarting through the launcher")

// FirmwareConfig is [firmware].
type FirmwareConfig struct {
	// RootKeys are the firmware root public keys (base64 ed25519, as
	// iotstation firmware root init prints them); RootKeysFile a file of
	// them, one per line. A build may also carry some (buildinfo).
	RootKeys      []string `toml:"root_keys"`
	RootKeysFile  string   `toml:"root_keys_file"`
	RootThreshold int      `toml:"root_threshold"`
	// Name is the agent's release name (default "iotagent").
	Name string `toml:"name"`
	// Board is matched against a manifest's board, when it names one.
	Board         string `toml:"board"`
	PollInterval  string `toml:"poll_interval"`
	TrialDeadline string `toml:"trial_deadline"`
	MaxAttempts   int    `toml:"max_attempts"`
	// CounterIndex is the TPM NV index of the agent's anti-rollback
	// counter (it also takes the next index, for its base);
	// ImageCounterIndex the images' (default CounterIndex + 2).
	CounterIndex      string `toml:"counter_index"`
	ImageCounterIndex string `toml:"image_counter_index"`
	// Image is [firmware.image]: the system installer's commands.
	Image firmware.ImageConfig `toml:"image"`
}

// fwSettings is [firmware] checked.
type fwSettings struct {
	roots     []ed25519.PublicKey
	threshold int
	name      string
	board     string
	poll      time.Duration
	deadline  time.Duration
	attempts  int
	counter   uint32
	// imageCounter is the images' counter; image nil without
	// [firmware.image].
	imageCounter uint32
	image        *firmware.ImageCommands
}

// parseFirmware checks [firmware]: nil when updates are off (no root
// key configured or built in).
func (c *Config) parseFirmware() (*fwSettings, error) {
	f := c.Firmware
	texts := slices.Concat(f.RootKeys, buildinfo.FirmwareRootKeys())
	if f.RootKeysFile != "" {
		b, err := os.ReadFile(f.RootKeysFile)
		if err != nil {
			return nil, configErrorf("config [firmware] root_keys_file: %w", err)
		}
		for line := range strings.Lines(string(b)) {
			if line = strings.TrimSpace(line); line != "" && !strings.HasPrefix(line, "#") {
				texts = append(texts, line)
			}
		}
	}
	if len(texts) == 0 {
		if f.Name != "" || f.Board != "" || f.PollInterval != "" || f.TrialDeadline != "" || f.MaxAttempts != 0 || f.CounterIndex != "" || f.RootThreshold != 0 {
			return nil, configErrorf("config [firmware]: no root key (root_keys or root_keys_file): updates cannot be verified")
		}
		return nil, nil
	}
	s := &fwSettings{threshold: 1, name: defaultReleaseName, board: f.Board, poll: defaultPoll,
		deadline: 5 * time.Minute, attempts: 3, counter: defaultCounterIndex}
	for _, t := range texts {
		var k release.PublicKey
		if err := k.UnmarshalText([]byte(t)); err != nil {
			return nil, configErrorf("config [firmware] root key %q: %w", t, err)
		}
		s.roots = append(s.roots, ed25519.PublicKey(k))
	}
	if f.RootThreshold != 0 {
		s.threshold = f.RootThreshold
	}
	if s.threshold < 1 || s.threshold > len(s.roots) {
		return nil, configErrorf("config [firmware] root_threshold %d: want 1 to %d (the number of root keys)", s.threshold, len(s.roots))
	}
	if f.Name != "" {
		if !release.ValidName(f.Name) {
			return nil, configErrorf("config [firmware] name %q: not a release name", f.Name)
		}
		s.name = f.Name
	}
	var err error
	if f.PollInterval != "" {
		if s.poll, err = parseDuration("config [firmware] poll_interval", f.PollInterval, 10*time.Second); err != nil {
			return nil, err
		}
	}
	if f.TrialDeadline != "" {
		if s.deadline, err = parseDuration("config [firmware] trial_deadline", f.TrialDeadline, 10*time.Second); err != nil {
			return nil, err
		}
	}
	if f.MaxAttempts != 0 {
		if f.MaxAttempts < 1 || f.MaxAttempts > 100 {
			return nil, configErrorf("config [firmware] max_attempts %d: want 1 to 100", f.MaxAttempts)
		}
		s.attempts = f.MaxAttempts
	}
	if s.counter, err = parseNVIndex("counter_index", f.CounterIndex, defaultCounterIndex); err != nil {
		return nil, err
	}
	if s.imageCounter, err = parseNVIndex("image_counter_index", f.ImageCounterIndex, s.counter+2); err != nil {
		return nil, err
	}
	if s.imageCounter >= s.counter-1 && s.imageCounter <= s.counter+1 {
		return nil, configErrorf("config [firmware] image_counter_index %#x: the agent's counter takes %#x and %#x", s.imageCounter, s.counter, s.counter+1)
	}
	if f.Image != (firmware.ImageConfig{}) {
		cmds, err := firmware.ParseImageCommands(f.Image)
		if err != nil {
			return nil, configErrorf("config [firmware.image]: %w", err)
		}
		s.image = &cmds
	}
	return s, nil
}

// parseNVIndex parses an NV index of the owner's range (def when
// empty); the index after it must be free too (the counter's base).
func parseNVIndex(key, text string, def uint32) (uint32, error) {
	if text == "" {
		return def, nil
	}
	n, err := strconv.ParseUint(strings.TrimPrefix(strings.ToLower(text), "0x"), 16, 32)
	if err != nil || n < 0x01000000 || n >= 0x01bfffff {
		return 0, configErrorf("config [firmware] %s %q: want an NV index in 0x01000000-0x01bffffe", key, text)
	}
	return uint32(n), nil
}

// openSlots opens the agent's A/B slots with the configured limits.
func (a *Agent) openSlots() (*firmware.Slots, error) {
	s, err := firmware.OpenSlots(a.s.dir.Firmware())
	if err != nil {
		return nil, err
	}
	s.MaxAttempts, s.Deadline = a.s.firmware.attempts, a.s.firmware.deadline
	// The agent's clock, never below its floor: a gateway booting at 1970
	// does not set a deadline decades before the time NTP brings.
	s.Now = a.clock().Now
	return s, nil
}

// Launch is the launcher's step, taken by iotagent run before Run: when
// state.json names a committed slot or a trial, it execs that binary in
// this process (same PID: systemd's MainPID and watchdog hold), counting
// a trial's attempt first; it returns nil when this binary is to run.
// A launcher newer than the committed slot (upgraded by a package) runs
// itself. Without [firmware], or when exec'd by a launcher, it does
// nothing.
func (a *Agent) Launch() error {
	if a.s.firmware == nil || os.Getenv(envLauncher) != "" {
		return nil
	}
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("firmware launcher: %w", err)
	}
	if err := a.s.dir.Create(); err != nil {
		return err
	}
	lock, err := a.s.dir.LockWait(lockWait)
	if err != nil {
		// Not this binary in the slot's place: systemd starts again.
		return fmt.Errorf("firmware launcher: %w", err)
	}
	if slots, err := a.openSlots(); err == nil {
		if err := errors.Join(slots.RemoveLeftovers(), removeCompleteDownloads(filepath.Join(a.s.dir.Firmware(), "download"))); err != nil {
			a.log.Warn("firmware: removing what a crash left", "err", err)
		}
	}
	defer lock.Close() // released at exec too: the exec'd binary takes it again
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envLauncher+"=") && !strings.HasPrefix(kv, envTrial+"=") {
			env = append(env, kv)
		}
	}
	env = append(env, envLauncher+"="+self)
	// Twice at most: a trial that cannot be exec'd is rolled back, and
	// the committed slot (if any) runs instead.
	for range 2 {
		path, trial, err := a.nextBinary()
		var se *firmware.StateError
		if errors.As(err, &se) {
			// A state.json that cannot be read must not keep the agent
			// down: it is set aside, and the launcher's own binary runs
			// (the TPM counter still refuses what is below the svn).
			aside := se.Path + ".unreadable-" + time.Now().UTC().Format("20060102T150405Z")
			a.log.Error("firmware: state.json is unreadable; set aside, running the launcher's own binary", "err", err, "aside", aside)
			return os.Rename(se.Path, aside)
		}
		if err != nil || path == "" {
			return err
		}
		tenv := env
		if trial != "" {
			tenv = append(env[:len(env):len(env)], envTrial+"="+trial)
		}
		a.log.Info("firmware: starting the slot binary", "path", path, "trial", trial)
		err = syscall.Exec(path, append([]string{os.Args[0]}, os.Args[1:]...), tenv)
		a.log.Error("firmware: exec failed", "path", path, "err", err)
		if trial == "" {
			return nil // the committed slot is broken: the launcher's own binary runs
		}
		slots, err2 := a.openSlots()
		if err2 != nil {
			return err2
		}
		if err2 := slots.Rollback(fmt.Sprintf("exec %s: %v", path, err)); err2 != nil {
			return err2
		}
	}
	return nil
}

// nextBinary is the launcher's decision (Slots.Next): the binary to
// exec ("" for this one) and, for a trial, its NAME@VERSION.
func (a *Agent) nextBinary() (path, trial string, err error) {
	slots, err := a.openSlots()
	if err != nil {
		return "", "", err
	}
	st, err := slots.State()
	if err != nil {
		return "", "", err
	}
	if st.Trial == nil && st.Active != "" {
		if own, err := release.ParseVersion(buildinfo.Get().Version); err == nil {
			if v, err := release.ParseVersion(st.ActiveVersion); err == nil && own.Compare(v) > 0 {
				return "", "", nil
			}
		}
	}
	path, isTrial, err := slots.Next()
	if err != nil || !isTrial {
		return path, "", err
	}
	st, err = slots.State()
	if err != nil || st.Trial == nil {
		return path, "", err
	}
	return path, st.Trial.Name + "@" + st.Trial.Version, nil
}

// Relaunch execs the launcher again, in this process, after Run
// returned ErrRelaunch: it decides what runs next. It returns only on
// failure.
func Relaunch() error {
	path := os.Getenv(envLauncher)
	if path == "" {
		var err error
		if path, err = os.Executable(); err != nil {
			return err
		}
	}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, envLauncher+"=") && !strings.HasPrefix(kv, envTrial+"=") {
			env = append(env, kv)
		}
	}
	return syscall.Exec(path, os.Args, env)
}

// RequestFirmwareCheck asks the running daemon to check for an update
// now, as SIGUSR2 does.
func (a *Agent) RequestFirmwareCheck() {
	select {
	case a.fwCheck <- struct{}{}:
	default:
	}
}

// updater is the daemon's firmware part.
type updater struct {
	d     *daemon
	fw    *fwSettings
	slots *firmware.Slots
	// images is nil without [firmware.image].
	images *firmware.Images
	trust  *release.Trust
	// trial is NAME@VERSION when this process is a trial.
	trial string
	// stationOK: the station answered a request of this process.
	stationOK bool
	// inline: a firmware command runs in its own process (no agent runs).
	inline bool
}

func (d *daemon) newUpdater() (*updater, error) {
	fw := d.a.s.firmware
	slots, err := d.a.openSlots()
	if err != nil {
		return nil, err
	}
	trust, err := release.NewTrust(fw.roots, fw.threshold)
	if err != nil {
		return nil, &ConfigError{err}
	}
	images, err := d.a.openImages()
	if err != nil {
		return nil, err
	}
	u := &updater{d: d, fw: fw, slots: slots, images: images, trust: trust, trial: os.Getenv(envTrial)}
	if raw, err := os.ReadFile(u.keyListFile()); err == nil {
		if _, err := trust.Restore(raw); err != nil {
			d.a.log.Warn("firmware: the kept key list is refused; starting from the root keys", "err", err)
		}
	}
	return u, nil
}

// running is the version this process runs.
func running() string { return buildinfo.Get().Version }

// hardware is what a manifest's hw must name for this binary.
func hardware() string { b := buildinfo.Get(); return b.GOOS + "/" + b.Arch() }

// client is the repository client over the station's mutual TLS.
func (u *updater) client() (*firmware.Client, *firmware.Downloader, error) {
	r := u.d.renewer.Load()
	if r == nil {
		return nil, nil, errors.New("firmware: no identity yet")
	}
	sc, err := r.StationClient()
	if err != nil {
		return nil, nil, err
	}
	c := &firmware.Client{HTTP: sc.HTTP(60 * time.Second), Station: sc.URL(), Trust: u.trust, KeyListFile: u.keyListFile()}
	return c, &firmware.Downloader{Client: sc.HTTP(0)}, nil
}

// Run reports what is unreported, finishes a trial, then checks at
// every poll interval and nudge until ctx ends. It returns ErrRelaunch
// when the launcher must run again.
func (u *updater) Run(ctx context.Context) error {
	c, _, err := u.client()
	if err != nil {
		return err
	}
	u.reportLast(ctx, c)
	u.raiseCounter()
	u.publish(time.Time{}, nil)
	if u.images != nil {
		err := u.bootImage(ctx, c)
		if errors.Is(err, firmware.ErrRebooting) || ctx.Err() != nil {
			return waitRebooting(ctx, err)
		}
		if err != nil {
			// Telemetry and the agent's own updates go on; the image's
			// trial is taken up again at the next start.
			u.d.a.log.Error("firmware: the image installer failed at start", "err", err)
		}
	}
	if u.trial != "" {
		if err := u.runTrial(ctx); err != nil || ctx.Err() != nil {
			return err
		}
	}
	bo := backoff.New(backoff.Config{Base: 30 * time.Second, Cap: u.fw.poll, Rand: u.d.a.cfg.Rand})
	wait := time.Duration(u.rand().Int64N(int64(min(u.fw.poll, 30*time.Second))))
	for {
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		case <-u.d.a.fwCheck:
			t.Stop()
			if err := u.serveRequest(ctx); err != nil {
				return waitRebooting(ctx, err)
			}
		}
		err := u.check(ctx)
		u.publish(time.Now(), err)
		switch {
		case errors.Is(err, ErrRelaunch):
			return err
		case errors.Is(err, firmware.ErrRebooting):
			return waitRebooting(ctx, err)
		case err != nil && ctx.Err() == nil:
			wait = bo.Fail()
			u.d.a.log.Warn("firmware: check failed; trying again", "err", err, "in", wait.Round(time.Second))
		default:
			bo.Reset()
			// Jittered ±25%, so that a fleet started together spreads.
			wait = u.fw.poll*3/4 + time.Duration(u.rand().Int64N(int64(u.fw.poll/2)+1))
		}
	}
}

// publish updates what the status file says of firmware: a check made
// at checked (zero: none now) with its error.
func (u *updater) publish(checked time.Time, err error) {
	fr := fwRuntime{Running: running(), Trial: u.trial}
	if old := u.d.firmware.Load(); old != nil {
		fr.LastCheck, fr.LastCheckError = old.LastCheck, old.LastCheckError
	}
	if !checked.IsZero() {
		fr.LastCheck, fr.LastCheckError = checked.UTC(), ""
		if err != nil && !errors.Is(err, ErrRelaunch) {
			fr.LastCheckError = oneLine(err)
		}
	}
	if n, err := u.counter(); err == nil {
		fr.Counter = &n
	}
	if st, err := u.slots.State(); err == nil && (u.trial == "" || st.Active != "") {
		fr.Committed = u.committed(st).String()
	}
	u.d.firmware.Store(&fr)
}

func (u *updater) rand() *rand.Rand {
	if r := u.d.a.cfg.Rand; r != nil {
		return r
	}
	return rand.New(rand.NewPCG(rand.Uint64(), rand.Uint64()))
}

// report sends one step to the station (best effort: a lost report of
// a final step is sent again, see reportLast).
func (u *updater) report(ctx context.Context, c *firmware.Client, rollout, name, version, step, reason string) error {
	err := c.Report(ctx, release.Report{Rollout: rollout, Name: name, Version: version, Step: step, Reason: reason,
		Running: running(), At: u.d.clock.Now().UTC()})
	if err != nil {
		u.d.a.log.Warn("firmware: reporting to the station failed", "step", step, "release", name+"@"+version, "err", err)
		return err
	}
	u.stationOK = true
	return nil
}

// reportLast reports the last trial's result if it was not yet.
func (u *updater) reportLast(ctx context.Context, c *firmware.Client) {
	st, err := u.slots.State()
	if err == nil && st.Last != nil && !st.Last.Reported && u.reportResult(ctx, c, st.Last.Release, st.Last.Result, st.Last.Reason, st.Last.Rollout) {
		u.slots.MarkReported(*st.Last)
	}
}

// reportResult reports a trial's end (result committed or rolled-back);
// true once the station has it.
func (u *updater) reportResult(ctx context.Context, c *firmware.Client, rel, result, reason, rollout string) bool {
	name, version, _ := strings.Cut(rel, "@")
	step := release.StepCommitted
	if result != "committed" {
		step = release.StepRolledBack
	}
	return u.report(ctx, c, rollout, name, version, step, reason) == nil
}

// raiseCounter raises the TPM counter to the committed svn (after a
// commit, and at each start and check until it holds).
func (u *updater) raiseCounter() {
	if st, err := u.slots.State(); err == nil {
		u.raise(u.fw.counter, st.ActiveSVN, "anti-rollback")
	}
}

// raise raises the counter at index to svn unless it is there.
func (u *updater) raise(index, svn uint32, what string) {
	if svn == 0 {
		return
	}
	if cur, err := u.d.t.Counter(index); err == nil && cur >= uint64(svn) {
		return
	}
	if _, err := u.d.t.RaiseCounter(index, uint64(svn)); err != nil {
		u.d.a.log.Error("firmware: raising a TPM counter failed (tried again at the next check)", "counter", what, "svn", svn, "err", err)
	}
}

// counter reads the TPM counter (0 before it was ever raised).
func (u *updater) counter() (uint64, error) {
	n, err := u.d.t.Counter(u.fw.counter)
	if errors.Is(err, tpm.ErrCounterAbsent) || errors.Is(err, tpm.ErrCounterUnwritten) {
		return 0, nil
	}
	return n, err
}

// committed is the committed agent version: the committed slot's, or
// the launcher's own when no update was committed or when the launcher
// is newer (a package upgrade; it then runs itself, see nextBinary).
// In a trial, running() is the trial's, not the launcher's.
func (u *updater) committed(st firmware.SlotState) release.Version {
	v, _ := release.ParseVersion(st.ActiveVersion) // "": 0.0.0
	if u.trial == "" {
		// A dev build is 0.0.0: anything is newer.
		if own, err := release.ParseVersion(running()); err == nil && (st.Active == "" || own.Compare(v) > 0) {
			return own
		}
	}
	return v
}

// runTrial waits for the trial to prove healthy: committed, the counter
// raised and reported; or rolled back at its deadline, reported, and
// ErrRelaunch to run the committed binary.
func (u *updater) runTrial(ctx context.Context) error {
	st, err := u.slots.State()
	if err != nil {
		return err
	}
	t := st.Trial
	if t == nil || t.Name+"@"+t.Version != u.trial {
		u.d.a.log.Warn("firmware: started as the trial of a release state.json does not hold", "trial", u.trial)
		return nil
	}
	c, _, err := u.client()
	if err != nil {
		return err
	}
	u.d.a.log.Info("firmware: on trial", "release", u.trial, "attempt", t.Attempts, "deadline", t.Deadline)
	reason := u.waitHealthy(ctx, c, trialInfo{t.Name, t.Version, t.Rollout, t.Deadline})
	if ctx.Err() != nil {
		return nil // stopped: the next start is another attempt
	}
	if reason != "" {
		u.d.a.log.Error("firmware: the trial is not healthy; rolling back", "release", u.trial, "reason", reason)
		if err := u.slots.Rollback(reason); err != nil {
			return err
		}
		u.reportLast(ctx, c)
		return ErrRelaunch
	}
	if _, err := u.slots.Commit(); err != nil {
		return err
	}
	u.raiseCounter()
	u.d.a.log.Info("firmware: committed", "release", u.trial)
	u.reportLast(ctx, c)
	u.trial = ""
	u.publish(time.Time{}, nil)
	return nil
}

// waitHealthy returns "" once the certificate is valid, the station
// answered and the uplink delivered a record, or why not at t's
// deadline.
func (u *updater) waitHealthy(ctx context.Context, c *firmware.Client, t trialInfo) string {
	tick := time.NewTicker(healthEvery)
	defer tick.Stop()
	var lastReport time.Time
	// The deadline as time left, measured from here on the monotonic
	// clock: a wall clock set by NTP during the trial moves nothing.
	end := time.Now().Add(t.Deadline.Sub(u.d.clock.Now()))
	for {
		now := u.d.clock.Now()
		if !u.stationOK && time.Since(lastReport) > 10*time.Second {
			lastReport = time.Now()
			u.report(ctx, c, t.Rollout, t.Name, t.Version, release.StepTrial, "")
		}
		var missing []string
		if r := u.d.renewer.Load(); r == nil || !r.Identity().Leaf().NotAfter.After(now) {
			missing = append(missing, "no valid certificate")
		}
		if !u.stationOK {
			missing = append(missing, "the station did not answer")
		}
		if u.d.a.cfg.Uplink.URL != "" {
			if dl := u.d.delivery.Load(); dl == nil || dl.pipe.Delivered() == 0 {
				missing = append(missing, "no record delivered by the uplink")
			}
		}
		if len(missing) == 0 {
			return ""
		}
		if !t.Deadline.IsZero() && time.Now().After(end) {
			return fmt.Sprintf("not healthy within %v: %s", u.fw.deadline, strings.Join(missing, ", "))
		}
		select {
		case <-ctx.Done():
			return ""
		case <-tick.C:
		case <-u.d.a.fwCheck: // no update while on trial; an operator's verdict
			if req, ok := u.takeRequest(); ok {
				switch req.Op {
				case opCommit:
					u.answer(req, t.Name+" "+t.Version+" committed", nil)
					return ""
				case opRollback:
					u.answer(req, t.Name+" "+t.Version+" rolled back and marked bad", nil)
					return "rolled back by the operator"
				default:
					u.answer(req, "", fmt.Errorf("%w: %s@%s", firmware.ErrTrialPending, t.Name, t.Version))
				}
			}
		}
	}
}

// trialInfo is what waitHealthy needs of a trial (of the agent or of
// an image).
type trialInfo struct {
	Name, Version, Rollout string
	Deadline               time.Time
}

// check asks the station for an assignment and applies it.
func (u *updater) check(ctx context.Context) error {
	c, dl, err := u.client()
	if err != nil {
		return err
	}
	// What a start could not do: a final result the station has not
	// heard of (it counts for the rollout's halt), a counter not raised.
	u.reportLast(ctx, c)
	u.raiseCounter()
	if u.images != nil {
		u.reportLastImage(ctx, c)
		u.raiseImageCounter()
	}
	a, err := c.Check(ctx, release.Check{Agent: release.Running{Name: u.fw.name, Version: running()}, Images: u.runningImages()})
	if err != nil {
		return err
	}
	u.stationOK = true
	if a == nil {
		return nil
	}
	return u.apply(ctx, c, dl, a)
}

// refusal is a release refused for a reason of its own (not the
// network): reported, not retried until the station assigns again.
type refusal struct{ err error }

func (r *refusal) Error() string { return r.err.Error() }
func (r *refusal) Unwrap() error { return r.err }

// apply takes an assigned release: every refusal is reported with its
// reason and installs nothing.
func (u *updater) apply(ctx context.Context, c *firmware.Client, dl *firmware.Downloader, a *release.Assignment) error {
	if _, err := c.UpdateKeyList(ctx); err != nil && errors.Is(err, firmware.ErrUnreachable) {
		return err
	} else if err != nil {
		u.report(ctx, c, a.Rollout, a.Name, a.Version, release.StepRefused, oneLine(err))
		return nil
	}
	m, _, err := c.Manifest(ctx, a.Name, a.Version, u.d.clock.Now())
	if errors.Is(err, firmware.ErrUnreachable) {
		return err
	}
	if err == nil {
		err = u.stage(ctx, c, dl, a.Rollout, m)
	}
	var rf *refusal
	switch {
	case err == nil:
		return nil
	case errors.Is(err, ErrRelaunch):
		return err
	case errors.As(err, &rf), !errors.Is(err, firmware.ErrUnreachable) && !errors.Is(err, errLocal) && ctx.Err() == nil:
		u.d.a.log.Warn("firmware: release refused", "release", a.Name+"@"+a.Version, "reason", oneLine(err))
		u.report(ctx, c, a.Rollout, a.Name, a.Version, release.StepRefused, oneLine(err))
		return nil
	}
	return err
}

// stage checks m against the device, downloads its payload and stages
// it as the trial: ErrRelaunch then. A refusal is a *refusal or a
// metadata error; ErrUnreachable and context errors are retried.
func (u *updater) stage(ctx context.Context, c *firmware.Client, dl *firmware.Downloader, rollout string, m *release.Manifest) error {
	if m.Type == release.TypeImage {
		return u.stageImage(ctx, c, dl, rollout, m)
	}
	if m.Name != u.fw.name {
		return &refusal{fmt.Errorf("firmware: release %s is not this agent's (its release name is %s)", m.Name, u.fw.name)}
	}
	if v, err := release.ParseVersion(running()); err == nil && v.Compare(m.SemVer()) == 0 {
		// Already running it (a report lost, or state.json restored).
		return u.report(ctx, c, rollout, m.Name, m.Version, release.StepCommitted, "")
	}
	if err := u.accept(m); errors.Is(err, errLocal) {
		return err
	} else if err != nil {
		return &refusal{err}
	}
	file, err := u.download(ctx, c, dl, rollout, m)
	if err != nil {
		return err
	}
	if err := u.slots.StageFor(file, m, rollout); err != nil {
		return &refusal{err}
	}
	removeDownload(file)
	u.d.a.log.Info("firmware: staged; restarting into the trial", "release", m.Name+"@"+m.Version)
	return ErrRelaunch
}

// download fetches m's payload (resuming a part file), reporting
// downloading, downloaded and installing; a payload that is not the
// signed one, or no room for it, is a refusal.
func (u *updater) download(ctx context.Context, c *firmware.Client, dl *firmware.Downloader, rollout string, m *release.Manifest) (string, error) {
	dir := filepath.Join(u.d.a.s.dir.Firmware(), "download")
	file := filepath.Join(dir, m.Name+"-"+m.SemVer().String())
	if err := cleanDownloads(dir, file); err != nil {
		return "", err
	}
	u.report(ctx, c, rollout, m.Name, m.Version, release.StepDownloading, "")
	u.d.a.log.Info("firmware: downloading", "release", m.Name+"@"+m.Version, "bytes", m.Length)
	if err := dl.Fetch(ctx, c.PayloadURL(m), file, firmware.Target{Length: m.Length, SHA256: m.Digest()}); err != nil {
		if errors.Is(err, firmware.ErrDigest) || errors.Is(err, firmware.ErrLength) || errors.Is(err, firmware.ErrNoSpace) {
			// Refused for good: nothing of it stays on the flash (a part
			// file created before the space check, or kept from an earlier
			// attempt whose resume the server no longer matches).
			dl.Discard(file)
			return "", &refusal{err}
		}
		return "", fmt.Errorf("%w: %w", firmware.ErrUnreachable, err) // resumed at the next check
	}
	u.report(ctx, c, rollout, m.Name, m.Version, release.StepDownloaded, "")
	u.report(ctx, c, rollout, m.Name, m.Version, release.StepInstalling, "")
	return file, nil
}

// cleanDownloads removes what dir holds that is not keep's download
// (an abandoned release's part file takes flash).
func cleanDownloads(dir, keep string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if p := filepath.Join(dir, e.Name()); p != keep && !strings.HasPrefix(p, keep+".") {
			os.RemoveAll(p)
		}
	}
	return nil
}

// removeDownload removes a payload once installed, and its resume
// files.
func removeDownload(file string) {
	for _, p := range []string{file, file + ".part", file + ".part.json"} {
		os.Remove(p)
	}
}

// removeCompleteDownloads deletes the complete downloads in dir, a
// payload's size of flash each. One exists only inside a running
// stage, from the download's end to the file's removal once staged: at
// the launcher's start (the state directory's lock held) it is what a
// crash left, staged already or not (then fetched again: Fetch resumes
// from a .part only). The .part files and their resume points stay.
func removeCompleteDownloads(dir string) error {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	var errs []error
	for _, e := range ents {
		if n := e.Name(); !strings.HasSuffix(n, ".part") && !strings.HasSuffix(n, ".part.json") {
			if err := os.RemoveAll(filepath.Join(dir, n)); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}

// oneLine is err's text on one line.
func oneLine(err error) string { return strings.Join(strings.Fields(err.Error()), " ") }
