package watch_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/station/watch"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

// The watcher counts, per device, records, distinct sequence numbers,
// duplicates and gaps.
func TestWatcherAccounts(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	br := mqtttest.Start(t, st, mqtttest.Options{})
	sc, err := st.IssueService(context.Background(), station.ServiceRequest{Name: "fleet-reader", Lifetime: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	kp, _ := tls.X509KeyPair(sc.Chain, sc.Key)
	kp.Leaf, _ = x509.ParseCertificate(kp.Certificate[0])
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(st.TrustPEM())
	w, err := watch.New(watch.Config{Broker: br.URL, TLS: &tls.Config{Certificates: []tls.Certificate{kp}, RootCAs: pool}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- w.Run(ctx) }()
	defer func() { cancel(); <-done }()
	time.Sleep(500 * time.Millisecond) // subscribed

	dev := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + br.Addr).SetClientID("gw-1").SetTLSConfig(br.ClientTLS(t, "gw-1")))
	if tok := dev.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		t.Fatal(tok.Error())
	}
	defer dev.Disconnect(100)
	// seqs 1..10 with 5 missing and 3 sent twice.
	for _, s := range []int{1, 2, 3, 4, 6, 7, 8, 9, 10, 3} {
		dev.Publish("devices/gw-1/telemetry", 1, false, fmt.Sprintf(`[{"n":"x","v":1,"seq":%d}]`, s)).WaitTimeout(5 * time.Second)
	}
	dev.Publish("devices/gw-1/telemetry", 1, false, "not senml").WaitTimeout(5 * time.Second)
	deadline := time.Now().Add(10 * time.Second)
	for {
		ds := w.Devices()
		if len(ds) == 1 && ds[0].Messages == 11 {
			d := ds[0]
			if d.Records != 10 || d.Unique != 9 || d.Duplicates != 1 || d.Missing != 1 || d.MinSeq != 1 || d.MaxSeq != 10 || d.Invalid != 1 {
				t.Errorf("account = %+v", d)
			}
			if !w.Seen("gw-1", 10) || w.Seen("gw-1", 5) || w.UniqueUpTo("gw-1", 4) != 4 {
				t.Error("Seen/UniqueUpTo disagree with what was sent")
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("watcher saw %+v", ds)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
