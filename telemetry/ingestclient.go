package telemetry

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"time"
)

// ingestAnswerTimeout bounds the wait for the agent's answer to a line.
const ingestAnswerTimeout = time.Minute

// IngestClient speaks the ingest protocol to a running agent: one SenML
// JSON pack per line, each answered "ok SEQ" once on disk or
// "error REASON". Not safe for concurrent use.
type IngestClient struct {
	c    net.Conn
	resp *bufio.Reader
}

// DialIngest connects to the agent's ingest socket.
func DialIngest(ctx context.Context, socket string) (*IngestClient, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		return nil, fmt.Errorf("connecting to the agent's ingest socket %s: %w (is iotagent run active?)", socket, netCause(err))
	}
	return &IngestClient{c: c, resp: bufio.NewReader(c)}, nil
}

// Close closes the connection.
func (ic *IngestClient) Close() error { return ic.c.Close() }

// answer reads the answer to one line: "ok SEQ", or the agent's refusal
// as an error.
func (ic *IngestClient) answer() (string, error) {
	ic.c.SetReadDeadline(time.Now().Add(ingestAnswerTimeout))
	ans, err := ic.resp.ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("reading the agent's answer: %w", err)
	}
	ans = strings.TrimSpace(ans)
	if msg, ok := strings.CutPrefix(ans, "error "); ok {
		return "", errors.New(msg)
	}
	return ans, nil
}

// Send sends one line and waits for its answer ("ok SEQ").
func (ic *IngestClient) Send(line string) (string, error) {
	ic.c.SetWriteDeadline(time.Now().Add(ingestAnswerTimeout))
	if _, err := io.WriteString(ic.c, line+"\n"); err != nil {
		return "", err
	}
	return ic.answer()
}

// SendAll sends every non-empty line of r, pipelined: lines are written as
// they come while the answers are read, so the agent can commit many in
// one fsync. answer is called with each line's number and its answer, in
// order. The first refusal ends it, as an error naming the line.
func (ic *IngestClient) SendAll(r io.Reader, answer func(line int, ans string)) error {
	queued := make(chan int, 4096)
	writeErr := make(chan error, 1)
	done := make(chan struct{})
	defer close(done)
	go func() {
		defer close(queued)
		sc := bufio.NewScanner(r)
		sc.Buffer(make([]byte, 0, 64<<10), MaxLine+1)
		n := 0
		for sc.Scan() {
			n++
			line := strings.TrimSpace(sc.Text())
			if line == "" {
				continue
			}
			ic.c.SetWriteDeadline(time.Now().Add(ingestAnswerTimeout))
			if _, err := io.WriteString(ic.c, line+"\n"); err != nil {
				writeErr <- fmt.Errorf("line %d: %w", n, err)
				return
			}
			select {
			case queued <- n:
			case <-done:
				return
			}
		}
		if err := sc.Err(); err != nil {
			writeErr <- fmt.Errorf("line %d: %w", n+1, err)
		}
	}()
	for n := range queued {
		ans, err := ic.answer()
		if err != nil {
			return fmt.Errorf("line %d: %w", n, err)
		}
		answer(n, ans)
	}
	select {
	case err := <-writeErr:
		return err
	default:
		return nil
	}
}

// netCause is the cause of a dial error without the operation and the
// address the caller names.
func netCause(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		err = oe.Err
	}
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}
