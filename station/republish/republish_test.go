package republish_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"os"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/republish"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/telemetry/senml"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

func TestMain(m *testing.M) { os.Exit(tpmtest.Main(m)) }

func TestRepublishWaitsForPuback(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	br := mqtttest.Start(t, st, mqtttest.Options{ACL: []string{"user coap-collector", "topic write devices/+/telemetry"}})
	sub := br.Subscribe(t, "devices/#")
	sc, err := st.IssueService(context.Background(), station.ServiceRequest{Name: "coap-collector", Lifetime: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	kp, _ := tls.X509KeyPair(sc.Chain, sc.Key)
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(st.TrustPEM())
	sink, err := republish.New(republish.Config{Broker: br.URL, TLS: &tls.Config{Certificates: []tls.Certificate{kp}, RootCAs: pool}, Timeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	v := 21.5
	if err := sink.Write(context.Background(), "gw-1", senml.Pack{{Name: "temp", Value: &v, Seq: 7}}); err != nil {
		t.Fatalf("Write: %v", err)
	}
	select {
	case m := <-sub.Messages():
		if m.Topic != "devices/gw-1/telemetry" || !strings.Contains(string(m.Payload), `"seq":7`) {
			t.Errorf("got %s %s", m.Topic, m.Payload)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("nothing republished")
	}
	// With the broker down, Write fails (the collector answers 5.03 and
	// the device resends), and recovers when it is back.
	br.Stop()
	if err := sink.Write(context.Background(), "gw-1", senml.Pack{{Name: "temp", Value: &v, Seq: 8}}); err == nil {
		t.Error("Write succeeded with the broker down")
	}
	br.Restart()
	sub.WaitSubscribed(t, 2)
	if err := sink.Write(context.Background(), "gw-1", senml.Pack{{Name: "temp", Value: &v, Seq: 9}}); err != nil {
		t.Errorf("Write after the broker came back: %v", err)
	}
}

func TestRepublishConfig(t *testing.T) {
	if _, err := republish.New(republish.Config{Broker: "tcp://x:1883", TLS: &tls.Config{Certificates: []tls.Certificate{{}}}}); err == nil {
		t.Error("plain TCP broker accepted")
	}
	if _, err := republish.New(republish.Config{Broker: "mqtts://x:8883", TLS: &tls.Config{}}); err == nil {
		t.Error("no client certificate accepted")
	}
}

// A certificate renewed while running (station.ServiceIdentity, as serve
// uses): GetClientCertificate instead of Certificates, the client ID
// from its CN (serve refused to start with it: "republish needs a client
// certificate").
func TestRepublishRenewedCertificate(t *testing.T) {
	st := stationtest.Start(t, stationtest.Options{})
	br := mqtttest.Start(t, st, mqtttest.Options{ACL: []string{"user coap-collector", "topic write devices/+/telemetry"}})
	sub := br.Subscribe(t, "devices/#")
	si, err := station.NewServiceIdentity(context.Background(), station.ServiceRequest{Name: "coap-collector", Lifetime: time.Hour}, st.IssueService, nil)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(st.TrustPEM())
	sink, err := republish.New(republish.Config{Broker: br.URL, TLS: &tls.Config{GetClientCertificate: si.GetClientCertificate, RootCAs: pool}, Timeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	v := 1.5
	if err := sink.Write(context.Background(), "gw-2", senml.Pack{{Name: "temp", Value: &v, Seq: 1}}); err != nil {
		t.Fatalf("Write: %v", err)
	}
	select {
	case m := <-sub.Messages():
		if m.Topic != "devices/gw-2/telemetry" {
			t.Errorf("got %s", m.Topic)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("nothing republished")
	}
}
