package station_test

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/firmware/release/releasetest"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
)

// fleet is a serving station with releases published and devices
// enrolled, each with its mutual TLS client; its clock is moved by hand.
type fleet struct {
	st      *stationtest.Station
	clock   *atomicDuration
	ids     []string
	clients map[string]*http.Client
	signer  ed25519.PrivateKey
}

func startFleet(t *testing.T, devices int, releases ...string) *fleet {
	t.Helper()
	f := &fleet{clock: &atomicDuration{}, clients: map[string]*http.Client{}}
	f.st = stationtest.Start(t, stationtest.Options{Now: f.clock.now, CertLifetime: 24 * time.Hour, Lenient: true})
	root := releasetest.Key(t)
	f.signer = releasetest.Key(t)
	kl := &release.KeyList{Version: 1, Expires: time.Now().Add(24 * time.Hour), RootThreshold: 1, Threshold: 1,
		RootKeys:    []release.PublicKey{releasetest.Public(root)},
		SigningKeys: []release.SigningKey{{Key: releasetest.Public(f.signer), Expires: time.Now().Add(24 * time.Hour)}}}
	if err := f.st.InstallKeyList(releasetest.Sign(t, release.TypeKeyList, kl, root)); err != nil {
		t.Fatal(err)
	}
	for _, r := range releases {
		f.publish(t, r)
	}
	for i := range devices {
		id := fmt.Sprintf("gw-%02d", i)
		cert := f.st.Device(t, id).TLS
		f.ids = append(f.ids, id)
		f.clients[id] = client(t, f.st, &cert)
	}
	return f
}

// publish publishes NAME@VERSION, an agent release of a few bytes.
func (f *fleet) publish(t *testing.T, nameVersion string) {
	t.Helper()
	name, version, _ := strings.Cut(nameVersion, "@")
	payload := make([]byte, 1000)
	rand.Read(payload)
	sum := sha256.Sum256(payload)
	file := filepath.Join(t.TempDir(), "payload")
	if err := os.WriteFile(file, payload, 0o600); err != nil {
		t.Fatal(err)
	}
	m := release.Manifest{Name: name, Type: release.TypeAgent, Version: version, SVN: 1, HW: []string{"linux/armv7"},
		Length: int64(len(payload)), SHA256: hex.EncodeToString(sum[:]), Expires: time.Now().Add(24 * time.Hour)}
	if _, err := f.st.PublishRelease(file, releasetest.Sign(t, release.TypeManifest, m, f.signer)); err != nil {
		t.Fatal(err)
	}
}

// check is the device's POST /firmware/check, saying it runs iotagent
// running; it returns the status, the assignment on 200, and the body.
func (f *fleet) check(t *testing.T, id, running string) (int, *release.Assignment, string) {
	t.Helper()
	body, _ := json.Marshal(release.Check{Agent: release.Running{Name: "iotagent", Version: running}})
	a := post(t, f.clients[id], f.st, "/firmware/check", "application/json", body)
	if a.status != http.StatusOK {
		return a.status, nil, string(a.body)
	}
	as, err := release.ParseAssignment(a.body)
	if err != nil {
		t.Fatalf("check by %s: the assignment %q: %v", id, a.body, err)
	}
	return a.status, as, string(a.body)
}

// assigned checks as device id and returns the rollout it was assigned
// ("" on 204), failing on any other answer.
func (f *fleet) assigned(t *testing.T, id string) string {
	t.Helper()
	code, a, body := f.check(t, id, "1.0.0")
	switch {
	case code == http.StatusNoContent:
		return ""
	case code == http.StatusOK:
		return a.Rollout
	}
	t.Fatalf("check by %s = %d %s", id, code, body)
	return ""
}

// report is the device's POST /firmware/report of step in rollout for
// iotagent@version.
func (f *fleet) report(t *testing.T, id, rollout, version, step, reason string) answer {
	t.Helper()
	body, _ := json.Marshal(release.Report{Rollout: rollout, Name: "iotagent", Version: version, Step: step, Reason: reason,
		Running: "1.0.0", At: time.Now()})
	return post(t, f.clients[id], f.st, "/firmware/report", "application/json", body)
}

func (f *fleet) mustReport(t *testing.T, id, rollout, version string, steps ...string) {
	t.Helper()
	for _, step := range steps {
		if a := f.report(t, id, rollout, version, step, ""); a.status != http.StatusNoContent {
			t.Fatalf("report %s by %s = %d %s", step, id, a.status, a.body)
		}
	}
}

func (f *fleet) status(t *testing.T, id string) station.RolloutStatus {
	t.Helper()
	all, err := f.st.Rollouts(id)
	if err != nil || len(all) != 1 {
		t.Fatalf("Rollouts(%s) = %d, %v", id, len(all), err)
	}
	return all[0]
}

// waves returns the devices of each wave of rollout id.
func (f *fleet) waves(t *testing.T, id string) [][]string {
	t.Helper()
	st := f.status(t, id)
	out := make([][]string, len(st.Waves))
	for _, d := range st.DeviceSteps {
		out[d.Wave-1] = append(out[d.Wave-1], d.ID)
	}
	return out
}

func maxFailures(n int) *int { return &n }

// A rollout over ten devices in waves of 10, 50 and 100%: only the open
// waves' devices are assigned the release, each wave opens once the one
// before committed, the rollout is done when the last did; devices that
// finished are assigned nothing more, and Devices shows what each runs.
func TestRolloutWavesAdvance(t *testing.T) {
	f := startFleet(t, 10, "iotagent@1.1.0")
	st, err := f.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", All: true, Waves: []int{10, 50, 100}})
	if err != nil {
		t.Fatal(err)
	}
	if st.ID == "" || st.State != station.RolloutRunning || st.Wave != 1 || st.Devices != 10 {
		t.Fatalf("CreateRollout = %+v", st.Rollout)
	}
	waves := f.waves(t, st.ID)
	if got := []int{len(waves[0]), len(waves[1]), len(waves[2])}; !slices.Equal(got, []int{1, 4, 5}) {
		t.Fatalf("wave sizes = %v, want [1 4 5] (1, 5 and 10 devices in all)", got)
	}
	// The order is the rollout's own, not the devices' names.
	if again := f.waves(t, st.ID); !slices.Equal(again[1], waves[1]) {
		t.Errorf("the waves changed between two reads: %v, then %v", waves[1], again[1])
	}
	for _, devs := range waves[1:] {
		for _, id := range devs {
			f.assertAssigned(t, id, st.ID, false)
		}
	}
	for w, devs := range waves {
		for _, id := range devs {
			f.assertAssigned(t, id, st.ID, true)
		}
		for _, id := range devs {
			f.mustReport(t, id, st.ID, "1.1.0", release.StepDownloading, release.StepDownloaded, release.StepInstalling, release.StepTrial)
		}
		if got := f.status(t, st.ID); got.Wave != w+1 || got.Progress[w].Steps[release.StepTrial] != len(devs) {
			t.Fatalf("with wave %d in trial: wave %d, progress %+v", w+1, got.Wave, got.Progress[w])
		}
		for _, id := range devs {
			f.mustReport(t, id, st.ID, "1.1.0", release.StepCommitted)
			if a := f.assigned(t, id); a != "" {
				t.Errorf("%s, committed, is still assigned %s", id, a)
			}
		}
		if w+1 < len(waves) {
			if got := f.status(t, st.ID); got.Wave != w+2 || got.State != station.RolloutRunning {
				t.Fatalf("wave %d committed: rollout %s at wave %d, want %d", w+1, got.State, got.Wave, w+2)
			}
			for _, id := range waves[w+1] {
				f.assertAssigned(t, id, st.ID, true)
			}
		}
	}
	if got := f.status(t, st.ID); got.State != station.RolloutDone || got.Ended.IsZero() {
		t.Errorf("every device committed: rollout %s, want done", got.State)
	}
	devs, err := f.st.Devices()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if d.Firmware == nil || d.Firmware.Agent != (release.Running{Name: "iotagent", Version: "1.0.0"}) ||
			d.Firmware.LastReport == nil || d.Firmware.LastReport.Step != release.StepCommitted {
			t.Errorf("Devices: %s firmware = %+v, want iotagent 1.0.0 with its commit", d.ID, d.Firmware)
		}
	}
	// A device that says it runs 1.1.0 now shows it.
	if code, _, body := f.check(t, f.ids[0], "1.1.0"); code != http.StatusNoContent {
		t.Errorf("check after the rollout = %d %s, want 204", code, body)
	}
	devs, _ = f.st.Devices()
	if devs[0].Firmware.Agent.Version != "1.1.0" {
		t.Errorf("Devices: %s runs %q, want 1.1.0", devs[0].ID, devs[0].Firmware.Agent.Version)
	}
	if n := len(auditEntries(t, f.st, "rollout-wave")); n != 2 {
		t.Errorf("audit log: %d rollout-wave entries, want 2", n)
	}
	metrics := get(t, f.clients[f.ids[0]], f.st.URL+"/metrics")
	for _, want := range []string{`iotstation_rollouts{state="done"} 1`, `iotstation_firmware_reports_total{result="accepted",step="committed"} 10`,
		`iotstation_firmware_checks_total{result="assigned"} 19`} { // wave 1's once, the others' twice
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

// assertAssigned checks as device id and fails unless it is assigned
// rollout (want) or nothing (!want).
func (f *fleet) assertAssigned(t *testing.T, id, rollout string, want bool) {
	t.Helper()
	got := f.assigned(t, id)
	switch {
	case want && got != rollout:
		t.Errorf("check by %s: assigned %q, want rollout %s", id, got, rollout)
	case !want && got != "":
		t.Errorf("check by %s: assigned %s, want 204", id, got)
	}
}

func get(t *testing.T, c *http.Client, url string) string {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// The next wave opens when the wait passed, with no report at all; a
// pause stops the wave's clock, a resume starts it again.
func TestRolloutWaveWait(t *testing.T) {
	f := startFleet(t, 4, "iotagent@1.1.0")
	st, err := f.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", Devices: f.ids, Waves: []int{25, 100}, WaveWait: 10 * time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	waves := f.waves(t, st.ID)
	f.clock.add(9 * time.Minute)
	if got := f.status(t, st.ID); got.Wave != 1 {
		t.Fatalf("9 minutes in: wave %d, want 1", got.Wave)
	}
	if err := f.st.PauseRollout(st.ID); err != nil {
		t.Fatal(err)
	}
	f.clock.add(time.Hour)
	if got := f.status(t, st.ID); got.Wave != 1 || got.State != station.RolloutPaused {
		t.Fatalf("paused an hour: %s at wave %d, want paused at 1", got.State, got.Wave)
	}
	f.assertAssigned(t, waves[0][0], st.ID, false)
	if err := f.st.ResumeRollout(st.ID); err != nil {
		t.Fatal(err)
	}
	f.assertAssigned(t, waves[0][0], st.ID, true)
	for _, id := range waves[1] {
		f.assertAssigned(t, id, st.ID, false)
	}
	f.clock.add(2 * time.Minute)
	// The check itself moves the rollout on.
	for _, id := range waves[1] {
		f.assertAssigned(t, id, st.ID, true)
	}
	if got := f.status(t, st.ID); got.Wave != 2 || got.State != station.RolloutRunning {
		t.Errorf("11 minutes of wave 1: %s at wave %d, want running at 2", got.State, got.Wave)
	}
	// The last wave waits for its devices, however long.
	f.clock.add(24 * time.Hour)
	if got := f.status(t, st.ID); got.State != station.RolloutRunning {
		t.Errorf("a day into the last wave, nobody reported: %s, want running", got.State)
	}
}

// A failure in the first wave halts the rollout by itself, with the
// count; the rest of the fleet is assigned nothing, the failed device
// nothing again.
func TestRolloutHaltsOnFailure(t *testing.T) {
	f := startFleet(t, 10, "iotagent@1.1.0")
	st, err := f.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", All: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := []int{st.Progress[0].Devices, st.Progress[1].Devices, st.Progress[2].Devices, st.Progress[3].Devices}; !slices.Equal(got, []int{1, 0, 4, 5}) {
		t.Errorf("default waves of 10 devices = %v, want [1 0 4 5] (1%%, 10%%, 50%%, 100%%)", got)
	}
	first := f.waves(t, st.ID)[0][0]
	f.assertAssigned(t, first, st.ID, true)
	f.mustReport(t, first, st.ID, "1.1.0", release.StepDownloading, release.StepTrial)
	if a := f.report(t, first, st.ID, "1.1.0", release.StepRolledBack, "the trial crashed 3 times"); a.status != http.StatusNoContent {
		t.Fatalf("report rolled-back = %d %s", a.status, a.body)
	}
	got := f.status(t, st.ID)
	if got.State != station.RolloutHalted || got.HaltReason != "wave 1: 1 of 1 devices failed (max 5%)" {
		t.Errorf("after a failure in wave 1: %s %q, want halted with the count", got.State, got.HaltReason)
	}
	if got.Progress[0].Failed != 1 || got.DeviceSteps[0].Reason != "the trial crashed 3 times" {
		t.Errorf("progress %+v, device %+v: want the failure and its reason", got.Progress[0], got.DeviceSteps[0])
	}
	for _, id := range f.ids {
		f.assertAssigned(t, id, st.ID, false)
	}
	if e := auditEntries(t, f.st, "rollout-halted"); len(e) != 1 || !strings.Contains(e[0].Reason, "1 of 1 devices failed") {
		t.Errorf("audit log: rollout-halted %+v", e)
	}
	if err := f.st.ResumeRollout(st.ID); err == nil || !strings.Contains(err.Error(), "halted") {
		t.Errorf("ResumeRollout of a halted rollout = %v, want refused", err)
	}
	// Halted, it no longer blocks the release name.
	if _, err := f.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", Devices: f.ids[:1]}); err != nil {
		t.Errorf("a new rollout after a halted one: %v", err)
	}
}

// Pause, resume and abort, and the refusals around them: one rollout per
// release name at a time, releases that are not published, devices that
// are not enrolled.
func TestRolloutPauseResumeAbort(t *testing.T) {
	f := startFleet(t, 2, "iotagent@1.1.0", "iotagent@1.2.0")
	st, err := f.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", Devices: f.ids, Waves: []int{100}})
	if err != nil {
		t.Fatal(err)
	}
	id := st.ID
	f.assertAssigned(t, f.ids[0], id, true)
	for _, tc := range []struct {
		req  station.RolloutRequest
		want string
	}{
		{station.RolloutRequest{Release: "iotagent@1.2.0", All: true}, "one rollout of iotagent at a time"},
		{station.RolloutRequest{Release: "iotagent@9.0.0", All: true}, "is not published"},
		{station.RolloutRequest{Release: "iotagent", All: true}, "want NAME@VERSION"},
		{station.RolloutRequest{Release: "other@1.0.0", Devices: []string{"gw-nope"}}, `unknown device "gw-nope"`},
		{station.RolloutRequest{Release: "iotagent@1.2.0", Devices: []string{"gw-00"}, All: true}, "either a list of devices or all"},
		{station.RolloutRequest{Release: "iotagent@1.2.0", All: true, Waves: []int{10, 50}}, "the last wave must be 100%"},
		{station.RolloutRequest{Release: "iotagent@1.2.0", All: true, MaxFailures: maxFailures(101)}, "max failures 101%"},
	} {
		if tc.req.Release == "other@1.0.0" {
			f.publish(t, "other@1.0.0")
		}
		if _, err := f.st.CreateRollout(tc.req); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("CreateRollout(%+v) = %v, want refused: %s", tc.req, err, tc.want)
		}
	}
	if err := f.st.PauseRollout(id); err != nil {
		t.Fatal(err)
	}
	f.assertAssigned(t, f.ids[0], id, false)
	if err := f.st.PauseRollout(id); err == nil || !strings.Contains(err.Error(), "not running") {
		t.Errorf("pause twice = %v", err)
	}
	// Paused, it still blocks its release name, and records reports.
	if _, err := f.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.2.0", All: true}); err == nil {
		t.Error("a second rollout of iotagent while one is paused was created")
	}
	f.mustReport(t, f.ids[0], id, "1.1.0", release.StepDownloading)
	if err := f.st.ResumeRollout(id); err != nil {
		t.Fatal(err)
	}
	f.assertAssigned(t, f.ids[0], id, true)
	if err := f.st.AbortRollout(id); err != nil {
		t.Fatal(err)
	}
	for _, d := range f.ids {
		f.assertAssigned(t, d, id, false)
	}
	for _, op := range []func(string) error{f.st.PauseRollout, f.st.ResumeRollout, f.st.AbortRollout} {
		if err := op(id); err == nil || !strings.Contains(err.Error(), "aborted") {
			t.Errorf("an operation on an aborted rollout = %v, want refused", err)
		}
	}
	if err := f.st.AbortRollout("r99"); err == nil || !strings.Contains(err.Error(), `unknown rollout "r99"`) {
		t.Errorf("AbortRollout(r99) = %v", err)
	}
	next, err := f.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.2.0", All: true})
	if err != nil {
		t.Fatalf("a rollout after the abort: %v", err)
	}
	if next.ID == id {
		t.Errorf("the new rollout reuses ID %s", id)
	}
	if all, err := f.st.Rollouts(""); err != nil || len(all) != 2 || all[0].ID != id || all[0].State != station.RolloutAborted {
		t.Errorf("Rollouts() = %+v, %v; want both, the aborted one first", all, err)
	}
	if e := auditEntries(t, f.st, "rollout-abort"); len(e) < 1 || e[0].Result != "accepted" {
		t.Errorf("audit log: rollout-abort %+v", e)
	}
}

// What a device may not say: a report in a rollout that does not hold it,
// in an unknown rollout, for another release, or before its wave opened,
// and malformed or oversized bodies, are each refused with a one-line
// reason and change nothing; a revoked device and one without a
// certificate are refused.
func TestRolloutRefusals(t *testing.T) {
	f := startFleet(t, 3, "iotagent@1.1.0")
	st, err := f.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", Devices: f.ids[:2], Waves: []int{50, 100}})
	if err != nil {
		t.Fatal(err)
	}
	waves := f.waves(t, st.ID)
	first, second, outsider := waves[0][0], waves[1][0], f.ids[2]
	before := f.status(t, st.ID)
	for _, tc := range []struct {
		name, device, rollout, version string
		code                           int
		want                           string
	}{
		{"another device's rollout", outsider, st.ID, "1.1.0", http.StatusForbidden, "device gw-02 is not in rollout " + st.ID},
		{"unknown rollout", first, "r99", "1.1.0", http.StatusNotFound, "no rollout r99"},
		{"another release", first, st.ID, "1.2.0", http.StatusConflict, "rolls out iotagent@1.1.0, not iotagent@1.2.0"},
		{"wave not open", second, st.ID, "1.1.0", http.StatusForbidden, "its wave 2 is not open"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := f.report(t, tc.device, tc.rollout, tc.version, release.StepRolledBack, "x")
			if a.status != tc.code || !strings.Contains(string(a.body), tc.want) || strings.Count(strings.TrimSpace(string(a.body)), "\n") > 0 {
				t.Errorf("report = %d %q, want %d and one line with %q", a.status, a.body, tc.code, tc.want)
			}
		})
	}
	if got := f.status(t, st.ID); got.State != station.RolloutRunning || !slices.EqualFunc(got.DeviceSteps, before.DeviceSteps, func(a, b station.RolloutDevice) bool { return a == b }) {
		t.Errorf("after refused reports: %s, devices %+v; want running and unchanged", got.State, got.DeviceSteps)
	}
	devs, _ := f.st.Devices()
	for _, d := range devs {
		if d.Firmware != nil && d.Firmware.LastReport != nil {
			t.Errorf("a refused report was recorded as %s's last: %+v", d.ID, d.Firmware.LastReport)
		}
	}
	big := fmt.Sprintf(`{"name":"iotagent","version":"1.1.0","step":"trial","reason":%q}`, strings.Repeat("x", release.MaxReportSize))
	for _, tc := range []struct {
		name, path, body string
		code             int
		want             string
	}{
		{"report not JSON", "/firmware/report", "{", http.StatusBadRequest, "release: report"},
		{"report unknown field", "/firmware/report", `{"name":"iotagent","version":"1.1.0","step":"trial","extra":1}`, http.StatusBadRequest, "extra"},
		{"report unknown step", "/firmware/report", `{"name":"iotagent","version":"1.1.0","step":"flashing"}`, http.StatusBadRequest, `unknown step "flashing"`},
		{"report too large", "/firmware/report", big, http.StatusRequestEntityTooLarge, "report body over 4096 bytes"},
		{"check not JSON", "/firmware/check", "[]", http.StatusBadRequest, "release: check"},
		{"check too large", "/firmware/check", `{"agent":{"name":"iotagent","version":"` + strings.Repeat("1", release.MaxCheckSize) + `"}}`, http.StatusRequestEntityTooLarge, "check body over 4096 bytes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := post(t, f.clients[first], f.st, tc.path, "application/json", []byte(tc.body))
			if a.status != tc.code || !strings.Contains(string(a.body), tc.want) {
				t.Errorf("POST %s = %d %q, want %d with %q", tc.path, a.status, a.body, tc.code, tc.want)
			}
		})
	}
	// No client certificate; a revoked device.
	body, _ := json.Marshal(release.Check{Agent: release.Running{Name: "iotagent", Version: "1.0.0"}})
	if a := post(t, client(t, f.st, nil), f.st, "/firmware/check", "application/json", body); a.status != http.StatusForbidden || !strings.Contains(string(a.body), "device certificate is required") {
		t.Errorf("check without a certificate = %d %s", a.status, a.body)
	}
	if err := f.st.Revoke(first); err != nil {
		t.Fatal(err)
	}
	f.clients[first].CloseIdleConnections()
	if code, _, body := f.check(t, first, "1.0.0"); code != http.StatusForbidden || !strings.Contains(body, "revoked") {
		t.Errorf("check by a revoked device = %d %s", code, body)
	}
	if a := f.report(t, first, st.ID, "1.1.0", release.StepCommitted, ""); a.status != http.StatusForbidden || !strings.Contains(string(a.body), "revoked") {
		t.Errorf("report by a revoked device = %d %s", a.status, a.body)
	}
	if e := auditEntries(t, f.st, "firmware-report"); len(e) == 0 || e[len(e)-1].Result != "refused" || e[len(e)-1].Device != first {
		t.Errorf("audit log: the revoked device's report %+v", e)
	}
}

// Each wave's devices are nudged through the fleet's broker when it
// opens (devices/ID/cmd, as iotstation-firmware, the ACL's entry); a
// broker that does not answer is audited and the rollout goes on.
func TestRolloutNudges(t *testing.T) {
	f := startFleet(t, 4, "iotagent@1.1.0", "other@1.0.0")
	b := mqtttest.Start(t, f.st, mqtttest.Options{ACL: aclEntry(t, station.NudgeClientName)})
	setNudge(t, f.st, station.NudgeConfig{Broker: b.URL})
	sub := b.Subscribe(t, "devices/+/cmd")
	st, err := f.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", All: true, Waves: []int{25, 100}})
	if err != nil {
		t.Fatal(err)
	}
	waves := f.waves(t, st.ID)
	nudged := func(want []string) {
		t.Helper()
		var got []string
		for range want {
			select {
			case m := <-sub.Messages():
				if string(m.Payload) != `{"op":"firmware-check"}` {
					t.Errorf("nudge %s %q", m.Topic, m.Payload)
				}
				got = append(got, strings.TrimSuffix(strings.TrimPrefix(m.Topic, "devices/"), "/cmd"))
			case <-time.After(10 * time.Second):
				t.Fatalf("nudged %v, want %v", got, want)
			}
		}
		slices.Sort(got)
		if want = slices.Sorted(slices.Values(want)); !slices.Equal(got, want) {
			t.Errorf("nudged %v, want %v", got, want)
		}
	}
	nudged(waves[0])
	f.mustReport(t, waves[0][0], st.ID, "1.1.0", release.StepCommitted)
	nudged(waves[1])
	testsync.Until(t, 10*time.Second, "the nudges audited", func() bool { return len(auditEntries(t, f.st, "rollout-nudge")) == 2 })

	// Nobody listening: audited, and the rollout is not held up.
	setNudge(t, f.st, station.NudgeConfig{Broker: "mqtts://127.0.0.1:1"})
	other, err := f.st.CreateRollout(station.RolloutRequest{Release: "other@1.0.0", All: true})
	if err != nil {
		t.Fatal(err)
	}
	testsync.Until(t, 20*time.Second, "the failed nudge audited", func() bool {
		e := auditEntries(t, f.st, "rollout-nudge")
		return len(e) == 3 && e[2].Result == "refused" && strings.Contains(e[2].Reason, "connecting to 127.0.0.1:1")
	})
	if got := f.status(t, other.ID); got.State != station.RolloutRunning {
		t.Errorf("after a failed nudge: %s", got.State)
	}
}

// aclEntry is the ACL the packaged acl_file gives service name.
func aclEntry(t *testing.T, name string) []string {
	t.Helper()
	b, err := os.ReadFile("../packaging/mosquitto-iotstation.acl")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	in := false
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		switch {
		case line == "user "+name:
			in = true
		case in && strings.HasPrefix(line, "topic "):
		case in:
			return out
		default:
			continue
		}
		out = append(out, line)
	}
	if len(out) == 0 {
		t.Fatalf("packaging/mosquitto-iotstation.acl has no entry for %s", name)
	}
	return out
}

// setNudge sets station.json's firmware_nudge, as an operator does.
func setNudge(t *testing.T, st *stationtest.Station, cfg station.NudgeConfig) {
	t.Helper()
	path := filepath.Join(st.Dir, "station.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var fc map[string]any
	if err := json.Unmarshal(raw, &fc); err != nil {
		t.Fatal(err)
	}
	fc["firmware_nudge"] = cfg
	raw, _ = json.Marshal(fc)
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		t.Fatal(err)
	}
}

// A device that already runs the release is marked current at its
// check: nothing is assigned and it is no failure (with max-failures 0
// a refusal would have halted the rollout), and the rollout finishes. A
// device running a later version is assigned the release (it refuses
// the downgrade: a failure).
func TestRolloutSkipsDevicesAlreadyCurrent(t *testing.T) {
	f := startFleet(t, 2, "iotagent@1.1.0")
	zero := 0
	st, err := f.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", All: true, Waves: []int{50, 100}, MaxFailures: &zero})
	if err != nil {
		t.Fatal(err)
	}
	waves := f.waves(t, st.ID)
	first, second := waves[0][0], waves[1][0]
	if code, a, _ := f.check(t, first, "1.1.0+build.2"); code != http.StatusNoContent || a != nil {
		t.Fatalf("check of a device running 1.1.0 = %d %+v, want 204", code, a)
	}
	got := f.status(t, st.ID)
	if got.State != station.RolloutRunning || got.Progress[0].Steps[release.StepCurrent] != 1 || got.Progress[0].Failed != 0 || got.Wave != 2 {
		t.Fatalf("after the check: %s wave %d, progress %+v; want running, wave 2 open, the device current and no failure", got.State, got.Wave, got.Progress[0])
	}
	if code, a, _ := f.check(t, second, "1.2.0"); code != http.StatusOK || a == nil || a.Version != "1.1.0" {
		t.Fatalf("check of a device running 1.2.0 = %d %+v, want the assignment", code, a)
	}
	f.mustReport(t, second, st.ID, "1.1.0", release.StepCommitted)
	if got := f.status(t, st.ID); got.State != station.RolloutDone {
		t.Errorf("every device current or committed: %s, want done", got.State)
	}
	// A device cannot report "current" itself.
	if a := f.report(t, first, st.ID, "1.1.0", release.StepCurrent, ""); a.status != http.StatusBadRequest {
		t.Errorf("a report of step current = %d %s, want 400", a.status, a.body)
	}
}
