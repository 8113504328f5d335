package telemetry

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry/senml"
)

// startIngest runs an ingest server on a fresh store; it stops at cleanup
// and the test fails if Run does not return.
func startIngest(t *testing.T, opts store.Options) (*Ingest, *store.Store) {
	t.Helper()
	ing, q, _ := startIngestWith(t, opts, IngestConfig{})
	return ing, q
}

// startIngestWith is startIngest with cfg, whose store and clock it sets,
// and its socket unless cfg has one. It also returns a function that stops
// the ingest before cleanup.
func startIngestWith(t *testing.T, opts store.Options, cfg IngestConfig) (*Ingest, *store.Store, func()) {
	t.Helper()
	if opts.Path == "" {
		opts.Path = filepath.Join(t.TempDir(), "q.db")
	}
	q, err := store.Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Socket == "" {
		sockDir, err := os.MkdirTemp("", "ing") // short: a socket path has at most 107 bytes
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(sockDir) })
		cfg.Socket = filepath.Join(sockDir, "sock")
	}
	cfg.Store, cfg.Now = q, func() time.Time { return time.Unix(1_800_000_000, 0) }
	ing, err := NewIngest(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ing.Run(ctx) }()
	select {
	case <-ing.Ready():
	case err := <-done:
		t.Fatalf("Run: %v", err)
	}
	stop := sync.OnceFunc(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run = %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("ingest did not stop")
		}
	})
	t.Cleanup(func() {
		stop()
		q.Close()
	})
	return ing, q, stop
}

type client struct {
	c net.Conn
	r *bufio.Reader
}

func dial(t *testing.T, ing *Ingest) *client {
	t.Helper()
	c, err := net.Dial("unix", ing.Socket())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(20 * time.Second))
	return &client{c: c, r: bufio.NewReader(c)}
}

func (c *client) send(t *testing.T, line string) string {
	t.Helper()
	if _, err := fmt.Fprintf(c.c, "%s\n", line); err != nil {
		t.Fatal(err)
	}
	ans, err := c.r.ReadString('\n')
	if err != nil {
		t.Fatalf("reading answer to %.40q: %v", line, err)
	}
	return strings.TrimSpace(ans)
}

func TestIngestProtocol(t *testing.T) {
	ing, q := startIngest(t, store.Options{})
	c := dial(t, ing)
	for _, tc := range []struct {
		name, line, want string
	}{
		{"one record", `[{"n":"temp","u":"Cel","v":21.5}]`, "ok 1"},
		{"base name and relative time", `[{"bn":"room/","bt":-10,"n":"hum","u":"%RH","v":40},{"n":"door","vb":true}]`, "ok 3"},
		{"unknown unit passes through", `[{"n":"x","u":"furlongs/fortnight","v":1}]`, "ok 4"},
		{"malformed JSON", `[{"n":"temp","v":21.5`, "error senml:"},
		{"not SenML", `{"temperature": 21.5}`, "error senml: pack is an object"},
		{"wrong type", `[{"n":"temp","v":"hot"}]`, `error senml: record 0: "v" is a string, want a number`},
		{"no name", `[{"v":1}]`, "error senml: record 0"},
		{"must-understand label", `[{"n":"x","v":1,"frob_":2}]`, `error senml: record 0: label "frob_" must be understood`},
		{"after errors the connection still works", `[{"n":"y","v":2}]`, "ok 5"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := c.send(t, tc.line); !strings.HasPrefix(got, tc.want) {
				t.Errorf("answer to %s = %q, want prefix %q", tc.line, got, tc.want)
			}
		})
	}
	if d := q.Stats().Depth; d != 5 {
		t.Errorf("queue depth = %d, want 5 (nothing stored for bad lines)", d)
	}
	recs, _ := q.Peek(0, 10, 1<<20)
	p, bad := DecodeQueued(recs)
	if len(bad) != 0 || len(p) != 5 {
		t.Fatalf("DecodeQueued = %d records, %d bad", len(p), len(bad))
	}
	if p[1].Name != "room/hum" || *p[1].Time != 1_800_000_000-10 || p[1].Seq != 2 {
		t.Errorf("resolved record = %+v, want room/hum at now-10 with seq 2", p[1])
	}
	if p[3].Unit != "furlongs/fortnight" {
		t.Errorf("unit = %q, want it passed through", p[3].Unit)
	}
}

func TestIngestOversizeLine(t *testing.T) {
	ing, q := startIngest(t, store.Options{})
	c := dial(t, ing)
	big := `[{"n":"x","vs":"` + strings.Repeat("a", MaxLine) + `"}]`
	if got := c.send(t, big); got != fmt.Sprintf("error line over %d bytes", MaxLine) {
		t.Errorf("answer to an oversize line = %q", got)
	}
	if got := c.send(t, `[{"n":"x","v":1}]`); got != "ok 1" {
		t.Errorf("line after the oversize one = %q, want ok 1", got)
	}
	if q.Stats().Depth != 1 {
		t.Errorf("queue depth = %d, want 1", q.Stats().Depth)
	}
}

func TestIngestQueueFull(t *testing.T) {
	ing, q := startIngest(t, store.Options{MaxBytes: 4096, OnFull: store.Reject})
	c := dial(t, ing)
	line := `[{"n":"filler","vs":"` + strings.Repeat("z", 300) + `"}]`
	var got string
	for i := 0; i < 100; i++ {
		if got = c.send(t, line); got != fmt.Sprintf("ok %d", i+1) {
			break
		}
	}
	if got != "error queue full" {
		t.Fatalf("answer when the reject-policy queue is full = %q, want error queue full", got)
	}
	before := q.Stats()
	if c.send(t, line) != "error queue full" || q.Stats().Depth != before.Depth {
		t.Error("a refused line changed the queue")
	}
}

// A full disk is refused with a clear answer, nothing stored, and the
// agent keeps serving.
func TestIngestDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Fatal("this test mounts a small tmpfs and needs root (scripts/test.sh runs as root)")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	ing, q := startIngest(t, store.Options{Path: filepath.Join(dir, "q.db"), MaxBytes: 64 << 20})
	c := dial(t, ing)
	line := `[{"n":"filler","vs":"` + strings.Repeat("z", 2000) + `"}]`
	var got string
	for i := 0; i < 2000; i++ {
		if got = c.send(t, line); !strings.HasPrefix(got, "ok ") {
			break
		}
	}
	if got != "error disk full: nothing stored" {
		t.Fatalf("answer on a full disk = %q", got)
	}
	depth := q.Stats().Depth
	recs, _ := q.Peek(0, 100, 1<<20)
	var seqs []uint64
	for _, r := range recs {
		seqs = append(seqs, r.Seq)
	}
	if err := q.Ack(seqs...); err != nil {
		t.Fatalf("Ack on a full disk: %v", err)
	}
	if got := c.send(t, `[{"n":"small","v":1}]`); !strings.HasPrefix(got, "ok ") {
		t.Errorf("after freeing space = %q, want ok", got)
	}
	if q.Stats().Depth != depth-int64(len(seqs))+1 {
		t.Errorf("depth = %d, want %d", q.Stats().Depth, depth-int64(len(seqs))+1)
	}
}

func TestHostSource(t *testing.T) {
	root := t.TempDir()
	write := func(p, s string) {
		os.MkdirAll(filepath.Dir(filepath.Join(root, p)), 0o755)
		os.WriteFile(filepath.Join(root, p), []byte(s), 0o644)
	}
	write("proc/loadavg", "0.50 0.40 0.30 1/123 4567\n")
	write("proc/meminfo", "MemTotal:        1000 kB\nMemFree:          100 kB\nMemAvailable:     500 kB\n")
	write("proc/uptime", "12345.67 999.0\n")
	write("sys/class/thermal/thermal_zone0/temp", "47500\n")
	p, err := HostSource(root, t.TempDir())(time.Now())
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, r := range p {
		if r.Value != nil {
			got[r.Name+" "+r.Unit] = *r.Value
		}
	}
	for k, want := range map[string]float64{
		"host.load1 ": 0.5, "host.load15 ": 0.3, "host.mem.total B": 1000 * 1024, "host.mem.available B": 500 * 1024,
		"host.uptime s": 12345.67, "host.temp.thermal_zone0 Cel": 47.5,
	} {
		if got[k] != want {
			t.Errorf("%s = %v, want %v", k, got[k], want)
		}
	}
	if got["host.disk.total B"] <= 0 {
		t.Error("no disk size")
	}
	if err := (senml.Pack(p)).Validate(); err != nil {
		t.Errorf("host records are not valid SenML: %v", err)
	}
}

// AgentSource reports handshakes by result and failure reason, and the
// uplink's state by name.
func TestAgentSource(t *testing.T) {
	var tls TLSStats
	tls.Succeeded(false, 40*time.Millisecond)
	tls.Succeeded(true, 3*time.Millisecond)
	tls.Failed("unknown_ca")
	tls.Failed("peer_bad_certificate")
	tls.Failed("unknown_ca")
	now := time.Now()
	p, err := AgentSource(AgentStats{TLS: &tls, Uplink: func() UplinkState {
		return UplinkState{State: "backoff", Since: now.Add(-90 * time.Second)}
	}, Rejected: func() uint64 { return 7 }})(now)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Validate(); err != nil {
		t.Errorf("agent records are not valid SenML: %v", err)
	}
	nums, strs := map[string]float64{}, map[string]string{}
	for _, r := range p {
		switch {
		case r.Value != nil:
			nums[r.Name] = *r.Value
		case r.StringValue != nil:
			strs[r.Name] = *r.StringValue
		}
	}
	for name, want := range map[string]float64{
		"agent.tls.handshakes.ok": 2, "agent.tls.handshakes.resumed": 1, "agent.tls.handshakes.failed": 3,
		"agent.tls.handshakes.failed.unknown_ca": 2, "agent.tls.handshakes.failed.peer_bad_certificate": 1,
		"agent.tls.handshake.latency": 0.003, "agent.uplink.state.since": 90,
		"agent.uplink.rejected": 7,
	} {
		if got, ok := nums[name]; !ok || got != want {
			t.Errorf("%s = %v (present %v), want %v", name, got, ok, want)
		}
	}
	if strs["agent.uplink.state"] != "backoff" {
		t.Errorf("agent.uplink.state = %q, want backoff", strs["agent.uplink.state"])
	}
}

// With GroupDelay, lines a producer streams a millisecond apart are
// committed together, each still answered in order; a line split across
// the wait is kept whole.
func TestIngestGroupDelay(t *testing.T) {
	q, err := store.Open(store.Options{Path: filepath.Join(t.TempDir(), "q.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	sockDir, _ := os.MkdirTemp("", "ing")
	defer os.RemoveAll(sockDir)
	ing, _ := NewIngest(IngestConfig{Socket: filepath.Join(sockDir, "s"), Store: q, GroupDelay: 20 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ing.Run(ctx) }()
	<-ing.Ready()
	defer func() { cancel(); <-done }()

	c := dial(t, ing)
	commits := q.Stats().Commits
	const n = 100
	go func() {
		for i := 0; i < n; i++ {
			line := fmt.Sprintf(`[{"n":"g","v":%d}]`+"\n", i)
			if i%10 == 0 {
				// Half a line, a pause longer than the group delay, the rest.
				c.c.Write([]byte(line[:5]))
				time.Sleep(30 * time.Millisecond)
				c.c.Write([]byte(line[5:]))
				continue
			}
			c.c.Write([]byte(line))
			time.Sleep(time.Millisecond)
		}
	}()
	for i := 1; i <= n; i++ {
		ans, err := c.r.ReadString('\n')
		if err != nil || strings.TrimSpace(ans) != fmt.Sprintf("ok %d", i) {
			t.Fatalf("answer %d = %q, %v", i, ans, err)
		}
	}
	if got := q.Stats().Commits - commits; got >= n/2 {
		t.Errorf("%d commits for %d streamed lines, want far fewer with a group delay", got, n)
	}
}

// A producer that stays connected, silent or streaming, does not hold up
// the ingest's stop: its read ends at once, whatever deadline the
// connection was waiting on (the idle timeout, a group delay).
func TestIngestStopsWithConnectedProducer(t *testing.T) {
	for round := range 10 {
		q, err := store.Open(store.Options{Path: filepath.Join(t.TempDir(), "q.db")})
		if err != nil {
			t.Fatal(err)
		}
		sockDir, _ := os.MkdirTemp("", "ing")
		ing, _ := NewIngest(IngestConfig{Socket: filepath.Join(sockDir, "s"), Store: q, GroupDelay: 20 * time.Millisecond})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- ing.Run(ctx) }()
		<-ing.Ready()
		c := dial(t, ing)
		if ans := c.send(t, `[{"n":"x","v":1}]`); !strings.HasPrefix(ans, "ok ") {
			t.Fatalf("answer %q", ans)
		}
		if round%2 == 1 {
			// Mid-group: a line, then the cancel while the ingest waits for
			// more within its group delay.
			fmt.Fprintf(c.c, "[{\"n\":\"x\",\"v\":2}]\n")
			time.Sleep(5 * time.Millisecond)
		}
		start := time.Now()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(3 * time.Second):
			t.Fatalf("round %d: Run still serving 3 s after its context ended, with a producer connected", round)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("round %d: stop took %v", round, d)
		}
		q.Close()
		os.RemoveAll(sockDir)
	}
}
