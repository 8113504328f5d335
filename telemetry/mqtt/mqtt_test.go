package mqtt_test

import (
	"bufio"
	"context"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/enroll/enrolltest"
	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/telemetry/mqtt"
	"iotagent.dev/iotagent/telemetry/senml"
	"iotagent.dev/iotagent/tpm"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// rig is one enrolled agent with its queue, ingest socket, MQTT uplink and
// pipeline, against a real station and mosquitto.
type rig struct {
	t       testing.TB
	st      *stationtest.Station
	br      *mqtttest.Broker
	sim     *tpmtest.Simulator
	tpm     *tpm.TPM
	renewer *enroll.Renewer
	q       *store.Store
	ing     *telemetry.Ingest
	up      *mqtt.Uplink
	stats   *telemetry.TLSStats
	pipe    *telemetry.Pipeline
	dir     string
	id      string

	cancel context.CancelFunc
	wg     sync.WaitGroup
}

type rigOptions struct {
	url      func(*mqtttest.Broker) string // default the broker's URL
	urlFor   func(*rig) string             // the URL of a broker the test runs itself
	maxBytes int64
	lifetime time.Duration
	noUplink bool
	roots    func() *x509.CertPool // default the identity's trust bundle
	broker   mqtttest.Options
	command  func(op string)
}

func newRig(t testing.TB, opts rigOptions) *rig {
	t.Helper()
	if opts.lifetime == 0 {
		opts.lifetime = time.Hour
	}
	r := &rig{t: t}
	r.st = stationtest.Start(t, stationtest.Options{AutoApprove: true, CertLifetime: opts.lifetime})
	r.br = mqtttest.Start(t, r.st, opts.broker)
	d := enrolltest.New(t, r.st, enroll.RenewerConfig{})
	r.sim, r.tpm, r.dir, r.id, r.renewer = d.Sim, d.TPM, d.Dir, d.DeviceID(), d.Renewer
	var err error
	if opts.maxBytes == 0 {
		opts.maxBytes = 64 << 20
	}
	r.q, err = store.Open(store.Options{Path: filepath.Join(r.dir, "queue.db"), MaxBytes: opts.maxBytes})
	if err != nil {
		t.Fatal(err)
	}
	sockDir, _ := os.MkdirTemp("", "ing")
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	r.ing, err = telemetry.NewIngest(telemetry.IngestConfig{Socket: filepath.Join(sockDir, "s"), Store: r.q})
	if err != nil {
		t.Fatal(err)
	}
	url := r.br.URL
	switch {
	case opts.url != nil:
		url = opts.url(r.br)
	case opts.urlFor != nil:
		url = opts.urlFor(r)
	}
	r.stats = &telemetry.TLSStats{}
	if opts.roots == nil {
		opts.roots = r.renewer.Identity().RootCAs
	}
	r.up, err = mqtt.New(mqtt.Config{URL: url, RootCAs: opts.roots, Identity: r.renewer.Identity(), Stats: r.stats,
		BackoffBase: 50 * time.Millisecond, BackoffCap: 500 * time.Millisecond, KeepAlive: 5 * time.Second, ConnectTimeout: 5 * time.Second, Command: opts.command})
	if err != nil {
		t.Fatal(err)
	}
	r.pipe, err = telemetry.NewPipeline(telemetry.PipelineConfig{Store: r.q, Uplink: r.up})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	r.run(ctx, r.ing.Run)
	if !opts.noUplink {
		r.startUplink(ctx)
	}
	<-r.ing.Ready()
	t.Cleanup(r.stop)
	return r
}

func (r *rig) run(ctx context.Context, f func(context.Context) error) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		if err := f(ctx); err != nil {
			r.t.Errorf("component: %v", err)
		}
	}()
}

func (r *rig) startUplink(ctx context.Context) {
	r.run(ctx, r.up.Run)
	r.run(ctx, r.pipe.Run)
}

func (r *rig) stop() {
	r.cancel()
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		r.t.Error("agent components did not stop within 10 s")
	}
	r.q.Close()
}

// ingest sends n single-record lines through the ingest socket and returns
// the sequence numbers it was told.
func (r *rig) ingest(n int, name string) []uint64 {
	r.t.Helper()
	c, err := net.Dial("unix", r.ing.Socket())
	if err != nil {
		r.t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	w := bufio.NewWriter(c)
	seqs := make([]uint64, 0, n)
	// Pipelined: write in batches of 100 lines, then read the answers.
	for i := 0; i < n; i += 100 {
		k := min(100, n-i)
		for j := 0; j < k; j++ {
			fmt.Fprintf(w, `[{"n":%q,"v":%d}]`+"\n", name, i+j)
		}
		w.Flush()
		for j := 0; j < k; j++ {
			line, err := br.ReadString('\n')
			if err != nil {
				r.t.Fatal(err)
			}
			var seq uint64
			if _, err := fmt.Sscanf(line, "ok %d", &seq); err != nil {
				r.t.Fatalf("ingest answered %q", line)
			}
			seqs = append(seqs, seq)
		}
	}
	return seqs
}

// collect waits until the subscriber has every seq in want.
func collect(t testing.TB, sub *mqtttest.Subscriber, want []uint64, d time.Duration) map[uint64]int {
	t.Helper()
	return sub.WaitSeqs(t, want, d)
}

func TestTenThousandRecordsArrive(t *testing.T) {
	r := newRig(t, rigOptions{})
	sub := r.br.Subscribe(t, "devices/"+r.id+"/telemetry")
	seqs := r.ingest(10000, "load")
	got := collect(t, sub, seqs, 60*time.Second)
	dups := 0
	for _, s := range seqs {
		dups += got[s] - 1
	}
	if r.q.Stats().Depth != 0 {
		testsync.Until(t, 10*time.Second, "queue drained", func() bool { return r.q.Stats().Depth == 0 })
	}
	t.Logf("10000 records, %d duplicates", dups)
}

// The broker restarts (SIGTERM, then SIGKILL) while the agent streams:
// nothing is lost. The agent reaches the broker through a proxy that
// refuses it until the test's subscriber has re-subscribed, so that what
// the subscriber misses is what the agent lost, not what a restarted broker
// had no subscription for.
func TestBrokerRestartMidStream(t *testing.T) {
	var proxy *mqtttest.Proxy
	r := newRig(t, rigOptions{url: func(b *mqtttest.Broker) string {
		proxy = mqtttest.NewProxy(t, b.Addr)
		return proxy.URL
	}})
	sub := r.br.Subscribe(t, "devices/"+r.id+"/telemetry")
	var seqs []uint64
	for i, restart := range []func(){r.br.Restart, func() { r.br.Kill(); r.br.Restart() }} {
		streamed := make(chan []uint64)
		go func() { streamed <- r.ingest(1500, fmt.Sprintf("stream%d", i)) }()
		time.Sleep(100 * time.Millisecond) // mid-stream
		proxy.Refuse(true)
		restart()
		sub.WaitSubscribed(t, i+2)
		proxy.Refuse(false)
		seqs = append(seqs, <-streamed...)
	}
	got := collect(t, sub, seqs, 60*time.Second)
	testsync.Until(t, 10*time.Second, "queue drained", func() bool { return r.q.Stats().Depth == 0 })
	dups := 0
	for _, s := range seqs {
		dups += got[s] - 1
	}
	t.Logf("%d records across a broker restart and a broker crash, %d received twice", len(seqs), dups)
}

// PUBACKs vanish (the proxy drops everything from the broker while
// publishes still get through), then the link drops: the unacknowledged
// records stay queued and are sent again.
func TestLostPubacksThenLinkDrop(t *testing.T) {
	var proxy *mqtttest.Proxy
	r := newRig(t, rigOptions{url: func(b *mqtttest.Broker) string {
		proxy = mqtttest.NewProxy(t, b.Addr)
		return proxy.URL
	}})
	sub := r.br.Subscribe(t, "devices/"+r.id+"/telemetry")
	testsync.Until(t, 10*time.Second, "uplink connected", func() bool { return r.up.State().State == telemetry.LinkConnected })
	proxy.BlackholeDownstream()
	seqs := r.ingest(500, "x")
	// The broker got (some of) them, the agent no PUBACK: all still queued.
	time.Sleep(500 * time.Millisecond)
	if d := r.q.Stats().Depth; d != 500 {
		t.Errorf("queue depth with PUBACKs lost = %d, want 500 (nothing acknowledged)", d)
	}
	proxy.Cut()
	proxy.Heal()
	got := collect(t, sub, seqs, 30*time.Second)
	testsync.Until(t, 10*time.Second, "queue drained", func() bool { return r.q.Stats().Depth == 0 })
	dups := 0
	for _, s := range seqs {
		dups += got[s] - 1
	}
	t.Logf("500 records, %d received twice", dups)
}

// With the uplink down, the queue overflows its bound: the dropped counter
// equals exactly the number of records that never arrive.
func TestFullQueueDropCountIsExact(t *testing.T) {
	r := newRig(t, rigOptions{maxBytes: 20000, noUplink: true})
	seqs := r.ingest(2000, "overflow")
	st := r.q.Stats()
	if st.Dropped == 0 {
		t.Fatalf("nothing dropped: the queue bound is not reached (depth %d)", st.Depth)
	}
	sub := r.br.Subscribe(t, "devices/"+r.id+"/telemetry")
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r.startUplink(ctx)
	// The survivors are the newest records: the last Depth of them.
	survivors := seqs[len(seqs)-int(st.Depth):]
	got := collect(t, sub, survivors, 30*time.Second)
	// Nothing older arrives: give stragglers a moment.
	time.Sleep(300 * time.Millisecond)
	for len(sub.Messages()) > 0 {
		m := <-sub.Messages()
		p, _ := senml.ParseJSON(m.Payload)
		for _, rec := range p {
			got[rec.Seq]++
		}
	}
	arrived := 0
	for _, s := range seqs {
		if got[s] > 0 {
			arrived++
		}
	}
	if lost := uint64(len(seqs) - arrived); lost != st.Dropped {
		t.Errorf("records that never arrived = %d, dropped counter = %d; want equal", lost, st.Dropped)
	}
	cancel()
}

func TestRevokedDeviceRefusedByBroker(t *testing.T) {
	r := newRig(t, rigOptions{})
	testsync.Until(t, 10*time.Second, "uplink connected", func() bool { return r.up.State().State == telemetry.LinkConnected })
	if err := r.st.Revoke(r.id); err != nil {
		t.Fatal(err)
	}
	r.br.Restart() // mosquitto reads its crlfile at start
	testsync.Until(t, 20*time.Second, "the broker refusing the revoked certificate", func() bool {
		s := r.up.State()
		return s.State == telemetry.LinkBackoff && strings.Contains(s.LastError, "revoked")
	})
	// Refused, it backs off (50 ms doubling to 500 ms, full jitter here)
	// rather than hammering the broker.
	before, failedBefore := r.up.Attempts(), r.stats.Snapshot().FailedBy["peer_revoked_certificate"]
	sigs := r.tpm.Signatures()
	time.Sleep(3 * time.Second)
	attempts := r.up.Attempts() - before
	if attempts < 2 || attempts > 40 {
		t.Errorf("%d connection attempts in 3 s against a refusing broker; want retries with backoff (2..40)", attempts)
	}
	// The agent's SLI counts a refused attempt once, by the alert
	// mosquitto sent (when the alert is read: the broker may also reset
	// the connection before the agent reads it); each attempt is one
	// handshake, one TPM signature (paho does not retry CONNECT with
	// another protocol version).
	failed := int(r.stats.Snapshot().FailedBy["peer_revoked_certificate"] - failedBefore)
	if failed < attempts/2 || failed > attempts+1 {
		t.Errorf("%d attempts, %d handshake failures counted as peer_revoked_certificate; want about one per attempt", attempts, failed)
	}
	if spent := int(r.tpm.Signatures() - sigs); spent-attempts < -1 || spent-attempts > 1 {
		t.Errorf("%d attempts spent %d TPM signatures; want one each", attempts, spent)
	}
}

// A renewed certificate (new key) is presented at the next connection,
// with no restart, and the old session is not resumed.
func TestRotatedCertificateUsedAtNextConnection(t *testing.T) {
	var proxy *mqtttest.Proxy
	r := newRig(t, rigOptions{url: func(b *mqtttest.Broker) string {
		proxy = mqtttest.NewProxy(t, b.Addr)
		return proxy.URL
	}})
	sub := r.br.Subscribe(t, "devices/"+r.id+"/telemetry")
	testsync.Until(t, 10*time.Second, "uplink connected", func() bool { return r.up.State().State == telemetry.LinkConnected })
	old := r.renewer.Identity().Leaf().SerialNumber.Text(16)
	if got := r.up.State().CertSerial; got != old {
		t.Fatalf("first connection presented %s, want %s", got, old)
	}
	if err := r.renewer.RenewNow(context.Background()); err != nil {
		t.Fatal(err)
	}
	renewed := r.renewer.Identity().Leaf().SerialNumber.Text(16)
	proxy.Cut()
	testsync.Until(t, 10*time.Second, "reconnection with the new certificate", func() bool {
		s := r.up.State()
		return s.State == telemetry.LinkConnected && s.CertSerial == renewed
	})
	collect(t, sub, r.ingest(10, "after-rotation"), 10*time.Second)
}

// A device cannot publish into another device's topic (the broker ACL):
// checked by what a subscriber receives, since MQTT 3.1.1 acks a refused
// publish.
func TestDeviceCannotPublishForAnother(t *testing.T) {
	r := newRig(t, rigOptions{})
	sub := r.br.Subscribe(t, "devices/#")
	// Another enrolled-looking device (a certificate from the same CA, CN
	// dev-rogue) publishes into this device's topic; mosquitto acks it.
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + r.br.Addr).SetClientID("dev-rogue").
		SetTLSConfig(r.br.ClientTLS(t, "dev-rogue")).SetAutoReconnect(false))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("rogue connect: %v", tok.Error())
	}
	tok := c.Publish("devices/"+r.id+"/telemetry", 1, false, []byte(`[{"n":"forged","v":1,"seq":1}]`))
	if !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatalf("rogue publish: %v", tok.Error())
	}
	c.Disconnect(100)
	collect(t, sub, r.ingest(1, "genuine"), 10*time.Second)
	deadline := time.After(time.Second)
	for {
		select {
		case m := <-sub.Messages():
			if strings.Contains(string(m.Payload), "forged") {
				t.Fatalf("a message published by another device arrived on %s", m.Topic)
			}
		case <-deadline:
			return
		}
	}
}

// A reconnect after the link drops resumes the TLS session: no TPM
// signature. (After a broker restart mosquitto has forgotten its session
// tickets, so that reconnect signs once: see the closing note.)
func TestReconnectSpendsNoTPMSignature(t *testing.T) {
	var proxy *mqtttest.Proxy
	r := newRig(t, rigOptions{url: func(b *mqtttest.Broker) string {
		proxy = mqtttest.NewProxy(t, b.Addr)
		return proxy.URL
	}})
	sub := r.br.Subscribe(t, "devices/"+r.id+"/telemetry")
	testsync.Until(t, 10*time.Second, "uplink connected", func() bool { return r.up.State().State == telemetry.LinkConnected })
	// Deliver something so the session ticket (sent after the handshake)
	// has been read.
	collect(t, sub, r.ingest(10, "warmup"), 10*time.Second)
	for i := range 3 {
		before := r.tpm.Signatures()
		proxy.Cut()
		testsync.Until(t, 10*time.Second, "reconnection", func() bool {
			return r.up.State().State == telemetry.LinkConnected && r.up.State().Since.After(time.Now().Add(-5*time.Second))
		})
		collect(t, sub, r.ingest(10, fmt.Sprintf("after-cut-%d", i)), 10*time.Second)
		if spent := r.tpm.Signatures() - before; spent != 0 {
			t.Errorf("reconnect %d spent %d TPM signatures, want 0 (session resumed)", i+1, spent)
		}
	}
}

// The uplink reads its trust roots at each handshake, as it asks for the
// client certificate: roots that change under a running uplink (a renewal
// that brought a CA rollover) are used at the next connection, with no
// restart. Here the first roots trust nothing, then the right ones appear.
func TestRootsReadAtEachHandshake(t *testing.T) {
	var roots atomic.Pointer[x509.CertPool]
	roots.Store(x509.NewCertPool())
	r := newRig(t, rigOptions{roots: roots.Load})
	sub := r.br.Subscribe(t, "devices/#")
	testsync.Until(t, 10*time.Second, "a handshake refused for an unknown CA", func() bool {
		return r.stats.Snapshot().FailedBy["unknown_ca"] >= 1
	})
	roots.Store(r.renewer.Identity().RootCAs())
	testsync.Until(t, 10*time.Second, "uplink connected", func() bool { return r.up.State().State == telemetry.LinkConnected })
	collect(t, sub, r.ingest(10, "after-new-roots"), 10*time.Second)
}

// Two gateways with one identity (a cloned state dir) take the broker
// session from each other: every session is short, and each may deliver
// before it is taken over. The reconnect backoff keeps growing over short
// sessions whatever they delivered, so the pair does not reconnect in a
// loop (a session that delivered used to reset it).
func TestSessionTakeOverBacksOff(t *testing.T) {
	r := newRig(t, rigOptions{})
	q2, err := store.Open(store.Options{Path: filepath.Join(t.TempDir(), "queue.db")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q2.Close() })
	twin, err := mqtt.New(mqtt.Config{URL: r.br.URL, RootCAs: r.renewer.Identity().RootCAs, Identity: r.renewer.Identity(),
		BackoffBase: 50 * time.Millisecond, BackoffCap: 500 * time.Millisecond, KeepAlive: 5 * time.Second, ConnectTimeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	pipe, err := telemetry.NewPipeline(telemetry.PipelineConfig{Store: q2, Uplink: twin})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r.run(ctx, twin.Run)
	r.run(ctx, pipe.Run)
	// Both keep something to deliver.
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := 0; ctx.Err() == nil; i++ {
			p, _ := telemetry.EncodeForQueue(fmt.Appendf(nil, `[{"n":"twin","v":%d}]`, i), time.Now())
			q2.Append(ctx, p...)
			r.ingest(1, "original")
			time.Sleep(20 * time.Millisecond)
		}
	})
	start := r.up.Attempts() + twin.Attempts()
	const watch = 8 * time.Second
	time.Sleep(watch)
	cancel()
	wg.Wait()
	// Waits grow to the 500 ms cap: a few dozen attempts in 8 s between
	// the two; resetting after each delivering session makes it hundreds.
	if n := r.up.Attempts() + twin.Attempts() - start; n > 80 {
		t.Errorf("%d connection attempts in %v by two gateways taking one session from each other; want the backoff to hold them to a few dozen", n, watch)
	} else {
		t.Logf("%d connection attempts in %v", n, watch)
	}
}
