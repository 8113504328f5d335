package main

import (
	"cmp"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"iotagent.dev/iotagent/agent"
	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/firmware/release/releasetest"
	"iotagent.dev/iotagent/internal/buildinfo"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
)

var versionBuilds struct {
	sync.Mutex
	dir  string
	bins map[string]string
}

// versionBinary builds iotagent stamped with version (once per test
// binary and version), for GOARCH goarch ("" for the host's).
func versionBinary(t testing.TB, version, goarch string) string {
	t.Helper()
	versionBuilds.Lock()
	defer versionBuilds.Unlock()
	key := version + "/" + goarch
	if p, ok := versionBuilds.bins[key]; ok {
		return p
	}
	if versionBuilds.dir == "" {
		dir, err := os.MkdirTemp("", "iotagent-versions")
		if err != nil {
			t.Fatal(err)
		}
		versionBuilds.dir, versionBuilds.bins = dir, map[string]string{}
	}
	p := filepath.Join(versionBuilds.dir, "iotagent-"+strings.ReplaceAll(key, "/", "-"))
	cmd := exec.Command("go", "build", "-ldflags", "-X iotagent.dev/iotagent/internal/buildinfo.version="+version, "-o", p, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if goarch != "" {
		cmd.Env = append(cmd.Env, "GOARCH="+goarch, "GOARM=7")
	}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", version, err, out)
	}
	versionBuilds.bins[key] = p
	return p
}

// fwRig is a station with a key list and mosquitto, and the agents
// enrolled there that update themselves; newFWRig's first agent is
// embedded.
type fwRig struct {
	t            testing.TB
	st           *stationtest.Station
	br           *mqtttest.Broker
	root, signer ed25519.PrivateKey
	keyList      string // the signed key list's file
	launcher     string // the installed binary
	*fwAgent
}

// fwAgent is an enrolled agent of a fwRig: its own swtpm, state
// directory and configuration with [firmware].
type fwAgent struct {
	t           testing.TB
	state, sock string
	cfg         string
	args        []string // iotagent run
	global      []string // the global flags
}

// fwAgentOptions shape an agent of a fwRig.
type fwAgentOptions struct {
	// Station is the URL the agent enrolls at and then talks to (default
	// the station's own), such as a proxy in front of it.
	Station string
	// Collectors is the body of [collectors] (default: no host metrics,
	// sampled hourly).
	Collectors string
	// Firmware holds extra lines of [firmware].
	Firmware string
	// Identity is the swtpm's (tpmtest.Options): agents of different
	// identities are different devices.
	Identity int
}

func newFWRig(t testing.TB, launcher string, cfgExtra string) *fwRig {
	t.Helper()
	r := startFWStation(t, launcher)
	r.fwAgent = r.addAgent(fwAgentOptions{Firmware: cfgExtra})
	return r
}

// startFWStation starts the station with a key list, and mosquitto.
func startFWStation(t testing.TB, launcher string) *fwRig {
	t.Helper()
	r := &fwRig{t: t, launcher: launcher}
	r.st = stationtest.Start(t, stationtest.Options{AutoApprove: true})
	r.br = mqtttest.Start(t, r.st, mqtttest.Options{})
	var kl []byte
	r.root, r.signer, kl = installKeyList(t, r.st)
	r.keyList = filepath.Join(t.TempDir(), "keylist.json")
	os.WriteFile(r.keyList, kl, 0o600)
	return r
}

// addAgent enrolls another agent, with its own swtpm, at the station.
func (r *fwRig) addAgent(o fwAgentOptions) *fwAgent {
	t := r.t
	t.Helper()
	a := &fwAgent{t: t}
	var args []string
	a.state, a.sock, args = enrolledRunAt(t, r.st, cmp.Or(o.Station, r.st.URL), r.br.URL, o.Identity)
	root, _ := releasetest.Public(r.root).MarshalText()
	collectors := cmp.Or(o.Collectors, "host = false\ninterval = \"1h\"\n")
	cfg := fmt.Sprintf("[collectors]\n%s[uplink]\nkeepalive = \"5s\"\n[firmware]\nroot_keys = [%q]\npoll_interval = \"1h\"\n%s", collectors, root, o.Firmware)
	a.cfg = filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(a.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	for i, arg := range args {
		if arg == "--config" {
			args[i+1] = a.cfg
		}
	}
	a.args = args
	a.global = []string{"--config", a.cfg, "--state-dir", a.state, "--ingest-socket", a.sock, "--tpm", args[1]}
	return a
}

// writeConfig (re)writes the agent's configuration, with extra lines
// in [firmware]; a running agent reads it at its next start.
func (r *fwRig) writeConfig(extra string) {
	r.t.Helper()
	root, _ := releasetest.Public(r.root).MarshalText()
	cfg := fmt.Sprintf("[collectors]\nhost = false\ninterval = \"1h\"\n[uplink]\nkeepalive = \"5s\"\n[firmware]\nroot_keys = [%q]\npoll_interval = \"1h\"\n%s", root, extra)
	if err := os.WriteFile(r.cfg, []byte(cfg), 0o600); err != nil {
		r.t.Fatal(err)
	}
}

// installKeyList installs at st a key list of a new root key and
// signing key, valid for a day, and returns the keys and the list.
func installKeyList(t testing.TB, st *stationtest.Station) (root, signer ed25519.PrivateKey, kl []byte) {
	t.Helper()
	root, signer = releasetest.Key(t), releasetest.Key(t)
	exp := time.Now().Add(24 * time.Hour)
	kl = releasetest.Sign(t, release.TypeKeyList, &release.KeyList{Version: 1, Expires: exp, RootThreshold: 1, Threshold: 1,
		RootKeys: []release.PublicKey{releasetest.Public(root)}, SigningKeys: []release.SigningKey{{Key: releasetest.Public(signer), Expires: exp}}}, root)
	if err := st.InstallKeyList(kl); err != nil {
		t.Fatal(err)
	}
	return root, signer, kl
}

// release writes payload as release version of the agent, signed, and
// returns the payload and manifest files.
func (r *fwRig) release(version string, svn uint32, payload []byte) (file, manifest string) {
	r.t.Helper()
	return r.releaseFor("linux/"+buildinfo.Get().Arch(), version, svn, payload)
}

// releaseFor is release for the hardware hw (as linux/armv7).
func (r *fwRig) releaseFor(hw, version string, svn uint32, payload []byte) (file, manifest string) {
	r.t.Helper()
	dir := r.t.TempDir()
	file, manifest = filepath.Join(dir, "payload"), filepath.Join(dir, "manifest")
	sum := sha256.Sum256(payload)
	raw := releasetest.Sign(r.t, release.TypeManifest, release.Manifest{Name: "iotagent", Type: release.TypeAgent, Version: version, SVN: svn,
		HW: []string{hw}, Length: int64(len(payload)), SHA256: hex.EncodeToString(sum[:]), Expires: time.Now().Add(time.Hour)}, r.signer)
	os.WriteFile(file, payload, 0o755)
	os.WriteFile(manifest, raw, 0o600)
	return file, manifest
}

func (r *fwRig) binaryRelease(version string, svn uint32) (file, manifest string) {
	b, err := os.ReadFile(versionBinary(r.t, version, ""))
	if err != nil {
		r.t.Fatal(err)
	}
	return r.release(version, svn, b)
}

// fwStatus is iotagent firmware status --json.
func (r *fwAgent) fwStatus() agent.FirmwareStatus {
	r.t.Helper()
	code, out, errs := cli(r.t, append(r.global, "firmware", "status", "--json")...)
	if code != 0 {
		r.t.Fatalf("firmware status: %s", errs)
	}
	var s agent.FirmwareStatus
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		r.t.Fatalf("firmware status --json: %v: %s", err, out)
	}
	return s
}

func (r *fwAgent) waitFW(what string, d time.Duration, ok func(agent.FirmwareStatus) bool) agent.FirmwareStatus {
	r.t.Helper()
	var s agent.FirmwareStatus
	testsync.Until(r.t, d, what, func() bool { s = r.fwStatus(); return ok(s) })
	return s
}

// A good release applied to the running agent: staged, exec'd in the
// same process as a trial, healthy (certificate, station, a record
// delivered), committed, the TPM counter raised. A release that crashes
// at every start is rolled back after the attempt limit and never tried
// again; one that cannot deliver is rolled back at its deadline; a
// downgrade and an svn below the counter are refused. The state file is
// consistent after each.
func TestAgentUpdatesItself(t *testing.T) {
	launcher := versionBinary(t, "1.0.0", "")
	r := newFWRig(t, launcher, "trial_deadline = \"15s\"\n")
	p := startAgent(t, launcher, r.args...)
	pid := p.cmd.Process.Pid
	if s := r.waitFW("firmware status from the running agent", 30*time.Second, func(s agent.FirmwareStatus) bool { return s.DaemonPID == pid && s.Running != "" }); s.Running != "1.0.0" || s.Committed != "1.0.0" {
		t.Fatalf("before any update: %+v", s)
	}

	file, manifest := r.binaryRelease("1.1.0", 1)
	code, out, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest, "--keylist", r.keyList)...)
	if code != 0 {
		t.Fatalf("firmware apply: %s\n%s", errs, p.out)
	}
	if !strings.Contains(out, "1.1.0 staged") || !strings.Contains(out, fmt.Sprint(pid)) {
		t.Errorf("firmware apply said %q", out)
	}
	// The trial needs a record delivered.
	testsync.Until(t, 30*time.Second, "the trial's ingest socket", func() bool {
		s := r.fwStatus()
		return s.Running == "1.1.0" && s.DaemonPID == pid
	})
	send(t, r.sock, 1)
	s := r.waitFW("1.1.0 committed", 60*time.Second, func(s agent.FirmwareStatus) bool {
		return s.Trial == nil && s.Committed == "1.1.0" && s.Counter != nil && *s.Counter == 1
	})
	if s.DaemonPID != pid || s.Last == nil || s.Last.Result != "committed" || s.ActiveSlot == "" {
		t.Fatalf("after the commit: %+v (want pid %d: the same process, exec'd)", s, pid)
	}

	// A downgrade, and an svn below the counter, are refused with the
	// reason, and nothing changes.
	for _, c := range []struct {
		version string
		svn     uint32
		want    string
	}{{"1.0.5", 1, "not above the committed version"}, {"1.4.0", 0, "security version below the TPM counter"}} {
		file, manifest := r.release(c.version, c.svn, []byte("#!/bin/sh\nexit 0\n"))
		code, _, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest)...)
		if code == 0 || !strings.Contains(errs, c.want) {
			t.Errorf("apply %s svn %d: exit %d, %q; want a refusal naming %q", c.version, c.svn, code, errs, c.want)
		}
	}

	// 1.2.0 crashes at every start: systemd would restart it; here the
	// test does, three times.
	file, manifest = r.release("1.2.0", 2, []byte("#!/bin/sh\necho crashing >&2\nexit 3\n"))
	if code, _, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest)...); code != 0 {
		t.Fatalf("firmware apply 1.2.0: %s", errs)
	}
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		t.Fatalf("the crashing trial did not exit:\n%s", p.out)
	}
	for attempt := 2; attempt <= 3; attempt++ {
		out, err := exec.Command(launcher, r.args...).CombinedOutput()
		if err == nil || !strings.Contains(string(out), "crashing") {
			t.Fatalf("start %d of the crashing trial: %v\n%s", attempt, err, out)
		}
	}
	p = startAgent(t, launcher, r.args...) // the fourth start: rolled back
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("the agent's output:\n%s", p.out)
		}
	})
	s = r.waitFW("1.2.0 rolled back", 30*time.Second, func(s agent.FirmwareStatus) bool { return s.DaemonPID == p.cmd.Process.Pid && s.Running != "" })
	if s.Running != "1.1.0" || s.Trial != nil || s.Last == nil || s.Last.Result != "rolled-back" || !strings.Contains(s.Last.Reason, "3 starts") || len(s.Bad) != 1 || s.Bad[0] != "iotagent@1.2.0" {
		t.Fatalf("after three crashing starts: %+v", s)
	}
	if code, _, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest)...); code == 0 || !strings.Contains(errs, "marked bad") {
		t.Errorf("1.2.0 again: exit %d, %q; want refused as marked bad", code, errs)
	}

	// 1.3.0 cannot deliver (the broker is down): rolled back at its
	// deadline, in the same process, back to 1.1.0.
	r.br.Stop()
	file, manifest = r.binaryRelease("1.3.0", 3)
	if code, _, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest)...); code != 0 {
		t.Fatalf("firmware apply 1.3.0: %s", errs)
	}
	s = r.waitFW("1.3.0 rolled back at its deadline", 90*time.Second, func(s agent.FirmwareStatus) bool {
		return s.Last != nil && s.Last.Release == "iotagent@1.3.0" && s.Running == "1.1.0"
	})
	if s.Last.Result != "rolled-back" || !strings.Contains(s.Last.Reason, "no record delivered") || *s.Counter != 1 || s.DaemonPID != p.cmd.Process.Pid {
		t.Errorf("after the deadline: %+v", s)
	}
	t.Logf("last result: %s %s: %s; marked bad: %v", s.Last.Release, s.Last.Result, s.Last.Reason, s.Bad)
	stopAgent(t, p)
}

// A system image applied to the running agent goes to the installer's
// commands: install gets a verified copy of the file, then the reboot runs, and
// images.json holds the trial as installed. An agent restarted without
// the system having rebooted (the same boot id) runs the reboot again
// rather than taking the old image for the trial. (The trial after a
// real reboot, mark-good and mark-bad are tested in package firmware,
// against Debian's RAUC too.)
func TestAgentHandsImageToInstaller(t *testing.T) {
	launcher := versionBinary(t, "1.0.0", "")
	dir := t.TempDir()
	calls := filepath.Join(dir, "calls")
	script := func(name, body string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte("#!/bin/sh\necho \""+name+" $*\" >> "+calls+"\n"+body), 0o755)
		return p
	}
	install := script("install.sh", "sha256sum \"$1\" | cut -d' ' -f1 >> "+calls+"\n")
	good, bad, reboot := script("good.sh", ""), script("bad.sh", ""), script("reboot.sh", "")
	r := newFWRig(t, launcher, fmt.Sprintf("[firmware.image]\ninstall = \"%s {file}\"\nmark_good = %q\nmark_bad = %q\nreboot = %q\n", install, good, bad, reboot))
	p := startAgent(t, launcher, r.args...)
	r.waitFW("firmware status from the running agent", 30*time.Second, func(s agent.FirmwareStatus) bool { return s.DaemonPID == p.cmd.Process.Pid && s.Running != "" })

	payload := []byte("a root file system image\n")
	sum := sha256.Sum256(payload)
	file, manifest := filepath.Join(dir, "rootfs.img"), filepath.Join(dir, "rootfs.manifest")
	os.WriteFile(file, payload, 0o600)
	os.WriteFile(manifest, releasetest.Sign(t, release.TypeManifest, release.Manifest{Name: "rootfs", Type: release.TypeImage, Version: "2.0.0", SVN: 2,
		HW: []string{"linux/" + buildinfo.Get().Arch()}, Length: int64(len(payload)), SHA256: hex.EncodeToString(sum[:]), Expires: time.Now().Add(time.Hour)}, r.signer), 0o600)
	code, out, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest, "--keylist", r.keyList)...)
	if code != 0 || !strings.Contains(out, "rootfs 2.0.0 installed; rebooting") {
		t.Fatalf("firmware apply of an image: exit %d, %q, %q", code, out, errs)
	}
	got, _ := os.ReadFile(calls)
	// The installer gets the agent's own copy, checked as it was made
	// (the caller's file could change after the check), removed after.
	copied := filepath.Join(r.state, "firmware", "download", "rootfs-2.0.0")
	if want := "install.sh " + copied + "\n" + hex.EncodeToString(sum[:]) + "\nreboot.sh \n"; string(got) != want {
		t.Fatalf("installer calls:\n%s\nwant:\n%s", got, want)
	}
	if _, err := os.Stat(copied); !os.IsNotExist(err) {
		t.Errorf("the installed copy was left: %v", err)
	}
	s := r.fwStatus()
	if s.Images == nil || s.Images.Trial == nil || s.Images.Trial.Phase != "installed" || s.Images.Trial.Version != "2.0.0" {
		t.Fatalf("images after the install: %+v", s.Images)
	}
	stopAgent(t, p)
	p = startAgent(t, launcher, r.args...) // no reboot happened
	testsync.Until(t, 30*time.Second, "the reboot run again", func() bool {
		got, _ := os.ReadFile(calls)
		return strings.Count(string(got), "reboot.sh") == 2
	})
	if got, _ := os.ReadFile(calls); strings.Contains(string(got), "good.sh") || strings.Contains(string(got), "bad.sh") {
		t.Errorf("the old image was marked: %s", got)
	}
	stopAgent(t, p)
}

// A launcher upgraded by the package manager past the committed slot
// runs itself, and counts as the committed version: a release between
// the two is a downgrade.
func TestUpgradedLauncherRunsItself(t *testing.T) {
	launcher := filepath.Join(t.TempDir(), "iotagent")
	copyFile := func(src string) {
		t.Helper()
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(launcher+".new", b, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(launcher+".new", launcher); err != nil {
			t.Fatal(err)
		}
	}
	copyFile(versionBinary(t, "1.0.0", ""))
	r := newFWRig(t, launcher, "")
	p := startAgent(t, launcher, r.args...)
	file, manifest := r.binaryRelease("1.1.0", 1)
	if code, _, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest, "--keylist", r.keyList)...); code != 0 {
		t.Fatalf("firmware apply: %s", errs)
	}
	testsync.Until(t, 30*time.Second, "1.1.0 on trial", func() bool { return r.fwStatus().Running == "1.1.0" })
	send(t, r.sock, 1)
	r.waitFW("1.1.0 committed", 60*time.Second, func(s agent.FirmwareStatus) bool { return s.Committed == "1.1.0" && s.Trial == nil })
	stopAgent(t, p)

	copyFile(versionBinary(t, "1.4.0", "")) // the package upgrade
	p = startAgent(t, launcher, r.args...)
	s := r.waitFW("the upgraded launcher running", 30*time.Second, func(s agent.FirmwareStatus) bool { return s.DaemonPID == p.cmd.Process.Pid && s.Running != "" })
	if s.Running != "1.4.0" || s.Committed != "1.4.0" {
		t.Errorf("after the package upgrade: running %s, committed %s; want 1.4.0 both", s.Running, s.Committed)
	}
	file, manifest = r.release("1.2.0", 1, []byte("#!/bin/sh\nexit 0\n"))
	if code, _, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest)...); code == 0 || !strings.Contains(errs, "not above the committed version") {
		t.Errorf("1.2.0 under the 1.4.0 launcher: exit %d, %q; want refused as a downgrade", code, errs)
	}
	stopAgent(t, p)
}

// Root keys built into the binary turn updates on without [firmware].
func TestBuiltInRootKeys(t *testing.T) {
	root, _ := releasetest.Public(releasetest.Key(t)).MarshalText()
	bin := filepath.Join(t.TempDir(), "iotagent")
	cmd := exec.Command("go", "build", "-ldflags", "-X iotagent.dev/iotagent/internal/buildinfo.firmwareRootKeys="+string(root), "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	cfg := filepath.Join(t.TempDir(), "config.toml")
	os.WriteFile(cfg, []byte("[log]\nlevel = \"info\"\n"), 0o600)
	args := []string{"--config", cfg, "--state-dir", filepath.Join(t.TempDir(), "state"), "firmware", "status", "--json"}
	if out, err := exec.Command(bin, args...).CombinedOutput(); err != nil || !strings.Contains(string(out), `"keylist_version": 0`) {
		t.Errorf("firmware status with built-in root keys: %v\n%s", err, out)
	}
	if code, _, errs := cli(t, args...); code == 0 || !strings.Contains(errs, "firmware updates are off") {
		t.Errorf("firmware status without root keys: exit %d, %q", code, errs)
	}
}

// With no agent running, firmware apply and rollback do their work in
// their own process and say so (before, both exited 1 with "restarting
// through the launcher" after succeeding). A trial that cannot be
// exec'd is rolled back and the committed slot runs, not the launcher's
// older binary.
func TestFirmwareCommandsWithoutAgent(t *testing.T) {
	launcher := versionBinary(t, "1.0.0", "")
	r := newFWRig(t, launcher, "")
	file, manifest := r.binaryRelease("1.1.0", 1)
	code, out, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest, "--keylist", r.keyList)...)
	if code != 0 || !strings.Contains(out, "1.1.0 staged") {
		t.Fatalf("firmware apply with no agent running: exit %d, %q, %q", code, out, errs)
	}
	if s := r.fwStatus(); s.Running != "" || s.Trial == nil || s.Trial.Version != "1.1.0" || s.Trial.Attempts != 0 {
		t.Fatalf("after the apply: %+v", s)
	}
	code, out, errs = cli(t, append(r.global, "firmware", "rollback")...)
	if code != 0 || !strings.Contains(out, "1.1.0 rolled back and marked bad") {
		t.Fatalf("firmware rollback with no agent running: exit %d, %q, %q", code, out, errs)
	}
	if s := r.fwStatus(); s.Trial != nil || len(s.Bad) != 1 || s.Bad[0] != "iotagent@1.1.0" {
		t.Fatalf("after the rollback: %+v", s)
	}

	// 1.2.0 committed through a running agent; then 1.3.0, a payload
	// that is no executable at all.
	p := startAgent(t, launcher, r.args...)
	file, manifest = r.binaryRelease("1.2.0", 1)
	if code, _, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest)...); code != 0 {
		t.Fatalf("firmware apply 1.2.0: %s", errs)
	}
	testsync.Until(t, 30*time.Second, "1.2.0 on trial", func() bool { return r.fwStatus().Running == "1.2.0" })
	send(t, r.sock, 1)
	r.waitFW("1.2.0 committed", 60*time.Second, func(s agent.FirmwareStatus) bool { return s.Committed == "1.2.0" && s.Trial == nil })
	file, manifest = r.release("1.3.0", 1, []byte("\x00\x01 not an executable of any kind"))
	if code, _, errs := cli(t, append(r.global, "firmware", "apply", file, "--manifest", manifest)...); code != 0 {
		t.Fatalf("firmware apply 1.3.0: %s", errs)
	}
	s := r.waitFW("1.3.0 rolled back", 30*time.Second, func(s agent.FirmwareStatus) bool {
		return s.Last != nil && s.Last.Release == "iotagent@1.3.0" && s.Running != "" && s.DaemonPID == p.cmd.Process.Pid
	})
	if s.Running != "1.2.0" || s.Last.Result != "rolled-back" || !strings.Contains(s.Last.Reason, "exec") {
		t.Errorf("after a trial that cannot be exec'd: running %s, last %+v; want the committed 1.2.0 running", s.Running, s.Last)
	}
	stopAgent(t, p)
}
