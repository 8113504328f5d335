package store

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// A test that needs another process runs this test binary again with
// -test.run set to itself and childModeEnv set to the mode the child plays;
// the test function sees the variable and plays that part instead.
const (
	childModeEnv  = "STORE_TEST_CHILD"
	childPathEnv  = "STORE_TEST_PATH"
	childRoundEnv = "STORE_TEST_ROUND"
)

type child struct {
	cmd    *exec.Cmd
	stdout *bufio.Scanner
	stdin  io.WriteCloser
	stderr *bytes.Buffer
}

func startChild(ctx context.Context, t *testing.T, mode, path string, env ...string) *child {
	t.Helper()
	test := strings.SplitN(t.Name(), "/", 2)[0]
	cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^"+test+"$", "-test.count=1", "-test.timeout=60s")
	cmd.Env = append(os.Environ(), append(env, childModeEnv+"="+mode, childPathEnv+"="+path)...)
	c := &child{cmd: cmd, stderr: new(bytes.Buffer)}
	cmd.Stderr = c.stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if c.stdin, err = cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting child %s: %v", mode, err)
	}
	c.stdout = bufio.NewScanner(out)
	return c
}

func killedBySIGKILL(err error) bool {
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return false
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

// childFail ends a child process: its stderr is what the parent reports.
func childFail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(2)
}

// TestCrashSafety kills a process that appends in a loop with SIGKILL, three
// times on the same file, and checks that every record the child had been
// told was durable is in the file, with its content, and that the file and
// its counters are consistent.
//
// SIGKILL loses what the process held, not the kernel's page cache: this
// checks bbolt's commit protocol and ours (counters, sequence numbers), not
// the flash's honesty about flushes.
func TestCrashSafety(t *testing.T) {
	if os.Getenv(childModeEnv) == "append" {
		appendForever(os.Getenv(childPathEnv), os.Getenv(childRoundEnv))
		return
	}
	leakCheck(t)
	ctx := testCtx(t)
	path := filepath.Join(t.TempDir(), "queue.db")
	durable := map[uint64]string{} // seq → payload, as reported by the children
	for round, killAfter := range []int{100, 250, 400} {
		c := startChild(ctx, t, "append", path, fmt.Sprintf("%s=%d", childRoundEnv, round))
		calls := 0
		for c.stdout.Scan() {
			var first, last uint64
			var id string
			if n, _ := fmt.Sscanf(c.stdout.Text(), "%d %d %s", &first, &last, &id); n != 3 {
				continue
			}
			for seq := first; seq <= last; seq++ {
				data := fmt.Sprintf("%s-j%d", id, seq-first)
				if prev, dup := durable[seq]; dup {
					t.Fatalf("round %d: seq %d reported for %s and earlier for %s", round, seq, data, prev)
				}
				durable[seq] = data
			}
			if calls++; calls == killAfter {
				c.cmd.Process.Kill()
			}
		}
		if err := c.cmd.Wait(); !killedBySIGKILL(err) || calls < killAfter {
			t.Fatalf("round %d: child ended with %v after %d Appends, want SIGKILL after %d; stderr:\n%s", round, err, calls, killAfter, c.stderr)
		}
	}

	s := openT(t, Options{Path: path})
	checkFile(t, s)
	have := map[uint64]string{}
	for _, r := range all(t, s) {
		have[r.Seq] = string(r.Data)
	}
	lost := 0
	for seq, want := range durable {
		if got, ok := have[seq]; !ok || got != want {
			if lost++; lost <= 10 {
				t.Errorf("record %d = %q (present %v), want %q: reported durable before the kill", seq, got, ok, want)
			}
		}
	}
	if lost > 0 {
		t.Errorf("%d of %d durable records lost or changed", lost, len(durable))
	}
	t.Logf("3 kills: %d records reported durable, %d in the file", len(durable), len(have))
}

// appendForever is the child of TestCrashSafety: four goroutines append
// batches of 1 to 8 records and print "first last id" for each Append that
// returned nil, until the process is killed.
func appendForever(path, round string) {
	s, err := Open(Options{Path: path})
	if err != nil {
		childFail("child: %v", err)
	}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := 0; ; i++ {
				id := fmt.Sprintf("r%s-g%d-i%d", round, g, i)
				ps := make([][]byte, 1+(g+i)%8)
				for j := range ps {
					ps[j] = fmt.Appendf(nil, "%s-j%d", id, j)
				}
				first, last, err := s.Append(context.Background(), ps...)
				if err != nil {
					childFail("child: %v", err)
				}
				mu.Lock()
				fmt.Printf("%d %d %s\n", first, last, id)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
}

func TestOpenLocked(t *testing.T) {
	if os.Getenv(childModeEnv) == "hold" {
		holdUntilStdinCloses(os.Getenv(childPathEnv))
		return
	}
	leakCheck(t)
	const timeout = 300 * time.Millisecond
	for _, tc := range []struct {
		name string
		hold func(t *testing.T, path string) (release func())
	}{
		{"same process", func(t *testing.T, path string) func() {
			s := openT(t, Options{Path: path})
			return func() { s.Close() }
		}},
		{"other process", func(t *testing.T, path string) func() {
			c := startChild(testCtx(t), t, "hold", path)
			if !c.stdout.Scan() || c.stdout.Text() != "ready" {
				t.Fatalf("child did not open the store: %q; stderr:\n%s", c.stdout.Text(), c.stderr)
			}
			return func() {
				c.stdin.Close()
				if err := c.cmd.Wait(); err != nil {
					t.Errorf("child holding the store: %v; stderr:\n%s", err, c.stderr)
				}
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "queue.db")
			release := tc.hold(t, path)
			start := time.Now()
			s, err := Open(Options{Path: path, OpenTimeout: timeout})
			took := time.Since(start)
			if err == nil {
				s.Close()
				t.Fatalf("second Open(%s) = nil error, want ErrLocked", path)
			}
			if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "locked") {
				t.Errorf("second Open = %v, want ErrLocked naming %s", err, path)
			}
			if took < timeout-100*time.Millisecond || took > timeout+5*time.Second {
				t.Errorf("second Open failed after %v, want about OpenTimeout %v", took, timeout)
			}
			release()
			s = openT(t, Options{Path: path, OpenTimeout: timeout})
			s.Close()
		})
	}
}

// holdUntilStdinCloses is the child of TestOpenLocked.
func holdUntilStdinCloses(path string) {
	s, err := Open(Options{Path: path})
	if err != nil {
		childFail("child: %v", err)
	}
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin)
	if err := s.Close(); err != nil {
		childFail("child: %v", err)
	}
}
