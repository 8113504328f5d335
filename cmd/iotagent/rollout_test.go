package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"iotagent.dev/iotagent/agent"
	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
)

// service runs an agent's launcher as systemd's Restart=on-failure
// would: a run that fails (an exit status other than 0, or a signal) is
// started again after restartDelay. It stops at cleanup with SIGTERM.
type service struct {
	*fwAgent
	bin string
	out *testsync.Buffer // the output of every run

	mu       sync.Mutex
	cmd      *exec.Cmd // the current run; nil between runs
	starts   int
	failures []string // how each failed run ended
	stopping bool
	last     error // how the last run ended, once done is closed
	done     chan struct{}
}

// restartDelay is systemd's RestartSec, shortened.
const restartDelay = 100 * time.Millisecond

func (a *fwAgent) start(bin string) *service {
	s := &service{fwAgent: a, bin: bin, out: &testsync.Buffer{}, done: make(chan struct{})}
	started := make(chan struct{})
	go s.run(started)
	<-started
	a.t.Cleanup(func() {
		if err := s.stop(); err != nil {
			a.t.Errorf("agent %s stopped with %v", a.state, err)
		}
		if a.t.Failed() {
			out := s.out.String()
			starts, failures := s.runs()
			a.t.Logf("agent %s (%d starts, failures %v), the end of its output:\n%s", a.state, starts, failures, out[max(0, len(out)-4000):])
		}
	})
	return s
}

func (s *service) run(started chan<- struct{}) {
	defer close(s.done)
	for {
		s.mu.Lock()
		if s.stopping {
			s.mu.Unlock()
			return
		}
		cmd := exec.Command(s.bin, s.args...)
		cmd.Stdout, cmd.Stderr = s.out, s.out
		if err := cmd.Start(); err != nil {
			s.last = err
			s.mu.Unlock()
			return
		}
		s.cmd = cmd
		s.starts++
		s.mu.Unlock()
		if started != nil {
			close(started)
			started = nil
		}
		err := cmd.Wait()
		s.mu.Lock()
		s.cmd, s.last = nil, err
		if err == nil || s.stopping {
			s.mu.Unlock()
			return
		}
		s.failures = append(s.failures, err.Error())
		s.mu.Unlock()
		time.Sleep(restartDelay)
	}
}

// pid is the running process's, 0 between runs.
func (s *service) pid() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// stop stops the service with SIGTERM and returns how its last run
// ended; SIGKILL after twice the agent's shutdown grace.
func (s *service) stop() error {
	s.mu.Lock()
	s.stopping = true
	if s.cmd != nil {
		s.cmd.Process.Signal(syscall.SIGTERM)
	}
	cmd := s.cmd
	s.mu.Unlock()
	select {
	case <-s.done:
	case <-time.After(2 * agent.ShutdownGrace):
		cmd.Process.Kill()
		<-s.done
		return fmt.Errorf("still running %v after SIGTERM", 2*agent.ShutdownGrace)
	}
	return s.last
}

// runs says how many times the service started a process, and how the
// failed runs ended.
func (s *service) runs() (starts int, failures []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.starts, slices.Clone(s.failures)
}

// up reports whether the agent runs with its uplink connected (and so
// subscribed to the station's commands).
func (s *service) up() bool {
	pid := s.pid()
	if pid == 0 {
		return false
	}
	code, out, _ := cli(s.t, "--state-dir", s.state, "status", "--json", "--ingest-socket", s.sock)
	var st agent.Status
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || !st.Running || st.Uplink != "connected" {
		return false
	}
	fw := s.fwStatus()
	return fw.DaemonPID == pid && fw.Running != ""
}

// nudges counts the station's nudges the agent heard (MQTT
// devices/ID/cmd; SIGUSR2 and iotagent firmware check are not logged so).
func (s *service) nudges() int { return strings.Count(s.out.String(), "the station asks for a check") }

// waitAll polls cond for each of n items every 200 ms until it holds for
// all, for at most d.
func waitAll(t *testing.T, d time.Duration, what string, n int, cond func(i int) bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	ok := make([]bool, n)
	for {
		left := 0
		for i := range n {
			if !ok[i] {
				ok[i] = cond(i)
			}
			if !ok[i] {
				left++
			}
		}
		if left == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s (%d of %d not yet)", d, what, left, n)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// setNudge has the station nudge devices through broker, as
// iotstation init --nudge-broker does (station.json firmware_nudge, read
// at each use).
func (r *fwRig) setNudge() {
	r.t.Helper()
	path := filepath.Join(r.st.Dir, "station.json")
	raw, err := os.ReadFile(path)
	if err != nil {
		r.t.Fatal(err)
	}
	var fc map[string]any
	if err := json.Unmarshal(raw, &fc); err != nil {
		r.t.Fatal(err)
	}
	fc["firmware_nudge"] = station.NudgeConfig{Broker: r.br.URL}
	raw, _ = json.Marshal(fc)
	if err := os.WriteFile(path, raw, 0o644); err != nil {
		r.t.Fatal(err)
	}
}

// publish publishes payload as iotagent@version at the station.
func (r *fwRig) publish(version string, svn uint32, payload []byte) {
	r.t.Helper()
	file, manifest := r.release(version, svn, payload)
	raw, err := os.ReadFile(manifest)
	if err != nil {
		r.t.Fatal(err)
	}
	if _, err := r.st.PublishRelease(file, raw); err != nil {
		r.t.Fatalf("publishing %s: %v", version, err)
	}
}

// rollout is Rollouts(id) of the rig's station.
func (r *fwRig) rollout(id string) station.RolloutStatus {
	r.t.Helper()
	all, err := r.st.Rollouts(id)
	if err != nil || len(all) != 1 {
		r.t.Fatalf("Rollouts(%s) = %d, %v", id, len(all), err)
	}
	return all[0]
}

// audit returns the station's audit entries of event whose reason starts
// with prefix.
func (r *fwRig) audit(event, prefix string) []station.AuditEntry {
	r.t.Helper()
	b, err := os.ReadFile(filepath.Join(r.st.Dir, "audit.log"))
	if err != nil {
		r.t.Fatal(err)
	}
	var out []station.AuditEntry
	for l := range strings.Lines(string(b)) {
		var e station.AuditEntry
		if json.Unmarshal([]byte(l), &e) == nil && e.Event == event && strings.HasPrefix(e.Reason, prefix) {
			out = append(out, e)
		}
	}
	return out
}

// stationBinary builds iotstation once per test binary.
func stationBinary(t testing.TB) string { return stationBuild.get(t, "../iotstation", "iotstation") }

// iotstation runs the station's CLI against the serving test station
// (through its admin socket) and returns its output.
func (r *fwRig) iotstation(args ...string) string {
	r.t.Helper()
	args = append(args, "--dir", r.st.Dir)
	out, err := exec.Command(stationBinary(r.t), args...).CombinedOutput()
	if err != nil {
		r.t.Fatalf("iotstation %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// A fleet of ten agents, each a real launcher process (stamped 1.0.0)
// with its own swtpm, updates itself in a staged rollout: the station
// nudges each wave's devices over MQTT as it opens (the agents poll
// hourly, so the nudge is what makes them check), the waves open in
// order, each once the one before committed, and every agent ends
// committed at 1.1.0. Then a release that crashes at every start is
// rolled out with max failures 5%: its first wave's devices roll back
// after the attempt limit (the test restarts them as systemd would) and
// report it with the reason, the rollout halts by itself with the count,
// and the devices of the later waves are never assigned it.
func TestRolloutOverTenAgents(t *testing.T) {
	const n = 10
	launcher := versionBinary(t, "1.0.0", "")
	good, err := os.ReadFile(versionBinary(t, "1.1.0", ""))
	if err != nil {
		t.Fatal(err)
	}
	stationBinary(t)
	r := startFWStation(t, launcher)
	r.setNudge()
	r.publish("1.1.0", 1, good)
	r.publish("1.2.0", 2, []byte("#!/bin/sh\necho crashing >&2\nexit 3\n"))

	start := time.Now()
	agents := make([]*fwAgent, n)
	for i := range agents {
		agents[i] = r.addAgent(fwAgentOptions{Identity: i, Collectors: "host = true\ninterval = \"1s\"\n", Firmware: "trial_deadline = \"60s\"\n"})
	}
	t.Logf("%d agents enrolled in %v", n, time.Since(start).Round(time.Millisecond))
	start = time.Now()
	svc := make([]*service, n)
	byID := map[string]*service{}
	for i, a := range agents {
		svc[i] = a.start(launcher)
	}
	waitAll(t, 60*time.Second, "the agents running, their uplinks connected", n, func(i int) bool { return svc[i].up() })
	for _, s := range svc {
		st := status(t, s.state, s.sock)
		byID[st.DeviceID] = s
	}
	// Their first check now (it is at a random time in the first 30 s
	// otherwise): the next one is at least 45 minutes away.
	checkAll := func(after time.Time) {
		t.Helper()
		for _, s := range svc {
			if code, _, errs := cli(t, append(s.global, "firmware", "check")...); code != 0 {
				t.Fatalf("firmware check: %s", errs)
			}
		}
		waitAll(t, 30*time.Second, "a check by every agent", n, func(i int) bool {
			fw := svc[i].fwStatus()
			return fw.LastCheck.After(after) && fw.LastCheckError == ""
		})
	}
	checkAll(time.Time{})
	t.Logf("%d agents up and checked in %v", n, time.Since(start).Round(time.Millisecond))

	// The good release, through the CLI people use.
	created := time.Now()
	out := r.iotstation("firmware", "rollout", "create", "--release", "iotagent@1.1.0", "--all", "--waves", "10%,50%,100%", "--wave-wait", "30s", "--max-failures", "5%")
	t.Logf("iotstation firmware rollout create:\n%s", out)
	if !strings.Contains(out, "rollout r1: iotagent@1.1.0 to 10 devices; wave 1 is open") {
		t.Fatalf("rollout create said %q", out)
	}
	testsync.Until(t, 3*time.Minute, "rollout r1 done", func() bool {
		time.Sleep(200 * time.Millisecond)
		return r.rollout("r1").State == station.RolloutDone
	})
	took := time.Since(created)
	t.Logf("iotstation firmware rollout status r1 --devices:\n%s", r.iotstation("firmware", "rollout", "status", "r1", "--devices"))

	ro := r.rollout("r1")
	// When the station received each device's commit, on the clock of
	// the transaction that opened the next wave.
	waveOf, committed := map[string]int{}, map[string]time.Time{}
	for _, d := range ro.DeviceSteps {
		waveOf[d.ID], committed[d.ID] = d.Wave, d.At
		if d.Step != release.StepCommitted {
			t.Errorf("r1: %s in wave %d: %s %s, want committed", d.ID, d.Wave, d.Step, d.Reason)
		}
	}
	if len(waveOf) != n {
		t.Fatalf("r1 holds %d devices, want %d", len(waveOf), n)
	}
	for i, w := range ro.Progress {
		if want := []int{1, 4, 5}[i]; w.Devices != want || w.Steps[release.StepCommitted] != want || w.Failed != 0 {
			t.Errorf("r1 wave %d: %+v, want %d devices committed", w.Wave, w, want)
		}
	}
	// The waves opened in order, each after every device of the one
	// before committed; no device of a wave reported before it opened.
	opened := []time.Time{r.audit("rollout-create", "r1 ")[0].Time}
	for _, e := range r.audit("rollout-wave", "r1 ") {
		if !strings.Contains(e.Reason, fmt.Sprintf("wave %d of 3 opened", len(opened)+1)) {
			t.Errorf("waves out of order: %q", e.Reason)
		}
		opened = append(opened, e.Time)
		t.Logf("audit: %s", e.Reason)
	}
	if len(opened) != 3 {
		t.Fatalf("r1 opened %d waves, want 3", len(opened))
	}
	// Each device's first report, audited once it was recorded.
	first := map[string]time.Time{}
	for _, e := range r.audit("firmware-report", "r1 iotagent@1.1.0: ") {
		if _, ok := first[e.Device]; !ok {
			first[e.Device] = e.Time
		}
	}
	for w := 1; w <= 3; w++ {
		var firstReport, lastCommit time.Time
		for id, dw := range waveOf {
			if dw != w {
				continue
			}
			if first[id].Before(opened[w-1]) {
				t.Errorf("%s of wave %d reported at %v, before its wave opened at %v", id, w, first[id], opened[w-1])
			}
			if w < 3 && committed[id].After(opened[w]) {
				t.Errorf("%s of wave %d committed at %v, after wave %d opened at %v", id, w, committed[id], w+1, opened[w])
			}
			if firstReport.IsZero() || first[id].Before(firstReport) {
				firstReport = first[id]
			}
			if committed[id].After(lastCommit) {
				lastCommit = committed[id]
			}
		}
		t.Logf("r1 wave %d: opened at +%v, first report +%v, last commit +%v", w, opened[w-1].Sub(created).Round(time.Millisecond),
			firstReport.Sub(created).Round(time.Millisecond), lastCommit.Sub(created).Round(time.Millisecond))
	}
	nudged := 0
	for _, e := range r.audit("rollout-nudge", "r1 ") {
		if e.Result != "accepted" {
			t.Errorf("nudge: %+v", e)
		}
		var k int
		if _, err := fmt.Sscanf(e.Reason[strings.LastIndex(e.Reason, ": ")+2:], "%d devices nudged", &k); err != nil {
			t.Errorf("nudge audited as %q", e.Reason)
		}
		nudged += k
	}
	if nudged != n {
		t.Errorf("%d devices nudged, want %d", nudged, n)
	}
	devs, err := r.st.Devices()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if d.Firmware == nil || d.Firmware.Agent.Version != "1.1.0" {
			t.Errorf("Devices(): %s runs %+v, want 1.1.0", d.ID, d.Firmware)
		}
	}
	for id, s := range byID {
		fw := s.waitFW("the updated agent's status", 10*time.Second, func(fw agent.FirmwareStatus) bool { return fw.DaemonPID == s.pid() && fw.Running != "" })
		if fw.Running != "1.1.0" || fw.Committed != "1.1.0" || fw.Trial != nil || fw.Last == nil || fw.Last.Result != "committed" ||
			fw.Last.Rollout != "r1" || fw.Counter == nil || *fw.Counter != 1 {
			t.Errorf("%s after r1: %+v", id, fw)
		}
		if starts, _ := s.runs(); s.nudges() != 1 || starts != 1 {
			t.Errorf("%s heard %d nudges and started %d times, want 1 and 1 (exec'd in the same process)", id, s.nudges(), starts)
		}
	}
	t.Logf("r1: 10 agents at 1.1.0 in %v; iotstation devices:\n%s", took.Round(time.Millisecond), r.iotstation("devices"))

	// Every agent checks once more now, not when its updated process
	// would first (within 30 s of its start).
	checkAll(time.Now())

	// The crashing release, in waves of 20%: its first wave holds two
	// devices.
	created = time.Now()
	bad, err := r.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.2.0", All: true, Waves: []int{20, 50, 100}, WaveWait: 10 * time.Minute, MaxFailures: new(5)})
	if err != nil {
		t.Fatal(err)
	}
	testsync.Until(t, 2*time.Minute, "rollout r2 halted with both devices of wave 1 rolled back", func() bool {
		time.Sleep(200 * time.Millisecond)
		ro := r.rollout(bad.ID)
		return ro.State == station.RolloutHalted && ro.Progress[0].Steps[release.StepRolledBack] == 2
	})
	out = r.iotstation("firmware", "rollout", "status", bad.ID, "--devices")
	t.Logf("iotstation firmware rollout status %s --devices:\n%s", bad.ID, out)
	if !strings.Contains(out, "halted: wave 1: 1 of 2 devices failed (max 5%)") || !strings.Contains(out, "rolled-back=2") {
		t.Errorf("rollout status does not show the halt and the failures")
	}
	ro = r.rollout(bad.ID)
	if ro.HaltReason != "wave 1: 1 of 2 devices failed (max 5%)" || ro.Wave != 1 || ro.Progress[0].Failed != 2 || ro.Progress[1].Open {
		t.Errorf("r2: %+v", ro)
	}
	if e := r.audit("rollout-halted", bad.ID+" "); len(e) != 1 || !strings.Contains(e[0].Reason, "1 of 2 devices failed") {
		t.Errorf("rollout-halted audited as %+v", e)
	}
	halted := time.Now()
	var later []*service
	for _, d := range ro.DeviceSteps {
		s := byID[d.ID]
		fw := s.waitFW("the agent's status", 10*time.Second, func(fw agent.FirmwareStatus) bool { return fw.DaemonPID == s.pid() && fw.Running != "" })
		if d.Wave > 1 {
			if d.Step != "" {
				t.Errorf("%s of wave %d: %s, want never assigned", d.ID, d.Wave, d.Step)
			}
			later = append(later, s)
			continue
		}
		if d.Step != release.StepRolledBack || !strings.Contains(d.Reason, "3 starts") {
			t.Errorf("r2: %s of wave 1: %s %q, want rolled-back after 3 starts", d.ID, d.Step, d.Reason)
		}
		if fw.Running != "1.1.0" || fw.Committed != "1.1.0" || fw.Trial != nil || fw.Last == nil || fw.Last.Result != "rolled-back" ||
			fw.Last.Release != "iotagent@1.2.0" || !slices.Equal(fw.Bad, []string{"iotagent@1.2.0"}) || fw.DaemonPID != s.pid() {
			t.Errorf("%s after r2: %+v", d.ID, fw)
		}
		// The first start is the exec in the running agent's process;
		// three more by the test, the last one rolled back.
		starts, failures := s.runs()
		if starts != 4 || len(failures) != 3 {
			t.Errorf("%s: %d starts, failed runs %v; want 4 and 3", d.ID, starts, failures)
		}
		t.Logf("%s: rolled back: %s (failed runs: %v)", d.ID, d.Reason, failures)
	}
	// The later waves' devices, asked to check now, are not given 1.2.0,
	// and never reported anything of it.
	if len(later) != n-2 {
		t.Fatalf("%d devices in r2's later waves, want %d", len(later), n-2)
	}
	checkAll(halted)
	for _, s := range later {
		fw := s.fwStatus()
		if starts, _ := s.runs(); fw.Running != "1.1.0" || fw.Last == nil || fw.Last.Release != "iotagent@1.1.0" || len(fw.Bad) != 0 || starts != 1 {
			t.Errorf("%s of a later wave after r2 halted: %+v (%d starts)", s.state, fw, starts)
		}
		if s.nudges() != 1 {
			t.Errorf("%s of a later wave heard %d nudges, want r1's only", s.state, s.nudges())
		}
	}
	for _, e := range r.audit("firmware-report", bad.ID+" ") {
		if w := waveIn(ro, e.Device); w != 1 {
			t.Errorf("a report of %s from %s of wave %d: %s", bad.ID, e.Device, w, e.Reason)
		}
	}
	devs, err = r.st.Devices()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range devs {
		if d.Firmware == nil || d.Firmware.Agent.Version != "1.1.0" {
			t.Errorf("Devices() after r2: %s runs %+v, want 1.1.0", d.ID, d.Firmware)
		}
	}
	t.Logf("r2 halted %v after its creation", halted.Sub(created).Round(time.Millisecond))
}

// waveIn is device's wave in the rollout ro (0: not in it).
func waveIn(ro station.RolloutStatus, device string) int {
	for _, d := range ro.DeviceSteps {
		if d.ID == device {
			return d.Wave
		}
	}
	return 0
}

// cutProxy forwards TCP connections to target, counts the bytes it
// passes from the server to the client, and, while cuts are left, cuts
// a connection (both ways) once it passed cutAfter bytes towards the
// client: a link that drops mid-download.
type cutProxy struct {
	l        net.Listener
	target   string
	cutAfter int64
	down     atomic.Int64 // bytes passed towards the client
	cuts     atomic.Int64 // cuts left
	cut      chan int64   // each cut's down total

	mu    sync.Mutex
	conns map[net.Conn]bool
	wg    sync.WaitGroup
}

func startCutProxy(t *testing.T, target string, cutAfter int64) *cutProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{l: l, target: target, cutAfter: cutAfter, cut: make(chan int64, 16), conns: map[net.Conn]bool{}}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			p.wg.Add(1)
			go func() { defer p.wg.Done(); p.serve(c) }()
		}
	}()
	t.Cleanup(p.close)
	return p
}

func (p *cutProxy) URL() string { return "https://" + p.l.Addr().String() }

func (p *cutProxy) track(c net.Conn, on bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.conns == nil {
		c.Close()
		return false
	}
	if on {
		p.conns[c] = true
	} else {
		delete(p.conns, c)
	}
	return true
}

func (p *cutProxy) serve(c net.Conn) {
	defer c.Close()
	if !p.track(c, true) {
		return
	}
	defer p.track(c, false)
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer s.Close()
	if !p.track(s, true) {
		return
	}
	defer p.track(s, false)
	p.wg.Add(1)
	go func() { defer p.wg.Done(); io.Copy(s, c); s.(*net.TCPConn).CloseWrite() }()
	buf := make([]byte, 32<<10)
	passed := int64(0)
	for {
		n, err := s.Read(buf)
		if n > 0 {
			if passed+int64(n) > p.cutAfter && p.takeCut() {
				k := p.cutAfter - passed
				c.Write(buf[:k])
				p.cut <- p.down.Add(k)
				return // both closed
			}
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
			passed += int64(n)
			p.down.Add(int64(n))
		}
		if err != nil {
			c.(*net.TCPConn).CloseWrite()
			return
		}
	}
}

// takeCut takes one of the cuts left, if any.
func (p *cutProxy) takeCut() bool {
	for {
		n := p.cuts.Load()
		if n <= 0 {
			return false
		}
		if p.cuts.CompareAndSwap(n, n-1) {
			return true
		}
	}
}

func (p *cutProxy) close() {
	p.l.Close()
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.conns = nil
	p.mu.Unlock()
	p.wg.Wait()
}

// A release downloaded over a link that drops three times mid-payload
// (a proxy between the agent and the station cuts the TCP connection)
// resumes each time with a Range request where it stopped, then
// commits: the bytes the proxy passed towards the agent are the
// payload's and a small overhead per connection, not a restart from
// zero.
func TestDownloadResumesAcrossCuts(t *testing.T) {
	launcher := versionBinary(t, "1.0.0", "")
	good, err := os.ReadFile(versionBinary(t, "1.1.0", ""))
	if err != nil {
		t.Fatal(err)
	}
	length := int64(len(good))
	r := startFWStation(t, launcher)
	r.setNudge()
	r.publish("1.1.0", 1, good)
	cutAfter := length / 4
	px := startCutProxy(t, r.st.Addr, cutAfter)
	a := r.addAgent(fwAgentOptions{Station: px.URL(), Collectors: "host = true\ninterval = \"1s\"\n"})
	s := a.start(launcher)
	testsync.Until(t, 60*time.Second, "the agent up", func() bool { time.Sleep(100 * time.Millisecond); return s.up() })
	check := func() {
		t.Helper()
		if code, _, errs := cli(t, append(a.global, "firmware", "check")...); code != 0 {
			t.Fatalf("firmware check: %s", errs)
		}
	}
	check()
	a.waitFW("the first check", 30*time.Second, func(fw agent.FirmwareStatus) bool { return !fw.LastCheck.IsZero() })

	part := filepath.Join(a.state, "firmware", "download", "iotagent-1.1.0.part.json")
	// The resume points, as the agent logs each failed fetch: "at byte N
	// of LENGTH", where it saved the part file.
	resumes := func() []int64 {
		var out []int64
		for l := range strings.Lines(s.out.String()) {
			var n, total int64
			if _, rest, ok := strings.Cut(l, "/payload at byte "); ok {
				if _, err := fmt.Sscanf(rest, "%d of %d", &n, &total); err == nil && total == length {
					out = append(out, n)
				}
			}
		}
		return out
	}
	// Each connection costs a TLS handshake with both chains and HTTP
	// headers (a few KB), and each TLS record of up to 16 KB 22 bytes; a
	// cut loses the record it splits.
	const perConn = 32 << 10
	records := func(n int64) int64 { return n/700 + 1 }

	before := px.down.Load()
	px.cuts.Store(3)
	ro, err := r.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", All: true, Waves: []int{100}})
	if err != nil {
		t.Fatal(err)
	}
	var offsets []int64
	for i := range 3 {
		var down int64
		select {
		case down = <-px.cut:
		case <-time.After(60 * time.Second):
			t.Fatalf("cut %d: the download did not reach it\n%s", i+1, s.out)
		}
		// The downloader keeps what it received (PATH.part.json) and the
		// check fails. It tries again by itself after a backoff (up to
		// 30 s); asked to check, it does at once.
		testsync.Until(t, 30*time.Second, fmt.Sprintf("the fetch cut %d failed", i+1), func() bool { return len(resumes()) > i })
		o := resumes()[i]
		// Everything that reached the agent was kept: the resume point
		// is the bytes passed, less the connections' overhead.
		if passed := down - before; o > passed || o < passed-int64(i+2)*perConn-records(passed) || i > 0 && o <= offsets[i-1] {
			t.Errorf("cut %d at %d bytes passed: the resume point is byte %d", i+1, passed, o)
		}
		offsets = append(offsets, o)
		check()
	}
	fw := a.waitFW("1.1.0 committed", 90*time.Second, func(fw agent.FirmwareStatus) bool {
		return fw.Committed == "1.1.0" && fw.Trial == nil && fw.DaemonPID == s.pid() && fw.Running == "1.1.0"
	})
	served := px.down.Load() - before
	if fw.Last == nil || fw.Last.Result != "committed" || fw.Last.Rollout != ro.ID || fw.Counter == nil || *fw.Counter != 1 {
		t.Errorf("after the download: %+v", fw)
	}
	if got := r.rollout(ro.ID); got.State != station.RolloutDone {
		t.Errorf("rollout %s: %s", ro.ID, got.State)
	}
	if _, err := os.Stat(part); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the resume point outlived the download: %v", err)
	}
	// The payload's four connections, and those of the checks, manifest,
	// key list and reports around them.
	const conns = 4 + 8
	limit := length + records(length) + conns*perConn
	t.Logf("payload %d bytes; connections cut after %d bytes; resume points %v; %d bytes passed towards the agent from the rollout to the commit: %d over the payload (limit %d; a restart from zero at each cut would add %d)",
		length, cutAfter, offsets, served, served-length, limit-length, offsets[0]+offsets[1]+offsets[2])
	if served > limit || served < length {
		t.Errorf("%d bytes served for a payload of %d: want no more than %d", served, length, limit)
	}
}
