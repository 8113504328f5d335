package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"iotagent.dev/iotagent/agent"
	"iotagent.dev/iotagent/station/mqtttest"
	"iotagent.dev/iotagent/station/stationtest"
	"iotagent.dev/iotagent/tpm/tpmtest"
)

// A gateway boots offline, the common case: the collector's name does not
// resolve. The agent runs anyway, takes readings on its ingest socket,
// and keeps trying the uplink (it exited at start, and systemd restarted
// it in a loop).
func TestRunBootsOffline(t *testing.T) {
	bin := agentBinary(t)
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	// .invalid never resolves (RFC 6761).
	state, sock, args := enrolledRun(t, st, "coaps://collector.invalid:5684")
	p := startAgent(t, bin, args...)
	seqs := send(t, sock, 5)
	// The uplink's first attempt may come after the first status: wait
	// for its error too.
	s := waitStatus(t, state, sock, "running, the uplink not connected, the records queued, an uplink error", func(s agent.Status) bool {
		return s.Running && s.Uplink != "connected" && s.QueueDepth >= int64(len(seqs)) && s.UplinkError != ""
	})
	if !strings.Contains(s.UplinkError, "collector.invalid") {
		t.Errorf("uplink error = %q, want it to name the host that did not resolve", s.UplinkError)
	}
	stopAgent(t, p)
}

// Zero-touch provisioning with the station out of reach: ingest starts at
// once, readings taken before the first enrollment are kept, and they are
// delivered once the station comes back and the device has enrolled.
func TestIngestBeforeFirstEnrollment(t *testing.T) {
	bin := agentBinary(t)
	st := stationtest.Start(t, stationtest.Options{AutoApprove: true})
	br := mqtttest.Start(t, st, mqtttest.Options{})
	sub := br.Subscribe(t, "devices/#")
	st.Stop()

	sim := tpmtest.New(t)
	state := filepath.Join(t.TempDir(), "state")
	sockDir, err := os.MkdirTemp("", "agent")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sockDir) })
	sock := filepath.Join(sockDir, "ingest.sock")
	cfg := filepath.Join(t.TempDir(), "config.toml")
	body := fmt.Sprintf("tpm = %q\nstate_dir = %q\n[station]\nurl = %q\nfingerprint = %q\n[uplink]\nurl = %q\n[ingest]\nsocket = %q\n[collectors]\nhost = false\ninterval = \"1h\"\n",
		sim.Spec, state, st.URL, st.Fingerprint, br.URL, sock)
	if err := os.WriteFile(cfg, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	p := startAgent(t, bin, "run", "--config", cfg, "--ingest-socket", sock)
	seqs := send(t, sock, 20)
	if _, err := os.Stat(filepath.Join(state, "cert.pem")); err == nil {
		t.Fatal("the agent enrolled with the station stopped; the test proves nothing")
	}
	st.Restart()
	sub.WaitSeqs(t, seqs, 90*time.Second)
	stopAgent(t, p)
}
