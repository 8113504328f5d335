package testdirs

import (
	"syscall"
	"testing"
	"unsafe"
)

// Arrivals watches dir (inotify) from now on; the function it returns
// says how name came to be there since: "created" (made at its path),
// "renamed" (moved into place), "mode changed", in order. A socket that
// must never be reachable with another mode than its final one arrives
// only "renamed".
func Arrivals(t testing.TB, dir string) func(name string) []string {
	t.Helper()
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if _, err := syscall.InotifyAddWatch(fd, dir, syscall.IN_CREATE|syscall.IN_MOVED_TO|syscall.IN_ATTRIB); err != nil {
		t.Fatal(err)
	}
	var events []inotifyEvent
	return func(name string) []string {
		t.Helper()
		events = append(events, readInotify(t, fd)...)
		var seen []string
		for _, ev := range events {
			if ev.name != name {
				continue
			}
			switch {
			case ev.mask&syscall.IN_CREATE != 0:
				seen = append(seen, "created")
			case ev.mask&syscall.IN_MOVED_TO != 0:
				seen = append(seen, "renamed")
			case ev.mask&syscall.IN_ATTRIB != 0:
				seen = append(seen, "mode changed")
			}
		}
		return seen
	}
}

type inotifyEvent struct {
	mask uint32
	name string
}

// readInotify returns the events fd has queued, without waiting.
func readInotify(t testing.TB, fd int) []inotifyEvent {
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
