package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"iotagent.dev/iotagent/enroll"
	"iotagent.dev/iotagent/internal/atomicfile"
	"iotagent.dev/iotagent/store"
	"iotagent.dev/iotagent/telemetry"
	"iotagent.dev/iotagent/tpm"
)

// The status-file protocol: the running agent rewrites a small JSON file
// beside its ingest socket (the runtime directory, tmpfs: no flash wear)
// every statusEvery, and removes it when it stops; Status reads it and
// trusts it while it is younger than statusFresh.
const (
	statusEvery = 2 * time.Second
	statusFresh = 10 * time.Second
)

// statusFile is the status file of the agent serving socket.
func statusFile(socket string) string { return filepath.Join(filepath.Dir(socket), "status.json") }

// runtimeStatus is the status file's content.
type runtimeStatus struct {
	PID            int                    `json:"pid"`
	Updated        time.Time              `json:"updated"`
	RecordsQueued  uint64                 `json:"records_ingested"` // sequence numbers handed out
	QueueDepth     int64                  `json:"queue_depth"`
	QueueBytes     int64                  `json:"queue_bytes"`
	RecordsDropped uint64                 `json:"records_dropped"`
	Delivered      uint64                 `json:"records_delivered"`
	Uplink         *telemetry.UplinkState `json:"uplink,omitempty"`
	// Enrolling is why first enrollment failed last, while the device is
	// not enrolled.
	Enrolling string `json:"enrolling,omitempty"`
	// Firmware is the update state, when [firmware] is on.
	Firmware *fwRuntime `json:"firmware,omitempty"`
}

type statusWriter struct {
	path string
	d    *daemon
}

// Run writes the status every statusEvery and removes it at exit. A
// status file that cannot be written is logged, not fatal: telemetry
// matters more.
func (w *statusWriter) Run(ctx context.Context) error {
	t := time.NewTicker(statusEvery)
	defer t.Stop()
	defer os.Remove(w.path)
	var failing bool
	for {
		st := w.d.q.Stats()
		rs := runtimeStatus{PID: os.Getpid(), Updated: time.Now().UTC(), RecordsQueued: st.NextSeq - 1, QueueDepth: st.Depth, QueueBytes: st.Bytes, RecordsDropped: st.Dropped}
		if dl := w.d.delivery.Load(); dl != nil {
			u := dl.up.State()
			rs.Uplink, rs.Delivered = &u, dl.pipe.Delivered()
		}
		if e := w.d.enrolling.Load(); e != nil {
			rs.Enrolling = *e
		}
		rs.Firmware = w.d.firmware.Load()
		b, _ := json.Marshal(rs)
		err := atomicfile.Write(w.path, b, 0o640)
		if err != nil && !failing && ctx.Err() == nil {
			w.d.a.log.Warn("writing the status file (iotagent status cannot see this agent)", "err", err)
		}
		failing = err != nil
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Status is what iotagent status reports; its JSON keys are a contract
// with operators' scripts.
type Status struct {
	DeviceID         string    `json:"device_id"`
	CertSerial       string    `json:"cert_serial"`
	CertNotAfter     time.Time `json:"cert_not_after"`
	NextRenewal      time.Time `json:"next_renewal"`
	LastRenewal      time.Time `json:"last_renewal,omitzero"`
	LastRenewalError string    `json:"last_renewal_error"`
	Renewals         int       `json:"renewals"`
	Station          string    `json:"station"`
	TPM              string    `json:"tpm"`
	// From the running agent (or the queue file when none runs).
	QueueDepth     int64     `json:"queue_depth"`
	QueueBytes     int64     `json:"queue_bytes"`
	RecordsDropped uint64    `json:"records_dropped"`
	Uplink         string    `json:"uplink"`
	UplinkError    string    `json:"uplink_error,omitempty"`
	LastAck        time.Time `json:"last_ack,omitzero"`
	Running        bool      `json:"running"`
}

// Status reports the device's identity and renewal state from the state
// directory, and the queue and uplink from the running agent's status file
// (or from the queue file when no agent runs). It needs no TPM.
func (a *Agent) Status() (*Status, error) {
	dir := string(a.s.dir)
	rs, running := readRuntimeStatus(statusFile(a.s.socket))
	st, err := enroll.LoadState(dir)
	if errors.Is(err, enroll.ErrNotEnrolled) && running && rs.Enrolling != "" {
		return nil, fmt.Errorf("%w; the running agent (pid %d) is enrolling: %s", err, rs.PID, rs.Enrolling)
	}
	if err != nil {
		return nil, err
	}
	renewal, err := enroll.LoadRenewalStatus(dir)
	if err != nil {
		return nil, err
	}
	leaf := st.Leaf()
	next := renewal.NextRenewal
	if next.IsZero() {
		next = enroll.RenewalTime(leaf.NotBefore, leaf.NotAfter, 0).UTC()
	}
	spec, _ := tpm.ParseSpec(a.cfg.TPM)
	out := &Status{
		DeviceID: st.Enrollment.DeviceID, CertSerial: leaf.SerialNumber.Text(16), CertNotAfter: leaf.NotAfter.UTC(),
		NextRenewal: next, LastRenewal: renewal.LastRenewal, LastRenewalError: renewal.LastError, Renewals: renewal.Renewals,
		Station: st.Enrollment.Station, TPM: spec.String(), Uplink: "not running",
	}
	switch {
	case running:
		out.Running = true
		out.QueueDepth, out.QueueBytes, out.RecordsDropped = rs.QueueDepth, rs.QueueBytes, rs.RecordsDropped
		out.Uplink = "none configured"
		if rs.Uplink != nil {
			out.Uplink, out.UplinkError, out.LastAck = string(rs.Uplink.State), rs.Uplink.LastError, rs.Uplink.LastAck
		}
	default:
		a.queueFileStatus(out)
	}
	return out, nil
}

// readRuntimeStatus reads a status file; false if there is none or it is
// stale (its agent died without removing it).
func readRuntimeStatus(path string) (runtimeStatus, bool) {
	var rs runtimeStatus
	b, err := os.ReadFile(path)
	if err != nil || json.Unmarshal(b, &rs) != nil {
		return rs, false
	}
	return rs, time.Since(rs.Updated) < statusFresh
}

// queueFileStatus fills the queue fields from the queue file, which no
// agent holds open.
func (a *Agent) queueFileStatus(out *Status) {
	path := a.s.dir.Queue()
	if _, err := os.Stat(path); err != nil {
		return
	}
	q, err := store.Open(store.Options{Path: path, OpenTimeout: 200 * time.Millisecond})
	if err != nil {
		return
	}
	defer q.Close()
	st := q.Stats()
	out.QueueDepth, out.QueueBytes, out.RecordsDropped = st.Depth, st.Bytes, st.Dropped
}

// WriteText writes the report as iotagent prints it without --json.
func (out *Status) WriteText(w io.Writer) {
	fmt.Fprintf(w, "device:        %s\ncertificate:   %s, valid until %s\nnext renewal:  %s\nstation:       %s\ntpm:           %s\n",
		out.DeviceID, out.CertSerial, out.CertNotAfter.Format(time.RFC3339), out.NextRenewal.Format(time.RFC3339), out.Station, out.TPM)
	if out.LastRenewalError != "" {
		fmt.Fprintf(w, "last error:    %s\n", out.LastRenewalError)
	}
	fmt.Fprintf(w, "uplink:        %s\nqueue:         %d records, %d bytes, %d dropped\n", out.Uplink, out.QueueDepth, out.QueueBytes, out.RecordsDropped)
	if !out.LastAck.IsZero() {
		fmt.Fprintf(w, "last ack:      %s\n", out.LastAck.Format(time.RFC3339))
	}
}
