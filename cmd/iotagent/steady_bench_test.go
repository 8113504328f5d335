package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
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
// ingest socket for 20 s, and reports the bytes it wrote to disk per record
// (/proc/PID/io write_bytes: the bbolt queue and its fsyncs) and its
// resident memory at steady state (VmRSS, median of samples). Three
// producers: one record per line, each line waiting for its answer (one
// fsync per record: the worst case for flash); one record per line,
// pipelined (as iotagent send - does: lines are committed in groups); 100
// records per line.
func BenchmarkAgentSteady1000(b *testing.B) {
	for _, tc := range []struct {
		perLine    int
		pipelined  bool
		groupDelay string
	}{{1, false, "0s"}, {1, true, "0s"}, {1, true, "10ms"}, {100, false, "0s"}} {
		b.Run(fmt.Sprintf("records-per-line=%d/pipelined=%v/group_delay=%s", tc.perLine, tc.pipelined, tc.groupDelay), func(b *testing.B) {
			for b.Loop() {
				steady(b, 1000, tc.perLine, tc.pipelined, tc.groupDelay, 20*time.Second)
			}
		})
	}
}

func steady(b *testing.B, rate, perLine int, pipelined bool, groupDelay string, d time.Duration) {
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
	os.WriteFile(cfg, []byte("[collectors]\ninterval = \"10s\"\n[ingest]\ngroup_delay = \""+groupDelay+"\"\n"), 0o600)
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
	// send writes n records at rate records/s, perLine per line, and
	// reads every answer: in step (each line waits for its fsync) or, when
	// pipelined, from a reader running alongside.
	send := func(n int, rate int) {
		lines := n / perLine
		answers := make(chan error, 1)
		if pipelined {
			go func() {
				for i := 0; i < lines; i++ {
					if _, err := r.ReadString('\n'); err != nil {
						answers <- err
						return
					}
				}
				answers <- nil
			}()
		}
		tick := time.NewTicker(time.Second * time.Duration(perLine) / time.Duration(rate))
		defer tick.Stop()
		var line strings.Builder
		for i := 0; i < lines; i++ {
			<-tick.C
			line.Reset()
			line.WriteString(`[{"bn":"steady/","n":"p","u":"W","v":0}`)
			for j := 1; j < perLine; j++ {
				fmt.Fprintf(&line, `,{"n":"p","u":"W","v":%d}`, j)
			}
			line.WriteString("]\n")
			c.Write([]byte(line.String()))
			if !pipelined {
				if _, err := r.ReadString('\n'); err != nil {
					b.Fatal(err)
				}
			}
		}
		if pipelined {
			if err := <-answers; err != nil {
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
	// A clean stop flushes the agent's TPM key (the fixture checks).
	p.cmd.Process.Signal(syscall.SIGTERM)
	<-p.exited
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
