package main

import (
	"context"
	"sync"
	"testing"
	"time"

	"iotagent.dev/iotagent/station/collector"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/telemetry/senml"
)

// coapSink counts what the collector received, per sequence number.
type coapSink struct {
	mu   sync.Mutex
	seqs map[uint64]int
}

func (s *coapSink) missing(want []uint64) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, seq := range want {
		if s.seqs[seq] == 0 {
			n++
		}
	}
	return n
}

// iotagent run with a coaps:// uplink, as operators run it: it delivers
// to the station's collector, and after a clean stop and a restart it
// resumes the DTLS session it sealed with its TPM-held key (the collector
// counts one handshake across both runs), and delivers again.
func TestRunCoAPUplinkResumesAfterRestart(t *testing.T) {
	bin := agentBinary(t)
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	sink := &coapSink{seqs: map[uint64]int{}}
	col, err := collector.New(collector.Config{Addr: "127.0.0.1:0", Certificate: st.ServiceCert(t, "collector", []string{"127.0.0.1"}, true),
		ClientCAs: st.TrustPool(), Revoked: st.CertificateRevoked,
		Sink: collector.SinkFunc(func(_ context.Context, _ string, p senml.Pack) error {
			sink.mu.Lock()
			defer sink.mu.Unlock()
			for _, r := range p {
				sink.seqs[r.Seq]++
			}
			return nil
		})})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- col.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-col.Ready():
	case err := <-done:
		t.Fatalf("collector: %v", err)
	}

	_, _, args := enrolledRun(t, st, "coaps://"+col.Addr().String())

	var mu sync.Mutex
	var acked []uint64
	for round := range 2 {
		p := startAgent(t, bin, args...)
		want := streamFor(p, 700*time.Millisecond, &acked, &mu)()
		deadline := time.Now().Add(30 * time.Second)
		for sink.missing(want) > 0 && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		if n := sink.missing(want); n != 0 {
			t.Fatalf("round %d: %d of %d acknowledged records never reached the collector\n%s", round+1, n, len(want), p.out)
		}
		stopAgent(t, p)
		if h := col.Stats().Handshakes; h["ok"] != 1 || len(h) != 1 {
			t.Errorf("after run %d the collector counted handshakes %v; want exactly one, ok (the restart resumes)\n%s", round+1, h, p.out)
		}
		t.Logf("run %d: %d records delivered in all", round+1, len(want))
	}
	if len(acked) < 100 {
		t.Errorf("only %d records streamed; the test proves little", len(acked))
	}
}
