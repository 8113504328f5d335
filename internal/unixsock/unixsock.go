// Package unixsock creates Unix domain sockets that have their final
// mode from the first moment they are reachable.
package unixsock

import (
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
)

// Listen listens on a new socket at path with mode. bind(2) creates the
// file 0777 minus the umask, and only a chmod afterwards sets another
// mode: bound at its path, the socket would be open to whatever the
// umask allows until then. Setting the umask around bind does not help,
// as it is the whole process's and would race with every goroutine
// creating a file. So the socket is bound in a new directory of mode
// 0700 beside path, where no other user can reach it, given its mode
// there and renamed into place: rename(2) is atomic, so at path it has
// mode from the start. The rename replaces whatever is at path (a socket
// a crash left behind): callers check first that no one serves there.
//
// Closing the listener does not remove path; the caller does.
func Listen(path string, mode fs.FileMode) (*net.UnixListener, error) {
	// A short name: the bound path, at most 15 bytes longer than the
	// directory, must fit a socket address (107 bytes).
	private, err := os.MkdirTemp(filepath.Dir(path), ".s")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(private)
	bound := filepath.Join(private, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: bound, Net: "unix"})
	if err != nil {
		return nil, err
	}
	// Close would unlink the bound path, which is gone.
	l.SetUnlinkOnClose(false)
	if err := os.Chmod(bound, mode); err != nil {
		l.Close()
		return nil, err
	}
	if err := os.Rename(bound, path); err != nil {
		l.Close()
		return nil, fmt.Errorf("moving the socket into place: %w", err)
	}
	return l, nil
}
