package mqtt_test

import (
	"context"
	"net"
	"path/filepath"
	"testing"
	"time"

	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station/demobroker"
)

// demoBroker runs the station's embedded broker, restartable on the same
// address with the same session-ticket key.
type demoBroker struct {
	t      *testing.T
	cfg    demobroker.Config
	cancel context.CancelFunc
	done   chan error
}

func (b *demoBroker) start() {
	b.t.Helper()
	br, err := demobroker.New(b.cfg)
	if err != nil {
		b.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	b.cancel, b.done = cancel, make(chan error, 1)
	go func() { b.done <- br.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", b.cfg.Addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			b.t.Fatalf("the demo broker does not listen on %s: %v", b.cfg.Addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (b *demoBroker) stop() {
	b.cancel()
	if err := <-b.done; err != nil {
		b.t.Errorf("demo broker: %v", err)
	}
}

// A broker that keeps its session-ticket key across a restart lets the
// agent's reconnect resume its TLS session: no TPM signature. mosquitto
// draws a new ticket key in each process, so after its restart the
// reconnect makes one full handshake (mqtttest's TestTLSResumption
// shows it); the station's embedded broker keeps its key in a file.
func TestBrokerRestartResumesWithoutSignature(t *testing.T) {
	var db *demoBroker
	r := newRig(t, rigOptions{urlFor: func(r *rig) string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		db = &demoBroker{t: t, cfg: demobroker.Config{Addr: addr, Certificate: r.st.ServiceCert(t, "demo-broker", []string{"127.0.0.1"}, true), ClientCAs: r.st.TrustPool(), TicketKeyFile: filepath.Join(t.TempDir(), "ticket.keys"), Revoked: r.st.CertificateRevoked}}
		db.start()
		t.Cleanup(db.stop)
		return "mqtts://" + addr
	}})
	testsync.Until(t, 10*time.Second, "uplink connected", func() bool { return r.up.State().State == "connected" })
	r.ingest(10, "warmup")
	testsync.Until(t, 10*time.Second, "the warm-up records acknowledged", func() bool { return r.q.Stats().Depth == 0 })

	for i := range 2 {
		before, resumed := r.tpm.Signatures(), r.stats.Snapshot().Resumed
		db.stop()
		testsync.Until(t, 10*time.Second, "the uplink noticing the broker is gone", func() bool { return r.up.State().State != "connected" })
		db.start()
		testsync.Until(t, 20*time.Second, "reconnection", func() bool { return r.up.State().State == "connected" })
		r.ingest(10, "after-restart")
		testsync.Until(t, 10*time.Second, "the records acknowledged", func() bool { return r.q.Stats().Depth == 0 })
		if spent := r.tpm.Signatures() - before; spent != 0 {
			t.Errorf("reconnect after broker restart %d spent %d TPM signatures, want 0", i+1, spent)
		}
		if got := r.stats.Snapshot().Resumed - resumed; got < 1 {
			t.Errorf("restart %d: no resumed handshake counted", i+1)
		}
	}

	// A certificate revoked since its session ticket was issued is refused
	// on resumption too.
	if err := r.st.Revoke(r.id); err != nil {
		t.Fatal(err)
	}
	db.stop()
	db.start()
	testsync.Until(t, 20*time.Second, "the broker refusing the revoked certificate on resumption", func() bool {
		return r.stats.Snapshot().FailedBy["peer_bad_certificate"] >= 1
	})
	if s := r.up.State(); s.State == "connected" {
		t.Errorf("uplink %+v: the revoked device is connected", s)
	}
}
