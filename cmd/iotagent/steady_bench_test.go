package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/telemetry/mqtttest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// procValue reads a "Key: value" field from a /proc file.
func procValue(path, key string) int64 {
	b, err := os.ReadFile(path)
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && k == key {
			f := strings.Fields(v)
			n, _ := strconv.ParseInt(f[0], 10, 64)
			if len(f) > 1 && f[1] == "kB" {
				n *= 1024
			}
			return n
		}
	}
	return -1
}

// BenchmarkAgentSteady1000 runs iotagent as its own process against
// swtpm, the station and mosquitto, feeds it 1000 records/s through the
// ingest socket (one producer, one record per line, 20 s), and reports the
// bytes it wrote to disk per record (/proc/PID/io write_bytes) and its
// resident memory at steady state (VmRSS, median of samples).
func BenchmarkAgentSteady1000(b *testing.B) {
	for b.Loop() {
		steady(b, 1000, 20*time.Second)
	}
}

func steady(b *testing.B, rate int, d time.Duration) {
	bin := agentBinary(b)
	st := stationtest.Start(b, stationtest.Options{AutoApprove: true})
	br := mqtttest.Start(b, st, mqtttest.Options{})
	sim := tpmtest.New(b)
	state := filepath.Join(b.TempDir(), "state")
	var out, errb strings.Builder
	if code := runWith(b.Context(), &env{stdin: strings.NewReader(""), stdout: &out, stderr: &errb, now: time.Now},
		[]string{"--tpm", sim.Spec, "--state-dir", state, "enroll", "--station", st.URL, "--station-fingerprint", st.Fingerprint}); code != 0 {
		b.Fatalf("enroll: %s", errb.String())
	}
	sockDir, _ := os.MkdirTemp("", "agent")
	b.Cleanup(func() { os.RemoveAll(sockDir) })
	cfg := filepath.Join(b.TempDir(), "config.toml")
	os.WriteFile(cfg, []byte("[collectors]\ninterval = \"10s\"\n"), 0o600)
	sock := filepath.Join(sockDir, "ingest.sock")
	p := startAgent(b, bin, "--tpm", sim.Spec, "--state-dir", state, "run", "--config", cfg, "--uplink", br.URL, "--ingest-socket", sock)
	pid := p.cmd.Process.Pid

	c, err := net.Dial("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	// Warm up, then measure.
	send := func(n int, rate int) {
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for i := 0; i < n; i++ {
			<-tick.C
			fmt.Fprintf(c, `[{"n":"steady","u":"W","v":%d}]`+"\n", i)
			if _, err := r.ReadString('\n'); err != nil {
				b.Fatal(err)
			}
		}
	}
	send(rate*2, rate)
	io := fmt.Sprintf("/proc/%d/io", pid)
	before := procValue(io, "write_bytes")
	var rss []int64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Second):
				rss = append(rss, procValue(fmt.Sprintf("/proc/%d/status", pid), "VmRSS"))
			}
		}
	}()
	n := int(d.Seconds()) * rate
	start := time.Now()
	send(n, rate)
	elapsed := time.Since(start)
	close(stop)
	<-done
	after := procValue(io, "write_bytes")
	if before < 0 || after < 0 {
		b.Fatalf("cannot read %s", io)
	}
	med := median(rss)
	b.ReportMetric(float64(after-before)/float64(n), "disk-bytes/record")
	b.ReportMetric(float64(med)/(1<<20), "RSS-MiB")
	b.ReportMetric(float64(n)/elapsed.Seconds(), "records/s")
}

func median(v []int64) int64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]int64(nil), v...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}
