package unixsock_test

import (
	"net"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"iotagent.dev/iotagent/internal/testdirs"
	"iotagent.dev/iotagent/internal/unixsock"
)

// Under a umask of 0, a socket bound at its path is 0777 until a chmod.
func TestListenFinalModeFromTheStart(t *testing.T) {
	defer syscall.Umask(syscall.Umask(0))
	dir, err := os.MkdirTemp("", "us") // short: a socket path has at most 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	arrived := testdirs.Arrivals(t, dir)
	path := filepath.Join(dir, "sock")
	l, err := unixsock.Listen(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if got := arrived("sock"); !slices.Equal(got, []string{"renamed"}) {
		t.Errorf("the socket arrived %q, want only renamed into place", got)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket: %v, %v; want a socket of mode 0600", fi.Mode(), err)
	}
	go func() {
		if c, err := l.Accept(); err == nil {
			c.Close()
		}
	}()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("dialing the socket: %v", err)
	}
	c.Close()
	if left, _ := os.ReadDir(dir); len(left) != 1 {
		t.Errorf("the directory holds %v, want only the socket", left)
	}
}
