package telemetry

import (
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"

	"iotagent.dev/iotagent/internal/testdirs"
	"iotagent.dev/iotagent/store"
)

// The ingest socket appears at its path with its final mode, 0660, even
// under a umask of 0: bound where it stood at 0777 until a chmod, any
// local user could connect and write telemetry in between.
func TestAttackIngestSocketMode(t *testing.T) {
	defer syscall.Umask(syscall.Umask(0))
	dir, err := os.MkdirTemp("", "ing") // short: a socket path has at most 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	arrived := testdirs.Arrivals(t, dir)

	path := filepath.Join(dir, "sock")
	ing, _, stop := startIngestWith(t, store.Options{}, IngestConfig{Socket: path})

	if seen := arrived("sock"); !slices.Equal(seen, []string{"renamed"}) {
		t.Errorf("at its path the socket was %q, want only renamed into place", seen)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o660 {
		t.Errorf("socket mode %v, want a socket, 0660", fi.Mode())
	}
	if c := dial(t, ing); c.send(t, `[{"n":"x","v":1}]`) != "ok 1" {
		t.Error("the socket does not serve")
	}

	stop()
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("after Run, the socket's directory holds %v, want nothing", left)
	}
}
