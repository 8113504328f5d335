package collector_test

import (
	"context"
	"fmt"
	"log/slog"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/plgd-dev/go-coap/v3/message"
	"github.com/plgd-dev/go-coap/v3/message/codes"
	"github.com/plgd-dev/go-coap/v3/net/blockwise"
	"github.com/plgd-dev/go-coap/v3/options"
	"github.com/plgd-dev/go-coap/v3/udp"

	"iotagent.dev/iotagent/station/collector"
	"iotagent.dev/iotagent/telemetry/senml"
)

var quiet = slog.New(slog.DiscardHandler)

// benchBatch is the records per POST: 40 make a CBOR body of about 1100
// bytes, what an agent fits in one datagram.
const benchBatch = 40

// BenchmarkRecords posts CBOR batches of about 1100 bytes through the
// collector on loopback, each client one confirmable POST at a time (go-coap's
// default), with new sequence numbers: every record reaches the sink.
func BenchmarkRecords(b *testing.B) {
	f := newFixture(b)
	for _, sinkName := range []string{"discard", "jsonl"} {
		for _, clients := range []int{1, 4} {
			b.Run(fmt.Sprintf("sink=%s/clients=%d", sinkName, clients), func(b *testing.B) {
				var sink collector.Sink = collector.SinkFunc(func(context.Context, string, senml.Pack) error { return nil })
				if sinkName == "jsonl" {
					s, err := collector.NewJSONLinesSink(filepath.Join(b.TempDir(), "t.jsonl"))
					if err != nil {
						b.Fatal(err)
					}
					b.Cleanup(func() { s.Close() })
					sink = s
				}
				c, _ := f.start(b, collector.Config{Sink: sink, Logger: quiet})
				type dev struct {
					cl   *client
					name string
					seq  uint64
				}
				devs := make([]*dev, clients)
				for i := range devs {
					name := fmt.Sprintf("gw-bench-%d", i)
					devs[i] = &dev{name: name, seq: 1, cl: dialT(b, f, c, name,
						dialOptions{coap: []udp.Option{options.WithBlockwise(false, blockwise.SZX1024, time.Second)}})}
				}
				size := len(mustCBOR(b, batch("gw-bench-0", 1e6, benchBatch)))

				var n atomic.Int64
				var wg sync.WaitGroup
				b.ResetTimer()
				start := time.Now()
				for _, d := range devs {
					wg.Go(func() {
						for n.Add(1) <= int64(b.N) {
							body, err := batch(d.name, d.seq, benchBatch).EncodeCBOR()
							if err != nil {
								b.Error(err)
								return
							}
							d.seq += benchBatch
							ctx, cancel := context.WithTimeout(context.Background(), wait)
							resp, err := d.cl.cc.Post(ctx, "/telemetry", message.AppSenmlCbor, strings.NewReader(string(body)))
							cancel()
							if err != nil {
								b.Error(err)
								return
							}
							if resp.Code() != codes.Changed {
								b.Errorf("POST = %v, want 2.04", resp.Code())
							}
							d.cl.cc.ReleaseMessage(resp)
						}
					})
				}
				wg.Wait()
				elapsed := time.Since(start)
				b.StopTimer()
				if got := c.Stats().Records.Accepted; got != uint64(b.N*benchBatch) {
					b.Errorf("accepted %d records, want %d", got, b.N*benchBatch)
				}
				b.ReportMetric(float64(b.N*benchBatch)/elapsed.Seconds(), "records/s")
				b.ReportMetric(float64(size), "B/batch")
			})
		}
	}
}

// BenchmarkHandshake dials the collector with a station-issued certificate
// and a software P-256 key, Connection ID on, one handshake at a time.
func BenchmarkHandshake(b *testing.B) {
	f := newFixture(b)
	c, _ := f.start(b, collector.Config{Logger: quiet})
	cert := issue(b, f.st, "gw-hs", nil, false)
	b.ResetTimer()
	for b.Loop() {
		cl, err := dial(b, c.Addr(), cert, f.roots, dialOptions{})
		if err != nil {
			b.Fatal(err)
		}
		cl.close()
	}
	b.StopTimer()
	s := c.Stats()
	if s.HandshakeTime.Count > 0 {
		b.ReportMetric(float64(s.HandshakeTime.Sum.Microseconds())/float64(s.HandshakeTime.Count)/1000, "server-ms/handshake")
	}
}
