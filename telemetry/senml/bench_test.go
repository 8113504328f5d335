package senml

import (
	"testing"
	"time"
)

// benchPacks are 50 records of a gateway's telemetry, five metrics every
// 10 s, as the agent sends them ("compact": one base name and base time)
// and resolved (every record whole).
func benchPacks(b *testing.B) map[string]Pack {
	metrics := []struct {
		name, unit string
		value      float64
	}{
		{"temp", "Cel", 21.5},
		{"hum", "%RH", 45.2},
		{"cpu/load", "/", 0.37},
		{"mem/used", "By", 123456789},
		{"link/rssi", "dBm", -67},
	}
	p := make(Pack, 50)
	p[0].BaseName = new("urn:dev:ow:10e2073a01080063:")
	p[0].BaseTime = new(1700000000.0)
	for i := range p {
		m := metrics[i%len(metrics)]
		r := &p[i]
		r.Name, r.Unit = m.name, m.unit
		r.Time = new(float64(i / len(metrics) * 10))
		r.Value = new(m.value + float64(i/len(metrics))*0.1)
		r.Seq = uint64(100000 + i)
	}
	resolved, err := p.Resolve(time.Now())
	if err != nil {
		b.Fatal(err)
	}
	return map[string]Pack{"compact": p, "resolved": resolved}
}

func BenchmarkEncode(b *testing.B) {
	for name, p := range benchPacks(b) {
		for _, f := range formats {
			b.Run(f.name+"/"+name, func(b *testing.B) {
				b.ReportAllocs()
				var out []byte
				for b.Loop() {
					var err error
					if out, err = f.enc(p); err != nil {
						b.Fatal(err)
					}
				}
				b.SetBytes(int64(len(out)))
				b.ReportMetric(float64(len(out))/float64(len(p)), "B/record")
			})
		}
	}
}

func BenchmarkDecode(b *testing.B) {
	for name, p := range benchPacks(b) {
		for _, f := range formats {
			in, err := f.enc(p)
			if err != nil {
				b.Fatal(err)
			}
			b.Run(f.name+"/"+name, func(b *testing.B) {
				b.ReportAllocs()
				b.SetBytes(int64(len(in)))
				for b.Loop() {
					if _, err := f.dec(in); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(len(in))/float64(len(p)), "B/record")
			})
		}
	}
}

// BenchmarkSplit cuts the compact pack into CoAP payloads.
func BenchmarkSplit(b *testing.B) {
	p := benchPacks(b)["compact"]
	for _, f := range formats {
		b.Run(f.name+"/1152", func(b *testing.B) {
			b.ReportAllocs()
			var chunks []Chunk
			for b.Loop() {
				var err error
				if chunks, err = p.Split(f.enc, 1152); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(len(chunks)), "chunks")
		})
	}
}

func BenchmarkResolve(b *testing.B) {
	p := benchPacks(b)["compact"]
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := p.Resolve(now); err != nil {
			b.Fatal(err)
		}
	}
}
