package coap_test

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"iotagent.dev/iotagent/dtls"
	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/enroll/enrolltest"
	"iotagent.dev/iotagent/internal/dnstest"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/internal/udpproxy"
	"iotagent.dev/iotagent/station/collector"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/telemetry/coap"
	"iotagent.dev/iotagent/telemetry/senml"
)

// received counts, per sequence number, the records the collector's sink
// took.
type received struct {
	mu  sync.Mutex
	seq map[uint64]int
}

func (r *received) count(want []uint64) (missing, dups int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, s := range want {
		switch n := r.seq[s]; {
		case n == 0:
			missing++
		case n > 1:
			dups += n - 1
		}
	}
	return missing, dups
}

// startCollector runs the station's collector on loopback with a sink
// that counts, until the end of the test.
func startCollector(t testing.TB, st *stationtest.Station, tweak ...func(*collector.Config)) (*collector.Collector, *received) {
	t.Helper()
	c, rec, _ := runCollector(t, st, tweak...)
	return c, rec
}

// runCollector is startCollector that also returns a function stopping
// the collector before the end of the test.
func runCollector(t testing.TB, st *stationtest.Station, tweak ...func(*collector.Config)) (*collector.Collector, *received, func()) {
	t.Helper()
	rec := &received{seq: map[uint64]int{}}
	cfg := collector.Config{Addr: "127.0.0.1:0", Certificate: st.ServiceCert(t, "collector", []string{"127.0.0.1"}, true),
		ClientCAs: st.TrustPool(), Revoked: st.CertificateRevoked,
		Sink: collector.SinkFunc(func(_ context.Context, _ string, p senml.Pack) error {
			rec.mu.Lock()
			defer rec.mu.Unlock()
			for _, r := range p {
				rec.seq[r.Seq]++
			}
			return nil
		})}
	for _, f := range tweak {
		f(&cfg)
	}
	c, err := collector.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	select {
	case <-c.Ready():
	case err := <-done:
		t.Fatalf("collector: %v", err)
	}
	stop := sync.OnceFunc(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("collector Run: %v", err)
		}
	})
	t.Cleanup(stop)
	return c, rec, stop
}

// agent is an uplink and pipeline over a queue, running until stop.
type agent struct {
	up     *coap.Uplink
	stats  *telemetry.TLSStats
	pipe   *telemetry.Pipeline
	q      *store.Store
	cancel context.CancelFunc
	wg     sync.WaitGroup
}

func startAgent(t testing.TB, d *enrolltest.Device, q *store.Store, sealer *dtls.Sealer, addr net.Addr, tweak ...func(*coap.Config)) *agent {
	t.Helper()
	stats := &telemetry.TLSStats{}
	cfg := coap.Config{URL: "coaps://" + addr.String(), RootCAs: d.RootCAs, Identity: d.Identity(),
		Sessions: q, Sealer: sealer, BackoffBase: 100 * time.Millisecond, BackoffCap: time.Second, AckTimeout: 500 * time.Millisecond,
		Stats: stats}
	for _, f := range tweak {
		f(&cfg)
	}
	up, err := coap.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	pipe, err := telemetry.NewPipeline(telemetry.PipelineConfig{Store: q, Uplink: up})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &agent{up: up, stats: stats, pipe: pipe, q: q, cancel: cancel}
	for _, run := range []func(context.Context) error{up.Run, pipe.Run} {
		a.wg.Add(1)
		go func() {
			defer a.wg.Done()
			if err := run(ctx); err != nil {
				t.Errorf("agent: %v", err)
			}
		}()
	}
	t.Cleanup(a.stop)
	return a
}

func (a *agent) stop() {
	a.cancel()
	a.wg.Wait()
}

func openQueue(t testing.TB) *store.Store {
	t.Helper()
	q, err := store.Open(store.Options{Path: filepath.Join(t.TempDir(), "q.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

func newSealer(t testing.TB) *dtls.Sealer {
	key := make([]byte, 32)
	rand.Read(key)
	s, err := dtls.NewSealer(key, rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// queue appends n records and returns their sequence numbers.
func queue(t testing.TB, q *store.Store, n int, name string) []uint64 {
	t.Helper()
	var seqs []uint64
	for i := 0; i < n; i += 500 {
		var batch [][]byte
		for j := i; j < min(n, i+500); j++ {
			v := float64(j)
			b, _ := senml.Pack{{Name: name, Value: &v, Time: ptr(1.8e9 + float64(j))}}.EncodeCBOR()
			batch = append(batch, b)
		}
		first, last, err := q.Append(context.Background(), batch...)
		if err != nil {
			t.Fatal(err)
		}
		for s := first; s <= last; s++ {
			seqs = append(seqs, s)
		}
	}
	return seqs
}

func waitDrained(t testing.TB, q *store.Store, d time.Duration) {
	t.Helper()
	deadline := time.Now().Add(d)
	for q.Stats().Depth > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d records still queued after %v", q.Stats().Depth, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// 10 000 records from a TPM-keyed agent to the collector: every sequence
// number arrives, once after de-duplication.
func TestTenThousandRecordsToCollector(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	c, rec := startCollector(t, st)
	q := openQueue(t)
	seqs := queue(t, q, 10000, "coap")
	start := time.Now()
	startAgent(t, d, q, newSealer(t), c.Addr())
	waitDrained(t, q, 60*time.Second)
	if missing, dups := rec.count(seqs); missing != 0 || dups != 0 {
		t.Errorf("sink: %d records missing, %d duplicates past de-duplication", missing, dups)
	}
	t.Logf("10000 records in %v", time.Since(start).Round(time.Millisecond))
}

// The agent's UDP source port changes mid-stream: delivery goes on with no
// new handshake (the collector follows the Connection ID).
func TestNATRebindingKeepsTheSession(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	c, rec := startCollector(t, st)
	q := openQueue(t)
	a := startAgent(t, d, q, newSealer(t), c.Addr())
	var seqs []uint64
	for i := range 5 {
		seqs = append(seqs, queue(t, q, 400, fmt.Sprintf("rebind%d", i))...)
		time.Sleep(50 * time.Millisecond) // mid-stream
		if err := a.up.Rebind(); err != nil {
			t.Fatalf("Rebind: %v", err)
		}
	}
	waitDrained(t, q, 30*time.Second)
	if missing, _ := rec.count(seqs); missing != 0 {
		t.Errorf("%d records missing", missing)
	}
	if full, resumed := a.up.Handshakes(); full != 1 || resumed != 0 {
		t.Errorf("uplink made %d handshakes and %d resumptions across 5 rebindings, want 1 and 0", full, resumed)
	}
	if h := c.Stats().Handshakes["ok"]; h != 1 {
		t.Errorf("collector counted %d handshakes, want 1", h)
	}
}

// 10% of datagrams lost each way (a seeded lossy relay): nothing lost,
// thanks to CoAP retransmission and the at-least-once pipeline.
func TestTenPercentLoss(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	c, rec := startCollector(t, st)
	proxy := udpproxy.New(t, c.Addr().(*net.UDPAddr), 0.10, 7)
	q := openQueue(t)
	seqs := queue(t, q, 3000, "lossy")
	startAgent(t, d, q, newSealer(t), proxy.Addr)
	waitDrained(t, q, 120*time.Second)
	missing, dups := rec.count(seqs)
	if missing != 0 {
		t.Errorf("%d records missing at 10%% loss", missing)
	}
	t.Logf("3000 records at 10%% loss: %d datagrams dropped of %d, %d duplicates reached the sink",
		proxy.Dropped.Load(), proxy.Dropped.Load()+proxy.Forwarded.Load(), dups)
}

// An agent restart resumes the sealed session: no handshake, no TPM
// signature; the stored state is used once.
func TestRestartResumesWithoutHandshake(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	c, rec := startCollector(t, st)
	q := openQueue(t)
	sealer := newSealer(t)
	first := startAgent(t, d, q, sealer, c.Addr())
	seqs := queue(t, q, 100, "before")
	waitDrained(t, q, 20*time.Second)
	first.stop()
	if sealed, _ := q.Get("dtls.session"); len(sealed) == 0 {
		t.Fatal("no session stored at a clean stop")
	}

	sigs := d.TPM.Signatures()
	second := startAgent(t, d, q, sealer, c.Addr())
	seqs = append(seqs, queue(t, q, 100, "after")...)
	waitDrained(t, q, 20*time.Second)
	if spent := d.TPM.Signatures() - sigs; spent != 0 {
		t.Errorf("restart spent %d TPM signatures, want 0", spent)
	}
	if full, resumed := second.up.Handshakes(); full != 0 || resumed != 1 {
		t.Errorf("after restart: %d handshakes, %d resumptions; want 0 and 1", full, resumed)
	}
	if h := c.Stats().Handshakes["ok"]; h != 1 {
		t.Errorf("collector counted %d handshakes, want 1", h)
	}
	if missing, _ := rec.count(seqs); missing != 0 {
		t.Errorf("%d records missing", missing)
	}
	// The snapshot was consumed: a crash now (no clean stop) leaves
	// nothing to resume twice.
	if sealed, _ := q.Get("dtls.session"); len(sealed) != 0 {
		t.Error("the resumed session state is still stored: it could be resumed twice")
	}
}

// A renewed certificate ends the session: the next one is a full
// handshake with the new certificate (its new TPM key signs), and
// delivery goes on.
func TestRenewedCertificateStartsNewSession(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	c, rec := startCollector(t, st)
	q := openQueue(t)
	a := startAgent(t, d, q, newSealer(t), c.Addr())
	seqs := queue(t, q, 50, "before")
	waitDrained(t, q, 20*time.Second)
	if err := d.Renewer.RenewNow(context.Background()); err != nil {
		t.Fatalf("RenewNow: %v", err)
	}
	renewed := d.Identity().Leaf().SerialNumber.Text(16)
	// The new session presents the renewed certificate, which only its new
	// TPM key can sign for. (Counting TPM signatures after RenewNow raced
	// the uplink, which may handshake before the count is read.)
	testsync.Until(t, 20*time.Second, "a new session with the renewed certificate", func() bool {
		full, _ := a.up.Handshakes()
		s := a.up.State()
		return full == 2 && s.State == telemetry.LinkConnected && s.CertSerial == renewed
	})
	seqs = append(seqs, queue(t, q, 50, "after")...)
	waitDrained(t, q, 20*time.Second)
	if h := c.Stats().Handshakes["ok"]; h != 2 {
		t.Errorf("collector counted %d handshakes, want 2", h)
	}
	if missing, _ := rec.count(seqs); missing != 0 {
		t.Errorf("%d records missing", missing)
	}
}

// A collector that refuses the session's certificate (4.01: it expired
// during the session) costs a reconnect, never records: they stay queued
// until the collector takes them.
func TestRefusedSessionKeepsRecords(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	var skew atomic.Int64
	c, rec := startCollector(t, st, func(cfg *collector.Config) {
		cfg.Now = func() time.Time { return time.Now().Add(time.Duration(skew.Load())) }
	})
	q := openQueue(t)
	a := startAgent(t, d, q, newSealer(t), c.Addr())
	seqs := queue(t, q, 50, "before")
	waitDrained(t, q, 20*time.Second)

	skew.Store(int64(10 * 365 * 24 * time.Hour)) // the collector sees the certificate expired
	held := queue(t, q, 50, "held")
	testsync.Until(t, 20*time.Second, "the collector refusing the session", func() bool { return c.Stats().Requests["4.01"] >= 1 })
	time.Sleep(2 * time.Second) // the uplink reconnects and is refused again
	if depth := q.Stats().Depth; depth != int64(len(held)) {
		t.Errorf("queue depth %d while the collector refuses the session, want %d (nothing dropped)", depth, len(held))
	}
	if n := a.pipe.Rejected(); n != 0 {
		t.Errorf("%d records dropped as refused; a refused session must not drop records", n)
	}

	skew.Store(0)
	waitDrained(t, q, 30*time.Second)
	if missing, _ := rec.count(append(seqs, held...)); missing != 0 {
		t.Errorf("%d records missing", missing)
	}
}

// The agent counts a failed DTLS handshake by its reason: here it does
// not trust the collector's CA.
func TestHandshakeFailureCountedByReason(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	c, _ := startCollector(t, st)
	a := startAgent(t, d, openQueue(t), newSealer(t), c.Addr(), func(c *coap.Config) {
		c.RootCAs = x509.NewCertPool // trusts nothing
	})
	testsync.Until(t, 20*time.Second, "a handshake failure counted as unknown_ca", func() bool { return a.stats.Snapshot().FailedBy["unknown_ca"] >= 1 })
	// Later attempts may fail otherwise too (the collector may answer the
	// alert the agent sent); none succeeds.
	if s := a.stats.Snapshot(); s.OK != 0 || s.FailedBy["other"] != 0 {
		t.Errorf("handshakes: ok %d, failed by reason %v; want none ok and every failure named", s.OK, s.FailedBy)
	}
	if st := a.up.State(); st.State != telemetry.LinkBackoff && st.State != telemetry.LinkConnecting {
		t.Errorf("uplink state %q, want backoff", st.State)
	}
}

// A collector whose size limit is below the agent's answers 4.13: the
// records go again in smaller payloads, and only a record too large alone
// is dropped (and counted).
func TestCollectorLimitBelowAgentsSplitsPayloads(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	c, rec := startCollector(t, st, func(cfg *collector.Config) { cfg.MaxPayload = 400 })
	q := openQueue(t)
	a := startAgent(t, d, q, newSealer(t), c.Addr())
	seqs := queue(t, q, 200, "small")
	huge := strings.Repeat("x", 600)
	b, err := senml.Pack{{Name: "huge", StringValue: &huge, Time: ptr(1.8e9)}}.EncodeCBOR()
	if err != nil {
		t.Fatal(err)
	}
	hugeSeq, _, err := q.Append(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	waitDrained(t, q, 30*time.Second)
	if missing, _ := rec.count(seqs); missing != 0 {
		t.Errorf("%d of %d records missing", missing, len(seqs))
	}
	if n := a.pipe.Rejected(); n != 1 {
		t.Errorf("%d records dropped as refused, want 1 (the one too large alone)", n)
	}
	if missing, _ := rec.count([]uint64{hugeSeq}); missing != 1 {
		t.Error("the record too large for the collector was accepted")
	}
	refused := c.Stats().Requests["4.13"]
	if refused == 0 {
		t.Fatal("the collector never answered 4.13: the test proves nothing")
	}
	// The limit is learned: later payloads are cut to it.
	more := queue(t, q, 200, "later")
	waitDrained(t, q, 30*time.Second)
	if missing, _ := rec.count(more); missing != 0 {
		t.Errorf("%d of %d later records missing", missing, len(more))
	}
	if n := c.Stats().Requests["4.13"] - refused; n != 0 {
		t.Errorf("%d more payloads refused as too large after the limit was learned, want 0", n)
	}
}

// A collector that answers but cannot take records (its sink is down:
// 5.03) keeps the session: no new handshake, and the agent resends with
// a growing backoff instead of in a loop; once the sink is back, every
// record arrives.
func TestCollectorSinkDownBacksOff(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	var down atomic.Bool
	down.Store(true)
	c, rec := startCollector(t, st, func(cfg *collector.Config) {
		inner := cfg.Sink
		cfg.Sink = collector.SinkFunc(func(ctx context.Context, dev string, p senml.Pack) error {
			if down.Load() {
				return errors.New("sink down")
			}
			return inner.Write(ctx, dev, p)
		})
	})
	q := openQueue(t)
	a := startAgent(t, d, q, newSealer(t), c.Addr())
	seqs := queue(t, q, 100, "held")
	testsync.Until(t, 20*time.Second, "the collector refusing with 5.03", func() bool { return c.Stats().Requests["5.03"] >= 1 })
	start := c.Stats().Requests["5.03"]
	time.Sleep(3 * time.Second)
	// The pipeline's backoff starts at 500 ms and doubles: a handful of
	// attempts in 3 s, not hundreds.
	if n := c.Stats().Requests["5.03"] - start; n > 12 {
		t.Errorf("%d requests refused in 3 s while the sink was down; want a backoff", n)
	}
	if full, _ := a.up.Handshakes(); full != 1 {
		t.Errorf("%d handshakes while the collector answered 5.03, want 1 (the session stands)", full)
	}
	down.Store(false)
	waitDrained(t, q, 90*time.Second)
	if missing, _ := rec.count(seqs); missing != 0 {
		t.Errorf("%d records missing", missing)
	}
	if n := a.pipe.Rejected(); n != 0 {
		t.Errorf("%d records dropped", n)
	}
}

// The collector's name is resolved at each connection attempt: an uplink
// made while the name does not resolve (a gateway booting offline) starts
// and keeps trying, connects once the name resolves, and follows the name
// to a new address when its session there ends.
func TestCollectorResolvedAtEachConnect(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	dns := dnstest.Start(t)
	cert := st.ServiceCert(t, "collector", []string{"collector.test"}, true)
	first, recFirst, stopFirst := runCollector(t, st, func(c *collector.Config) { c.Certificate = cert })
	port := first.Addr().(*net.UDPAddr).Port
	second, recSecond := startCollector(t, st, func(c *collector.Config) {
		c.Certificate, c.Addr = cert, fmt.Sprintf("127.0.0.2:%d", port)
	})
	q := openQueue(t)
	a := startAgent(t, d, q, newSealer(t), second.Addr(), func(c *coap.Config) {
		c.URL = fmt.Sprintf("coaps://collector.test:%d", port)
		c.Resolver = dns.Resolver()
		c.MaxRetransmit = 1 // a dead session is noticed in seconds
	})
	testsync.Until(t, 10*time.Second, "a failed lookup reported", func() bool {
		s := a.up.State()
		return s.State == telemetry.LinkBackoff && strings.Contains(s.LastError, "collector.test")
	})

	dns.Set("collector.test", netip.MustParseAddr("127.0.0.1"))
	seqs := queue(t, q, 20, "first")
	waitDrained(t, q, 20*time.Second)
	if missing, _ := recFirst.count(seqs); missing != 0 {
		t.Fatalf("%d records missing at the first address", missing)
	}

	dns.Set("collector.test", netip.MustParseAddr("127.0.0.2"))
	stopFirst()
	seqs = queue(t, q, 20, "second")
	waitDrained(t, q, 60*time.Second)
	if missing, _ := recSecond.count(seqs); missing != 0 {
		t.Errorf("%d records missing at the new address", missing)
	}
}

// The uplink reads its trust roots at each handshake, as it asks for the
// client certificate: roots that change under a running uplink (a renewal
// that brought a CA rollover) are used at the next handshake, with no
// restart. Here the first roots trust nothing, then the right ones appear.
func TestRootsReadAtEachHandshake(t *testing.T) {
	st := stationtestStart(t)
	d := enrolltest.New(t, st, enroll.RenewerConfig{})
	c, rec := startCollector(t, st)
	var roots atomic.Pointer[x509.CertPool]
	roots.Store(x509.NewCertPool())
	q := openQueue(t)
	a := startAgent(t, d, q, newSealer(t), c.Addr(), func(c *coap.Config) { c.RootCAs = roots.Load })
	testsync.Until(t, 20*time.Second, "a handshake refused for an unknown CA", func() bool {
		return a.stats.Snapshot().FailedBy["unknown_ca"] >= 1
	})
	roots.Store(d.RootCAs())
	seqs := queue(t, q, 20, "after-new-roots")
	waitDrained(t, q, 20*time.Second)
	if missing, _ := rec.count(seqs); missing != 0 {
		t.Errorf("%d records missing", missing)
	}
}
