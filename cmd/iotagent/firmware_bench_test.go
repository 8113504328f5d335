package main

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"iotagent.dev/iotagent/agent"
	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/firmware"
	"iotagent.dev/iotagent/firmware/release"
	"iotagent.dev/iotagent/firmware/release/releasetest"
	"iotagent.dev/iotagent/internal/certpem"
	"iotagent.dev/iotagent/station"
	"iotagent.dev/iotagent/station/stationtest"
)

// The firmware benchmarks of issue 11 (scripts/bench.sh firmware):
// reported, never asserted. Sizes are in MB of 10^6 bytes, as the
// issue's goals and go test's MB/s are.

var fwSteady = flag.Duration("fwbench.steady", time.Minute,
	"BenchmarkFirmwareUpdateRSS: how long the agent delivers telemetry before its steady RSS is taken")

// fwBenchPayload is the payload's length: the 20 MB (as
// firmware's BenchmarkDownload, 20 MiB).
const fwBenchPayload = 20 << 20

// procMem is a snapshot of /proc/PID/status, in bytes.
type procMem struct{ rss, hwm, anon, file int64 }

func readMem(pid int) (procMem, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return procMem{}, err
	}
	var m procMem
	fields := map[string]*int64{"VmRSS": &m.rss, "VmHWM": &m.hwm, "RssAnon": &m.anon, "RssFile": &m.file}
	for line := range strings.Lines(string(b)) {
		k, v, _ := strings.Cut(line, ":")
		if p := fields[k]; p != nil {
			f := strings.Fields(v)
			if len(f) != 2 || f[1] != "kB" {
				return procMem{}, fmt.Errorf("/proc/%d/status: %q", pid, line)
			}
			n, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return procMem{}, fmt.Errorf("/proc/%d/status: %q", pid, line)
			}
			*p = n * 1024
		}
	}
	if m.rss == 0 || m.hwm == 0 {
		return procMem{}, fmt.Errorf("/proc/%d/status: no VmRSS or VmHWM", pid)
	}
	return m, nil
}

func mb(n int64) float64 { return float64(n) / 1e6 }

// paddedBinary is a copy of bin padded with random bytes to length: a
// payload of the size that still runs (the kernel loads an ELF
// file by its program headers and ignores what follows).
func paddedBinary(t testing.TB, bin string, length int) []byte {
	t.Helper()
	b, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) > length {
		t.Fatalf("%s is %d bytes, above the payload's %d", bin, len(b), length)
	}
	pad := make([]byte, length-len(b))
	rand.Read(pad)
	return append(b, pad...)
}

// BenchmarkFirmwareUpdateRSS runs iotagent 1.0.0 as its own process
// (swtpm, the station, mosquitto), delivering host telemetry every
// second for -fwbench.steady, then assigns it a 20 MiB release 1.1.0
// through a rollout and a check (SIGUSR2), and reports its memory from
// /proc/PID/status:
//
//   - steady: the median VmRSS (and RssAnon, RssFile) of one sample a
//     second over the second half of the steady period; steady-HWM-MB is
//     VmHWM then (the peak since start, enrollment's and start-up's);
//   - peak: VmHWM, reset (clear_refs 5) at the end of the steady period,
//     read every millisecond while the agent checks, downloads, verifies
//     and stages the release, up to the exec into the trial; the highest
//     read (the kernel may miss a peak given back between two reads);
//     peak-anon/file-MB split the highest VmRSS sampled;
//   - agent-MB/s: the payload over the time from its .part file's
//     appearance to the verified file's (TLS with the TPM key included).
//
// The run fails unless the samples saw the download, its verified file
// and the staging, and the agent then runs 1.1.0 as its trial.
func BenchmarkFirmwareUpdateRSS(b *testing.B) {
	launcher := versionBinary(b, "1.0.0", "")
	payload := paddedBinary(b, versionBinary(b, "1.1.0", ""), fwBenchPayload)
	for b.Loop() {
		updateRSS(b, launcher, payload)
	}
}

func updateRSS(b *testing.B, launcher string, payload []byte) {
	r := newFWRig(b, launcher, "")
	// Host telemetry every second, where the rig has none.
	root, _ := releasetest.Public(r.root).MarshalText()
	cfg := fmt.Sprintf("[collectors]\ninterval = \"1s\"\n[uplink]\nkeepalive = \"5s\"\n[firmware]\nroot_keys = [%q]\npoll_interval = \"1h\"\n", root)
	if err := os.WriteFile(r.cfg, []byte(cfg), 0o600); err != nil {
		b.Fatal(err)
	}
	file, manifest := r.release("1.1.0", 1, payload)
	raw, err := os.ReadFile(manifest)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := r.st.PublishRelease(file, raw); err != nil {
		b.Fatal(err)
	}

	p := startAgent(b, launcher, r.args...)
	pid := p.cmd.Process.Pid
	// A clean stop flushes the agent's TPM key (the fixture checks), also
	// when the run fails.
	b.Cleanup(func() {
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.exited:
		case <-time.After(10 * time.Second):
		}
	})
	fail := func(format string, args ...any) {
		b.Helper()
		b.Fatalf("%s\nthe agent's output:\n%s", fmt.Sprintf(format, args...), p.out)
	}
	start := time.Now()
	var steady []procMem
	var trend []string // VmRSS every 10 s: how steady the steady state is
	for i := 1; time.Since(start) < *fwSteady; i++ {
		time.Sleep(time.Second)
		m, err := readMem(pid)
		if err != nil {
			fail("steady state: %v", err)
		}
		if time.Since(start) >= *fwSteady/2 {
			steady = append(steady, m)
		}
		if i%10 == 0 {
			trend = append(trend, fmt.Sprintf("%.1f", mb(m.rss)))
		}
	}
	b.Logf("steady VmRSS every 10 s (MB): %s", strings.Join(trend, " "))
	// Acknowledged within the last few intervals, the queue not growing.
	if s := status(b, r.state, r.sock); time.Since(s.LastAck) > 10*time.Second || s.QueueDepth > 100 {
		fail("telemetry not delivered while steady: %+v", s)
	}
	before, err := readMem(pid)
	if err != nil {
		fail("%v", err)
	}
	// 5 resets VmHWM to the current VmRSS (proc(5)).
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		b.Fatalf("resetting the agent's VmHWM: %v", err)
	}

	if _, err := r.st.CreateRollout(station.RolloutRequest{Release: "iotagent@1.1.0", All: true, Waves: []int{100}}); err != nil {
		b.Fatal(err)
	}
	if err := p.cmd.Process.Signal(syscall.SIGUSR2); err != nil {
		b.Fatal(err)
	}
	dl := filepath.Join(r.state, "firmware", "download", "iotagent-1.1.0")
	var (
		hwm, samples       int64
		skipped            int
		top                procMem // the highest VmRSS sampled
		partSeen, doneSeen time.Time
	)
	// Until the launcher, exec'd again, starts the trial: the samples
	// after the exec are of a process just started, far below the peak.
	deadline := time.Now().Add(2 * time.Minute)
	for !strings.Contains(p.out.String(), "starting the slot binary") {
		now := time.Now()
		_, errPart := os.Stat(dl + ".part")
		_, errDone := os.Stat(dl)
		m, err := readMem(pid)
		if err != nil {
			// A read in the middle of the exec finds no memory figures.
			select {
			case <-p.exited:
				fail("the agent exited during the update: %v", p.err)
			default:
			}
			if skipped++; skipped > 100 {
				fail("during the update: %v", err)
			}
			time.Sleep(time.Millisecond)
			continue
		}
		// VmHWM can go down: the kernel does not record a peak that the Go
		// runtime gave back (madvise) before the next sample.
		hwm, samples = max(hwm, m.hwm), samples+1
		if m.rss > top.rss {
			top = m
		}
		switch {
		case partSeen.IsZero() && errPart == nil:
			partSeen = now
		case doneSeen.IsZero() && errDone == nil:
			doneSeen = now
		}
		if now.After(deadline) {
			fail("the trial did not start within 2 minutes (part file seen %v, verified %v)", partSeen, doneSeen)
		}
		time.Sleep(time.Millisecond)
	}
	if partSeen.IsZero() || doneSeen.IsZero() || !strings.Contains(p.out.String(), "staged; restarting into the trial") {
		fail("the samples missed a step (part file seen %v, verified %v): no peak to report", partSeen, doneSeen)
	}
	r.waitFW("1.1.0 on trial", 60*time.Second, func(s agent.FirmwareStatus) bool { return s.Running == "1.1.0" && s.DaemonPID == pid })

	med := func(f func(procMem) int64) int64 {
		v := make([]int64, len(steady))
		for i, m := range steady {
			v[i] = f(m)
		}
		return median(v)
	}
	rss := med(func(m procMem) int64 { return m.rss })
	b.ReportMetric(mb(rss), "steady-RSS-MB")
	b.ReportMetric(mb(med(func(m procMem) int64 { return m.anon })), "steady-anon-MB")
	b.ReportMetric(mb(med(func(m procMem) int64 { return m.file })), "steady-file-MB")
	b.ReportMetric(mb(before.hwm), "steady-HWM-MB")
	b.ReportMetric(mb(hwm), "peak-RSS-MB")
	b.ReportMetric(mb(hwm-rss), "above-steady-MB")
	b.ReportMetric(mb(top.anon), "peak-anon-MB")
	b.ReportMetric(mb(top.file), "peak-file-MB")
	b.ReportMetric(float64(len(payload))/1e6/doneSeen.Sub(partSeen).Seconds(), "agent-MB/s")
	b.Logf("%d samples from the check to the trial's start (%d reads without figures, at the exec); download and verify %v",
		samples, skipped, doneSeen.Sub(partSeen).Round(time.Millisecond))
}

// BenchmarkFirmwareFetch fetches one 20 MiB payload from a real station
// over loopback mutual TLS (a device certificate with a software key),
// each fetch on a new connection, side by side in one run:
//
//   - downloader: the agent's firmware.Downloader with the agent's HTTP
//     client (enroll.Client's): hashed as it arrives, the data fsync'ed
//     and the resume point saved every MiB, the digest checked, renamed;
//   - downloader-saved-once: the same with SaveEvery past the length (one
//     fsync, at the end): what saving the resume point every MiB costs;
//   - curl: curl --cert --key --cacert writing the file, nothing more.
//
// downloader/curl is the ratio of the first and the last.
func BenchmarkFirmwareFetch(b *testing.B) {
	st := stationtest.Start(b, stationtest.Options{AutoApprove: true})
	_, signer, _ := installKeyList(b, st)
	dir := b.TempDir()
	payload := make([]byte, fwBenchPayload)
	rand.Read(payload)
	sum := sha256.Sum256(payload)
	m := release.Manifest{Name: "iotagent", Type: release.TypeAgent, Version: "9.0.0", SVN: 1, HW: []string{"linux/amd64"},
		Length: int64(len(payload)), SHA256: hex.EncodeToString(sum[:]), Expires: time.Now().Add(time.Hour)}
	file := filepath.Join(dir, "payload")
	if err := os.WriteFile(file, payload, 0o600); err != nil {
		b.Fatal(err)
	}
	if _, err := st.PublishRelease(file, releasetest.Sign(b, release.TypeManifest, m, signer)); err != nil {
		b.Fatal(err)
	}
	dev := st.Device(b, "gw-fetch")
	cert, key := filepath.Join(dir, "device.crt"), filepath.Join(dir, "device.key")
	if err := os.WriteFile(cert, dev.ChainPEM, 0o600); err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(key, dev.KeyPEM, 0o600); err != nil {
		b.Fatal(err)
	}
	ec, err := enroll.NewClient(enroll.ClientConfig{URL: st.URL, Roots: certpem.Pool([]*x509.Certificate{st.Root()}),
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &dev.TLS, nil }})
	if err != nil {
		b.Fatal(err)
	}
	url := (&firmware.Client{Station: st.URL}).PayloadURL(&m)
	target := firmware.Target{Length: m.Length, SHA256: m.Digest()}

	// The protocol each one speaks, once.
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	req.Header.Set("Range", "bytes=0-0")
	resp, err := ec.HTTP(10 * time.Second).Do(req)
	if err != nil {
		b.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	curlArgs := []string{"-sS", "--fail", "--cert", cert, "--key", key, "--cacert", st.RootFile}
	proto, err := exec.Command("curl", append(curlArgs, "-o", "/dev/null", "-r", "0-0", "-w", "%{http_version}", url)...).CombinedOutput()
	if err != nil {
		b.Fatalf("curl: %v: %s", err, proto)
	}
	b.Logf("%d bytes over loopback mTLS; the downloader speaks %s, curl HTTP/%s", len(payload), resp.Proto, proto)

	d := &firmware.Downloader{Client: ec.HTTP(0)}
	ways := []struct {
		name string
		get  func(path string) error
		took time.Duration
	}{
		{name: "downloader", get: func(path string) error { return d.Fetch(context.Background(), url, path, target) }},
		// The same with the resume point saved only at the end: what the
		// fsync of every MiB costs.
		{name: "downloader-saved-once", get: func(path string) error {
			d := &firmware.Downloader{Client: d.Client, SaveEvery: 1 << 62}
			return d.Fetch(context.Background(), url, path, target)
		}},
		{name: "curl", get: func(path string) error {
			if out, err := exec.Command("curl", append(curlArgs, "-o", path, url)...).CombinedOutput(); err != nil {
				return fmt.Errorf("curl: %v: %s", err, out)
			}
			return nil
		}},
	}
	// Alternated fetch by fetch, so that both see the same machine.
	n := 0
	for b.Loop() {
		for i := range ways {
			w := &ways[i]
			path := filepath.Join(dir, w.name)
			ec.CloseIdleConnections() // a new connection each time, as curl's
			t0 := time.Now()
			if err := w.get(path); err != nil {
				b.Fatal(err)
			}
			w.took += time.Since(t0)
			if fi, err := os.Stat(path); err != nil || fi.Size() != int64(len(payload)) {
				b.Fatalf("%s: %v, want %d bytes", w.name, err, len(payload))
			}
			os.Remove(path)
		}
		n++
	}
	rate := func(took time.Duration) float64 { return float64(n) * float64(len(payload)) / 1e6 / took.Seconds() }
	dlRate, curlRate := rate(ways[0].took), rate(ways[2].took)
	b.ReportMetric(dlRate, "downloader-MB/s")
	b.ReportMetric(rate(ways[1].took), "downloader-saved-once-MB/s")
	b.ReportMetric(curlRate, "curl-MB/s")
	b.ReportMetric(dlRate/curlRate, "downloader/curl")
}
