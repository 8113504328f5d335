package telemetry

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"iotagent.dev/iotagent/internal/unixsock"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry/senml"
)

// DefaultSocket is where local producers find the agent.
const DefaultSocket = "/run/iotagent/ingest.sock"

// MaxLine bounds one ingest line: a SenML JSON pack.
const MaxLine = 64 << 10

// IngestConfig configures the local ingest socket. Zero values mean the
// defaults.
type IngestConfig struct {
	// Socket is the unix socket path (default DefaultSocket). Its directory
	// is created 0750 if missing; the socket is 0660 from the moment it
	// appears, so that only the agent's user and a producers' group can
	// write.
	Socket string
	Store  *store.Store
	// Now resolves SenML times given relative to "now" (the agent's
	// trusted clock; default time.Now).
	Now func() time.Time
	// MaxConns bounds concurrent producer connections (default 64).
	MaxConns int
	// IdleTimeout closes a connection with nothing to say (default 5 min).
	IdleTimeout time.Duration
	// GroupDelay, when positive, holds each line up to this long for more
	// lines from the same producer before committing them together. Every
	// commit fsyncs and rewrites B+tree pages (measured ~34 KB of writes on
	// ext4): a producer streaming single-record lines at 1000/s would write
	// ~34 MB/s to flash without it. The cost is up to GroupDelay of latency
	// per line. Zero (the default) commits at once.
	GroupDelay time.Duration
	Logger     *slog.Logger
	// OnIngest, when set, is told how many records each accepted line
	// stored.
	OnIngest func(records int)
}

// Ingest serves the local ingest protocol on a unix socket: one SenML JSON
// pack per line, answered "ok SEQ" once every record of the line is
// committed to disk (SEQ is the sequence number of its last record), or
// "error REASON" with nothing stored and nothing evicted.
//
// A line is refused if it is over MaxLine bytes, breaks a limit of
// package senml (its fields' lengths, or what it resolves to:
// senml.MaxResolvedSize) or would take more than an eighth of the queue's
// bound; a line that passes evicts at most that much under the drop-oldest
// policy, whatever its base fields expand to.
type Ingest struct {
	cfg   IngestConfig
	log   *slog.Logger
	ready chan struct{}
}

// NewIngest checks cfg and fills defaults.
func NewIngest(cfg IngestConfig) (*Ingest, error) {
	if cfg.Store == nil {
		return nil, errors.New("ingest: no store")
	}
	if cfg.Socket == "" {
		cfg.Socket = DefaultSocket
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.MaxConns == 0 {
		cfg.MaxConns = 64
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = 5 * time.Minute
	}
	i := &Ingest{cfg: cfg, log: cfg.Logger, ready: make(chan struct{})}
	if i.log == nil {
		i.log = slog.New(slog.DiscardHandler)
	}
	return i, nil
}

// Ready is closed once Run listens on the socket.
func (i *Ingest) Ready() <-chan struct{} { return i.ready }

// Socket returns the socket path.
func (i *Ingest) Socket() string { return i.cfg.Socket }

// listen creates the socket, 0660 from the first moment it is reachable
// (internal/unixsock).
func (i *Ingest) listen() (*net.UnixListener, error) {
	path := i.cfg.Socket
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, fmt.Errorf("ingest socket directory: %w", err)
	}
	// One that answers belongs to a running agent.
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("ingest socket %s is in use by another agent", path)
	}
	l, err := unixsock.Listen(path, 0o660)
	if err != nil {
		return nil, fmt.Errorf("ingest socket: %w", err)
	}
	return l, nil
}

// Run serves until ctx ends, then closes the socket and waits for the
// connections it serves to finish their current line.
func (i *Ingest) Run(ctx context.Context) error {
	l, err := i.listen()
	if err != nil {
		return err
	}
	defer func() {
		l.Close()
		os.Remove(i.cfg.Socket)
	}()
	close(i.ready)
	var wg sync.WaitGroup
	conns := make(chan struct{}, i.cfg.MaxConns)
	go func() {
		<-ctx.Done()
		l.Close()
	}()
	for {
		c, err := l.AcceptUnix()
		if err != nil {
			if ctx.Err() != nil {
				wg.Wait()
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			wg.Wait()
			return fmt.Errorf("ingest: %w", err)
		}
		select {
		case conns <- struct{}{}:
		default:
			c.Write([]byte("error too many connections\n"))
			c.Close()
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-conns }()
			i.serve(ctx, c)
		}()
	}
}

// maxGroup bounds how many pipelined lines one connection commits in one
// transaction.
const maxGroup = 256

func (i *Ingest) serve(ctx context.Context, c *net.UnixConn) {
	defer c.Close()
	dl := &readDeadline{c: c}
	stop := context.AfterFunc(ctx, dl.stop)
	defer stop()
	r := bufio.NewReaderSize(c, 4096)
	w := bufio.NewWriter(c)
	for {
		dl.set(time.Now().Add(i.cfg.IdleTimeout))
		// A producer that pipelines lines gets them committed together:
		// one fsync for the group, each line still answered only once its
		// records are on disk.
		var group [][]byte
		var until time.Time
		for len(group) < maxGroup {
			if len(group) > 0 && !lineBuffered(r) {
				if i.cfg.GroupDelay <= 0 || !i.moreBy(dl, r, until) {
					break
				}
			}
			line, err := readLine(r, MaxLine)
			if errors.Is(err, errLineTooLong) {
				group = append(group, nil) // answered as oversize
				continue
			}
			if err != nil {
				if len(group) > 0 {
					break
				}
				if !errors.Is(err, io.EOF) && ctx.Err() == nil && !isTimeout(err) {
					i.log.Debug("ingest connection", "err", err)
				}
				return
			}
			if line = bytes.TrimSpace(line); len(line) > 0 {
				if len(group) == 0 {
					until = time.Now().Add(i.cfg.GroupDelay)
				}
				group = append(group, line)
			}
		}
		dl.set(time.Now().Add(i.cfg.IdleTimeout))
		for _, ans := range i.handle(ctx, group) {
			fmt.Fprintln(w, ans)
		}
		if w.Flush() != nil {
			return
		}
	}
}

// moreBy waits until a whole line is buffered or the time until passes,
// without consuming anything: a line half arrived stays in the buffer.
func (i *Ingest) moreBy(dl *readDeadline, r *bufio.Reader, until time.Time) bool {
	dl.set(until)
	for !lineBuffered(r) {
		if r.Buffered() == r.Size() {
			return false // a line longer than the buffer: read it normally
		}
		if _, err := r.Peek(r.Buffered() + 1); err != nil {
			return false
		}
	}
	return true
}

// readDeadline sets a connection's read deadline, except once the ingest
// is stopping: then reads end at once. Every deadline goes through it, so
// a later deadline cannot undo the stop (a producer that stays connected
// would otherwise hold up the agent's shutdown until IdleTimeout).
type readDeadline struct {
	mu      sync.Mutex
	c       *net.UnixConn
	stopped bool
}

func (d *readDeadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.stopped {
		t = time.Now()
	}
	d.c.SetReadDeadline(t)
}

func (d *readDeadline) stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.stopped = true
	d.c.SetReadDeadline(time.Now())
}

// lineBuffered reports whether a whole line is already buffered, so that
// reading it will not block.
func lineBuffered(r *bufio.Reader) bool {
	b, _ := r.Peek(r.Buffered())
	return bytes.IndexByte(b, '\n') >= 0
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

var errLineTooLong = errors.New("line too long")

// readLine reads one line of at most max bytes. A longer line is consumed
// up to its end and reported as errLineTooLong, so the next line is read
// normally.
func readLine(r *bufio.Reader, max int) ([]byte, error) {
	var line []byte
	for {
		chunk, err := r.ReadSlice('\n')
		if len(line)+len(chunk) > max+1 {
			// Drain the rest of the oversize line.
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = r.ReadSlice('\n')
			}
			if err != nil && !errors.Is(err, bufio.ErrBufferFull) {
				return nil, err
			}
			return nil, errLineTooLong
		}
		line = append(line, chunk...)
		switch {
		case err == nil:
			return line, nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF) && len(line) > 0:
			return line, nil
		default:
			return nil, err
		}
	}
}

// queueShare is the largest part of the queue's bound that one line, and
// one append of pipelined lines, may take: the queue's bound over
// queueShare. Under the drop-oldest policy an append evicts as much as it
// adds, so no line, however it expands, evicts more than an eighth of the
// queue. A line resolves to at most senml.MaxResolvedSize, which costs at
// most 1.24 MB in the queue (23 bytes a record more: the queue's overhead
// and each payload's head, for at most MaxLine/8 records), far below an
// eighth of the default 64 MiB: the share is what bounds a line in a small
// queue.
const queueShare = 8

// handle stores the records of lines (nil: a line over MaxLine) and
// returns one answer per line, in order. The lines are appended together,
// in as few appends as keep each within the queue's share.
func (i *Ingest) handle(ctx context.Context, lines [][]byte) []string {
	answers := make([]string, len(lines))
	share := i.cfg.Store.MaxBytes() / queueShare
	var b batch
	now := i.cfg.Now()
	for k, line := range lines {
		if line == nil {
			answers[k] = fmt.Sprintf("error line over %d bytes", MaxLine)
			continue
		}
		p, err := EncodeForQueue(line, now)
		if err != nil {
			answers[k] = "error " + err.Error()
			continue
		}
		var cost int64
		for _, r := range p {
			cost += int64(len(r)) + store.RecordOverhead
		}
		if cost > share {
			answers[k] = fmt.Sprintf("error pack takes %d bytes of the queue, more than an eighth of its %d", cost, i.cfg.Store.MaxBytes())
			continue
		}
		if b.cost+cost > share {
			i.store(ctx, &b, answers)
		}
		b.lines = append(b.lines, k)
		b.counts = append(b.counts, len(p))
		b.payloads = append(b.payloads, p...)
		b.cost += cost
	}
	i.store(ctx, &b, answers)
	return answers
}

// batch is lines to append at once.
type batch struct {
	lines    []int // their indexes
	counts   []int // the records of each
	payloads [][]byte
	cost     int64 // what they count against the queue's bound
}

// store appends b's records in one append, answers its lines and empties
// it.
func (i *Ingest) store(ctx context.Context, b *batch, answers []string) {
	if len(b.lines) == 0 {
		return
	}
	first, _, err := i.cfg.Store.Append(ctx, b.payloads...)
	var fail string
	switch {
	case err == nil:
	case errors.Is(err, store.ErrFull):
		fail = "error queue full"
	case errors.Is(err, syscall.ENOSPC):
		fail = "error disk full: nothing stored"
	case errors.Is(err, store.ErrTooLarge):
		fail = "error record larger than the queue"
	default:
		i.log.Error("ingest: storing records", "err", err)
		fail = "error storing records: " + err.Error()
	}
	next := first
	for j, k := range b.lines {
		if fail != "" {
			answers[k] = fail
			continue
		}
		next += uint64(b.counts[j])
		answers[k] = fmt.Sprintf("ok %d", next-1)
	}
	if fail == "" && i.cfg.OnIngest != nil {
		i.cfg.OnIngest(len(b.payloads))
	}
	*b = batch{lines: b.lines[:0], counts: b.counts[:0]}
}

// EncodeForQueue validates a SenML JSON pack, resolves it (absolute times,
// base fields applied, at most senml.MaxResolvedSize) at now and returns
// one queue payload per record: each a single-record SenML CBOR pack,
// compact on flash.
func EncodeForQueue(jsonPack []byte, now time.Time) ([][]byte, error) {
	p, err := senml.ParseJSON(jsonPack)
	if err != nil {
		return nil, err
	}
	return encodeResolved(p, now)
}

func encodeResolved(p senml.Pack, now time.Time) ([][]byte, error) {
	r, err := p.Resolve(now)
	if err != nil {
		return nil, err
	}
	if len(r) == 0 {
		return nil, errors.New("senml: the pack holds no measurement")
	}
	out := make([][]byte, len(r))
	for k := range r {
		r[k].Seq = 0
		b, err := senml.Pack{r[k]}.EncodeCBOR()
		if err != nil {
			return nil, err
		}
		out[k] = b
	}
	return out, nil
}

// DecodeQueued turns queued records back into SenML records stamped with
// their sequence numbers. A record that does not decode (damaged on flash)
// is returned in bad, to be dropped and counted rather than block the
// queue forever.
func DecodeQueued(recs []store.Record) (p senml.Pack, bad []uint64) {
	p = make(senml.Pack, 0, len(recs))
	for _, r := range recs {
		one, err := senml.DecodeCBOR(r.Data)
		if err != nil || len(one) != 1 {
			bad = append(bad, r.Seq)
			continue
		}
		one[0].Seq = r.Seq
		p = append(p, one[0])
	}
	return p, bad
}
