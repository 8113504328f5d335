package coap_test

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/enroll/enrolltest"
	"iotagent.dev/iotagent/internal/udpproxy"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/telemetry/mqtt"
)

const benchRecords = 1000

// BenchmarkCoAPUplink measures records/s from the queue to the collector's
// sink over CoAP/DTLS on loopback, through a relay dropping 0% and 10% of
// datagrams each way, and the datagrams and wire bytes each 1000 records
// cost (UDP payloads, both directions, acknowledgements included).
func BenchmarkCoAPUplink(b *testing.B) {
	for _, loss := range []float64{0, 0.10} {
		b.Run(fmt.Sprintf("loss=%.0f%%", loss*100), func(b *testing.B) {
			st := stationtestStart(b)
			d := enrolltest.New(b, st, enroll.RenewerConfig{})
			c, rec := startCollector(b, st)
			proxy := udpproxy.New(b, c.Addr().(*net.UDPAddr), loss, 11)
			q := openQueue(b)
			startAgent(b, d, q, newSealer(b), proxy.Addr)
			waitReceived(b, rec, queue(b, q, 10, "warm"), time.Minute) // the handshake is not measured
			grams0, bytes0 := proxy.Forwarded.Load()+proxy.Dropped.Load(), proxy.BytesUp.Load()+proxy.BytesDown.Load()
			for b.Loop() {
				// Timed to the collector's sink, not to the queue: the
				// queue forgets delivered records up to AckDelay later.
				waitReceived(b, rec, queue(b, q, benchRecords, "bench"), 2*time.Minute)
			}
			n := float64(b.N * benchRecords)
			b.ReportMetric(n/b.Elapsed().Seconds(), "records/s")
			b.ReportMetric(float64(proxy.Forwarded.Load()+proxy.Dropped.Load()-grams0)/n*1000, "datagrams/1000rec")
			b.ReportMetric(float64(proxy.BytesUp.Load()+proxy.BytesDown.Load()-bytes0)/n, "wire-B/record")
		})
	}
}

// waitReceived waits until the collector's sink has every seq.
func waitReceived(b *testing.B, rec *received, seqs []uint64, d time.Duration) {
	deadline := time.Now().Add(d)
	for {
		if missing, _ := rec.count(seqs); missing == 0 {
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("records not received after %v", d)
		}
		time.Sleep(time.Millisecond)
	}
}

// BenchmarkWireBytesPerRecord compares, in one run and for the same
// records, the bytes on the wire per record of CoAP/CBOR over DTLS and
// MQTT/JSON over TLS: application payload bytes in both directions
// (UDP payloads; TCP stream bytes), handshakes excluded, acknowledgements
// included. Batches are as the uplinks pack them by default (1152-byte
// CoAP payloads; MQTT messages of up to 64 KiB, and 1152 bytes for a
// like-for-like batch).
func BenchmarkWireBytesPerRecord(b *testing.B) {
	st := stationtestStart(b)
	b.Run("coap-cbor-1152", func(b *testing.B) {
		d := enrolltest.New(b, st, enroll.RenewerConfig{})
		c, _ := startCollector(b, st)
		proxy := udpproxy.New(b, c.Addr().(*net.UDPAddr), 0, 1)
		q := openQueue(b)
		startAgent(b, d, q, newSealer(b), proxy.Addr)
		queue(b, q, 10, "warm")
		waitDrained(b, q, time.Minute)
		before := proxy.BytesUp.Load() + proxy.BytesDown.Load()
		for b.Loop() {
			queue(b, q, benchRecords, "bench")
			waitDrained(b, q, time.Minute)
		}
		b.ReportMetric(float64(proxy.BytesUp.Load()+proxy.BytesDown.Load()-before)/float64(b.N*benchRecords), "wire-B/record")
	})
	for _, payload := range []int{1152, 64 << 10} {
		b.Run(fmt.Sprintf("mqtt-json-%d", payload), func(b *testing.B) {
			d := enrolltest.New(b, st, enroll.RenewerConfig{})
			br := mqtttest.Start(b, st, mqtttest.Options{})
			proxy := mqtttest.NewProxy(b, br.Addr)
			q := openQueue(b)
			up, err := mqtt.New(mqtt.Config{URL: proxy.URL, RootCAs: d.RootCAs, Identity: d.Identity(), MaxPayload: payload})
			if err != nil {
				b.Fatal(err)
			}
			pipe, _ := telemetry.NewPipeline(telemetry.PipelineConfig{Store: q, Uplink: up})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			go up.Run(ctx)
			go pipe.Run(ctx)
			queue(b, q, 10, "warm")
			waitDrained(b, q, time.Minute)
			st0 := proxy.Stats()
			for b.Loop() {
				queue(b, q, benchRecords, "bench")
				waitDrained(b, q, time.Minute)
			}
			st1 := proxy.Stats()
			b.ReportMetric(float64(st1.Up+st1.Down-st0.Up-st0.Down)/float64(b.N*benchRecords), "wire-B/record")
		})
	}
}
