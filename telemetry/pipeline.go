package telemetry

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"iotagent.dev/iotagent/internal/backoff"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry/senml"
)

// PipelineConfig configures a Pipeline.
type PipelineConfig struct {
	Store  *store.Store
	Uplink Uplink
	// PeekRecords bounds how many records are read from the queue at once
	// (default 1000).
	PeekRecords int
	// AckDelay groups acknowledgements: delivered records are deleted from
	// the queue in one transaction at most this long after delivery
	// (default 100 ms). Flash is written once per group, not once per
	// message; a crash inside the window sends those records again
	// (duplicates, never a loss). Negative: delete at once.
	AckDelay time.Duration
	// RetryBase and RetryCap bound the wait before resending after a
	// delivery failed again with nothing delivered since the last failure
	// (a peer that answers but refuses each payload, a flapping link):
	// internal/backoff, defaults 500 ms and 1 min. A first failure is
	// resent at once; a delivery, or a new connection, resets the backoff.
	RetryBase time.Duration
	RetryCap  time.Duration
	Logger    *slog.Logger
	// OnDelivered is told about each acknowledged payload.
	OnDelivered func(records int, lastSeq uint64)
}

// Pipeline moves records from the durable queue to the uplink,
// at-least-once: a record leaves the queue only after the uplink's peer
// acknowledged the payload that carried it. After a failed delivery it
// waits for the deliveries in flight, then starts again from the oldest
// record still queued (duplicates are possible and carry their sequence
// numbers; losses are not).
type Pipeline struct {
	cfg PipelineConfig
	log *slog.Logger

	delivered atomic.Uint64
	corrupt   atomic.Uint64
	rejected  atomic.Uint64
	succeeded atomic.Bool  // a delivery succeeded since the last failure
	learned   atomic.Int64 // payload size the peer refused less than (ErrTooLarge), 0 if none
}

// budget is the payload size to cut to: the uplink's, or less if the peer
// refused payloads as too large.
func (p *Pipeline) budget(up Uplink) int {
	if l := p.learned.Load(); l > 0 && int(l) < up.MaxPayload() {
		return int(l)
	}
	return up.MaxPayload()
}

// NewPipeline checks cfg.
func NewPipeline(cfg PipelineConfig) (*Pipeline, error) {
	if cfg.Store == nil || cfg.Uplink == nil {
		return nil, errors.New("pipeline: store and uplink are required")
	}
	if cfg.PeekRecords == 0 {
		cfg.PeekRecords = 1000
	}
	if cfg.AckDelay == 0 {
		cfg.AckDelay = 100 * time.Millisecond
	}
	if cfg.RetryBase <= 0 {
		cfg.RetryBase = 500 * time.Millisecond
	}
	if cfg.RetryCap <= 0 {
		cfg.RetryCap = time.Minute
	}
	p := &Pipeline{cfg: cfg, log: cfg.Logger}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	return p, nil
}

// Delivered returns how many records were acknowledged.
func (p *Pipeline) Delivered() uint64 { return p.delivered.Load() }

// Corrupt returns how many queued records could not be decoded and were
// dropped.
func (p *Pipeline) Corrupt() uint64 { return p.corrupt.Load() }

// Rejected returns how many records the peer refused for good.
func (p *Pipeline) Rejected() uint64 { return p.rejected.Load() }

// acks collects sequence numbers to delete from the queue in groups.
type acks struct {
	flushing sync.Mutex // held through a whole flush
	mu       sync.Mutex
	pending  []uint64
}

func (a *acks) add(seqs []uint64) {
	a.mu.Lock()
	a.pending = append(a.pending, seqs...)
	a.mu.Unlock()
}

// flush deletes the pending records from the queue. On failure they stay
// queued and are sent again: a duplicate, never a loss.
func (p *Pipeline) flush(a *acks) {
	// A flush returns only when every ack handed over before it is
	// committed, whoever started that commit: the rewind after a failure
	// must not see records still being deleted.
	a.flushing.Lock()
	defer a.flushing.Unlock()
	a.mu.Lock()
	seqs := a.pending
	a.pending = nil
	a.mu.Unlock()
	if len(seqs) == 0 {
		return
	}
	if err := p.cfg.Store.Ack(seqs...); err != nil {
		p.log.Error("acknowledging delivered records", "err", err)
	}
}

// Run delivers until ctx ends; it returns nil then.
func (p *Pipeline) Run(ctx context.Context) error {
	up := p.cfg.Uplink
	window := max(up.Window(), 1)
	slots := make(chan struct{}, window)
	var wg sync.WaitGroup
	var failed atomic.Bool
	pending := &acks{}
	ackCtx, stopAcks := context.WithCancel(context.Background())
	acksDone := make(chan struct{})
	go func() {
		defer close(acksDone)
		if p.cfg.AckDelay < 0 {
			<-ackCtx.Done()
			return
		}
		t := time.NewTicker(p.cfg.AckDelay)
		defer t.Stop()
		for {
			select {
			case <-ackCtx.Done():
				return
			case <-t.C:
				p.flush(pending)
			}
		}
	}()
	defer func() {
		wg.Wait()
		stopAcks()
		<-acksDone
		p.flush(pending)
	}()

	// A failed delivery wakes the loop even while it waits for new
	// records, so the failed ones are sent again without waiting for more.
	var mu sync.Mutex
	var wake context.CancelFunc = func() {}
	fail := func() {
		failed.Store(true)
		mu.Lock()
		wake()
		mu.Unlock()
	}
	var cursor uint64
	retry := backoff.New(backoff.Config{Base: p.cfg.RetryBase, Cap: p.cfg.RetryCap})
	p.succeeded.Store(true) // a first failure is resent at once
	for {
		if failed.Load() {
			wg.Wait() // let the deliveries in flight finish
			p.flush(pending)
			failed.Store(false)
			cursor = 0 // acknowledged records are gone; resend the rest
			// Failing again with nothing delivered in between: the peer
			// answers but fails each payload (a collector whose sink is
			// down), or the link flaps. Back off before resending.
			if p.succeeded.Swap(false) {
				retry.Reset()
			} else if retry.Sleep(ctx, retry.Fail()) != nil {
				return nil
			}
		}
		waited := time.Now()
		if err := up.Ready(ctx); err != nil {
			return nil
		}
		if time.Since(waited) > 10*time.Millisecond {
			retry.Reset() // a new connection: its failures count afresh
		}
		waitCtx, cancel := context.WithCancel(ctx)
		mu.Lock()
		wake = cancel
		mu.Unlock()
		if failed.Load() {
			cancel()
		}
		err := p.cfg.Store.Wait(waitCtx, cursor)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		if err != nil {
			continue // woken by a failure
		}
		recs, err := p.cfg.Store.Peek(cursor, p.cfg.PeekRecords, 4<<20)
		if err != nil {
			return err
		}
		if len(recs) == 0 {
			continue
		}
		cursor = recs[len(recs)-1].Seq
		pack, bad := DecodeQueued(recs)
		if len(bad) > 0 {
			p.corrupt.Add(uint64(len(bad)))
			p.log.Error("dropping queued records that do not decode", "count", len(bad), "first_seq", bad[0])
			if err := p.cfg.Store.Ack(bad...); err != nil {
				return err
			}
		}
		if len(pack) == 0 {
			continue
		}
		chunks, err := pack.Split(up.Encode, p.budget(up))
		if err != nil {
			return err
		}
		for _, ch := range chunks {
			if failed.Load() {
				break
			}
			select {
			case slots <- struct{}{}:
			case <-ctx.Done():
				return nil
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer func() { <-slots }()
				if err := p.send(ctx, up, ch, pending); err != nil {
					if ctx.Err() == nil {
						p.log.Debug("delivery failed; will resend", "err", err, "records", len(ch.Records))
					}
					fail()
				}
			}()
		}
	}
}

// send delivers ch and hands its sequence numbers to pending. A payload
// the peer finds too large (ErrTooLarge: its limit is below ours) is sent
// again in halves; records the peer refuses for good (ErrRejected, or one
// record too large alone) are dropped, counted and logged. Any other
// error means: resend.
func (p *Pipeline) send(ctx context.Context, up Uplink, ch senml.Chunk, pending *acks) error {
	err := up.Deliver(ctx, ch.Data)
	if errors.Is(err, ErrTooLarge) && len(ch.Records) > 1 {
		half := len(ch.Data) / 2
		halves, serr := ch.Records.Split(up.Encode, half)
		if serr != nil {
			return serr
		}
		// Remember the peer's limit: later payloads are cut to it.
		for cur := p.learned.Load(); cur == 0 || int64(half) < cur; cur = p.learned.Load() {
			if p.learned.CompareAndSwap(cur, int64(half)) {
				p.log.Warn("the peer refused a payload as too large; payloads are cut smaller from now on (lower [uplink] max_payload)",
					"bytes", len(ch.Data), "now", half, "err", err)
				break
			}
		}
		for _, h := range halves {
			if err := p.send(ctx, up, h, pending); err != nil {
				return err
			}
		}
		return nil
	}
	if errors.Is(err, ErrRejected) || errors.Is(err, ErrTooLarge) {
		p.rejected.Add(uint64(len(ch.Records)))
		p.log.Error("the peer refused records for good; dropping them", "records", len(ch.Records), "err", err)
		if aerr := p.cfg.Store.Ack(ch.Seqs()...); aerr != nil {
			p.log.Error("dropping refused records", "err", aerr)
		}
		return nil
	}
	if err != nil {
		return err
	}
	seqs := ch.Seqs()
	pending.add(seqs)
	if p.cfg.AckDelay < 0 {
		p.flush(pending)
	}
	p.delivered.Add(uint64(len(seqs)))
	p.succeeded.Store(true)
	if p.cfg.OnDelivered != nil {
		p.cfg.OnDelivered(len(seqs), seqs[len(seqs)-1])
	}
	return nil
}
