// Package leakcheck fails a test that leaves goroutines running: the
// project's rule that whoever starts a goroutine stops it, checked. For
// tests only.
package leakcheck

import (
	"runtime"
	"strings"
	"testing"
	"time"
)

// Check fails t if, once every cleanup registered after it has run (the
// test's clients closed, its servers stopped), goroutines whose stacks
// mention any of substrings are still running after wait. Libraries may
// take a moment to see a close, so it polls until then. Call it first in
// a test, so that its cleanup runs last.
//
// Pick substrings that name the code under test ("iotagent/store.(*Store)",
// "pion/dtls"); a test package's own functions ("iotagent/store.Test")
// name the goroutines its tests started.
func Check(t testing.TB, wait time.Duration, substrings ...string) {
	t.Helper()
	t.Cleanup(func() {
		deadline := time.Now().Add(wait)
		for {
			left := Goroutines(substrings...)
			if len(left) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Errorf("goroutines left running after %v:\n%s", wait, strings.Join(left, "\n\n"))
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// Goroutines returns the stacks of the goroutines that mention any of
// substrings, leaving out the caller's own and the goroutines of tests
// themselves (a parallel test still running is not a leak).
func Goroutines(substrings ...string) []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	for g := range strings.SplitSeq(string(buf), "\n\n") {
		if strings.Contains(g, "leakcheck.Goroutines(") || strings.Contains(g, "created by testing.(*T).Run") {
			continue
		}
		for _, s := range substrings {
			if strings.Contains(g, s) {
				out = append(out, g)
				break
			}
		}
	}
	return out
}
