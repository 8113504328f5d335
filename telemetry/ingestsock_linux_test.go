package telemetry

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"unsafe"

	"iotagent.dev/iotagent/store"
)

// inotifyEvent is one event of an inotify descriptor: its mask and the
// name in the watched directory.
type inotifyEvent struct {
	mask uint32
	name string
}

// readInotify returns the events fd has queued, without waiting.
func readInotify(t *testing.T, fd int) []inotifyEvent {
	t.Helper()
	var events []inotifyEvent
	buf := make([]byte, 64<<10)
	for {
		n, err := syscall.Read(fd, buf)
		if err == syscall.EAGAIN {
			return events
		}
		if err != nil {
			t.Fatalf("reading inotify events: %v", err)
		}
		for off := 0; off+syscall.SizeofInotifyEvent <= n; {
			ev := (*syscall.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := buf[off+syscall.SizeofInotifyEvent : off+syscall.SizeofInotifyEvent+int(ev.Len)]
			for len(name) > 0 && name[len(name)-1] == 0 {
				name = name[:len(name)-1]
			}
			events = append(events, inotifyEvent{ev.Mask, string(name)})
			off += syscall.SizeofInotifyEvent + int(ev.Len)
		}
	}
}

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
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Close(fd)
	if _, err := syscall.InotifyAddWatch(fd, dir, syscall.IN_CREATE|syscall.IN_MOVED_TO|syscall.IN_ATTRIB); err != nil {
		t.Fatal(err)
	}

	path := filepath.Join(dir, "sock")
	ing, _, stop := startIngestWith(t, store.Options{}, IngestConfig{Socket: path})

	var seen []string
	for _, ev := range readInotify(t, fd) {
		if ev.name != "sock" {
			continue
		}
		switch {
		case ev.mask&syscall.IN_CREATE != 0:
			seen = append(seen, "created (bound) there")
		case ev.mask&syscall.IN_MOVED_TO != 0:
			seen = append(seen, "renamed into place")
		case ev.mask&syscall.IN_ATTRIB != 0:
			seen = append(seen, "mode changed")
		}
	}
	if len(seen) != 1 || seen[0] != "renamed into place" {
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
