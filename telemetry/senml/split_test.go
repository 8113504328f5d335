package senml

import (
	"errors"
	"fmt"
	"math/bits"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"
)

// splitPack is a pack that exercises every base field: base names, times,
// units, values and sums change along it, and records of every value type
// follow them.
func splitPack(n int, version int) Pack {
	names := []string{"temp", "hum", "cpu/load", "mem/used", "link:rssi"}
	p := make(Pack, n)
	for i := range p {
		r := &p[i]
		r.Seq = uint64(1000 + i)
		r.Name = names[i%len(names)]
		if i%3 != 0 {
			r.Time = new(float64(i % 17))
		}
		switch i % 7 {
		case 0, 1, 2:
			r.Value = new(float64(i) * 1.25)
		case 3:
			r.StringValue = new(fmt.Sprintf("state %d", i))
		case 4:
			r.BoolValue = new(i%2 == 0)
		case 5:
			r.DataValue = []byte(strings.Repeat("d", i%11))
		case 6:
			r.Sum = new(float64(i))
		}
		if i%13 == 0 {
			r.BaseName = new(fmt.Sprintf("urn:dev:gw%d:", i))
			r.BaseTime = new(1.7e9 + float64(i))
			r.BaseUnit = new([]string{"Cel", "%RH", ""}[i%3])
		}
		if i%29 == 5 {
			r.BaseValue = new(float64(i))
			r.BaseSum = new(0.0)
		}
	}
	if version != 0 {
		p[0].BaseVersion = new(version)
	}
	return p
}

type format struct {
	name string
	enc  func(Pack) ([]byte, error)
	dec  func([]byte) (Pack, error)
}

var formats = []format{
	{"JSON", Pack.EncodeJSON, ParseJSON},
	{"CBOR", Pack.EncodeCBOR, DecodeCBOR},
}

func TestSplit(t *testing.T) {
	now := time.Unix(1700000000, 0)
	for _, version := range []int{0, 5} {
		p := splitPack(200, version)
		resolved, err := p.Resolve(now)
		if err != nil {
			t.Fatal(err)
		}
		want := make(map[uint64]Record)
		for _, r := range resolved {
			want[r.Seq] = r
		}
		for _, f := range formats {
			for _, budget := range []int{1, 40, 100, 250, 1152, 4096, 1 << 20} {
				t.Run(fmt.Sprintf("bver %d/%s/%d", version, f.name, budget), func(t *testing.T) {
					calls := 0
					enc := func(q Pack) ([]byte, error) { calls++; return f.enc(q) }
					chunks, err := p.Split(enc, budget)
					if err != nil {
						t.Fatalf("Split error: %v", err)
					}
					checkChunks(t, p, chunks, f, budget)
					for _, c := range chunks {
						q, err := f.dec(c.Data)
						if err != nil {
							t.Fatal(err)
						}
						rq, err := q.Resolve(now)
						if err != nil {
							t.Fatal(err)
						}
						for _, r := range rq {
							if !reflect.DeepEqual(r, want[r.Seq]) {
								t.Errorf("record %d resolved from its chunk = %s, from the pack %s", r.Seq, mustJSON(t, Pack{r}), mustJSON(t, Pack{want[r.Seq]}))
							}
						}
					}
					// A few encodings per chunk, not one per record.
					if limit := len(chunks) * (2*bits.Len(uint(len(p))) + 2); calls > limit {
						t.Errorf("Split called enc %d times for %d chunks, want at most %d", calls, len(chunks), limit)
					}
					t.Logf("%d chunks, %d encodings", len(chunks), calls)
				})
			}
		}
	}
}

// checkChunks checks that the chunks cover p in order, each record once,
// that each fits the budget unless it holds one record, that each is full,
// and that each decodes to as many records with the same sequence numbers.
func checkChunks(t *testing.T, p Pack, chunks []Chunk, f format, budget int) {
	t.Helper()
	var b bases
	i := 0
	for k, c := range chunks {
		n := len(c.Records)
		if n == 0 {
			t.Fatalf("chunk %d has no records", k)
		}
		if i+n > len(p) || &c.Records[0] != &p[i] {
			t.Fatalf("chunk %d does not hold p[%d:%d]", k, i, i+n)
		}
		if len(c.Data) > budget && n > 1 {
			t.Errorf("chunk %d: %d records in %d bytes, over the budget %d", k, n, len(c.Data), budget)
		}
		q, err := f.dec(c.Data)
		if err != nil {
			t.Fatalf("chunk %d does not decode: %v", k, err)
		}
		seqs := make([]uint64, n)
		for j := range q {
			seqs[j] = q[j].Seq
		}
		if got, want := c.Seqs(), seqs; !slices.Equal(got, want) {
			t.Errorf("chunk %d: Seqs() = %v, want the decoded %v", k, got, want)
		}
		if k < len(chunks)-1 {
			more := slices.Clone(p[i : i+n+1])
			more[0] = b.rebase(more[0])
			enc, err := f.enc(more)
			if err != nil {
				t.Fatal(err)
			}
			if len(enc) <= budget {
				t.Errorf("chunk %d is not full: %d records take %d bytes of %d", k, n+1, len(enc), budget)
			}
		}
		for j := i; j < i+n; j++ {
			b.apply(&p[j])
		}
		i += n
	}
	if i != len(p) {
		t.Errorf("chunks hold %d records, want %d", i, len(p))
	}
}

func TestSplitOversize(t *testing.T) {
	p := splitPack(10, 0)
	p[4].BoolValue, p[4].StringValue = nil, new(strings.Repeat("x", 2000))
	for _, f := range formats {
		t.Run(f.name, func(t *testing.T) {
			chunks, err := p.Split(f.enc, 1152)
			if err != nil {
				t.Fatal(err)
			}
			checkChunks(t, p, chunks, f, 1152)
			var lone *Chunk
			for k := range chunks {
				if len(chunks[k].Data) > 1152 {
					lone = &chunks[k]
				}
			}
			if lone == nil || len(lone.Records) != 1 || lone.Records[0].Seq != p[4].Seq {
				t.Errorf("Split = %d chunks, want record %d alone in one over the budget", len(chunks), p[4].Seq)
			}
		})
	}
}

func TestSplitArguments(t *testing.T) {
	if c, err := Pack(nil).Split(Pack.EncodeCBOR, 100); c != nil || err != nil {
		t.Errorf("Split(empty) = %v, %v, want nil, nil", c, err)
	}
	p := splitPack(3, 0)
	if c, err := p.Split(Pack.EncodeCBOR, 0); err == nil {
		t.Errorf("Split(budget 0) = %v, nil, want an error", c)
	}
	bad := Pack{{Name: "a"}}
	if c, err := bad.Split(Pack.EncodeCBOR, 100); !errors.Is(err, ErrInvalid) {
		t.Errorf("Split(invalid) = %v, %v, want ErrInvalid", c, err)
	}
	failing := errors.New("encoder broke")
	_, err := p.Split(func(Pack) ([]byte, error) { return nil, failing }, 100)
	if !errors.Is(err, failing) || !strings.Contains(err.Error(), "senml: encoding records 0 to 0") {
		t.Errorf("Split(failing encoder) = %v, want it wrapped", err)
	}
}
