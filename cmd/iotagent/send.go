package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"iotagent.dev/iotagent/telemetry"
)

// cmdSend writes records to the running agent's ingest socket: one
// measurement from flags, or SenML JSON packs from stdin ("-"), one per
// line. Each line is answered once it is on disk.
func cmdSend(ctx context.Context, e *env, args []string) error {
	fs := e.flagSet("send")
	socket := fs.String("socket", telemetry.DefaultSocket, "ingest socket `PATH`")
	name := fs.String("name", "", "measurement `NAME` (SenML n)")
	value := fs.String("value", "", "`VALUE`: a number, true/false, or a string")
	unit := fs.String("unit", "", "`UNIT` (SenML u, e.g. Cel, %RH, W)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	stdin := fs.NArg() == 1 && fs.Arg(0) == "-"
	if fs.NArg() > 0 && !stdin {
		return usagef("send: unexpected argument %q (use - to read SenML from stdin)", fs.Arg(0))
	}
	var lines []string
	switch {
	case stdin && *name != "":
		return usagef("send: give --name/--value or -, not both")
	case stdin:
	case *name == "" || *value == "":
		return usagef("send: --name and --value are required (or - to read SenML JSON lines from stdin)")
	default:
		rec := map[string]any{"n": *name}
		if *unit != "" {
			rec["u"] = *unit
		}
		if v, err := strconv.ParseFloat(*value, 64); err == nil {
			rec["v"] = v
		} else if b, err := strconv.ParseBool(*value); err == nil {
			rec["vb"] = b
		} else {
			rec["vs"] = *value
		}
		b, _ := json.Marshal([]any{rec})
		lines = []string{string(b)}
	}
	d := net.Dialer{Timeout: 5 * time.Second}
	c, err := d.DialContext(ctx, "unix", *socket)
	if err != nil {
		return fmt.Errorf("connecting to the agent's ingest socket %s: %w (is iotagent run active?)", *socket, unwrapOp(err))
	}
	defer c.Close()
	resp := bufio.NewReader(c)
	send := func(line string) error {
		c.SetDeadline(time.Now().Add(time.Minute))
		if _, err := io.WriteString(c, line+"\n"); err != nil {
			return err
		}
		ans, err := resp.ReadString('\n')
		if err != nil {
			return fmt.Errorf("reading the agent's answer: %w", err)
		}
		ans = strings.TrimSpace(ans)
		if msg, ok := strings.CutPrefix(ans, "error "); ok {
			return errors.New(msg)
		}
		fmt.Fprintln(e.stdout, ans)
		return nil
	}
	if !stdin {
		return send(lines[0])
	}
	// Lines from stdin are pipelined: written as they come while the
	// answers are read, so the agent can commit many in one fsync. The
	// answers come back in order.
	type sent struct{ n int }
	queued := make(chan sent, 4096)
	writeErr := make(chan error, 1)
	done := make(chan struct{})
	defer close(done)
	go func() {
		defer close(queued)
		sc := bufio.NewScanner(e.stdin)
		sc.Buffer(make([]byte, 0, 64<<10), telemetry.MaxLine+1)
		n := 0
		for sc.Scan() {
			n++
			line := strings.TrimSpace(sc.Text())
			if line == "" {
				continue
			}
			c.SetWriteDeadline(time.Now().Add(time.Minute))
			if _, err := io.WriteString(c, line+"\n"); err != nil {
				writeErr <- fmt.Errorf("line %d: %w", n, err)
				return
			}
			select {
			case queued <- sent{n}:
			case <-done:
				return
			}
		}
		if err := sc.Err(); err != nil {
			writeErr <- fmt.Errorf("line %d: %w", n+1, err)
		}
	}()
	for q := range queued {
		c.SetReadDeadline(time.Now().Add(time.Minute))
		ans, err := resp.ReadString('\n')
		if err != nil {
			return fmt.Errorf("line %d: reading the agent's answer: %w", q.n, err)
		}
		ans = strings.TrimSpace(ans)
		if msg, ok := strings.CutPrefix(ans, "error "); ok {
			return fmt.Errorf("line %d: %s", q.n, msg)
		}
		fmt.Fprintln(e.stdout, ans)
	}
	select {
	case err := <-writeErr:
		return err
	default:
		return nil
	}
}

func unwrapOp(err error) error {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return unwrapPath(oe.Err)
	}
	return err
}
