package mqtt_test

import (
	"fmt"
	"testing"
	"time"

	paho "github.com/eclipse/paho.mqtt.golang"

	"iotagent.dev/iotagent/station/mqtttest"
)

const benchBatch = 1000

// BenchmarkIngestToSubscriber measures records/s end to end: ingest socket
// (ack after fsync), bbolt queue, pipeline, MQTT QoS 1 to mosquitto, a
// subscriber. One op is a batch of 1000 records.
func BenchmarkIngestToSubscriber(b *testing.B) {
	r := newRig(b, rigOptions{})
	sub := r.br.Subscribe(b, "devices/"+r.id+"/telemetry")
	for b.Loop() {
		seqs := r.ingest(benchBatch, "bench")
		collect(b, sub, seqs, time.Minute)
	}
	b.ReportMetric(float64(b.N*benchBatch)/b.Elapsed().Seconds(), "records/s")
}

// BenchmarkRawPahoQoS1 is the baseline, in the same run against the same
// broker: a bare paho client publishing each record as its own QoS 1
// message (no disk, no batching), all in flight at once, until the
// subscriber has them all.
func BenchmarkRawPahoQoS1(b *testing.B) {
	r := newRig(b, rigOptions{noUplink: true})
	sub := r.br.Subscribe(b, "devices/dev-raw/telemetry")
	c := paho.NewClient(paho.NewClientOptions().AddBroker("tls://" + r.br.Addr).SetClientID("dev-raw").
		SetTLSConfig(r.br.ClientTLS(b, "dev-raw")).SetAutoReconnect(false).SetOrderMatters(false))
	if tok := c.Connect(); !tok.WaitTimeout(10*time.Second) || tok.Error() != nil {
		b.Fatalf("connect: %v", tok.Error())
	}
	defer c.Disconnect(100)
	seq := 0
	for b.Loop() {
		toks := make([]paho.Token, 0, benchBatch)
		for i := 0; i < benchBatch; i++ {
			seq++
			toks = append(toks, c.Publish("devices/dev-raw/telemetry", 1, false, fmt.Sprintf(`[{"n":"bench","v":%d,"seq":%d}]`, i, seq)))
		}
		for _, tok := range toks {
			if !tok.WaitTimeout(time.Minute) || tok.Error() != nil {
				b.Fatalf("publish: %v", tok.Error())
			}
		}
		for got := 0; got < benchBatch; got++ {
			select {
			case <-sub.Messages():
			case <-time.After(time.Minute):
				b.Fatalf("subscriber got %d of %d", got, benchBatch)
			}
		}
	}
	b.ReportMetric(float64(b.N*benchBatch)/b.Elapsed().Seconds(), "records/s")
}

// BenchmarkReconnectTPMSignatures reports TPM signatures spent per MQTT
// reconnect: after a link drop (the broker still holds the TLS session,
// which resumes) and after a broker restart (mosquitto forgets its session
// tickets: a full handshake, one signature).
func BenchmarkReconnectTPMSignatures(b *testing.B) {
	for _, tc := range []struct {
		name  string
		fault func(r *rig, p *mqtttest.Proxy)
	}{
		{"link-drop", func(r *rig, p *mqtttest.Proxy) { p.Cut() }},
		{"broker-restart", func(r *rig, p *mqtttest.Proxy) { p.Refuse(true); r.br.Restart() }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			var proxy *mqtttest.Proxy
			r := newRig(b, rigOptions{url: func(br *mqtttest.Broker) string {
				proxy = mqtttest.NewProxy(b, br.Addr)
				return proxy.URL
			}})
			sub := r.br.Subscribe(b, "devices/"+r.id+"/telemetry")
			collect(b, sub, r.ingest(5, "warmup"), 10*time.Second)
			var spent, n uint64
			for b.Loop() {
				n++
				before := r.tpm.Signatures()
				tc.fault(r, proxy)
				if tc.name == "broker-restart" {
					// The observer re-subscribes before the agent may
					// reconnect, so it misses nothing.
					sub.WaitSubscribed(b, 1+int(n))
					proxy.Refuse(false)
				}
				collect(b, sub, r.ingest(5, "after"), 20*time.Second)
				spent += r.tpm.Signatures() - before
			}
			b.ReportMetric(float64(spent)/float64(n), "signatures/reconnect")
		})
	}
}
