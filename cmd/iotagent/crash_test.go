package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"

	"iotagent.dev/iotagent/agent"
	"iotagent.dev/iotagent/firmware"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/tpm"
)

// The power-cut model of TestFirmwareCrashInjection. A kill -9 loses
// nothing the agent wrote (the page cache survives the process). A
// power cut loses what was not fsync'ed; given the agent's discipline
// (atomicfile: temp, fsync, rename, fsync the directory; a slot binary
// copied to .new, fsync'ed, renamed, the directory fsync'ed, before
// state.json names it; a .part's data fsync'ed before the .part.json
// that vouches for it) the files can be left as:
//
//   - state.json: its last complete version, or the one before when
//     the last rename may not have reached the disk. The test keeps every
//     version it saw in order and takes the one before unless a witness
//     proves the last durable: a firmware log line printed after it (the
//     updater logs only after a write returned, fsync of the directory
//     included), or the TPM counter already at its svn (raised only
//     after the commit was durable).
//   - an atomicfile temp (.NAME.tmp-*): never synced: emptied.
//   - slots/X/iotagent.new: a copy not yet synced: cut to half.
//   - slots/X/iotagent renamed in place while no state.json names it:
//     the rename may be lost: back to iotagent.new (its data was synced).
//   - download/F.part: only what the .part.json's offset vouches for is
//     synced; the tail past it is replaced by 64 KiB of zeros (a size
//     update without its data, as a file system may show); with no
//     .part.json, all of it.
//   - download/F (the complete download, renamed from F.part after the
//     .part.json was removed) while state.json has no trial: back to
//     F.part, without a resume point.
//
// Each is the worst state the cut could have left; the test cannot see
// when the kernel finished an fsync, so it may take a write as lost a
// little after it was durable (more loss than real, never less).

// crashPoint is where a run of the update is cut.
type crashPoint struct {
	name string
	// at says when to kill, polled every millisecond from the update's
	// start; after is a delay added once it held.
	at    func(c *crashRun) bool
	after time.Duration
	// powerCut: the files are then cut to what they had at their last
	// fsync (see the model above).
	powerCut bool
}

// obs is what the test saw, in order: a version of state.json ("" while
// absent) or a firmware log line of the agent.
type obs struct {
	state bool
	text  string
}

// crashRun is one run of the update, from the launcher 1.0.0 to 1.1.0
// committed or rolled back, cut once.
type crashRun struct {
	t       *testing.T
	r       *fwRig
	p       *agentProcess
	fw      string
	length  int64 // of the payload
	counter uint32
	start   time.Time // the update asked for
	seen    []obs
	stated  bool // seen holds a state.json version
	lines   int  // of p.out already looked at
	sent    bool
}

func (c *crashRun) statePath() string { return filepath.Join(c.fw, "state.json") }

// observe records a new state.json version and the new firmware lines.
func (c *crashRun) observe() {
	b, _ := os.ReadFile(c.statePath())
	if !c.stated || c.lastState() != string(b) {
		c.seen, c.stated = append(c.seen, obs{state: true, text: string(b)}), true
	}
	all := strings.Split(c.p.out.String(), "\n")
	for _, l := range all[c.lines : len(all)-1] {
		if strings.Contains(l, "firmware:") {
			c.seen = append(c.seen, obs{text: l})
		}
	}
	c.lines = len(all) - 1
}

func (c *crashRun) lastState() string {
	for i := len(c.seen) - 1; i >= 0; i-- {
		if c.seen[i].state {
			return c.seen[i].text
		}
	}
	return ""
}

// logged: the agent printed a firmware line containing s.
func (c *crashRun) logged(s string) bool {
	return slices.ContainsFunc(c.seen, func(o obs) bool { return !o.state && strings.Contains(o.text, s) })
}

func (c *crashRun) state() firmware.SlotState {
	var st firmware.SlotState
	if b := c.lastState(); b != "" {
		json.Unmarshal([]byte(b), &st)
	}
	return st
}

func (c *crashRun) fileSize(name string) int64 {
	fi, err := os.Stat(filepath.Join(c.fw, "download", name))
	if err != nil {
		return -1
	}
	return fi.Size()
}

func (c *crashRun) exists(rel string) bool {
	_, err := os.Stat(filepath.Join(c.fw, rel))
	return err == nil
}

const crashDownload = "iotagent-1.1.0"

// crashPoints: every step of download, install, trial and commit, each
// killed, then again with a power cut; and time offsets from the start.
func crashPoints() []crashPoint {
	line := func(s string) func(*crashRun) bool { return func(c *crashRun) bool { return c.logged(s) } }
	steps := []crashPoint{
		{name: "downloading", at: line("firmware: downloading")},
		{name: "part file started", at: func(c *crashRun) bool { return c.fileSize(crashDownload+".part") > 0 }},
		{name: "first resume point", at: func(c *crashRun) bool { return c.exists("download/" + crashDownload + ".part.json") }},
		{name: "part file at 2/3", at: func(c *crashRun) bool { return c.fileSize(crashDownload+".part") >= 2*c.length/3 }},
		{name: "download complete", at: func(c *crashRun) bool { return c.fileSize(crashDownload) == c.length }},
		{name: "slot copy started", at: func(c *crashRun) bool { return c.exists("slots/a/iotagent.new") }},
		{name: "slot binary in place", at: func(c *crashRun) bool { return c.exists("slots/a/iotagent") }},
		{name: "trial in state.json", at: func(c *crashRun) bool { return c.state().Trial != nil }},
		{name: "staged", at: line("firmware: staged")},
		{name: "attempt counted", at: func(c *crashRun) bool { t := c.state().Trial; return t != nil && t.Attempts > 0 }},
		{name: "slot binary exec'd", at: line("starting the slot binary")},
		{name: "on trial", at: line("firmware: on trial")},
		{name: "record sent", at: func(c *crashRun) bool { return c.sent }},
		{name: "commit in state.json", at: func(c *crashRun) bool { return c.state().Active != "" }},
		{name: "committed", at: line("firmware: committed")},
		{name: "result reported", at: func(c *crashRun) bool { l := c.state().Last; return l != nil && l.Reported }},
	}
	var pts []crashPoint
	for _, cut := range []bool{false, true} {
		for _, s := range steps {
			s.powerCut = cut
			pts = append(pts, s)
		}
	}
	for _, o := range []struct {
		after    time.Duration
		powerCut bool
	}{{20 * time.Millisecond, false}, {150 * time.Millisecond, true}, {600 * time.Millisecond, false}, {1200 * time.Millisecond, true}} {
		pts = append(pts, crashPoint{name: o.after.String() + " after the check", at: func(*crashRun) bool { return true }, after: o.after, powerCut: o.powerCut})
	}
	return pts
}

// A release assigned by the station's rollout, run through check,
// resumable download, Stage, the relaunch into the trial, health and
// commit, is cut at each of its steps by a kill -9 of the agent, and
// again by a simulated power cut (the files as they were at their last
// fsync, see the model above), and at time offsets. After each cut
// state.json parses and names only slots whose binary runs and prints
// its version, the TPM counter is not above the committed svn; the
// agent is then started again, as systemd would, until it ends
// committed at 1.1.0 with the counter raised, or back on 1.0.0 with
// 1.1.0 marked bad — never anything else, and no temporary file left.
// A kill gives a trial three starts; the power-cut runs give it one, so
// that a cut trial rolls back and the sweep covers the rollback too.
func TestFirmwareCrashInjection(t *testing.T) {
	began := time.Now()
	versionBinary(t, "1.0.0", "")
	versionBinary(t, "1.1.0", "")
	t.Logf("built in %v", time.Since(began))
	var mu sync.Mutex
	classes := map[string][]string{}
	outcomes := map[string]int{}
	pts := crashPoints()
	// Two devices, each its own station, broker and TPM, take half of
	// the cuts each, at once (go test runs GOMAXPROCS parallel tests; the
	// runs mostly wait).
	const shards = 2
	t.Run("sweep", func(t *testing.T) {
		for shard := range shards {
			t.Run(strconv.Itoa(shard), func(t *testing.T) {
				t.Parallel()
				r := crashRig(t)
				for i := shard; i < len(pts); i += shards {
					class, outcome := crashRunAt(t, r, i, pts[i])
					mu.Lock()
					classes[class] = append(classes[class], fmt.Sprint(i))
					outcomes[outcome]++
					mu.Unlock()
				}
			})
		}
	})
	t.Logf("swept in %v", time.Since(began))
	var names []string
	for k := range classes {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		t.Logf("left by %d cuts (%s): %s", len(classes[k]), strings.Join(classes[k], " "), k)
	}
	t.Logf("%d cuts, %d distinct states left; outcomes: %v", len(pts), len(classes), outcomes)
	if len(classes) < 15 {
		t.Errorf("the cuts left %d distinct states, want at least 15 (a step too fast to be cut?)", len(classes))
	}
	if outcomes["committed 1.1.0"] == 0 || outcomes["rolled back to 1.0.0"] == 0 {
		t.Errorf("outcomes %v: want both a commit and a rollback", outcomes)
	}
}

// crashRig is a device for crash runs: 1.1.0 published at its station.
func crashRig(t *testing.T) *fwRig {
	t.Helper()
	r := newFWRig(t, versionBinary(t, "1.0.0", ""), "")
	file, manifest := r.binaryRelease("1.1.0", 1)
	raw, err := os.ReadFile(manifest)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.st.PublishRelease(file, raw); err != nil {
		t.Fatal(err)
	}
	return r
}

// crashRunAt runs the update on r's device, cut at pt (the i-th point),
// and returns the state the cut left and how the update ended.
func crashRunAt(t *testing.T, r *fwRig, i int, pt crashPoint) (class, outcome string) {
	launcher := r.launcher
	fi, err := os.Stat(versionBinary(t, "1.1.0", ""))
	if err != nil {
		t.Fatal(err)
	}
	mode := "kill"
	if pt.powerCut {
		mode = "power cut"
	}
	name := fmt.Sprintf("%02d %s at %s", i, mode, pt.name)
	fw := filepath.Join(r.state, "firmware")
	// Each run: a fresh update state and counter index, the key list
	// kept, the same enrolled identity and TPM.
	for _, p := range []string{"state.json", "slots", "download", "request.json", "answer.json"} {
		os.RemoveAll(filepath.Join(fw, p))
	}
	c := &crashRun{t: t, r: r, fw: fw, length: fi.Size(), counter: 0x01500200 + 2*uint32(i)}
	attempts := 3
	if pt.powerCut {
		attempts = 1
	}
	r.writeConfig(fmt.Sprintf("counter_index = \"%#x\"\nmax_attempts = %d\n", c.counter, attempts))
	c.p = startAgent(t, launcher, r.args...)
	r.waitFW("the agent's firmware status", 30*time.Second, func(s agent.FirmwareStatus) bool { return s.DaemonPID == c.p.cmd.Process.Pid && s.Running != "" })
	maxFail := 100
	if _, err := r.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", All: true, Waves: []int{100}, MaxFailures: &maxFail}); err != nil {
		t.Fatalf("%s: rollout: %v", name, err)
	}
	c.start = time.Now()
	c.nudge()
	c.cut(pt)
	class = c.after(pt)
	outcome = c.finish()
	t.Logf("%s: left %s; ended %s", name, class, outcome)
	return class, outcome
}

// nudge asks the running agent to check with the station
// (iotagent firmware check, tried again: swtpm takes one connection at
// a time and may refuse the command's while the agent's is open).
func (c *crashRun) nudge() {
	c.t.Helper()
	var errs string
	for range 20 {
		var code int
		if code, _, errs = cli(c.t, append(c.r.global, "firmware", "check")...); code == 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	c.t.Fatalf("firmware check: %s", errs)
}

// cut drives the update until pt holds (sending the trial its record),
// then kills the agent with SIGKILL.
func (c *crashRun) cut(pt crashPoint) {
	c.t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	var held time.Time
	sending := make(chan error, 1)
	for {
		c.observe()
		if !c.sent && c.logged("firmware: on trial") {
			c.sent = true
			go func() { sending <- sendRecord(c.p.socket) }()
		}
		if held.IsZero() && pt.at(c) {
			held = time.Now()
		}
		if !held.IsZero() && time.Since(held) >= pt.after {
			break
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("%s never held within 60s:\n%s", pt.name, c.p.out)
		}
		time.Sleep(time.Millisecond)
	}
	c.p.cmd.Process.Signal(syscall.SIGKILL)
	<-c.p.exited
	c.observe()
	flushTransients(c.t, c.r.global[len(c.r.global)-1])
	if c.sent {
		<-sending // a send cut by the kill is no error here
	}
}

// after simulates the power cut if pt asks for one, checks the
// invariants and returns the state the cut left, in words.
func (c *crashRun) after(pt crashPoint) string {
	c.t.Helper()
	counter := c.tpmCounter()
	var did []string
	if pt.powerCut {
		did = c.powerCut(counter)
	}
	st := c.check(counter, false)
	class := describe(c.fw, c.length, st)
	if len(did) > 0 {
		class += " (power cut: " + strings.Join(did, ", ") + ")"
	}
	return class
}

// powerCut applies the model above to the firmware directory.
func (c *crashRun) powerCut(counter uint64) []string {
	c.t.Helper()
	var did []string
	atKill := c.state()
	// state.json: the version before, unless the last is witnessed.
	var versions []int
	witnessed := false
	for i, o := range c.seen {
		if o.state {
			versions = append(versions, i)
			witnessed = false
		} else if len(versions) > 0 {
			witnessed = true
		}
	}
	if n := len(versions); n >= 2 && !witnessed {
		prev := c.seen[versions[n-2]].text
		var pst firmware.SlotState
		json.Unmarshal([]byte(prev), &pst)
		if uint64(pst.ActiveSVN) >= counter {
			if prev == "" {
				os.Remove(c.statePath())
			} else if err := os.WriteFile(c.statePath(), []byte(prev), 0o600); err != nil {
				c.t.Fatal(err)
			}
			did = append(did, "state.json back one version")
		}
	}
	filepath.Walk(c.fw, func(p string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() {
			return nil
		}
		switch base := filepath.Base(p); {
		case strings.Contains(base, ".tmp-"):
			os.Truncate(p, 0)
			did = append(did, base+" emptied")
		case base == "iotagent.new":
			os.Truncate(p, fi.Size()/2)
			did = append(did, "slot copy cut to half")
		}
		return nil
	})
	for _, slot := range []string{"a", "b"} {
		bin := filepath.Join(c.fw, "slots", slot, "iotagent")
		fi, err := os.Stat(bin)
		named := atKill.Active == slot || atKill.Trial != nil && atKill.Trial.Slot == slot
		if err == nil && !named && !fi.ModTime().Before(c.start) && !c.exists("slots/"+slot+"/iotagent.new") {
			os.Rename(bin, bin+".new")
			did = append(did, "slot rename lost")
		}
	}
	dl := filepath.Join(c.fw, "download")
	part := filepath.Join(dl, crashDownload+".part")
	if fi, err := os.Stat(part); err == nil {
		var rs struct {
			Offset int64 `json:"offset"`
		}
		if b, err := os.ReadFile(part + ".json"); err == nil {
			json.Unmarshal(b, &rs)
		}
		if fi.Size() > rs.Offset {
			os.Truncate(part, rs.Offset)
			f, _ := os.OpenFile(part, os.O_WRONLY|os.O_APPEND, 0)
			f.Write(make([]byte, 64<<10))
			f.Close()
			did = append(did, fmt.Sprintf("part tail past %d zeroed", rs.Offset))
		}
	}
	if full := filepath.Join(dl, crashDownload); c.exists("download/"+crashDownload) && c.state().Trial == nil && atKill.Trial == nil {
		os.Rename(full, part)
		did = append(did, "download rename lost")
	}
	return did
}

// check asserts the invariants on the firmware directory and returns
// state.json; final also wants the counter at the committed svn and no
// temporary file.
func (c *crashRun) check(counter uint64, final bool) firmware.SlotState {
	c.t.Helper()
	slots, err := firmware.OpenSlots(c.fw)
	if err != nil {
		c.t.Fatal(err)
	}
	st, err := slots.State()
	if err != nil {
		c.t.Fatalf("state.json after the cut: %v", err)
	}
	runs := func(slot, version string) {
		out, err := exec.Command(filepath.Join(c.fw, "slots", slot, "iotagent"), "version").Output()
		if err != nil || !strings.HasPrefix(string(out), "iotagent "+version+"\n") {
			c.t.Errorf("state.json %+v names slot %s: version = %q, %v; want %s", st, slot, out, err, version)
		}
	}
	if st.Active != "" {
		runs(st.Active, st.ActiveVersion)
	}
	if st.Trial != nil {
		if st.Trial.Slot == st.Active {
			c.t.Errorf("the trial is in the committed slot: %+v", st)
		}
		runs(st.Trial.Slot, st.Trial.Version)
	}
	if counter > uint64(st.ActiveSVN) {
		c.t.Errorf("the TPM counter is %d, above the committed svn %d (%+v)", counter, st.ActiveSVN, st)
	}
	if !final {
		return st
	}
	if counter != uint64(st.ActiveSVN) {
		c.t.Errorf("the TPM counter is %d at the end, want the committed svn %d", counter, st.ActiveSVN)
	}
	filepath.Walk(c.fw, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() && (strings.Contains(p, ".tmp-") || strings.HasSuffix(p, ".new") || strings.Contains(p, "/download/")) {
			c.t.Errorf("left behind: %s (%d bytes)", p, fi.Size())
		}
		return nil
	})
	return st
}

// tpmCounter reads the run's counter from the TPM (no agent may hold
// it): 0 before it was raised.
func (c *crashRun) tpmCounter() uint64 {
	c.t.Helper()
	tp := openTPM(c.t, c.r.global[len(c.r.global)-1])
	defer tp.Close()
	n, err := tp.Counter(c.counter)
	if errors.Is(err, tpm.ErrCounterAbsent) || errors.Is(err, tpm.ErrCounterUnwritten) {
		return 0
	}
	if err != nil {
		c.t.Fatal(err)
	}
	return n
}

// openTPM opens the TPM at spec, trying again while swtpm is still busy
// with a connection that was just closed.
func openTPM(t *testing.T, spec string) *tpm.TPM {
	t.Helper()
	for i := 0; ; i++ {
		tp, err := tpm.Open(spec)
		if err == nil {
			return tp
		}
		if i == 50 {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// flushTransients flushes the transient objects a killed agent left
// loaded in its TPM, as the kernel's resource manager (/dev/tpmrm0)
// does when a process dies; swtpm has none.
func flushTransients(t *testing.T, spec string) {
	t.Helper()
	tp := openTPM(t, spec)
	hs, err := tp.TransientHandles()
	tp.Close()
	if err != nil || len(hs) == 0 {
		return
	}
	conn, err := net.Dial("unix", strings.TrimPrefix(spec, "unix:"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	tr := transport.FromReadWriter(conn)
	for _, h := range hs {
		if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(tr); err != nil {
			t.Errorf("flushing %#x: %v", h, err)
		}
	}
}

// describe is a state in words: state.json and what the download and
// the slots hold.
func describe(fw string, length int64, st firmware.SlotState) string {
	var parts []string
	switch {
	case st.Trial != nil:
		parts = append(parts, fmt.Sprintf("trial %s after %d starts", st.Trial.Version, st.Trial.Attempts))
	case st.Active != "":
		parts = append(parts, "committed "+st.ActiveVersion)
	case len(st.Bad) > 0:
		parts = append(parts, "rolled back")
	default:
		parts = append(parts, "no update")
	}
	if st.Last != nil && !st.Last.Reported {
		parts[0] += ", unreported"
	}
	part := filepath.Join(fw, "download", crashDownload+".part")
	if fi, err := os.Stat(part); err == nil {
		what := "a part file"
		if b, err := os.ReadFile(part + ".json"); err == nil {
			var rs struct {
				Offset int64 `json:"offset"`
			}
			json.Unmarshal(b, &rs)
			what += fmt.Sprintf(" with a resume point (%d%%)", rs.Offset*100/length)
		} else if fi.Size() == 0 {
			what = "an empty part file"
		}
		parts = append(parts, what)
	}
	if _, err := os.Stat(filepath.Join(fw, "download", crashDownload)); err == nil {
		parts = append(parts, "the complete download")
	}
	for _, s := range []string{"a", "b"} {
		if _, err := os.Stat(filepath.Join(fw, "slots", s, "iotagent.new")); err == nil {
			parts = append(parts, "a slot copy")
		}
		if _, err := os.Stat(filepath.Join(fw, "slots", s, "iotagent")); err == nil && st.Active != s && (st.Trial == nil || st.Trial.Slot != s) {
			parts = append(parts, "an unnamed slot binary")
		}
	}
	return strings.Join(parts, ", ")
}

// finish starts the agent again, as systemd would, nudging it to check
// and feeding a trial its record, until the update ended; it checks the
// end state and returns it in words.
func (c *crashRun) finish() string {
	c.t.Helper()
	r := c.r
	var result string
	for start := 0; result == ""; start++ {
		if start == 4 {
			c.t.Fatalf("the update did not end after %d starts:\n%s", start, c.p.out)
		}
		c.p = startAgent(c.t, r.launcher, r.args...)
		pid := c.p.cmd.Process.Pid
		deadline := time.Now().Add(60 * time.Second)
		for time.Now().Before(deadline) {
			s := r.fwStatus()
			if s.DaemonPID != pid {
				select {
				case <-c.p.exited:
				default:
					time.Sleep(20 * time.Millisecond)
					continue
				}
				break // it exited: started again
			}
			if s.Trial != nil && s.Running == s.Trial.Version {
				sendRecord(c.p.socket)
			} else if s.Trial == nil && s.Last != nil && s.Last.Release == "iotagent@1.1.0" && s.Last.Reported {
				switch {
				case s.Last.Result == "committed" && s.Running == "1.1.0" && s.Counter != nil && *s.Counter == 1:
					result = "committed 1.1.0"
				case s.Last.Result == "rolled-back" && s.Running == "1.0.0" && slices.Contains(s.Bad, "iotagent@1.1.0"):
					result = "rolled back to 1.0.0"
				}
				if result != "" {
					break
				}
			} else if s.Trial == nil {
				c.nudge()
			}
			time.Sleep(200 * time.Millisecond)
		}
		if result == "" {
			select {
			case <-c.p.exited:
				continue
			default:
				c.t.Fatalf("the update did not end within 60s of a start: %+v\n%s", r.fwStatus(), c.p.out)
			}
		}
	}
	c.p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-c.p.exited:
	case <-time.After(2 * agent.ShutdownGrace):
		c.t.Fatalf("the agent did not stop at SIGTERM:\n%s", c.p.out)
	}
	st := c.check(c.tpmCounter(), true)
	if want := result == "committed 1.1.0"; (st.Active != "") != want {
		c.t.Errorf("%s, but state.json is %+v", result, st)
	}
	return result
}

// sendRecord ingests one record; an agent not listening is no error
// here (the caller tries again).
func sendRecord(sock string) error {
	conn, err := net.DialTimeout("unix", sock, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := fmt.Fprintf(conn, `[{"n":"crash-test","v":1}]`+"\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "ok ") {
		return fmt.Errorf("ingest answered %q", line)
	}
	return nil
}
