package station_test

import (
	"context"
	"testing"
	"time"

	"iotagent.dev/iotagent/internal/testsync"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/stationtest"
)

// Finding 5 of issue 10: service certificates were a year issued afresh
// at every start. A ServiceIdentity's certificate has the lifetime asked
// for and is renewed two thirds into it, each renewal recorded (and so
// revocable).
func TestServiceIdentityRenews(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	si, err := station.NewServiceIdentity(ctx, station.ServiceRequest{Name: "coap-collector", SANs: []string{"127.0.0.1"}, Server: true, Lifetime: 3 * time.Second}, st.IssueService, nil)
	if err != nil {
		t.Fatal(err)
	}
	first := si.Certificate().Leaf
	if life := first.NotAfter.Sub(first.NotBefore); life > 3*time.Second+5*time.Minute {
		t.Errorf("lifetime %v, want the 3s asked for (and the backdate)", life)
	}
	done := make(chan error, 1)
	go func() { done <- si.Run(ctx) }()
	testsync.Until(t, 20*time.Second, "the certificate is renewed", func() bool {
		return si.Certificate().Leaf.SerialNumber.Cmp(first.SerialNumber) != 0
	})
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
	if err := st.RevokeService("coap-collector"); err != nil {
		t.Fatal(err)
	}
	der, _ := st.CRL()
	if n := len(mustCRL(t, der).RevokedCertificateEntries); n < 2 {
		t.Errorf("CRL lists %d serials after revoking the renewed service, want both certificates", n)
	}
}
