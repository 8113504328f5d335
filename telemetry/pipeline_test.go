package telemetry

import (
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry/senml"
)

// flakyUplink is a scripted Uplink: it takes every payload (as a broker
// would) but reports failure for a seeded share of them, as when a PUBACK
// or the link is lost after the broker got the message.
type flakyUplink struct {
	mu       sync.Mutex
	rng      *rand.Rand
	failRate float64
	got      map[uint64]int // seq -> times received
	inflight int
	maxIn    int
}

func (u *flakyUplink) Ready(ctx context.Context) error     { return ctx.Err() }
func (u *flakyUplink) Encode(p senml.Pack) ([]byte, error) { return p.EncodeCBOR() }
func (u *flakyUplink) MaxPayload() int                     { return 1152 }
func (u *flakyUplink) Window() int                         { return 4 }
func (u *flakyUplink) Deliver(ctx context.Context, b []byte) error {
	p, err := senml.DecodeCBOR(b)
	if err != nil {
		return err
	}
	u.mu.Lock()
	u.inflight++
	u.maxIn = max(u.maxIn, u.inflight)
	for _, r := range p {
		u.got[r.Seq]++
	}
	fail := u.rng.Float64() < u.failRate
	u.mu.Unlock()
	time.Sleep(time.Millisecond)
	u.mu.Lock()
	u.inflight--
	u.mu.Unlock()
	if fail {
		return errors.New("PUBACK lost")
	}
	return nil
}

func TestPipelineAtLeastOnce(t *testing.T) {
	q, err := store.Open(store.Options{Path: filepath.Join(t.TempDir(), "q.db")})
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	up := &flakyUplink{rng: rand.New(rand.NewPCG(7, 7)), failRate: 0.2, got: map[uint64]int{}}
	p, err := NewPipeline(PipelineConfig{Store: q, Uplink: up})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()

	const producers, each = 4, 500
	var wg sync.WaitGroup
	for w := range producers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				b, _ := senml.Pack{{Name: "w", Value: ptr(float64(w*each + i)), Time: ptr(1.8e9)}}.EncodeCBOR()
				if _, _, err := q.Append(context.Background(), b); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	deadline := time.Now().Add(30 * time.Second)
	for q.Stats().Depth > 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run = %v", err)
	}
	if d := q.Stats().Depth; d != 0 {
		t.Fatalf("%d records never acknowledged", d)
	}
	up.mu.Lock()
	defer up.mu.Unlock()
	dups := 0
	for seq := uint64(1); seq <= producers*each; seq++ {
		switch n := up.got[seq]; {
		case n == 0:
			t.Errorf("seq %d never delivered", seq)
		case n > 1:
			dups += n - 1
		}
	}
	if up.maxIn > up.Window() {
		t.Errorf("%d deliveries in flight, window is %d", up.maxIn, up.Window())
	}
	if p.Delivered() != producers*each {
		t.Errorf("Delivered = %d, want %d", p.Delivered(), producers*each)
	}
	t.Logf("%d records, %d duplicates after 20%% failed deliveries, at most %d in flight", producers*each, dups, up.maxIn)
}

func ptr[T any](v T) *T { return &v }
