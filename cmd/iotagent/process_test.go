package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"iotagent.dev/iotagent/agent"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/telemetry/senml"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// builtBinary is a command built once per test binary.
type builtBinary struct {
	sync.Once
	path string
	err  error
}

// get builds the command in dir (relative to this package) once.
func (b *builtBinary) get(t testing.TB, dir, name string) string {
	t.Helper()
	b.Do(func() {
		tmp, err := os.MkdirTemp("", name+"-bin")
		if err != nil {
			b.err = err
			return
		}
		b.path = filepath.Join(tmp, name)
		if out, err := exec.Command("go", "build", "-o", b.path, dir).CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build %s: %v\n%s", name, err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

var agentBuild, stationBuild builtBinary

// agentBinary builds iotagent once per test binary.
func agentBinary(t testing.TB) string { return agentBuild.get(t, ".", "iotagent") }

// agentProcess is iotagent run in its own process.
type agentProcess struct {
	t      testing.TB
	cmd    *exec.Cmd
	out    *testsync.Buffer
	socket string
	exited chan struct{} // closed when the process has exited
	err    error         // its exit status, once exited is closed
}

func startAgent(t testing.TB, bin string, args ...string) *agentProcess {
	t.Helper()
	p := &agentProcess{t: t, out: &testsync.Buffer{}, exited: make(chan struct{})}
	for i, a := range args {
		if a == "--ingest-socket" {
			p.socket = args[i+1]
		}
	}
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() { p.cmd.Process.Kill(); <-p.exited })
	deadline := time.Now().Add(30 * time.Second)
	for {
		if c, err := net.Dial("unix", p.socket); err == nil {
			c.Close()
			return p
		}
		select {
		case <-p.exited:
			t.Fatalf("iotagent exited at start: %v\n%s", p.err, p.out)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("iotagent did not open its ingest socket:\n%s", p.out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stream sends lines to the ingest socket until stop is closed, recording
// the sequence number of every acknowledged line. It stops quietly when
// the agent dies.
func stream(socket string, stop <-chan struct{}, acked *[]uint64, mu *sync.Mutex) {
	c, err := net.Dial("unix", socket)
	if err != nil {
		return
	}
	defer c.Close()
	r := bufio.NewReader(c)
	for i := 0; ; i++ {
		select {
		case <-stop:
			return
		default:
		}
		if _, err := fmt.Fprintf(c, `[{"n":"kill-test","v":%d}]`+"\n", i); err != nil {
			return
		}
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		var seq uint64
		if _, err := fmt.Sscanf(line, "ok %d", &seq); err == nil {
			mu.Lock()
			*acked = append(*acked, seq)
			mu.Unlock()
		}
	}
}

// streamFor streams records into p (see stream) in the background for d
// and returns; finish stops the stream and returns every sequence number
// acknowledged so far, this stream's and earlier ones'.
func streamFor(p *agentProcess, d time.Duration, acked *[]uint64, mu *sync.Mutex) (finish func() []uint64) {
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); stream(p.socket, stop, acked, mu) }()
	time.Sleep(d)
	return func() []uint64 {
		close(stop)
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		return append([]uint64(nil), *acked...)
	}
}

// The agent is killed with SIGKILL while records stream in; restarted, it
// delivers every record it had acknowledged (duplicates allowed, counted).
// Then SIGTERM stops it within 5 seconds with its queue intact.
func TestAgentKilledMidStreamLosesNothing(t *testing.T) {
	bin := agentBinary(t)
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	br := mqtttest.Start(t, st, mqtttest.Options{})
	state, sock, args := enrolledRun(t, st, br.URL)
	sub := br.Subscribe(t, "devices/#")

	var mu sync.Mutex
	var acked []uint64
	for round := range 3 {
		p := startAgent(t, bin, args...)
		finish := streamFor(p, 700*time.Millisecond, &acked, &mu)
		if round < 2 {
			p.cmd.Process.Signal(syscall.SIGKILL)
			<-p.exited
			finish()
			continue
		}
		// Last round: stop streaming, let it drain, then SIGTERM.
		want := finish()
		got := sub.WaitSeqs(t, want, 60*time.Second)
		start := time.Now()
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
			if p.err != nil {
				t.Errorf("iotagent exited with %v after SIGTERM:\n%s", p.err, p.out)
			}
		case <-time.After(agent.ShutdownGrace + time.Second):
			t.Fatalf("iotagent did not stop within %v of SIGTERM", agent.ShutdownGrace)
		}
		dups := 0
		for _, s := range want {
			dups += got[s] - 1
		}
		t.Logf("%d records acknowledged by ingest across 2 SIGKILLs, all delivered, %d duplicates; SIGTERM exit in %v",
			len(want), dups, time.Since(start).Round(time.Millisecond))
		if len(want) < 100 {
			t.Errorf("only %d records streamed; the test proves little", len(want))
		}
	}
	// The queue file is intact and empty after the clean stop.
	code, out, errs := cli(t, "--state-dir", state, "status", "--json", "--ingest-socket", sock)
	var s agent.Status
	if code != 0 || json.Unmarshal([]byte(out), &s) != nil {
		t.Fatalf("status = %d %s %s", code, out, errs)
	}
	if s.Running || s.QueueDepth != 0 || s.Uplink != "not running" {
		t.Errorf("status after stop = %+v, want not running with an empty queue", s)
	}
}

// SIGTERM while the uplink cannot deliver: the agent stops cleanly within
// agent.ShutdownGrace and every record ingest acknowledged is still in the
// queue, delivered once the link is back. Two faults between agent and
// broker: the broker unreachable (the connection cut, new ones refused:
// the uplink reconnects with backoff) and a silent partition (the
// connection stays up, publishes are in flight and never acknowledged).
func TestSIGTERMKeepsUndeliveredQueue(t *testing.T) {
	bin := agentBinary(t)
	for _, tc := range []struct {
		name  string
		fault func(*mqtttest.Proxy)
	}{
		{"unreachable", func(p *mqtttest.Proxy) { p.Refuse(true); p.Cut() }},
		{"partitioned", (*mqtttest.Proxy).Blackhole},
	} {
		t.Run(tc.name, func(t *testing.T) {
			st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
			br := mqtttest.Start(t, st, mqtttest.Options{})
			px := mqtttest.NewProxy(t, br.Addr)
			state, sock, args := enrolledRun(t, st, px.URL)
			sub := br.Subscribe(t, "devices/#")

			p := startAgent(t, bin, args...)
			// The collectors' first records are delivered before the fault,
			// so the queue then holds exactly what this test ingests.
			waitStatus(t, state, sock, "uplink connected, queue empty", func(s agent.Status) bool {
				return s.Running && s.Uplink == "connected" && s.QueueDepth == 0
			})
			tc.fault(px)
			const n = 300
			seqs := send(t, sock, n)

			took := stopAgent(t, p)
			if s := status(t, state, sock); s.Running || s.QueueDepth != n {
				t.Errorf("status after SIGTERM = running %v, queue_depth %d; want not running, %d", s.Running, s.QueueDepth, n)
			}
			// The fault held: none of these records reached the broker
			// before the stop, so what arrives next came from the queue.
			for drained := false; !drained; {
				select {
				case m := <-sub.Messages():
					for _, q := range telemetrySeqs(t, m) {
						if slices.Contains(seqs, q) {
							t.Fatalf("record %d reached the broker through the fault; the test proves nothing", q)
						}
					}
				default:
					drained = true
				}
			}

			px.Heal()
			p = startAgent(t, bin, args...)
			got := sub.WaitSeqs(t, seqs, 60*time.Second)
			dups := 0
			for _, q := range seqs {
				dups += got[q] - 1
			}
			waitStatus(t, state, sock, "queue drained after the restart", func(s agent.Status) bool { return s.Running && s.QueueDepth == 0 })
			stopAgent(t, p)
			t.Logf("%d records queued behind the fault; SIGTERM exit in %v; all delivered after the restart, %d duplicates",
				n, took.Round(time.Millisecond), dups)
		})
	}
}

// enrolledRun enrolls an agent with its own swtpm at the station and
// returns its state dir, ingest socket and the arguments of iotagent run
// with the given uplink (no host collector, the SLI collector hourly).
func enrolledRun(t testing.TB, st *stationtest.Station, uplink string) (state, sock string, args []string) {
	t.Helper()
	return enrolledRunAt(t, st, st.URL, uplink, 0)
}

// enrolledRunAt is enrolledRun with the agent enrolling at, and so
// talking to, stationURL (st's own, or a proxy in front of it), with a
// swtpm of the given identity (tpmtest.Options): agents of different
// identities are different devices.
func enrolledRunAt(t testing.TB, st *stationtest.Station, stationURL, uplink string, identity int) (state, sock string, args []string) {
	t.Helper()
	sim := tpmtest.Start(t, tpmtest.Options{Identity: identity})
	state = filepath.Join(t.TempDir(), "state")
	if code, _, errs := cli(t, "--tpm", sim.Spec, "--state-dir", state, "enroll", "--station", stationURL, "--station-fingerprint", st.Fingerprint); code != 0 {
		t.Fatalf("enroll: %s", errs)
	}
	sockDir, err := os.MkdirTemp("", "agent") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock = filepath.Join(sockDir, "ingest.sock")
	cfg := filepath.Join(t.TempDir(), "config.toml")
	if err := os.WriteFile(cfg, []byte("[collectors]\nhost = false\ninterval = \"1h\"\n[uplink]\nkeepalive = \"5s\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return state, sock, []string{"--tpm", sim.Spec, "--state-dir", state, "run", "--config", cfg, "--uplink", uplink, "--ingest-socket", sock}
}

// stopAgent sends SIGTERM and requires a successful exit within
// agent.ShutdownGrace; it returns how long the agent took.
func stopAgent(t *testing.T, p *agentProcess) time.Duration {
	t.Helper()
	start := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.exited:
	case <-time.After(2 * agent.ShutdownGrace):
		t.Fatalf("iotagent still running %v after SIGTERM:\n%s", 2*agent.ShutdownGrace, p.out)
	}
	took := time.Since(start)
	if p.err != nil || took > agent.ShutdownGrace {
		t.Errorf("after SIGTERM iotagent exited with %v in %v, want success within %v:\n%s", p.err, took.Round(time.Millisecond), agent.ShutdownGrace, p.out)
	}
	return took
}

// send ingests n one-record packs through iotagent send - and returns the
// sequence numbers the agent committed them under.
func send(t *testing.T, sock string, n int) []uint64 {
	t.Helper()
	var in strings.Builder
	for i := range n {
		fmt.Fprintf(&in, `[{"n":"shutdown-test","v":%d}]`+"\n", i)
	}
	var out, errb bytes.Buffer
	if code := runWith(t.Context(), &env{stdin: strings.NewReader(in.String()), stdout: &out, stderr: &errb, now: time.Now},
		[]string{"send", "--ingest-socket", sock, "-"}); code != 0 {
		t.Fatalf("send = %d: %s", code, errb.String())
	}
	var seqs []uint64
	for line := range strings.Lines(out.String()) {
		var q uint64
		if _, err := fmt.Sscanf(line, "ok %d", &q); err != nil {
			t.Fatalf("send answered %q, want ok SEQ", line)
		}
		seqs = append(seqs, q)
	}
	if len(seqs) != n {
		t.Fatalf("send answered %d lines, want %d", len(seqs), n)
	}
	return seqs
}

// status runs iotagent status --json for the agent on sock.
func status(t testing.TB, state, sock string) agent.Status {
	t.Helper()
	code, out, errs := cli(t, "--state-dir", state, "status", "--json", "--ingest-socket", sock)
	var s agent.Status
	if code != 0 {
		t.Fatalf("status = %d: %s", code, errs)
	}
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	return s
}

// waitStatus polls status until ok holds, for at most 30 s (the running
// agent rewrites its status file every 2 s).
func waitStatus(t *testing.T, state, sock, what string, ok func(agent.Status) bool) agent.Status {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		s := status(t, state, sock)
		if ok(s) {
			return s
		}
		if time.Now().After(deadline) {
			t.Fatalf("status after 30 s = %+v, want %s", s, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// telemetrySeqs returns the sequence numbers in a telemetry message.
func telemetrySeqs(t *testing.T, m mqtttest.Message) []uint64 {
	t.Helper()
	if !strings.HasSuffix(m.Topic, "/telemetry") {
		return nil
	}
	p, err := senml.ParseJSON(m.Payload)
	if err != nil {
		t.Fatalf("telemetry payload on %s is not SenML: %v", m.Topic, err)
	}
	var seqs []uint64
	for _, r := range p {
		seqs = append(seqs, r.Seq)
	}
	return seqs
}

// iotagent send - pipelines stdin; answers stay in order and a bad line
// is reported with its number.
func TestSendStdin(t *testing.T) {
	sockDir, _ := os.MkdirTemp("", "send")
	defer os.RemoveAll(sockDir)
	sock := filepath.Join(sockDir, "ingest.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
		for i := 1; ; i++ {
			line, err := r.ReadString('\n')
			if err != nil {
				return
			}
			if strings.Contains(line, "bad") {
				fmt.Fprintf(c, "error senml: not good\n")
				continue
			}
			fmt.Fprintf(c, "ok %d\n", i)
		}
	}()
	var in strings.Builder
	for i := 0; i < 500; i++ {
		fmt.Fprintf(&in, "[{\"n\":\"x\",\"v\":%d}]\n", i)
	}
	in.WriteString("bad\n")
	var out, errb bytes.Buffer
	code := runWith(t.Context(), &env{stdin: strings.NewReader(in.String()), stdout: &out, stderr: &errb, now: time.Now}, []string{"send", "--ingest-socket", sock, "-"})
	if code != 1 || !strings.Contains(errb.String(), "line 501: senml: not good") {
		t.Errorf("send = %d, %q; want 1 and the bad line's number", code, errb.String())
	}
	if lines := strings.Split(strings.TrimSpace(out.String()), "\n"); len(lines) != 500 || lines[499] != "ok 500" {
		t.Errorf("answers = %d, last %q; want 500 in order", len(lines), lines[len(lines)-1])
	}
}
