package firmware_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"iotagent.dev/iotagent/firmware"
)

// origin serves payload with Range support, and can misbehave: cut the
// body of the first requests after some bytes, ignore Range, serve other
// bytes or more of them.
type origin struct {
	payload []byte
	cuts    []int64 // the n-th request's body stops after cuts[n] bytes
	served  atomic.Int64
	reqs    atomic.Int64

	ignoreRange  bool
	body         []byte // served instead of payload when set
	contentRange string // sent instead of the right one when set
}

func (o *origin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := o.reqs.Add(1) - 1
	data := o.payload
	if o.body != nil {
		data = o.body
	}
	start := int64(0)
	if rg := r.Header.Get("Range"); rg != "" && !o.ignoreRange {
		v, ok := strings.CutPrefix(rg, "bytes=")
		s, err := strconv.ParseInt(strings.TrimSuffix(v, "-"), 10, 64)
		if !ok || err != nil || s >= int64(len(data)) {
			w.WriteHeader(http.StatusRequestedRangeNotSatisfiable)
			return
		}
		start = s
		cr := fmt.Sprintf("bytes %d-%d/%d", start, len(data)-1, len(data))
		if o.contentRange != "" {
			cr = o.contentRange
		}
		w.Header().Set("Content-Range", cr)
		w.Header().Set("Content-Length", strconv.Itoa(len(data)-int(start)))
		w.WriteHeader(http.StatusPartialContent)
	} else {
		w.Header().Set("Content-Length", strconv.Itoa(len(data)))
		w.WriteHeader(http.StatusOK)
	}
	rest := data[start:]
	if n < int64(len(o.cuts)) && o.cuts[n] < int64(len(rest)) {
		w.Write(rest[:o.cuts[n]])
		o.served.Add(o.cuts[n])
		w.(http.Flusher).Flush()
		panic(http.ErrAbortHandler) // the connection drops mid-body
	}
	w.Write(rest)
	o.served.Add(int64(len(rest)))
}

func payload(t testing.TB, n int) ([]byte, firmware.Target) {
	t.Helper()
	b := make([]byte, n)
	rand.Read(b)
	sum := sha256.Sum256(b)
	return b, firmware.Target{Length: int64(n), SHA256: sum[:]}
}

func start(t testing.TB, o *origin) (*httptest.Server, *http.Client) {
	t.Helper()
	srv := httptest.NewTLSServer(o)
	t.Cleanup(srv.Close)
	return srv, srv.Client()
}

// A download cut three times resumes each time where it stopped (the
// bytes served add up to the payload once: no restart from zero), across
// new Downloaders as after a restart, and ends with the file in place.
func TestDownloadResumes(t *testing.T) {
	data, target := payload(t, 3<<20+123)
	o := &origin{payload: data, cuts: []int64{700_000, 1, 1 << 20}}
	srv, c := start(t, o)
	path := filepath.Join(t.TempDir(), "iotagent.new")
	var errs []error
	for range 4 {
		d := &firmware.Downloader{Client: c, SaveEvery: 256 << 10}
		err := d.Fetch(context.Background(), srv.URL+"/p", path, target)
		if err == nil {
			break
		}
		errs = append(errs, err)
	}
	if len(errs) != 3 {
		t.Fatalf("%d failed attempts (%v), want the 3 cut ones", len(errs), errs)
	}
	got, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(got, data) {
		t.Fatalf("downloaded file: %v (%d bytes, equal %v)", err, len(got), bytes.Equal(got, data))
	}
	if served := o.served.Load(); served != target.Length {
		t.Errorf("the origin served %d bytes for a payload of %d: a resume started over", served, target.Length)
	}
	for _, left := range []string{path + ".part", path + ".part.json"} {
		if _, err := os.Stat(left); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind", left)
		}
	}
}

// A server that ignores Range gets a full download, started over.
func TestDownloadRangeIgnored(t *testing.T) {
	data, target := payload(t, 1<<20)
	o := &origin{payload: data, cuts: []int64{300_000}, ignoreRange: true}
	srv, c := start(t, o)
	path := filepath.Join(t.TempDir(), "p")
	d := &firmware.Downloader{Client: c}
	if err := d.Fetch(context.Background(), srv.URL, path, target); err == nil {
		t.Fatal("the cut attempt succeeded")
	}
	if err := d.Fetch(context.Background(), srv.URL, path, target); err != nil {
		t.Fatalf("the second attempt: %v", err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, data) {
		t.Error("the file is not the payload")
	}
}

// Bad downloads are refused with their reason, and nothing is left in
// place.
func TestDownloadRefused(t *testing.T) {
	data, target := payload(t, 200_000)
	other, _ := payload(t, 200_000)
	for _, tc := range []struct {
		name string
		o    *origin
		want error
		pre  func(path string) // an earlier, cut attempt
	}{
		{"tampered payload", &origin{payload: data, body: other}, firmware.ErrDigest, nil},
		{"overlong body", &origin{payload: data, body: append(bytes.Clone(data), 1, 2, 3)}, firmware.ErrLength, nil},
		{"truncated body", &origin{payload: data, body: data[:100_000]}, firmware.ErrLength, nil},
		{"wrong Content-Range on a resume", &origin{payload: data, cuts: []int64{50_000}, contentRange: "bytes 0-199999/200000"}, firmware.ErrLength, func(string) {}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv, c := start(t, tc.o)
			path := filepath.Join(t.TempDir(), "p")
			d := &firmware.Downloader{Client: c}
			if tc.pre != nil {
				if err := d.Fetch(context.Background(), srv.URL, path, target); err == nil {
					t.Fatal("the cut attempt succeeded")
				}
			}
			err := d.Fetch(context.Background(), srv.URL, path, target)
			if !errors.Is(err, tc.want) {
				t.Errorf("Fetch = %v, want %v", err, tc.want)
			}
			if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
				t.Error("a refused payload is in place")
			}
			if tc.pre == nil {
				if _, err := os.Stat(path + ".part"); !errors.Is(err, os.ErrNotExist) {
					t.Error("a refused payload's part file is left")
				}
			}
		})
	}
}

// A file system without room for the payload is refused before any byte
// is fetched.
func TestDownloadNoSpace(t *testing.T) {
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mounting a small tmpfs (the tests run as root): %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	data, target := payload(t, 1<<20)
	o := &origin{payload: data}
	srv, c := start(t, o)
	d := &firmware.Downloader{Client: c}
	err := d.Fetch(context.Background(), srv.URL, filepath.Join(dir, "p"), target)
	if !errors.Is(err, firmware.ErrNoSpace) || !strings.Contains(err.Error(), "needs") {
		t.Errorf("Fetch into 256 KiB = %v, want ErrNoSpace", err)
	}
	if o.reqs.Load() != 0 {
		t.Error("the download was requested anyway")
	}
}

// BenchmarkDownload reports the bytes allocated per download of a 20 MB
// payload over loopback TLS (client and test server together): the
// payload is streamed, never held.
func BenchmarkDownload(b *testing.B) {
	data, target := payload(b, 20<<20)
	o := &origin{payload: data}
	srv, c := start(b, o)
	dir := b.TempDir()
	b.SetBytes(target.Length)
	b.ReportAllocs()
	for i := range b.N {
		d := &firmware.Downloader{Client: c}
		if err := d.Fetch(context.Background(), srv.URL, filepath.Join(dir, strconv.Itoa(i)), target); err != nil {
			b.Fatal(err)
		}
	}
}

// A part file shorter than its saved resume point (a crash after a
// restart from zero truncated it, or the card lost data) is not trusted:
// the saved hash state would vouch for bytes that are not there, and the
// file put in place would differ from the signed payload.
func TestDownloadDistrustsShortPartFile(t *testing.T) {
	data, target := payload(t, 1<<20)
	o := &origin{payload: data, cuts: []int64{600_000}}
	srv, c := start(t, o)
	path := filepath.Join(t.TempDir(), "p")
	d := &firmware.Downloader{Client: c}
	if err := d.Fetch(context.Background(), srv.URL, path, target); err == nil {
		t.Fatal("the cut attempt succeeded")
	}
	if err := os.Truncate(path+".part", 100_000); err != nil {
		t.Fatal(err)
	}
	if err := d.Fetch(context.Background(), srv.URL, path, target); err != nil {
		t.Fatalf("Fetch after the part file shrank: %v", err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, data) {
		t.Fatal("the file in place is not the signed payload")
	}
}
