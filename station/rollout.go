package station

// Staged firmware rollouts.
//
// A rollout assigns one published release to a set of devices fixed when
// it is created, in waves: the devices in an order shuffled by the
// rollout's ID alone (sorted by sha256(ID NUL device)), wave k holding the
// first ceil(pct_k·N/100) of them (at least one). Devices ask for their
// assignment (POST /firmware/check) and report each step of their update
// (POST /firmware/report), in firmware/release's messages.
//
//	create ──▶ running ──── pause ───▶ paused
//	            │  ▲ ◀────── resume ───┘  │
//	            │  │                      │
//	            │  └ next wave: every device of the open wave is final,
//	            │    or WaveWait passed since it opened (not the last)
//	            ├──▶ halted   failures among the devices of the opened
//	            │             waves above MaxFailures percent of them
//	            ├──▶ done     every device of the last wave is final
//	            └──▶ aborted  abort, from paused too
//
// advance moves a running rollout along this diagram, as of now: after
// each report, on each check, on each status, and every rolloutTick
// while serve runs (RunRollouts). A pause stops the wave's clock.
// Halted, aborted and done are final: the rollout assigns nothing more,
// and still records the reports of devices that were mid-update. At most
// one rollout per release name is running or paused.
//
// When a wave opens, RunRollouts nudges its devices through the fleet's
// MQTT broker, if the station knows one (NudgeConfig): devices/ID/cmd
// {"op":"firmware-check"}, QoS 1, as NudgeClientName. A nudge that fails
// is logged and audited; the devices learn of the wave at their next
// poll anyway.

import (
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"
	bolt "go.etcd.io/bbolt"

	"iotagent.dev/iotagent/firmware/release"
)

// Rollout states.
const (
	RolloutRunning = "running"
	RolloutPaused  = "paused"
	RolloutHalted  = "halted"
	RolloutAborted = "aborted"
	RolloutDone    = "done"
)

// Rollout defaults and bounds.
const (
	DefaultWaveWait    = 10 * time.Minute
	DefaultMaxFailures = 5 // percent
	MaxWaves           = 16
	// rolloutTick is how often RunRollouts moves rollouts on by the clock
	// and nudges the waves opened meanwhile.
	rolloutTick = 10 * time.Second
)

// NudgeClientName is the service the station connects to the fleet's
// broker as to nudge devices; the broker's ACL must let it write
// devices/+/cmd.
const NudgeClientName = "iotstation-firmware"

// nudgePayload is the command that makes an agent check at once.
const nudgePayload = `{"op":"firmware-check"}`

// DefaultWaves are a rollout's waves when none are given, in percent of
// its devices.
func DefaultWaves() []int { return []int{1, 10, 50, 100} }

// ErrUnknownRollout: no rollout with that ID.
var ErrUnknownRollout = errors.New("unknown rollout")

// RolloutRequest asks for a rollout (CreateRollout). Zero fields take
// the defaults.
type RolloutRequest struct {
	// Release is NAME@VERSION, a published release.
	Release string `json:"release"`
	// Devices are the IDs of enrolled devices; All takes every enrolled
	// device instead.
	Devices []string `json:"devices,omitempty"`
	All     bool     `json:"all,omitempty"`
	// Waves are percentages of the devices, increasing, the last 100
	// (default DefaultWaves).
	Waves []int `json:"waves,omitempty"`
	// WaveWait opens the next wave this long after the current one opened,
	// whether or not its devices finished (default DefaultWaveWait).
	WaveWait time.Duration `json:"wave_wait,omitempty"`
	// MaxFailures is the percentage of the opened waves' devices that may
	// fail before the rollout halts (default DefaultMaxFailures; 0: the
	// first failure halts it).
	MaxFailures *int `json:"max_failures,omitempty"`
}

// Rollout is one rollout as the registry holds it.
type Rollout struct {
	ID      string `json:"id"`
	Name    string `json:"name"`
	Version string `json:"version"`
	// Devices is how many devices the rollout holds.
	Devices     int           `json:"devices"`
	Waves       []int         `json:"waves"`     // percent
	WaveWait    time.Duration `json:"wave_wait"` // nanoseconds
	MaxFailures int           `json:"max_failures"`
	State       string        `json:"state"`
	// Wave is the open wave, 1 for the first; WaveStarted when it opened
	// (moved on by the time spent paused).
	Wave        int       `json:"wave"`
	WaveStarted time.Time `json:"wave_started"`
	PausedAt    time.Time `json:"paused_at,omitzero"`
	// HaltReason says why a halted rollout halted.
	HaltReason string    `json:"halt_reason,omitempty"`
	Created    time.Time `json:"created"`
	Ended      time.Time `json:"ended,omitzero"`
}

// Release is the rollout's NAME@VERSION.
func (r *Rollout) Release() string { return r.Name + "@" + r.Version }

// RolloutDevice is a device of a rollout and its last step (none before
// its first report).
type RolloutDevice struct {
	ID     string    `json:"id,omitempty"`
	Wave   int       `json:"wave"`
	Step   string    `json:"step,omitempty"`
	Reason string    `json:"reason,omitempty"`
	At     time.Time `json:"at,omitzero"` // when the station received it
}

// WaveStatus is the progress of one wave.
type WaveStatus struct {
	Wave    int  `json:"wave"`
	Percent int  `json:"percent"`
	Devices int  `json:"devices"`
	Open    bool `json:"open"`
	// Steps counts the wave's devices by their last step; Pending those
	// with none yet.
	Steps   map[string]int `json:"steps,omitempty"`
	Pending int            `json:"pending"`
	Failed  int            `json:"failed"`
}

// RolloutStatus is a rollout with its progress: per wave, and with
// Rollouts(ID) per device, in wave order.
type RolloutStatus struct {
	Rollout
	Progress    []WaveStatus    `json:"progress"`
	DeviceSteps []RolloutDevice `json:"device_steps,omitempty"`
}

// rolloutRecord is a rollout as stored: with the cumulative wave sizes,
// the counts advance needs and how many waves were nudged.
type rolloutRecord struct {
	Rollout
	// Sizes[k] is how many devices waves 1 to k+1 hold.
	Sizes []int `json:"sizes"`
	// Steps[k] counts wave k+1's devices by their last step.
	Steps  []map[string]int `json:"steps"`
	Nudged int              `json:"nudged"`
}

func (r *rolloutRecord) waveSize(w int) int {
	if w == 1 {
		return r.Sizes[0]
	}
	return r.Sizes[w-1] - r.Sizes[w-2]
}

// count sums, over waves from to to, the devices whose step matches.
func (r *rolloutRecord) count(from, to int, match func(string) bool) int {
	n := 0
	for w := from; w <= to; w++ {
		for step, c := range r.Steps[w-1] {
			if match(step) {
				n += c
			}
		}
	}
	return n
}

// advance moves a running rollout along the diagram at the top of this
// file as of now, and returns what happened, for the audit log.
func (r *rolloutRecord) advance(now time.Time) []AuditEntry {
	var out []AuditEntry
	event := func(ev, format string, args ...any) {
		out = append(out, AuditEntry{Time: now.UTC(), Event: ev, Result: "accepted", Reason: r.ID + " " + r.Release() + ": " + fmt.Sprintf(format, args...)})
	}
	for r.State == RolloutRunning {
		opened := r.Sizes[r.Wave-1]
		if failed := r.count(1, r.Wave, release.Failed); failed*100 > r.MaxFailures*opened {
			r.State, r.Ended = RolloutHalted, now
			r.HaltReason = fmt.Sprintf("wave %d: %d of %d devices failed (max %d%%)", r.Wave, failed, opened, r.MaxFailures)
			event("rollout-halted", "%s", r.HaltReason)
			return out
		}
		final := r.count(r.Wave, r.Wave, release.Final) == r.waveSize(r.Wave)
		last := r.Wave == len(r.Waves)
		waited := now.Sub(r.WaveStarted) >= r.WaveWait
		switch {
		case final && last:
			r.State, r.Ended = RolloutDone, now
			event("rollout-done", "every device of the last wave finished")
			return out
		case final || waited && !last:
			why := fmt.Sprintf("every device of wave %d finished", r.Wave)
			if !final {
				why = fmt.Sprintf("wave %d's wait (%v) passed", r.Wave, r.WaveWait)
			}
			r.Wave++
			r.WaveStarted = now
			event("rollout-wave", "wave %d of %d opened (%d devices): %s", r.Wave, len(r.Waves), r.waveSize(r.Wave), why)
		default:
			return out
		}
	}
	return out
}

// setStep records step as device's last in its wave w's counts.
func (r *rolloutRecord) setStep(w int, old, step string) {
	c := r.Steps[w-1]
	if c == nil {
		c = map[string]int{}
		r.Steps[w-1] = c
	}
	if old != "" {
		if c[old]--; c[old] <= 0 {
			delete(c, old)
		}
	}
	c[step]++
}

// waveSizes returns the cumulative sizes of waves of n devices.
func waveSizes(waves []int, n int) []int {
	sizes := make([]int, len(waves))
	for i, p := range waves {
		sizes[i] = max((p*n+99)/100, 1)
	}
	return sizes
}

func rolloutKey(id, device string) []byte { return []byte(id + "\x00" + device) }

func getRolloutTx(tx *bolt.Tx, id string) (*rolloutRecord, error) {
	r, err := getJSON[rolloutRecord](tx.Bucket(bucketRollout), id)
	if err == nil && r == nil {
		err = fmt.Errorf("%w %q", ErrUnknownRollout, id)
	}
	return r, err
}

func putRolloutTx(tx *bolt.Tx, r *rolloutRecord) error {
	return putJSON(tx.Bucket(bucketRollout), r.ID, r)
}

// rolloutsTx returns every rollout, oldest first.
func rolloutsTx(tx *bolt.Tx) ([]*rolloutRecord, error) {
	var out []*rolloutRecord
	err := tx.Bucket(bucketRollout).ForEach(func(k, v []byte) error {
		var r rolloutRecord
		if err := json.Unmarshal(v, &r); err != nil {
			return fmt.Errorf("registry rollout %q: %w", k, err)
		}
		out = append(out, &r)
		return nil
	})
	slices.SortFunc(out, func(a, b *rolloutRecord) int {
		if c := a.Created.Compare(b.Created); c != 0 {
			return c
		}
		if c := len(a.ID) - len(b.ID); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, err
}

// rolloutDeviceTx returns device's entry in rollout id, or nil.
func rolloutDeviceTx(tx *bolt.Tx, id, device string) (*RolloutDevice, error) {
	return getJSON[RolloutDevice](tx.Bucket(bucketRollDev), string(rolloutKey(id, device)))
}

// rolloutDevicesTx returns the devices of rollout id in wave order.
func rolloutDevicesTx(tx *bolt.Tx, id string) ([]RolloutDevice, error) {
	var out []RolloutDevice
	prefix := rolloutKey(id, "")
	c := tx.Bucket(bucketRollDev).Cursor()
	for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
		var d RolloutDevice
		if err := json.Unmarshal(v, &d); err != nil {
			return nil, fmt.Errorf("registry rollout device %q: %w", k, err)
		}
		d.ID = string(k[len(prefix):])
		out = append(out, d)
	}
	slices.SortStableFunc(out, func(a, b RolloutDevice) int { return a.Wave - b.Wave })
	return out, nil
}

// rolloutTx runs fn in one registry transaction, with every running
// rollout moved on as of now before fn and again after it (what fn
// recorded takes effect at once). What happened is audited once the
// transaction committed; a wave that opened wakes RunRollouts to nudge
// its devices. fn may be nil.
func (s *Station) rolloutTx(fn func(tx *bolt.Tx, now time.Time) error) error {
	now := s.now()
	var events []AuditEntry
	advance := func(tx *bolt.Tx) error {
		all, err := rolloutsTx(tx)
		if err != nil {
			return err
		}
		for _, r := range all {
			ev := r.advance(now)
			if len(ev) == 0 {
				continue
			}
			events = append(events, ev...)
			if err := putRolloutTx(tx, r); err != nil {
				return err
			}
		}
		return nil
	}
	err := s.reg.db.Update(func(tx *bolt.Tx) error {
		events = events[:0]
		if err := advance(tx); err != nil {
			return err
		}
		if fn != nil {
			if err := fn(tx, now); err != nil {
				return err
			}
		}
		return advance(tx)
	})
	if err != nil {
		return err
	}
	opened := false
	for _, e := range events {
		opened = opened || e.Event == "rollout-wave"
		if err := s.audit.write(e); err != nil {
			s.log.Error("audit log", "err", err)
		}
	}
	if opened {
		s.wakeRollouts()
	}
	return nil
}

// wakeRollouts has RunRollouts look for waves to nudge now.
func (s *Station) wakeRollouts() {
	select {
	case s.rolloutWake <- struct{}{}:
	default:
	}
}

// auditRollout records an administrative decision on a rollout.
func (s *Station) auditRollout(event, reason string, err error) {
	e := AuditEntry{Time: s.now().UTC(), Event: event, Result: "accepted", Reason: reason}
	if err != nil {
		e.Result, e.Reason = "refused", err.Error()
	}
	if aerr := s.audit.write(e); aerr != nil {
		s.log.Error("audit log", "err", aerr)
	}
}

// parseRelease splits NAME@VERSION, the version in its canonical form.
func parseRelease(s string) (name, version string, err error) {
	name, version, ok := strings.Cut(s, "@")
	if !ok || !release.ValidName(name) {
		return "", "", fmt.Errorf("release %q: want NAME@VERSION, such as iotagent@1.2.0", s)
	}
	v, err := release.ParseVersion(version)
	if err != nil {
		return "", "", fmt.Errorf("release %q: %w", s, err)
	}
	return name, v.String(), nil
}

// checkWaves validates a rollout's waves.
func checkWaves(waves []int) error {
	if len(waves) == 0 || len(waves) > MaxWaves {
		return fmt.Errorf("%d waves: want 1 to %d", len(waves), MaxWaves)
	}
	for i, p := range waves {
		if p < 1 || p > 100 || i > 0 && p <= waves[i-1] {
			return fmt.Errorf("waves %v: want percentages from 1 to 100, each above the one before", waves)
		}
	}
	if waves[len(waves)-1] != 100 {
		return fmt.Errorf("waves %v: the last wave must be 100%%, or some devices never get the release", waves)
	}
	return nil
}

// CreateRollout starts rolling a published release out to req's
// devices: its first wave opens at once. The decision is audited either
// way.
func (s *Station) CreateRollout(req RolloutRequest) (*RolloutStatus, error) {
	st, err := s.createRollout(req)
	reason := ""
	if err == nil {
		waves := make([]string, len(st.Waves))
		for i, p := range st.Waves {
			waves[i] = strconv.Itoa(p) + "%"
		}
		reason = fmt.Sprintf("%s %s to %d devices in waves of %s", st.ID, st.Release(), st.Devices, strings.Join(waves, ","))
	}
	s.auditRollout("rollout-create", reason, err)
	return st, err
}

func (s *Station) createRollout(req RolloutRequest) (*RolloutStatus, error) {
	name, version, err := parseRelease(req.Release)
	if err != nil {
		return nil, err
	}
	if !s.published(name, version) {
		return nil, fmt.Errorf("release %s@%s is not published at this station (iotstation firmware publish)", name, version)
	}
	waves := req.Waves
	if len(waves) == 0 {
		waves = DefaultWaves()
	}
	if err := checkWaves(waves); err != nil {
		return nil, err
	}
	wait := req.WaveWait
	if wait == 0 {
		wait = DefaultWaveWait
	}
	if wait < 0 {
		return nil, fmt.Errorf("wave wait %v: want a positive duration", wait)
	}
	maxFailures := DefaultMaxFailures
	if req.MaxFailures != nil {
		maxFailures = *req.MaxFailures
	}
	if maxFailures < 0 || maxFailures > 100 {
		return nil, fmt.Errorf("max failures %d%%: want 0%% to 100%%", maxFailures)
	}
	if req.All == (len(req.Devices) > 0) {
		return nil, errors.New("a rollout takes either a list of devices or all enrolled devices")
	}
	seen := map[string]bool{}
	for _, id := range req.Devices {
		if err := ValidDeviceID(id); err != nil {
			return nil, err
		}
		if seen[id] {
			return nil, fmt.Errorf("device %s is listed twice", id)
		}
		seen[id] = true
	}
	var out *RolloutStatus
	err = s.rolloutTx(func(tx *bolt.Tx, now time.Time) error {
		all, err := rolloutsTx(tx)
		if err != nil {
			return err
		}
		for _, r := range all {
			if r.Name == name && (r.State == RolloutRunning || r.State == RolloutPaused) {
				return fmt.Errorf("rollout %s of %s is %s: one rollout of %s at a time (abort it first: iotstation firmware rollout abort %s)",
					r.ID, r.Release(), r.State, name, r.ID)
			}
		}
		devs := slices.Clone(req.Devices)
		if req.All {
			err := tx.Bucket(bucketDevices).ForEach(func(k, v []byte) error {
				var d Device
				if err := json.Unmarshal(v, &d); err != nil {
					return fmt.Errorf("registry entry %q: %w", k, err)
				}
				if d.Status == StatusEnrolled {
					devs = append(devs, d.ID)
				}
				return nil
			})
			if err != nil {
				return err
			}
			if len(devs) == 0 {
				return errors.New("no enrolled device to roll out to")
			}
		}
		for _, id := range req.Devices {
			d, err := getJSON[Device](tx.Bucket(bucketDevices), id)
			if err != nil {
				return err
			}
			if d == nil {
				return fmt.Errorf("%w %q", ErrUnknownDevice, id)
			}
			if d.Status != StatusEnrolled {
				return fmt.Errorf("device %s is %s, not enrolled", id, d.Status)
			}
		}
		meta := tx.Bucket(bucketMeta)
		seq := uint64(1)
		if v := meta.Get(keyRolloutSeq); v != nil {
			if seq, err = strconv.ParseUint(string(v), 10, 64); err != nil {
				return fmt.Errorf("registry rollout number %q: %w", v, err)
			}
			seq++
		}
		if err := meta.Put(keyRolloutSeq, []byte(strconv.FormatUint(seq, 10))); err != nil {
			return err
		}
		r := &rolloutRecord{Rollout: Rollout{
			ID: "r" + strconv.FormatUint(seq, 10), Name: name, Version: version, Devices: len(devs),
			Waves: waves, WaveWait: wait, MaxFailures: maxFailures, State: RolloutRunning,
			Wave: 1, WaveStarted: now, Created: now,
		}}
		r.Sizes = waveSizes(waves, len(devs))
		for range waves {
			r.Steps = append(r.Steps, map[string]int{})
		}
		order := map[string][32]byte{}
		for _, id := range devs {
			order[id] = sha256.Sum256(rolloutKey(r.ID, id))
		}
		slices.SortFunc(devs, func(a, b string) int { ha, hb := order[a], order[b]; return bytes.Compare(ha[:], hb[:]) })
		w := 1
		for i, id := range devs {
			for i >= r.Sizes[w-1] {
				w++
			}
			if err := putJSON(tx.Bucket(bucketRollDev), string(rolloutKey(r.ID, id)), RolloutDevice{Wave: w}); err != nil {
				return err
			}
		}
		if err := putRolloutTx(tx, r); err != nil {
			return err
		}
		st := statusOf(r)
		out = &st
		return nil
	})
	if err != nil {
		return nil, err
	}
	s.wakeRollouts() // the first wave is open
	return out, nil
}

// statusOf is r's status without the devices.
func statusOf(r *rolloutRecord) RolloutStatus {
	st := RolloutStatus{Rollout: r.Rollout}
	for w := 1; w <= len(r.Waves); w++ {
		ws := WaveStatus{Wave: w, Percent: r.Waves[w-1], Devices: r.waveSize(w), Open: w <= r.Wave,
			Steps: map[string]int{}, Failed: r.count(w, w, release.Failed)}
		ws.Pending = ws.Devices
		for step, n := range r.Steps[w-1] {
			ws.Steps[step] = n
			ws.Pending -= n
		}
		st.Progress = append(st.Progress, ws)
	}
	return st
}

// Rollouts returns the rollout id with each device's step, or every
// rollout (id "") without them, oldest first; each moved on as of now
// first.
func (s *Station) Rollouts(id string) ([]RolloutStatus, error) {
	if err := s.rolloutTx(nil); err != nil {
		return nil, err
	}
	var out []RolloutStatus
	err := s.reg.db.View(func(tx *bolt.Tx) error {
		if id == "" {
			all, err := rolloutsTx(tx)
			for _, r := range all {
				out = append(out, statusOf(r))
			}
			return err
		}
		r, err := getRolloutTx(tx, id)
		if err != nil {
			return err
		}
		st := statusOf(r)
		if st.DeviceSteps, err = rolloutDevicesTx(tx, id); err != nil {
			return err
		}
		out = append(out, st)
		return nil
	})
	return out, err
}

// PauseRollout pauses a running rollout: it assigns nothing until
// resumed, and its wave's clock stops.
func (s *Station) PauseRollout(id string) error { return s.changeRollout(id, "pause") }

// ResumeRollout resumes a paused rollout.
func (s *Station) ResumeRollout(id string) error { return s.changeRollout(id, "resume") }

// AbortRollout ends a running or paused rollout for good.
func (s *Station) AbortRollout(id string) error { return s.changeRollout(id, "abort") }

func (s *Station) changeRollout(id, action string) error {
	var rel string
	err := s.rolloutTx(func(tx *bolt.Tx, now time.Time) error {
		r, err := getRolloutTx(tx, id)
		if err != nil {
			return err
		}
		rel = r.Release()
		switch {
		case action == "pause" && r.State == RolloutRunning:
			r.State, r.PausedAt = RolloutPaused, now
		case action == "resume" && r.State == RolloutPaused:
			r.State, r.WaveStarted = RolloutRunning, r.WaveStarted.Add(now.Sub(r.PausedAt))
			r.PausedAt = time.Time{}
		case action == "abort" && (r.State == RolloutRunning || r.State == RolloutPaused):
			r.State, r.Ended, r.PausedAt = RolloutAborted, now, time.Time{}
		case action == "pause":
			return fmt.Errorf("rollout %s is %s, not running", id, r.State)
		case action == "resume" && r.State == RolloutHalted:
			return fmt.Errorf("rollout %s halted (%s): a halted rollout stays halted; create another for the devices left", id, r.HaltReason)
		case action == "resume":
			return fmt.Errorf("rollout %s is %s, not paused", id, r.State)
		default:
			return fmt.Errorf("rollout %s is %s already", id, r.State)
		}
		return putRolloutTx(tx, r)
	})
	s.auditRollout("rollout-"+action, id+" "+rel, err)
	return err
}

// firmwareDevice returns the device of r's client certificate, refusing
// a request without one, from a revoked device or with a certificate it
// does not hold.
func (s *Station) firmwareDevice(r *http.Request) (*Device, error) {
	d, _, err := s.clientDevice(r)
	if err == nil && d == nil {
		err = refuse(http.StatusForbidden, "cert_missing", "firmware is served to devices: a device certificate is required (mutual TLS)")
	}
	return d, err
}

// refuseDevice answers a device's firmware request with the refusal err
// (internal errors are logged and answered 500), audited under the
// device d or, when it is not known, the client certificate's name.
func (s *Station) refuseDevice(w http.ResponseWriter, r *http.Request, event string, d *Device, err error) {
	e := AuditEntry{Time: s.now().UTC(), Event: event, Result: "refused", Remote: remoteIP(r)}
	if d != nil {
		e.Device = d.ID
	} else if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		e.Device = r.TLS.PeerCertificates[0].Subject.CommonName
	}
	rf := s.refusalOf(AuditEntry{Event: event}, err)
	e.Reason = rf.reason
	if aerr := s.audit.write(e); aerr != nil {
		s.log.Error("audit log", "err", aerr)
	}
	writeRefusal(w, rf)
}

// deviceMessage authenticates a device's firmware request (see
// firmwareDevice) and reads its body, a what of at most max bytes, with
// parse. The device is returned with an error about the body.
func deviceMessage[T any](s *Station, w http.ResponseWriter, r *http.Request, what string, max int, parse func([]byte) (*T, error)) (*Device, *T, error) {
	d, err := s.firmwareDevice(r)
	if err != nil {
		return nil, nil, err
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, int64(max)))
	var mbe *http.MaxBytesError
	if errors.As(err, &mbe) {
		return d, nil, refuse(http.StatusRequestEntityTooLarge, "too_large", "%s body over %d bytes", what, max)
	}
	if err != nil {
		return d, nil, refuse(http.StatusBadRequest, "malformed", "reading the %s body: %v", what, err)
	}
	m, err := parse(body)
	if err != nil {
		return d, nil, refuse(http.StatusBadRequest, "malformed", "%v", err)
	}
	return d, m, nil
}

// updateFirmwareTx applies f to the firmware entry of device id.
func updateFirmwareTx(tx *bolt.Tx, id string, now time.Time, f func(*DeviceFirmware)) error {
	devs := tx.Bucket(bucketDevices)
	d, err := getJSON[Device](devs, id)
	if err != nil {
		return err
	}
	if d == nil {
		return refuse(http.StatusForbidden, "device_unknown", "device %s is not in the registry", id)
	}
	if d.Firmware == nil {
		d.Firmware = &DeviceFirmware{}
	}
	f(d.Firmware)
	d.LastSeen = now
	return putJSON(devs, id, d)
}

// handleFirmwareCheck answers a device's POST /firmware/check: what it
// runs is recorded, and it is given the release of the oldest running
// rollout that holds it in an open wave and where it has not finished,
// or 204.
func (s *Station) handleFirmwareCheck(w http.ResponseWriter, r *http.Request) {
	d, c, err := deviceMessage(s, w, r, "check", release.MaxCheckSize, release.ParseCheck)
	var a *release.Assignment
	if err == nil {
		err = s.rolloutTx(func(tx *bolt.Tx, now time.Time) error {
			a = nil
			err := updateFirmwareTx(tx, d.ID, now, func(f *DeviceFirmware) {
				f.Agent, f.Images, f.CheckedAt = c.Agent, c.Images, now
			})
			if err != nil {
				return err
			}
			all, err := rolloutsTx(tx)
			if err != nil {
				return err
			}
			for _, ro := range all {
				if ro.State != RolloutRunning {
					continue
				}
				p, err := rolloutDeviceTx(tx, ro.ID, d.ID)
				if err != nil {
					return err
				}
				if p == nil || p.Wave > ro.Wave || release.Final(p.Step) {
					continue
				}
				if runsAlready(c, ro.Name, ro.Version) {
					// Nothing to do there: not a failure of the release.
					if err := recordStepTx(tx, d.ID, &release.Report{Rollout: ro.ID, Name: ro.Name, Version: ro.Version, Step: release.StepCurrent}, now); err != nil {
						return err
					}
					continue
				}
				a = &release.Assignment{Rollout: ro.ID, Name: ro.Name, Version: ro.Version}
				return nil
			}
			return nil
		})
	}
	if err != nil {
		s.metrics.firmwareCheck("refused")
		s.refuseDevice(w, r, "firmware-check", d, err)
		return
	}
	if a == nil {
		s.metrics.firmwareCheck("none")
		w.WriteHeader(http.StatusNoContent)
		return
	}
	s.metrics.firmwareCheck("assigned")
	b, _ := json.Marshal(a)
	w.Header().Set("Content-Type", "application/json")
	w.Write(append(b, '\n'))
}

// handleFirmwareReport records a device's POST /firmware/report: the
// step in the rollout it names (which must hold the device in an open
// wave, for that release), and the device's last report and running
// version. A refused report changes nothing.
func (s *Station) handleFirmwareReport(w http.ResponseWriter, r *http.Request) {
	const event = "firmware-report"
	d, rep, err := deviceMessage(s, w, r, "report", release.MaxReportSize, release.ParseReport)
	if err == nil {
		err = s.rolloutTx(func(tx *bolt.Tx, now time.Time) error {
			if rep.Rollout != "" {
				if err := recordStepTx(tx, d.ID, rep, now); err != nil {
					return err
				}
			}
			return updateFirmwareTx(tx, d.ID, now, func(f *DeviceFirmware) {
				f.LastReport, f.ReportedAt = rep, now
				if rep.Running != "" {
					f.Agent.Version = rep.Running
				}
				if rep.Step != release.StepCommitted || rep.Name == f.Agent.Name {
					return
				}
				for i := range f.Images {
					if f.Images[i].Name == rep.Name {
						f.Images[i].Version = rep.Version
					}
				}
			})
		})
	}
	if err != nil {
		step := ""
		if rep != nil {
			step = rep.Step
		}
		s.metrics.firmwareReport("refused", step)
		s.refuseDevice(w, r, event, d, err)
		return
	}
	s.metrics.firmwareReport("accepted", rep.Step)
	reason := cmp.Or(rep.Rollout, "local") + " " + rep.Name + "@" + rep.Version + ": " + rep.Step
	if rep.Reason != "" {
		reason += ": " + rep.Reason
	}
	e := AuditEntry{Time: s.now().UTC(), Event: event, Result: "accepted", Device: d.ID, Reason: reason, Remote: remoteIP(r)}
	if aerr := s.audit.write(e); aerr != nil {
		s.log.Error("audit log", "err", aerr)
	}
	w.WriteHeader(http.StatusNoContent)
}

// recordStepTx records rep's step as device's in the rollout it names.
// runsAlready reports whether the device's check says it runs release
// name at version (a later version is no reason to skip it: the device
// refuses the downgrade, and that is a failure of the rollout).
func runsAlready(c *release.Check, name, version string) bool {
	want, err := release.ParseVersion(version)
	if err != nil {
		return false
	}
	for _, r := range append([]release.Running{c.Agent}, c.Images...) {
		if v, err := release.ParseVersion(r.Version); err == nil && r.Name == name && v.Compare(want) == 0 {
			return true
		}
	}
	return false
}

func recordStepTx(tx *bolt.Tx, device string, rep *release.Report, now time.Time) error {
	ro, err := getJSON[rolloutRecord](tx.Bucket(bucketRollout), rep.Rollout)
	if err != nil {
		return err
	}
	if ro == nil {
		return refuse(http.StatusNotFound, "rollout_unknown", "no rollout %s at this station", rep.Rollout)
	}
	p, err := rolloutDeviceTx(tx, ro.ID, device)
	if err != nil {
		return err
	}
	if p == nil {
		return refuse(http.StatusForbidden, "rollout_other", "device %s is not in rollout %s", device, ro.ID)
	}
	if p.Wave > ro.Wave {
		return refuse(http.StatusForbidden, "rollout_unassigned", "rollout %s has not assigned anything to device %s (its wave %d is not open)", ro.ID, device, p.Wave)
	}
	if v, _ := release.ParseVersion(rep.Version); rep.Name != ro.Name || v.String() != ro.Version {
		return refuse(http.StatusConflict, "rollout_release", "rollout %s rolls out %s, not %s@%s", ro.ID, ro.Release(), rep.Name, rep.Version)
	}
	ro.setStep(p.Wave, p.Step, rep.Step)
	p.Step, p.Reason, p.At = rep.Step, rep.Reason, now
	if err := putJSON(tx.Bucket(bucketRollDev), string(rolloutKey(ro.ID, device)), p); err != nil {
		return err
	}
	return putRolloutTx(tx, ro)
}

// rolloutStates counts the rollouts by state, for /metrics.
func (s *Station) rolloutStates() (map[string]int, error) {
	out := map[string]int{}
	err := s.reg.db.View(func(tx *bolt.Tx) error {
		all, err := rolloutsTx(tx)
		for _, r := range all {
			out[r.State]++
		}
		return err
	})
	return out, err
}

// RunRollouts moves rollouts on by the clock every rolloutTick and nudges
// the devices of each wave that opened, until ctx ends; it returns nil
// then. serve runs it.
func (s *Station) RunRollouts(ctx context.Context) error {
	t := time.NewTicker(rolloutTick)
	defer t.Stop()
	for {
		// Without a running rollout, no transaction (each commit is a
		// write to disk).
		if running, err := s.rolloutRunning(); err != nil {
			s.log.Error("rollouts", "err", err)
		} else if running {
			if err := s.rolloutTx(nil); err != nil {
				s.log.Error("rollouts", "err", err)
			}
			s.nudgeOpenedWaves(ctx)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		case <-s.rolloutWake:
		}
	}
}

// NudgeConfig says where the station nudges the devices of a wave that
// opened: station.json's "firmware_nudge" object. The zero value nudges
// at end_sessions' broker, if station.json names one (the broker devices
// are connected to), and otherwise nowhere: devices then learn of their
// assignment at their next poll.
type NudgeConfig struct {
	// Broker is the fleet broker's mqtts://HOST:PORT. The station connects
	// as NudgeClientName with a certificate it issues itself; the
	// broker's ACL must let it write devices/+/cmd.
	Broker string `json:"broker,omitempty"`
	// CAFile, a PEM file, verifies the broker's certificate (default: the
	// station's CA certificates).
	CAFile string `json:"ca_file,omitempty"`
}

// nudgeConfig reads station.json's firmware_nudge (or end_sessions) at
// each use.
func (s *Station) nudgeConfig() (NudgeConfig, error) {
	fc, err := s.readFileConfig()
	switch {
	case err != nil:
		return NudgeConfig{}, err
	case fc.FirmwareNudge != nil && fc.FirmwareNudge.Broker != "":
		return *fc.FirmwareNudge, nil
	case fc.EndSessions != nil && fc.EndSessions.MosquittoDynsec != "":
		return NudgeConfig{Broker: fc.EndSessions.MosquittoDynsec, CAFile: fc.EndSessions.CAFile}, nil
	}
	return NudgeConfig{}, nil
}

// rolloutRunning reports whether a rollout is running.
func (s *Station) rolloutRunning() (bool, error) {
	running := false
	err := s.reg.db.View(func(tx *bolt.Tx) error {
		all, err := rolloutsTx(tx)
		for _, r := range all {
			running = running || r.State == RolloutRunning
		}
		return err
	})
	return running, err
}

// nudgeBatch is the devices of waves of one rollout to nudge.
type nudgeBatch struct {
	what    string // "r1 iotagent@1.2.0 wave 2"
	devices []string
}

// takeNudges returns the devices of the waves of running rollouts opened
// since their last nudge, and marks those waves nudged: a nudge is sent
// once, whatever becomes of it.
func (s *Station) takeNudges() ([]nudgeBatch, error) {
	var out []nudgeBatch
	err := s.reg.db.Update(func(tx *bolt.Tx) error {
		out = out[:0]
		all, err := rolloutsTx(tx)
		if err != nil {
			return err
		}
		for _, r := range all {
			if r.State != RolloutRunning || r.Nudged >= r.Wave {
				continue
			}
			devs, err := rolloutDevicesTx(tx, r.ID)
			if err != nil {
				return err
			}
			b := nudgeBatch{what: fmt.Sprintf("%s %s wave %d", r.ID, r.Release(), r.Wave)}
			if r.Nudged+1 < r.Wave {
				b.what = fmt.Sprintf("%s %s waves %d-%d", r.ID, r.Release(), r.Nudged+1, r.Wave)
			}
			for _, d := range devs {
				if d.Wave > r.Nudged && d.Wave <= r.Wave && !release.Final(d.Step) {
					b.devices = append(b.devices, d.ID)
				}
			}
			r.Nudged = r.Wave
			if err := putRolloutTx(tx, r); err != nil {
				return err
			}
			if len(b.devices) > 0 {
				out = append(out, b)
			}
		}
		return nil
	})
	return out, err
}

// nudgeOpenedWaves nudges the devices of the waves opened since the last
// nudge, if the station knows the fleet's broker; each batch is audited
// (rollout-nudge).
func (s *Station) nudgeOpenedWaves(ctx context.Context) {
	batches, err := s.takeNudges()
	if err != nil {
		s.log.Error("rollouts: nudging devices", "err", err)
		return
	}
	if len(batches) == 0 {
		return
	}
	cfg, err := s.nudgeConfig()
	if err == nil && cfg.Broker == "" {
		return // the devices poll
	}
	var errs []error
	if err == nil {
		errs = s.publishNudges(ctx, cfg, batches)
	}
	for i, b := range batches {
		e := AuditEntry{Time: s.now().UTC(), Event: "rollout-nudge", Result: "accepted",
			Reason: fmt.Sprintf("%s: %d devices nudged at %s", b.what, len(b.devices), cfg.Broker)}
		berr := err
		if berr == nil {
			berr = errs[i]
		}
		if berr != nil {
			e.Result, e.Reason = "refused", fmt.Sprintf("%s: %v (the devices learn of it when they poll)", b.what, berr)
			s.log.Warn("rollouts: nudging devices failed; they learn of the wave when they poll", "rollout", b.what, "err", berr)
		}
		if aerr := s.audit.write(e); aerr != nil {
			s.log.Error("audit log", "err", aerr)
		}
	}
}

// publishNudges publishes the nudge to each batch's devices over one
// connection to the broker, and returns each batch's error (nil when
// every device's nudge was acknowledged).
func (s *Station) publishNudges(ctx context.Context, cfg NudgeConfig, batches []nudgeBatch) []error {
	errs := make([]error, len(batches))
	s.nudgeCert.mu.Lock()
	defer s.nudgeCert.mu.Unlock()
	c, timeout, err := s.dialMQTT(ctx, "firmware_nudge", cfg.Broker, cfg.CAFile, NudgeClientName, &s.nudgeCert)
	if err != nil {
		for i := range errs {
			errs[i] = err
		}
		return errs
	}
	defer c.Disconnect(100)
	for i, b := range batches {
		toks := make([]paho.Token, len(b.devices))
		for j, id := range b.devices {
			toks[j] = c.Publish("devices/"+id+"/cmd", 1, false, nudgePayload)
		}
		// One deadline for a batch: a broker that stopped answering costs
		// one timeout, not one a device.
		bctx, cancel := context.WithTimeout(ctx, timeout)
		failed, first := 0, error(nil)
		for j, tok := range toks {
			var err error
			select {
			case <-tok.Done():
				err = tok.Error()
			case <-bctx.Done():
				err = fmt.Errorf("no PUBACK within %v", timeout)
				if ctx.Err() != nil {
					err = ctx.Err()
				}
			}
			if err != nil {
				if failed++; first == nil {
					first = fmt.Errorf("%s: %w", b.devices[j], err)
				}
			}
		}
		cancel()
		if failed > 0 {
			errs[i] = fmt.Errorf("%d of %d nudges failed (%w)", failed, len(b.devices), first)
		}
	}
	return errs
}
